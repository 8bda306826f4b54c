"""The commands' work, step by step in the order data flows:

config -> storage (listing, staging) -> dataset -> model -> train (head, fine-tune) -> evaluate -> export.

TensorFlow is imported inside `train` and `predict` only: `validate` and `--help` never load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from job import evaluate, logs, metrics, recipe, storage
from job import layout as layout_lib
from job.config import Config, to_yaml
from job.errors import ConfigError, DataError, StorageError

log = logs.get()


# ---------------------------------------------------------------- storage and layout


def read_layout(cfg: Config) -> tuple[layout_lib.Layout, list[storage.Entry]]:
    """List the dataset once (no downloads), check its layout, and carve the validation split if needed.

    The listing comes back too: staging needs its sizes and ETags, and a second listing of a large
    dataset costs a request per thousand objects."""
    store = storage.open_store(cfg.data.uri, cfg.s3.endpoint_url)
    entries = store.list()
    found = layout_lib.discover([e.rel for e in entries], cfg.data.uri.rstrip("/"))
    if found.ignored:
        log.warning("objects ignored (not images in a class folder)", count=len(found.ignored),
                    examples=found.ignored[:5])
    return layout_lib.split_validation(found, cfg.data.validation_split, cfg.train.seed), entries


def output_state(cfg: Config) -> tuple[storage.Store, str]:
    """The run's output store and its state: 'complete', 'empty' or 'incomplete'."""
    out = storage.open_store(storage.join(cfg.output.uri, cfg.run_id), cfg.s3.endpoint_url)
    if out.exists("_SUCCESS"):
        return out, "complete"
    return out, "incomplete" if out.list() else "empty"


def validate(cfg: Config) -> dict[str, dict[str, int]]:
    """Storage access and dataset layout: what `finetune-job validate` prints. Trains nothing."""
    layout, _ = read_layout(cfg)
    output_state(cfg)  # proves the output location is reachable with these credentials
    return layout.counts()


def stage_and_check(cfg: Config, layout: layout_lib.Layout,
                    listing: list[storage.Entry]) -> tuple[layout_lib.Layout, Path, list[str]]:
    """Download the dataset to the cache and drop undecodable files; DataError past max_bad_fraction."""
    from job import dataset, signals

    store = storage.open_store(cfg.data.uri, cfg.s3.endpoint_url)
    wanted = {p for per in layout.files.values() for ps in per.values() for p in ps}
    entries = [e for e in listing if e.rel in wanted]
    with logs.progress("staging", len(entries)) as advance:
        root, stats = storage.stage(store, entries, Path(cfg.data.cache_dir), advance,
                                    stop=lambda: signals.check("staging"))
    log.info("dataset staged", root=str(root), **stats)

    paths = sorted(wanted)
    signals.check("staging")
    bad = sorted(os.path.relpath(p, root) for p in dataset.find_undecodable([str(root / p) for p in paths]))
    for rel in bad:
        log.warning("undecodable image skipped", file=storage.join(cfg.data.uri, rel))
    metrics.bad_images(len(bad))
    fraction = len(bad) / max(len(paths), 1)
    if fraction > cfg.data.max_bad_fraction:
        raise DataError(
            f"{len(bad)} of {len(paths)} images cannot be decoded ({fraction:.1%} > data.max_bad_fraction "
            f"{cfg.data.max_bad_fraction:.1%}), e.g. {storage.join(cfg.data.uri, bad[0])}"
        )
    cleaned = layout_lib.without(layout, set(bad))
    for split, per in cleaned.files.items():
        empty = [c for c, ps in per.items() if not ps]
        if empty:
            raise DataError(f"{cfg.data.uri}/{split}/: no decodable images left in {', '.join(empty)}")
    return cleaned, root, bad


def resolve_weights(cfg: Config, work: Path) -> tuple[str | None, bool]:
    """(local weights file or None, download ImageNet weights?) from `model.weights`."""
    weights = cfg.model.weights
    if weights in ("imagenet", "none"):
        return None, weights == "imagenet"
    if storage.is_s3(weights):
        parent, _, name = weights.rstrip("/").rpartition("/")
        local = work / "weights" / name
        storage.open_store(parent, cfg.s3.endpoint_url).download(name, local)
        return str(local), False
    if not Path(weights).expanduser().is_file():
        raise ConfigError(f"config: model.weights: no weights file at {weights} (imagenet | none | a path | s3://...)")
    return str(Path(weights).expanduser()), False


# ---------------------------------------------------------------- train


def train(cfg: Config) -> dict:
    """The whole job. Returns the summary that the CLI logs last.

    An incomplete run with the same run_id resumes from its latest checkpoint.
    """
    started = time.monotonic()
    timings: dict[str, float] = {}
    out, state = output_state(cfg)
    if state == "complete" and not cfg.output.overwrite:
        return {"status": "already complete", "artifacts": out.uri}

    layout, listing = read_layout(cfg)
    log.info("dataset listed", uri=cfg.data.uri, classes=len(layout.classes), counts=layout.counts())

    from job import distribute

    cluster = distribute.setup(cfg.distribution.strategy, cfg.distribution.cpu_replicas, cfg.train.mixed_precision,
                               cfg.distribution.connect_timeout_seconds)
    logs.bind(worker=cluster.worker_index)
    log.info("strategy ready", strategy=cluster.kind, replicas=cluster.replicas, workers=cluster.num_workers,
             mixed_precision=cluster.mixed_precision)
    if state == "complete" and cfg.output.overwrite:
        # Only a complete run is redone from scratch: an incomplete one is this run's own earlier
        # attempt (a preempted or failed pod of the same Job) and resumes.
        if cluster.is_chief:
            log.warning("overwriting the complete run", artifacts=out.uri)
            out.delete_all()
        state = "empty"

    import keras
    import tensorflow as tf

    from job import dataset, model, signals
    from job import train as loop
    from job.checkpoint import Checkpoints

    # Same seed, data and strategy on CPU -> the same weights: seeded Python/NumPy/TensorFlow generators,
    # deterministic kernels and a deterministic tf.data order.
    keras.utils.set_random_seed(cfg.train.seed)
    tf.config.experimental.enable_op_determinism()
    work = Path(cfg.data.cache_dir) / "runs" / cfg.run_id / f"worker-{cluster.worker_index}"
    work.mkdir(parents=True, exist_ok=True)
    global_batch = cfg.train.batch_size
    per_replica = loop.per_replica_batch(global_batch, cluster)

    # The model first: a bad `unfreeze` or weights file must fail before any download.
    weights_file, imagenet = resolve_weights(cfg, work)
    size = tuple(cfg.data.image_size)
    with cluster.strategy.scope():
        parts = model.build(cfg.model.backbone, weights_file, size, len(layout.classes),
                            cfg.model.head_units, cfg.model.head_dropout, imagenet=imagenet)
        head_augment = (model.augmentation(recipe.augment_ops(cfg.train.head.augment), cfg.train.seed)
                        if cfg.train.head.mode == "end_to_end" else None)
        finetune_augment = model.augmentation(recipe.augment_ops(cfg.train.finetune.augment), cfg.train.seed + 100)
    if cfg.train.head.augment and cfg.train.head.mode == "cached_features":
        log.warning("train.head.augment has no effect with train.head.mode cached_features (features are "
                    "computed once from un-augmented images); use end_to_end to augment the head phase")
    unfreeze = model.check_unfreeze(parts.base, cfg.train.finetune.unfreeze, cfg.model.backbone)
    ckpt = Checkpoints(parts.model, out, work, cluster, cfg.checkpoint.keep)
    run = ckpt.fetch() if state == "incomplete" else None
    run = run or loop.new_state()

    t0 = time.monotonic()
    metrics.set_phase("staging")
    layout, root, bad = stage_and_check(cfg, layout, listing)
    timings["staging_seconds"] = round(time.monotonic() - t0, 3)

    def local(split: str) -> tuple[list[str], list[int]]:
        paths, labels = layout.items(split)
        return [str(root / p) for p in paths], labels

    train_paths, train_labels = local("train")
    val_paths, val_labels = local("validation") if "validation" in layout.files else ([], [])
    if cluster.num_workers > 1:
        # Every worker must run the same number of steps: a listing that changed between workers' starts
        # would make them disagree and hang. All fail together instead.
        differs = any(cluster.agree(float(n)) != n for n in (len(train_paths), len(val_paths)))
        if cluster.agree(float(differs)) > 0:
            raise DataError(f"the workers see different datasets under {cfg.data.uri} (did it change while the "
                            f"run started?); this worker has {len(train_paths)} training and {len(val_paths)} "
                            "validation images")
    # Each worker reads its own shard of the training files; validation is the same on every worker.
    shard = slice(cluster.worker_index, None, cluster.num_workers)
    my_paths, my_labels = train_paths[shard], train_labels[shard]

    # Decoded, resized pixels are cached on disk: images are decoded once, not every epoch (docs/BENCHMARKS.md).
    image_cache = work / "images"

    def images(paths, labels):
        return lambda ctx: dataset.image_dataset(paths, labels, size, per_replica, shuffle=True,
                                                 seed=cfg.train.seed + len(run["history"]["finetune"]), repeat=True,
                                                 cache_dir=image_cache)

    val_images = (dataset.image_dataset(val_paths, val_labels, size, 64, cache_dir=image_cache)
                  if val_paths else None)
    options = training_options(cfg, layout)

    # Phase 1: the head on the frozen base.
    head_cfg = cfg.train.head
    t0 = time.monotonic()
    head_finished = run["phase"] == "head" and run["epoch"] >= head_cfg.epochs > 0
    if head_finished:
        # Resumed from the head phase's last checkpoint: restore it (and its best epoch), no features needed.
        phase = loop.Phase("head", parts.head, None, len(train_paths), head_cfg.epochs, head_cfg.learning_rate,
                           lambda: None)
        loop.run_phase(phase, cluster, global_batch, options, ckpt, run)
    elif run["phase"] == "head":
        if head_cfg.mode == "cached_features" and head_cfg.epochs > 0:
            metrics.set_phase("head")
            # Features depend only on the frozen base and the files: a resumed run on the same pod reuses them.
            train_feats = cached_features(cfg, parts.features, my_paths, work / "features" / "train", image_cache)
            val_feats = cached_features(cfg, parts.features, val_paths, work / "features" / "validation", image_cache)
            signals.check("feature extraction")
            timings["feature_cache_seconds"] = round(time.monotonic() - t0, 3)
            phase = loop.Phase(
                "head", parts.head,
                lambda ctx: dataset.feature_dataset(train_feats, my_labels, per_replica, shuffle=True,
                                                    seed=cfg.train.seed, repeat=True),
                len(train_paths), head_cfg.epochs, head_cfg.learning_rate,
                loop.validator(parts.head, dataset.feature_dataset(val_feats, val_labels, 256) if val_paths else None),
            )
        else:
            phase = loop.Phase("head", parts.model, images(my_paths, my_labels), len(train_paths), head_cfg.epochs,
                               head_cfg.learning_rate, loop.validator(parts.model, val_images), head_augment)
        loop.run_phase(phase, cluster, global_batch, options, ckpt, run)
    timings["head_seconds"] = round(time.monotonic() - t0, 3)

    # Phase 2: fine-tune the top of the base at a low learning rate; the head carries over.
    ft = cfg.train.finetune
    t0 = time.monotonic()
    if run["phase"] in ("head", "finetune") and ft.epochs > 0 and unfreeze > 0:
        with cluster.strategy.scope():
            model.unfreeze_top(parts.base, unfreeze)
        phase = loop.Phase("finetune", parts.model, images(my_paths, my_labels), len(train_paths),
                           ft.epochs, ft.learning_rate, loop.validator(parts.model, val_images), finetune_augment)
        loop.run_phase(phase, cluster, global_batch, options, ckpt, run)
    timings["finetune_seconds"] = round(time.monotonic() - t0, 3)
    if run["phase"] == "trained":
        ckpt.restore()
    else:
        run.update(phase="trained", epoch=0, step=0)
        ckpt.save(run)  # evaluation and export can now be redone without training again
    signals.check("evaluation")

    # Evaluation on validation and test: the same on every worker; only the chief writes.
    t0 = time.monotonic()
    metrics.set_phase("evaluate")
    reports = {}
    for split in ("validation", "test"):
        if split in layout.files:
            paths, labels = local(split)
            probs, truth = loop.predict(parts.model, dataset.image_dataset(paths, labels, size, 64))
            reports[split] = evaluate.report(probs, truth, layout.classes)
    timings["evaluate_seconds"] = round(time.monotonic() - t0, 3)
    fingerprint = weights_fingerprint(parts.model)
    log.info("training done", weights_sha256=fingerprint,
             epochs={k: len(v) for k, v in run["history"].items()})
    if not cluster.is_chief:
        return {"status": "done (worker)", "artifacts": out.uri}

    signals.check("export")
    t0 = time.monotonic()
    metrics.set_phase("export")
    folder = work / "artifacts"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    export_artifacts(cfg, parts, layout, run["history"], reports, bad, folder)
    timings["export_seconds"] = round(time.monotonic() - t0, 3)
    timings["total_seconds"] = round(time.monotonic() - started, 3)

    from job import export

    export.write_manifest(folder, {
        "run_id": cfg.run_id,
        "versions": export.versions(),
        "backbone": cfg.model.backbone,
        "classes": layout.classes,
        "dataset": {"uri": cfg.data.uri, "counts": layout.counts(), "bad_images": len(bad)},
        "strategy": {"kind": cluster.kind, "replicas": cluster.replicas, "workers": cluster.num_workers,
                     "mixed_precision": cluster.mixed_precision},
        "seed": cfg.train.seed,
        "weights_sha256": fingerprint,
        "timings": timings,
    })
    export.upload(folder, out)
    headline = reports.get("test") or reports.get("validation") or {}
    return {
        "status": "complete",
        "artifacts": out.uri,
        "test_accuracy": reports.get("test", {}).get("accuracy"),
        "val_accuracy": reports.get("validation", {}).get("accuracy"),
        "accuracy": headline.get("accuracy"),
        "seconds": timings["total_seconds"],
        "s3_errors": metrics.s3_errors_total(),
    }


def training_options(cfg: Config, layout: layout_lib.Layout):
    """The loop's shared options from train.*, class weights resolved against the training counts."""
    from job import train as loop

    t = cfg.train
    try:
        weights = recipe.class_weights(t.class_weight, layout.classes, layout.counts()["train"])
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None
    if weights:
        log.info("class weights", weights=dict(zip(layout.classes, [round(w, 4) for w in weights])))
    return loop.Options(patience=t.early_stopping_patience, metric=t.early_stopping_metric,
                        label_smoothing=t.label_smoothing, weight_decay=t.weight_decay, lr_schedule=t.lr_schedule,
                        class_weights=tuple(weights) if weights else None, every_steps=cfg.checkpoint.every_steps)


def cached_features(cfg: Config, extractor, paths: list[str], stem: Path, image_cache: Path):
    """The frozen base's features of `paths`: computed once, reused by a run resumed on the same disk.

    The images are read through the image cache, which fine-tuning then reuses: one decode pass.

    The file name carries a digest of what the features depend on (files, sizes, backbone, weights,
    image size), so changed inputs never meet stale features.
    """
    if not paths:
        return None
    import numpy as np

    from job import dataset

    digest = hashlib.sha256(json.dumps([cfg.model.backbone, cfg.model.weights, list(cfg.data.image_size),
                                        [(p, os.path.getsize(p)) for p in paths]]).encode()).hexdigest()[:16]
    path = stem.with_name(f"{stem.name}-{digest}.npy")
    if path.exists():  # written under a temporary name and renamed, so it is complete
        log.info("reusing cached features", file=str(path))
        return np.load(path, mmap_mode="r")
    return dataset.extract_features(extractor, paths, tuple(cfg.data.image_size), path, cache_dir=image_cache)


def weights_fingerprint(model) -> str:
    """sha256 over all weights: equal on every worker of a multi-worker run."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(w.tobytes())
    return h.hexdigest()


def export_artifacts(cfg: Config, parts, layout: layout_lib.Layout, history: dict, reports: dict,
                     bad: list[str], folder: Path) -> None:
    """Everything of CONTRACT section 6 except the manifest and _SUCCESS, into a local folder."""
    from job import export

    classes = layout.classes
    clean = export.clean_copy(parts, cfg, classes)
    export.write_saved_model(clean, classes, tuple(cfg.data.image_size), folder / "saved_model")
    clean.save(folder / "model.keras")
    (folder / "labels.txt").write_text("\n".join(classes) + "\n")
    export.write_json(folder / "metrics.json", {**reports, "bad_images": bad})
    export.write_json(folder / "history.json", history)
    evaluate.plot_curves(history, folder / "curves.png")
    split = "test" if "test" in reports else "validation"
    if split in reports:
        evaluate.plot_confusion(reports[split]["confusion_matrix"], classes, folder / "confusion_matrix.png",
                                f"{split} confusion matrix")
    (folder / "config.yaml").write_text(to_yaml(cfg))


# ---------------------------------------------------------------- predict


def fetch_run(model_uri: str, endpoint: str = "") -> Path:
    """A complete exported run as a local folder, its files checked against the manifest."""
    from job.export import MANIFEST, SUCCESS, sha256

    store = storage.open_store(model_uri, endpoint)
    if not store.exists(SUCCESS):
        raise StorageError(f"{model_uri}: not a complete run (no {SUCCESS})")
    if isinstance(store, storage.LocalStore):
        folder = store.root
    else:
        folder = Path(tempfile.mkdtemp(prefix="finetune-job-model-"))
        wanted = [e for e in store.list() if e.rel in (MANIFEST, "labels.txt") or e.rel.startswith("saved_model/")]
        storage.stage(store, wanted, folder)
        folder = folder / store.bucket / store.prefix
    manifest = json.loads((folder / MANIFEST).read_text())
    for rel, info in manifest["files"].items():
        needed = rel.startswith("saved_model/") or rel == "labels.txt"
        if needed and (not (folder / rel).is_file() or sha256(folder / rel) != info["sha256"]):
            raise StorageError(f"{model_uri}/{rel}: does not match the manifest's checksum")
    return folder


def predict(model_uri: str, images: list[str], top_k: int, endpoint: str = "") -> list[dict]:
    """Top-k labels with probabilities for each image (local path or s3:// URI)."""
    folder = fetch_run(model_uri, endpoint)
    blobs = []
    for uri in images:
        if storage.is_s3(uri):
            parent, _, name = uri.rpartition("/")
            blobs.append(storage.open_store(parent, endpoint).read(name))
        else:
            try:
                blobs.append(Path(uri).read_bytes())
            except OSError as e:
                raise ConfigError(f"{uri}: cannot read image ({e.strerror})") from None
    import tensorflow as tf

    serve = tf.saved_model.load(str(folder / "saved_model")).signatures["serving_default"]
    labels = (folder / "labels.txt").read_text().splitlines()
    results = []
    for uri, blob in zip(images, blobs):
        try:
            probs = serve(image_bytes=tf.constant([blob]))["probabilities"].numpy()[0]
        except tf.errors.InvalidArgumentError:
            raise DataError(f"{uri}: not a decodable image") from None
        order = probs.argsort()[::-1][:top_k]
        results.append({"image": uri, "top": [{"label": labels[i], "probability": float(probs[i])} for i in order]})
    return results
