"""Datasets as users keep them, against the real S3 server on 127.0.0.1: a manifest run, `pack` into
shards, a sharded run copied to disk, one streamed, two workers streaming different shards to identical
weights, and every kind of bad input as one line with exit 3."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import CLI, data_config, free_ports, run_cli, tar_bytes
from fault_proxy import FaultProxy

pytestmark = pytest.mark.slow


def config(tmp_path, dataset, run_id, uri, **data):
    return data_config(tmp_path, dataset, run_id, uri, **data)


def manifest_of(s3, dataset) -> str:
    """A CSV manifest: relative paths with explicit splits, and the test images by full URI."""
    lines = ["path,label,split"]
    for key in sorted(s3.keys(dataset, "data/")):
        split, label = key.split("/")[1:3]
        rel = key.removeprefix("data/")
        lines.append(f"s3://{dataset}/{key},{label},test" if split == "test" else
                     f"{rel},{label},{'validation' if key.endswith(('1.png', '5.png')) else 'train'}")
    return "\n".join(lines) + "\n"


def test_a_manifest_run(s3, dataset, tmp_path):
    text = manifest_of(s3, dataset)
    s3.client.put_object(Bucket=dataset, Key="manifests/labels.csv", Body=text.encode())
    cfg = config(tmp_path, dataset, "manifest", f"s3://{dataset}/data", manifest=f"s3://{dataset}/manifests/labels.csv")
    result = run_cli("train", "--config", str(cfg), env=s3.env())
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads(s3.client.get_object(Bucket=dataset, Key="runs/manifest/manifest.json")["Body"].read())
    counts = manifest["dataset"]["counts"]
    assert counts["test"] == {"circle": 10, "square": 10, "triangle": 10}
    assert sum(counts["train"].values()) + sum(counts["validation"].values()) == 90
    # the manifest's split, not a seeded one
    assert counts["validation"]["circle"] == sum(1 for line in text.splitlines() if line.endswith(",circle,validation"))


@pytest.fixture(scope="module")
def packed(s3, dataset):
    out = run_cli("pack", "--from", f"s3://{dataset}/data", "--to", f"s3://{dataset}/shards", "--shard-size", "40KB",
                  env=s3.env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "packed 120 images of 3 classes into" in out.stdout
    return f"s3://{dataset}/shards"


def test_pack_writes_shards_classes_and_index(s3, dataset, packed):
    keys = s3.keys(dataset, "shards/")
    train = [k for k in keys if k.startswith("shards/train/shard-")]
    assert len(train) >= 2 and "shards/classes.txt" in keys and "shards/index.json" in keys
    index = json.loads(s3.client.get_object(Bucket=dataset, Key="shards/index.json")["Body"].read())
    assert index["counts"]["train"] == {"circle": 30, "square": 30, "triangle": 30}
    assert sum(index["shards"].values()) == 120


@pytest.mark.parametrize("staging", ["copy", "stream"])
def test_a_sharded_run(s3, dataset, packed, tmp_path, staging):
    """Streamed, through a proxy that cuts one shard's reply off halfway: the run resumes it with a ranged GET."""
    with FaultProxy(s3.endpoint, share=0.0, cut_bodies=1 if staging == "stream" else 0, cut_from=20_000,
                    cut_paths="/shard-") as proxy:
        cfg = config(tmp_path, dataset, f"sharded-{staging}", packed, staging=staging)
        cfg.write_text(cfg.read_text() + f"s3:\n  endpoint_url: {proxy.url}\n")
        result = run_cli("train", "--config", str(cfg), env=s3.env())
    assert result.returncode == 0, result.stderr[-2000:]
    records = result.records()
    resumed = [r for r in records if r["event"] == "object read interrupted; resuming with a ranged GET"]
    assert len(resumed) == proxy.counts["cut"] == (staging == "stream")
    assert records[-1]["s3_errors"] == proxy.counts["cut"]
    event = "dataset surveyed" if staging == "stream" else "dataset staged"
    staged = next(r for r in records if r["event"] == event)
    assert staged["kind"] == "shards" and staged["mode"] == staging
    summary = records[-1]
    assert summary["status"] == "complete" and summary["test_accuracy"] > 0.6
    cache = tmp_path / f"cache-sharded-{staging}"
    images_on_disk = [p for p in [*cache.rglob("*.png"), *cache.rglob("*.jpg")] if "artifacts" not in p.parts]
    assert bool(images_on_disk) == (staging == "copy")  # streaming keeps no encoded image on disk
    kept = list(cache.rglob("*.rows"))  # ... only decoded rows at the training size, after a first full read
    assert bool(kept) == (staging == "stream")


def test_two_workers_stream_different_shards_to_identical_weights(s3, dataset, packed, tmp_path):
    import os

    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    procs = []
    for index in range(2):
        cfg = config(tmp_path, dataset, "stream-two", packed, staging="stream", cache_dir=str(tmp_path / f"c{index}"))
        env = {**os.environ, **s3.env(), "TF_CPP_MIN_LOG_LEVEL": "3",
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen([CLI, "train", "--config", str(cfg)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in outs]
    records = [[json.loads(line) for line in out.splitlines() if line.startswith("{")] for out, _ in outs]
    mine = [next(r for r in rs if r["event"] == "dataset surveyed")["training_shards_of_this_worker"] for rs in records]
    assert mine[0] and mine[1] and not set(mine[0]) & set(mine[1])
    weights = [next(r for r in rs if r["event"] == "training done")["weights_sha256"] for rs in records]
    assert weights[0] == weights[1]


def one_line(result, code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("finetune-job: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["truncated", "no_label", "label_outside", "not_a_tar"])
def test_bad_shards_exit_3_naming_the_shard_and_member(s3, dataset, packed, tmp_path, case):
    png = s3.client.get_object(Bucket=dataset, Key="data/train/circle/circle_0000.png")["Body"].read()
    good = tar_bytes([("a1.png", png), ("a1.cls", b"0"), ("a2.png", png), ("a2.cls", b"1")])
    body = {"truncated": good[:1200], "no_label": tar_bytes([("b1.png", png)]),
            "label_outside": tar_bytes([("c1.png", png), ("c1.cls", b"9")]), "not_a_tar": b"garbage" * 300}[case]
    prefix = f"bad-{case}"
    s3.client.put_object(Bucket=dataset, Key=f"{prefix}/classes.txt", Body=b"circle\nsquare\ntriangle\n")
    s3.client.put_object(Bucket=dataset, Key=f"{prefix}/train/shard-000000.tar", Body=good)
    s3.client.put_object(Bucket=dataset, Key=f"{prefix}/train/shard-000001.tar", Body=body)
    cfg = config(tmp_path, dataset, case, f"s3://{dataset}/{prefix}")
    line = one_line(run_cli("validate", "--config", str(cfg), env=s3.env(), timeout=120), 3)
    assert f"s3://{dataset}/{prefix}/train/shard-000001.tar" in line
    expected = {"truncated": "not a readable tar file", "no_label": "b1.png has no label",
                "label_outside": "c1.cls is '9', not a class index (0..2)", "not_a_tar": "not a readable tar file"}
    assert expected[case] in line


def test_undecodable_images_inside_shards_are_skipped_and_named(s3, dataset, tmp_path):
    pngs = sorted(k for k in s3.keys(dataset, "data/train/") if k.endswith(".png"))
    keys = [k for c in ("circle", "square", "triangle") for k in [p for p in pngs if p.split("/")[2] == c][:14]]
    members = []
    for n, key in enumerate(keys):
        label = ["circle", "square", "triangle"].index(key.split("/")[2])
        members += [(f"{n:04d}.png", s3.client.get_object(Bucket=dataset, Key=key)["Body"].read()),
                    (f"{n:04d}.cls", str(label).encode())]
    members += [("broken.jpg", b"\xff\xd8 not a jpeg"), ("broken.cls", b"0")]
    s3.client.put_object(Bucket=dataset, Key="with-bad/classes.txt", Body=b"circle\nsquare\ntriangle\n")
    s3.client.put_object(Bucket=dataset, Key="with-bad/train/shard-000000.tar", Body=tar_bytes(members))
    cfg = config(tmp_path, dataset, "with-bad", f"s3://{dataset}/with-bad", staging="stream", max_bad_fraction=0.05)
    result = run_cli("train", "--config", str(cfg), env=s3.env())
    assert result.returncode == 0, result.stderr[-2000:]
    skipped = [r for r in result.records() if r["event"] == "bad image skipped"]
    assert [(r["file"], r["reason"]) for r in skipped] == [
        (f"s3://{dataset}/with-bad/train/shard-000000.tar:broken.jpg", "cannot be decoded")]


@pytest.mark.parametrize("body, message", [
    (b"file,class\nx.png,a\n", "labels.csv line 1: the header must be"),
    ("path,label\nbl\xe5.png,circle\n".encode("latin-1"), "labels.csv: not UTF-8 text"),
    (b"path,label\ntrain/circle/nope.png,circle\n", "labels.csv line 2: train/circle/nope.png does not exist"),
])
def test_bad_manifests_exit_3_naming_the_line(s3, dataset, tmp_path, body, message):
    s3.client.put_object(Bucket=dataset, Key="manifests/bad/labels.csv", Body=body)
    cfg = config(tmp_path, dataset, "bad-manifest", f"s3://{dataset}/data",
                 manifest=f"s3://{dataset}/manifests/bad/labels.csv")
    assert message in one_line(run_cli("validate", "--config", str(cfg), env=s3.env(), timeout=120), 3)
