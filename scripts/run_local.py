"""`make run-local`: the whole job on this machine, from nothing.

1. S3-compatible storage: MinIO (and Prometheus, Pushgateway, Grafana) with docker compose when a
   Docker engine answers; otherwise an embedded S3 server (moto) on 127.0.0.1, and Debian's
   `prometheus` on 127.0.0.1 when it is installed.
2. A sample dataset made here: shapes in random colours, 4 classes (see job/sample_data.py), put in
   storage.
3. Base weights: ImageNet weights cannot be downloaded offline, so a MobileNetV3Small base pre-trained on
   six *other* shapes (about a minute, once per machine, cached in ~/.cache/finetune-job/) is handed to the
   job as an s3:// weights file, exactly as on an air-gapped cluster. The job then transfers it to classes it
   never saw, with its default recipe (the one `make bench-quality` vouches for, docs/QUALITY.md).
4. `finetune-job train`, then `finetune-job predict` on one test image per class, then where everything is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "run-local"
BIN = Path(sys.executable).parent
BUCKET = "finetune-job"
SIZE = 32
TARGET = ("circle", "square", "triangle", "cross")
SOURCE = ("ring", "bar", "diamond", "star", "hexagon", "arrow")  # what the base learns first
# The base: MobileNetV3Small, the cheapest keras.applications backbone to pre-train here that transfers well
# (45 s on 2 cores for 2,000 images a class x 3 epochs, batch 64, Adam 2e-3 on a cosine; MobileNetV2 needed
# 4 minutes for the same demo accuracy). Pre-trained once per machine and kept outside the clone (weights stay
# out of git), so that every later run, from any clone, starts from it.
BACKBONE, BACKBONE_NAME = "mobilenet_v3_small", "MobileNetV3Small"
SOURCE_PER_CLASS, SOURCE_EPOCHS, SOURCE_BATCH, SOURCE_RATE = 2000, 3, 64, 2e-3
DEMO_BASE = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune-job"
             / f"{BACKBONE}_{SIZE}_other_shapes.weights.h5")
TARGET_PER_CLASS = 300


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def docker_engine() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def start_storage():
    """(endpoint, credentials env, stop function)."""
    if docker_engine():
        say("Docker engine found: starting MinIO, Prometheus, Pushgateway and Grafana (docker compose)")
        subprocess.run(["docker", "compose", "up", "-d", "--wait"], cwd=ROOT, check=True)
        env = {"AWS_ACCESS_KEY_ID": "minioadmin", "AWS_SECRET_ACCESS_KEY": "minioadmin"}
        return "http://127.0.0.1:9000", env, {"metrics_port": 8000, "pushgateway": "http://127.0.0.1:9091",
                                              "prometheus": "http://127.0.0.1:9090", "grafana": "http://127.0.0.1:3000"}
    from moto.server import ThreadedMotoServer

    say("no Docker engine: starting the embedded S3 server (moto) on 127.0.0.1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    extra = {"metrics_port": free_port(), "server": server}
    extra.update(start_prometheus(extra["metrics_port"]))
    return f"http://{host}:{port}", {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"}, extra


def start_prometheus(metrics_port: int) -> dict:
    """Debian's prometheus on 127.0.0.1:9090 scraping the job, left running for browsing afterwards."""
    binary = shutil.which("prometheus")
    if not binary:
        say("prometheus not installed (apt-get install prometheus): metrics only on the job's /metrics")
        return {}
    folder = WORK / "prometheus"
    pid_file = folder / "prometheus.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 15)
            time.sleep(1)
        except (ProcessLookupError, ValueError):
            pass
    folder.mkdir(parents=True, exist_ok=True)
    port = 9090 if _port_free(9090) else free_port()
    (folder / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "2s"},
        "rule_files": [str(ROOT / "helm/finetune-job/alerts/rules.yaml")],
        "scrape_configs": [{"job_name": "finetune-job",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }))
    with open(folder / "prometheus.log", "w") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    pid_file.write_text(str(proc.pid))
    return {"prometheus": f"http://127.0.0.1:{port}", "prometheus_pid": proc.pid}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def start_base() -> tuple[subprocess.Popen, Path] | None:
    """The demo base from this machine's cache (any clone's earlier run made it): None; else its pre-training,
    started now in a child process (once per machine), while storage starts and the dataset goes up."""
    if DEMO_BASE.exists():
        say(f"base: {BACKBONE_NAME} pre-trained on other shapes ({', '.join(SOURCE)}), never on the target ones, "
            f"cached in {DEMO_BASE}")
        return None
    say(f"pre-training a {BACKBONE_NAME} base on other shapes ({', '.join(SOURCE)}), once for this machine: about "
        f"a minute on 2 cores (ImageNet weights need internet); cached in {DEMO_BASE}")
    # The source images are drawn in the child, in memory: the pixels job.sample_data would write as files and the
    # job would decode (JPEG through TensorFlow's decoder too).
    code = ("import sys, json; from pathlib import Path; from job import logs; logs.quiet_tensorflow(); "
            "import tensorflow as tf; from job.sample_data import render, pretrain_base; a = json.loads(sys.argv[1]); "
            "x, y = render(tuple(a['shapes']), a['per_class'], a['size'], seed=1, random_colours=True, "
            "decode_jpeg=lambda data: tf.io.decode_jpeg(data, channels=3).numpy()); "
            "pretrain_base(x, y, Path(a['out']), a['backbone'], epochs=a['epochs'], batch_size=a['batch'], "
            "learning_rate=a['rate'], cosine=True, progress=True)")
    partial = DEMO_BASE.with_name(f"partial-{os.getpid()}.weights.h5")  # Keras wants the suffix
    arguments = {"shapes": SOURCE, "per_class": SOURCE_PER_CLASS, "size": SIZE, "out": str(partial),
                 "backbone": BACKBONE, "epochs": SOURCE_EPOCHS, "batch": SOURCE_BATCH, "rate": SOURCE_RATE}
    child = subprocess.Popen([sys.executable, "-c", code, json.dumps(arguments)],
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    return child, partial


def finish_base(pretraining: tuple[subprocess.Popen, Path] | None) -> Path:
    """Wait for the pre-training, if any, and keep its weights: whole in the cache, or not there."""
    if pretraining is not None:
        child, partial = pretraining
        try:
            if child.wait() != 0:
                raise SystemExit(f"pre-training the demo base failed (exit {child.returncode})")
            os.replace(partial, DEMO_BASE)
        finally:
            partial.unlink(missing_ok=True)
    return DEMO_BASE


def main() -> int:
    WORK.mkdir(exist_ok=True)
    DEMO_BASE.parent.mkdir(parents=True, exist_ok=True)
    pretraining = start_base()
    endpoint, creds, extra = start_storage()
    env = {**os.environ, **creds, "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    if BUCKET not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=BUCKET)

    from job.sample_data import write_sample_dataset

    data = WORK / "data"
    first = data / "train" / TARGET[0]
    if not first.is_dir() or len(list(first.iterdir())) != TARGET_PER_CLASS:  # none yet, or an older demo's
        shutil.rmtree(data, ignore_errors=True)
        counts = write_sample_dataset(data, per_class=TARGET_PER_CLASS, size=SIZE, seed=0, test_per_class=25,
                                      shapes=TARGET, random_colours=True)
        say(f"sample dataset written to {data}: {counts}")
    say(f"uploading the dataset to s3://{BUCKET}/datasets/shapes/")
    files = [(p, f"datasets/shapes/{p.relative_to(data).as_posix()}") for p in sorted(data.rglob("*")) if p.is_file()]
    with ThreadPoolExecutor(8) as pool:  # boto3 clients are thread-safe
        list(pool.map(lambda f: s3.upload_file(str(f[0]), BUCKET, f[1]), files))
    weights = finish_base(pretraining)
    s3.upload_file(str(weights), BUCKET, f"weights/{weights.name}")

    run_id = time.strftime("local-%Y%m%d-%H%M%S", time.gmtime())
    config = WORK / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run_id": run_id,
        "data": {"uri": f"s3://{BUCKET}/datasets/shapes", "image_size": [SIZE, SIZE], "cache_dir": str(WORK / "cache")},
        "model": {"backbone": BACKBONE, "weights": f"s3://{BUCKET}/weights/{weights.name}"},
        "output": {"uri": f"s3://{BUCKET}/models/shapes"},
        "metrics": {"port": extra["metrics_port"], "host": "127.0.0.1", "pushgateway": extra.get("pushgateway", ""),
                    "linger_seconds": 3},
    }, sort_keys=False))
    say(f"finetune-job train --config {config.relative_to(ROOT)}")
    rc = subprocess.run([str(BIN / "finetune-job"), "train", "--config", str(config)], env=env).returncode
    if rc != 0:
        say(f"the job failed with exit code {rc}")
        return rc

    artifacts = f"s3://{BUCKET}/models/shapes/{run_id}"
    local = WORK / "artifacts" / run_id
    prefix = f"models/shapes/{run_id}/"
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            dest = local / obj["Key"][len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(BUCKET, obj["Key"], str(dest))
    samples = [str(sorted((data / "test" / c).iterdir())[0]) for c in TARGET]
    say("finetune-job predict on one test image of each class (its folder is its true class)")
    subprocess.run([str(BIN / "finetune-job"), "predict", "--model", str(local), *samples], env=env, check=False)

    metrics = json.loads((local / "metrics.json").read_text())
    print()
    print("finetune-job run-local: done")
    print(f"  run_id          {run_id}")
    print(f"  test accuracy   {metrics['test']['accuracy']:.3f}  (validation {metrics['validation']['accuracy']:.3f})")
    print(f"  artifacts       {artifacts}/  (S3 endpoint {endpoint})")
    print(f"  local copy      {local}/")
    print(f"  reports         {local / 'metrics.json'}, {local / 'curves.png'}, {local / 'confusion_matrix.png'}")
    print(f"  /metrics        http://127.0.0.1:{extra['metrics_port']}/metrics  (while the job ran)")
    if "prometheus" in extra:
        stop = f"kill {extra['prometheus_pid']}" if "prometheus_pid" in extra else (
            f"docker compose -f {ROOT / 'docker-compose.yaml'} down; -v deletes MinIO's data, the artifacts too")
        print(f"  Prometheus      {extra['prometheus']}  (query finetune_job_val_accuracy; stop with: {stop})")
    if "grafana" in extra:
        print(f"  Grafana         {extra['grafana']}  (dashboard: finetune-job)")
    if "server" in extra:
        print("  note            the embedded S3 server stops with this command; the local copy stays")
        extra["server"].stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
