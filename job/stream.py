"""`data.staging: stream`: tar shards read from storage every epoch, nothing on disk but what tf.data
buffers. Each epoch reads the shards in a new seeded order, several at a time, through a shuffle buffer;
each worker of a multi-worker run reads its own shards. `allowed` selects the samples of a split by key
(a validation split carved out of train, bad images left out).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from job.dataset import AUTOTUNE, decode_and_resize
from job.readers import read_shards
from job.storage import Store

SHUFFLE_BUFFER = 2048
PARALLEL_SHARDS = 4


def dataset(store: Store, rels: list[str], classes: list[str], allowed: set[str], image_size: tuple[int, int],
            batch_size: int, *, shuffle: bool = False, seed: int = 0, repeat: bool = False,
            multi: bool = False) -> tf.data.Dataset:
    """(image float32 0..255, label int32) batches streamed from the shards: a seeded new shard order every
    pass, PARALLEL_SHARDS shards read at a time, then a shuffle buffer. `multi`: labels float32 [labels] 0/1."""
    label_spec = tf.TensorSpec([len(classes)], tf.float32) if multi else tf.TensorSpec([], tf.int32)
    signature = (tf.TensorSpec([], tf.string), label_spec)

    def shard(rel):
        for _, image, label in read_shards(store, [rel.decode()], classes, allowed, multi=multi):
            if multi:
                hot = np.zeros(len(classes), np.float32)
                hot[list(label)] = 1.0
                label = hot
            yield image, label

    order = tf.data.Dataset.from_tensor_slices(rels)
    if shuffle:
        order = order.shuffle(len(rels), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        order = order.repeat()
    ds = order.interleave(
        lambda rel: tf.data.Dataset.from_generator(shard, args=(rel,), output_signature=signature),
        cycle_length=min(PARALLEL_SHARDS, len(rels)), num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.map(lambda image, label: (decode_and_resize(image, image_size), label), num_parallel_calls=AUTOTUNE,
                deterministic=True)
    if shuffle:
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def pixels(store: Store, rels: list[str], classes: list[str], allowed: set[str], image_size: tuple[int, int],
           multi: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A split in memory: uint8 [n, h, w, 3] and labels (evaluation of the exported formats)."""
    xs, ys = [], []
    for images, labels in dataset(store, rels, classes, allowed, image_size, 64, multi=multi):
        xs.append(tf.cast(tf.round(images), tf.uint8).numpy())
        ys.append(labels.numpy())
    if not xs:
        empty = np.zeros((0, len(classes)), np.float32) if multi else np.zeros((0,), np.int32)
        return np.zeros((0, *image_size, 3), np.uint8), empty
    return np.concatenate(xs), np.concatenate(ys)
