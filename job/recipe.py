"""The training recipe's rules, as pure logic (no TensorFlow): augmentation ops and presets, class
weights, the learning-rate schedule's shape, and early stopping's notion of "better".

The defaults in job/config.py are what `make bench-quality` measured best (docs/QUALITY.md); the
rules here turn them into numbers. Unit-tested in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# Augmentation ops: name -> default factor. Each is a Keras preprocessing layer, active only while
# training (job/model.py builds them). Factors follow Keras: rotation in fractions of a full turn,
# zoom/translation in fractions of the image side, contrast/brightness in fractions of the range.
AUGMENT_OPS: dict[str, float] = {
    "flip": 1.0,  # horizontal flip (the factor is ignored)
    "vertical_flip": 1.0,
    "rotation": 0.05,
    "zoom": 0.1,
    "translation": 0.1,
    "contrast": 0.2,
    "brightness": 0.2,
}
# `augment: true`. The benchmark's choice: what helped across its tasks (docs/QUALITY.md).
AUGMENT_PRESET: tuple[str, ...] = ("flip", "translation")

AugmentSpec = bool | Sequence[str | Mapping[str, float]]


def augment_ops(spec: AugmentSpec) -> list[tuple[str, float]]:
    """`augment` config value -> [(op, factor)]; ValueError names an unknown op or a bad factor."""
    if spec is True:
        return [(name, AUGMENT_OPS[name]) for name in AUGMENT_PRESET]
    if spec is False:
        return []
    ops = []
    for item in spec:
        if isinstance(item, str):
            name, factor = item, None
        elif isinstance(item, Mapping) and len(item) == 1:
            (name, factor), = item.items()
        else:
            raise ValueError(f"each op is a name or {{name: factor}}, got {item!r}")
        if name not in AUGMENT_OPS:
            spaced = ", with a space after the colon" * (":" in str(name))  # YAML's `{rotation:0.1}` is one key
            raise ValueError(f"unknown augmentation op '{name}' (one of: {', '.join(AUGMENT_OPS)}; a factor is "
                             f"written {{rotation: 0.1}}{spaced})")
        if factor is None:
            factor = AUGMENT_OPS[name]
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
            raise ValueError(f"augmentation op '{name}': factor must be a number in (0, 1], got {factor!r}")
        ops.append((name, float(factor)))
    return ops


def class_weights(setting: str | Mapping[str, float], classes: list[str],
                  counts: Mapping[str, int]) -> list[float] | None:
    """Per-class loss weights in class-index order, or None for unweighted.

    `auto`: n / (k * n_c), the "balanced" heuristic (scikit-learn's, the Keras guide's), so every class
    contributes the same total weight and the mean weight over the training set stays 1. A mapping
    names some classes; the others keep weight 1. ValueError for a class the dataset does not have.
    """
    if setting == "none":
        return None
    if setting == "auto":
        total, k = sum(counts[c] for c in classes), len(classes)
        return [total / (k * counts[c]) if counts[c] else 1.0 for c in classes]
    unknown = sorted(set(setting) - set(classes))
    if unknown:
        raise ValueError(f"train.class_weight names classes the dataset does not have: {', '.join(unknown)}")
    return [float(setting.get(c, 1.0)) for c in classes]


MAX_POSITIVE_WEIGHT = 10.0
# train.finetune.learning_rate of a multi-label run when the config does not set it. Binary cross-entropy is
# averaged over the labels, so each label's gradient is about 1/labels of what a softmax cross-entropy gives
# its class; on the quality bench's multi-label task 3e-4 beat 1e-4 on validation mAP on every seed (+0.8
# points mean, docs/QUALITY.md), while 1e-4 stays the single-label default (3e-4 cost points there on the
# imbalanced task).
MULTI_LABEL_FINETUNE_RATE = 3.0e-4


def positive_weights(setting: str | Mapping[str, float], classes: list[str], positives: Mapping[str, int],
                     total: int) -> list[float] | None:
    """Multi-label: per-label weights of the positive term of the binary cross-entropy, or None.

    `auto`: n_negative / n_positive (TensorFlow's `pos_weight`: a label's positives weigh as much in total as its
    negatives), kept between 1 and MAX_POSITIVE_WEIGHT: a rare label is not drowned by its negatives, and one
    seen a few times does not drown the others. A mapping names some labels; the others keep 1."""
    if setting == "none":
        return None
    if setting == "auto":
        return [min(max((total - positives[c]) / positives[c], 1.0), MAX_POSITIVE_WEIGHT) if positives[c] else 1.0
                for c in classes]
    return class_weights(setting, classes, positives)


# `model.weights: none`: why the head phase is skipped (logged), and what the fine-tuning phase does instead.
FROM_SCRATCH_HEAD_SKIPPED = ("model.weights is none: a head on random frozen features learns nothing, so the "
                             "fine-tuning phase trains every layer, BatchNormalization included, from its first "
                             "epoch, for head.epochs + finetune.epochs epochs at head.learning_rate "
                             "(finetune.unfreeze and finetune.learning_rate do not apply)")


def finetune_schedule(head_epochs: int, head_rate: float, finetune_epochs: int, finetune_rate: float,
                      from_scratch: bool) -> tuple[int, float]:
    """(epochs, learning rate) of the fine-tuning phase.

    With pre-trained weights: the phase's own. From scratch there is no head phase and no pre-trained base
    to protect: the whole network trains for both phases' epochs at the head's rate (a random base needs
    the larger steps; bench/quality.py's fashion-easy-200 task measured it, docs/QUALITY.md).
    """
    if from_scratch:
        return head_epochs + finetune_epochs, head_rate
    return finetune_epochs, finetune_rate


def layer_rates(depths: Sequence[int | None], layers: int, lowest: float) -> list[float]:
    """train.finetune.layer_decay: each trained variable's share of the fine-tuning rate, from its layer's depth in
    the base (0 = the first of `layers` layers with weights; None = not in the base: the head, at the full rate).
    Geometric from `lowest` at the first layer to 1 at the last, so that the rule reads the same whatever the
    backbone's layer count; `lowest` 1 = one rate for every layer."""
    top = layers - 1
    return [1.0 if d is None or top <= 0 else lowest ** (1.0 - min(d, top) / top) for d in depths]


def warmup_steps(total_steps: int) -> int:
    """Linear warm-up before cosine decay: a tenth of the phase's steps, at least one."""
    return max(1, math.ceil(total_steps / 10))


def is_better(metric: str, value: tuple[float, float], best: Sequence[float] | None) -> bool:
    """Whether a (val_loss, val_accuracy) epoch beats the best so far under `metric`.

    val_loss: strictly lower loss. val_accuracy: strictly higher accuracy, or equal accuracy with lower
    loss (small validation sets give many ties in accuracy; the loss breaks them).
    """
    if best is None:
        return True
    loss, accuracy = value
    best_loss, best_accuracy = best
    if metric == "val_loss":
        return loss < best_loss
    return accuracy > best_accuracy or (accuracy == best_accuracy and loss < best_loss)


def monitored(record: Mapping) -> tuple[float, float]:
    """What early stopping compares of an epoch's record (job.loop): (val_loss, val_accuracy or val_map); without
    validation entries, the training loss and accuracy."""
    return (record.get("val_loss", record["loss"]),
            record.get("val_map", record.get("val_accuracy", record.get("accuracy", 0.0))))


def best_epoch(metric: str, records: Sequence[Mapping]) -> int:
    """The epoch (1-based) early stopping kept from a phase's records: the first best under `metric`, as
    `is_better` compares their `monitored` values; 0 for none."""
    best, kept = None, 0
    for record in records:
        value = monitored(record)
        if is_better(metric, value, best):
            best, kept = value, record["epoch"]
    return kept


def choose_trial(metric: str, trials: Sequence[Mapping]) -> int:
    """train.search: the index of the best trial, each a mapping with its best epoch's val_loss and val_accuracy
    (multi-label: val_map), under `metric` as early stopping compares epochs (`is_better`); the earlier on a tie.
    A trial whose scores are not finite (its rate diverged) is never chosen over one whose are."""
    def monitored(t: Mapping) -> tuple[float, float]:
        return t["val_loss"], t.get("val_map", t.get("val_accuracy"))

    finite = [i for i, t in enumerate(trials) if all(v is None or math.isfinite(v) for v in monitored(t))]
    candidates = finite or list(range(len(trials)))
    best = candidates[0]
    for i in candidates[1:]:
        if is_better(metric, monitored(trials[i]), monitored(trials[best])):
            best = i
    return best


def diverged(trial: Mapping) -> bool:
    """A train.search trial whose best epoch's scores are not finite: every epoch it trained diverged (a trial whose
    loss blew up after a finite epoch keeps that epoch's weights as its best)."""
    return not all(v is None or math.isfinite(v) for v in (trial["val_loss"], trial.get("val_map",
                                                                                           trial.get("val_accuracy"))))


def average_momentum(epochs: float, steps_per_epoch: int) -> float:
    """train.finetune.average_epochs: the momentum of a per-step exponential moving average whose horizon
    (1 / (1 - momentum) steps) is `epochs` epochs; 0 (no averaging) when that is a step or less."""
    horizon = epochs * steps_per_epoch
    return 0.0 if horizon <= 1 else min(1.0 - 1.0 / horizon, 0.9999)
