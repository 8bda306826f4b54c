"""The job as stages, in the order the data flows; `train` runs them one after another:

    prepare         output state, dataset listing, strategy, model, lease, the point to resume from
    stage_data      s3:// -> local files, or shards streamed; bad images out; every worker agrees on the dataset
    head_phase      a new head on the frozen base: on cached features, or end to end
    finetune_phase  the base unfrozen (all but BatchNormalization, or its top layers) at a low rate
    evaluate_splits validation and test (the splits that have images), read through the image cache
    export_run      the artifacts (job/export.py) -> storage, `_SUCCESS` last

What the stages share is one `Run`; the staged dataset on it (`run.data`, job/readers.py) is copied or
streamed, decided once in `stage_data`. TensorFlow is imported inside the stages only: `validate` and
`--help` never load it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job import distribute, evaluate, katib, layout, logs, metrics, recipe, runstate, storage
from job.config import Config, redacted
from job.errors import ConfigError, DataError, JobError, StorageError
from job.readers import Reader, image_uri
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
    """What the stages share: the config, where things are, the model and the run state; after staging, the
    staged dataset (`data`, set once by `stage_data`)."""

    cfg: Config
    out: storage.Store  # <output.uri>/<run_id>/
    listed: layout.Layout  # as listed, before staging: the classes, and the counts that a listing tells
    source: Any  # job.sources.Source: where the images are, as listed
    cluster: Any  # job.distribute.Cluster
    work: Path  # this worker's local folder under data.cache_dir
    parts: Any  # job.model.Parts
    unfreeze: int  # top layers of the base the fine-tuning phase trains
    ckpt: Any  # job.checkpoint.Checkpoints
    state: RunState
    lease: Any = None  # job.lease.Lease (the chief's)
    timings: Timings = field(default_factory=Timings)
    staging: str = "copy"  # data.staging resolved once in `prepare`: copy | stream
    data: Reader | None = None  # the staged dataset, copied or streamed (job/readers.py): set by `stage_data`
    identical: dict = field(default_factory=dict)  # byte-identical images (`_warn_identical`), for manifest.json
    thresholds: list[dict] | None = None  # multi-label: each label's decision threshold (`evaluate_splits`)
    board: Any = None  # job.tensorboard.Board: the chief's event files
    misclassified: tuple = ()  # (uint8 images, captions) of wrong test predictions, for TensorBoard
    initial: list | None = None  # train.refit: the model's variables as built, where the refit starts again
    # where this attempt resumed an earlier one's checkpoint (`_resumed_from`), {} when it started afresh:
    # manifest.json's timings are this attempt's
    resumed_from: dict = field(default_factory=dict)

    @property
    def cache(self) -> Path:
        """Decoded images and the frozen base's features, side by side."""
        return self.work / "cache"

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.cfg.data.image_size)

    @property
    def share(self) -> tuple[int, int]:
        """This worker's part of the training images: (its index, the number of workers)."""
        return self.cluster.worker_index, self.cluster.num_workers

    @property
    def classes(self) -> list[str]:
        return self.listed.classes

    @property
    def multi(self) -> bool:
        """task: multi_label (sigmoid scores, per-label thresholds)."""
        return self.cfg.task == "multi_label"

    @functools.cached_property
    def options(self):
        """The loop's options from train.*, class weights from the training counts (after staging)."""
        from job import loop

        t = self.cfg.train
        weights = class_weights(self.cfg, self.data.layout)
        if weights:
            log.info("positive weights" if self.multi else "class weights",
                     weights=dict(zip(self.classes, [round(w, 4) for w in weights])))
        return loop.Options(patience=t.early_stopping_patience, metric=t.early_stopping_metric,
                            label_smoothing=t.label_smoothing, weight_decay=t.weight_decay,
                            lr_schedule=t.lr_schedule, class_weights=tuple(weights) if weights else None,
                            multi_label=self.multi,
                            every_steps=self.cfg.checkpoint.every_steps,
                            every_seconds=self.cfg.checkpoint.every_seconds,
                            metrics_file=self.cfg.metrics.file)


# ---------------------------------------------------------------- before TensorFlow (validate uses these)


def read_listing(cfg: Config):
    """List the dataset once (no image downloads) and check its layout: the source, which keeps the listing
    (staging needs its sizes and ETags, and a second listing of a large dataset costs a request per thousand
    objects). Its layout is as listed: the validation split is carved when the data is staged."""
    from job import sources

    return sources.open_source(cfg)


def run_store(cfg: Config) -> storage.Store:
    """The run's folder in storage: `<output.uri>/<run_id>`."""
    return storage.open_store(storage.join(cfg.output.uri, cfg.run_id), cfg.s3.endpoint_url)


def output_state(cfg: Config) -> tuple[storage.Store, str]:
    """The run's output store and its state: 'complete', 'empty' or 'incomplete'."""
    out = run_store(cfg)
    if out.exists("_SUCCESS"):
        return out, "complete"
    return out, "incomplete" if out.list() else "empty"


def validate(cfg: Config):
    """Storage access and dataset layout: what `finetune-job validate` prints (the layout, validation carved).
    Trains nothing. The checks of `train` that need no image: the layout, the staging mode and the shards for
    the workers. Shards are counted from their index.json; without one (or multi-label: each image's labels
    are in the shards) they are read, checked as training reads them."""
    from job import readers

    source = read_listing(cfg)
    known_bad = _bad_in_listing(cfg, source) if source.kind != "shards" else set()
    out, state = output_state(cfg)  # proves the output location is reachable with these credentials
    if state == "complete" and not cfg.output.overwrite:  # validate said ok, and train then did nothing
        log.warning(f"run {cfg.run_id} is complete in {out.uri}: train will end 'already complete' and train "
                    "nothing; choose another run_id, or set output.overwrite to redo it")
    check_weights(cfg)
    katib.check_path(cfg.metrics.file)  # what train refuses anywhere (validate said ok); no write here
    replicas = cfg.distribution.cpu_replicas
    if replicas > 1 and cfg.train.batch_size % replicas:
        log.warning(f"train.batch_size {cfg.train.batch_size} is not divisible by distribution.cpu_replicas "
                    f"{replicas}: train refuses it on a machine without GPUs")
    try:
        distribute.check_strategy(cfg.distribution.strategy)
    except ConfigError as e:  # the chart sets TF_CONFIG in the Job's pods only (its `helm test` validates without it)
        log.warning(f"{e} (train refuses it)", tf_config=bool(os.environ.get("TF_CONFIG")))
    _check_class_weight(cfg, source)
    _staging(cfg, source)
    if source.kind == "shards" and (not source.image_count() or source.layout.multi_label):
        how = readers.Staging(Path(cfg.data.cache_dir), Path(cfg.data.cache_dir), tuple(cfg.data.image_size))
        layout = readers.create(source, "stream", how).settle(cfg.data.validation_split, cfg.train.seed).layout
        class_weights(cfg, layout)  # multi-label shards: the labels are known once read
    else:  # the images it knows training will skip are left out, and refused, as train settles them (`Reader.settle`)
        layout = readers.settled(source.layout, known_bad, cfg.data.uri, cfg.data.validation_split, cfg.train.seed)
    _check_val_map(cfg, layout)
    _warn_carved_share(cfg, source.layout, layout)  # train said it, validate did not
    return layout


def batch_over_images(cfg: Config, listed) -> str:
    """A warning when train.batch_size exceeds the training images: an epoch is whole batches, so each step repeats
    images (48 images at batch 64: one step of 64, 16 of them twice), or "" when it does not."""
    n = listed.count("train")
    if cfg.train.batch_size <= n:
        return ""
    return (f"train.batch_size {cfg.train.batch_size} is more than the {n} training images: every step repeats "
            "images (an epoch is whole batches)")


def listed_counts(source) -> dict | str:
    """The images per split and class as listed; shards without index.json (or multi-label ones: their labels) are
    counted only once read, where the listing said 0 of each."""
    if source.kind == "shards" and (source.layout.multi_label or not source.image_count()):
        return "known once the shards are read (staging)"
    return source.layout.counts()


def complete_run(cfg: Config, found: tuple[storage.Store, str] | None = None) -> dict | None:
    """The summary of a run that is complete with nothing to do (its `_SUCCESS` there, no `output.overwrite`), else
    None (`found`: output_state's answer, when known). Its final Katib line is written again from its metrics.json: a
    trial pod started again after the upload (evicted, retried) wrote none, and Katib failed the complete trial for
    want of its objective."""
    import json

    from job.distribute import tf_config_workers

    out, state = found or output_state(cfg)
    if state != "complete" or cfg.output.overwrite:
        return None
    _warn_other_config(cfg, out)
    _warn_missing_formats(cfg, out)
    _warn_other_dataset(cfg, out)
    if cfg.metrics.file:
        katib.check_writable(cfg.metrics.file)
        try:
            reports = json.loads(out.read("metrics.json"))
            if not isinstance(reports, dict) or not all(isinstance(reports.get(split, {}), dict)
                                                        for split, _ in katib.SPLITS):
                raise ValueError("not a mapping of splits to their scores")
        except ValueError as e:  # (exit 1 with a traceback)
            raise StorageError(f"{out.uri}/metrics.json: the complete run's metrics are not JSON of its splits ({e}), "
                               "so metrics.file gets none; repair or delete the run (output.overwrite)") from None
        katib.run_done(cfg.metrics.file, reports, chief=tf_config_workers()[0] == 0)
    return {"status": "already complete", "artifacts": out.uri}


def _warn_unused(cfg: Config) -> None:
    """Fine-tuning keys set for a run that cannot use them, said: they were dropped without a word, and the model
    card claimed a rate decay that never ran. From scratch one phase trains every layer, BatchNormalization
    included (no moving average: its statistics would not match; no base to keep; no search); without fine-tuning
    epochs, nothing of the fine-tuning applies."""
    ft, search_set = cfg.train.finetune, "learning_rates" in cfg.train.search.model_fields_set
    if cfg.model.weights == "none":
        why = "model.weights is none: one phase trains every layer from scratch at train.head.learning_rate"
    elif ft.epochs == 0:
        why = "train.finetune.epochs is 0: no fine-tuning"
    else:
        return
    unused = [key for key, used in (("train.search.learning_rates", search_set and len(cfg.train.search.learning_rates)
                                     > 1), ("train.finetune.average_epochs", ft.average_epochs > 0),
                                    ("train.finetune.layer_decay", ft.layer_decay < 1.0),
                                    ("train.finetune.augment", bool(ft.augment) and cfg.model.weights != "none"))
              if used]  # (from scratch the one phase augments as train.finetune.augment says)
    if unused:
        log.warning(f"{', '.join(unused)} ignored: {why}")


def _warn_other_config(cfg: Config, out: storage.Store) -> None:
    """A complete run is not redone; when its config.yaml differs from this config in what trains a model, say so
    (a changed recipe ended "already complete" without a word)."""
    import yaml

    try:
        stored = yaml.safe_load(out.read("config.yaml"))
    except Exception:  # noqa: BLE001 (an older run without one, or unreadable: nothing to compare)
        return
    if not isinstance(stored, dict):
        return
    changes = runstate.config_changes(runstate.training_config(stored), runstate.training_config(redacted(cfg)),
                                      grow=False)  # epochs grown too: nothing trains a complete run again
    if changes:
        log.warning(f"run {cfg.run_id} is complete, trained with another config, and is not redone: set "
                    "output.overwrite to train it again with this one, or choose another run_id", changes=changes)


def _warn_missing_formats(cfg: Config, out: storage.Store) -> None:
    """A complete run asked for a format it was not exported as (or whose export failed) ended exit 0 without it
    and without a word: say so, and how to export it."""
    import json

    from job.formats import DEFAULT_FORMATS

    try:
        formats = json.loads(out.read("manifest.json")).get("formats") or {}
    except Exception:  # noqa: BLE001 (an older run, or unreadable: nothing to compare)
        return
    has = {f for f, r in formats.items() if isinstance(r, dict) and "error" not in r}
    missing = [f for f in (DEFAULT_FORMATS if cfg.export.formats is None else cfg.export.formats) if f not in has]
    if missing:
        log.warning(f"run {cfg.run_id} is complete and not exported again, and it has no {', '.join(missing)}: "
                    "delete its _SUCCESS to export it again from its trained checkpoint (no training), or choose "
                    "another run_id", has=sorted(has))


def _warn_other_dataset(cfg: Config, out: storage.Store) -> None:
    """A complete run asked again after its dataset changed (a class or images added, relabelled) ended "already
    complete" without a word, its model blind to the change: say so, from the listing's fingerprint that
    manifest.json keeps (an older run has none: nothing to compare). A dataset that does not list now is not this
    rerun's business (the run is complete): said, without failing."""
    import json

    try:
        manifest = json.loads(out.read("manifest.json"))
        kept = manifest["dataset"]["fingerprint"]
    except Exception:  # noqa: BLE001 (an older run, or unreadable: nothing to compare)
        return
    if not isinstance(kept, str) or not kept:
        return
    try:
        source = read_listing(cfg)
    except JobError as e:
        log.warning(f"run {cfg.run_id} is complete; its dataset could not be listed to compare", reason=str(e))
        return
    if source.fingerprint() == kept:
        return
    trained = manifest.get("classes") if isinstance(manifest.get("classes"), list) else []
    now = source.layout.classes
    changes = {k: v for k, v in (("classes_added", [c for c in now if c not in trained]),
                                  ("classes_removed", [c for c in trained if c not in now])) if v}
    log.warning(f"run {cfg.run_id} is complete, trained on the dataset under {cfg.data.uri} as it was, and is not "
                "redone: it changed since (images added, removed, rewritten or relabelled); set output.overwrite "
                "to train it again on the dataset as it is now, or choose another run_id", **changes)


def _own_files(out: storage.Store) -> list[str]:
    """What overwriting the run deletes: every file of its folder but the lease. ConfigError when a complete run
    lies below it (an output.uri set inside this run's folder): its files went with this run's, without a word."""
    files = [e.rel for e in out.list() if e.rel != "_LEASE"]
    nested = sorted(rel.rpartition("/")[0] for rel in files if rel.endswith("/_SUCCESS"))
    if nested:
        raise ConfigError(f"config: output.overwrite: {out.uri} holds another complete run below it "
                          f"({storage.join(out.uri, nested[0])}), which overwriting would delete; move it, or choose "
                          "another run_id")
    return files


def _check_val_map(cfg: Config, listed) -> None:
    """DataError when early stopping (and train.search) would compare val_map over validation images that carry no
    label: it is undefined (NaN) on every epoch, so the first epoch was kept without a word."""
    images = listed.count("validation")
    if cfg.train.early_stopping_metric == "val_map" and images and not sum(listed.counts()["validation"].values()):
        raise DataError(f"the {images} validation image(s) carry no label, so val_map (train.early_stopping_metric) "
                        "is undefined: use val_loss, or validation images that carry labels")


BMP_CHECKED = 1000  # at most this many BMPs' and GIFs' first bytes does validate read (ranged GETs, 16 at a time)


def _bad_in_listing(cfg: Config, source) -> set[str]:
    """validate downloads no image, but the listing gives each image's size, and it reads the first bytes of the
    BMPs and GIFs it lists (up to BMP_CHECKED, a seeded sample beyond): an empty file, a BMP whose colour table or
    masks TensorFlow's decoder ignores (headers.PALETTE_BMP) and a GIF whose frame it crops (headers.PARTIAL_GIF) are
    bad images to `train`, so they are warned about here,
    and past `data.max_bad_fraction` refused as `train` would refuse them after staging. Returns their keys (the
    table leaves them out: it counted them, and train did not)."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    from job import headers

    # A local broken link is listed with size 0 and no modification time: train says it cannot be read.
    empty = {k: headers.EMPTY if entry.etag else headers.UNREADABLE for k, (_, entry) in source.entries.items()
             if entry.size == 0}
    bmps = sorted(k for k in source.entries if k.lower().endswith((".bmp", ".gif")) and k not in empty)
    checked = random.Random(0).sample(bmps, min(len(bmps), BMP_CHECKED))

    def why(key: str) -> str:
        store, entry = source.entries[key]
        if entry.size < 26:  # no BMP or GIF header (train counts it undecodable)
            return ""
        return headers.misread(store.read(entry.rel, head=headers.BMP_HEAD_BYTES))

    with ThreadPoolExecutor(16) as pool:
        misread = {k: w for k, w in zip(checked, pool.map(why, checked)) if w}
    bad, total = empty | misread, source.image_count()
    known = bad if len(checked) == len(bmps) else empty  # a sample of the BMPs tells no total
    if known and len(known) / max(total, 1) > cfg.data.max_bad_fraction:
        example, reason = min(known.items())
        raise DataError(f"{len(known)} of {total} images are bad ({len(known) / total:.1%} > data.max_bad_fraction "
                        f"{cfg.data.max_bad_fraction:.1%}), e.g. {image_uri(cfg.data.uri, example)}: {reason}")
    if empty:
        log.warning("empty or unreadable images that training will skip as bad images", count=len(empty),
                    examples=[f"{image_uri(cfg.data.uri, k)}: {why}" for k, why in sorted(empty.items())[:5]])
    if misread:
        reason = misread[min(misread)]
        log.warning(f"BMPs or GIFs that training will skip as bad images: {reason}", count=len(misread),
                    checked=len(checked), bmps_and_gifs=len(bmps),
                    examples=[image_uri(cfg.data.uri, k) for k in sorted(misread)[:5]])
    return set(bad)


def _warn_carved_share(cfg: Config, listed, settled) -> None:
    """A carved validation split far larger than data.validation_split (each class of two images or more gives one
    at least: 0.01 of 300 classes of 3 images took a third of them), said: it was not, nor documented."""
    carved, train = settled.count("validation"), settled.count("train")
    # carved: every validation image is a listed training image (a listed validation/ whose images were all bad is
    # carved too)
    if not carved or not set(settled.items("validation")[0]) <= set(listed.items("train")[0]):
        return
    share, asked = carved / (carved + train), cfg.data.validation_split
    if share > 2 * asked and share - asked > 0.05:
        log.warning(f"the carved validation split holds {share:.0%} of the training images, not the "
                    f"{asked:.0%} of data.validation_split: each class of two images or more gives one at least; add "
                    "images, or a validation/ folder", validation=carved, train=train)


def unmeasured(listed) -> list[tuple[str, str, list[str]]]:
    """(message, split, classes) for each validation or test split that has no image of some class (multi-label:
    none carrying some label): its scores do not measure them. `train` logs them, `validate` prints them."""
    out = []
    images = {split: listed.count(split) for split in listed.splits}
    for split, missing in layout.unmeasured(listed.counts(), listed.classes, images).items():
        what = f"carrying {len(missing)} label(s)" if listed.multi_label else f"of {len(missing)} class(es)"
        out.append((f"no {split} images {what}: the {split} scores do not measure them"
                    + (" (nor early stopping and train.search)" if split == "validation" else ""), split, missing))
    return out


def _check_class_weight(cfg: Config, source) -> None:
    """A class name in `train.class_weight` that the dataset lacks fails before any work, in `train` and
    `validate` alike (multi-label shards: once their labels are read)."""
    if not source.layout.multi_label or source.kind != "shards":
        class_weights(cfg, source.layout)


# ---------------------------------------------------------------- the job


def train(cfg: Config) -> dict:
    """The whole job; returns the summary that the CLI logs last. An incomplete run resumes."""
    started = time.monotonic()
    run = prepare(cfg)
    if isinstance(run, dict):
        return run
    try:
        _replay_metrics(run)
        if run.cluster.is_chief:
            from job.tensorboard import Board

            run.board = Board(run.work, run.out)
            run.board.start(run.state.history)  # a resumed run: its curves so far, in fresh files
        with run.timings.measure("staging"):
            stage_data(run)
        with run.timings.measure("head"):
            head_phase(run)
        with run.timings.measure("finetune"):
            finetune_phase(run)
        with run.timings.measure("refit"):
            refit_phases(run)
        end_training(run)
        with run.timings.measure("evaluate"):
            reports = evaluate_splits(run)
        if not run.cluster.is_chief:
            _drop_local_copies(run)
            _meet_at_the_end(run)
            return {"status": "done (worker)", "artifacts": run.out.uri}
        summary = export_run(run, reports, started)
        _drop_local_copies(run)
        _meet_at_the_end(run)
        return summary
    finally:
        try:
            if run.board:
                _close_board(run.board, failing=sys.exc_info()[1] is not None)
        finally:
            if run.lease:
                run.lease.release()


def _meet_at_the_end(run: Run) -> None:
    """The other workers wait for the chief's export in one collective: they exited 0 as it began, the chief's log
    then said "The tasks have crashed" of every successful run, and a chief stopped in its export could never resume
    (its rerun waited for workers that had finished, exit 137). A chief that fails there fails them too (exit 1)."""
    if run.cluster.num_workers < 2:
        return
    if not run.cluster.is_chief:
        log.info("waiting for the chief's export")
        run.cluster.gather([0])
        return
    try:
        run.cluster.gather([0])
    except Exception as e:  # noqa: BLE001 - the run is complete (_SUCCESS written): a worker lost now changes nothing
        log.warning("a worker was lost after the export; the run is complete", reason=str(e).strip()[:200])


def _close_board(board, failing: bool) -> None:
    """The event files copied to storage on every exit, SIGTERM included. When the run is failing already, a failure
    to copy them is a warning: storage gone away during staging was reported as the event file's upload."""
    try:
        board.close()
    except Exception as e:  # noqa: BLE001 (a full disk fails the events' flush with TensorFlow's own error)
        if not failing:
            raise
        log.warning("tensorboard event files not copied to storage", reason=str(e).strip().splitlines()[0][:300]
                    if str(e).strip() else type(e).__name__)


def prepare(cfg: Config) -> Run | dict:
    """Everything before the first download: a bad config, weights file or `unfreeze` fails here.

    A complete run returns its summary instead (nothing to do unless `output.overwrite`)."""
    out, state = output_state(cfg)
    done = complete_run(cfg, (out, state))
    if done:
        return done
    timings = Timings()
    with timings.measure("listing"):
        source = read_listing(cfg)
    log.info("dataset listed", uri=cfg.data.uri, classes=len(source.layout.classes), counts=listed_counts(source))
    _check_class_weight(cfg, source)
    check_weights(cfg)
    _warn_unused(cfg)
    katib.check_writable(cfg.metrics.file)
    staging = _staging(cfg, source)
    doomed = _own_files(out) if state == "complete" else []  # refused on every worker, before they meet
    # TensorFlow loads here (3 to 4 s of CPU), after what storage and the listing can refuse: a missing train/
    # folder or a class name the data lacks fails within a second, a rerun of a complete run ends as fast, and
    # storage that cannot be reached fails once its retries are spent, without the import.
    logs.quiet_tensorflow()
    cluster = _start_strategy(cfg)
    work = _work_folder(cfg) / f"worker-{cluster.worker_index}"
    work.mkdir(parents=True, exist_ok=True)
    parts, unfreeze = _build_model(cfg, cluster, source.layout.classes, work)
    if state != "incomplete":  # no checkpoint to resume: refused before the lease, and before an overwrite deletes
        _unfreeze_trains_something(cfg, parts, unfreeze, {})  # the complete run (it did, then refused the config)
    lease, refused = None, None
    if cluster.is_chief:
        try:
            lease = _take_lease(cfg, out)  # the first write to the output
        except StorageError as e:  # (a live attempt's, an output that denies writes): told the others, then raised
            refused = e
    if refused is None:
        metrics.owned()  # the chief holds the run now (the other workers' groups are their own)
    try:
        if _completed_meanwhile(cfg, out, state, lease, cluster, refused):
            if lease:
                lease.release()
            if cluster.is_chief:
                log.warning(f"run {cfg.run_id} was completed by another attempt while this one waited for its lease")
            return complete_run(cfg, (out, "complete"))
        if state == "complete":
            # Only a complete run is redone from scratch: an incomplete one is this run's own earlier
            # attempt (a preempted or failed pod of the same Job) and resumes.
            if cluster.is_chief:
                log.warning("overwriting the complete run", artifacts=out.uri)
                out.delete(doomed)
                if isinstance(out, storage.LocalStore):
                    out.remove_emptied(doomed)
            state = "empty"
        from job.checkpoint import Checkpoints

        ckpt = Checkpoints(out, work, cluster, cfg.checkpoint.keep, guard=lease.check if lease else None)
        resumed = _resume_point(cfg, ckpt, state, source.layout.classes, source.fingerprint(), _base_weights(parts),
                                _keep_order(source))
        if state == "incomplete":  # (the others were checked before the lease)
            _unfreeze_trains_something(cfg, parts, unfreeze, _resumed_from(resumed))
    except BaseException:
        if lease:
            lease.release()
        raise
    initial = [v.numpy() for v in parts.model.variables] if cfg.train.refit else None  # before any restore
    was = _resumed_from(resumed)
    return Run(cfg, out, source.layout, source, cluster, work, parts, unfreeze, ckpt, resumed, lease, timings, staging,
               initial=initial, resumed_from=was)


def _replay_metrics(run: Run) -> None:
    """A resumed attempt's gauges start from the checkpoint's history: each phase's last epoch and its results (its
    registry is new, and its final Pushgateway push, which replaces the group, lost the phases an earlier attempt
    had finished)."""
    for phase, records in run.state.history.items():
        if records:
            _gauges(run, phase, records[-1])


def _gauges(run: Run, phase: str, record: dict) -> None:
    """A history record (an epoch's results) into the epoch gauges."""
    r = {k: float("nan") if v is None else v for k, v in record.items()}  # (null: not finite)
    metrics.epoch_done(phase, r["epoch"], train_loss=r["loss"], train_accuracy=r["accuracy"],
                       val_loss=r.get("val_loss", float("nan")), val_accuracy=r.get("val_accuracy", float("nan")),
                       val_map=r.get("val_map", float("nan")) if run.multi else None)


def _resumed_from(state: RunState) -> dict:
    """Where an attempt takes over from a checkpoint: its phase, the epochs that phase ran (early stopping sets the
    state's epoch to the budget) and the steps of a part-finished one; {"phase": "trained"} when only evaluation and
    export are left; {} for a run that starts afresh."""
    if not (any(state.history.values()) or state.step or state.phase != "head"):
        return {}
    if state.phase == "trained":
        return {"phase": "trained"}
    return {"phase": state.phase, "epochs_done": len(state.history.get(state.phase, [])), "steps_done": state.step}


def _check_cache_dir(cache: Path) -> None:
    """ConfigError when `data.cache_dir` cannot be created or written (a read-only root file system, a typo)."""
    import tempfile

    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, prefix=".probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"config: data.cache_dir: {cache} cannot be written ({e.strerror or e}); point it at a "
                          "writable folder with room for the staged images (the chart mounts a volume there)") from None


def _staging(cfg: Config, source) -> str:
    """`data.staging` resolved: copy, or stream; streaming gives each worker whole training shards, so it
    needs at least one per worker (checked before the workers meet: every one fails at once)."""
    from job import sources
    from job.distribute import tf_config_workers

    size = cfg.data.image_size
    _check_cache_dir(Path(cfg.data.cache_dir))
    mode = sources.staging_mode(source, cfg.data.staging, Path(cfg.data.cache_dir), size[0] * size[1] * 3)
    shards, workers = len(source.shard_entries.get("train", [])), tf_config_workers()[1]
    if mode == "stream" and shards < workers:
        raise DataError(f"{cfg.data.uri}/train/: {shards} training shard(s) for {workers} workers; streaming "
                        "needs at least one shard per worker (pack with a smaller --shard-size, or data.staging: "
                        "copy)")
    return mode


def _work_folder(cfg: Config) -> Path:
    """This run's local folder under data.cache_dir: per run id and output (two runs of one id into two outputs,
    sharing a cache, shared it: one's export deleted the other's, exit 1, and their checkpoints' local copies
    mixed)."""
    import hashlib

    output = hashlib.sha256(cfg.output.uri.rstrip("/").encode()).hexdigest()[:8]
    return Path(cfg.data.cache_dir) / "runs" / cfg.run_id / f"output-{output}"


def _start_strategy(cfg: Config):
    from job import signals

    cluster = distribute.setup(cfg.distribution.strategy, cfg.distribution.cpu_replicas, cfg.train.mixed_precision,
                               cfg.distribution.connect_timeout_seconds)
    signals.take_back()  # from TensorFlow's own handler, which the multi-worker strategy installs
    logs.bind(worker=cluster.worker_index)
    log.info("strategy ready", strategy=cluster.kind, replicas=cluster.replicas, workers=cluster.num_workers,
             mixed_precision=cluster.mixed_precision)
    _workers_agree_on_config(cfg, cluster)
    return cluster


def _workers_agree_on_config(cfg: Config, cluster) -> None:
    """Workers started with configs that differ in what trains a model (an env override on one pod) failed on
    TensorFlow's own words after their first epoch ("Collective instance 400 expected type 0"), exit 1 and retried:
    one exact all-gather of each worker's training config digest first, and all refuse together (exit 2)."""
    import json

    if cluster.num_workers < 2:
        return
    trained = runstate.training_config(redacted(cfg)) | {"run_id": cfg.run_id, "output": cfg.output.uri.rstrip("/")}
    trained["data.uri"] = str(trained.get("data.uri", "")).rstrip("/")  # (the same dataset with or without it)
    trained = json.dumps(trained, sort_keys=True, default=str)
    rows = cluster.gather([zlib.crc32(trained.encode())])
    others = [i for i, row in enumerate(rows) if row != rows[0]]
    if others:
        raise ConfigError(f"the workers run different configs in what trains a model: worker(s) "
                          f"{', '.join(map(str, others))} differ from worker 0 (the chief); give every worker one "
                          f"config (train.*, model.*, data.uri, data.image_size, ...)")


def _completed_meanwhile(cfg: Config, out: storage.Store, state: str, lease, cluster,
                         failed: StorageError | None = None) -> bool:
    """Whether another attempt of this run (a second `train`, a duplicate Job) completed it while this one waited for
    the lease: this one resumed from its "trained" checkpoint and exported over the finished run. The chief, which
    holds the lease, looks; with several workers it tells the others in one collective (the chief alone returning
    left them waiting on it), and so it does of its own failure (`failed`: taking the lease) or its look's: raised
    after the collective, where alone it left the others waiting in it for ever."""
    done = False
    if failed is None:
        try:
            done = bool(lease) and state != "complete" and not cfg.output.overwrite and out.exists("_SUCCESS")
        except StorageError as e:
            failed = e
    if cluster.num_workers > 1:
        rows = cluster.gather([int(done), int(failed is not None)])
        done = any(row[0] for row in rows)
        if failed is None and any(row[1] for row in rows):
            raise StorageError("the chief could not take or read the run's output (see its log); the Job's next "
                               "attempt tries again")
    if failed is not None:
        raise failed
    return done


def another_attempt_holds(cfg: Config) -> bool:
    """Whether a live attempt holds this run's lease: an attempt that failed before it took the lease (a dataset
    listing that failed, a SIGTERM while it waited) must push nothing into that attempt's Pushgateway group (its
    "failed" fired FinetuneJobFailed on a healthy run, and zeroed its counters)."""
    from job.lease import held_by_another

    try:
        return held_by_another(run_store(cfg), cfg.checkpoint.lease_seconds)
    except Exception:  # noqa: BLE001 - on the way out of a failure: cannot tell, so the failure is pushed
        return False


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
                            cfg.model.head_units, cfg.model.head_dropout, imagenet=imagenet,
                            from_scratch=cfg.model.weights == "none", multi_label=cfg.task == "multi_label",
                            weights_named=cfg.model.weights)
    if parts.from_scratch:  # every layer trains: train.finetune.unfreeze does not apply
        return parts, len(model.unfreezable_layers(parts.base))
    return parts, model.check_unfreeze(parts.base, cfg.train.finetune.unfreeze, cfg.model.backbone)


def _unfreeze_trains_something(cfg: Config, parts, count: int, resumed_from: dict) -> None:
    """ConfigError when train.finetune.unfreeze reaches no layer with weights to train (model.idle_unfreeze); only a
    warning for a run resumed from a checkpoint (begun by a version that took it: the refusal's advice, another
    value, was then refused as a change of recipe, and only a new run_id went on), and nothing where no fine-tuning
    runs (epochs 0: unfreeze is unused, and said to be)."""
    from job import model

    if parts.from_scratch or cfg.train.finetune.epochs == 0:
        return
    idle = model.idle_unfreeze(parts.base, count, cfg.train.finetune.unfreeze)
    if idle and not resumed_from:
        raise ConfigError(idle)
    if idle and resumed_from.get("phase") != "trained":
        log.warning(f"{idle.removeprefix('config: ')}; this run began with it and goes on so: its fine-tuning trains "
                    "the head alone")


def resolve_weights(cfg: Config, work: Path) -> tuple[str | None, bool]:
    """(local weights file or None, download ImageNet weights?) from `model.weights`."""
    weights = cfg.model.weights
    if weights in ("imagenet", "none"):
        return None, weights == "imagenet"
    if storage.is_s3(weights):  # (there: `check_weights` ran before TensorFlow loaded)
        parent, _, name = weights.rstrip("/").rpartition("/")
        local = work / "weights" / name
        storage.open_store(parent, cfg.s3.endpoint_url).download(name, local)
        return str(local), False
    return str(_local_weights(weights)), False


def _local_weights(weights: str) -> Path:
    """A local `model.weights` as a path: `~` expanded, and `file://` taken as data.uri takes it."""
    return Path(weights.removeprefix("file://")).expanduser()


def check_weights(cfg: Config) -> None:
    """ConfigError when `model.weights` names a file or object that is not there (storage trouble: StorageError)."""
    weights = cfg.model.weights
    if weights in ("imagenet", "none"):
        return
    if storage.is_s3(weights):
        parent, _, name = weights.rstrip("/").rpartition("/")
        there = storage.open_store(parent, cfg.s3.endpoint_url).exists(name)
    else:
        there = _local_weights(weights).is_file()
    if not there:
        raise ConfigError(f"config: model.weights: no weights file at {weights} (imagenet | none | a path | s3://...)")


def _base_weights(parts) -> str:
    """The fingerprint of the base as built, before any checkpoint is restored ("" from scratch: nothing to keep)."""
    from job.export import weights_fingerprint

    return "" if parts.from_scratch else weights_fingerprint(parts.base)


def _keep_order(source):
    """For a single-label manifest: a function that puts its classes in a checkpoint's order and gives the listing's
    fingerprint then. A `classes.txt` beside such a manifest sets the order since this version; a run begun before
    kept them sorted, and its resume was refused as "another order". None for the other kinds of dataset."""
    if source.kind != "manifest" or source.layout.multi_label:
        return None

    def keep(order: list[str]) -> tuple[list[str], str]:
        source.layout = layout.Layout(order, source.layout.files, source.layout.ignored)
        return order, source.fingerprint()
    return keep


def _resume_point(cfg: Config, ckpt, output: str, classes: list[str], dataset: str, base: str = "",
                  keep_order=None) -> RunState:
    """The fetched checkpoint's run state if there is one and its config, the base's weights (`base`: their
    fingerprint) and the dataset's classes still fit; else a new state. A dataset changed under the same classes
    (`dataset`: its listing's fingerprint) is a warning; the same classes in another order are refused, or kept in
    the checkpoint's where `keep_order` can (`_keep_order`)."""
    current = runstate.training_config(redacted(cfg))
    state = ckpt.fetch() if output == "incomplete" else None
    if state is None:
        return RunState(config=current, classes=list(classes), dataset=dataset, base=base)
    changes = runstate.config_changes(state.config, current) if state.config else ["(not recorded)"]
    grown = runstate.grown_after_done(state, current)
    if grown:
        raise ConfigError(f"config: run {cfg.run_id}'s checkpoint has finished the phase whose epochs grew, so they "
                          f"would not train: {'; '.join(grown)}. Restore them, or start a new run_id (epochs may grow "
                          "while their phase is under way)")
    if changes:
        raise ConfigError(
            f"config: run {cfg.run_id} has a checkpoint trained with another config, so resuming would mix "
            f"the two: {'; '.join(changes)}. Restore those keys, or start a new run_id "
            f"(safe to change: {', '.join(runstate.SAFE_TO_CHANGE + runstate.MAY_GROW)}; epochs only upwards)")
    if state.base and base and state.base != base:
        how = "Keras cached other ImageNet weights" if cfg.model.weights == "imagenet" else "the file was replaced"
        raise ConfigError(
            f"config: model.weights: the base weights of {cfg.model.weights} are not those run {cfg.run_id}'s "
            f"checkpoint was trained on ({how}), so resuming would mix the two; restore them, or start a new run_id")
    if keep_order and state.classes and state.classes != list(classes) and sorted(state.classes) == sorted(classes):
        log.warning(f"the manifest's classes are in another order than run {cfg.run_id}'s checkpoint was trained "
                    "with (a classes.txt beside it, which earlier versions did not read?): the run keeps the "
                    "checkpoint's order, which labels.txt gives", order=", ".join(state.classes)[:300])
        classes, dataset = keep_order(list(state.classes))
    changed = runstate.class_changes(state.classes, list(classes))
    if changed:
        raise DataError(
            f"the dataset under {cfg.data.uri} has other classes than run {cfg.run_id}'s checkpoint was trained on "
            f"({changed}), so resuming would train its outputs under other names; restore the dataset, or start "
            "a new run_id")
    if state.dataset and state.dataset != dataset:
        log.warning(f"the dataset under {cfg.data.uri} changed since run {cfg.run_id}'s checkpoint (images added, "
                    "removed, rewritten or relabelled): the run goes on with the dataset as it is now, so its "
                    "validation split may hold images the checkpoint trained on")
    state.config, state.classes, state.dataset, state.base = current, list(classes), dataset, base
    return state


def stage_data(run: Run) -> None:
    """Make the images readable, copied to local files or streamed from shards (`run.staging`), with the
    bad ones out (DataError past `data.max_bad_fraction`); every worker agrees on the dataset."""
    from job import dataset, readers, signals

    cfg, source, mode = run.cfg, run.source, run.staging
    metrics.set_phase("staging")
    checks = readers.Checks(local_files=lambda paths: dataset.find_bad(paths, cfg.data.max_image_pixels),
                            encoded=lambda named: dataset.find_bad_blobs(named, cfg.data.max_image_pixels))
    total = sum(map(len, source.shard_entries.values())) if source.kind == "shards" else len(source.entries)
    with logs.progress("staging" if mode == "copy" else "reading shards", total,
                       report=lambda done, of: metrics.stage_progress("staging", done, of)) as advance:
        how = readers.Staging(Path(cfg.data.cache_dir), run.cache, run.size, checks, advance,
                              stop=lambda: signals.check("staging"), measure=run.timings.measure)
        staged = readers.create(source, mode, how)
    signals.check("staging")
    _too_many_bad(cfg, staged)
    run.data = staged.settle(cfg.data.validation_split, cfg.train.seed)
    if mode == "stream":
        log.info("dataset surveyed", kind="shards", mode=mode, shards=sum(map(len, source.shard_entries.values())),
                 images=sum(map(staged.count, staged.layout.splits)) + len(staged.bad),
                 training_shards_of_this_worker=run.data.shards("train", run.share))
    log.info("dataset ready", mode=mode, counts=run.data.layout.counts(), bad_images=len(run.data.bad))
    _check_splits(run)
    _warn_carved_share(cfg, source.layout, run.data.layout)
    for message, split, missing in unmeasured(run.data.layout):
        log.warning(message, split=split, classes=missing)
    _check_val_map(cfg, run.data.layout)
    _warn_identical(run)
    large = batch_over_images(cfg, run.data.layout)
    if large:
        log.warning(large)
    if not run.data.count("validation"):
        log.warning("no validation images: early stopping watches the training loss, and no validation report "
                    "is written")
    if not run.data.count("test"):
        log.info("no test images: no test report; the exported formats are checked on "
                 + ("validation" if run.data.count("validation") else "training") + " images")
    _workers_agree_on_dataset(run)


def _check_splits(run: Run) -> None:
    """Warn when a resumed run's splits are not its checkpoint's though the config is (images found bad otherwise,
    or a validation split carved otherwise by another version of the job): its validation images may be ones it
    trained on. Then keep this attempt's."""
    now = _splits_digest(run.data.layout)
    # A shard member's key keeps its extension's case from this version on (`x.JPG`, was `x.jpg`): a checkpoint of
    # an earlier version holds the other digest of the same splits
    if run.state.splits and run.state.splits not in (now, _splits_digest(run.data.layout, lower_extensions=True)):
        log.warning(f"the images of each split are not those run {run.cfg.run_id}'s checkpoint was trained with "
                    "(images added, removed or relabelled, found bad otherwise, or the validation split carved "
                    "otherwise by another version of the job): the run goes on with the splits as they are now, so "
                    "its validation images may be ones it trained on; early stopping starts over on them")
        # The best epoch so far was judged on the old validation split: kept, it won over every epoch on the new one
        # (a probe's export was an epoch that never saw the changed data, while the card described it). A phase with
        # no epoch left keeps it: nothing would be judged again, and its best weights would not be restored.
        if run.state.phase in ("head", "finetune") and run.state.epoch < _phase_epochs(run, run.state.phase):
            run.state.best, run.state.best_epoch, run.state.patience_used = None, 0, 0
        run.resumed_from = {**run.resumed_from, "splits_changed": True}
    run.state.splits = now


def _phase_epochs(run: Run, phase: str) -> int:
    """The epochs `phase` (head or finetune) runs at most (early stopping sets the state's epoch to it)."""
    t = run.cfg.train
    if phase == "head":
        return t.head.epochs
    return recipe.finetune_schedule(t.head.epochs, t.head.learning_rate, t.finetune.epochs, t.finetune.learning_rate,
                                    run.parts.from_scratch)[0]


def _splits_digest(listed, lower_extensions: bool = False) -> str:
    """A digest of the images of each split with their labels (`lower_extensions`: shard members' extensions, after
    `shard.tar:`, in lower case)."""
    import hashlib
    import json

    def key(k: str) -> str:
        stem, dot, ext = k.rpartition(".")
        return f"{stem}.{ext.lower()}" if lower_extensions and ":" in k and dot else k

    digest = hashlib.sha256()
    for split in listed.splits:
        keys, labels = listed.items(split)
        digest.update(json.dumps([split, [key(k) for k in keys], labels], default=int).encode())
    return digest.hexdigest()[:20]


def _warn_identical(run: Run) -> None:
    """Byte-identical images that a user would want to know of: held-out ones that are also training images, and
    identical ones labelled differently."""
    found = layout.identical(run.data.layout, run.data.digests)
    run.data.digests = {}  # 32 bytes an image: not kept for the rest of the run
    for split, n in found["in_training"].items():
        log.warning(f"{n} {split} image(s) are byte-identical to training images: the {split} scores overstate "
                    "accuracy on new images" + (" (and steer early stopping and train.search)" if split == "validation"
                                                else ""), split=split, images=n)
    clashes = found["labelled_differently"]
    if clashes:
        log.warning(f"{len(clashes)} group(s) of byte-identical images carry different labels: one of each is "
                    "mislabelled", groups=len(clashes),
                    examples=[[image_uri(run.cfg.data.uri, k) for k in keys[:3]] + [f"... {len(keys)} in all"]
                              * (len(keys) > 3) for keys in clashes[:3]])
    if found["copies_in_training"]:
        log.warning(f"{found['copies_in_training']} training image(s) are byte-identical copies of another of the same "
                    "label: each copy weighs once more in training (and in the class weights)",
                    images=found["copies_in_training"])
    run.identical = {**found["in_training"], "labelled_differently": len(clashes),
                     "copies_in_training": found["copies_in_training"]}


def _too_many_bad(cfg: Config, staged: Reader) -> None:
    """Log each bad image; DataError when more than `data.max_bad_fraction` of them are bad."""
    for key, reason in staged.bad.items():
        log.warning("bad image skipped", file=image_uri(cfg.data.uri, key), reason=reason)
    metrics.bad_images(len(staged.bad))
    total = sum(staged.layout.count(split) for split in staged.layout.splits)  # (images: multi-label counts()
    # holds labels, so an image with none was not counted and one with three thrice)
    fraction = len(staged.bad) / max(total, 1)
    if fraction > cfg.data.max_bad_fraction:
        example, reason = next(iter(staged.bad.items()))
        raise DataError(f"{len(staged.bad)} of {total} images are bad ({fraction:.1%} > data.max_bad_fraction "
                        f"{cfg.data.max_bad_fraction:.1%}), e.g. {image_uri(cfg.data.uri, example)}: {reason}")


def _final_summaries(run: Run, reports: dict, folder: Path) -> None:
    """TensorBoard at the end: the recipe and final metrics (HParams), the confusion matrix, misclassified
    test images."""
    from job import tensorboard

    images = [("confusion_matrix", (folder / "confusion_matrix.png").read_bytes())] \
        if (folder / "confusion_matrix.png").is_file() else []
    if run.misclassified and len(run.misclassified[0]):
        images.append(("misclassified_test_images", tensorboard.image_grid(*run.misclassified)))
    step = sum(map(len, run.state.history.values()))
    from job.search import chosen_rate

    run.board.finish(tensorboard.hparams(run.cfg, chosen_rate(run.state)), tensorboard.final_metrics(reports), images,
                     step, run.cfg.run_id)


def _workers_agree_on_dataset(run: Run) -> None:
    """Every worker must run the same number of steps on its own images: a listing that changed between
    workers' starts, or stagings decided differently (free disk differs between nodes), would make them
    disagree and hang, or train some images twice. One exact all-gather on every worker; all fail together.
    Streaming gives each worker whole training shards: after the validation split, each needs one."""
    stream = run.data.mode == "stream"
    mine = len(run.data.shards("train", run.share)) if stream else run.data.count("train")
    counts = [run.data.count(split) for split in ("train", "validation", "test")]
    # and where each resumed: a worker that could not read the latest checkpoint took the one before it (checkpoint.py)
    resumed = [zlib.crc32(run.state.phase.encode()), run.state.epoch, run.state.step]
    rows = run.cluster.gather(counts + [int(stream), mine, len(run.data.items("train", run.share)[0]), *resumed])
    if any(row[6:] != rows[0][6:] for row in rows):
        raise StorageError(f"the workers resumed from different checkpoints (epochs and steps done: "
                           f"{[row[7:] for row in rows]}): one could not read the latest; run them again")
    if any(row[:4] != rows[0][:4] for row in rows):
        raise DataError(f"the workers see different datasets under {run.cfg.data.uri} (did it change while the run "
                        f"started, or does data.staging auto decide differently on their disks?): images per "
                        f"split (train, validation, test) and streaming by worker: {[row[:4] for row in rows]}")
    if stream and min(row[4] for row in rows) == 0:
        raise DataError(f"{run.cfg.data.uri}/train/: {len(run.data.shards('train'))} shard(s) hold training images "
                        f"(after the validation split) for {run.cluster.num_workers} workers; streaming needs at "
                        "least one per worker (pack with a smaller --shard-size, or data.staging: copy)")
    shares = [row[5] for row in rows]
    if stream and max(shares) > 1.25 * min(shares) and run.cluster.is_chief:
        log.warning("streaming workers hold unequal shares of the training images (whole shards each, balanced as "
                    "they allow), and all run the same steps: the images of a smaller share are seen more often; "
                    "pack with a smaller --shard-size", images_by_worker=shares,
                    weight=round(max(shares) / min(shares), 2))


def _training_batches(run: Run, split: str = "train"):
    """A dataset_fn of this worker's shuffled, repeated per-replica training batches."""
    from job import loop

    per_replica = loop.per_replica_batch(run.cfg.train.batch_size, run.cluster)
    return lambda ctx, start: run.data.images(split, per_replica, shuffle=True, seed=run.cfg.train.seed, repeat=True,
                                              share=run.share, start=start)


def _validation_images(run: Run):
    return run.data.images("validation", 64) if run.data.count("validation") else None


def _validator(run: Run):
    """The whole model's validation at each epoch's end."""
    from job import loop

    return loop.validator(run.parts.model, _validation_images(run), run.multi, run.data.count("validation"))


def head_phase(run: Run) -> None:
    """Phase 1: the new head on the frozen base."""
    from job import loop, signals

    cfg, head = run.cfg, run.cfg.train.head
    if run.state.phase != "head":
        return  # resumed past it
    if run.parts.from_scratch:
        log.info("phase skipped", phase="head", reason=recipe.FROM_SCRATCH_HEAD_SKIPPED)
        return
    if head.augment and head.mode == "cached_features":
        log.warning("train.head.augment has no effect with train.head.mode cached_features (features are "
                    "computed once from un-augmented images); use end_to_end to augment the head phase")
    common = {"name": "head", "examples": run.data.count("train"), "epochs": head.epochs,
              "learning_rate": head.learning_rate, "saved": run.parts.head, "on_epoch": _on_epoch(run, "head")}
    if run.state.resumes("head") and run.state.epoch >= head.epochs:
        # Resumed after the phase's last epoch: only its best weights are to be restored, no data needed.
        phase = loop.Phase(model=run.parts.head, dataset_fn=None, validate=lambda: None, **common)
    elif head.mode == "cached_features" and head.epochs > 0:
        metrics.set_phase("head")
        with run.timings.measure("feature_cache"):
            phase = loop.Phase(model=run.parts.head, **_on_features(run), **common)
        signals.check("feature extraction")
    else:
        # The base is frozen: checkpoints hold the head, the base comes from model.weights again.
        phase = loop.Phase(model=run.parts.model, dataset_fn=_training_batches(run),
                           validate=_validator(run),
                           augment=_augmentation(run, head.augment, cfg.train.seed), **common)
    loop.run_phase(phase, run.cluster, cfg.train.batch_size, run.options, run.ckpt, run.state)


def _on_epoch(run: Run, phase: str):
    """After each epoch, on the chief: its scalars into the event files, copied to storage."""
    if run.board is None:
        return None
    return lambda record: run.board.epoch(run.state.history, phase, record)


def _augmentation(run: Run, ops, seed: int):
    from job import model

    with run.cluster.strategy.scope():
        return model.augmentation(recipe.augment_ops(ops), seed)


def _on_features(run: Run, split: str = "train") -> dict:
    """The head phase's data on cached features: this worker's share of `split` and the validation split (none
    when the refit trains on it)."""
    from job import dataset, loop

    per_replica = loop.per_replica_batch(run.cfg.train.batch_size, run.cluster)
    train_features, train_labels = _features(run, split, run.share)
    validation = None
    if run.data.count("validation") and split == "train":
        val_features, val_labels = _features(run, "validation", None)
        validation = dataset.feature_dataset(val_features, val_labels, 256)
    seed = run.cfg.train.seed
    return {"dataset_fn": lambda ctx, start: dataset.feature_dataset(train_features, train_labels, per_replica,
                                                                     shuffle=True, seed=seed, repeat=True, start=start),
            "validate": loop.validator(run.parts.head, validation, run.multi)}


def _features(run: Run, split: str, share: tuple[int, int] | None):
    """The frozen base's features of a split (this worker's share of it with `share`) and their labels, cached."""
    from job import dataset
    from job.export import weights_fingerprint

    cfg = run.cfg  # the base as it is (a weights file replaced at the same path met the old base's features)
    key = [cfg.model.backbone, weights_fingerprint(run.parts.base), list(cfg.data.image_size), split, run.classes,
           run.data.identity(split, share)]
    count = len(run.data.items(split, share)[0])
    images = run.data.images(split, 64, share=share)  # (the image cache, built here, has its own progress: not nested)
    with logs.progress(f"{split} features", count,
                       report=lambda done, of: metrics.stage_progress("features", done, of)) as advance:
        return dataset.cached_features(run.parts.features, images, count, key, run.cache, advance)


def finetune_phase(run: Run) -> None:
    """Phase 2: the base unfrozen at a low learning rate, the head carried over (from scratch: every layer,
    BatchNormalization included, at the head's rate for both phases' epochs), at each rate of train.search in
    turn, keeping the best on validation (job/search.py)."""
    from job import loop, model, search

    cfg, ft = run.cfg, run.cfg.train.finetune
    epochs, rate = recipe.finetune_schedule(cfg.train.head.epochs, cfg.train.head.learning_rate, ft.epochs,
                                            ft.learning_rate, run.parts.from_scratch)
    if run.state.phase in ("head", "finetune") and epochs > 0 and run.unfreeze > 0:
        with run.cluster.strategy.scope():
            model.unfreeze(run.parts, run.unfreeze)

        augment = _augmentation(run, ft.augment, cfg.train.seed + 100)  # one for every trial: one traced step
        scales = _rate_scales(run)  # the unfrozen variables' shares of the rate, alike for every trial

        def phase(learning_rate: float, pause_after: int = 0, on_epoch: bool = False):
            return loop.Phase(name="finetune", model=run.parts.model, dataset_fn=_training_batches(run),
                              examples=run.data.count("train"), epochs=epochs, learning_rate=learning_rate,
                              validate=_validator(run),
                              augment=augment,
                              on_epoch=_on_epoch(run, "finetune") if on_epoch else None,
                              pause_after=pause_after, rate_scales=scales,
                              # from scratch none, as documented and warned of: the loop averaged where no layer
                              # was BatchNormalization (VGG), which the warning and the card denied
                              average_epochs=0.0 if run.parts.from_scratch else ft.average_epochs)

        rates = [] if run.parts.from_scratch else search.rates(cfg, run.data.count("validation") > 0)
        if rates and run.state.phase == "head":
            search.run(run, phase, rates, cfg.train.search.epochs, replay=lambda record: _replay(run, record))
        else:  # (a resumed search continues at the rate it chose)
            rate = search.chosen_rate(run.state) or rate
            loop.run_phase(phase(rate, on_epoch=True), run.cluster, cfg.train.batch_size, run.options, run.ckpt,
                           run.state)


def refit_phases(run: Run) -> None:
    """train.refit (job/refit.py): the head, then the whole model, again from the model as built on training +
    validation images, for the epochs validation chose; the validation report taken before."""
    from job import loop, model, refit, search

    cfg, state = run.cfg, run.state
    if state.phase in ("head", "finetune"):  # training on the training split has just ended
        why = refit.skipped(cfg, run.multi, run.parts.from_scratch, run.data.count("validation"))
        if why is not None:
            if cfg.train.refit:  # asked for and not done: said (the card says it too)
                log.warning("refit skipped", reason=why)
            return
        rate = search.chosen_rate(state) or cfg.train.finetune.learning_rate
        state.refit = {**refit.plan(state.history, run.options.metric, rate), "validation": _report(run, "validation")}
        log.info("refit started", on=refit.SPLIT, images=run.data.count(refit.SPLIT),
                 **{k: v for k, v in state.refit.items() if k != "validation"})
        for variable, value in zip(run.parts.model.variables, run.initial):
            variable.assign(value)
        state.start("refit_head")
    # Nothing to stop on; `auto` weights from the images it trains on (the training split's were kept: a validation
    # split of 2 and 40 images trained at weights 1 and 1)
    weights = class_weights(cfg, run.data.layout, refit.SPLIT)
    if weights and weights != list(run.options.class_weights or []):
        log.info("positive weights" if run.multi else "class weights", on=refit.SPLIT,
                 weights=dict(zip(run.classes, [round(w, 4) for w in weights])))
    options = dataclasses.replace(run.options, patience=0, class_weights=tuple(weights) if weights else None)
    common = {"examples": run.data.count(refit.SPLIT), "restore_best": False}
    if state.phase == "refit_head":
        metrics.set_phase("refit_head")
        phase = loop.Phase(name="refit_head", model=run.parts.head, **_on_features(run, refit.SPLIT), **common,
                           epochs=state.refit["head_epochs"], learning_rate=cfg.train.head.learning_rate,
                           on_epoch=_on_epoch(run, "refit_head"))
        loop.run_phase(phase, run.cluster, cfg.train.batch_size, options, run.ckpt, state)
    if state.phase in ("refit_head", "refit"):
        with run.cluster.strategy.scope():
            model.unfreeze(run.parts, run.unfreeze)
        augment = _augmentation(run, cfg.train.finetune.augment, cfg.train.seed + 100)
        phase = loop.Phase(name="refit", model=run.parts.model, dataset_fn=_training_batches(run, refit.SPLIT),
                           **common, epochs=state.refit["finetune_epochs"], learning_rate=state.refit["learning_rate"],
                           validate=lambda: None, augment=augment, on_epoch=_on_epoch(run, "refit"),
                           rate_scales=_rate_scales(run), average_epochs=cfg.train.finetune.average_epochs)
        loop.run_phase(phase, run.cluster, cfg.train.batch_size, options, run.ckpt, state)


def _rate_scales(run: Run) -> tuple[float, ...]:
    """train.finetune.layer_decay: each trainable variable's share of the fine-tuning rate, by its layer's depth in
    the base (after unfreezing); () when it is 1 or the base trains from scratch."""
    from job import model

    lowest = run.cfg.train.finetune.layer_decay
    if lowest >= 1.0 or run.parts.from_scratch:
        return ()
    depths, layers = model.layer_depths(run.parts.base, run.parts.model.trainable_variables)
    return tuple(recipe.layer_rates(depths, layers, lowest))


def _report(run: Run, split: str) -> dict:
    """The evaluation report of a split under the model as it is now."""
    from job import loop

    probs, labels = loop.predict(run.parts.model, run.data.images(split, 64))
    return evaluate.report(probs, labels, run.classes)


def end_training(run: Run) -> None:
    """Training is over: its state saved (evaluation and export can be redone without training), or, resumed
    after it, the final weights restored."""
    from job import signals

    if run.state.phase == "trained":
        run.ckpt.restore(weights=run.parts.model)  # a resumed run that had finished training: its final weights
    else:
        run.state.finish()
        run.ckpt.save(run.state, weights=run.parts.model)  # evaluation and export can be redone without training
    signals.check("evaluation")


def _replay(run: Run, record: dict) -> None:
    """An epoch the search ran before its choice, now the fine-tuning phase's: into TensorBoard, Katib's file and the
    epoch gauges (they held the last trial's, a loser's, to the end where the chosen one ran no epoch more)."""
    if run.board:
        run.board.epoch(run.state.history, "finetune", record)
    katib.epoch_done(run.cfg.metrics.file, "finetune", record, chief=run.cluster.is_chief)
    _gauges(run, "finetune", record)


def class_weights(cfg: Config, listed, split: str = "train") -> list[float] | None:
    """`train.class_weight` against the layout's counts of `split` (the training split; the refit's
    `train+validation`) (multi-label: positive weights per label); ConfigError for unknown classes."""
    per_split = listed.counts()
    counts = {c: sum(per_split.get(s, {}).get(c, 0) for s in split.split("+")) for c in listed.classes}
    try:
        if listed.multi_label:
            return recipe.positive_weights(cfg.train.class_weight, listed.classes, counts, listed.count(split))
        return recipe.class_weights(cfg.train.class_weight, listed.classes, counts)
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None


def evaluate_splits(run: Run) -> dict[str, dict]:
    """Validation and test reports (the splits that have images), the same on every worker. Multi-label: the
    thresholds are chosen on validation first (each label's best F1), then both splits are judged with them."""
    import numpy as np

    from job import export, loop, multilabel

    metrics.set_phase("evaluate")
    infer = loop.inference(run.parts.model)  # traced once for both splits
    seen: list = []  # the first test batches' images, for TensorBoard's misclassified examples

    def keep(images, probs, labels):
        if run.board and sum(len(b[0]) for b in seen) < 64:
            seen.append((np.asarray(images).round().astype(np.uint8), probs, labels))

    chosen_with = run.state.refit.get("validation")  # train.refit: the report of the model the choices were made with
    splits = [s for s in ("validation", "test") if run.data.count(s) and not (chosen_with and s == "validation")]
    predicted = {split: loop.predict(run.parts.model, run.data.images(split, 64), infer,
                                     keep if split == "test" else None) for split in splits}
    reports = {}
    if run.multi:
        scores, truth = predicted.get("validation", (np.zeros((0, len(run.classes))),) * 2)
        run.thresholds = multilabel.choose_thresholds(scores, truth)
        chosen = [t["threshold"] for t in run.thresholds]
        for split, (scores, truth) in predicted.items():
            reports[split] = multilabel.report(scores, truth, chosen, run.classes)
        log.info("thresholds chosen", on="validation" if "validation" in predicted else "none (fallback)",
                 thresholds=dict(zip(run.classes, [round(t, 4) for t in chosen])))
    else:
        reports = {split: evaluate.report(probs, labels, run.classes) for split, (probs, labels) in predicted.items()}
        if chosen_with:
            reports = {"validation": chosen_with, **reports}
    if seen:
        from job.tensorboard import misclassified

        images, probs, labels = (np.concatenate([b[k] for b in seen]) for k in range(3))
        run.misclassified = misclassified(images, probs, labels, run.classes,
                                          [t["threshold"] for t in run.thresholds] if run.multi else None)
    log.info("training done", weights_sha256=export.weights_fingerprint(run.parts.model),
             epochs={k: len(v) for k, v in run.state.history.items()})
    return reports


def _drop_local_copies(run: Run) -> None:
    """Once the run is complete (or this worker done), the local copies of what storage holds (the checkpoints, the
    artifacts) go from `data.cache_dir`: every finished run left them there (80 MB at MobileNet 32x32), and nothing
    reads them again (a rerun of a complete run does nothing). The staged images stay (a run of another id reads
    them), and so do the run's image and feature caches (an overwrite of it reads them)."""
    root = run.out.root.resolve() if isinstance(run.out, storage.LocalStore) else None
    inside = root is not None and (run.work.resolve() == root or run.work.resolve() in root.parents)
    if inside:  # an output.uri under data.cache_dir's run folder: never delete there
        return
    # (the search's trial checkpoints too: a run resumed after the choice never went back through the search's own
    # clean-up, and left one checkpoint a rate, 36 MB each at MobileNetV2)
    for folder in (run.ckpt.dir, run.ckpt.restore_dir, run.work / "artifacts", run.work / "search"):
        shutil.rmtree(folder, ignore_errors=True)


def export_run(run: Run, reports: dict, started: float) -> dict:
    """The artifacts of CONTRACT section 6 into a local folder, then to storage with `_SUCCESS` last."""
    from job import export, signals

    signals.check("export")
    metrics.set_phase("export")
    folder = run.work / "artifacts"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log.info("exporting", formats=run.cfg.export.formats or "defaults", to=run.out.uri)
    with run.timings.measure("export"):
        checked = export.artifacts(run, reports, folder)
    run.timings["total_seconds"] = round(time.monotonic() - started, 3)
    export.write_manifest(folder, export.manifest_fields(run, checked))
    if run.board:
        _final_summaries(run, reports, folder)
        run.board.close()  # its last copy to storage before the artifacts': it landed after _SUCCESS
    if run.lease:
        run.lease.check()
    signals.check("export")  # the last point before storage: the upload, once begun, ends with _SUCCESS
    log.info("uploading the artifacts", to=run.out.uri, files=sum(1 for p in folder.rglob("*") if p.is_file()))
    with run.timings.measure("upload"):
        export.upload(folder, run.out)
    katib.run_done(run.cfg.metrics.file, reports, chief=run.cluster.is_chief)  # the run is complete: its final line
    headline = reports.get("test") or reports.get("validation") or {}
    scores = {"test_map": reports.get("test", {}).get("map"), "val_map": reports.get("validation", {}).get("map"),
              "micro_f1": headline.get("micro_f1")} if run.multi else {
        "test_accuracy": reports.get("test", {}).get("accuracy"),
        "val_accuracy": reports.get("validation", {}).get("accuracy"), "accuracy": headline.get("accuracy")}
    return {"status": "complete", "artifacts": run.out.uri, **scores,
            "formats": sorted(f for f, r in checked["formats"].items() if "error" not in r),
            "seconds": run.timings["total_seconds"], "s3_errors": metrics.s3_errors_total()}
