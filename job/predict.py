"""`finetune-job predict`: classify images with an exported run, after checking its files.

The run is read from a local folder in place, or from s3:// into a temporary folder that is removed
when the command ends. Its files are checked against the manifest's sha256 before anything is loaded.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

from job import logs, storage
from job.errors import ConfigError, DataError, StorageError
from job.files import MANIFEST, SUCCESS, THRESHOLDS, read_labels, sha256
from job.uris import split_s3


def artifact(fmt: str) -> str:
    """The file or folder of a format inside a run."""
    from job.formats import FILES

    return "saved_model" if fmt == "saved_model" else FILES[fmt]


@contextlib.contextmanager
def fetched_run(model_uri: str, endpoint: str = "", fmt: str = "saved_model") -> Iterator[Path]:
    """A complete exported run as a local folder, the format's files and the labels checked against the manifest."""
    store = storage.open_store(model_uri, endpoint)
    if not store.exists(SUCCESS):
        hint = _where_runs_are(store, model_uri, endpoint)
        raise StorageError(f"{model_uri}: not a complete run (no {SUCCESS}){hint}")
    target = artifact(fmt)

    def needed(rel: str) -> bool:
        # the artifact, its folder's files, or its description beside it (model.tflite.json)
        return rel in (MANIFEST, "labels.txt", THRESHOLDS, f"{target}.json") or rel == target or \
            rel.startswith(target + "/")

    with contextlib.ExitStack() as stack:
        if isinstance(store, storage.LocalStore):
            folder = store.root
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="finetune-job-model-")))
            folder, _ = storage.stage(store, [e for e in store.list() if needed(e.rel)], tmp)
        manifest = _manifest(folder / MANIFEST, model_uri)
        if not any(rel == target or rel.startswith(target + "/") for rel in manifest["files"]):
            formats = manifest.get("formats") or {}
            kept = ", ".join(f for f in formats if "error" not in (formats[f] or {})) or "none"
            failed = f"; {fmt} failed: {formats[fmt]['error']}" if "error" in (formats.get(fmt) or {}) else ""
            raise ConfigError(f"--format {fmt}: the run {model_uri} was not exported as {fmt} (it was as: {kept}"
                              f"{failed})")
        for rel, info in manifest["files"].items():
            if needed(rel) and not (folder / rel).is_file():
                raise StorageError(f"{model_uri}/{rel}: missing (the manifest lists it)")
            if needed(rel) and sha256(folder / rel) != info["sha256"]:
                raise StorageError(f"{model_uri}/{rel}: does not match the manifest's checksum")
        # A file of the artifact that the manifest does not list cannot be checked: a manifest edited to drop a
        # corrupted one loaded it, a traceback (exit 1). Hidden files (.DS_Store of a copy) are not the model's.
        inside = [p for p in ([folder / target] if (folder / target).is_file() else (folder / target).rglob("*"))
                  if p.is_file()]
        # and the side files predict reads: labels.txt always (a manifest edited to drop it had a reordered one
        # read unchecked), thresholds.json where it is (a stray one made a single-label run multi-label: KeyError)
        if "labels.txt" not in manifest["files"]:
            raise StorageError(f"{model_uri}/{MANIFEST}: does not list labels.txt, so the labels cannot be checked; "
                               "export the run again")
        inside += [folder / THRESHOLDS] * (folder / THRESHOLDS).is_file()
        unlisted = sorted(r for r in (p.relative_to(folder).as_posix() for p in inside) if r not in manifest["files"]
                          and not any(part.startswith(".") for part in r.split("/")))
        if unlisted:
            raise StorageError(f"{model_uri}/{unlisted[0]}: not in the manifest, so it cannot be checked; remove it "
                               "if it is a stray file, else export the run again")
        yield folder


def _manifest(path: Path, model_uri: str) -> dict:
    """The run's manifest.json, or StorageError (exit 4): without a readable one nothing can be checked (a
    missing or cut manifest was a traceback, exit 1)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StorageError(f"{model_uri}/{MANIFEST}: missing, so the run's files cannot be checked; export the run "
                           "again (delete its _SUCCESS and rerun train)") from None
    except (OSError, ValueError) as e:
        raise StorageError(f"{model_uri}/{MANIFEST}: unreadable ({type(e).__name__}), so the run's files cannot be "
                           "checked; export the run again (delete its _SUCCESS and rerun train)") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise StorageError(f"{model_uri}/{MANIFEST}: not a run's manifest (no \"files\"); export the run again")
    return manifest


def _where_runs_are(store, model_uri: str, endpoint: str) -> str:
    """Why --model is no run, where it can tell: no such folder, the folder of several runs, a folder inside one
    (each was "not a complete run" alone)."""
    if isinstance(store, storage.LocalStore) and not store.root.is_dir():
        return ": a file, not a run's folder" if store.root.exists() else ": no such folder"
    runs = sorted(rel.rpartition("/")[0] for rel in (e.rel for e in store.list()) if rel.count("/") == 1
                  and rel.endswith(f"/{SUCCESS}"))
    if runs:
        return (f"; it holds {len(runs)} complete run(s) ({', '.join(runs[:3])}{', ...' * (len(runs) > 3)}): give "
                f"one, e.g. --model {storage.join(model_uri, runs[0])}")
    parent = model_uri.rstrip("/").rpartition("/")[0]
    if parent and parent not in ("s3:/", "s3:") and storage.open_store(parent, endpoint).exists(SUCCESS):
        return f"; it is inside the run {parent}: give that folder"
    return ""


def read_image(uri: str, endpoint: str = "") -> bytes:
    """One image's bytes, from a local path or an s3:// URI."""
    if storage.is_s3(uri):
        if not split_s3(uri)[1]:  # `s3://bucket`: its parent `s3:` was read as a local folder
            raise ConfigError(f"{uri}: names a bucket, not an image (s3://bucket/key)")
        parent, _, name = uri.rpartition("/")
        store = storage.open_store(parent, endpoint)
        try:
            return store.read(name)
        except StorageError:
            if store.exists(name):
                raise
            # A GET's NoSuchKey (exit 4), for a prefix or a pattern that no shell expands
            pattern = any(c in name for c in "*?[")
            why = "no such object; s3:// URIs are not patterns: name each object" if pattern else \
                f"a prefix: name its image objects, e.g. {uri}/x.jpg" if store.holds_any(name) else "no such object"
            raise ConfigError(f"{uri}: cannot read image ({why})") from None
    try:
        return Path(uri).read_bytes()
    except OSError as e:
        raise ConfigError(f"{uri}: cannot read image ({e.strerror})") from None


def predict(model_uri: str, images: list[str], top_k: int | None, endpoint: str = "",
            fmt: str = "saved_model") -> Iterator[dict]:
    """One result per image (local path or s3:// URI), in order, as each is classified with the chosen artifact:
    the top-k labels with probabilities (`top`); a multi-label run: the labels above their thresholds with their
    scores (`labels`), and every score. An image that cannot be decoded gives `{"image", "error"}` and the others
    are still classified (one bad file among many loses nothing); one that cannot be read (a missing file, storage
    trouble) raises, after the results before it."""
    check_images(images)  # a mistyped path fails before the model is fetched and TensorFlow loads (job.export)

    with fetched_run(model_uri, endpoint, fmt) as folder:
        labels = read_labels(folder / "labels.txt")
        multi = (folder / THRESHOLDS).is_file()
        logs.quiet_tensorflow()  # TensorFlow loads once the run is found: a mistyped --model took 10 s to be said
        classify = _classifier(fmt, folder / artifact(fmt), multi)
        for uri in images:
            blob = read_image(uri, endpoint)
            try:
                yield _result(uri, classify(uri, blob), labels, top_k, multi)
            except DataError as e:
                yield {"image": uri, "error": str(e)}


def check_images(images: list[str]) -> None:
    """ConfigError for the first image argument that cannot be read: a mistyped local path, a folder, an s3://
    prefix ending in `/`."""
    for uri in images:
        why = ("a prefix: name its image objects, e.g. " + uri + "x.jpg" if uri.endswith("/") else "") \
            if storage.is_s3(uri) else _unreadable(Path(uri))
        if why:
            raise ConfigError(f"{uri}: cannot read image ({why})")


def _unreadable(path: Path) -> str:
    """Why a local image argument cannot be read, or "" (a pipe such as /dev/stdin is fine)."""
    try:
        if path.is_dir():
            return "a folder: name its image files, e.g. folder/*.jpg"
        return "" if path.exists() else "no such file"
    except OSError as e:  # a name too long, a folder that cannot be entered
        return e.strerror or str(e)


def _result(uri: str, output, labels: list[str], top_k: int | None, multi: bool) -> dict:
    """Single-label: the `top_k` (default 3) most probable labels. Multi-label: the labels above their thresholds,
    the `top_k` highest of them if given (it was ignored without a word); every score in "scores"."""
    import numpy as np

    # Highest first, ties in label order: the model's own `label` (argmax) names the first of tied labels, and int8's
    # uint8 scores tie often (argsort()[::-1] put the last first).
    if multi:
        scores, above = output
        chosen = [{"label": labels[i], "score": float(scores[i])} for i in np.argsort(-scores, kind="stable")
                  if above[i]]
        return {"image": uri, "labels": chosen[:top_k], "scores": {c: float(v) for c, v in zip(labels, scores)}}
    order = np.argsort(-output, kind="stable")[:top_k or 3]
    return {"image": uri, "top": [{"label": labels[i], "probability": float(output[i])} for i in order]}


def _classifier(fmt: str, path: Path, multi: bool = False):
    """(uri, encoded bytes) -> probabilities, or multi-label (scores, above 0/1). The SavedModel decodes itself;
    the other formats get the pixels the job's own decoder makes, as in training."""
    import tensorflow as tf

    from job.headers import misread, unread_format, unread_reason

    if fmt in ("saved_model", "tf_serving"):
        serve = tf.saved_model.load(str(path)).signatures["serving_default"]

        def probabilities(blob: bytes):
            out = serve(image_bytes=tf.constant([blob]))
            if multi:
                return out["scores"].numpy()[0], out["above"].numpy()[0] > 0.5
            return out["probabilities"].numpy()[0]
    else:
        from job.dataset import decode_and_resize
        from job.formats import runner

        run = runner(fmt, path, multi)
        size = tuple(json.loads(Path(f"{path}.json").read_text(encoding="utf-8"))["input"]["shape"][1:3])

        def probabilities(blob: bytes):
            out = run.predict(decode_and_resize(tf.constant(blob), size).numpy()[None])
            return (out[0][0], out[1][0] > 0.5) if multi else out[0]

    def classify(uri: str, blob: bytes):
        if not blob:  # as training, validate and pack say it
            raise DataError(f"{uri}: empty (0 bytes)")
        unread = unread_format(blob)  # an RGB WebP was classified, though training leaves WebP out (it may abort)
        if unread:
            raise DataError(f"{uri}: {unread_reason(unread)} (training leaves them out too)")
        why = misread(blob)  # decodable, but not to the picture it holds
        if why:
            raise DataError(f"{uri}: {why}")
        try:
            return probabilities(blob)
        except tf.errors.InvalidArgumentError:
            raise DataError(f"{uri}: not a decodable image") from None

    return classify
