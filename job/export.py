"""Artifacts of a run: SavedModel with an encoded-bytes signature, model.keras, labels, the formats of
`export.formats` (job/formats.py), reports, plots, resolved config, model card, manifest; uploaded to
<output.uri>/<run_id>/ with `_SUCCESS` written last. `artifacts` builds them all in a local folder.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import job
from job import evaluate, formats, logs, model_card, signals
from job.config import redacted, to_yaml
from job.dataset import decode_and_resize
from job.errors import StorageError
from job.files import MANIFEST, SUCCESS, THRESHOLDS, json_text, sha256, write_labels  # noqa: F401
from job.model import Parts, build, with_thresholds
from job.readers import image_uri
from job.storage import Store

log = logs.get()


def artifacts(run, reports: dict, folder: Path) -> dict:
    """Everything of CONTRACT section 6 but the manifest and `_SUCCESS`, into `folder`, from a trained
    `job.pipeline.Run`; returns {"formats": each format's check, "checked_on": the split it used}."""
    cfg, classes, history, measure = run.cfg, run.classes, run.state.history, run.timings.measure
    with measure("export_clean_copy"):
        clean = clean_copy(run.parts, cfg, classes, run.cluster)
        served = with_thresholds(clean, [t["threshold"] for t in run.thresholds]) if run.multi else clean
    with measure("export_saved_model"):
        write_saved_model(served, classes, run.size, folder / "saved_model", run.multi)
    with measure("export_model_keras"):
        clean.save(folder / "model.keras")
    write_labels(folder / "labels.txt", classes)
    if run.multi:
        write_json(folder / THRESHOLDS, thresholds_file(classes, run.thresholds))
    signals.check("export")  # between its stages: a stop while exporting was ignored until the run was complete
    with measure("formats"):
        checked = _formats(run, served, folder)
    signals.check("export")
    with measure("export_reports"):
        bad = [{"file": image_uri(cfg.data.uri, key), "reason": reason} for key, reason in run.data.bad.items()]
        write_json(folder / "metrics.json", {**reports, "formats": checked["formats"], "bad_images": bad})
        write_json(folder / "history.json", history)
        evaluate.plot_curves(history, folder / "curves.png")
        split = "test" if "test" in reports else "validation"
        if split in reports and not run.multi:  # multi-label: per-label precision and recall in metrics.json
            evaluate.plot_confusion(reports[split]["confusion_matrix"], classes, folder / "confusion_matrix.png",
                                    f"{split} confusion matrix")
        (folder / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        (folder / "MODEL_CARD.md").write_text(model_card.render(
            cfg.run_id, redacted(cfg), classes, run.data.layout.counts(), reports, checked["formats"],
            len(run.data.bad), versions(), run.state.search, refit_fields(run), history, checked["checked_on"],
            run.thresholds if run.multi else (), bool(run.resumed_from.get("splits_changed")),
            _totals(run.data.layout)),
            encoding="utf-8")
    return checked


def _totals(listed) -> dict[str, dict[str, int]] | None:
    """Multi-label: each split's images and those with no label (the card's last rows); None for single-label."""
    if not listed.multi_label:
        return None
    return {split: {"unlabelled": listed.unlabelled(split), "images": listed.count(split)} for split in listed.counts()}


def thresholds_file(classes: list[str], thresholds: list[dict]) -> dict:
    """thresholds.json: each label's threshold and how it was chosen; a label is predicted when its score
    reaches its threshold."""
    return {"rule": "a label is predicted when its score >= its threshold",
            "chosen_by": "each label's best F1 on the validation split; 0.5 where a label has no positive "
                         "validation image (or there is no validation split)",
            "labels": {c: t for c, t in zip(classes, thresholds)}}


def _formats(run, clean: keras.Model, folder: Path) -> dict:
    """The formats of `export.formats`, each checked against the SavedModel on the test split, else
    validation, else (a dataset without either) up to 512 training images; int8 calibrated on up to 256 training
    images picked first and decoded alone."""
    data = run.data
    split = next(s for s in ("test", "validation", "train") if data.count(s))
    # Training images (no test or validation split) are many: a sample of them, not all in memory.
    pixels, labels = data.pixels(split, data.pick(split, 512) if split == "train" else None)

    def calibration():
        rows = data.pixels("train", data.pick("train", 256))[0]
        for start in range(0, len(rows), 32):
            yield np.asarray(rows[start:start + 32])

    e = run.cfg.export
    checked = formats.export_all(folder, clean, run.size, run.classes, e.formats, np.asarray(pixels),
                                 np.asarray(labels), calibration, e.max_accuracy_drop, e.fail_on_accuracy_drop,
                                 logs.get(), run.multi, [t["threshold"] for t in run.thresholds] if run.multi else None,
                                 lambda fmt: converting(run.out, fmt, folder.parent))
    return {"formats": checked, "checked_on": split}


CONVERTING = "checkpoints/converting"  # beside the checkpoints: no artifact, and kept by a rerun's cleanup


@contextlib.contextmanager
def converting(store: Store, fmt: str, scratch: Path):
    """Around one format's conversion and check: a marker in storage counting, per format, the attempts that began
    it and did not end it. TensorFlow's LiteRT converter can abort the whole process (a probe's `double free or
    corruption`, exit 134, after training: its int8 calibration of a weak model), and every later attempt, resumed at
    the export, aborted again. A format two attempts died in is left out (a ConversionError: a listed format fails the
    run, exit 1); one death may be a pod killed meanwhile. The marker is best-effort: storage trouble with it is a
    warning, not the export's end."""
    died = _deaths(store)
    if died.get(fmt, 0) >= 2:
        raise formats.ConversionError(f"{fmt}: {died[fmt]} earlier attempts of this run died inside its conversion; "
                                      f"left out (delete {store.uri}/{CONVERTING} to try it again)")
    _write_deaths(store, {**died, fmt: died.get(fmt, 0) + 1}, scratch)
    try:
        yield
    finally:  # it ended, raising or not: not a death, and an earlier one no longer counts
        _write_deaths(store, {k: v for k, v in died.items() if k != fmt}, scratch)


def _deaths(store: Store) -> dict[str, int]:
    try:
        found = json.loads(store.read(CONVERTING)) if store.exists(CONVERTING) else {}
    except (StorageError, ValueError):  # unreadable: as if none
        return {}
    return {k: v for k, v in found.items() if isinstance(v, int)} if isinstance(found, dict) else {}


def _write_deaths(store: Store, died: dict[str, int], scratch: Path) -> None:
    """The marker as `died` says: deleted when it counts nothing (written `{}` where storage refuses deletes: left
    as it was, it counted deaths that did not happen)."""
    try:
        if not died:
            try:
                return store.delete([CONVERTING])
            except StorageError:
                pass
        (scratch / "converting").write_text(json.dumps(died), encoding="utf-8")
        store.upload(scratch / "converting", CONVERTING)
    except StorageError as e:
        log.warning("conversion marker not written", marker=f"{store.uri}/{CONVERTING}", reason=str(e))


def manifest_fields(run, checked: dict) -> dict:
    """What manifest.json says beside its file list: versions, dataset counts, strategy, formats, timings."""
    cfg, cluster = run.cfg, run.cluster
    return {
        "run_id": cfg.run_id, "versions": versions(), "backbone": cfg.model.backbone, "classes": run.classes,
        "seed": cfg.train.seed, "weights_sha256": weights_fingerprint(run.parts.model),
        # fingerprint: what the listing said when the run started (a complete run asked again compares it)
        "dataset": {"uri": cfg.data.uri, "fingerprint": run.state.dataset, "staging": run.data.mode,
                    "counts": run.data.layout.counts(),
                    **({"images": _totals(run.data.layout)} if run.multi else {}),  # counts are labels' there
                    "bad_images": len(run.data.bad), "identical_images": run.identical},
        # cpu_threads: TensorFlow's op determinism holds for one thread count (the sums in the backward pass are
        # split by it): the same seed on a node of other cores, or under another CPU affinity, trains other weights
        "strategy": {"kind": cluster.kind, "replicas": cluster.replicas, "workers": cluster.num_workers,
                     "mixed_precision": cluster.mixed_precision, "cpu_threads": cpu_threads()},
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "formats": checked["formats"], "formats_checked_on": checked["checked_on"], "timings": dict(run.timings),
        "resumed_from": run.resumed_from or None,  # the timings are this attempt's: where it took over, if it did
        "search": run.state.search,  # train.search's trials at their pause, [] without
        "refit": refit_fields(run),  # train.refit's epochs and rate, {} without
    }


def cpu_threads() -> int:
    """The threads TensorFlow's ops run on: as set (in the job, or TF_NUM_INTRAOP_THREADS), else the CPUs this process
    may use (its affinity)."""
    import os

    from job.distribute import usable_cpus

    from_env = os.environ.get("TF_NUM_INTRAOP_THREADS", "").strip()
    set_here = tf.config.threading.get_intra_op_parallelism_threads()
    return set_here or (int(from_env) if from_env.isdigit() else 0) or usable_cpus()


def refit_fields(run) -> dict:
    """train.refit's plan (job/refit.py) without the validation report it keeps: {} without a refit."""
    return {k: v for k, v in run.state.refit.items() if k != "validation"}


def weights_fingerprint(model: keras.Model) -> str:
    """sha256 over all weights: equal on every worker of a multi-worker run."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(w.tobytes())
    return h.hexdigest()


def clean_copy(parts: Parts, cfg, classes: list[str], cluster) -> keras.Model:
    """The trained model as it should be saved: float32, outside any distribution strategy.

    What gets saved must not carry MirroredVariables or a mixed-precision policy: under those, the model
    is rebuilt and its weights copied over; on one device in float32 it already is what gets saved.
    """
    if cluster.kind == "one_device" and not cluster.mixed_precision:
        return parts.model
    keras.mixed_precision.set_global_policy("float32")
    fresh = build(cfg.model.backbone, None, tuple(cfg.data.image_size), len(classes),
                  cfg.model.head_units, cfg.model.head_dropout, from_scratch=parts.from_scratch,
                  multi_label=cfg.task == "multi_label")
    fresh.model.set_weights(parts.model.get_weights())
    return fresh.model


def write_saved_model(model: keras.Model, classes: list[str], image_size: tuple[int, int], path: Path,
                      multi: bool = False) -> None:
    """SavedModel whose `serving_default` takes `image_bytes` (1-D tf.string of encoded JPEG/PNG) and returns
    `probabilities` [batch, classes] and `label` [batch]; decoding and resizing happen inside. Multi-label
    (`model` from `with_thresholds`): `scores` and `above` [batch, labels], and `labels` [batch, labels]
    tf.string, each label's name where its score reaches its threshold, else "".

    A second signature, `serving_pixels`, takes `images`: float32 [batch, h, w, 3] RGB pixels in 0..255,
    already resized, and returns the numbers only (`probabilities`; multi-label `scores` and `above`): the LiteRT
    formats are converted from it (job/formats.py), and a string output there made the "full integer" int8 file
    carry string tensors and a second output that its one-output readers took by position."""
    labels = tf.constant(classes)
    shape = tf.TensorSpec([*image_size, 3], tf.float32)

    # One trace of the model serves both signatures: `serve` calls the traced `outputs` (about a fifth
    # less time to write than tracing the model once per signature).
    @tf.function(input_signature=[tf.TensorSpec([None, *image_size, 3], tf.float32, name="images")])
    def outputs(images):
        if multi:
            out = model(images, training=False)
            return {"scores": out["scores"], "above": out["above"]}
        return {"probabilities": model(images, training=False)}

    def answer(image_bytes):
        out = outputs(tf.map_fn(lambda b: decode_and_resize(b, image_size), image_bytes, fn_output_signature=shape))
        if multi:
            out["labels"] = tf.where(out["above"] > 0.5, labels[tf.newaxis, :], tf.constant(""))
        else:
            out["label"] = tf.gather(labels, tf.argmax(out["probabilities"], axis=-1))
        return out

    def nothing():  # a batch of 0 images failed in BatchNormalization on CPU (oneDNN: "Incompatible shapes")
        n = len(classes)
        if multi:
            return {"scores": tf.zeros([0, n]), "above": tf.zeros([0, n]), "labels": tf.zeros([0, n], tf.string)}
        return {"probabilities": tf.zeros([0, n]), "label": tf.zeros([0], tf.string)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(image_bytes):
        return tf.cond(tf.size(image_bytes) > 0, lambda: answer(image_bytes), nothing)

    # A plain tf.Module holding the TensorFlow variables the two functions read and the functions, not Keras'
    # ExportArchive tracking the model: the archive walked every layer's trackable children and wrote each variable
    # twice (26 MB against 13 MB for MobileNet at 32x32; 4.6 s against 2.1 s to write on 2 cores). The signatures
    # compute the same, bit for bit. The variables are the traced functions' own (what the archive keeps too): the
    # LiteRT converter freezes those into constants, where Keras' variable wrappers left READ_VARIABLE ops behind.
    # In name order: a concrete function lists its captured variables in an order that changes from process to
    # process, which made two runs of one seed write the same values in different orders.
    served = tf.Module()
    served.model_variables = sorted(serve.get_concrete_function().variables, key=lambda v: v.name)
    served.outputs, served.serve = outputs, serve
    tf.saved_model.save(served, str(path), signatures={"serving_default": serve, "serving_pixels": outputs})


def write_json(path: Path, data) -> None:
    """Strict JSON: a score that is NaN (the mAP of a split whose images carry no label) is null."""
    path.write_text(json_text(data, indent=2) + "\n", encoding="utf-8")




def versions() -> dict[str, str]:
    return {"finetune_job": job.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def write_manifest(folder: Path, extra: dict) -> dict:
    """manifest.json: every file (bytes, sha256) plus what `extra` says (versions, counts, timings)."""
    files = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (MANIFEST, SUCCESS)
    }
    manifest = {**extra, "files": files}
    write_json(folder / MANIFEST, manifest)
    return manifest


# The folders and the files the job writes at the top of a run's folder (but the manifest and _SUCCESS): the formats'
# as formats.FILES names them (a file each, and its description `<file>.json`), and the others
ARTIFACT_FOLDERS = ("saved_model", *(f.split("/", 1)[0] for f in formats.FILES.values() if "/" in f))
ARTIFACT_FILES = {"model.keras", "labels.txt", THRESHOLDS, "metrics.json", "history.json", "curves.png",
                  "confusion_matrix.png", "config.yaml", "MODEL_CARD.md",
                  *(name for f in formats.FILES.values() if "/" not in f for name in (f, f"{f}.json"))}


def stale_artifacts(found: list[str], written: set[str]) -> list[str]:
    """What an earlier attempt uploaded that this one did not write (a `model.tflite.json` of a format dropped on the
    resume stayed beside the new `_SUCCESS`): only names the job writes, and the SavedModel folders unless a run or
    lease lies in them. Never a user's file, checkpoints, TensorBoard's files, the lease, or a run nested below."""
    nested = {rel.split("/", 1)[0] for rel in found if rel.rsplit("/", 1)[-1] in (SUCCESS, "_LEASE") and "/" in rel}

    def artifact(rel: str) -> bool:
        top = rel.split("/", 1)[0]
        return rel in ARTIFACT_FILES or (top in ARTIFACT_FOLDERS and top not in nested)

    return sorted(rel for rel in found if artifact(rel) and rel not in written)


def upload(folder: Path, store: Store) -> None:
    """Upload every file, remove the artifacts an earlier attempt left that this one has not (a format it no longer
    writes), then the manifest, then `_SUCCESS`: a run is complete only when that exists."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (MANIFEST, SUCCESS)]
    with ThreadPoolExecutor(8, thread_name_prefix="upload") as pool:
        for f in [pool.submit(store.upload, p, p.relative_to(folder).as_posix()) for p in files]:
            f.result()
    store.delete(stale_artifacts([e.rel for e in store.list()], {p.relative_to(folder).as_posix() for p in files}))
    store.upload(folder / MANIFEST, MANIFEST)
    (folder / SUCCESS).write_text("", encoding="utf-8")
    store.upload(folder / SUCCESS, SUCCESS)
