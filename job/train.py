"""One training loop for every strategy: one device, MirroredStrategy, MultiWorkerMirroredStrategy.

Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585), so each phase
runs a custom distributed step (`strategy.run` inside a `tf.function`, loss averaged over the
GLOBAL batch) that serves all of them. Datasets come from `distribute_datasets_from_function`, so
each worker reads only its shard and each replica gets global_batch / replicas examples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from job import evaluate, logs, metrics
from job.distribute import Cluster
from job.errors import ConfigError

log = logs.get()


@dataclass
class Phase:
    name: str  # "head" | "finetune"
    model: keras.Model  # what the step calls: the head on features, or the whole model on images
    dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset]  # repeated, per-replica batches
    examples: int  # training examples in one epoch (all workers together)
    epochs: int
    learning_rate: float
    validate: Callable[[], tuple[float, float] | None]  # (loss, accuracy) on validation, or None
    augment: keras.Model | None = None


@dataclass
class PhaseResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def per_replica_batch(global_batch: int, cluster: Cluster) -> int:
    replicas = cluster.replicas
    if global_batch % replicas:
        raise ConfigError(f"config: train.batch_size: {global_batch} is not divisible by the {replicas} replicas")
    return global_batch // replicas


def _optimizer(learning_rate: float, cluster: Cluster) -> keras.optimizers.Optimizer:
    opt = keras.optimizers.Adam(learning_rate)
    return keras.mixed_precision.LossScaleOptimizer(opt) if cluster.mixed_precision else opt


def _train_step(cluster: Cluster, model: keras.Model, optimizer, augment, global_batch: int):
    strategy = cluster.strategy

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            if augment is not None:
                x = augment(x, training=True)
            probs = model(x, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(y, probs)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss)
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), y), tf.float32))
        return tf.reduce_sum(per_example), correct

    @tf.function
    def step(x, y):
        loss_sum, correct = strategy.run(replica_step, args=(x, y))
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss_sum, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None))

    return step


def inference(model: keras.Model):
    """A traced `model(x, training=False)`; build it once per model, not per call (no retracing)."""
    return tf.function(lambda x: model(x, training=False), reduce_retracing=True)


def predict(model: keras.Model, dataset: tf.data.Dataset, infer=None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) over a finite dataset, on this worker alone (identical on every worker)."""
    infer = infer or inference(model)
    probs, labels = [], []
    for x, y in dataset:
        probs.append(infer(x).numpy())
        labels.append(y.numpy())
    if not probs:
        return np.zeros((0, model.output.shape[-1]), np.float32), np.zeros((0,), np.int32)
    return np.concatenate(probs).astype(np.float32), np.concatenate(labels)


def validator(model: keras.Model, dataset: tf.data.Dataset | None) -> Callable[[], tuple[float, float] | None]:
    infer = inference(model)

    def run():
        if dataset is None:
            return None
        return evaluate.loss_and_accuracy(*predict(model, dataset, infer))

    return run


def run_phase(phase: Phase, cluster: Cluster, global_batch: int, patience: int) -> PhaseResult:
    """Train one phase with early stopping on validation loss, restoring the best epoch's weights."""
    result = PhaseResult()
    if phase.epochs <= 0:
        log.info("phase skipped", phase=phase.name, reason="epochs is 0")
        return result
    started = time.monotonic()
    strategy = cluster.strategy
    steps = max(1, math.ceil(phase.examples / global_batch))
    with strategy.scope():
        optimizer = _optimizer(phase.learning_rate, cluster)
        optimizer.build(phase.model.trainable_variables)
        dataset = strategy.distribute_datasets_from_function(phase.dataset_fn)
    iterator = iter(dataset)
    step = _train_step(cluster, phase.model, optimizer, phase.augment, global_batch)
    metrics.set_phase(phase.name)
    log.info("phase started", phase=phase.name, epochs=phase.epochs, steps_per_epoch=steps,
             trainable_weights=len(phase.model.trainable_variables), replicas=cluster.replicas)

    best, best_weights, patience_used = math.inf, None, 0
    local_images = global_batch // cluster.num_workers
    for epoch in range(1, phase.epochs + 1):
        metrics.epoch_started(phase.name, epoch, phase.epochs, steps)
        loss_sum = correct = 0.0
        epoch_start = time.monotonic()
        with logs.progress(f"{phase.name} epoch {epoch}/{phase.epochs}", steps) as advance:
            for _ in range(steps):
                t0 = time.perf_counter()
                x, y = next(iterator)
                waited_for_data = time.perf_counter() - t0
                step_loss, step_correct = step(x, y)
                # Reading the results waits for the step: the timing is the step's, not its dispatch.
                loss_sum += float(step_loss)
                correct += float(step_correct)
                metrics.step_done(phase.name, local_images, time.perf_counter() - t0, waited_for_data)
                advance(1)
        seen = steps * global_batch
        record = {"epoch": epoch, "loss": loss_sum / seen, "accuracy": correct / seen,
                  "seconds": round(time.monotonic() - epoch_start, 3)}
        val = phase.validate()
        if val is not None:
            record["val_loss"], record["val_accuracy"] = val
        result.history.append(record)
        metrics.epoch_done(phase.name, epoch, train_loss=record["loss"], train_accuracy=record["accuracy"],
                           val_loss=record.get("val_loss", math.nan), val_accuracy=record.get("val_accuracy", math.nan))
        log.info("epoch done", phase=phase.name, **record)

        monitored = record.get("val_loss", record["loss"])
        if monitored < best:
            best, result.best_epoch, patience_used = monitored, epoch, 0
            best_weights = [v.numpy() for v in phase.model.trainable_variables]
        else:
            patience_used += 1
            if patience and patience_used >= patience:
                log.info("early stopping", phase=phase.name, epoch=epoch, best_epoch=result.best_epoch)
                break
    if best_weights is not None and result.best_epoch != len(result.history):
        for variable, value in zip(phase.model.trainable_variables, best_weights):
            variable.assign(value)
        log.info("restored best weights", phase=phase.name, best_epoch=result.best_epoch)
    result.seconds = round(time.monotonic() - started, 3)
    return result
