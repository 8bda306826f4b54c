"""tf.data pipelines over staged files: the decode check, image batches, and cached base features.

The same `decode_and_resize` runs in training and inside the exported SavedModel, so serving sees
exactly the preprocessing the model was trained with. Decoding and antialiased resizing cost more
than a training step of a small model on a GPU; given a cache folder, `image_dataset` does them once
and later epochs read the decoded pixels back from disk (the page cache, in practice).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from job import logs
from job.files import atomic_path

# The job checks image sizes itself (data.max_image_pixels) from the header, before any decoding.
Image.MAX_IMAGE_PIXELS = None

AUTOTUNE = tf.data.AUTOTUNE


def decode_and_resize(encoded: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Encoded JPEG/PNG/BMP/GIF bytes -> float32 RGB [h, w, 3] in 0..255.

    Grayscale, palette, RGBA, CMYK and 16-bit inputs all come out as 8-bit RGB (TensorFlow's decoders
    convert them); animated GIFs give their first frame.
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
    image = tf.image.resize(image, image_size, method="bilinear", antialias=True)
    return tf.ensure_shape(image, [*image_size, 3])


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file's header without decoding it; None if the header is unreadable."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, SyntaxError):
        return None


def find_bad(paths: list[str], max_pixels: int) -> dict[str, str]:
    """{path: reason} for images the job cannot train on: larger than `max_pixels` (from the header,
    so a huge image is never decoded) or not decodable by TensorFlow's own decoders (the ones training
    uses, so a file that passes here cannot fail mid-epoch)."""
    bad = {}
    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(image_size, paths))
    for path, size in zip(paths, sizes):
        if size is not None and size[0] * size[1] > max_pixels:
            bad[path] = (f"too large: {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels "
                         f"(data.max_image_pixels {max_pixels:,})")
    rest = [p for p in paths if p not in bad]
    for path in find_undecodable(rest):
        bad[path] = "cannot be decoded"
    return bad


def find_undecodable(paths: list[str]) -> list[str]:
    """Paths that TensorFlow's decoders cannot read, found in one parallel pass."""
    if not paths:
        return []

    def probe(index, path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return index, tf.shape(image)[0]

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
    ds = ds.map(probe, num_parallel_calls=AUTOTUNE, deterministic=False).ignore_errors()
    good = {int(index) for batch, _ in ds.batch(1024).as_numpy_iterator() for index in batch}
    return [p for i, p in enumerate(paths) if i not in good]


def image_dataset(paths: list[str], labels: list[int], image_size: tuple[int, int], batch_size: int,
                  *, shuffle: bool = False, seed: int = 0, repeat: bool = False,
                  cache_dir: Path | None = None) -> tf.data.Dataset:
    """(image float32 0..255, label int32) batches, decoded and resized in parallel, prefetched.

    With `cache_dir`, the images are decoded and resized once into a file there (`cache_images`) and
    every epoch reads rows of it: no decoding after the first pass, and no image held in memory.
    """
    labels = np.asarray(labels, np.int32)
    cache = cache_images(paths, image_size, Path(cache_dir)) if cache_dir is not None else None
    if cache is not None:
        return _cached_image_dataset(cache, labels, batch_size, shuffle=shuffle, seed=seed, repeat=repeat)
    ds = tf.data.Dataset.from_tensor_slices((list(paths), labels))
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    def load(path, label):
        return decode_and_resize(tf.io.read_file(path), image_size), label

    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=not shuffle)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def cache_images(paths: list[str], image_size: tuple[int, int], cache_dir: Path) -> Path | None:
    """Decode and resize every image once into a uint8 `.npy` file [n, h, w, 3] under `cache_dir`.

    The file name carries a digest of the paths, their sizes and modification times, and the image
    size, so a changed dataset gets a new file and an unchanged one (a re-run, a resumed pod) reuses
    it. Pixels are rounded to 8 bits: at most half a grey level from `decode_and_resize`'s floats.
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
    # Written with plain writes, not through a memory map: the rows never count as this process's memory.
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (len(paths), h, w, 3)})
        for images, _ in image_dataset(paths, np.zeros(len(paths), np.int32), image_size, 64):
            f.write(tf.cast(tf.round(images), tf.uint8).numpy().tobytes())
    return out


def _indices(n: int, *, shuffle: bool, seed: int, repeat: bool) -> tf.data.Dataset:
    """Row indices 0..n-1, reshuffled every epoch when asked, repeated forever when asked."""
    ds = tf.data.Dataset.range(n)
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    return ds.repeat() if repeat else ds


def _cached_image_dataset(cache: Path, labels: np.ndarray, batch_size: int,
                          *, shuffle: bool, seed: int, repeat: bool) -> tf.data.Dataset:
    """Batches of rows of a `cache_images` file, read with positional reads (pread)."""
    with open(cache, "rb") as f:
        np.lib.format.read_magic(f)
        shape, _, _ = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    row_shape = shape[1:]
    row_bytes = int(np.prod(row_shape))
    ds = _indices(len(labels), shuffle=shuffle, seed=seed, repeat=repeat)

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
        x, y = tf.numpy_function(read, [idx], (tf.uint8, tf.int32), stateful=False)
        return tf.cast(tf.ensure_shape(x, [None, *row_shape]), tf.float32), tf.ensure_shape(y, [None])

    ds = ds.batch(batch_size).map(load, num_parallel_calls=AUTOTUNE, deterministic=not shuffle)
    return ds.prefetch(AUTOTUNE)


def cached_features(extractor, paths: list[str], key: list, folder: Path, image_cache: Path | None,
                    batch_size: int = 64) -> np.ndarray | None:
    """The frozen base's features of `paths` (memory-mapped [n, dim] float32), beside the image cache.

    Run once over un-augmented images read through the image cache (which fine-tuning then reuses:
    one decode pass) and kept on disk, so a run resumed on the same disk reuses them. The file name
    carries a digest of `key` (backbone, weights, image size) and of the files and their sizes, so
    changed inputs never meet stale features.
    """
    if not paths:
        return None
    digest = hashlib.sha256(json.dumps([key, [(p, os.path.getsize(p)) for p in paths]]).encode()).hexdigest()[:16]
    out = Path(folder) / f"features-{digest}.npy"
    if out.exists():  # written under a temporary name and renamed, so it is complete
        logs.get().info("reusing cached features", file=str(out))
        return np.load(out, mmap_mode="r")
    extract = tf.function(lambda x: extractor(x, training=False))
    size = tuple(extractor.input.shape[1:3])
    with atomic_path(out) as tmp:
        features = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                             shape=(len(paths), int(extractor.output.shape[-1])))
        start = 0
        for images, _ in image_dataset(paths, [0] * len(paths), size, batch_size, cache_dir=image_cache):
            batch = extract(images).numpy()
            features[start : start + len(batch)] = batch
            start += len(batch)
        features.flush()
        del features
    return np.load(out, mmap_mode="r")


def feature_dataset(features: np.ndarray, labels: list[int], batch_size: int,
                    *, shuffle: bool = False, seed: int = 0, repeat: bool = False) -> tf.data.Dataset:
    """(feature float32, label int32) batches read from the memory-mapped feature file."""
    labels = np.asarray(labels, np.int32)
    dim = features.shape[1]
    ds = _indices(len(labels), shuffle=shuffle, seed=seed, repeat=repeat)

    def gather(idx):
        order = np.sort(idx)  # sorted reads from the memory map; order inside a batch does not matter
        return np.asarray(features[order], np.float32), labels[order]

    def load(idx):
        x, y = tf.numpy_function(gather, [idx], (tf.float32, tf.int32), stateful=False)
        return tf.ensure_shape(x, [None, dim]), tf.ensure_shape(y, [None])

    return ds.batch(batch_size).map(load, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
