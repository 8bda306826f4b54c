"""Shared fixtures: a real S3 server on 127.0.0.1 (moto), the sample dataset, pre-trained base weights,
and a helper that runs the real `finetune-job` console script in a subprocess."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from hypothesis import settings

# No time limit per generated example: hypothesis' default of 200 ms is a timing threshold that a loaded machine
# (three test workers on two cores) crosses now and then, as a first boto3 client did in 531 ms.
settings.register_profile("loaded-machine", deadline=None)
settings.load_profile("loaded-machine")


def _share_the_cores() -> None:
    """TensorFlow's intra-op thread pool, sized to the cores each test worker has (every process started from here
    inherits it): by default each process sizes it to every core, so that three workers on two cores ran three
    pools of two busy threads. The quality bench's quick mode, two runs at a time on two cores, took 168 s with
    one thread a pool (and one inter-op thread) and 186 s with the defaults; two fresh clones' `make test`, one after
    the other, 1,280.1 s with one intra-op thread a worker and 1,422.8 s without (2026-12-06, quiet). The inter-op pool,
    where collective ops wait on each other, keeps its default. A variable already set wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, cores // workers)))


_share_the_cores()
VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "finetune-job")
SIZE = 32
# The backbone of the tests' runs where the backbone is not their subject: MobileNet (v1, 86 layers) traces and
# exports in about two thirds of MobileNetV2's time (155 layers), and a tiny run is mostly tracing and export
# (13.6 s against 19-21 s a run here). MobileNetV2, the users' usual choice, runs in the quality bench's quick mode.
BACKBONE = "mobilenet"


@dataclass
class S3:
    endpoint: str
    client: object

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint}

    def bucket(self) -> str:
        name = "t-" + uuid.uuid4().hex[:12]
        self.client.create_bucket(Bucket=name)
        return name

    def upload_dir(self, folder: Path, bucket: str, prefix: str) -> None:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                self.client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(folder).as_posix()}")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3(s3_server) -> S3:
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in creds.items():
        os.environ.setdefault(k, v)
    client = boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    return S3(s3_server, client)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """3 learnable classes, 30 train + 10 test images each, 32x32, PNG and JPEG."""
    from job.sample_data import write_sample_dataset

    root = tmp_path_factory.mktemp("sample")
    write_sample_dataset(root, classes=3, per_class=30, size=SIZE, seed=0, test_per_class=10)
    return root


@pytest.fixture(scope="session")
def base_weights(tmp_path_factory, worker_id) -> Path:
    """A BACKBONE base trained here (ImageNet weights cannot be downloaded on CI), on 200 images of each
    sample class that are not the sample data's own: enough for features that put the tests' runs far
    above chance, so that no test's accuracy check sits near its threshold. Trained once per session: with
    pytest-xdist (`make test` runs three workers) the first worker trains it, under a lock, for all."""
    import fcntl

    from job.sample_data import write_sample_dataset

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    out = shared / "base-weights" / f"{BACKBONE}_32.weights.h5"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(shared / "base-weights.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            source = shared / "base-weights" / "source"
            write_sample_dataset(source, classes=3, per_class=200, size=SIZE, seed=1, test_per_class=0)
            code = ("import sys; from pathlib import Path; from job.sample_data import pretrain_base_weights as p; "
                    "p(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], epochs=5)")
            tmp = out.with_name("partial.weights.h5")
            subprocess.run([sys.executable, "-c", code, str(source), str(tmp), BACKBONE], check=True, timeout=600,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True)
            tmp.rename(out)
    return out


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def records(self) -> list[dict]:
        import json

        out = []
        for line in self.stdout.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None,
            tf_log_level: str | None = "3") -> Result:
    """Run the real console script; stdout is not a TTY, so logs are JSON lines. `tf_log_level` None: the
    job's own default for TensorFlow's native logging (TF_CPP_MIN_LOG_LEVEL unset)."""
    full_env = {**os.environ, **({"TF_CPP_MIN_LOG_LEVEL": tf_log_level} if tf_log_level else {}), **(env or {})}
    if tf_log_level is None:
        full_env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    full_env = {k: v for k, v in full_env.items() if not k.startswith("FINETUNE_")} | {
        k: v for k, v in (env or {}).items() if k.startswith("FINETUNE_")}
    p = subprocess.run([CLI, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)
    return Result(p.returncode, p.stdout, p.stderr)


def write_config(path: Path, **sections) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def data_config(tmp_path: Path, dataset: str, run_id: str, uri: str, *, head_epochs: int = 3,
                formats: tuple[str, ...] = ("saved_model",), search: bool = False, **data) -> Path:
    """A small run's config over the `dataset` fixture's bucket (its base weights) with data at `uri`; without
    train.search's trials unless `search` (tests/e2e/test_search.py and the runs that ask for it try them)."""
    return write_config(
        tmp_path / f"{run_id}.yaml", run_id=run_id,
        data={"uri": uri, "image_size": [SIZE, SIZE], "cache_dir": str(tmp_path / f"cache-{run_id}"), **data},
        model={"backbone": BACKBONE, "weights": f"s3://{dataset}/weights/base.weights.h5", "head_units": 16},
        train={"batch_size": 16, "head": {"epochs": head_epochs}, "finetune": {"epochs": 1, "unfreeze": 10},
               **({} if search else {"search": {"learning_rates": []}})},
        output={"uri": f"s3://{dataset}/runs"}, metrics={"port": 0, "linger_seconds": 0},
        export={"formats": list(formats)})


def need_tool(name: str) -> str:
    """Path of a system tool; missing tools skip on a user's machine (reason printed) and fail in CI."""
    found = shutil.which(name)
    if found:
        return found
    msg = f"{name} is not installed (apt-get install {name}); .ci/run installs it"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def need_fashion_mnist() -> None:
    """Fashion-MNIST (Debian's dataset-fashion-mnist) is there, or the test skips (fails in CI)."""
    if FASHION_MNIST.is_file():
        return
    msg = "Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); .ci/run installs it"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height, with no pixel data behind it: nothing may decode it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def dataset(s3, sample_data, base_weights) -> str:
    """A bucket of its own per test module: the sample dataset under data/, the base under weights/."""
    bucket = s3.bucket()
    s3.upload_dir(sample_data, bucket, "data")
    s3.client.upload_file(str(base_weights), bucket, "weights/base.weights.h5")
    return bucket


def tar_bytes(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    """A tar of (name, data) members, in memory: uncompressed, or as `mode` says ("w:gz")."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def free_ports(n: int) -> list[int]:
    """n free TCP ports on 127.0.0.1 (for TF_CONFIG clusters)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# The longest files first (seconds of the 2026-12-05 fresh-clone run after the suite's diet: test_train about 200,
# test_fault_tolerance 193, ...): `make test` runs three workers that take whole files in collection order, and the
# long ones then overlap instead of one finishing alone at the end (with --no-loadscope-reorder, as the Makefile
# passes it: xdist's default reorders files by their number of tests). Within a file the order is kept. The second
# file needs no `base_weights`, so that the second worker starts on it while the first trains the shared base.
SLOWEST_FIRST = ("test_fault_tolerance.py", "test_bench_run_more.py", "test_train.py", "test_bench_scale.py",
                 "test_multilabel.py", "test_quality_bench.py", "test_search.py", "test_datasets.py",
                 "test_observability.py", "test_tensorboard.py", "test_bench_run.py", "test_exit_codes.py",
                 "test_exports.py", "test_chart.py", "test_data_edges.py", "test_from_scratch.py", "test_weights.py",
                 # the unit tier's longest (`make test-fast`: seconds of 2026-12-06, loop 26, lease 17, storage 17, ...)
                 "test_loop.py", "test_lease.py", "test_storage.py", "test_layers.py", "test_metrics.py",
                 "test_readers_properties.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
