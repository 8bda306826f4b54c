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
            self[f"{stage}_seconds"] = round(time.monotonic() - started, 3)


@dataclass
class Run:
    """What the stages share: the config, where things are, the model and the run state."""

    cfg: Config
    out: storage.Store  # <output.uri>/<run_id>/
    layout: layout_lib.Layout
    listing: list[storage.Entry]
    cluster: Any  # job.distribute.Cluster
    work: Path  # this worker's local folder under data.cache_dir
    parts: Any  # job.model.Parts
    unfreeze: int  # top layers of the base the fine-tuning phase trains
    ckpt: Any  # job.checkpoint.Checkpoints
    state: RunState
    lease: Any = None  # job.lease.Lease (the chief's)
    timings: Timings = field(default_factory=Timings)
    root: Path | None = None  # the staged dataset's local root
    bad: dict[str, str] = field(default_factory=dict)  # relative path -> why it was skipped

    @property
    def cache(self) -> Path:
        """Decoded images and the frozen base's features, side by side."""
        return self.work / "cache"

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.cfg.data.image_size)

    def files(self, split: str) -> tuple[list[str], list[int]]:
        """Local paths and label indices of one split ([] when the split is absent)."""
        if split not in self.layout.files:
            return [], []
        paths, labels = self.layout.items(split)
        return [str(self.root / p) for p in paths], labels

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
                            every_steps=self.cfg.checkpoint.every_steps)

    def my_training_files(self) -> tuple[list[str], list[int]]:
        """This worker's share of the training files (every worker reads different ones)."""
        paths, labels = self.files("train")
        shard = slice(self.cluster.worker_index, None, self.cluster.num_workers)
        return paths[shard], labels[shard]


# ---------------------------------------------------------------- before TensorFlow (validate uses these)


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
    layout, listing = read_layout(cfg)
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

        ckpt = Checkpoints(parts.model, out, work, cluster, cfg.checkpoint.keep,
                           guard=lease.check if lease else None)
        resumed = _resume_point(cfg, ckpt, state)
    except BaseException:
        if lease:
            lease.release()
        raise
    return Run(cfg, out, layout, listing, cluster, work, parts, unfreeze, ckpt, resumed, lease)


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
    # deterministic kernels and a deterministic tf.data order.
    keras.utils.set_random_seed(cfg.train.seed)
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
    """Download the dataset to the cache, drop bad images; DataError past `data.max_bad_fraction`."""
    from job import dataset, signals

    cfg = run.cfg
    store = storage.open_store(cfg.data.uri, cfg.s3.endpoint_url)
    wanted = {p for per in run.layout.files.values() for ps in per.values() for p in ps}
    entries = [e for e in run.listing if e.rel in wanted]
    metrics.set_phase("staging")
    with logs.progress("staging", len(entries)) as advance:
        run.root, stats = storage.stage(store, entries, Path(cfg.data.cache_dir), advance,
                                        stop=lambda: signals.check("staging"))
    log.info("dataset staged", root=str(run.root), **stats)
    signals.check("staging")
    found = dataset.find_bad([str(run.root / p) for p in sorted(wanted)], cfg.data.max_image_pixels)
    run.bad = {str(Path(p).relative_to(run.root)): reason for p, reason in sorted(found.items())}
    for rel, reason in run.bad.items():
        log.warning("bad image skipped", file=storage.join(cfg.data.uri, rel), reason=reason)
    metrics.bad_images(len(run.bad))
    fraction = len(run.bad) / max(len(wanted), 1)
    if fraction > cfg.data.max_bad_fraction:
        example, reason = next(iter(run.bad.items()))
        raise DataError(f"{len(run.bad)} of {len(wanted)} images are bad ({fraction:.1%} > data.max_bad_fraction "
                        f"{cfg.data.max_bad_fraction:.1%}), e.g. {storage.join(cfg.data.uri, example)}: {reason}")
    run.layout = layout_lib.without(run.layout, set(run.bad))
    for split, per in run.layout.files.items():
        empty = [c for c, ps in per.items() if not ps]
        if empty:
            raise DataError(f"{cfg.data.uri}/{split}/: no usable images left in {', '.join(empty)}")
    _workers_agree_on_dataset(run)


def _workers_agree_on_dataset(run: Run) -> None:
    """Every worker must run the same number of steps: a listing that changed between workers' starts
    would make them disagree and hang. One exact all-gather on every worker; all fail together."""
    counts = [len(run.files(split)[0]) for split in ("train", "validation", "test")]
    rows = run.cluster.gather(counts)
    if any(row != rows[0] for row in rows):
        raise DataError(f"the workers see different datasets under {run.cfg.data.uri} (did it change while the run "
                        f"started?): images per split (train, validation, test) by worker: {rows}")


def _image_batches(run: Run, paths: list[str], labels: list[int]):
    """A dataset_fn of shuffled, repeated per-replica batches from the image cache."""
    from job import dataset, loop

    per_replica = loop.per_replica_batch(run.cfg.train.batch_size, run.cluster)
    seed = run.cfg.train.seed + len(run.state.history["finetune"])  # a resumed run does not replay its order
    return lambda ctx: dataset.image_dataset(paths, labels, run.size, per_replica, shuffle=True, seed=seed,
                                             repeat=True, cache_dir=run.cache)


def _validation_images(run: Run):
    from job import dataset

    paths, labels = run.files("validation")
    return dataset.image_dataset(paths, labels, run.size, 64, cache_dir=run.cache) if paths else None


def head_phase(run: Run) -> None:
    """Phase 1: the new head on the frozen base."""
    from job import dataset, loop, model, signals

    cfg, head = run.cfg, run.cfg.train.head
    if run.state.phase != "head":
        return  # resumed past it
    paths, labels = run.my_training_files()
    examples = len(run.files("train")[0])
    if head.augment and head.mode == "cached_features":
        log.warning("train.head.augment has no effect with train.head.mode cached_features (features are "
                    "computed once from un-augmented images); use end_to_end to augment the head phase")
    if run.state.resumes("head") and run.state.epoch >= head.epochs:
        # Resumed after the phase's last epoch: only its best weights are to be restored, no data needed.
        phase = loop.Phase("head", run.parts.head, None, examples, head.epochs, head.learning_rate, lambda: None)
    elif head.mode == "cached_features" and head.epochs > 0:
        metrics.set_phase("head")
        key = [cfg.model.backbone, cfg.model.weights, list(cfg.data.image_size)]
        with run.timings.measure("feature_cache"):
            train_features = dataset.cached_features(run.parts.features, paths, key, run.cache, run.cache)
            val_paths, val_labels = run.files("validation")
            val_features = dataset.cached_features(run.parts.features, val_paths, key, run.cache, run.cache)
        signals.check("feature extraction")
        per_replica = loop.per_replica_batch(cfg.train.batch_size, run.cluster)
        phase = loop.Phase(
            "head", run.parts.head,
            lambda ctx: dataset.feature_dataset(train_features, labels, per_replica, shuffle=True, seed=cfg.train.seed,
                                                repeat=True),
            examples, head.epochs, head.learning_rate,
            loop.validator(run.parts.head,
                           dataset.feature_dataset(val_features, val_labels, 256) if val_paths else None))
    else:
        with run.cluster.strategy.scope():
            augment = model.augmentation(recipe.augment_ops(head.augment), cfg.train.seed)
        phase = loop.Phase("head", run.parts.model, _image_batches(run, paths, labels), examples, head.epochs,
                           head.learning_rate, loop.validator(run.parts.model, _validation_images(run)), augment)
    loop.run_phase(phase, run.cluster, cfg.train.batch_size, run.options, run.ckpt, run.state)


def finetune_phase(run: Run) -> None:
    """Phase 2: the base unfrozen at a low learning rate, the head carried over; then the run is trained."""
    from job import loop, model, signals

    cfg, ft = run.cfg, run.cfg.train.finetune
    if run.state.phase in ("head", "finetune") and ft.epochs > 0 and run.unfreeze > 0:
        paths, labels = run.my_training_files()
        with run.cluster.strategy.scope():
            model.unfreeze_top(run.parts.base, run.unfreeze)
            augment = model.augmentation(recipe.augment_ops(ft.augment), cfg.train.seed + 100)
        phase = loop.Phase("finetune", run.parts.model, _image_batches(run, paths, labels), len(run.files("train")[0]),
                           ft.epochs, ft.learning_rate, loop.validator(run.parts.model, _validation_images(run)),
                           augment)
        loop.run_phase(phase, run.cluster, cfg.train.batch_size, run.options, run.ckpt, run.state)
    if run.state.phase == "trained":
        run.ckpt.restore()  # a resumed run that had finished training: its final weights
    else:
        run.state.finish()
        run.ckpt.save(run.state)  # evaluation and export can now be redone without training again
    signals.check("evaluation")


def class_weights(cfg: Config, layout: layout_lib.Layout) -> list[float] | None:
    """`train.class_weight` against the layout's training counts; ConfigError for unknown classes."""
    try:
        return recipe.class_weights(cfg.train.class_weight, layout.classes, layout.counts()["train"])
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None


def evaluate(run: Run) -> dict[str, dict]:
    """Validation and test reports, the same on every worker; images come from the image cache."""
    from job import dataset, loop

    metrics.set_phase("evaluate")
    infer = loop.inference(run.parts.model)  # traced once for both splits
    reports = {}
    for split in ("validation", "test"):
        paths, labels = run.files(split)
        if paths:
            batches = dataset.image_dataset(paths, labels, run.size, 64, cache_dir=run.cache)
            reports[split] = evaluation.report(*loop.predict(run.parts.model, batches, infer), run.layout.classes)
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
        export_artifacts(run, reports, folder)
    run.timings["total_seconds"] = round(time.monotonic() - started, 3)
    strategy = {"kind": run.cluster.kind, "replicas": run.cluster.replicas, "workers": run.cluster.num_workers,
                "mixed_precision": run.cluster.mixed_precision}
    export_lib.write_manifest(folder, {
        "run_id": cfg.run_id, "versions": export_lib.versions(), "backbone": cfg.model.backbone,
        "classes": run.layout.classes, "seed": cfg.train.seed, "weights_sha256": weights_fingerprint(run.parts.model),
        "dataset": {"uri": cfg.data.uri, "counts": run.layout.counts(), "bad_images": len(run.bad)},
        "strategy": strategy, "timings": dict(run.timings),
    })
    if run.lease:
        run.lease.check()
    export_lib.upload(folder, run.out)
    headline = reports.get("test") or reports.get("validation") or {}
    return {"status": "complete", "artifacts": run.out.uri, "test_accuracy": reports.get("test", {}).get("accuracy"),
            "val_accuracy": reports.get("validation", {}).get("accuracy"), "accuracy": headline.get("accuracy"),
            "seconds": run.timings["total_seconds"], "s3_errors": metrics.s3_errors_total()}


def export_artifacts(run: Run, reports: dict, folder: Path) -> None:
    """Everything of CONTRACT section 6 except the manifest and _SUCCESS, into a local folder."""
    from job import export as export_lib

    cfg, classes, history = run.cfg, run.layout.classes, run.state.history
    clean = export_lib.clean_copy(run.parts, cfg, classes)
    export_lib.write_saved_model(clean, classes, run.size, folder / "saved_model")
    clean.save(folder / "model.keras")
    (folder / "labels.txt").write_text("\n".join(classes) + "\n")
    bad = [{"file": storage.join(cfg.data.uri, rel), "reason": reason} for rel, reason in run.bad.items()]
    export_lib.write_json(folder / "metrics.json", {**reports, "bad_images": bad})
    export_lib.write_json(folder / "history.json", history)
    evaluation.plot_curves(history, folder / "curves.png")
    split = "test" if "test" in reports else "validation"
    if split in reports:
        evaluation.plot_confusion(reports[split]["confusion_matrix"], classes, folder / "confusion_matrix.png",
                                  f"{split} confusion matrix")
    (folder / "config.yaml").write_text(to_yaml(cfg))
