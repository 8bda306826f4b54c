"""One training loop for every strategy: one device, MirroredStrategy, MultiWorkerMirroredStrategy.

Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585), so each phase
runs a custom distributed step (`strategy.run` inside a `tf.function`, loss averaged over the
GLOBAL batch) that serves all of them. Datasets come from `distribute_datasets_from_function`, so
each worker reads only its shard and each replica gets global_batch / replicas examples.

Every decision that must be the same on all workers (stop for SIGTERM, a checkpoint that is due,
early stopping) goes through an all-reduce, so workers never disagree and hang.
"""

from __future__ import annotations

import dataclasses
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from job import evaluate, katib, logs, metrics, multilabel, recipe, signals
from job.checkpoint import Checkpoints
from job.distribute import Cluster
from job.errors import ConfigError
from job.model import batch_normalization, moving_statistics, start_moving_statistics
from job.runstate import RunState

log = logs.get()


@dataclass(kw_only=True)
class Phase:
    """One phase's training: built with keywords, so that a call reads as what each value is."""

    name: str  # "head" | "finetune" | "refit_head" | "refit"
    model: keras.Model  # what the step calls: the head on features, or the whole model on images
    # (input context, examples to skip) -> repeated per-replica batches, from that example of the stream on: a
    # resumed phase reads on exactly where it was stopped (job/dataset.py's stateless epoch orders)
    dataset_fn: Callable[[tf.distribute.InputContext, int], tf.data.Dataset]
    examples: int  # training examples in one epoch (all workers together)
    epochs: int
    learning_rate: float
    validate: Callable[[], dict | None]  # the validation entries of the epoch's record (val_loss, ...), or None
    augment: keras.Model | None = None
    saved: keras.Model | None = None  # what its checkpoints hold (default: `model`)
    on_epoch: Callable[[dict], None] | None = None  # after each epoch's record and checkpoint (TensorBoard)
    # > 0: an exponential moving average of the trained weights over about this many epochs is what is validated,
    # kept as the best epoch's and returned (job.recipe.average_momentum); 0: the weights themselves
    average_epochs: float = 0.0
    # > 0: stop after this many epochs with a checkpoint and without restoring the best weights, to be resumed
    # from it later (train.search's rung: job/search.py)
    pause_after: int = 0
    # False: keep the last epoch's weights (train.refit trains for epochs chosen beforehand, on nothing to validate)
    restore_best: bool = True
    # per trainable variable, its share of the learning rate (train.finetune.layer_decay); () = the full rate for all
    rate_scales: tuple[float, ...] = ()


@dataclass(frozen=True)
class Options:
    """What every phase shares: train.* beyond the phases' own epochs and learning rates."""

    patience: int = 3  # epochs without improvement before stopping; 0 = never stop early
    metric: str = "val_loss"  # val_loss | val_accuracy (job.recipe.is_better)
    label_smoothing: float = 0.0
    weight_decay: float = 0.0  # > 0: AdamW
    lr_schedule: str = "constant"  # constant | cosine (with linear warm-up)
    class_weights: tuple[float, ...] | None = None  # per class index (multi-label: positive weight per label)
    multi_label: bool = False  # sigmoid scores, binary cross-entropy per label
    every_steps: int = 0  # checkpoint every N steps inside an epoch; 0 = by time and at phase ends only
    every_seconds: float = 0.0  # checkpoint at the first epoch or step boundary this long after the last
    # one (0: at every epoch end); always at a phase's end and on SIGTERM
    metrics_file: str = ""  # metrics.file: Katib's line per epoch (job/katib.py); "" = none


def per_replica_batch(global_batch: int, cluster: Cluster) -> int:
    replicas = cluster.replicas
    if global_batch % replicas:
        raise ConfigError(f"config: train.batch_size: {global_batch} is not divisible by the {replicas} replicas")
    return global_batch // replicas


def _optimizer(learning_rate: float, total_steps: int, options: Options, cluster: Cluster,
               rate_scales: tuple[float, ...] = ()) -> tuple[keras.optimizers.Optimizer, tf.Variable | None]:
    """Adam, or AdamW with weight decay (biases exempt); constant rate or cosine decay after a warm-up; with
    `rate_scales`, each variable's rate scaled by its share. Either way the rate can be set again without a new
    trace (job.loop._trainer): the cosine's peak is a variable, returned too."""
    rate, peak = learning_rate, None
    if options.lr_schedule == "cosine":
        peak = tf.Variable(learning_rate, trainable=False, dtype=tf.float32)
        rate = _WarmupCosine(peak, total_steps)
    adam, adamw = (ScaledAdam, ScaledAdamW) if rate_scales else (keras.optimizers.Adam, keras.optimizers.AdamW)
    if options.weight_decay > 0:
        opt = adamw(rate, weight_decay=options.weight_decay)
        opt.exclude_from_weight_decay(var_names=["bias"])
    else:
        opt = adam(rate)
    if rate_scales:
        opt.rate_scales = rate_scales
    return (keras.mixed_precision.LossScaleOptimizer(opt) if cluster.mixed_precision else opt), peak


class _LayerRates:
    """Adam's update with each variable's rate times its share (`rate_scales`, in the order the optimizer was built
    with): Adam divides a gradient by its own scale, so the rate, not the gradient, is what must be scaled."""

    rate_scales: tuple[float, ...] = ()

    def update_step(self, gradient, variable, learning_rate):
        scale = self.rate_scales[self._get_variable_index(variable)]
        return super().update_step(gradient, variable, learning_rate * scale)


class ScaledAdam(_LayerRates, keras.optimizers.Adam):
    pass


class ScaledAdamW(_LayerRates, keras.optimizers.AdamW):
    pass


class _WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """A linear warm-up to `peak`, then a cosine decay to 0: Keras' CosineDecay towards 1 times a peak held in a
    variable (the same numbers as CosineDecay towards the peak itself)."""

    def __init__(self, peak: tf.Variable, total_steps: int):
        warmup = recipe.warmup_steps(total_steps)
        self.peak = peak
        self.shape = keras.optimizers.schedules.CosineDecay(0.0, max(1, total_steps - warmup), warmup_target=1.0,
                                                            warmup_steps=warmup)

    def __call__(self, step):
        return self.peak * self.shape(step)


def _loss_fn(options: Options, num_classes: int):
    """Per-example cross-entropy with the recipe's label smoothing and class weights; multi-label: binary
    cross-entropy averaged over the labels, each label's positives weighted by its positive weight."""
    weights = tf.constant(options.class_weights, tf.float32) if options.class_weights else None
    if options.multi_label:
        return _binary_loss(weights)

    def per_example_loss(y, probs):
        if options.label_smoothing:
            loss = keras.losses.categorical_crossentropy(tf.one_hot(y, num_classes), probs,
                                                         label_smoothing=options.label_smoothing)
        else:
            loss = keras.losses.sparse_categorical_crossentropy(y, probs)
        return loss * tf.gather(weights, y) if weights is not None else loss

    return per_example_loss


def _binary_loss(positive_weights):
    def per_example_loss(y, scores):
        p = tf.clip_by_value(scores, evaluate.EPS, 1.0 - evaluate.EPS)
        positive = y * tf.math.log(p) * (positive_weights if positive_weights is not None else 1.0)
        return -tf.reduce_mean(positive + (1.0 - y) * tf.math.log(1.0 - p), axis=-1)

    return per_example_loss


def _correct(y, probs, multi_label: bool):
    """Summed over the batch: 1 per example whose top-1 is right; multi-label, the share of its labels
    decided right at 0.5 (binary accuracy)."""
    if multi_label:
        return tf.reduce_sum(tf.reduce_mean(tf.cast(tf.equal(tf.cast(probs >= 0.5, tf.float32), y), tf.float32), -1))
    return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), y), tf.float32))


def _train_step(cluster: Cluster, model: keras.Model, optimizer, augment, global_batch: int, options: Options,
                average: tuple[list, float] | None = None):
    strategy = cluster.strategy
    per_example_loss = _loss_fn(options, int(model.output.shape[-1]))

    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            if augment is not None:
                x = augment(x, training=True)
            probs = model(x, training=True)
            per_example = per_example_loss(y, probs)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        return grads, tf.reduce_sum(per_example), _correct(y, probs, options.multi_label)

    def replica_step(x, y, flags, compute=forward_backward):
        grads, loss_sum, correct = compute(x, y)
        if cluster.mixed_precision and cluster.replicas > 1:
            grads = _agree_on_overflow(grads)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss_sum, correct, tf.identity(flags)

    def make(replica_fn):
        @tf.function
        def step(x, y, flags):
            # `flags` ([stop asked, checkpoint due]) ride along with the gradients' all-reduce: if any
            # worker was asked to stop, or is due to checkpoint, every worker learns it after this step.
            sums = strategy.run(replica_fn, args=(x, y, flags))
            if average is not None:  # after the update, in cross-replica context: every copy alike
                averaged, momentum = average
                for a, v in zip(averaged, model.trainable_variables):
                    a.assign(momentum * a + (1.0 - momentum) * tf.cast(v, a.dtype))
            return [strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in sums]

        return step

    plain = make(replica_step)
    # XLA compiles the forward and backward pass of each replica; the gradients' all-reduce and the
    # optimizer update stay outside it (XLA compiles for one device). The random augmentation layers
    # do not support XLA, so augmented phases stay plain.
    if not cluster.xla or augment is not None:
        return plain
    xla_forward_backward = tf.function(forward_backward, jit_compile=True)
    compiled = make(lambda x, y, flags: replica_step(x, y, flags, compute=xla_forward_backward))
    chosen = []

    def step(x, y, flags):
        if chosen:
            return chosen[0](x, y, flags)
        try:
            result = compiled(x, y, flags)
            chosen.append(compiled)
            log.info("training step compiled with XLA")
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, NotImplementedError) as e:
            # A compile failure happens before any variable changes: fall back to the plain step.
            log.warning("XLA compilation failed, training without it", reason=str(e).splitlines()[0][:200])
            chosen.append(plain)
            result = plain(x, y, flags)
        return result

    return step


def _agree_on_overflow(grads):
    """Under loss scaling, Keras checks only this replica's gradients for inf/NaN before they are summed
    over replicas: one replica could skip the step (and halve the scale) while another applies it, or
    workers could disagree and hang. Make every replica see an overflow anywhere as its own."""
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
    overflows = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
    poison = tf.where(overflows > 0, float("nan"), 1.0)
    return [g * tf.cast(poison, g.dtype) for g in grads]


_traced: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference(model: keras.Model):
    """A traced `model(x, training=False)`, one per model: validation and evaluation share its trace."""
    if model not in _traced:
        _traced[model] = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return _traced[model]


def predict(model: keras.Model, dataset: tf.data.Dataset, infer=None, inspect=None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) over a finite dataset, on this worker alone (identical on every worker);
    `inspect(images, probabilities, labels)` sees each batch."""
    infer = infer or inference(model)
    probs, labels = [], []
    for x, y in dataset:
        probs.append(infer(x).numpy())
        labels.append(y.numpy())
        if inspect:
            inspect(x, probs[-1], labels[-1])
    if not probs:
        return np.zeros((0, model.output.shape[-1]), np.float32), np.zeros((0,), np.int32)
    return np.concatenate(probs).astype(np.float32), np.concatenate(labels)


def validator(model: keras.Model, dataset: tf.data.Dataset | None, multi_label: bool = False, images: int = 0
              ) -> Callable[[], dict | None]:
    """The validation entries of an epoch's record: val_loss and val_accuracy; multi-label val_loss and
    val_map. None without validation data. Its progress is the `validation` stage's (`images` in all): a pass
    that moves no other metric for 10 minutes (a large validation split on CPU) fired FinetuneJobStalled."""
    infer = inference(model)

    def run():
        if dataset is None:
            return None
        done = [0]

        def progress(x, probabilities, labels):
            done[0] += len(probabilities)
            metrics.stage_progress("validation", done[0], images)

        metrics.stage_progress("validation", 0, images)
        results = predict(model, dataset, infer, progress)
        if multi_label:  # val_accuracy as the epoch's training accuracy is measured (CONTRACT section 8 names it)
            loss, mean_ap = multilabel.loss_and_map(*results)
            return {"val_loss": loss, "val_accuracy": multilabel.binary_accuracy(*results), "val_map": mean_ap}
        loss, accuracy = evaluate.loss_and_accuracy(*results)
        return {"val_loss": loss, "val_accuracy": accuracy}

    return run


def run_phase(phase: Phase, cluster: Cluster, global_batch: int, options: Options,
              ckpt: Checkpoints, state: RunState, reuse: Reuse | None = None) -> bool:
    """Train one phase with early stopping on `options.metric`, then restore the best epoch's weights; True when
    it paused instead (`phase.pause_after`), its checkpoint saved.

    When `state` is partway through this phase (a restored checkpoint), the phase resumes where it was:
    epochs done, steps done in the current epoch, the optimizer and the best weights so far. With `reuse`, the
    phase takes the optimizer and traced step of the last phase run with it, if that one trained the same model
    the same way (but for its learning rate).
    """
    if phase.epochs <= 0:
        log.info("phase skipped", phase=phase.name, reason="epochs is 0")
        return False
    # A stop asked at the phase boundary (the last one's end is checkpointed) waited for this phase to be built and
    # traced, 5 to 25 s of the pod's grace, to save its first step. (Several workers agree on a stop in a step.)
    if cluster.num_workers == 1 and not state.resumes(phase.name) and signals.requested():
        raise signals.stopped(f"before {phase.name} began")
    steps = max(1, math.ceil(phase.examples / global_batch))
    variables = phase.model.trainable_variables
    # The best epoch's copy: the trained weights and, where BatchNormalization trains (from scratch), the
    # moving statistics that go with them.
    statistics = moving_statistics(phase.model)
    kept = variables + statistics
    if statistics and cluster.replicas > 1:
        # Over several replicas, BatchNormalization that trains normalises with the whole global batch's
        # statistics: each replica's share may be a handful of images, and every replica then updates its
        # copy of the moving statistics alike (the weights stay equal on every worker).
        for layer in batch_normalization(phase.model):
            if layer.trainable:
                layer.synchronized = True
    trainer = _trainer(phase, cluster, global_batch, options, steps, statistics, reuse)
    optimizer, best, averaged = trainer.optimizer, trainer.best, trainer.averaged
    if averaged:
        phase = _validating_average(phase, variables, averaged, trainer.live)
    saved = phase.saved or phase.model
    # dropout's and augmentation's random streams go on where they were, too
    rng = random_states(phase.model) + (random_states(phase.augment) if phase.augment is not None else [])
    objects = {"weights": saved, "optimizer": optimizer, "best": best, "rng": rng,
               **({"average": averaged} if averaged else {})}
    if state.resumes(phase.name):
        ckpt.restore(**objects)
    else:
        state.start(phase.name)
        if statistics:
            _start_moving_statistics(phase, cluster)
    if state.epoch < phase.epochs:
        # This worker's examples read so far in the phase: whole epochs and the steps of the current one.
        start = (state.epoch * steps + state.step) * (global_batch // cluster.num_workers)
        with cluster.strategy.scope():
            batches = iter(cluster.strategy.distribute_datasets_from_function(lambda ctx: phase.dataset_fn(ctx, start)))
        step = trainer.step
        metrics.set_phase(phase.name)
        log.info("phase started", phase=phase.name, epochs=phase.epochs, steps_per_epoch=steps,
                 from_epoch=state.epoch + 1, trainable_weights=len(variables), replicas=cluster.replicas)
        saver = _Saver(ckpt, state, options.every_seconds, **objects)
        while state.epoch < phase.epochs:
            if phase.pause_after and state.epoch >= phase.pause_after:
                saver.save()
                log.info("phase paused", phase=phase.name, epochs_done=state.epoch)
                return True
            record = _train_epoch(phase, cluster, global_batch, steps, batches, step, state, options, saver)
            # At the epoch's end (a schedule moves it); a MirroredVariable under a strategy: read as a tensor.
            record["learning_rate"] = float(tf.convert_to_tensor(optimizer.learning_rate))
            if not phase.pause_after:  # a train.search trial that diverges is ranked last instead (choose_trial)
                _refuse_divergence(phase.name, record)
            # Without validation data, early stopping watches the training loss and accuracy.
            *monitored, due = cluster.mean([*recipe.monitored(record), float(saver.due())])
            if state.end_epoch(record, tuple(monitored), options.metric, options.patience, phase.epochs):
                for copy, variable in zip(best, averaged or kept):
                    copy.assign(_value(variable))
            elif state.epoch >= phase.epochs and record["epoch"] < phase.epochs:
                log.info("early stopping", phase=phase.name, epoch=record["epoch"], best_epoch=state.best_epoch)
            if state.epoch >= phase.epochs or not options.every_seconds or due > 0:
                saver.save()
            if phase.on_epoch:
                phase.on_epoch(record)
    if phase.restore_best and state.best_epoch and (averaged or state.best_epoch != len(state.history[phase.name])):
        for variable, copy in zip(kept, best):
            variable.assign(copy.value())
        log.info("restored best weights", phase=phase.name, best_epoch=state.best_epoch, averaged=bool(averaged))
    elif averaged and not phase.restore_best and state.epoch >= phase.epochs:
        # A phase that keeps its last epoch (train.refit's) keeps its moving average: the refit exported the live
        # weights, though the fine-tuning chose its epochs on the average's scores and the card promised the average.
        for variable, copy in zip(variables, averaged):
            variable.assign(copy.value())
        log.info("kept the moving average", phase=phase.name)
    return False


def _refuse_divergence(phase: str, record: dict) -> None:
    """A loss that is NaN or infinite: the weights are lost, and a run that went on exported a model of NaNs as
    complete (exit 0). Stopped before the epoch is saved, as a recipe problem (exit 2): the same seed diverges the
    same way again, so a retry would not help."""
    lost = [k for k in ("loss", "val_loss") if k in record and not math.isfinite(record[k])]
    if lost:
        key = "train.head.learning_rate" if phase.endswith("head") else \
            "train.finetune.learning_rate or train.search.learning_rates (from scratch: train.head.learning_rate)"
        raise ConfigError(f"training diverged: {phase} epoch {record['epoch']} has {lost[0]} {record[lost[0]]} at "
                          f"learning rate {record['learning_rate']:.3g}; lower {key} (under a new run_id "
                          "where this one has checkpoints: a resume refuses another recipe)")


def _value(variable):
    """A Keras variable's value (a property) or a tf.Variable's (a method)."""
    return variable.value() if isinstance(variable, tf.Variable) else variable.value


class Reuse:
    """Phases run in turn on one model with the same settings but their learning rate (train.search's trials)
    share a trainer: the step is traced once instead of once a phase (seconds each), and each
    phase starts from the optimizer's variables as built, so that its numbers are those of a fresh one."""

    def __init__(self):
        self.trainer: _Trainer | None = None


@dataclass
class _Trainer:
    """What a phase builds before its first step."""

    key: tuple  # what the step and optimizer depend on (job.loop._trainer)
    optimizer: keras.optimizers.Optimizer
    peak: tf.Variable | None  # the cosine schedule's peak rate; None: a constant rate (the optimizer's own variable)
    built: list  # the optimizer's variables as built: where a reused trainer starts again
    best: list  # the best epoch's copy of the trained weights (and moving statistics, from scratch)
    averaged: list  # the moving average of the trained weights ([] without averaging)
    live: list  # the trained weights' copy while the average is validated
    step: Callable


def _trainer(phase: Phase, cluster: Cluster, global_batch: int, options: Options, steps: int, statistics: list,
             reuse: Reuse | None) -> _Trainer:
    """The phase's optimizer, copies and traced step: `reuse`'s, started again, when it trained the same model the
    same way; else new (kept in `reuse`). Averaging is off where BatchNormalization trains (from scratch): its
    statistics would not match the averaged weights."""
    variables = phase.model.trainable_variables
    kept = variables + statistics
    average = phase.average_epochs > 0 and not statistics
    momentum = recipe.average_momentum(phase.average_epochs, steps) if average else 0.0
    key = (phase.name, id(phase.model), id(phase.augment), id(cluster), steps * phase.epochs, momentum, global_batch,
           options.label_smoothing, options.weight_decay, options.lr_schedule, options.class_weights,
           options.multi_label, tuple(map(id, kept)), phase.rate_scales)
    old = reuse.trainer if reuse is not None else None
    if old is not None and old.key == key:
        for variable, value in zip(old.optimizer.variables, old.built):
            variable.assign(value)
        if old.peak is not None:
            old.peak.assign(phase.learning_rate)
        else:
            old.optimizer.learning_rate = phase.learning_rate
        for copy, variable in zip(old.best + old.averaged, kept + (variables if average else [])):
            copy.assign(_value(variable))
        return old
    with cluster.strategy.scope():
        optimizer, peak = _optimizer(phase.learning_rate, steps * phase.epochs, options, cluster, phase.rate_scales)
        optimizer.build(variables)
        best = [tf.Variable(v.value, trainable=False) for v in kept]
        averaged = [tf.Variable(v.value, trainable=False) for v in variables] if average else []
        live = [tf.Variable(v.value, trainable=False) for v in variables] if average else []
    step = _train_step(cluster, phase.model, optimizer, phase.augment, global_batch, options,
                       (averaged, momentum) if average else None)
    trainer = _Trainer(key, optimizer, peak, [v.numpy() for v in optimizer.variables], best, averaged, live, step)
    if reuse is not None:
        reuse.trainer = trainer
    return trainer


def _validating_average(phase: Phase, variables: list, averaged: list, live: list) -> Phase:
    """The phase validating its weights' moving average: swapped in for validation, the live ones back after."""
    def validate():
        for copy, variable in zip(live, variables):
            copy.assign(variable.value)
        for variable, average in zip(variables, averaged):
            variable.assign(average.value())
        try:
            return phase.validate()
        finally:
            for variable, copy in zip(variables, live):
                variable.assign(copy.value())

    return dataclasses.replace(phase, validate=validate)


def random_states(model: keras.Model) -> list:
    """The states of the model's random generators (Dropout's SeedGenerator): not among a Keras model's
    checkpointed weights, so a resumed run would draw other dropout masks than an uninterrupted one."""
    return [v.value for v in model.variables if "seed_generator_state" in v.path]


def _start_moving_statistics(phase: Phase, cluster: Cluster) -> None:
    """BatchNormalization that trains (from scratch): its moving statistics start from those of the first
    training batch (job.model.start_moving_statistics; over several replicas, of the whole global batch)."""
    with cluster.strategy.scope():
        images, _ = next(iter(cluster.strategy.distribute_datasets_from_function(lambda ctx: phase.dataset_fn(ctx, 0))))
    cluster.strategy.run(lambda x: start_moving_statistics(phase.model, x), args=(images,))
    log.info("moving statistics started from a batch", phase=phase.name,
             layers=len(moving_statistics(phase.model)) // 2)


class _Saver:
    """Checkpoints of a phase: when asked (phase end, SIGTERM, every_steps), and when `every` seconds have
    passed since the last one. Whether one is due is this worker's clock; the loop puts it through an
    all-reduce first, so that every worker saves at the same boundary."""

    def __init__(self, ckpt: Checkpoints, state: RunState, every: float, **objects):
        self.ckpt, self.state, self.every, self.objects = ckpt, state, every, objects
        self.last = time.monotonic()

    def due(self) -> bool:
        return bool(self.every) and time.monotonic() - self.last >= self.every

    def save(self) -> None:
        self.ckpt.save(self.state, **self.objects)
        self.last = time.monotonic()


def _train_epoch(phase: Phase, cluster: Cluster, global_batch: int, steps: int, batches, step, state: RunState,
                 options: Options, saver: _Saver) -> dict:
    """The rest of the current epoch (all of it unless resumed mid-epoch), then validation: its record."""
    epoch, first = state.epoch + 1, state.step  # a resumed epoch runs from its step `first`
    metrics.epoch_started(phase.name, epoch, phase.epochs, steps, first)
    started = time.monotonic()
    local_images = global_batch // cluster.num_workers
    with logs.progress(f"{phase.name} epoch {epoch}/{phase.epochs}", steps - state.step) as advance:
        while state.step < steps:
            t0 = time.perf_counter()
            x, y = next(batches)
            waited_for_data = time.perf_counter() - t0
            flags = tf.constant([float(signals.requested()), float(saver.due())])
            loss_sum, correct, agreed = step(x, y, flags)
            stop, due = (float(v) for v in agreed)
            # Reading the results waits for the step: the timing is the step's, not its dispatch.
            state.add_step(float(loss_sum), float(correct))
            metrics.step_done(phase.name, local_images, time.perf_counter() - t0, waited_for_data)
            advance(1)
            if stop > 0:
                saver.save()
                saved = getattr(saver.ckpt, "on_stop", "checkpoint saved")  # a search trial: nothing kept in storage
                raise signals.stopped(f"in {phase.name} epoch {epoch} after step {state.step}, {saved}")
            if state.step < steps and (due > 0 or (options.every_steps and state.step % options.every_steps == 0)):
                saver.save()
    seen = steps * global_batch
    seconds = time.monotonic() - started
    record = {"epoch": epoch, "loss": state.sums[0] / seen, "accuracy": state.sums[1] / seen,
              "seconds": round(seconds, 3), "images_per_second": round((steps - first) * global_batch / seconds, 1)}
    record.update(phase.validate() or {})
    metrics.epoch_done(phase.name, epoch, train_loss=record["loss"], train_accuracy=record["accuracy"],
                       val_loss=record.get("val_loss", math.nan), val_accuracy=record.get("val_accuracy", math.nan),
                       val_map=record.get("val_map", math.nan) if options.multi_label else None)
    katib.epoch_done(options.metrics_file, phase.name, record, chief=cluster.is_chief)
    log.info("epoch done", phase=phase.name, **record)
    return record
