"""tf.data pipelines over staged files: the decode check, image batches, and cached base features.

The same `decode_and_resize` runs in training and inside the exported SavedModel, so serving sees
exactly the preprocessing the model was trained with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def decode_and_resize(encoded: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Encoded JPEG/PNG/BMP/GIF bytes -> float32 RGB [h, w, 3] in 0..255.

    Grayscale, palette, RGBA, CMYK and 16-bit inputs all come out as 8-bit RGB (TensorFlow's decoders
    convert them); animated GIFs give their first frame.
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
    image = tf.image.resize(image, image_size, method="bilinear", antialias=True)
    return tf.ensure_shape(image, [*image_size, 3])


def find_undecodable(paths: list[str]) -> list[str]:
    """Paths that TensorFlow's own decoders cannot read, found in one parallel pass.

    Using the decoders that training uses means a file that passes here cannot fail mid-epoch.
    """
    if not paths:
        return []

    def probe(i, path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return i, tf.shape(image)[0]

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths))
    ds = ds.map(probe, num_parallel_calls=AUTOTUNE, deterministic=False).ignore_errors()
    good = {int(i) for i, _ in ds.batch(1024).as_numpy_iterator() for i in i}
    return [p for i, p in enumerate(paths) if i not in good]


def image_dataset(paths: list[str], labels: list[int], image_size: tuple[int, int], batch_size: int,
                  *, shuffle: bool = False, seed: int = 0, repeat: bool = False) -> tf.data.Dataset:
    """(image float32 0..255, label int32) batches, decoded and resized in parallel, prefetched."""
    ds = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels, np.int32)))
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    def load(path, label):
        return decode_and_resize(tf.io.read_file(path), image_size), label

    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=not shuffle)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def extract_features(feature_model, paths: list[str], image_size: tuple[int, int], out: Path,
                     batch_size: int = 64) -> np.ndarray:
    """Run the frozen base once over un-augmented images; features go to a .npy file on disk.

    The file is memory-mapped back, so the head phase never holds every feature in RAM.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    extract = tf.function(lambda x: feature_model(x, training=False))
    dim = int(feature_model.output.shape[-1])
    tmp = out.with_suffix(".part.npy")
    features = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(paths), dim))
    start = 0
    for images, _ in image_dataset(paths, [0] * len(paths), image_size, batch_size):
        batch = extract(images).numpy()
        features[start : start + len(batch)] = batch
        start += len(batch)
    features.flush()
    del features
    tmp.replace(out)
    return np.load(out, mmap_mode="r")


def feature_dataset(features: np.ndarray, labels: list[int], batch_size: int,
                    *, shuffle: bool = False, seed: int = 0, repeat: bool = False) -> tf.data.Dataset:
    """(feature float32, label int32) batches read from the memory-mapped feature file."""
    labels = np.asarray(labels, np.int32)
    dim = features.shape[1]
    ds = tf.data.Dataset.range(len(labels))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    def gather(idx):
        order = np.sort(idx)  # sorted reads from the memory map; order inside a batch does not matter
        return np.asarray(features[order], np.float32), labels[order]

    def load(idx):
        x, y = tf.numpy_function(gather, [idx], (tf.float32, tf.int32), stateful=False)
        return tf.ensure_shape(x, [None, dim]), tf.ensure_shape(y, [None])

    return ds.batch(batch_size).map(load, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
