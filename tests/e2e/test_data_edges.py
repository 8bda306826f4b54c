"""The edges of the data paths as a new user meets them, through the real CLI and the S3 server on 127.0.0.1:
shards made by tarring class folders as they are, a second `pack` into the same prefix, a dataset with
no validation and no test images, stray members in shards, too few shards for the workers."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import CLI, data_config, free_ports, run_cli, tar_bytes

pytestmark = pytest.mark.slow


def config(tmp_path, dataset, run_id, uri, **data):
    return data_config(tmp_path, dataset, run_id, uri, head_epochs=2, formats=("saved_model", "tflite"), **data)


def counts_printed(result) -> dict[str, int]:
    """{class: count} of the first split column that `validate` prints."""
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if not line.startswith("{")]  # not the JSON logs
    assert lines[0].split()[:2] == ["class", "train"], result.stdout
    return {row[0]: int(row[1]) for row in map(str.split, lines[1:]) if row[0] != "total"}


def pngs(s3, dataset, cls: str, n: int) -> list[bytes]:
    keys = sorted(k for k in s3.keys(dataset, f"data/train/{cls}/") if k.endswith(".png"))[:n]
    return [s3.client.get_object(Bucket=dataset, Key=k)["Body"].read() for k in keys]


def test_class_folders_tarred_as_they_are_keep_every_image_and_label(s3, dataset, tmp_path):
    """`tar cf shard-000000.tar circle/ square/`: the same file names in every class folder."""
    members = []
    for cls in ("circle", "square"):
        for n, png in enumerate(pngs(s3, dataset, cls, 3)):
            members += [(f"{cls}/{n:04d}.png", png), (f"{cls}/{n:04d}.txt", cls.encode())]
    members += [("LICENSE.txt", b"CC-BY"), ("README", b"two classes")]  # members of no sample: skipped
    s3.client.put_object(Bucket=dataset, Key="tarred/classes.txt", Body=b"circle\nsquare\n")
    s3.client.put_object(Bucket=dataset, Key="tarred/train/shard-000000.tar", Body=tar_bytes(members))
    cfg = config(tmp_path, dataset, "tarred", f"s3://{dataset}/tarred", validation_split=0)
    assert counts_printed(run_cli("validate", "--config", str(cfg), env=s3.env(), timeout=120)) == {
        "circle": 3, "square": 3}


def test_a_second_pack_is_refused_then_replaces_with_overwrite(s3, dataset, tmp_path):
    to = f"s3://{dataset}/repacked"
    first = run_cli("pack", "--from", f"s3://{dataset}/data", "--to", to, "--shard-size", "20KB", env=s3.env())
    assert first.returncode == 0, first.stderr[-2000:]
    old = sorted(k for k in s3.keys(dataset, "repacked/") if "/shard-" in k)
    lines = ["path,label"] + [f"train/{c}/{c}_{i:04d}.png,{c}" for c in ("circle", "square") for i in (0, 1, 3, 4)]
    s3.client.put_object(Bucket=dataset, Key="data/two.csv", Body="\n".join(lines).encode())
    second = run_cli("pack", "--from", f"s3://{dataset}/data/two.csv", "--to", to, env=s3.env())
    assert second.returncode == 4 and "already holds" in second.stderr and "--overwrite" in second.stderr
    assert sorted(k for k in s3.keys(dataset, "repacked/") if "/shard-" in k) == old  # untouched
    third = run_cli("pack", "--from", f"s3://{dataset}/data/two.csv", "--to", to, "--overwrite", env=s3.env())
    assert third.returncode == 0, third.stderr[-2000:]
    assert sorted(k for k in s3.keys(dataset, "repacked/") if "/shard-" in k) == ["repacked/train/shard-000000.tar"]
    s3.client.delete_object(Bucket=dataset, Key="repacked/index.json")  # counted from the shards themselves
    cfg = config(tmp_path, dataset, "repacked", to, validation_split=0)
    assert counts_printed(run_cli("validate", "--config", str(cfg), env=s3.env(), timeout=120)) == {
        "circle": 4, "square": 4}


def test_a_shard_left_over_beside_index_json_is_refused(s3, dataset, tmp_path):
    to = f"s3://{dataset}/leftover"
    assert run_cli("pack", "--from", f"s3://{dataset}/data", "--to", to, env=s3.env()).returncode == 0
    s3.client.put_object(Bucket=dataset, Key="leftover/train/shard-000042.tar",
                         Body=tar_bytes([("x.png", pngs(s3, dataset, "circle", 1)[0]), ("x.cls", b"2")]))
    cfg = config(tmp_path, dataset, "leftover", to)
    result = run_cli("validate", "--config", str(cfg), env=s3.env(), timeout=120)
    assert result.returncode == 3 and f"{to}/train/shard-000042.tar: a shard that index.json does not list" in \
        result.stderr and "Traceback" not in result.stderr


def test_a_run_without_validation_or_test_images_finishes(s3, dataset, tmp_path):
    """data.validation_split 0 and no validation/ or test/ folder (documented): no early stopping on
    validation, no reports of either, formats checked on the training images."""
    bucket = s3.bucket()
    for key in s3.keys(dataset, "data/train/"):
        s3.client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": dataset, "Key": key})
    cfg = config(tmp_path, dataset, "train-only", f"s3://{bucket}/data", validation_split=0)
    result = run_cli("train", "--config", str(cfg), env=s3.env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(r["event"].startswith("no validation images") for r in result.records())
    manifest = json.loads(s3.client.get_object(Bucket=dataset, Key="runs/train-only/manifest.json")["Body"].read())
    assert list(manifest["dataset"]["counts"]) == ["train"] and manifest["formats_checked_on"] == "train"
    assert set(manifest["formats"]) == {"saved_model", "tflite"} and manifest["formats"]["tflite"]["agreement"] > 0.9
    metrics = json.loads(s3.client.get_object(Bucket=dataset, Key="runs/train-only/metrics.json")["Body"].read())
    assert "validation" not in metrics and "test" not in metrics


def test_streaming_with_fewer_training_shards_than_workers_fails_fast(s3, dataset, tmp_path):
    """Both workers exit 3 naming both numbers, before they wait for each other."""
    to = f"s3://{dataset}/one-shard"
    assert run_cli("pack", "--from", f"s3://{dataset}/data", "--to", to, env=s3.env()).returncode == 0
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    cfg = config(tmp_path, dataset, "one-shard", to, staging="stream")
    env = {**os.environ, **s3.env(), "TF_CPP_MIN_LOG_LEVEL": "3",
           "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})}
    result = subprocess.run([CLI, "train", "--config", str(cfg)], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "1 training shard(s) for 2 workers" in result.stderr and "Traceback" not in result.stderr
