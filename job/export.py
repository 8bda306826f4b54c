"""Artifacts of a run: SavedModel with an encoded-bytes signature, model.keras, labels, reports,
plots, resolved config, manifest; uploaded to <output.uri>/<run_id>/ with `_SUCCESS` written last.
"""

from __future__ import annotations

import hashlib
import json
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import job
from job import model as model_lib
from job.dataset import decode_and_resize
from job.storage import Store

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"


def clean_copy(parts: model_lib.Parts, cfg, classes: list[str], cluster) -> keras.Model:
    """The trained model as it should be saved: float32, outside any distribution strategy.

    What gets saved must not carry MirroredVariables or a mixed-precision policy: under those, the model
    is rebuilt and its weights copied over; on one device in float32 it already is what gets saved.
    """
    if cluster.kind == "one_device" and not cluster.mixed_precision:
        return parts.model
    keras.mixed_precision.set_global_policy("float32")
    fresh = model_lib.build(cfg.model.backbone, None, tuple(cfg.data.image_size), len(classes),
                            cfg.model.head_units, cfg.model.head_dropout)
    fresh.model.set_weights(parts.model.get_weights())
    return fresh.model


def write_saved_model(model: keras.Model, classes: list[str], image_size: tuple[int, int], path: Path) -> None:
    """SavedModel whose `serving_default` takes `image_bytes` (1-D tf.string of encoded JPEG/PNG) and returns
    `probabilities` [batch, classes] and `label` [batch]; decoding and resizing happen inside.

    A second signature, `serving_pixels`, takes `images`: float32 [batch, h, w, 3] RGB pixels in 0..255,
    already resized; the LiteRT and ONNX formats are converted from it (job/formats.py)."""
    labels = tf.constant(classes)
    shape = tf.TensorSpec([*image_size, 3], tf.float32)

    # One trace of the model serves both signatures: `serve` calls the traced `outputs` (about a fifth
    # less time to write than tracing the model once per signature).
    @tf.function(input_signature=[tf.TensorSpec([None, *image_size, 3], tf.float32, name="images")])
    def outputs(images):
        probs = model(images, training=False)
        return {"probabilities": probs, "label": tf.gather(labels, tf.argmax(probs, axis=-1))}

    def serve(image_bytes):
        return outputs(tf.map_fn(lambda b: decode_and_resize(b, image_size), image_bytes, fn_output_signature=shape))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serving_default", fn=serve,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.add_endpoint(name="serving_pixels", fn=outputs)
    archive.write_out(str(path), verbose=False)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=_plain) + "\n")


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def upload(folder: Path, store: Store) -> None:
    """Upload every file, then the manifest, then `_SUCCESS`: a run is complete only when that exists."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (MANIFEST, SUCCESS)]
    with ThreadPoolExecutor(8, thread_name_prefix="upload") as pool:
        for f in [pool.submit(store.upload, p, p.relative_to(folder).as_posix()) for p in files]:
            f.result()
    store.upload(folder / MANIFEST, MANIFEST)
    (folder / SUCCESS).write_text("")
    store.upload(folder / SUCCESS, SUCCESS)
