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

from job import storage
from job.errors import ConfigError, DataError, StorageError


@contextlib.contextmanager
def fetched_run(model_uri: str, endpoint: str = "") -> Iterator[Path]:
    """A complete exported run as a local folder, its SavedModel and labels checked against the manifest."""
    from job.export import MANIFEST, SUCCESS, sha256

    store = storage.open_store(model_uri, endpoint)
    if not store.exists(SUCCESS):
        raise StorageError(f"{model_uri}: not a complete run (no {SUCCESS})")
    with contextlib.ExitStack() as stack:
        if isinstance(store, storage.LocalStore):
            folder = store.root
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="finetune-job-model-")))
            wanted = [e for e in store.list() if e.rel in (MANIFEST, "labels.txt") or e.rel.startswith("saved_model/")]
            storage.stage(store, wanted, tmp)
            folder = tmp / store.bucket / store.prefix
        manifest = json.loads((folder / MANIFEST).read_text())
        for rel, info in manifest["files"].items():
            needed = rel.startswith("saved_model/") or rel == "labels.txt"
            if needed and (not (folder / rel).is_file() or sha256(folder / rel) != info["sha256"]):
                raise StorageError(f"{model_uri}/{rel}: does not match the manifest's checksum")
        yield folder


def read_images(images: list[str], endpoint: str = "") -> list[bytes]:
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
    return blobs


def predict(model_uri: str, images: list[str], top_k: int, endpoint: str = "") -> list[dict]:
    """Top-k labels with probabilities for each image (local path or s3:// URI)."""
    with fetched_run(model_uri, endpoint) as folder:
        blobs = read_images(images, endpoint)
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
            results.append({"image": uri, "top": [{"label": labels[i], "probability": float(probs[i])}
                                                  for i in order]})
    return results
