"""train.refit's rules (job/refit.py): where it applies, and the epochs and rate it trains: pure logic."""

import pytest

from job import refit
from job.config import Config

DATA = {"data": {"uri": "s3://b/d"}, "model": {"weights": "s3://b/w.h5"}, "output": {"uri": "s3://b/out"}}


def cfg(**train):
    return Config.model_validate({**DATA, "train": train})


@pytest.mark.parametrize(("train", "multi", "from_scratch", "validation", "why"), [
    ({"refit": True}, False, False, 10, None),
    ({"refit": False}, False, False, 10, "train.refit is false"),
    ({"refit": True}, True, False, 10, "multi_label"),
    ({"refit": True}, False, True, 10, "model.weights: none"),
    ({"refit": True, "head": {"mode": "end_to_end"}}, False, False, 10, "train.head.mode"),
    ({"refit": True}, False, False, 0, "no validation split"),
])
def test_where_the_refit_applies(train, multi, from_scratch, validation, why):
    found = refit.skipped(cfg(**train), multi, from_scratch, validation)
    assert found == why if why is None else found.startswith(why)


def test_the_plan_is_each_phases_best_epoch_and_the_chosen_rate():
    history = {"head": [{"epoch": 1, "loss": 1, "accuracy": 0, "val_loss": 0.9, "val_accuracy": 0.5},
                        {"epoch": 2, "loss": 1, "accuracy": 0, "val_loss": 0.7, "val_accuracy": 0.6},
                        {"epoch": 3, "loss": 1, "accuracy": 0, "val_loss": 0.8, "val_accuracy": 0.7}],
               "finetune": [{"epoch": 1, "loss": 1, "accuracy": 0, "val_loss": 0.5, "val_accuracy": 0.7}]}
    assert refit.plan(history, "val_loss", 3e-4) == {"head_epochs": 2, "finetune_epochs": 1, "learning_rate": 3e-4}
    assert refit.plan(history, "val_accuracy", 1e-4)["head_epochs"] == 3
