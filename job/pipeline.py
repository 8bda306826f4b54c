"""The job as stages, in the order the data flows; `train` runs them one after another:

    prepare         output state, dataset listing, strategy, model, lease, the point to resume from
    stage_data      s3:// -> local files; bad images out; every worker agrees on the dataset
    head_phase      a new head on the frozen base: on cached features, or end to end
    finetune_phase  the base unfrozen (all but BatchNormalization, or its top layers) at a low rate
    evaluate        validation and test, read through the image cache
    export          SavedModel, model.keras, reports, manifest -> storage, `_SUCCESS` last

What the stages share is one `Run`. TensorFlow is imported inside the stages only: `validate` and
`--help` never load it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job import evaluate as evaluation
from job import layout as layout_lib
from job import logs, metrics, recipe, runstate, storage
from job.config import Config, redacted, to_yaml
from job.errors import ConfigError, DataError
from job.runstate import RunState

log = logs.get()


class Timings(dict):
    """`<stage>_seconds` for the manifest, measured by one helper."""

    @contextlib.contextmanager
    def measure(self, stage: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self[f"{stage}_seconds"] = round(time.monotonic() - started, 6)  # a skipped step is not 0


@dataclass
class Run:
    """What the stages share: the config, where things are, the model and the run state."""

    cfg: Config
    out: storage.Store  # <output.uri>/<run_id>/
    layout: layout_lib.Layout
    source: Any  # job.sources.Source: where the images are, as listed
    cluster: Any  # job.distribute.Cluster
    work: Path  # this worker's local folder under data.cache_dir
    parts: Any  # job.model.Parts
    unfreeze: int  # top layers of the base the fine-tuning phase trains
    ckpt: Any  # job.checkpoint.Checkpoints
    state: RunState
    lease: Any = None  # job.lease.Lease (the chief's)
    timings: Timings = field(default_factory=Timings)
    mode: str = "copy"  # data.staging resolved: copy (local files, image cache) | stream (shards every epoch)
    local: dict[str, Path] = field(default_factory=dict)  # image key -> local file (copy mode)
    bad: dict[str, str] = field(default_factory=dict)  # image key -> why it was skipped

    @property
    def cache(self) -> Path:
        """Decoded images and the frozen base's features, side by side."""
        return self.work / "cache"

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.cfg.data.image_size)

    def count(self, split: str) -> int:
        return len(self.layout.items(split)[0]) if split in self.layout.files else 0

    def files(self, split: str) -> tuple[list[str], list[int]]:
        """Local paths and label indices of one split ([] when the split is absent; copy mode)."""
        if split not in self.layout.files:
            return [], []
        keys, labels = self.layout.items(split)
        return [str(self.local[k]) for k in keys], labels

    def _shards(self, split: str, mine: bool) -> tuple[list[str], set[str]]:
        """Stream mode: the shards holding a split's images (this worker's share when `mine`), and its keys."""
        keys = set(self.layout.items(split)[0]) if split in self.layout.files else set()
        rels = sorted({k.split(":", 1)[0] for k in keys})
        return (rels[self.cluster.worker_index::self.cluster.num_workers] if mine else rels), keys

    def images(self, split: str, batch: int, *, shuffle: bool = False, seed: int = 0, repeat: bool = False,
               mine: bool = False):
        """(image float32 0..255, label) batches of a split: from the image cache (copy), or streamed from the
        shards (stream). `mine`: only this worker's share of the images (training)."""
        from job import dataset, stream

        if self.mode == "stream":
            rels, keys = self._shards(split, mine)
            return stream.dataset(self.source.store, rels, self.layout.classes, keys, self.size, batch,
                                  shuffle=shuffle, seed=seed, repeat=repeat)
        paths, labels = self.files(split)
        if mine:
            share = slice(self.cluster.worker_index, None, self.cluster.num_workers)
            paths, labels = paths[share], labels[share]
        return dataset.image_dataset(paths, labels, self.size, batch, shuffle=shuffle, seed=seed, repeat=repeat,
                                     cache_dir=self.cache)

    def mine(self, split: str) -> int:
        """How many images of a split this worker reads (stream: the images of its shards)."""
        if self.mode != "stream":
            return len(range(self.cluster.worker_index, self.count(split), self.cluster.num_workers))
        rels, keys = self._shards(split, True)
        return sum(1 for k in keys if k.split(":", 1)[0] in set(rels))

    def identity(self, split: str, mine: bool) -> list:
        """What identifies a split's images (this worker's share when `mine`), for the feature cache's key."""
        if self.mode == "stream":
            rels, keys = self._shards(split, mine)
            etags = {e.rel: e.etag for es in self.source.shard_entries.values() for e in es}
            return [[rel, etags[rel]] for rel in rels] + sorted(keys)
        paths = self.files(split)[0]
        if mine:
            paths = paths[self.cluster.worker_index::self.cluster.num_workers]
        return [[p, os.path.getsize(p)] for p in paths]

    def pixels(self, split: str, limit: int | None = None):
        """A split as uint8 [n, h, w, 3] pixels and labels (the exported formats' check and calibration)."""
        import numpy as np

        from job import dataset

        if self.mode == "stream":
            xs, ys = [], []
            for images, labels in self.images(split, 64).take(-1 if limit is None else -(-limit // 64)):
                xs.append(np.round(images.numpy()).astype(np.uint8))
                ys.append(labels.numpy())
            if not xs:
                return np.zeros((0, *self.size, 3), np.uint8), np.zeros((0,), np.int32)
            return np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]
        paths, labels = self.files(split)
        return dataset.pixels(paths, self.size, self.cache)[:limit], np.asarray(labels[:limit], np.int32)

    @functools.cached_property
    def options(self):
        """The loop's options from train.*, class weights from the training counts (after staging)."""
        from job import loop

        t = self.cfg.train
        weights = class_weights(self.cfg, self.layout)
        if weights:
            log.info("class weights", weights=dict(zip(self.layout.classes, [round(w, 4) for w in weights])))
        return loop.Options(patience=t.early_stopping_patience, metric=t.early_stopping_metric,
                            label_smoothing=t.label_smoothing, weight_decay=t.weight_decay,
                            lr_schedule=t.lr_schedule, class_weights=tuple(weights) if weights else None,
                            every_steps=self.cfg.checkpoint.every_steps,
                            every_seconds=self.cfg.checkpoint.every_seconds)


# ---------------------------------------------------------------- before TensorFlow (validate uses these)


def read_layout(cfg: Config):
    """List the dataset once (no image downloads), check its layout, carve the validation split if needed;
    (layout, source). The source keeps the listing: staging needs its sizes and ETags, and a second listing
    of a large dataset costs a request per thousand objects. Shards carve their split after staging."""
    from job import sources

    source = sources.open_source(cfg)
    if source.kind == "shards":
        return source.layout, source
    return layout_lib.split_validation(source.layout, cfg.data.validation_split, cfg.train.seed), source


def output_state(cfg: Config) -> tuple[storage.Store, str]:
    """The run's output store and its state: 'complete', 'empty' or 'incomplete'."""
    out = storage.open_store(storage.join(cfg.output.uri, cfg.run_id), cfg.s3.endpoint_url)
    if out.exists("_SUCCESS"):
        return out, "complete"
    return out, "incomplete" if out.list() else "empty"


def validate(cfg: Config) -> dict[str, dict[str, int]]:
    """Storage access and dataset layout: what `finetune-job validate` prints. Trains nothing.
    Shards are counted from their index.json; without one they are read (labels checked on the way)."""
    from job import sources

    layout, source = read_layout(cfg)
    output_state(cfg)  # proves the output location is reachable with these credentials
    if source.kind == "shards" and not source.images():
        return sources.count_shards(source)
    return layout.counts()


# ---------------------------------------------------------------- the job


def train(cfg: Config) -> dict:
    """The whole job; returns the summary that the CLI logs last. An incomplete run resumes."""
    started = time.monotonic()
    run = prepare(cfg)
    if isinstance(run, dict):
        return run
    try:
        with run.timings.measure("staging"):
            stage_data(run)
        with run.timings.measure("head"):
            head_phase(run)
        with run.timings.measure("finetune"):
            finetune_phase(run)
        with run.timings.measure("evaluate"):
            reports = evaluate(run)
        if not run.cluster.is_chief:
            return {"status": "done (worker)", "artifacts": run.out.uri}
        return export(run, reports, started)
    finally:
        if run.lease:
            run.lease.release()


def prepare(cfg: Config) -> Run | dict:
    """Everything before the first download: a bad config, weights file or `unfreeze` fails here.

    A complete run returns its summary instead (nothing to do unless `output.overwrite`)."""
    out, state = output_state(cfg)
    if state == "complete" and not cfg.output.overwrite:
        return {"status": "already complete", "artifacts": out.uri}
    timings = Timings()
    with timings.measure("listing"):
        layout, source = read_layout(cfg)
    log.info("dataset listed", uri=cfg.data.uri, classes=len(layout.classes), counts=layout.counts())
    class_weights(cfg, layout)  # a class name that the dataset does not have fails before any work
    cluster = _start_strategy(cfg)
    work = Path(cfg.data.cache_dir) / "runs" / cfg.run_id / f"worker-{cluster.worker_index}"
    work.mkdir(parents=True, exist_ok=True)
    parts, unfreeze = _build_model(cfg, cluster, layout.classes, work)
    lease = _take_lease(cfg, out) if cluster.is_chief else None  # the first write to the output
    try:
        if state == "complete":
            # Only a complete run is redone from scratch: an incomplete one is this run's own earlier
            # attempt (a preempted or failed pod of the same Job) and resumes.
            if cluster.is_chief:
                log.warning("overwriting the complete run", artifacts=out.uri)
                out.delete([e.rel for e in out.list() if e.rel != "_LEASE"])
            state = "empty"
        from job.checkpoint import Checkpoints

        ckpt = Checkpoints(out, work, cluster, cfg.checkpoint.keep, guard=lease.check if lease else None)
        resumed = _resume_point(cfg, ckpt, state)
    except BaseException:
        if lease:
            lease.release()
        raise
    return Run(cfg, out, layout, source, cluster, work, parts, unfreeze, ckpt, resumed, lease, timings)


def _start_strategy(cfg: Config):
    from job import distribute

    cluster = distribute.setup(cfg.distribution.strategy, cfg.distribution.cpu_replicas, cfg.train.mixed_precision,
                               cfg.distribution.connect_timeout_seconds)
    logs.bind(worker=cluster.worker_index)
    log.info("strategy ready", strategy=cluster.kind, replicas=cluster.replicas, workers=cluster.num_workers,
             mixed_precision=cluster.mixed_precision)
    return cluster


def _take_lease(cfg: Config, out: storage.Store):
    from job.lease import Lease

    lease = Lease(out, cfg.run_id, cfg.checkpoint.lease_seconds)
    lease.acquire()
    return lease


def _build_model(cfg: Config, cluster, classes: list[str], work: Path):
    """The model under the strategy, seeded; (parts, number of base layers to unfreeze)."""
    import keras
    import tensorflow as tf

    from job import loop, model

    # Same seed, data and strategy on CPU -> the same weights: seeded Python/NumPy/TensorFlow generators,
    # deterministic kernels and a deterministic tf.data order. Not on GPUs, where some kernels have no
    # deterministic version (TensorFlow then raises) and the others cost speed.
    keras.utils.set_random_seed(cfg.train.seed)
    if not tf.config.list_physical_devices("GPU"):
        tf.config.experimental.enable_op_determinism()
    loop.per_replica_batch(cfg.train.batch_size, cluster)
    weights_file, imagenet = resolve_weights(cfg, work)
    with cluster.strategy.scope():
        parts = model.build(cfg.model.backbone, weights_file, tuple(cfg.data.image_size), len(classes),
                            cfg.model.head_units, cfg.model.head_dropout, imagenet=imagenet)
    return parts, model.check_unfreeze(parts.base, cfg.train.finetune.unfreeze, cfg.model.backbone)


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


def _resume_point(cfg: Config, ckpt, output: str) -> RunState:
    """The fetched checkpoint's run state if there is one and its config still fits; else a new state."""
    current = runstate.training_config(redacted(cfg))
    state = ckpt.fetch() if output == "incomplete" else None
    if state is None:
        return RunState(config=current)
    changes = runstate.config_changes(state.config, current) if state.config else ["(not recorded)"]
    if changes:
        raise ConfigError(
            f"config: run {cfg.run_id} has a checkpoint trained with another config, so resuming would mix "
            f"the two: {'; '.join(changes)}. Restore those keys, or start a new run_id "
            f"(safe to change: {', '.join(runstate.SAFE_TO_CHANGE + runstate.MAY_GROW)}; epochs only upwards)")
    state.config = current
    return state


def stage_data(run: Run) -> None:
    """Make the images readable: local files (copy) or shards read every epoch (stream); drop bad images,
    DataError past `data.max_bad_fraction`; every worker agrees on the dataset."""
    from job import signals, sources

    cfg = run.cfg
    run.mode = sources.staging_mode(run.source, cfg.data.staging, Path(cfg.data.cache_dir),
                                    run.size[0] * run.size[1] * 3)
    metrics.set_phase("staging")
    found = _survey(run) if run.mode == "stream" else _copy(run)
    signals.check("staging")
    images = run.layout.counts()
    total = sum(n for per in images.values() for n in per.values())
    run.bad = dict(sorted(found.items()))
    for key, reason in run.bad.items():
        log.warning("bad image skipped", file=image_uri(cfg, key), reason=reason)
    metrics.bad_images(len(run.bad))
    fraction = len(run.bad) / max(total, 1)
    if fraction > cfg.data.max_bad_fraction:
        example, reason = next(iter(run.bad.items()))
        raise DataError(f"{len(run.bad)} of {total} images are bad ({fraction:.1%} > data.max_bad_fraction "
                        f"{cfg.data.max_bad_fraction:.1%}), e.g. {image_uri(cfg, example)}: {reason}")
    run.layout = layout_lib.without(run.layout, set(run.bad))
    for split, per in run.layout.files.items():
        emptied = [c for c, ps in per.items() if not ps and images[split][c]]
        if emptied:
            raise DataError(f"{cfg.data.uri}/{split}/: no usable images left in {', '.join(emptied)}")
    _workers_agree_on_dataset(run)


def _copy(run: Run) -> dict[str, str]:
    """Stage every image to local disk (shards: downloaded and extracted); {key: why it is bad}."""
    from job import dataset, signals, sources

    cfg, source = run.cfg, run.source
    total = sum(map(len, source.shard_entries.values())) if source.kind == "shards" else len(source.entries)
    with logs.progress("staging", total) as advance, run.timings.measure("download"):
        run.local, layout, stats = sources.stage(source, Path(cfg.data.cache_dir), advance,
                                                 stop=lambda: signals.check("staging"))
    if source.kind == "shards":  # a sharded dataset's files are known once its shards are read
        run.layout = layout_lib.split_validation(layout, cfg.data.validation_split, cfg.train.seed)
    log.info("dataset staged", kind=source.kind, mode="copy", images=len(run.local), **stats)
    signals.check("staging")
    keys = sorted(run.local)
    with run.timings.measure("bad_image_check"):
        found = dataset.find_bad([str(run.local[k]) for k in keys], cfg.data.max_image_pixels)
    key_of = {str(run.local[k]): k for k in keys}
    return {key_of[p]: reason for p, reason in found.items()}


def _survey(run: Run) -> dict[str, str]:
    """Stream mode: one pass over every shard for the images' keys and labels and the bad ones; nothing is
    kept on disk. {key: why it is bad}."""
    from job import dataset, signals, stream

    cfg, source, classes = run.cfg, run.source, run.layout.classes
    files: dict[str, dict[str, list[str]]] = {}
    bad: dict[str, str] = {}
    with logs.progress("reading shards", sum(map(len, source.shard_entries.values()))) as advance, \
            run.timings.measure("shard_survey"):
        for split, entries in source.shard_entries.items():
            per = files.setdefault(split, {c: [] for c in classes})
            for entry in entries:
                chunk = []
                for key, image, label in stream.samples(source.store, [entry.rel], classes):
                    per[classes[label]].append(key)
                    chunk.append((key, image))
                bad |= dataset.find_bad_blobs(chunk, cfg.data.max_image_pixels)
                advance(1)
                signals.check("staging")
    layout = layout_lib.Layout(classes, {s: {c: sorted(ks) for c, ks in files[s].items()} for s in files})
    run.layout = layout_lib.split_validation(layout, cfg.data.validation_split, cfg.train.seed)
    log.info("dataset surveyed", kind="shards", mode="stream", shards=sum(map(len, source.shard_entries.values())),
             images=sum(n for per in layout.counts().values() for n in per.values()),
             training_shards_of_this_worker=run._shards("train", mine=True)[0])
    return bad


def image_uri(cfg: Config, key: str) -> str:
    """Where an image key is for the user: a URI (a shard's sample: `<shard URI>:<member>`)."""
    return key if "://" in key else storage.join(cfg.data.uri, key)


def _workers_agree_on_dataset(run: Run) -> None:
    """Every worker must run the same number of steps: a listing that changed between workers' starts
    would make them disagree and hang. One exact all-gather on every worker; all fail together."""
    counts = [run.count(split) for split in ("train", "validation", "test")]
    rows = run.cluster.gather(counts)
    if any(row != rows[0] for row in rows):
        raise DataError(f"the workers see different datasets under {run.cfg.data.uri} (did it change while the run "
                        f"started?): images per split (train, validation, test) by worker: {rows}")


def _training_batches(run: Run):
    """A dataset_fn of this worker's shuffled, repeated per-replica training batches."""
    from job import loop

    per_replica = loop.per_replica_batch(run.cfg.train.batch_size, run.cluster)
    seed = run.cfg.train.seed + len(run.state.history["finetune"])  # a resumed run does not replay its order
    return lambda ctx: run.images("train", per_replica, shuffle=True, seed=seed, repeat=True, mine=True)


def _validation_images(run: Run):
    return run.images("validation", 64) if run.count("validation") else None


def head_phase(run: Run) -> None:
    """Phase 1: the new head on the frozen base."""
    from job import dataset, loop, model, signals

    cfg, head = run.cfg, run.cfg.train.head
    if run.state.phase != "head":
        return  # resumed past it
    examples = run.count("train")
    if head.augment and head.mode == "cached_features":
        log.warning("train.head.augment has no effect with train.head.mode cached_features (features are "
                    "computed once from un-augmented images); use end_to_end to augment the head phase")
    if run.state.resumes("head") and run.state.epoch >= head.epochs:
        # Resumed after the phase's last epoch: only its best weights are to be restored, no data needed.
        phase = loop.Phase("head", run.parts.head, None, examples, head.epochs, head.learning_rate, lambda: None,
                           saved=run.parts.head)
    elif head.mode == "cached_features" and head.epochs > 0:
        metrics.set_phase("head")
        with run.timings.measure("feature_cache"):
            train_features, train_labels = _features(run, "train", mine=True)
            val_features, val_labels = _features(run, "validation", mine=False)
        signals.check("feature extraction")
        per_replica = loop.per_replica_batch(cfg.train.batch_size, run.cluster)
        phase = loop.Phase(
            "head", run.parts.head,
            lambda ctx: dataset.feature_dataset(train_features, train_labels, per_replica, shuffle=True,
                                                seed=cfg.train.seed, repeat=True),
            examples, head.epochs, head.learning_rate,
            loop.validator(run.parts.head,
                           dataset.feature_dataset(val_features, val_labels, 256) if len(val_labels) else None),
            saved=run.parts.head)
    else:
        with run.cluster.strategy.scope():
            augment = model.augmentation(recipe.augment_ops(head.augment), cfg.train.seed)
        # The base is frozen: checkpoints hold the head, the base comes from model.weights again.
        phase = loop.Phase("head", run.parts.model, _training_batches(run), examples, head.epochs,
                           head.learning_rate, loop.validator(run.parts.model, _validation_images(run)), augment,
                           saved=run.parts.head)
    loop.run_phase(phase, run.cluster, cfg.train.batch_size, run.options, run.ckpt, run.state)


def _features(run: Run, split: str, mine: bool):
    """The frozen base's features of a split (this worker's share when `mine`) and their labels, cached."""
    from job import dataset

    cfg = run.cfg
    key = [cfg.model.backbone, cfg.model.weights, list(cfg.data.image_size), split, run.identity(split, mine)]
    count = run.mine(split) if mine else run.count(split)
    return dataset.cached_features(run.parts.features, run.images(split, 64, mine=mine), count, key, run.cache)


def finetune_phase(run: Run) -> None:
    """Phase 2: the base unfrozen at a low learning rate, the head carried over; then the run is trained."""
    from job import loop, model, signals

    cfg, ft = run.cfg, run.cfg.train.finetune
    if run.state.phase in ("head", "finetune") and ft.epochs > 0 and run.unfreeze > 0:
        with run.cluster.strategy.scope():
            model.unfreeze_top(run.parts.base, run.unfreeze)
            augment = model.augmentation(recipe.augment_ops(ft.augment), cfg.train.seed + 100)
        phase = loop.Phase("finetune", run.parts.model, _training_batches(run), run.count("train"), ft.epochs,
                           ft.learning_rate, loop.validator(run.parts.model, _validation_images(run)), augment)
        loop.run_phase(phase, run.cluster, cfg.train.batch_size, run.options, run.ckpt, run.state)
    if run.state.phase == "trained":
        run.ckpt.restore(weights=run.parts.model)  # a resumed run that had finished training: its final weights
    else:
        run.state.finish()
        run.ckpt.save(run.state, weights=run.parts.model)  # evaluation and export can be redone without training
    signals.check("evaluation")


def class_weights(cfg: Config, layout: layout_lib.Layout) -> list[float] | None:
    """`train.class_weight` against the layout's training counts; ConfigError for unknown classes."""
    try:
        return recipe.class_weights(cfg.train.class_weight, layout.classes, layout.counts()["train"])
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None


def evaluate(run: Run) -> dict[str, dict]:
    """Validation and test reports, the same on every worker; images from the image cache (or the shards)."""
    from job import loop

    metrics.set_phase("evaluate")
    infer = loop.inference(run.parts.model)  # traced once for both splits
    reports = {}
    for split in ("validation", "test"):
        if run.count(split):
            probs, labels = loop.predict(run.parts.model, run.images(split, 64), infer)
            reports[split] = evaluation.report(probs, labels, run.layout.classes)
    log.info("training done", weights_sha256=weights_fingerprint(run.parts.model),
             epochs={k: len(v) for k, v in run.state.history.items()})
    return reports


def weights_fingerprint(model) -> str:
    """sha256 over all weights: equal on every worker of a multi-worker run."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(w.tobytes())
    return h.hexdigest()


def export(run: Run, reports: dict, started: float) -> dict:
    """The artifacts of CONTRACT section 6 into a local folder, then to storage with `_SUCCESS` last."""
    from job import export as export_lib
    from job import signals

    signals.check("export")
    metrics.set_phase("export")
    cfg = run.cfg
    folder = run.work / "artifacts"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with run.timings.measure("export"):
        checked = export_artifacts(run, reports, folder)
    run.timings["total_seconds"] = round(time.monotonic() - started, 3)
    strategy = {"kind": run.cluster.kind, "replicas": run.cluster.replicas, "workers": run.cluster.num_workers,
                "mixed_precision": run.cluster.mixed_precision}
    export_lib.write_manifest(folder, {
        "run_id": cfg.run_id, "versions": export_lib.versions(), "backbone": cfg.model.backbone,
        "classes": run.layout.classes, "seed": cfg.train.seed, "weights_sha256": weights_fingerprint(run.parts.model),
        "dataset": {"uri": cfg.data.uri, "counts": run.layout.counts(), "bad_images": len(run.bad)},
        "strategy": strategy, "formats": checked, "timings": dict(run.timings),
    })
    if run.lease:
        run.lease.check()
    with run.timings.measure("upload"):
        export_lib.upload(folder, run.out)
    headline = reports.get("test") or reports.get("validation") or {}
    return {"status": "complete", "artifacts": run.out.uri, "test_accuracy": reports.get("test", {}).get("accuracy"),
            "val_accuracy": reports.get("validation", {}).get("accuracy"), "accuracy": headline.get("accuracy"),
            "formats": sorted(f for f, r in checked.items() if "error" not in r),
            "seconds": run.timings["total_seconds"], "s3_errors": metrics.s3_errors_total()}


def export_artifacts(run: Run, reports: dict, folder: Path) -> dict[str, dict]:
    """Everything of CONTRACT section 6 except the manifest and _SUCCESS, into a local folder; returns each
    exported format's check (accuracy, agreement with the SavedModel, size, latency)."""
    from job import export as export_lib
    from job import model_card

    cfg, classes, history = run.cfg, run.layout.classes, run.state.history
    measure = run.timings.measure
    with measure("export_clean_copy"):
        clean = export_lib.clean_copy(run.parts, cfg, classes, run.cluster)
    with measure("export_saved_model"):
        export_lib.write_saved_model(clean, classes, run.size, folder / "saved_model")
    with measure("export_model_keras"):
        clean.save(folder / "model.keras")
    (folder / "labels.txt").write_text("\n".join(classes) + "\n")
    with measure("formats"):
        checked = _export_formats(run, clean, folder)
    with measure("export_reports"):
        bad = [{"file": image_uri(cfg, key), "reason": reason} for key, reason in run.bad.items()]
        export_lib.write_json(folder / "metrics.json", {**reports, "formats": checked, "bad_images": bad})
        export_lib.write_json(folder / "history.json", history)
        evaluation.plot_curves(history, folder / "curves.png")
        split = "test" if "test" in reports else "validation"
        if split in reports:
            evaluation.plot_confusion(reports[split]["confusion_matrix"], classes, folder / "confusion_matrix.png",
                                      f"{split} confusion matrix")
        (folder / "config.yaml").write_text(to_yaml(cfg))
        (folder / "MODEL_CARD.md").write_text(model_card.render(
            cfg.run_id, redacted(cfg), classes, run.layout.counts(), reports, checked, len(run.bad),
            export_lib.versions()))
    return checked


def _export_formats(run: Run, clean, folder: Path) -> dict[str, dict]:
    """The formats of `export.formats`, each checked on the test split (else validation) from the image cache."""
    import numpy as np

    from job import formats

    split = "test" if run.count("test") else "validation"
    pixels, labels = run.pixels(split)

    def calibration():
        """int8 calibration: up to 256 training images spread over every class."""
        if run.mode == "stream":
            yield run.pixels("train", limit=256)[0]  # the shards are shuffled across classes by pack
            return
        rows = run.pixels("train")[0]
        picked = rows[:: max(1, len(rows) // 256)][:256]
        for start in range(0, len(picked), 32):
            yield np.asarray(picked[start:start + 32])

    e = run.cfg.export
    return formats.export_all(folder, clean, run.size, run.layout.classes, e.formats, np.asarray(pixels),
                              np.asarray(labels), calibration, e.max_accuracy_drop, e.fail_on_accuracy_drop, log)
