"""Multi-label classification end to end, against the real S3 server on 127.0.0.1: a manifest of label lists
trained with every export format (each checked in its own runtime), the labels `predict` gives with each, the
same dataset packed into shards and streamed, the same recipe stopped and resumed to that run's weights, and
bad input as one line with the documented exit code."""

from __future__ import annotations

import json
import signal

import pytest
import yaml
from conftest import SIZE, data_config, run_cli
from test_fault_tolerance import Running

from job.config import SearchConfig
from job.sample_data import write_multilabel_dataset

pytestmark = pytest.mark.slow
LABELS = ("circle", "square", "triangle")
FORMATS = ["saved_model", "tf_serving", "tflite", "tflite_int8", "onnx"]


@pytest.fixture(scope="module")
def multi(s3, dataset, tmp_path_factory) -> dict:
    """The multi-label sample dataset (images and labels.jsonl) under multi/ in the module's bucket."""
    root = tmp_path_factory.mktemp("multi")
    manifest = write_multilabel_dataset(root, LABELS, train=72, test=24, size=SIZE, seed=3)
    s3.upload_dir(root, dataset, "multi")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    return {"uri": f"s3://{dataset}/multi", "manifest": f"s3://{dataset}/multi/labels.jsonl", "rows": rows,
            "root": root}


def config(tmp_path, dataset, multi, run_id, *, formats=("saved_model",), uri=None, task="multi_label",
           sections=None, **data):
    """data_config's small run over the multi-label dataset (its manifest unless `uri` is given), with `task`
    and `sections` ({"train": {...}}: merged one level deep)."""
    if uri is None:
        data.setdefault("manifest", multi["manifest"])
    path = data_config(tmp_path, dataset, run_id, uri or multi["uri"], formats=formats, **data)
    cfg = {"task": task, **yaml.safe_load(path.read_text())}
    for section, values in (sections or {}).items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def get_json(s3, bucket, key):
    return json.loads(s3.client.get_object(Bucket=bucket, Key=key)["Body"].read())


# The trained run's recipe, resumable at every epoch's end: the defaults' search (on val_loss) with one epoch per
# trial, then the chosen trial on to 3 fine-tuning epochs. test_a_resumed_multilabel_run... stops a run of it.
RESUMABLE = {"train": {"finetune": {"epochs": 3, "unfreeze": 10}, "early_stopping_patience": 0,
                       "search": {"epochs": 1}},
             "checkpoint": {"every_seconds": 0, "lease_seconds": 6}}


@pytest.fixture(scope="module")
def trained(s3, dataset, multi, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("trained")
    cfg = config(tmp, dataset, multi, "ml-manifest", formats=FORMATS, search=True, head_epochs=2, sections=RESUMABLE)
    result = run_cli("train", "--config", str(cfg), env=s3.env())
    assert result.returncode == 0, result.stderr[-3000:]
    return {"records": result.records(), "prefix": "runs/ml-manifest", "config": cfg}


def test_a_multilabel_run_writes_thresholds_reports_and_every_format(s3, dataset, multi, trained):
    prefix = trained["prefix"]
    thresholds = get_json(s3, dataset, f"{prefix}/thresholds.json")["labels"]
    assert list(thresholds) == list(LABELS)
    assert all(0 < t["threshold"] < 1 and t["chosen_by"] == "validation_f1" for t in thresholds.values())
    metrics = get_json(s3, dataset, f"{prefix}/metrics.json")
    test = metrics["test"]
    assert test["examples"] == 24
    for key in ("map", "micro_f1", "macro_f1", "subset_accuracy", "loss"):
        assert 0 <= test[key] <= (1 if key != "loss" else 10), key
    truth = [r for r in multi["rows"] if r["split"] == "test"]
    for label in LABELS:
        per = test["per_label"][label]
        assert per["support"] == sum(label in r["labels"] for r in truth)
        assert per["threshold"] == thresholds[label]["threshold"]
        assert set(per) == {"precision", "recall", "f1", "average_precision", "support", "threshold"}
    history = get_json(s3, dataset, f"{prefix}/history.json")
    assert all("val_map" in r and 0 <= r["val_accuracy"] <= 1 for phase in history.values() for r in phase)
    formats = metrics["formats"]
    assert set(formats) == set(FORMATS)
    for fmt, r in formats.items():
        assert r["examples"] == 24 and 0 <= r["micro_f1"] <= 1, fmt
        if fmt not in ("saved_model", "tflite_int8"):
            assert r["agreement"] >= 0.99 and r["max_score_difference"] < 0.01, (fmt, r)
    import onnxruntime as ort  # the order the JSON and the README give is the file's own

    onnx_bytes = s3.client.get_object(Bucket=dataset, Key=f"{prefix}/model.onnx")["Body"].read()
    in_order = [o.name for o in ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"]).get_outputs()]
    assert get_json(s3, dataset, f"{prefix}/model.onnx.json")["output_names_in_order"] == in_order == ["above",
                                                                                                     "scores"]
    int8 = get_json(s3, dataset, f"{prefix}/model_int8.tflite.json")["output"]  # its rounded score vs its decision
    assert "before the score is rounded" in int8["above"]["decided"] and "decided" not in int8["scores"]
    card = s3.client.get_object(Bucket=dataset, Key=f"{prefix}/MODEL_CARD.md")["Body"].read().decode()
    assert "a multi-label image classifier of 3 labels" in card and "| mAP | micro-F1 |" in card
    summary = trained["records"][-1]
    assert summary["status"] == "complete" and summary["test_map"] == test["map"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_prints_the_labels_above_their_thresholds(s3, dataset, multi, trained, fmt):
    """Every format gives the labels whose score reaches thresholds.json's threshold: the thresholds are built
    into each artifact, and they are the ones the run chose. Through the CLI for LiteRT; the other formats through
    job.predict in this process (the CLI passes the format on as it is; a process each would pay TensorFlow's
    import)."""
    from job.predict import predict

    thresholds = get_json(s3, dataset, f"{trained['prefix']}/thresholds.json")["labels"]
    images = [str(multi["root"] / r["path"]) for r in multi["rows"] if r["split"] == "test"][:6]
    model = f"s3://{dataset}/{trained['prefix']}"
    if fmt == "tflite":
        out = run_cli("predict", "--model", model, "--format", fmt, "--json", *images, env=s3.env(), timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        results = [json.loads(line) for line in out.stdout.splitlines()]
    else:
        results = list(predict(model, images, 3, s3.endpoint, fmt))
    assert [r["image"] for r in results] == images
    for r in results:
        above = {c for c, score in r["scores"].items() if score >= thresholds[c]["threshold"]}
        near = {c for c, score in r["scores"].items() if abs(score - thresholds[c]["threshold"]) < 0.02}
        chosen = {t["label"] for t in r["labels"]}
        assert chosen - near == above - near, (fmt, r)  # int8 and float16 may flip a score on the threshold
        assert all(t["score"] == r["scores"][t["label"]] for t in r["labels"])


def test_a_multilabel_manifest_with_a_single_label_config_is_exit_2(s3, dataset, multi, tmp_path):
    cfg = data_config(tmp_path, dataset, "ml-wrong-task", multi["uri"], manifest=multi["manifest"])
    out = run_cli("validate", "--config", str(cfg), env=s3.env())
    assert out.returncode == 2 and "a multi-label dataset (label lists) but task is single_label" in out.stderr
    assert "Traceback" not in out.stderr
    folders = config(tmp_path, dataset, multi, "ml-folders", uri=f"s3://{dataset}/data")
    out = run_cli("validate", "--config", str(folders), env=s3.env())
    assert out.returncode == 2 and "task: multi_label needs label lists" in out.stderr


def test_validate_prints_images_per_label(s3, dataset, multi, tmp_path):
    out = run_cli("validate", "--config", str(config(tmp_path, dataset, multi, "ml-validate")), env=s3.env())
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()}
    train = [r for r in multi["rows"] if r["split"] == "train"]
    for label in LABELS:
        carried = sum(label in r["labels"] for r in train)
        assert int(lines[label][0]) + int(lines[label][1]) == carried  # train + carved validation
    assert int(lines["images"][0]) + int(lines["images"][1]) == len(train)
    assert "ok: 3 labels" in out.stderr


@pytest.mark.parametrize("body, message", [
    ('{"path": "images/train_0000.png", "labels": "circle"}\n', 'line 1: "labels" must be a list of label names'),
    ('{"path": "images/train_0000.png", "labels": ["circle", ""]}\n', "line 1: a label with an empty name"),
    ('{"path": "images/train_0000.png", "labels": ["circle"]}\n{"path": "images/train_0001.png", '
     '"labels": ["circle", "circle"]}\n', "line 2: label 'circle' listed twice"),
    ('{"path": "images/train_0000.png", "labels": ["circle"]}\n{"path": "images/test_0000.png", '
     '"labels": ["square"], "split": "test"}\n', "line 2: label 'square' has no training image"),
    ("path,labels\nimages/train_0000.png,circle||square\n", "line 2: a label with an empty name"),
])
def test_bad_multilabel_manifests_exit_3_naming_the_line(s3, dataset, multi, tmp_path, body, message):
    name = "bad.csv" if body.startswith("path") else "bad.jsonl"
    s3.client.put_object(Bucket=dataset, Key=f"multi/{name}", Body=body.encode())
    cfg = config(tmp_path, dataset, multi, "ml-bad", manifest=f"{multi['uri']}/{name}")
    out = run_cli("validate", "--config", str(cfg), env=s3.env())
    assert out.returncode == 3, out.stderr[-2000:]
    assert f"{multi['uri']}/{name} {message}" in out.stderr and "Traceback" not in out.stderr


def test_a_label_outside_classes_txt_is_exit_3(s3, dataset, multi, tmp_path):
    s3.client.put_object(Bucket=dataset, Key="multi-listed/labels.jsonl",
                         Body=b'{"path": "images/train_0000.png", "labels": ["circle", "oval"]}\n')
    s3.client.put_object(Bucket=dataset, Key="multi-listed/classes.txt", Body=b"circle\nsquare\n")
    cfg = config(tmp_path, dataset, multi, "ml-listed", manifest=f"s3://{dataset}/multi-listed/labels.jsonl")
    out = run_cli("validate", "--config", str(cfg), env=s3.env())
    assert out.returncode == 3
    assert "labels.jsonl line 1: label 'oval' is not in" in out.stderr and "multi-listed/classes.txt" in out.stderr


@pytest.fixture(scope="module")
def packed(s3, dataset, multi):
    out = run_cli("pack", "--from", multi["manifest"], "--to", f"s3://{dataset}/multi-shards", "--shard-size", "20KB",
                  env=s3.env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return f"s3://{dataset}/multi-shards"


def test_pack_carries_label_lists_and_a_streamed_mirrored_run_trains_on_them(s3, dataset, multi, packed, tmp_path):
    index = get_json(s3, dataset, "multi-shards/index.json")
    assert index["task"] == "multi_label" and index["images"] == {"train": 72, "test": 24}
    assert sum(index["shards"].values()) == 96
    # MirroredStrategy over two CPU replicas: multi-hot labels split over replicas like class indices.
    cfg = config(tmp_path, dataset, multi, "ml-stream", uri=packed, staging="stream",
                 sections={"distribution": {"strategy": "mirrored", "cpu_replicas": 2}})
    result = run_cli("train", "--config", str(cfg), env=s3.env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert next(r for r in result.records() if r["event"] == "dataset surveyed")["mode"] == "stream"
    assert next(r for r in result.records() if r["event"] == "strategy ready")["replicas"] == 2
    manifest = get_json(s3, dataset, "runs/ml-stream/manifest.json")
    counts = manifest["dataset"]["counts"]
    train = [r for r in multi["rows"] if r["split"] == "train"]
    for label in LABELS:  # every image kept its labels through the shards
        assert counts["train"][label] + counts["validation"][label] == sum(label in r["labels"] for r in train)
    images = manifest["dataset"]["images"]  # the images themselves, and those with no label: not in the counts
    assert images["train"]["images"] + images["validation"]["images"] == len(train) == 72
    assert images["train"]["unlabelled"] + images["validation"]["unlabelled"] == sum(not r["labels"] for r in train)
    assert "thresholds.json" in manifest["files"]
    single = config(tmp_path, dataset, multi, "ml-stream-single", uri=packed, staging="stream", task="single_label")
    out = run_cli("validate", "--config", str(single), env=s3.env())
    assert out.returncode == 2 and "set task: multi_label" in out.stderr


def test_a_resumed_multilabel_run_ends_with_the_uninterrupted_runs_weights(s3, dataset, multi, trained, tmp_path):
    """The trained run's recipe (its export formats aside: they come after the weights), stopped after the search's
    choice in the fine-tuning phase and resumed: the same weights, history and thresholds."""
    cfg = config(tmp_path, dataset, multi, "ml-resumed", search=True, head_epochs=2, sections=RESUMABLE)
    job = Running(cfg, s3.env())
    trials = len(SearchConfig().learning_rates)  # the defaults' search
    job.wait_for(lambda r: sum(x["event"] == "epoch done" and x.get("phase") == "finetune"
                               for x in job.lines) >= trials + 1)  # each trial's epoch, then the chosen one's second
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(60) == 143
    again = run_cli("train", "--config", str(cfg), env=s3.env())
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = next(r for r in again.records() if r["event"] == "resuming from checkpoint")
    assert resumed["phase"] == "finetune" and resumed["epochs_done"] >= 2, resumed
    runs = ("ml-manifest", "ml-resumed")
    weights = [get_json(s3, dataset, f"runs/{run}/manifest.json")["weights_sha256"] for run in runs]
    assert weights[0] == weights[1]
    histories = [get_json(s3, dataset, f"runs/{run}/history.json") for run in runs]
    drop_time = [{p: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in rs]
                  for p, rs in h.items()} for h in histories]
    assert drop_time[0] == drop_time[1]  # every epoch's losses: the resumed run read on in the same order
    assert len(drop_time[0]["finetune"]) == 3
    thresholds = [get_json(s3, dataset, f"runs/{run}/thresholds.json") for run in runs]
    assert thresholds[0] == thresholds[1]


def test_the_saved_models_signature_names_the_labels_above_their_thresholds(s3, dataset, multi, trained, tmp_path):
    import numpy as np
    import tensorflow as tf

    prefix = f"{trained['prefix']}/saved_model/"
    for key in s3.keys(dataset, prefix):
        (tmp_path / key.removeprefix(prefix)).parent.mkdir(parents=True, exist_ok=True)
        s3.client.download_file(dataset, key, str(tmp_path / key.removeprefix(prefix)))
    thresholds = get_json(s3, dataset, f"{trained['prefix']}/thresholds.json")["labels"]
    serve = tf.saved_model.load(str(tmp_path)).signatures["serving_default"]
    rows = [r for r in multi["rows"] if r["split"] == "test"][:8]
    out = serve(image_bytes=tf.constant([(multi["root"] / r["path"]).read_bytes() for r in rows]))
    scores, above, labels = out["scores"].numpy(), out["above"].numpy(), out["labels"].numpy()
    assert scores.shape == above.shape == labels.shape == (8, 3)
    limits = np.array([thresholds[c]["threshold"] for c in LABELS], np.float32)
    np.testing.assert_array_equal(above, (scores >= limits).astype(np.float32))
    expected = np.where(above > 0.5, np.array([c.encode() for c in LABELS]), b"")
    np.testing.assert_array_equal(labels, expected)
