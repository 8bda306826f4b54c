"""`train.refit`: the recipe once more on training + validation images, for the epochs validation chose.

A script early-stops on its validation split and ships a model that never trained on those images. Once the
job's phases have chosen their epochs on validation (and train.search the fine-tuning rate), the validation
images have done their work as judges; on a few hundred images they are also a quarter more to learn from.
With `train.refit: true` the job then trains again from where it started (the model as built: the pre-trained
base, the head's initial weights, the same seed): the head for the head phase's best epoch count (`refit_head`,
on cached features), then every layer but BatchNormalization for the fine-tuning phase's best epoch count at the
chosen rate (`refit`), each on training + validation images, without early stopping: nothing is left to judge
on. The refit model is the one evaluated on test and exported. The validation report stays the one of the
model the choices were made with, taken before the refit (a model's score on images it trained on says little).

It applies to single-label tasks with a validation split, pre-trained weights and the head on cached features;
elsewhere the run logs why not. Both phases checkpoint and resume like the others.
"""

from __future__ import annotations

from job import recipe

SPLIT = "train+validation"  # what the refit trains on (job.layout's joined splits)


def skipped(cfg, multi: bool, from_scratch: bool, validation_images: int) -> str | None:
    """Why the refit does not apply to this run, or None when it does (pure: no TensorFlow)."""
    if not cfg.train.refit:
        return "train.refit is false"
    if multi:
        return "multi_label: the thresholds are chosen on validation predictions"
    if from_scratch:
        return "model.weights: none (no head phase to repeat)"
    if cfg.train.head.mode != "cached_features":
        return "train.head.mode is not cached_features"
    if not validation_images:
        return "no validation split: nothing chose the epochs"
    return None


def plan(history: dict[str, list[dict]], metric: str, learning_rate: float) -> dict:
    """The refit's epochs (each phase's best, as early stopping kept it) and fine-tuning rate."""
    return {"head_epochs": recipe.best_epoch(metric, history.get("head", [])),
            "finetune_epochs": recipe.best_epoch(metric, history.get("finetune", [])),
            "learning_rate": learning_rate}
