"""The measurements that need TensorFlow, each run in a process of its own by bench/run.py.

    python bench/workloads.py SECTION PARAMS.json RESULT.json

One process per measurement: logical CPU devices (2 replicas on one CPU) must be configured before
TensorFlow initialises its devices, and one measurement's threads and memory cannot skew another's.
Throughputs are taken after a first epoch (tracing, pipeline start-up), in alternating rounds so
that load from elsewhere on the machine hits both sides of a ratio alike; the median round counts.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _local_layout(root: Path):
    """(paths, labels, classes) of <root>/train/, as the job's layout code sees them."""
    from job.layout import discover

    rels = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
    layout = discover(rels, str(root))
    paths, labels = layout.items("train")
    return [str(root / p) for p in paths], labels, layout.classes


def _epoch(ds) -> tuple[float, int]:
    """Seconds to iterate one epoch of a finite (image, label) dataset, and the images it gave."""
    t0 = time.perf_counter()
    n = 0
    for x, _ in ds:
        n += int(x.shape[0])
    return time.perf_counter() - t0, n


def _add_latency(client, seconds: float):
    """Delay every request of a boto3 client by `seconds` (sleeping, as a network round trip does)."""
    def delay(**_):
        time.sleep(seconds)

    client.meta.events.register("before-send.s3", delay)
    return lambda: client.meta.events.unregister("before-send.s3", delay)


def _sequential(endpoint: str, bucket: str, keys: list[str], size: tuple[int, int], latency: float,
                decode: bool) -> dict:
    """The naive way: one boto3 GET after another, each image decoded with PIL and resized."""
    import boto3
    import numpy as np
    from PIL import Image

    client = boto3.client("s3", endpoint_url=endpoint)
    if latency:
        _add_latency(client, latency)
    get_s = decode_s = 0.0
    for key in keys:
        t0 = time.perf_counter()
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        t1 = time.perf_counter()
        if decode:
            image = Image.open(io.BytesIO(data)).convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
            np.asarray(image, np.float32)
        decode_s += time.perf_counter() - t1
        get_s += t1 - t0
    return {"images": len(keys), "download_seconds": get_s, "decode_seconds": decode_s}


def input_pipeline(p: dict) -> dict:
    import keras

    from job import dataset, storage
    from job.layout import discover

    size, batch, rounds = tuple(p["image_size"]), p["batch_size"], p["rounds"]
    work = Path(p["work"])
    store = storage.open_store(p["uri"], p["endpoint"])
    out: dict = {}

    # The naive baseline first: sequential GET + PIL decode + resize of every image.
    keys = [f"{store.prefix}/{e.rel}" for e in store.list()]
    seq = _sequential(p["endpoint"], store.bucket, keys, size, 0.0, decode=True)
    n = seq["images"]
    out["sequential"] = {
        **seq, "download_images_per_s": n / seq["download_seconds"],
        "download_decode_images_per_s": n / (seq["download_seconds"] + seq["decode_seconds"]),
        "client": "boto3.client('s3') defaults; PIL decode, RGB, bilinear resize",
    }

    # Epoch 1 of the job's data path: list, stage (parallel GETs), decode check, first epoch.
    t0 = time.perf_counter()
    entries = store.list()
    t_list = time.perf_counter() - t0
    t0 = time.perf_counter()
    root, stats = storage.stage(store, entries, work / "cache")
    t_stage = time.perf_counter() - t0
    layout = discover([e.rel for e in entries], p["uri"])
    rel_paths, labels = layout.items("train")
    paths = [str(root / r) for r in rel_paths]
    t0 = time.perf_counter()
    bad = dataset.find_bad(paths, 90_000_000)
    t_check = time.perf_counter() - t0
    assert not bad and len(paths) == n, (bad, len(paths), n)

    plain = dataset.image_dataset(paths, labels, size, batch, shuffle=True, seed=1)
    t_first_plain, seen = _epoch(plain)
    assert seen == n
    t0 = time.perf_counter()
    cached = dataset.image_dataset(paths, labels, size, batch, shuffle=True, seed=1,
                                   cache_dir=work / "images")
    t_cache = time.perf_counter() - t0
    t_first_cached, seen = _epoch(cached)
    assert seen == n
    shared = t_list + t_stage + t_check
    out["staging"] = {"images": n, "bytes": stats["bytes"], "threads": storage.DOWNLOAD_THREADS,
                      "list_seconds": t_list, "stage_seconds": t_stage, "stage_images_per_s": n / t_stage,
                      "decode_check_seconds": t_check}
    out["epoch1"] = {
        "job_images_per_s": n / (shared + t_first_plain),
        "job_image_cache_images_per_s": n / (shared + t_cache + t_first_cached),
        "first_epoch_seconds": t_first_plain, "image_cache_build_seconds": t_cache,
        "first_epoch_from_image_cache_seconds": t_first_cached,
    }

    # Later epochs, alternating: the job's pipeline (decoding every epoch, and from the image cache)
    # against keras.utils.image_dataset_from_directory on the same staged files.
    reference = keras.utils.image_dataset_from_directory(root / "train", image_size=size, batch_size=batch,
                                                         shuffle=True, seed=1, verbose=False)
    t_first_ref, seen = _epoch(reference)
    assert seen == n
    samples: dict[str, list[float]] = {"job": [], "job_image_cache": [], "image_dataset_from_directory": []}
    contenders = {"job": plain, "job_image_cache": cached, "image_dataset_from_directory": reference}
    for _ in range(rounds):
        for name, ds in contenders.items():
            seconds, seen = _epoch(ds)
            samples[name].append(seen / seconds)
    out["later_epochs"] = {"images_per_s": {k: _median(v) for k, v in samples.items()}, "samples": samples,
                           "image_dataset_from_directory_first_epoch_seconds": t_first_ref}

    # The same GETs with an emulated network round trip (real S3 is not on this machine's loopback).
    latency = p["latency_ms"] / 1000
    subset = entries[: p["latency_images"]]
    keys = [f"{store.prefix}/{e.rel}" for e in subset]
    seq_l = _sequential(p["endpoint"], store.bucket, keys, size, latency, decode=False)
    remove = _add_latency(store.client, latency)
    t0 = time.perf_counter()
    storage.stage(store, subset, work / "cache-latency")
    t_stage_l = time.perf_counter() - t0
    remove()
    out["with_latency"] = {"latency_ms": p["latency_ms"], "images": len(subset),
                           "sequential_download_images_per_s": len(subset) / seq_l["download_seconds"],
                           "stage_images_per_s": len(subset) / t_stage_l}
    return out


# ---------------------------------------------------------------- training


def _run_phase(phase, cluster, global_batch: int, work: Path) -> list[dict]:
    """job.loop.run_phase exactly as the job calls it (checkpoints to a local folder); its epoch records."""
    from job import loop, storage
    from job.checkpoint import Checkpoints
    from job.runstate import RunState

    work.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoints(storage.LocalStore(str(work / "out")), work, cluster, keep=1)
    state = RunState()
    loop.run_phase(phase, cluster, global_batch, loop.Options(patience=0), ckpt, state)
    return state.history[phase.name]


def training(p: dict) -> dict:
    """Fine-tuning images/s of the job's loop with `replicas` replicas, set up as the job sets them up.

    With `compare` (one replica only): against model.fit round by round, model.fit with XLA, and
    phase 1 epoch time with cached features against end to end.
    """
    from job import distribute

    replicas = p["replicas"]
    cluster = distribute.setup("mirrored" if replicas > 1 else "one_device", replicas, False)
    assert cluster.replicas == replicas, cluster.replicas

    import keras

    from job import dataset, loop, model, recipe

    class EpochTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.t0)

    paths, labels, classes = _local_layout(Path(p["data"]))
    size, batch, epochs, rounds, seed = tuple(p["image_size"]), p["batch_size"], p["epochs"], p["rounds"], 1
    work = Path(p["work"]) / f"replicas-{replicas}-{p.get('tag', 0)}"
    steps = math.ceil(len(paths) / batch)

    def build(on=None, unfreeze: int = 0):
        """The job's model under `on`'s strategy (None: no strategy, for model.fit)."""
        keras.utils.set_random_seed(seed)
        with on.strategy.scope() if on else contextlib.nullcontext():
            parts = model.build(p["backbone"], None, size, len(classes), 256, 0.5)
            if unfreeze:
                model.unfreeze_top(parts.base, unfreeze)
        return parts

    def images(b: int):
        return lambda ctx, start: dataset.image_dataset(paths, labels, size, b, shuffle=True, seed=seed, repeat=True,
                                                        start=start)

    def job_seconds(on, phase_name: str, net, data_fn, lr: float, name: str, augment=None) -> list[float]:
        phase = loop.Phase(name=phase_name, model=net, dataset_fn=data_fn, examples=len(paths), epochs=epochs,
                           learning_rate=lr, validate=lambda: None, augment=augment)
        history = _run_phase(phase, on, batch, work / name)
        return [max(r["seconds"], 1e-3) for r in history[1:]]  # epoch 1 traces: left out

    def fit_rates(net, n_epochs: int, n_steps: int = steps) -> list[float]:
        timer = EpochTimer()
        net.fit(images(batch)(None, 0), epochs=n_epochs, steps_per_epoch=n_steps, verbose=0, callbacks=[timer])
        return [n_steps * batch / s for s in timer.seconds[1:]]

    def compiled(**kwargs):
        net = build(unfreeze=20).model
        net.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", metrics=["accuracy"],
                    **kwargs)
        return net

    def finetune(on, net, name: str):
        per_replica = loop.per_replica_batch(batch, on)
        return lambda r: [steps * batch / s for s in job_seconds(on, "finetune", net, images(per_replica), 1e-4,
                                                                 f"{name}-{r}")]

    # Fine-tuning (top 20 base layers and the head trainable), contenders alternating round by round.
    contenders = {"job_loop": finetune(cluster, build(cluster, 20).model, "job")}
    if p["compare"]:
        fit_model = compiled()
        contenders["model_fit"] = lambda r: fit_rates(fit_model, epochs)
    per_round: dict[str, list[list[float]]] = {k: [] for k in contenders}
    for r in range(rounds):
        for name, run in contenders.items():
            per_round[name].append(run(r))
    out: dict = {"steps_per_epoch": steps, "rounds": per_round,
                 "images_per_s": {k: _median([x for rr in v for x in rr]) for k, v in per_round.items()}}
    if p["compare"]:
        out["model_fit_jit_compile"] = bool(fit_model.jit_compile)
        # XLA on this CPU through model.fit's own switch: is jit_compile worth having without a GPU?
        out["model_fit_xla_images_per_s"] = _median(fit_rates(compiled(jit_compile=True), 2, min(steps, 10)))

    if p["compare"]:
        # Phase 1 both ways on the same images: the head on cached features, or images through the frozen
        # base with augmentation (train.head.augment: true) every step.
        cached = build(cluster)
        t0 = time.perf_counter()
        unshuffled = dataset.image_dataset(paths, labels, size, 64, shuffle=False)
        feats, feat_labels = dataset.cached_features(cached.features, unshuffled, len(paths), ["bench"],
                                                     work / "features")
        out["feature_extraction_seconds"] = time.perf_counter() - t0
        e2e = build(cluster)
        with cluster.strategy.scope():
            augment = model.augmentation(recipe.augment_ops(True), seed)

        def features(ctx, start):
            return dataset.feature_dataset(feats, feat_labels, batch, shuffle=True, seed=seed, repeat=True, start=start)

        head: dict[str, list[float]] = {"cached_features": [], "end_to_end": []}
        for r in range(rounds):
            head["cached_features"] += job_seconds(cluster, "head", cached.head, features, 1e-3, f"cached-{r}")
            head["end_to_end"] += job_seconds(cluster, "head", e2e.model, images(batch), 1e-3, f"e2e-{r}",
                                              augment)
        out["head_epoch_seconds"] = {k: _median(v) for k, v in head.items()}
        out["head_samples"] = head
    return out


def formats_latency(p: dict) -> dict:
    """Latency of each exported format of a run, in its own runtime, at batch 1 and batch 32 (per image),
    formats alternating round by round; the median round counts."""
    import numpy as np

    from job import dataset, formats, predict

    run = Path(p["run"])
    size = tuple(p["image_size"])
    pixels = np.asarray(dataset.pixels(p["images"], size, Path(p["work"])), np.float32)
    batch32 = np.resize(pixels, (32, *pixels.shape[1:]))
    runners = {fmt: formats.runner(fmt, run / predict.artifact(fmt)) for fmt in p["formats"]}
    samples: dict[str, dict[str, list[float]]] = {f: {"batch1_ms": [], "batch32_ms_per_image": []} for f in runners}
    for r in runners.values():
        r.predict(pixels[:1])
        r.predict(batch32)
    for _ in range(p["rounds"]):
        for fmt, r in runners.items():
            t0 = time.perf_counter()
            for i in range(p["calls"]):
                r.predict(pixels[i % len(pixels):][:1])
            samples[fmt]["batch1_ms"].append((time.perf_counter() - t0) / p["calls"] * 1000)
            t0 = time.perf_counter()
            r.predict(batch32)
            samples[fmt]["batch32_ms_per_image"].append((time.perf_counter() - t0) / 32 * 1000)
    return {fmt: {k: _median(v) for k, v in s.items()} for fmt, s in samples.items()}


SECTIONS = {"input_pipeline": input_pipeline, "training": training, "formats": formats_latency}


def main() -> None:
    section, params, result = sys.argv[1:4]
    out = SECTIONS[section](json.loads(Path(params).read_text()))
    Path(result).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
