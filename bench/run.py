"""`make bench`: the ratios of CONTRACT section 9, measured side by side in one run.

    .venv/bin/python bench/run.py [--quick] [--out bench/results/latest.json]

Everything is made here: sample images (job.sample_data), an S3 server on 127.0.0.1 in its own
process (bench/s3server.py), the job's own console script. Measurements that need TensorFlow run in
processes of their own (bench/workloads.py). Each ratio is written with its conditions and target;
a missed target is reported, never hidden. `--quick` is the same run on tiny data, for the test
suite (MobileNet v1 instead of MobileNetV2, no train.search trials): its numbers mean nothing, only that
the bench still runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
CLI = str(Path(sys.executable).parent / "finetune-job")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
BACKBONE = "mobilenet_v2"
# --quick trains MobileNet (v1) instead: it traces and exports in about two thirds of MobileNetV2's time
# (tests/conftest.py), and the quick mode shows that the bench runs, not what it measures.
QUICK_BACKBONE = "mobilenet"

# Sizes of each measurement. `full` is what `make bench` runs (about 5 minutes on 2 cores).
PROFILES = {
    "full": {
        "input": {"classes": 6, "per_class": 500, "source_px": 64, "image_size": [48, 48], "batch_size": 32,
                  "rounds": 5, "latency_ms": 20, "latency_images": 400},
        "training": {"classes": 6, "per_class": 160, "source_px": 64, "image_size": [64, 64],
                     "batch_size": 32, "epochs": 3, "rounds": 3, "replica_pairs": 2},
        "startup": {"help_runs": 9, "objects": 10_000, "validate_runs": 3},
        "memory": {"classes": 4, "per_class": 64, "factor": 4, "source_px": 64, "image_size": [64, 64],
                   "batch_size": 32, "finetune_epochs": 1},
        "formats": {"classes": 4, "per_class": 60, "test_per_class": 50, "source_px": 48, "image_size": [64, 64],
                    "batch_size": 32, "epochs": 6, "rounds": 5, "calls": 20},
        "stages": {"classes": 5, "per_class": 60, "larger": 10, "source_px": 32, "image_size": [32, 32],
                   "head_epochs": 8, "finetune_epochs": 3},
    },
    "quick": {
        "input": {"classes": 3, "per_class": 16, "source_px": 40, "image_size": [32, 32], "batch_size": 16,
                  "rounds": 1, "latency_ms": 5, "latency_images": 12},
        "training": {"classes": 2, "per_class": 16, "source_px": 32, "image_size": [32, 32], "batch_size": 16,
                     "epochs": 2, "rounds": 1, "replica_pairs": 1},
        "startup": {"help_runs": 3, "objects": 200, "validate_runs": 1},
        # No fine-tuning in the quick memory and stages runs (its trace is most of a tiny run's training time):
        # the formats run and the training-loop section fine-tune.
        "memory": {"classes": 2, "per_class": 8, "factor": 4, "source_px": 32, "image_size": [32, 32],
                   "batch_size": 16, "finetune_epochs": 0},
        "formats": {"classes": 2, "per_class": 8, "test_per_class": 4, "source_px": 32, "image_size": [32, 32],
                    "batch_size": 16, "epochs": 1, "rounds": 1, "calls": 2},
        "stages": {"classes": 2, "per_class": 8, "larger": 2, "source_px": 32, "image_size": [32, 32],
                   "head_epochs": 2, "finetune_epochs": 0},
    },
}


# ---------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def child_env(endpoint: str, quick: bool = False) -> dict[str, str]:
    """The environment of the job's processes. `quick`: without train.search's trials, one fine-tuning phase per
    run (the quick modes show that a bench runs; the search is measured by the full modes and tested by
    tests/e2e/test_search.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINETUNE_", "AWS_"))}
    if quick:
        env["FINETUNE_TRAIN__SEARCH__LEARNING_RATES"] = "[]"
    return {**env, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "TF_CPP_MIN_LOG_LEVEL": "3"}


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), 0)

    def version(*names: str) -> str:
        for name in names:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        return "not installed"

    return {
        "cpu_model": models[0] if models else platform.processor() or "unknown",
        # which kernels TensorFlow picks: results are bit for bit the same only on machines alike in this too
        "cpu_vector": "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other",
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(kib / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": version("tensorflow-cpu", "tensorflow"),
        "keras": version("keras"),
        "boto3": version("boto3"),
        "moto": version("moto"),
        "gpu": None,
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class S3Server:
    """bench/s3server.py as a child process; stops when closed."""

    def __init__(self):
        self.process = subprocess.Popen([PY, str(HERE / "s3server.py")], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.endpoint = self.process.stdout.readline().strip()
        if not self.endpoint.startswith("http://127.0.0.1:"):
            self.close()
            raise RuntimeError(f"S3 server did not start (said {self.endpoint!r})")
        import boto3
        from botocore.config import Config

        self.client = boto3.client("s3", endpoint_url=self.endpoint, config=Config(max_pool_connections=32),
                                   aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                   aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                   region_name=CREDENTIALS["AWS_DEFAULT_REGION"])

    def upload(self, items: list[tuple[str, str, bytes | Path]]) -> None:
        """(bucket, key, bytes or file) in parallel; buckets are created as needed."""
        for bucket in sorted({b for b, _, _ in items}):
            self.client.create_bucket(Bucket=bucket)

        def put(item):
            bucket, key, body = item
            data = body.read_bytes() if isinstance(body, Path) else body
            self.client.put_object(Bucket=bucket, Key=key, Body=data)

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(put, items))

    def upload_dir(self, folder: Path, bucket: str, prefix: str) -> str:
        files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
        self.upload([(bucket, f"{prefix}/{p.relative_to(folder).as_posix()}", p) for p in files])
        return f"s3://{bucket}/{prefix}"

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def sample(root: Path, classes: int, per_class: int, px: int, test_per_class: int = 0) -> Path:
    from job.sample_data import write_sample_dataset

    write_sample_dataset(root, classes=classes, per_class=per_class, size=px, seed=7,
                         test_per_class=test_per_class)
    return root


def random_base(path: Path, image_size: list[int], env: dict, backbone: str = BACKBONE) -> Path:
    """A random base (MobileNetV2 unless told) saved once as a weights file, for runs that time the two-phase
    transfer recipe (head on cached features, then fine-tuning) without a pre-trained base to download.
    `model.weights: none` is no stand-in for it: from scratch the job skips the head phase and trains every layer."""
    if path.is_file():
        return path
    from job import backbones

    code = ("import sys, keras; getattr(keras.applications, sys.argv[4])(include_top=False, weights=None, "
            "input_shape=(int(sys.argv[2]), int(sys.argv[3]), 3)).save_weights(sys.argv[1])")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([PY, "-c", code, str(path), *map(str, image_size), backbones.get(backbone).constructor],
                   check=True, env=env, capture_output=True, timeout=600)
    return path


RANDOM_BASE = ("a random base saved once (MobileNetV2(weights=None).save_weights) and given as model.weights: the "
               "transfer recipe's phases, frozen BatchNormalization with its initial statistics")


def workload(section: str, params: dict, tmp: Path, env: dict) -> dict:
    """Run one bench/workloads.py section in its own process; its JSON result."""
    name = "-".join(str(x) for x in (section, params.get("replicas"), params.get("tag")) if x is not None)
    params_file, result_file, log_file = (tmp / f"{name}{s}" for s in (".params.json", ".result.json", ".log"))
    params_file.write_text(json.dumps(params))
    with open(log_file, "w") as out:
        p = subprocess.run([PY, str(HERE / "workloads.py"), section, str(params_file), str(result_file)],
                           stdout=out, stderr=subprocess.STDOUT, env=env, timeout=1800)
    if p.returncode != 0:
        tail = log_file.read_text()[-4000:]
        raise RuntimeError(f"workload {section} failed (exit {p.returncode}):\n{tail}")
    return json.loads(result_file.read_text())


def target(value: float, limit: float, better: str, unit: str = "x") -> dict:
    """A measured value next to its target: `better` 'higher' means value >= limit, 'lower' value <= limit."""
    met = value >= limit if better == "higher" else value <= limit
    return {"value": round(value, 4), "target": limit, "better": better, "unit": unit, "met": bool(met)}


def ratio(value: float, limit: float | None = None) -> dict:
    """A ratio without a target of its own (context for one that has)."""
    return {"value": round(value, 4), "target": limit, "better": "higher", "unit": "x", "met": None}


# ---------------------------------------------------------------- sections


def bench_input(cfg: dict, s3: S3Server, tmp: Path, env: dict) -> dict:
    data = sample(tmp / "input-data", cfg["classes"], cfg["per_class"], cfg["source_px"])
    uri = s3.upload_dir(data, "bench-input", "dataset")
    params = {"uri": uri, "endpoint": s3.endpoint, "work": str(tmp / "input-work"), **cfg}
    r = workload("input_pipeline", params, tmp, env)
    later, seq, lat = r["later_epochs"]["images_per_s"], r["sequential"], r["with_latency"]
    px = cfg["source_px"]
    conditions = {
        "images": cfg["classes"] * cfg["per_class"], "classes": cfg["classes"],
        "source": f"{px}x{px} PNG (2 in 3) and JPEG (1 in 3) from job.sample_data",
        "image_size": cfg["image_size"], "batch_size": cfg["batch_size"], "shuffle": True,
        "later_epoch_rounds": cfg["rounds"], "staging_threads": r["staging"]["threads"],
        "s3_server": "moto ThreadedMotoServer in its own process on 127.0.0.1",
        "image_dataset_from_directory": "defaults (bilinear resize without antialiasing, shuffle buffer "
                                        "1024, prefetch), reading the staged files",
        "job": "job.dataset.image_dataset: parallel decode + antialiased bilinear resize every epoch",
        "job_image_cache": "job.dataset.image_dataset(cache_dir=...): decoded once into a uint8 file, "
                           "rows read back with pread",
    }
    return {
        "conditions": conditions,
        "measurements": r,
        "targets": {
            "later_epochs_image_cache_vs_image_dataset_from_directory": target(
                later["job_image_cache"] / later["image_dataset_from_directory"], 1.0, "higher"),
            "staging_vs_sequential_download": target(
                r["staging"]["stage_images_per_s"] / seq["download_images_per_s"], 4.0, "higher"),
        },
        "context": {
            "later_epochs_decoding_vs_image_dataset_from_directory": ratio(
                later["job"] / later["image_dataset_from_directory"], 1.0),
            "epoch1_vs_sequential_download_decode": ratio(
                r["epoch1"]["job_images_per_s"] / seq["download_decode_images_per_s"]),
            "epoch1_image_cache_vs_sequential_download_decode": ratio(
                r["epoch1"]["job_image_cache_images_per_s"] / seq["download_decode_images_per_s"]),
            f"staging_vs_sequential_download_with_{cfg['latency_ms']}ms_latency": ratio(
                lat["stage_images_per_s"] / lat["sequential_download_images_per_s"], 4.0),
        },
    }


def paired(rounds: dict[str, list[list[float]]], a: str, b: str) -> float:
    """Median over rounds of a/b, each round's epochs measured back to back: load from elsewhere on the
    machine that drifts over minutes cancels out."""
    return statistics.median(statistics.median(x) / statistics.median(y) for x, y in zip(rounds[a], rounds[b]))


def bench_training(cfg: dict, tmp: Path, env: dict) -> tuple[dict, dict]:
    data = sample(tmp / "training-data", cfg["classes"], cfg["per_class"], cfg["source_px"])
    base = {"data": str(data), "work": str(tmp / "training-work"), **cfg}
    one = workload("training", {**base, "replicas": 1, "compare": True}, tmp, env)
    # 1 and 2 replicas as the job sets them up (distribute.setup) are different processes: alternate them
    # (1 2 2 1 ...) and pair neighbours, so that load drifting over minutes hits both alike.
    pairs = []
    for i in range(cfg["replica_pairs"]):
        pairs.append({r: workload("training", {**base, "replicas": r, "rounds": 1, "compare": False, "tag": i},
                                  tmp, env)["images_per_s"]["job_loop"] for r in ((1, 2), (2, 1))[i % 2]})
    replica_ratio = statistics.median(pair[2] / pair[1] for pair in pairs)
    conditions = {
        "images": cfg["classes"] * cfg["per_class"], "classes": cfg["classes"],
        "image_size": cfg["image_size"], "global_batch_size": cfg["batch_size"],
        "backbone": f"{cfg['backbone']}, random weights (job.model.build without a weights file: BatchNormalization "
                    "frozen as with a pre-trained base, not model.weights: none's from-scratch mode)",
        "steps_per_epoch": one["steps_per_epoch"], "epochs_per_round": cfg["epochs"], "rounds": cfg["rounds"],
        "timed": "epochs 2.. of each round (epoch 1 traces); ratios: median over rounds of the round's ratio",
        "data": "job.dataset.image_dataset, repeated",
    }
    training = {
        "conditions": {
            **conditions,
            "phase": "fine-tune: top 20 base layers and the head trainable, Adam, no augmentation",
            "job_loop": "job.loop.run_phase (checkpoints to local disk at epoch ends, not timed)",
            "model_fit": f"compile() defaults (jit_compile resolved to {one['model_fit_jit_compile']}), "
                         "metrics=['accuracy'], verbose=0, no strategy",
            "one_replica": "OneDeviceStrategy /cpu:0",
            "two_replicas": "MirroredStrategy over 2 logical CPU devices (distribution.cpu_replicas: 2)",
            "replicas_comparison": f"{cfg['replica_pairs']} pair(s) of processes, 1 round each, order "
                                   "1 2 2 1; ratio: median over pairs",
        },
        "measurements": {
            "images_per_s": {**one["images_per_s"],
                             "model_fit_jit_compile_true": one["model_fit_xla_images_per_s"]},
            "rounds": one["rounds"],
            "replica_pairs_images_per_s": [{f"replicas_{k}": v for k, v in pair.items()} for pair in pairs],
        },
        "targets": {
            "job_loop_vs_model_fit": target(paired(one["rounds"], "job_loop", "model_fit"), 0.95, "higher"),
            "two_replicas_vs_one": target(replica_ratio, 0.9, "higher"),
        },
        "context": {
            "model_fit_xla_vs_model_fit_on_cpu": ratio(
                one["model_fit_xla_images_per_s"] / one["images_per_s"]["model_fit"]),
        },
    }
    epoch = one["head_epoch_seconds"]
    configured = 10  # train.head.epochs default
    with_extraction = configured * epoch["end_to_end"] / (
        one["feature_extraction_seconds"] + configured * epoch["cached_features"])
    head = {
        "conditions": {
            **conditions,
            "end_to_end": "images through the frozen base, augmentation on (the default)",
            "cached_features": "the head on the memory-mapped feature file",
        },
        "measurements": {"epoch_seconds": epoch, "samples": one["head_samples"],
                         "feature_extraction_seconds": one["feature_extraction_seconds"]},
        "targets": {"cached_features_vs_end_to_end_epoch": target(
            epoch["end_to_end"] / epoch["cached_features"], 10.0, "higher")},
        "context": {
            f"cached_features_incl_extraction_vs_end_to_end_{configured}_epochs": ratio(with_extraction),
        },
    }
    return training, head


def timed(args: list[str], env: dict, timeout: float = 600) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    return time.perf_counter() - t0, p


def check(p: subprocess.CompletedProcess, what: str) -> None:
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def bench_startup(cfg: dict, s3: S3Server, tmp: Path, env: dict) -> dict:
    helps = []
    for _ in range(cfg["help_runs"]):
        seconds, p = timed([CLI, "--help"], env)
        check(p, "finetune-job --help")
        helps.append(seconds)

    # A 10,000-object listing: tiny PNGs in 4 class folders (validate lists, it does not download).
    from PIL import Image

    buf = tmp / "pixel.png"
    Image.new("RGB", (1, 1), (120, 30, 200)).save(buf)
    pixel = buf.read_bytes()
    n = cfg["objects"]
    s3.upload([("bench-listing", f"dataset/train/class{i % 4}/{i:06d}.png", pixel) for i in range(n)])
    config = tmp / "validate.yaml"
    config.write_text(json.dumps({"data": {"uri": "s3://bench-listing/dataset", "image_size": [64, 64]},
                                  "model": {"weights": "none"}, "output": {"uri": "s3://bench-listing/models"},
                                  "metrics": {"port": 0}}))
    validates = []
    for _ in range(cfg["validate_runs"]):
        seconds, p = timed([CLI, "validate", "--config", str(config)], env)
        check(p, "finetune-job validate")
        validates.append(seconds)
    total = p.stdout.strip().splitlines()[-1].split()
    return {
        "conditions": {"help_runs": cfg["help_runs"], "validate_runs": cfg["validate_runs"],
                       "objects_listed": n, "validate_printed_total": total,
                       "measured": "wall time of the console script, a new interpreter each run (median)"},
        "measurements": {"help_seconds": {"median": statistics.median(helps), "samples": helps},
                         "validate_seconds": {"median": statistics.median(validates), "samples": validates}},
        "targets": {"help_wall_seconds": target(statistics.median(helps), 0.5, "lower", "s"),
                    "validate_10k_listing_seconds": target(statistics.median(validates), 10.0, "lower", "s")},
    }


def peak_rss_run(args: list[str], env: dict, log_file: Path) -> tuple[int, float, int]:
    """(exit code, seconds, peak RSS in bytes) of one child process, from wait4's rusage for it alone."""
    t0 = time.perf_counter()
    with open(log_file, "w") as out:
        p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def bench_memory(cfg: dict, s3: S3Server, tmp: Path, env: dict) -> dict:
    runs = {}
    base = random_base(tmp / f"base-{cfg['image_size'][0]}x{cfg['image_size'][1]}.weights.h5", cfg["image_size"], env,
                       cfg["backbone"])
    s3.upload([("bench-memory", "weights/base.weights.h5", base)])
    for label, per_class in (("n", cfg["per_class"]), ("4n", cfg["per_class"] * cfg["factor"])):
        data = sample(tmp / f"memory-{label}", cfg["classes"], per_class, cfg["source_px"],
                      test_per_class=max(2, per_class // 8))
        uri = s3.upload_dir(data, "bench-memory", label)
        config = tmp / f"memory-{label}.yaml"
        config.write_text(json.dumps({
            "run_id": f"memory-{label}",
            "data": {"uri": uri, "image_size": cfg["image_size"], "cache_dir": str(tmp / f"cache-{label}")},
            "model": {"backbone": cfg["backbone"], "weights": "s3://bench-memory/weights/base.weights.h5"},
            "train": {"batch_size": cfg["batch_size"], "head": {"epochs": 1},
                      "finetune": {"epochs": cfg["finetune_epochs"]}},
            "output": {"uri": "s3://bench-memory/models"},
            "metrics": {"port": 0, "linger_seconds": 0},
            "export": {"formats": ["saved_model"]},
        }))
        log_file = tmp / f"memory-{label}.log"
        code, seconds, rss = peak_rss_run([CLI, "train", "--config", str(config)], env, log_file)
        if code != 0:
            tail = log_file.read_text()[-4000:]
            raise RuntimeError(f"finetune-job train ({label}) failed (exit {code}):\n{tail}")
        runs[label] = {"images": cfg["classes"] * per_class, "peak_rss_mib": round(rss / 2**20, 1),
                       "seconds": round(seconds, 2)}
    return {
        "conditions": {
            "classes": cfg["classes"], "images": {k: v["images"] for k, v in runs.items()},
            "image_size": cfg["image_size"], "batch_size": cfg["batch_size"],
            "backbone": f"{cfg['backbone']}, {RANDOM_BASE}",
            "run": "finetune-job train from S3: staging, decode check, cached-features head 1 epoch, "
                   f"fine-tune {cfg['finetune_epochs']} epoch(s), evaluation, export, upload",
            "peak_rss": "ru_maxrss of the finetune-job process (wait4)",
        },
        "measurements": runs,
        "targets": {"peak_rss_4n_vs_n": target(runs["4n"]["peak_rss_mib"] / runs["n"]["peak_rss_mib"], 1.25,
                                               "lower")},
    }


ALL_FORMATS = ["saved_model", "tf_serving", "tflite", "tflite_int8", "onnx"]
TODAY_EVAL_EXPORT_SECONDS = 22.0  # issue 13's timeline of the 300-image task before this work: 7.5 + 14.4 s


def bench_stages(cfg: dict, s3: S3Server, tmp: Path, env: dict) -> dict:
    """The job's own per-stage seconds (its manifest's timings) on the 300-image task and on one 10x larger,
    from S3 like a real run, plus the head phase both ways (cached features vs end to end, 8 epochs)."""
    runs = {}
    plans = {
        "small": (cfg["per_class"], {"head": {"epochs": cfg["head_epochs"]},
                                     "finetune": {"epochs": cfg["finetune_epochs"]}}),
        "larger": (cfg["per_class"] * cfg["larger"], {"head": {"epochs": cfg["head_epochs"]},
                                                      "finetune": {"epochs": cfg["finetune_epochs"]}}),
        "head_cached": (cfg["per_class"], {"head": {"epochs": cfg["head_epochs"]}, "finetune": {"epochs": 0}}),
        "head_end_to_end": (cfg["per_class"], {"head": {"epochs": cfg["head_epochs"], "mode": "end_to_end"},
                                               "finetune": {"epochs": 0}}),
    }
    base = random_base(tmp / f"base-{cfg['image_size'][0]}x{cfg['image_size'][1]}.weights.h5", cfg["image_size"], env,
                       cfg["backbone"])
    s3.upload([("bench-stages", "weights/base.weights.h5", base)])
    uris: dict[int, str] = {}
    done: dict[str, str] = {}  # a plan's data and train settings -> the run that had them
    for name, (per_class, train) in plans.items():
        same = done.setdefault(json.dumps([per_class, train], sort_keys=True), name)
        if same != name:  # quick mode: without fine-tuning, `small` is `head_cached`; one run serves both
            runs[name] = {**runs[same], "same_run_as": same}
            continue
        if per_class not in uris:
            data = sample(tmp / f"stages-{per_class}", cfg["classes"], per_class, cfg["source_px"],
                          test_per_class=max(2, per_class // 4))
            uris[per_class] = s3.upload_dir(data, "bench-stages", f"n{per_class}")
        uri = uris[per_class]
        config = tmp / f"stages-{name}.yaml"
        config.write_text(json.dumps({
            "run_id": f"stages-{name}",
            "data": {"uri": uri, "image_size": cfg["image_size"], "cache_dir": str(tmp / f"stages-cache-{name}")},
            "model": {"backbone": cfg["backbone"], "weights": "s3://bench-stages/weights/base.weights.h5"},
            "train": {**train, "early_stopping_patience": 0},
            "output": {"uri": "s3://bench-stages/runs"},
            "metrics": {"port": 0, "linger_seconds": 0},
            "export": {"formats": ["saved_model"]},
        }))
        seconds, p = timed([CLI, "train", "--config", str(config)], env, timeout=1800)
        check(p, f"finetune-job train ({name})")
        manifest = json.loads(s3.client.get_object(Bucket="bench-stages",
                                                   Key=f"runs/stages-{name}/manifest.json")["Body"].read())
        runs[name] = {"images": sum(n for per in manifest["dataset"]["counts"].values() for n in per.values()),
                      "wall_seconds": round(seconds, 2), "timings": manifest["timings"]}
    small = runs["small"]["timings"]
    eval_export = small["evaluate_seconds"] + small["export_seconds"] + small.get("upload_seconds", 0.0)
    head = runs["head_cached"]["timings"]["head_seconds"] / runs["head_end_to_end"]["timings"]["head_seconds"]
    return {
        "conditions": {
            "runs": f"finetune-job train from S3, {cfg['backbone']} ({RANDOM_BASE}), {cfg['image_size']} px, "
                    f"{cfg['classes']} classes x {cfg['per_class']} images (small) and {cfg['larger']}x that (larger); "
                    f"head {cfg['head_epochs']} epochs, fine-tuning {cfg['finetune_epochs']}, no early stopping, "
                    "export.formats [saved_model] (as the job exported before the other formats), checkpoints by "
                    "time (the default, every 300 s)",
            "head": "head_cached and head_end_to_end: the head phase alone, 8 epochs, head_seconds (feature "
                    "extraction included for cached)",
            "today": f"evaluation + export before this work: {TODAY_EVAL_EXPORT_SECONDS} s on the same kind of task",
        },
        "measurements": runs,
        "targets": {
            "head_cached_vs_end_to_end_8_epochs": target(head, 0.5, "lower"),
            "evaluate_plus_export_vs_today": target(eval_export / TODAY_EVAL_EXPORT_SECONDS, 0.5, "lower"),
        },
    }



def bench_formats(cfg: dict, tmp: Path, env: dict) -> dict:
    """One run exporting every format; then each format's size, accuracy and agreement (from the run's own
    check) and its latency at batch 1 and 32, measured side by side in one process."""
    data = sample(tmp / "formats-data", cfg["classes"], cfg["per_class"], cfg["source_px"],
                  test_per_class=cfg["test_per_class"])
    config = tmp / "formats.yaml"
    config.write_text(json.dumps({
        "run_id": "formats",
        "data": {"uri": str(data), "image_size": cfg["image_size"], "cache_dir": str(tmp / "formats-cache")},
        # From scratch: conversion does not depend on the weights. The head phase is skipped and every layer,
        # BatchNormalization included, trains for head + finetune epochs at the head's rate (1e-3).
        "model": {"backbone": cfg["backbone"], "weights": "none"},
        "train": {"batch_size": cfg["batch_size"], "head": {"epochs": cfg["epochs"]},
                  "finetune": {"epochs": cfg["epochs"]}},
        "output": {"uri": str(tmp / "formats-out")},
        "metrics": {"port": 0, "linger_seconds": 0},
        "export": {"formats": ALL_FORMATS},
    }))
    seconds, p = timed([CLI, "train", "--config", str(config)], env, timeout=1800)
    check(p, "finetune-job train (every format)")
    run = tmp / "formats-out" / "formats"
    checked = json.loads((run / "metrics.json").read_text())["formats"]
    images = sorted(str(f) for f in (data / "test").rglob("*.*"))
    latency = workload("formats", {"run": str(run), "image_size": cfg["image_size"], "images": images,
                                   "work": str(tmp / "formats-latency"), "formats": ALL_FORMATS,
                                   "rounds": cfg["rounds"], "calls": cfg["calls"]}, tmp, env)
    table = {fmt: {"bytes": checked[fmt]["bytes"], "accuracy": checked[fmt]["accuracy"],
                   "agreement_with_saved_model": checked[fmt].get("agreement", 1.0), **latency[fmt]}
             for fmt in ALL_FORMATS}
    return {
        "conditions": {
            "run": f"finetune-job train, {cfg['backbone']} (weights none: from scratch, every layer trained up to "
                   f"{2 * cfg['epochs']} epochs at 1e-3, BatchNormalization included), "
                   f"{cfg['classes']} classes x {cfg['per_class']} images, {cfg['image_size']} px, every format",
            "check_images": len(images), "run_seconds": round(seconds, 1),
            "latency": f"CPU, one process, formats alternating over {cfg['rounds']} rounds; batch 1: mean of "
                       f"{cfg['calls']} calls; batch 32: one call / 32; median round",
            "inputs": "saved_model and tf_serving through their serving_pixels signature; the others their "
                      "own input (float32, or uint8 for tflite_int8)",
        },
        "measurements": table,
        "targets": {
            "tflite_agreement": target(table["tflite"]["agreement_with_saved_model"], 0.99, "higher", ""),
            "onnx_agreement": target(table["onnx"]["agreement_with_saved_model"], 0.99, "higher", ""),
            "tflite_int8_accuracy_drop": target(max(1e-4, table["saved_model"]["accuracy"]
                                                    - table["tflite_int8"]["accuracy"]), 0.02, "lower", ""),
        },
    }


GPU_NOTE = (
    "No GPU was available to this run. On a GPU the job picks at run time (job/distribute.py) "
    "mixed_float16 with a LossScaleOptimizer (train.mixed_precision: auto), memory growth, and "
    "MirroredStrategy over several GPUs. XLA (jit_compile) is not enabled in the training step yet."
)


def bench_gpu() -> dict:
    return {"available": False, "conditions": {"gpus": 0}, "note": GPU_NOTE}


# ---------------------------------------------------------------- report


def summary(sections: dict) -> list[dict]:
    rows = []
    for name, section in sections.items():
        for key, t in section.get("targets", {}).items():
            rows.append({"section": name, "measure": key, **t})
    return rows


def print_table(rows: list[dict]) -> None:
    width = max(len(f"{r['section']}.{r['measure']}") for r in rows)
    for r in rows:
        sign = ">=" if r["better"] == "higher" else "<="
        verdict = "met" if r["met"] else "MISSED"
        print(f"{r['section'] + '.' + r['measure']:<{width}}  {r['value']:>9.3f} {r['unit']:<2} "
              f"(target {sign} {r['target']}{r['unit']})  {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny data: shows that the bench runs, no more")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (data, logs)")
    parser.add_argument("--only", default="", help="comma-separated sections to run, e.g. stages (default: all)")
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(",")))

    def want(*names: str) -> bool:
        return not only or bool(only & set(names))

    mode = "quick" if args.quick else "full"
    backbone = QUICK_BACKBONE if args.quick else BACKBONE
    cfg = {section: {**sizes, "backbone": backbone} for section, sizes in PROFILES[mode].items()}

    started, t0 = dt.datetime.now(dt.timezone.utc), time.monotonic()
    load_before = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    s3 = S3Server()
    env = child_env(s3.endpoint, args.quick)
    sections = {}
    try:
        log(f"{mode} run; S3 server {s3.endpoint}; scratch {tmp}")
        if want("startup"):
            log("start-up: --help and validate over a large listing")
            sections["startup"] = bench_startup(cfg["startup"], s3, tmp, env)
        if want("input_pipeline"):
            log("input pipeline")
            sections["input_pipeline"] = bench_input(cfg["input"], s3, tmp, env)
        if want("training_loop", "head_phase"):
            log("training loop (1 and 2 replicas) and head phase")
            sections["training_loop"], sections["head_phase"] = bench_training(cfg["training"], tmp, env)
        if want("memory"):
            log("memory: finetune-job train on n and 4n images")
            sections["memory"] = bench_memory(cfg["memory"], s3, tmp, env)
        if want("formats"):
            log("export formats: one run with every format, then latency at batch 1 and 32")
            sections["formats"] = bench_formats(cfg["formats"], tmp, env)
        if want("stages"):
            log("stage budget: the job's own per-stage seconds, small and 10x larger; the head phase both ways")
            sections["stages"] = bench_stages(cfg["stages"], s3, tmp, env)
        sections["gpu"] = bench_gpu()
    finally:
        s3.close()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = summary(sections)
    result = {
        "benchmark": "finetune-job",
        "mode": mode,
        "started": started.isoformat(timespec="seconds"),
        "duration_seconds": round(time.monotonic() - t0, 1),
        "machine": machine(),
        "load_average": {"before": load_before, "after": load_average(),
                         "note": "1/5/15-minute load; above 0 before the run means the machine was shared"},
        "sections": sections,
        "summary": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows)
    print(f"wrote {args.out} ({result['duration_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
