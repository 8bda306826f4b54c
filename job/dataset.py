"""tf.data pipelines over staged files: the decode check, image batches, and cached base features.

The same `decode_and_resize` runs in training and inside the exported SavedModel, so serving sees
exactly the preprocessing the model was trained with. Decoding and antialiased resizing cost more
than a training step of a small model on a GPU; given a cache folder, `image_dataset` does them once
and later epochs read the decoded pixels back from disk (the page cache, in practice).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from job import logs, metrics
from job.files import atomic_path
from job.headers import EMPTY, UNREADABLE, header

AUTOTUNE = tf.data.AUTOTUNE


def decode_and_resize(encoded: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Encoded JPEG/PNG/BMP/GIF bytes -> float32 RGB [h, w, 3], whole numbers in 0..255.

    Grayscale, palette, RGBA, CMYK and 16-bit inputs all come out as 8-bit RGB (TensorFlow's decoders
    convert them; not a palette BMP's colours: `headers.PALETTE_BMP`); animated GIFs give their first frame.
    The resized pixels are rounded, as the image cache keeps them (uint8): training, evaluation, the exported
    signature and `predict` see the same pixels of a file (the signature's unrounded floats moved a probability
    by up to 0.02 from what evaluation measured).
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
    image = tf.round(tf.image.resize(image, image_size, method="bilinear", antialias=True))
    return tf.ensure_shape(image, [*image_size, 3])


def find_bad(paths: list[str], max_pixels: int) -> dict[str, str]:
    """{path: reason} for images the job cannot train on: larger than `max_pixels` or misread by TensorFlow's
    decoder (both from the header, so a huge image is never decoded), or not decodable by TensorFlow's own
    decoders (the ones training uses, so a file that passes here cannot fail mid-epoch)."""
    with ThreadPoolExecutor(8) as pool:
        headers = list(pool.map(header, paths))
    bad = {p: UNREADABLE for p in paths if not os.access(p, os.R_OK)}
    bad |= {p: EMPTY for p in paths if p not in bad and not os.path.getsize(p)}
    bad |= _from_headers(paths, headers, max_pixels)  # (an unreadable file has no header)
    rest = [p for p in paths if p not in bad]
    encoded = tf.data.Dataset.from_tensor_slices(rest).map(tf.io.read_file) if rest else None
    return bad | {p: "cannot be decoded" for p in _undecodable(rest, encoded)}


def find_bad_blobs(named: list[tuple[str, bytes]], max_pixels: int) -> dict[str, str]:
    """`find_bad` for images in memory: {name: reason}."""
    names = [n for n, _ in named]
    bad = {n: EMPTY for n, b in named if not b}
    bad |= _from_headers(names, [header(io.BytesIO(b)) for _, b in named], max_pixels)
    rest = [(n, b) for n, b in named if n not in bad]
    encoded = tf.data.Dataset.from_tensor_slices([b for _, b in rest]) if rest else None
    return bad | {n: "cannot be decoded" for n in _undecodable([n for n, _ in rest], encoded)}


def _from_headers(names: list[str], headers: list[tuple], max_pixels: int) -> dict[str, str]:
    """{name: reason} for the images their headers (`header`) rule out: too large, or misread by the decoder."""
    bad = {}
    for name, (size, why) in zip(names, headers):
        if size and size[0] * size[1] > max_pixels:
            w, h = size
            bad[name] = f"too large: {w}x{h} = {w * h:,} pixels (data.max_image_pixels {max_pixels:,})"
        elif why:
            bad[name] = why
    return bad


def _undecodable(names: list[str], encoded: tf.data.Dataset | None) -> list[str]:
    """The names whose encoded bytes TensorFlow's decoders cannot read, found in one parallel pass."""
    if encoded is None:
        return []

    def probe(index, data):
        return index, tf.shape(tf.io.decode_image(data, channels=3, expand_animations=False))[0]

    ds = tf.data.Dataset.zip(tf.data.Dataset.range(len(names)), encoded)
    ds = ds.map(probe, num_parallel_calls=AUTOTUNE, deterministic=False).ignore_errors()
    with logs.native_lines_filtered():  # libjpeg's own lines on a damaged JPEG ("Improper call to JPEG library")
        good = {int(index) for batch, _ in ds.batch(1024).as_numpy_iterator() for index in batch}
    return [n for i, n in enumerate(names) if i not in good]


def _labels(labels) -> np.ndarray:
    """Labels as an array: int32 [n] class indices, or float32 [n, labels] multi-label targets as given."""
    labels = np.asarray(labels)
    return labels if labels.dtype == np.float32 else labels.astype(np.int32).reshape(-1)


def _label_spec(labels: np.ndarray):
    """(dtype, shape of a batch) of the labels: what a numpy_function returns and ensure_shape checks."""
    return tf.as_dtype(labels.dtype), [None, *labels.shape[1:]]


def image_dataset(paths: list[str], labels, image_size: tuple[int, int], batch_size: int,
                  *, shuffle: bool = False, seed: int = 0, repeat: bool = False,
                  cache_dir: Path | None = None, start: int = 0) -> tf.data.Dataset:
    """(image float32 0..255, label) batches, decoded and resized in parallel, prefetched; labels int32 class
    indices, or (multi-label) float32 [labels] 0/1 rows.

    With `cache_dir`, the images are decoded and resized once into a file there (`cache_images`) and
    every epoch reads rows of it: no decoding after the first pass, and no image held in memory.
    """
    labels = _labels(labels)
    cache = cache_images(paths, image_size, Path(cache_dir)) if cache_dir is not None else None
    if cache is not None:
        return _cached_image_dataset(cache, labels, batch_size, shuffle=shuffle, seed=seed, repeat=repeat,
                                     start=start)
    all_paths, all_labels = tf.constant(list(paths), tf.string), tf.constant(labels)

    def load(i):
        return decode_and_resize(tf.io.read_file(all_paths[i]), image_size), all_labels[i]

    ds = _indices(len(paths), shuffle=shuffle, seed=seed, repeat=repeat, start=start)
    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=not shuffle)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def cache_images(paths: list[str], image_size: tuple[int, int], cache_dir: Path) -> Path | None:
    """Decode and resize every image once into a uint8 `.npy` file [n, h, w, 3] under `cache_dir`.

    The file name carries a digest of the paths, their sizes and modification times, and the image
    size, so a changed dataset gets a new file and an unchanged one (a re-run, a resumed pod) reuses
    it. Pixels are 8 bits, as `decode_and_resize` rounds them.
    None (decode every epoch) when the file would take more than half the free space there.
    """
    h, w = image_size
    digest = hashlib.sha256(f"{h}x{w}".encode())
    for path in paths:
        st = os.stat(path)
        digest.update(f"\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    out = Path(cache_dir) / f"images-{h}x{w}-{digest.hexdigest()[:20]}.npy"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    need, free = len(paths) * h * w * 3, shutil.disk_usage(out.parent).free
    if need > free // 2:
        logs.get().warning("image cache skipped: not enough free disk, decoding every epoch",
                           folder=str(cache_dir), needed_bytes=need, free_bytes=free)
        return None
    # Written with plain writes, not through a memory map: the rows never count as this process's memory. Its
    # progress is a stage of its own ("decoding"): minutes of it at scale moved no metric, and FinetuneJobStalled
    # fired on a healthy run.
    with atomic_path(out) as tmp, open(tmp, "wb") as f, logs.progress(
            "decoding images", len(paths), report=lambda done, of: metrics.stage_progress("decoding", done, of)) \
            as advance:
        np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (len(paths), h, w, 3)})
        for images, _ in image_dataset(paths, np.zeros(len(paths), np.int32), image_size, 64):
            f.write(tf.cast(tf.round(images), tf.uint8).numpy().tobytes())
            advance(len(images))
    return out


def pixels(paths: list[str], image_size: tuple[int, int], cache_dir: Path | None) -> np.ndarray:
    """The images as uint8 [n, h, w, 3]: memory-mapped from the image cache, or decoded into memory (without
    `cache_dir`, or when the cache cannot be written)."""
    cache = cache_images(paths, image_size, Path(cache_dir)) if paths and cache_dir is not None else None
    if cache is not None:
        return np.load(cache, mmap_mode="r")
    decoded = image_dataset(paths, [0] * len(paths), image_size, 64)
    batches = [tf.cast(tf.round(x), tf.uint8).numpy() for x, _ in decoded]
    return np.concatenate(batches) if batches else np.zeros((0, *image_size, 3), np.uint8)


def _indices(n: int, *, shuffle: bool, seed: int, repeat: bool, start: int = 0) -> tf.data.Dataset:
    """Row indices 0..n-1, repeated forever when asked, each epoch in its own order when shuffled: a function
    of the seed and the epoch's number alone (stateless), so that the stream from index `start` on is exactly
    what an uninterrupted run reads from there (a resumed run continues its data order, epoch and step)."""
    if n == 0:
        return tf.data.Dataset.range(0)
    first = start // n if repeat else 0
    epochs = tf.data.Dataset.range(first, 2**62) if repeat else tf.data.Dataset.range(1)

    def epoch(number):
        rows = tf.range(n, dtype=tf.int64)
        if shuffle:
            rows = tf.random.experimental.stateless_shuffle(rows, seed=tf.stack([tf.constant(seed, tf.int64), number]))
        return tf.data.Dataset.from_tensor_slices(rows)

    ds = epochs.flat_map(epoch)
    return ds.skip(start - first * n) if start - first * n else ds


def _cached_image_dataset(cache: Path, labels: np.ndarray, batch_size: int,
                          *, shuffle: bool, seed: int, repeat: bool, start: int = 0) -> tf.data.Dataset:
    """Batches of rows of a `cache_images` file, read with positional reads (pread)."""
    with open(cache, "rb") as f:
        np.lib.format.read_magic(f)
        shape, _, _ = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    row_shape = shape[1:]
    row_bytes = int(np.prod(row_shape))
    ds = _indices(len(labels), shuffle=shuffle, seed=seed, repeat=repeat, start=start)
    label_type, label_shape = _label_spec(labels)

    def read(idx):
        out = np.empty((len(idx), *row_shape), np.uint8)
        fd = os.open(cache, os.O_RDONLY)
        try:
            if len(idx) and np.all(np.diff(idx) == 1):  # in order (evaluation): one read for the batch
                out[:] = np.frombuffer(os.pread(fd, row_bytes * len(idx), offset + int(idx[0]) * row_bytes),
                                       np.uint8).reshape(out.shape)
            else:
                for j, i in enumerate(idx):
                    out[j] = np.frombuffer(os.pread(fd, row_bytes, offset + int(i) * row_bytes),
                                           np.uint8).reshape(row_shape)
        finally:
            os.close(fd)
        return out, labels[idx]

    def load(idx):
        x, y = tf.numpy_function(read, [idx], (tf.uint8, label_type), stateful=False)
        return tf.cast(tf.ensure_shape(x, [None, *row_shape]), tf.float32), tf.ensure_shape(y, label_shape)

    ds = ds.batch(batch_size).map(load, num_parallel_calls=AUTOTUNE, deterministic=not shuffle)
    return ds.prefetch(AUTOTUNE)


@functools.cache
def _traced_extractor(extractor):
    """The frozen base as one tf.function with a fixed input signature: traced once for every split and
    batch size (the last, partial batch of each split would otherwise trace it again)."""
    spec = tf.TensorSpec([None, *extractor.inputs[0].shape[1:]], tf.float32)
    return tf.function(lambda x: extractor(x, training=False), input_signature=[spec])


def cached_features(extractor, batches: tf.data.Dataset, count: int, key: list,
                    folder: Path, advance=lambda n: None) -> tuple[np.ndarray, np.ndarray]:
    """The frozen base's features of a finite, unshuffled dataset of `count` (images, labels): (features
    memory-mapped [count, dim] float32, labels), computed in one pass, written to disk as they come (not
    held in memory) beside the image cache, so that a run resumed on the same disk reuses them. The file
    names carry a digest of `key` (backbone, the base's weights, image size, and what identifies the images:
    files, sizes and modification times, or shards and ETags), so changed inputs never meet stale features.
    `advance(n)` is called after each batch of n images (progress)."""
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    out, labels_out = Path(folder) / f"features-{digest}.npy", Path(folder) / f"labels-{digest}.npy"
    if out.exists() and labels_out.exists():  # written under temporary names and renamed: complete
        logs.get().info("reusing cached features", file=str(out))
        advance(count)  # all there: the stage is done (its gauge stayed at 0 of count)
        return np.load(out, mmap_mode="r"), np.load(labels_out)
    logs.get().info("computing the frozen base's features", images=count)  # minutes on a large dataset
    extract = _traced_extractor(extractor)
    labels = None  # shaped from the first batch: int32 [count], or float32 [count, labels] (multi-label)
    # Written with plain writes, not through a memory map: written pages of a map count in this process's RSS
    # (358 MB of features at 70,000 images), written ones of a file only in the page cache.
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_2_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (count, int(extractor.output.shape[-1]))})
        start = 0
        for images, ys in batches:
            batch, ys = extract(images).numpy().astype("<f4"), ys.numpy()
            if labels is None:
                labels = np.zeros((count, *ys.shape[1:]), ys.dtype)
            if start + len(batch) <= count:
                f.write(batch.tobytes())
                labels[start : start + len(batch)] = ys
            start += len(batch)
            advance(len(batch))
        if start != count:
            raise RuntimeError(f"feature extraction saw {start} images, expected {count}")
        if labels is None:
            labels = np.zeros((0,), np.int32)
    with atomic_path(labels_out) as tmp, open(tmp, "wb") as f:
        np.save(f, labels)
    return np.load(out, mmap_mode="r"), labels


def rows(array: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """`array[idx]`; of a memory-mapped .npy file (np.load(mmap_mode="r")), read with positional reads instead,
    so that the rows read over an epoch never become this process's resident memory as mapped pages would."""
    if not isinstance(array, np.memmap):
        return np.asarray(array[idx])
    shape, dtype = array.shape[1:], array.dtype
    row_bytes = int(np.prod(shape)) * dtype.itemsize
    out = np.empty((len(idx), *shape), dtype)
    fd = os.open(array.filename, os.O_RDONLY)
    try:
        for j, i in enumerate(idx):
            out[j] = np.frombuffer(os.pread(fd, row_bytes, array.offset + int(i) * row_bytes), dtype).reshape(shape)
    finally:
        os.close(fd)
    return out


def feature_dataset(features: np.ndarray, labels, batch_size: int,
                    *, shuffle: bool = False, seed: int = 0, repeat: bool = False,
                    start: int = 0) -> tf.data.Dataset:
    """(feature float32, label) batches read from the feature file (or an array), from example `start` of the
    (repeated, shuffled) stream on."""
    labels = _labels(labels)
    dim = features.shape[1]
    ds = _indices(len(labels), shuffle=shuffle, seed=seed, repeat=repeat, start=start)
    label_type, label_shape = _label_spec(labels)

    def gather(idx):
        order = np.sort(idx)  # sorted reads from the file; order inside a batch does not matter
        return rows(features, order).astype(np.float32, copy=False), labels[order]

    def load(idx):
        x, y = tf.numpy_function(gather, [idx], (tf.float32, label_type), stateful=False)
        return tf.ensure_shape(x, [None, dim]), tf.ensure_shape(y, label_shape)

    return ds.batch(batch_size).map(load, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
