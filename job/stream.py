"""`data.staging: stream`: tar shards read from storage, several at a time, in a new seeded order every
epoch, through a shuffle buffer; each worker of a multi-worker run reads its own shards. `allowed` selects
the samples of a split by key (a validation split carved out of train, bad images left out).

What is cheap to keep is kept: with `keep` (a local folder; job/readers.py passes one when the disk has
room for h x w x 3 bytes per image), each shard's samples of a split are decoded once, as the image cache of
copy mode stores them (uint8 rows at the training size), and written beside it when the shard was read to
its end; later epochs read those rows instead of storage and the decoder. The shards' encoded images never
reach the disk. Rows come out rounded to uint8 either way, as in copy mode, so the first epoch and the next
see the same pixels.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from job.dataset import AUTOTUNE, decode_and_resize
from job.errors import JobError, carry
from job.files import atomic_path
from job.readers import read_shards
from job.storage import Entry, Store

SHUFFLE_BUFFER = 2048
PARALLEL_SHARDS = 4


def kept_name(rel: str, etag: str, mine: list[str], image_size: tuple[int, int], multi: bool,
              classes: list[str]) -> str:
    """The files a shard's decoded samples are kept in (`<name>.rows`, `<name>.labels.npy`): named by the
    shard's version, the samples it holds of this split (`mine`, sorted), the size, the label kind and the classes
    its labels index (a classes.txt reordered or grown met the old indices: every class trained under another's
    name), so that nothing stale is ever read back."""
    key = "\n".join([rel, etag, f"{image_size[0]}x{image_size[1]}", str(multi), json.dumps(classes), *mine])
    return f"shard-{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def samples_of(rels: list[str], allowed: set[str]) -> dict[str, list[str]]:
    """Each shard's keys among `allowed` (`<shard>:<member>`), sorted: found in one pass (a scan of every key per
    shard took 58 s at 300,000 images in 790 shards, at every pass over the data)."""
    held: dict[str, list[str]] = {rel: [] for rel in rels}
    for key in sorted(allowed):  # (a shard's path has no colon: shards.SHARD; a member's may)
        shard, colon, _ = key.partition(":")
        if colon and shard in held:
            held[shard].append(key)
    return held


CHUNK = 64  # images per element of a shard's generator: one Python step and one decoder call for many images


def _kept(rows: Path, labels_file: Path, image_size: tuple[int, int]):
    """A kept shard's (images, labels) chunks, or None when it is not (completely) there."""
    if not (rows.is_file() and labels_file.is_file()):
        return None
    labels = np.load(labels_file)
    row_bytes = image_size[0] * image_size[1] * 3
    if rows.stat().st_size != len(labels) * row_bytes:
        return None

    def chunks():
        with open(rows, "rb") as f:  # plain reads: nothing mapped, nothing resident
            for start in range(0, len(labels), CHUNK):
                chunk = labels[start:start + CHUNK]
                yield np.frombuffer(f.read(len(chunk) * row_bytes), np.uint8).reshape(-1, *image_size, 3), chunk

    return chunks()


@functools.cache
def _decoder(image_size: tuple[int, int]):
    """Encoded images [n] -> uint8 [n, h, w, 3], rounded as copy mode's image cache rounds them; one graph."""
    def decode(encoded):
        return tf.map_fn(lambda e: tf.cast(tf.round(decode_and_resize(e, image_size)), tf.uint8), encoded,
                         fn_output_signature=tf.TensorSpec([*image_size, 3], tf.uint8))

    return tf.function(decode, input_signature=[tf.TensorSpec([None], tf.string)])


def _decoded(store: Store, rel: str, classes: list[str], allowed: set[str], image_size: tuple[int, int],
             multi: bool, kept: Path | None, listed: Entry | None = None):
    """(uint8 images [n, h, w, 3], labels [n]) chunks of one shard's allowed samples: from its kept files, or
    read from storage and decoded, then kept (when `kept` is set and the shard was read to its end)."""
    rows, labels_file = (kept.with_name(kept.name + ".rows"), kept.with_name(kept.name + ".labels.npy")) \
        if kept is not None else (None, None)
    again = _kept(rows, labels_file, image_size) if kept is not None else None
    if again is not None:
        yield from again
        return
    empty = np.zeros((0, len(classes)), np.float32) if multi else np.zeros((0,), np.int32)
    labels = []
    with contextlib.ExitStack() as stack:
        out = None
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context(open(stack.enter_context(atomic_path(rows)), "wb"))
        for chunk in _chunks(read_shards(store, [rel], classes, allowed, multi=multi,
                                         versions={rel: listed} if listed else None)):
            images = _decoder(tuple(image_size))(tf.constant([encoded for encoded, _ in chunk])).numpy()
            ys = np.stack([_target(label, len(classes), multi) for _, label in chunk]).astype(empty.dtype)
            if out is not None:
                out.write(images.tobytes())
                labels.append(ys)
            yield images, ys
        if out is not None:  # reached only when the shard was read to its end; the rows land last
            out.close()
            with atomic_path(labels_file) as tmp_labels, open(tmp_labels, "wb") as f:
                np.save(f, np.concatenate(labels) if labels else empty)


def _chunks(samples):
    """(encoded, label) lists of up to CHUNK samples."""
    chunk = []
    for _, encoded, label in samples:
        chunk.append((encoded, label))
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _target(label, n: int, multi: bool):
    if not multi:
        return label
    hot = np.zeros(n, np.float32)
    hot[list(label)] = 1.0
    return hot


def dataset(store: Store, rels: list[str], classes: list[str], allowed: set[str], image_size: tuple[int, int],
            batch_size: int, *, shuffle: bool = False, seed: int = 0, repeat: bool = False,
            multi: bool = False, keep: Path | None = None,
            versions: dict[str, Entry] | None = None) -> tf.data.Dataset:
    """(image float32 0..255, label) batches streamed from the shards: a seeded new shard order every pass,
    PARALLEL_SHARDS shards read at a time, then a shuffle buffer within the pass (`repeat`: pass after pass, each
    every sample once). `multi`: labels float32 [labels] 0/1. `keep`: the folder where decoded shards are kept
    (`versions`: each shard's listing: every read is checked against it, and its ETag is part of the kept file's
    name)."""
    label_spec = tf.TensorSpec([None, len(classes)], tf.float32) if multi else tf.TensorSpec([None], tf.int32)
    signature = (tf.TensorSpec([None, *image_size, 3], tf.uint8), label_spec)
    versions = versions or {}
    files = {rel: None for rel in rels}
    if keep is not None:
        held = samples_of(rels, allowed)
        files = {rel: keep / kept_name(rel, versions[rel].etag if rel in versions else "", held[rel], image_size,
                                       multi, classes) for rel in rels}

    def shard(rel):
        rel = rel.decode()
        try:
            yield from _decoded(store, rel, classes, allowed, image_size, multi, files[rel], versions.get(rel))
        except JobError as e:  # TensorFlow passes it on as an UnknownError: the CLI reports this one
            carry(e)
            raise

    order = tf.data.Dataset.from_tensor_slices(rels)
    if shuffle:
        order = order.shuffle(len(rels), seed=seed, reshuffle_each_iteration=True)
    ds = order.interleave(
        lambda rel: tf.data.Dataset.from_generator(shard, args=(rel,), output_signature=signature),
        cycle_length=min(PARALLEL_SHARDS, len(rels)), num_parallel_calls=AUTOTUNE, deterministic=True).unbatch()
    ds = ds.map(lambda image, label: (tf.cast(image, tf.float32), label), num_parallel_calls=AUTOTUNE,
                deterministic=True)
    if shuffle:
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    if repeat:  # after the shuffle buffer: each pass is every sample once (repeated before it, a pass of fewer
        ds = ds.repeat()  # samples than the buffer was a random multiset of two or three passes)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def pixels(store: Store, rels: list[str], classes: list[str], allowed: set[str], image_size: tuple[int, int],
           multi: bool = False, versions: dict[str, Entry] | None = None,
           spill: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A split as arrays: uint8 [n, h, w, 3] and labels (evaluation of the exported formats). With `spill` (a folder),
    the images are written to a file there and mapped, as copy mode maps its image cache: held in memory, a streamed
    test split of 30,000 images at 224x224 took 6.8 GB more of the pod's memory at the export. The file has no name
    once mapped (nothing left behind)."""
    empty = np.zeros((0, len(classes)), np.float32) if multi else np.zeros((0,), np.int32)
    xs, ys, n = [], [], 0
    with contextlib.ExitStack() as stack:
        out = None
        if spill is not None:
            spill.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context(tempfile.TemporaryFile(dir=spill))
        for images, labels in dataset(store, rels, classes, allowed, image_size, 64, multi=multi, versions=versions):
            rows = tf.cast(images, tf.uint8).numpy()
            if out is not None:
                out.write(rows.tobytes())
            else:
                xs.append(rows)
            ys.append(labels.numpy())
            n += len(rows)
        labels = np.concatenate(ys) if ys else empty
        if n == 0:
            return np.zeros((0, *image_size, 3), np.uint8), labels
        if out is None:
            return np.concatenate(xs), labels
        out.flush()
        return np.memmap(out, np.uint8, "r", shape=(n, *image_size, 3)), labels  # (the map outlives the file object)
