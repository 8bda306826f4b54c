"""TensorBoard event files of a run, and `finetune-job tensorboard`, which mirrors them from storage and serves
them.

The chief writes summaries to `<work>/tensorboard/` and copies them to `<output.uri>/<run_id>/tensorboard/`
at every epoch's end and when the run ends (SIGTERM included), so a TensorBoard reading the bucket shows the
run while it trains:

    per epoch (step = the epoch's number over both phases)   loss/{train,validation}, accuracy/{train,
        validation} (multi-label: map/validation), learning_rate, images_per_second, phase (0 head, 1 finetune;
        train.refit: 2 and 3)
    at the end    the confusion matrix (single-label), a few misclassified test images with their labels, and
                  an HParams summary of the resolved recipe with the final validation and test metrics

The events are a function of the run's history (job/runstate.py), which checkpoints carry: a resumed run
deletes the event files of its earlier attempt and writes the history it resumed from into a new file, then
goes on, so its curves continue without a repeated step. TensorFlow's `tf.summary` writes local files only
(TensorFlow has no s3:// filesystem): the copy to storage is ours.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

from job import logs, storage
from job.errors import ConfigError, StorageError
from job.files import atomic_path
from job.uris import within

log = logs.get()
FOLDER = "tensorboard"
MISCLASSIFIED = 8  # image summaries of wrong test predictions at the end


# The phases in the order they run (train.refit's two after the others), each one's `phase` scalar its index.
ORDER = ("head", "finetune", "refit_head", "refit")


def step_of(history: dict[str, list[dict]], phase: str, epoch: int) -> int:
    """The epoch's step on TensorBoard's axis: head epochs first, then fine-tuning's after them (then the refit's)."""
    return epoch + sum(len(history.get(p, [])) for p in ORDER[:ORDER.index(phase)])


def scalars(record: dict) -> dict[str, float]:
    """The per-epoch scalars of a history record (job/loop.py) under TensorBoard's tags."""
    names = {"loss": "loss/train", "accuracy": "accuracy/train", "val_loss": "loss/validation",
             "val_accuracy": "accuracy/validation", "val_map": "map/validation", "learning_rate": "learning_rate",
             "images_per_second": "images_per_second"}
    return {tag: float(record[key]) for key, tag in names.items() if key in record}


class Board:
    """The chief's event files: `epoch` after each epoch, `finish` at the end, `sync` to copy them to storage."""

    def __init__(self, work: Path, out: storage.Store):
        import tensorflow as tf

        self.local, self.out = Path(work) / FOLDER, out
        self.tf = tf
        self.writer = None

    def start(self, history: dict[str, list[dict]]) -> None:
        """A fresh set of event files holding `history` (a resumed run's epochs so far; empty for a new run)."""
        shutil.rmtree(self.local, ignore_errors=True)
        try:
            self.out.delete([e.rel for e in self.out.list(FOLDER + "/")])
        except StorageError as e:  # storage that refuses deletes: the earlier attempt's files stay beside the new ones
            log.warning("earlier event files not deleted; TensorBoard may show their curves twice", reason=str(e))
        self.writer = self.tf.summary.create_file_writer(str(self.local))
        for phase, records in history.items():
            for record in records:
                self._epoch(history, phase, record)
        self.sync()

    def epoch(self, history: dict[str, list[dict]], phase: str, record: dict) -> None:
        """One finished epoch (already appended to `history`), then the files are copied to storage."""
        self._epoch(history, phase, record)
        self.sync()

    def _epoch(self, history, phase: str, record: dict) -> None:
        step = step_of(history, phase, record["epoch"])
        with self.writer.as_default(step=step):
            for tag, value in scalars(record).items():
                self.tf.summary.scalar(tag, value)
            self.tf.summary.scalar("phase", float(ORDER.index(phase)))
            if record["epoch"] == 1:
                self.tf.summary.text("phase_start", f"{phase} starts at step {step}")

    def finish(self, hparams: dict, final: dict[str, float], images: list[tuple[str, object]], step: int,
               run_id: str = "") -> None:
        """The end of the run: an HParams summary (the recipe and the final metrics) and images (name, uint8
        [n, h, w, 3] or a PNG's bytes). The run id is the HParams trial: without one TensorBoard grouped the runs
        of one recipe (on any dataset) into one row and showed the mean of their metrics."""
        from tensorboard.plugins.hparams import api as hp

        with self.writer.as_default(step=step):
            hp.hparams(hparams, trial_id=run_id or None)
            for tag, value in final.items():
                self.tf.summary.scalar(f"final/{tag}", value)
            for name, pixels in images:
                if isinstance(pixels, bytes):
                    pixels = self.tf.expand_dims(self.tf.io.decode_png(pixels, channels=3), 0)
                self.tf.summary.image(name, pixels, max_outputs=MISCLASSIFIED)
        self.sync()

    def sync(self) -> None:
        """Flush and copy every event file to `<run>/tensorboard/` (event files grow: each is copied whole)."""
        if self.writer is None:
            return
        self.writer.flush()
        for path in sorted(self.local.rglob("*")):
            if path.is_file():
                self.out.upload(path, f"{FOLDER}/{path.relative_to(self.local).as_posix()}")

    def close(self) -> None:
        if self.writer is not None:
            self.sync()
            self.writer.close()
            self.writer = None


def hparams(cfg, finetune_rate: float | None = None) -> dict:
    """The resolved recipe as HParams: what a comparison of runs varies. `finetune_rate`: the rate train.search
    chose (the configured one was shown, so runs whose search chose differently looked alike)."""
    t = cfg.train
    return {"task": cfg.task, "data": cfg.data.uri, "backbone": cfg.model.backbone, "weights": cfg.model.weights,
            "image_size": f"{cfg.data.image_size[0]}x{cfg.data.image_size[1]}", "head_units": cfg.model.head_units,
            "head_dropout": cfg.model.head_dropout, "batch_size": t.batch_size, "seed": t.seed,
            "head_epochs": t.head.epochs, "head_learning_rate": t.head.learning_rate, "head_mode": t.head.mode,
            "finetune_epochs": t.finetune.epochs, "finetune_learning_rate": finetune_rate or t.finetune.learning_rate,
            "unfreeze": str(t.finetune.unfreeze), "augment": str(t.finetune.augment),
            "layer_decay": t.finetune.layer_decay,
            "class_weight": str(t.class_weight), "early_stopping_metric": t.early_stopping_metric,
            "label_smoothing": t.label_smoothing, "weight_decay": t.weight_decay, "lr_schedule": t.lr_schedule}


def final_metrics(reports: dict) -> dict[str, float]:
    """The final validation and test numbers for the HParams table: accuracy and loss, or mAP and micro-F1."""
    multi = any("map" in r for r in reports.values())
    keys = ("map", "micro_f1", "loss") if multi else ("accuracy", "macro_f1", "loss")
    prefix = {"validation": "val", "test": "test"}
    return {f"{prefix[split]}_{k}": float(r[k]) for split, r in reports.items() for k in keys
            if isinstance(r.get(k), (int, float))}


def misclassified(images, probs, truth, classes: list[str], thresholds: list[float] | None = None,
                  limit: int = MISCLASSIFIED) -> tuple[list, list[str]]:
    """Up to `limit` wrongly classified images and their captions (`true -> predicted`): the top-1 class, or
    multi-label (`thresholds`), the set of labels whose score reaches its threshold."""
    import numpy as np

    if thresholds is None:
        predicted = np.asarray(probs).argmax(-1)
        wrong = np.flatnonzero(predicted != np.asarray(truth))[:limit]
        return [images[i] for i in wrong], [f"{classes[truth[i]]} -> {classes[predicted[i]]}" for i in wrong]
    decided = np.asarray(probs) >= np.asarray(thresholds)
    actual = np.asarray(truth) > 0.5
    wrong = np.flatnonzero((decided != actual).any(axis=1))[:limit]

    def names(row):
        return "+".join(c for c, on in zip(classes, row) if on) or "(none)"

    return [images[i] for i in wrong], [f"{names(actual[i])} -> {names(decided[i])}" for i in wrong]


# ---------------------------------------------------------------- finetune-job tensorboard


def event_file(rel: str, own: str) -> tuple[str, str] | None:
    """(run, path inside its tensorboard/) of an object under `--from`: `<run_id>/tensorboard/<rest>`, or
    `tensorboard/<rest>` when `--from` names one run's folder (the run `own`, its last part); None for the rest."""
    if rel.startswith(f"{FOLDER}/"):
        run, rest = own, rel.removeprefix(f"{FOLDER}/")
    else:
        run, _, rest = rel.partition(f"/{FOLDER}/")
        if not rest or "/" in run:
            return None
    parts = [run, *rest.split("/")]
    # A key with a `..` part wrote outside --folder (and its deletion unlinked there); one ending in `/` is a folder
    # marker, "NoSuchKey" at every refresh.
    if any(part in ("", ".", "..") for part in parts):
        return None
    return run, rest


def _write(target: Path, data: bytes) -> None:
    """An event file grown in storage (the chief uploads it whole at every epoch's end) is appended to in place:
    replaced by a new file, it was never read again by TensorBoard's server, which holds the old one open, so a run
    stopped updating on the board while it trained. Any other change is a new file, whole or not at all (a full
    --folder left a cut event file)."""
    try:
        size = target.stat().st_size
        grown = 0 < size <= len(data) and target.read_bytes() == data[:size]
    except OSError:
        grown = False
    if grown:
        with open(target, "r+b") as f:
            f.seek(size)
            try:
                f.write(data[size:])
                f.flush()
            except OSError:  # (a full --folder: the last whole copy stays served)
                f.truncate(size)
                raise
        return
    with atomic_path(target) as part:
        part.write_bytes(data)


def mirror(store: storage.Store, folder: Path, known: dict[str, str], own: str = "run") -> int:
    """Copy every run's event files under `store` (`<run_id>/tensorboard/...`, or one run's `tensorboard/...`)
    into `folder/<run_id>/...`, those whose ETag changed since `known` (updated); removes local files gone from
    storage (a resumed run rewrites its events). Returns how many files were copied."""
    wanted = {}
    for entry in store.list():
        found = event_file(entry.rel, own)
        if found:
            wanted[entry.rel] = (entry, Path(folder) / found[0] / found[1])
    copied, missed = 0, []
    for rel, (entry, target) in wanted.items():
        if known.get(rel) != entry.etag or not target.is_file():
            try:
                data = store.read(rel)
            except StorageError as e:  # one file gone or unreadable (a resumed run rewrites its events): the
                missed.append(str(e))  # others are still copied; it is tried again at the next refresh
                continue
            _write(target, data)
            known[rel] = entry.etag
            copied += 1
    if missed:
        log.warning("event files not copied this time; tried again at the next refresh", files=len(missed),
                    example=missed[0])
    for rel in [r for r in known if r not in wanted]:
        run, rest = event_file(rel, own)
        (Path(folder) / run / rest).unlink(missing_ok=True)
        del known[rel]
    return copied


MARK = ".finetune-job-mirror"  # in a --folder this command made: its files are the mirror's own


DEFAULT_FOLDER = Path("/tmp/finetune-job/tensorboard")


def mirror_folder(folder: Path) -> None:
    """Make `folder` the mirror, empty: runs mirrored by an earlier session (of another prefix, or deleted since)
    were served as current. Only a folder this command made (MARK) is emptied, or the default one holding event
    files alone (an earlier version's mirror); another that holds files is a ConfigError, never emptied (a Keras
    TensorBoard logdir holds event files alone too)."""
    folder = Path(folder)
    try:
        if folder.is_dir() and any(folder.iterdir()):
            older = folder == DEFAULT_FOLDER and all(".tfevents." in p.name for p in folder.rglob("*") if p.is_file())
            if not (folder / MARK).is_file() and not older:
                raise ConfigError(f"tensorboard --folder {folder}: holds files this command did not write; give "
                                  "a new or empty folder (the mirror's files are replaced at every start)")
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARK).touch()
    except OSError as e:
        raise ConfigError(f"tensorboard --folder {folder}: cannot be the mirror ({e.strerror or e})") from None


def serve(source: str, folder: Path, port: int, host: str, refresh_seconds: float, endpoint: str = "",
          stop=lambda: False) -> None:
    """Mirror `source`'s event files into `folder` every `refresh_seconds` and serve TensorBoard on them at
    http://host:port/ until `stop()` (or SIGTERM / Ctrl-C)."""
    import time

    from tensorboard import program

    store = storage.open_store(source, endpoint)
    if not storage.is_s3(source) and within(str(folder), source):  # it mirrored its own mirror at each refresh
        raise ConfigError(f"tensorboard --folder {folder}: inside --from {source}, whose event files it would "
                          "mirror again at every refresh (a/, then src/a/, src/src/a/, ...); choose a folder outside "
                          "it")
    bindable(host, port)
    known: dict[str, str] = {}
    own = source.rstrip("/").rpartition("/")[2] or "run"
    mirror_folder(folder)
    mirror(store, folder, known, own)
    if not known:  # a mistyped prefix, or runs yet to start: said, and served anyway
        log.warning(f"no run's event files under {source} yet (expected {source}/<run_id>/{FOLDER}/); the mirror "
                    "looks again every refresh")
    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(folder), "--port", str(port), "--host", host,
                          "--reload_interval", str(max(1, int(refresh_seconds)))])
    try:
        url = board.launch()
    except program.TensorBoardServerException as e:  # a port in use or out of range, a host it cannot bind
        raise ConfigError(f"tensorboard --host {host} --port {port}: {e.msg.strip()}") from None
    except (SystemExit, OSError) as e:
        raise ConfigError(f"tensorboard --host {host} --port {port}: cannot serve there ({e})") from None
    log.info("tensorboard serving", url=url, source=source, runs=len({event_file(r, own)[0] for r in known}))
    due = time.monotonic() + refresh_seconds
    while not stop():
        time.sleep(0.2)
        if time.monotonic() >= due:
            refresh(store, folder, known, own)
            due = time.monotonic() + refresh_seconds


def bindable(host: str, port: int) -> None:
    """ConfigError naming the reason when `host:port` cannot be bound: TensorBoard prints it on a line of its own and
    exits 1, which read "cannot serve there (1)". Checked again by TensorBoard itself (a port taken in between)."""
    import socket

    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(address)
    except OSError as e:
        raise ConfigError(f"tensorboard --host {host} --port {port}: cannot serve there: "
                          f"{e.strerror or e}") from None


def refresh(store, folder: Path, known: dict[str, str], own: str) -> None:
    """One refresh of the mirror. Storage failing then is a warning, and what is mirrored stays served until the next
    refresh: the first failed refresh stopped the server (exit 4), and under the chart's Deployment each S3 blip
    restarted the pod and its mirror from nothing."""
    try:
        copied = mirror(store, folder, known, own)
    except (StorageError, OSError) as e:  # (a full --folder stopped the server, exit 4)
        log.warning("event files not refreshed; serving what is mirrored, trying again at the next refresh",
                    reason=str(e) if isinstance(e, StorageError) else f"{e.strerror or e}: {e.filename or folder}")
        return
    if copied:
        log.info("event files mirrored", files=copied)


def image_grid(pixels, labels: list[str]) -> bytes:
    """A PNG of images in a row with a caption each (misclassified examples)."""
    from job.evaluate import drawing_class_names

    with drawing_class_names("misclassified_test_images"):
        return _image_grid(pixels, labels)


def _image_grid(pixels, labels: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(pixels)), figsize=(2.2 * max(1, len(pixels)), 2.6))
    for ax, image, caption in zip(list(getattr(axes, "flat", [axes])), pixels, labels):
        ax.imshow(image)
        ax.set_title(caption, fontsize=7)
        ax.axis("off")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
