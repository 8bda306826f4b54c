"""End to end: a small learnable dataset in a real S3 server -> `finetune-job train` (real TensorFlow,
2 CPU replicas) -> every artifact of CONTRACT section 6 in storage, a SavedModel that classifies bytes."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import BACKBONE, SIZE, Result, png_header_only, run_cli, write_config
from PIL import Image

pytestmark = pytest.mark.slow

ARTIFACTS = ["saved_model/saved_model.pb", "model.keras", "labels.txt", "metrics.json", "history.json", "curves.png",
             "confusion_matrix.png", "config.yaml", "manifest.json", "_SUCCESS"]
UNFREEZE = 10  # the shared run's train.finetune.unfreeze: the base's top layers it fine-tunes


@pytest.fixture(scope="module")
def trained(s3, sample_data, base_weights, tmp_path_factory):
    """One training run shared by the tests below."""
    bucket = s3.bucket()
    s3.upload_dir(sample_data, bucket, "datasets/shapes")
    # One grayscale image and one corrupt file among the real ones.
    gray = Image.open(sample_data / "train/circle/circle_0000.png").convert("L")
    buf = io.BytesIO()
    gray.save(buf, "PNG")
    s3.client.put_object(Bucket=bucket, Key="datasets/shapes/train/circle/gray.png", Body=buf.getvalue())
    s3.client.put_object(Bucket=bucket, Key="datasets/shapes/train/square/corrupt.jpg", Body=b"\xff\xd8not a jpeg")
    # A 25000x25000 PNG, as far as its header says: judged too large from the header, never decoded.
    huge = tmp_path_factory.mktemp("huge") / "huge.png"
    png_header_only(huge, 25000, 25000)
    s3.client.upload_file(str(huge), bucket, "datasets/shapes/train/triangle/huge.png")
    s3.client.upload_file(str(base_weights), bucket, f"weights/{BACKBONE}_32.weights.h5")

    tmp = tmp_path_factory.mktemp("e2e")
    cfg = write_config(
        tmp / "config.yaml",
        run_id="e2e",
        data={"uri": f"s3://{bucket}/datasets/shapes", "image_size": [SIZE, SIZE], "cache_dir": str(tmp / "cache"),
              "max_bad_fraction": 0.05},
        model={"backbone": BACKBONE, "weights": f"s3://{bucket}/weights/{BACKBONE}_32.weights.h5",
               "head_units": 32},
        train={"batch_size": 16, "head": {"epochs": 4}, "finetune": {"epochs": 2, "unfreeze": UNFREEZE}},
        distribution={"cpu_replicas": 2},
        output={"uri": f"s3://{bucket}/models/shapes"},
        metrics={"port": 0, "linger_seconds": 0},
        export={"formats": ["saved_model", "tf_serving", "tflite", "tflite_int8", "onnx"]},
    )
    result = run_cli("train", "--config", str(cfg), env=s3.env(), tf_log_level=None)  # as a user runs it
    return {"bucket": bucket, "config": cfg, "result": result, "tmp": tmp, "prefix": "models/shapes/e2e"}


def test_train_succeeds_and_logs_json(trained):
    result = trained["result"]
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    records = result.records()
    assert records and all(r.get("run_id") == "e2e" for r in records)
    skipped = {r["file"].split("/shapes/", 1)[1]: r["reason"] for r in records if r["event"] == "bad image skipped"}
    assert skipped == {"train/square/corrupt.jpg": "cannot be decoded",
                       "train/triangle/huge.png": "too large: 25000x25000 = 625,000,000 pixels "
                                                  "(data.max_image_pixels 90,000,000)"}
    strategy = next(r for r in records if r["event"] == "strategy ready")
    assert strategy["replicas"] == 2 and strategy["strategy"] == "mirrored"
    summary = records[-1]
    assert summary["event"] == "run finished" and summary["status"] == "complete"
    assert summary["artifacts"].endswith("/models/shapes/e2e") and summary["accuracy"] > 0.6
    # A clean run on a healthy server: its lease probe (412) and absent objects (404) are not failures.
    assert summary["s3_errors"] == 0


def test_a_run_is_quiet(trained):
    """Without TF_CPP_MIN_LOG_LEVEL set: none of TensorFlow's native info lines (printed at import whatever
    the variable says), no LiteRT info lines, no deprecation warning (TensorFlow's int8 calibrator uses the
    deprecated tf.lite.Interpreter), every format included."""
    stderr = trained["result"].stderr
    for noise in ("I0000", "absl::InitializeLog", "oneDNN", "XNNPACK", "fully_quantize", "eprecat", "Warning"):
        assert noise not in stderr, (noise, stderr[-3000:])


def test_every_artifact_is_in_storage(trained, s3):
    keys = {k.removeprefix(trained["prefix"] + "/") for k in s3.keys(trained["bucket"], trained["prefix"])}
    for name in ARTIFACTS:
        assert name in keys, name
    manifest = json.loads(_get(s3, trained, "manifest.json"))
    checkpoints = {k for k in keys if k.startswith("checkpoints/")}
    assert "checkpoints/checkpoint" in checkpoints  # kept for resumption; not part of the artifacts
    assert "checkpoints/converting" not in checkpoints  # each format's marker gone once it converted
    events = {k for k in keys if k.startswith("tensorboard/")}
    assert events and all(k.startswith("tensorboard/events.out.tfevents.") for k in events)  # watched, not artifacts
    assert set(manifest["files"]) == keys - checkpoints - events - {"manifest.json", "_SUCCESS"}
    for name in ("labels.txt", "saved_model/saved_model.pb", "model.keras"):
        body = _get(s3, trained, name)
        assert manifest["files"][name] == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    assert manifest["versions"]["tensorflow"] and manifest["classes"] == ["circle", "square", "triangle"]
    counts = manifest["dataset"]["counts"]
    assert counts["test"] == {"circle": 10, "square": 10, "triangle": 10}
    # 90 images + the gray one; corrupt.jpg and huge.png dropped
    assert sum(counts["train"].values()) + sum(counts["validation"].values()) == 90 + 1
    assert manifest["dataset"]["bad_images"] == 2
    assert re.fullmatch("[0-9a-f]{64}", manifest["dataset"]["fingerprint"])  # the listing's, for a rerun to compare
    assert {"staging_seconds", "head_seconds", "finetune_seconds", "export_seconds"} <= set(manifest["timings"])
    assert manifest["resumed_from"] is None  # one attempt: its timings are the run's
    # What a bit-for-bit rerun needs besides the seed (op determinism holds for one thread count), and when it ended
    from job.distribute import usable_cpus

    assert manifest["strategy"]["cpu_threads"] == max(1, usable_cpus() // 2)  # 2 CPU replicas share them
    assert abs(datetime.datetime.fromisoformat(manifest["finished_at"]).timestamp() - time.time()) < 86400
    # Evaluation read validation and test through the image cache: one decoded file per split, none twice.
    (cache,) = (trained["tmp"] / "cache" / "runs" / "e2e").glob("output-*/worker-0/cache")  # (one output here)
    assert len(list(cache.glob("images-*.npy"))) == 3
    # The local copies of what storage now holds are gone: every finished run left ~80 MB of them behind.
    assert not [p.name for p in cache.parent.iterdir() if p.name.startswith(("checkpoints", "artifacts"))]


def _get(s3, trained, name) -> bytes:
    return s3.client.get_object(Bucket=trained["bucket"], Key=f"{trained['prefix']}/{name}")["Body"].read()


def test_reports_history_plots_and_config(trained, s3):
    labels = _get(s3, trained, "labels.txt").decode().splitlines()
    assert labels == ["circle", "square", "triangle"]
    metrics = json.loads(_get(s3, trained, "metrics.json"))
    for split in ("validation", "test"):
        report = metrics[split]
        assert set(report["per_class"]) == set(labels)
        assert set(report["per_class"]["circle"]) == {"precision", "recall", "f1", "support"}
        cm = np.array(report["confusion_matrix"])
        assert cm.shape == (3, 3) and cm.sum() == report["examples"]
        assert report["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert metrics["test"]["accuracy"] > 0.6  # chance is 1/3
    history = json.loads(_get(s3, trained, "history.json"))
    assert 1 <= len(history["head"]) <= 4 and 1 <= len(history["finetune"]) <= 2
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history["head"][0])
    for png in ("curves.png", "confusion_matrix.png"):
        assert _get(s3, trained, png)[:8] == b"\x89PNG\r\n\x1a\n"
    saved_cfg = yaml.safe_load(_get(s3, trained, "config.yaml"))
    assert saved_cfg["run_id"] == "e2e" and saved_cfg["train"]["batch_size"] == 16
    assert "test" not in json.dumps(saved_cfg["s3"])  # the credentials never reach the artifacts


def test_the_base_comes_from_the_s3_weights_file_and_only_its_unfrozen_layers_moved(trained, s3, base_weights,
                                                                                    tmp_path):
    """`model.weights` as an s3:// URI of a weights file (what air-gapped clusters use) is really loaded: below
    train.finetune.unfreeze's UNFREEZE top layers, and in every BatchNormalization layer, the trained model's base
    holds the file's values exactly; the top layers moved."""
    import keras

    from job import backbones
    from job.model import unfreezable_layers

    (tmp_path / "model.keras").write_bytes(_get(s3, trained, "model.keras"))
    model = keras.models.load_model(tmp_path / "model.keras")
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))  # the backbone, nested
    constructor = getattr(keras.applications, backbones.get(BACKBONE).constructor)
    from_file = constructor(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    random_init = [w.copy() for w in from_file.get_weights()]
    from_file.load_weights(base_weights)
    # ...and the file is not a random init: the comparisons below would have caught a missed load.
    assert any(not np.array_equal(r, w) for r, w in zip(random_init, from_file.get_weights()))
    got, want = unfreezable_layers(base), unfreezable_layers(from_file)
    assert [layer.name for layer in got] == [layer.name for layer in want]
    moved = []
    for i, (g, w) in enumerate(zip(got, want)):
        frozen = i < len(got) - UNFREEZE or isinstance(g, keras.layers.BatchNormalization)
        for a, b in zip(g.get_weights(), w.get_weights(), strict=True):
            if frozen:
                np.testing.assert_array_equal(a, b, err_msg=g.name)
            else:
                moved.append(not np.array_equal(a, b))
    assert sum(len(layer.get_weights()) for layer in got[:-UNFREEZE]) > 100 and any(moved), moved


def test_saved_model_classifies_encoded_bytes(trained, s3, sample_data, tmp_path):
    import tensorflow as tf

    for key in s3.keys(trained["bucket"], trained["prefix"] + "/saved_model/"):
        dest = tmp_path / key.removeprefix(trained["prefix"] + "/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        s3.client.download_file(trained["bucket"], key, str(dest))
    serve = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serving_default"]
    files = sorted((sample_data / "test").rglob("*.*"))
    out = serve(image_bytes=tf.constant([f.read_bytes() for f in files]))
    assert out["probabilities"].shape == (len(files), 3)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(1), 1.0, rtol=1e-4)
    predicted = [label.decode() for label in out["label"].numpy()]
    truth = [f.parent.name for f in files]
    assert np.mean([p == t for p, t in zip(predicted, truth)]) > 0.6


def test_rerun_of_a_complete_run_does_nothing(trained, s3):
    before = {o["Key"]: o["LastModified"] for o in s3.client.list_objects_v2(
        Bucket=trained["bucket"], Prefix=trained["prefix"])["Contents"]}
    again = run_cli("train", "--config", str(trained["config"]), env=s3.env(), timeout=120)
    assert again.returncode == 0
    assert any(r.get("status") == "already complete" for r in again.records())
    # manifest.json's listing fingerprint is the one a listing gives again: the unchanged dataset is not "changed".
    assert not [r for r in again.records() if r.get("level") == "warning"], again.stdout[-2000:]
    after = {o["Key"]: o["LastModified"] for o in s3.client.list_objects_v2(
        Bucket=trained["bucket"], Prefix=trained["prefix"])["Contents"]}
    assert after == before


def test_validate_prints_counts(trained, s3):
    out = run_cli("validate", "--config", str(trained["config"]), env=s3.env(), timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line.strip()}
    assert rows["class"] == ["train", "validation", "test"]
    assert rows["circle"][2] == "10" and rows["total"][2] == "30"
    assert int(rows["square"][0]) + int(rows["square"][1]) == 31  # corrupt.jpg is only found when decoding


def test_predict_command_reads_model_and_images_from_s3(trained, s3, sample_data, tmp_path):
    """From S3, one JSON object per image as each is classified; an undecodable file among them is named on its
    own line and exits 3, and the images after it are still classified. So is a palette BMP, which TensorFlow's
    decoder (the signature's) would read as a picture of its palette indices."""
    uri = f"s3://{trained['bucket']}/{trained['prefix']}"
    images = [f"s3://{trained['bucket']}/datasets/shapes/test/{c}/{c}_0001.png" for c in ("triangle", "circle")]
    broken, palette = tmp_path / "broken.png", tmp_path / "palette.bmp"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not the rest of a PNG" * 4)
    Image.open(sample_data / "test/circle/circle_0001.png").convert("P").save(palette)
    (tmp_path / "tmp").mkdir()
    out = run_cli("predict", "--model", uri, images[0], str(broken), str(palette), images[1], "--top-k", "2",
                  "--json", env={**s3.env(), "TMPDIR": str(tmp_path / "tmp")}, timeout=120)
    assert out.returncode == 3, out.stderr
    assert list((tmp_path / "tmp").iterdir()) == []  # the downloaded model is not left behind
    first, bad, misread, last = (json.loads(line) for line in out.stdout.strip().splitlines())  # one per image
    assert bad == {"image": str(broken), "error": f"{broken}: not a decodable image"}
    assert misread["image"] == str(palette) and misread["error"].startswith(f"{palette}: a BMP with a colour palette")
    assert f"finetune-job: error: {broken}: not a decodable image" in out.stderr and "Traceback" not in out.stderr
    # each with its `error` record (on stderr, with predict's other records), as every other error has
    errors = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert [(r["level"], r["event"], r["exit_code"]) for r in errors if r["level"] == "error"] == [
        ("error", bad["error"], 3), ("error", misread["error"], 3)]
    for result, image in ((first, images[0]), (last, images[1])):
        assert result["image"] == image and len(result["top"]) == 2
        assert result["top"][0]["probability"] >= result["top"][1]["probability"]
        assert {t["label"] for t in result["top"]} <= {"circle", "square", "triangle"}


def test_predict_with_a_mistyped_path_exits_2_before_fetching_the_model(s3, tmp_path):
    """Checked first: the model URI names no bucket (which would be exit 4 once fetched). A name too long for the
    file system is said as such, not a traceback."""
    long = tmp_path / ("a" * 300 + ".png")
    out = run_cli("predict", "--model", "s3://no-such-bucket/models/run", str(long), env=s3.env(), timeout=120)
    assert out.returncode == 2 and f"{long}: cannot read image (File name too long)" in out.stderr, out.stderr
    missing = tmp_path / "no-such-image.png"
    out = run_cli("predict", "--model", "s3://no-such-bucket/models/run", str(missing),
                  env={**s3.env(), "PYTHONPROFILEIMPORTTIME": "1"}, timeout=120)
    assert out.returncode == 2 and f"{missing}: cannot read image (no such file)" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "job.predict" in imported and "tensorflow" not in imported  # said within a second, before the import
    out = run_cli("predict", "--model", "s3://no-such-bucket/models/run", str(tmp_path), env=s3.env(),
                  timeout=120)
    assert out.returncode == 2 and f"{tmp_path}: cannot read image (a folder: name its image files" in out.stderr


def test_predict_refuses_tampered_model(trained, s3):
    bucket, prefix = trained["bucket"], "models/shapes/tampered"
    for key in s3.keys(bucket, trained["prefix"]):
        s3.client.copy_object(Bucket=bucket, Key=key.replace(trained["prefix"], prefix),
                              CopySource={"Bucket": bucket, "Key": key})
    s3.client.put_object(Bucket=bucket, Key=f"{prefix}/labels.txt", Body=b"a\nb\nc\n")
    out = run_cli("predict", "--model", f"s3://{bucket}/{prefix}", str(Path(__file__)), env=s3.env(), timeout=120)
    assert out.returncode == 4 and "checksum" in out.stderr and "Traceback" not in out.stderr


XLA_RUN = """
import json, sys
from job import config, distribute, logs, pipeline
logs.setup(json=True)
setup = distribute.setup
def with_xla(*args, **kwargs):  # XLA is chosen only on GPUs; force it to exercise the compiled step on CPU
    cluster = setup(*args, **kwargs)
    cluster.xla = True
    return cluster
distribute.setup = with_xla
print(json.dumps(pipeline.train(config.load(sys.argv[1]))))
"""


def test_the_gpu_path_trains_on_two_replicas(sample_data, base_weights, tmp_path):
    """What a GPU runs, forced on CPU: mixed_float16 with loss scaling and the replicas' shared overflow check,
    the forward and backward pass compiled with XLA, on two replicas; with train.finetune.layer_decay, whose
    scaled optimizer runs inside the loss-scale optimizer on each replica."""
    import subprocess
    import sys

    cfg = write_config(
        tmp_path / "c.yaml",
        run_id="gpu-path",
        data={"uri": str(sample_data), "image_size": [SIZE, SIZE], "cache_dir": str(tmp_path / "cache")},
        model={"backbone": BACKBONE, "weights": str(base_weights), "head_units": 32},
        # The head sees images (end_to_end), so both phases run the compiled step (augmented phases stay plain).
        train={"batch_size": 16, "mixed_precision": True, "head": {"epochs": 2, "mode": "end_to_end"},
               # layer-wise rate decay's per-variable rates inside the loss-scaled update, on two replicas
               "finetune": {"epochs": 1, "unfreeze": 10, "layer_decay": 0.5}},
        distribution={"cpu_replicas": 2},
        output={"uri": str(tmp_path / "out")},
        metrics={"port": 0, "linger_seconds": 0},
        export={"formats": ["saved_model"]},
    )
    out = subprocess.run([sys.executable, "-c", XLA_RUN, str(cfg)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    records = Result(out.returncode, out.stdout, out.stderr).records()
    assert next(r for r in records if r.get("event") == "strategy ready")["mixed_precision"] is True
    # The compiled step ran, not the fallback: once in the head phase, once for the search's shared trainer.
    assert not any(r.get("event") == "XLA compilation failed, training without it" for r in records)
    assert sum(r.get("event") == "training step compiled with XLA" for r in records) >= 2
    epochs = [r for r in records if r.get("event") == "epoch done"]
    # 2 head epochs, then one fine-tuning epoch for each of train.search's two rates (the defaults' search: the
    # phase's single epoch is within the rung, so the chosen trial has nothing left to continue)
    assert len(epochs) == 4 and all(np.isfinite(r["loss"]) for r in epochs)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["status"] == "complete" and summary["test_accuracy"] > 0.5
    manifest = json.loads((tmp_path / "out/gpu-path/manifest.json").read_text())
    assert manifest["strategy"]["mixed_precision"] is True
    assert [t["learning_rate"] for t in manifest["search"]] == [1.0e-4, 3.0e-4]
    assert all(np.isfinite(t["val_loss"]) for t in manifest["search"])
    assert "layer-wise rate decay to 0.5 at the first layer" in (tmp_path / "out/gpu-path/MODEL_CARD.md").read_text()


def test_same_seed_data_and_strategy_give_identical_weights(sample_data, base_weights, tmp_path):
    """Reproducible runs: op determinism and a seeded tf.data order, so two runs of the same config on CPU
    end with bit-identical weights, and a different seed does not."""
    def run(run_id: str, seed: int) -> str:
        cfg = write_config(
            tmp_path / f"{run_id}.yaml",
            run_id=run_id,
            data={"uri": str(sample_data), "image_size": [SIZE, SIZE], "cache_dir": str(tmp_path / f"cache-{run_id}")},
            model={"backbone": BACKBONE, "weights": str(base_weights), "head_units": 16},
            train={"batch_size": 16, "seed": seed, "head": {"epochs": 2},
                   "finetune": {"epochs": 1, "unfreeze": 10, "augment": True},
                   "search": {"learning_rates": []}},  # the search's own reproducibility: test_search.py
            output={"uri": str(tmp_path / "out")},
            metrics={"port": 0, "linger_seconds": 0},
        export={"formats": ["saved_model"]},
        )
        result = run_cli("train", "--config", str(cfg))
        assert result.returncode == 0, result.stderr[-3000:]
        manifest = json.loads((tmp_path / "out" / run_id / "manifest.json").read_text())
        assert manifest["seed"] == seed
        return manifest["weights_sha256"]

    first = run("a", 7)
    assert run("b", 7) == first
    assert run("c", 8) != first


# ------------------------------------------------------------------ exported formats (export.formats defaults)

FORMATS = ("saved_model", "tf_serving", "tflite", "tflite_int8", "onnx")


@pytest.fixture(scope="module")
def run_folder(trained, s3, tmp_path_factory):
    """The run's artifacts downloaded as a user would."""
    folder = tmp_path_factory.mktemp("run")
    for key in s3.keys(trained["bucket"], trained["prefix"] + "/"):
        rel = key.removeprefix(trained["prefix"] + "/")
        if not rel.startswith("checkpoints/"):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            s3.client.download_file(trained["bucket"], key, str(folder / rel))
    return folder


def test_every_format_is_written_checked_and_recorded(run_folder):
    for rel in ("tf_serving/classifier/1/saved_model.pb", "model.tflite", "model.tflite.json", "model_int8.tflite",
                "model_int8.tflite.json", "model.onnx", "model.onnx.json", "MODEL_CARD.md"):
        assert (run_folder / rel).is_file(), rel
    checked = json.loads((run_folder / "metrics.json").read_text())["formats"]
    assert json.loads((run_folder / "manifest.json").read_text())["formats"] == checked
    assert set(checked) == set(FORMATS)
    test_examples = json.loads((run_folder / "metrics.json").read_text())["test"]["examples"]
    for fmt, r in checked.items():
        assert r["examples"] == test_examples and r["bytes"] > 0 and r["latency_ms_batch1"] > 0, fmt
        if fmt not in ("saved_model", "tflite_int8"):  # the job's own bar for float formats
            decided = r["agreement"] if r["agreement_beyond_near_ties"] is None else r["agreement_beyond_near_ties"]
            assert decided >= 0.99 and r["max_score_difference"] <= 0.1, (fmt, r)
            assert 0 <= r["near_ties"] <= r["examples"], fmt
    assert checked["tf_serving"]["agreement"] == 1.0 and checked["tf_serving"]["accuracy"] == checked["saved_model"][
        "accuracy"]
    int8 = checked["tflite_int8"]
    assert int8["accuracy_drop"] == pytest.approx(checked["saved_model"]["accuracy"] - int8["accuracy"], abs=1e-4)
    assert checked["tflite"]["bytes"] < checked["saved_model"]["bytes"] and int8["bytes"] < checked["tflite"]["bytes"]
    info = json.loads((run_folder / "model_int8.tflite.json").read_text())
    assert info["input"]["shape"] == [None, SIZE, SIZE, 3] and info["input"]["dtype"] == "uint8"
    assert info["labels"] == ["circle", "square", "triangle"]


def _decoded(files, size):
    import tensorflow as tf

    from job.dataset import decode_and_resize

    return np.stack([decode_and_resize(tf.constant(f.read_bytes()), size).numpy() for f in files])


def test_each_format_classifies_encoded_test_images_in_its_own_runtime(run_folder, sample_data):
    """TensorFlow for the SavedModels (bytes in), the LiteRT interpreter and onnxruntime (decoded pixels in)."""
    import onnxruntime as ort
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    files = sorted((sample_data / "test").rglob("*.*"))
    truth = np.array([["circle", "square", "triangle"].index(f.parent.name) for f in files])
    blobs = tf.constant([f.read_bytes() for f in files])
    probs = {}
    for fmt, path in (("saved_model", "saved_model"), ("tf_serving", "tf_serving/classifier/1")):
        probs[fmt] = tf.saved_model.load(str(run_folder / path)).signatures["serving_default"](
            image_bytes=blobs)["probabilities"].numpy()
    pixels = _decoded(files, (SIZE, SIZE))
    session = ort.InferenceSession(str(run_folder / "model.onnx"), providers=["CPUExecutionProvider"])
    probs["onnx"] = session.run(None, {session.get_inputs()[0].name: pixels.astype(np.float32)})[0]
    described = json.loads((run_folder / "model.onnx.json").read_text())["output_names_in_order"]
    assert described == [o.name for o in session.get_outputs()] and len(described) == 1
    for fmt, name in (("tflite", "model.tflite"), ("tflite_int8", "model_int8.tflite")):
        interpreter = Interpreter(model_path=str(run_folder / name))
        source = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(source["index"], list(pixels.shape))
        interpreter.allocate_tensors()
        source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        assert len(interpreter.get_output_details()) == 1, fmt  # the probabilities only: no string tensor
        interpreter.set_tensor(source["index"], (np.round(pixels) if fmt == "tflite_int8" else pixels).astype(
            source["dtype"]))
        interpreter.invoke()
        out = interpreter.get_tensor(target["index"]).astype(np.float32)
        scale, zero = target["quantization"]
        probs[fmt] = (out - zero) * scale if target["dtype"] != np.float32 else out
    np.testing.assert_array_equal(probs["tf_serving"], probs["saved_model"])  # the same SavedModel
    for fmt in ("onnx", "tflite"):
        np.testing.assert_allclose(probs[fmt], probs["saved_model"], atol=0.02)
    for fmt, p in probs.items():
        assert p.shape == (len(files), 3), fmt
        assert (p.argmax(1) == truth).mean() > 0.6, fmt  # clearly above chance (1/3)


def test_the_rest_request_of_the_readme_as_tf_serving_feeds_it(run_folder, sample_data):
    """TF Serving's REST API turns {"b64": ...} into the bytes of a DT_STRING input and batches `instances` by
    input name; the signature must take exactly that."""
    import base64

    import tensorflow as tf

    files = sorted((sample_data / "test").rglob("*.png"))[:3]
    body = json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(f.read_bytes()).decode()}}
                                     for f in files]})
    request = json.loads(body)
    signature = tf.saved_model.load(str(run_folder / "tf_serving/classifier/1")).signatures["serving_default"]
    inputs = {name: tf.constant([base64.b64decode(i[name]["b64"]) for i in request["instances"]])
              for name in request["instances"][0]}
    assert set(inputs) == set(signature.structured_input_signature[1])
    out = signature(**inputs)
    assert out["probabilities"].shape == (3, 3) and out["label"].shape == (3,)
    direct = signature(image_bytes=tf.constant([f.read_bytes() for f in files]))
    np.testing.assert_array_equal(out["probabilities"].numpy(), direct["probabilities"].numpy())


def test_predict_runs_each_format(trained, s3, run_folder):
    """`predict --format` through the CLI once (LiteRT int8, the format furthest from the SavedModel), and each
    format through job.predict here, in this process: the CLI passes the format on as it is, and a process per
    format would pay TensorFlow's import each time."""
    from job.predict import predict

    uri = f"s3://{trained['bucket']}/{trained['prefix']}"
    image = f"s3://{trained['bucket']}/datasets/shapes/test/square/square_0001.png"
    out = run_cli("predict", "--model", uri, image, "--json", "--format", "tflite_int8", env=s3.env(), timeout=180)
    assert out.returncode == 0, out.stderr[-1500:]
    by_cli = json.loads(out.stdout.strip().splitlines()[-1])
    tops = {fmt: next(predict(uri, [image], 3, s3.endpoint, fmt)) for fmt in FORMATS}
    assert by_cli["top"][0]["label"] == tops["tflite_int8"]["top"][0]["label"]
    assert [t["probability"] for t in by_cli["top"]] == pytest.approx(
        [t["probability"] for t in tops["tflite_int8"]["top"]], abs=1e-6)
    labels = {fmt: r["top"][0]["label"] for fmt, r in tops.items()}
    assert labels["tf_serving"] == labels["saved_model"] and labels["onnx"] == labels["saved_model"]
    assert set(labels.values()) <= {"circle", "square", "triangle"}


def test_model_card_describes_the_run(run_folder):
    card = (run_folder / "MODEL_CARD.md").read_text()
    assert card.startswith("---\nlibrary_name: keras") and "# e2e: an image classifier of 3 classes" in card
    assert "| circle |" in card and "## Known limits" in card and "## Training recipe" in card
    for fmt in FORMATS:
        assert f"| {fmt} |" in card
