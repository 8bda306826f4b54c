"""TensorBoard against the real S3 server on 127.0.0.1: a run's event files, read back from their S3 copy with
TensorBoard's own event reader, hold history.json's per-epoch values, the final images and the HParams
summary, and no step twice although the run was stopped by SIGTERM and resumed; `finetune-job tensorboard` serves the
runs of a prefix on TensorBoard's scalar API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest
import yaml
from conftest import BACKBONE, CLI, data_config, free_ports, run_cli
from test_fault_tolerance import Running

pytestmark = pytest.mark.slow


def download_events(s3, bucket: str, run: str, folder):
    keys = s3.keys(bucket, f"runs/{run}/tensorboard/")
    assert keys, f"no event files under runs/{run}/tensorboard/"
    folder.mkdir(parents=True, exist_ok=True)
    for key in keys:
        target = folder / key.rsplit("/", 1)[1]
        s3.client.download_file(bucket, key, str(target))
    return folder


def read_events(folder) -> tuple[dict[str, list[tuple[int, object]]], object]:
    """{tag: [(step, value)]} of every summary in the folder, with TensorBoard's event reader."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    out = {}
    for tag in events.Tags()["tensors"]:
        out[tag] = []
        for e in events.Tensors(tag):
            value = tf.make_ndarray(e.tensor_proto)
            out[tag].append((e.step, value.item() if value.size == 1 and value.dtype != object else value))
    return out, events


@pytest.fixture(scope="module")
def trained(s3, dataset, tmp_path_factory):
    """One run stopped by SIGTERM after its first fine-tuning epoch and resumed to the end (3 fine-tuning epochs,
    a checkpoint at each epoch's end): the tests below read its curves, Katib's file and TensorBoard's view of it,
    and the first stop's event files, copied on the way out, as "before"."""
    tmp = tmp_path_factory.mktemp("tb")
    cfg = data_config(tmp, dataset, "tb-run", f"s3://{dataset}/data", head_epochs=2)
    settings = yaml.safe_load(cfg.read_text())
    settings["train"]["finetune"]["epochs"] = 3
    settings["checkpoint"] = {"every_seconds": 0, "lease_seconds": 6}
    settings["metrics"]["file"] = str(tmp / "katib" / "metrics.log")
    cfg.write_text(yaml.safe_dump(settings, sort_keys=False))
    job = Running(cfg, s3.env())
    job.wait_for(lambda r: r["event"] == "epoch done" and r.get("phase") == "finetune" and r["epoch"] == 1)
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(60) == 143
    before, _ = read_events(download_events(s3, dataset, "tb-run", tmp / "before"))
    result = run_cli("train", "--config", str(cfg), env=s3.env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(r["event"] == "resuming from checkpoint" for r in result.records())
    return {"tmp": tmp, "before": before}


def test_event_files_hold_the_history_the_images_and_the_hparams(s3, dataset, trained, tmp_path):
    scalars, events = read_events(download_events(s3, dataset, "tb-run", tmp_path))
    history = json.loads(s3.client.get_object(Bucket=dataset, Key="runs/tb-run/history.json")["Body"].read())
    steps = [*[(1 + i, "head", r) for i, r in enumerate(history["head"])],
             *[(1 + len(history["head"]) + i, "finetune", r) for i, r in enumerate(history["finetune"])]]
    for tag, key in (("loss/train", "loss"), ("accuracy/train", "accuracy"), ("loss/validation", "val_loss"),
                     ("accuracy/validation", "val_accuracy"), ("learning_rate", "learning_rate"),
                     ("images_per_second", "images_per_second")):
        assert [s for s, _ in scalars[tag]] == [s for s, _, _ in steps], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for _, _, r in steps], rel=1e-6), tag
    assert [v for _, v in scalars["phase"]] == [0.0 if p == "head" else 1.0 for _, p, _ in steps]
    metrics = json.loads(s3.client.get_object(Bucket=dataset, Key="runs/tb-run/metrics.json")["Body"].read())
    assert scalars["final/test_accuracy"][0][1] == pytest.approx(metrics["test"]["accuracy"], rel=1e-6)
    assert scalars["final/val_loss"][0][1] == pytest.approx(metrics["validation"]["loss"], rel=1e-6)
    for image in ("confusion_matrix", "misclassified_test_images"):
        if image == "misclassified_test_images" and metrics["test"]["accuracy"] == 1.0:
            continue  # nothing misclassified, nothing to show
        (step, value), = scalars[image]
        assert step == len(steps) and value[2:] and bytes(value[2]).startswith(b"\x89PNG")
    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams
    from tensorboard.plugins.hparams import plugin_data_pb2

    info = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert info.hparams["backbone"].string_value == BACKBONE
    assert info.hparams["finetune_learning_rate"].number_value == pytest.approx(1e-4)
    assert info.hparams["seed"].number_value == 1337
    assert info.hparams["layer_decay"].number_value == 1.0
    # One row per run: without a trial id TensorBoard grouped runs of one recipe and showed their mean.
    assert info.group_name == "tb-run" and info.hparams["data"].string_value == f"s3://{dataset}/data"


def test_a_resumed_run_continues_its_curves_without_a_repeated_step(s3, dataset, trained, tmp_path):
    assert [s for s, _ in trained["before"]["loss/train"]][:3] == [1, 2, 3]  # copied on SIGTERM: the curves so far
    after, _ = read_events(download_events(s3, dataset, "tb-run", tmp_path / "after"))
    history = json.loads(s3.client.get_object(Bucket=dataset, Key="runs/tb-run/history.json")["Body"].read())
    epochs = len(history["head"]) + len(history["finetune"])
    assert epochs == 5
    for tag in ("loss/train", "loss/validation", "phase"):
        assert [s for s, _ in after[tag]] == list(range(1, epochs + 1)), tag  # each step once, in order
    assert [v for _, v in after["loss/train"]] == pytest.approx(
        [r["loss"] for phase in ("head", "finetune") for r in history[phase]], rel=1e-6)


def test_the_tensorboard_command_serves_the_runs_of_a_prefix(s3, dataset, trained, tmp_path):
    port = free_ports(1)[0]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **s3.env()}
    proc = subprocess.Popen([CLI, "tensorboard", "--from", f"s3://{dataset}/runs", "--port", str(port), "--host",
                             "127.0.0.1", "--folder", str(tmp_path / "mirror"), "--refresh", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        tags, deadline = {}, time.monotonic() + 120
        while time.monotonic() < deadline and "tb-run" not in tags:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    tags = json.loads(r.read())
            except OSError:
                assert proc.poll() is None, proc.stderr.read()[-2000:]
                time.sleep(1)
        assert {"loss/train", "loss/validation", "accuracy/validation", "final/test_accuracy"} <= set(tags["tb-run"])
        query = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=tb-run&tag=loss/train"
        with urllib.request.urlopen(query, timeout=5) as r:
            points = json.loads(r.read())
        history = json.loads(s3.client.get_object(Bucket=dataset, Key="runs/tb-run/history.json")["Body"].read())
        assert len(points) == len(history["head"]) + len(history["finetune"])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, 143)


def test_katibs_file_has_a_line_per_epoch_and_the_final_metrics(s3, dataset, trained):
    """What Katib's File collector reads with its default filter: each epoch's values and, last, metrics.json's."""
    import re

    default_filter = re.compile(r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)")  # kubeflow/katib DefaultFilter
    lines = (trained["tmp"] / "katib" / "metrics.log").read_text().splitlines()
    pairs = [{m.group(1): m.group(2) for m in default_filter.finditer(line)} for line in lines]
    history = json.loads(s3.client.get_object(Bucket=dataset, Key="runs/tb-run/history.json")["Body"].read())
    epochs = [(p, r) for p in ("head", "finetune") for r in history[p]]
    assert len(pairs) == len(epochs) + 1
    for values, (phase, record) in zip(pairs, epochs):
        assert int(values[f"{phase}_epoch"]) == record["epoch"]
        assert float(values["val_loss"]) == record["val_loss"] and float(values["train_loss"]) == record["loss"]
    metrics = json.loads(s3.client.get_object(Bucket=dataset, Key="runs/tb-run/metrics.json")["Body"].read())
    final = pairs[-1]
    assert float(final["test_accuracy"]) == metrics["test"]["accuracy"]
    assert float(final["val_loss"]) == metrics["validation"]["loss"]
