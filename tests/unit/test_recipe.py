"""The recipe's rules (job/recipe.py): pure logic, no TensorFlow."""

import math

import hypothesis.strategies as st
import pytest
from hypothesis import given

from job import recipe


def test_augment_presets_and_lists():
    assert recipe.augment_ops(False) == []
    assert [name for name, _ in recipe.augment_ops(True)] == list(recipe.AUGMENT_PRESET)
    assert recipe.augment_ops(["flip", {"rotation": 0.1}, "zoom"]) == [
        ("flip", 1.0), ("rotation", 0.1), ("zoom", recipe.AUGMENT_OPS["zoom"])]
    for bad, message in [(["spin"], "unknown augmentation op 'spin'"), ([{"zoom": 0}], "factor must be"),
                         ([{"zoom": True}], "factor must be"), ([{"a": 1, "b": 2}], "a name or")]:
        with pytest.raises(ValueError, match=message):
            recipe.augment_ops(bad)


def test_class_weights():
    classes, counts = ["a", "b", "c"], {"a": 60, "b": 60, "c": 12}
    assert recipe.class_weights("none", classes, counts) is None
    auto = recipe.class_weights("auto", classes, counts)
    assert auto == pytest.approx([132 / 180, 132 / 180, 132 / 36])
    # every class carries the same total weight, and the mean weight per example is 1
    assert len({round(w * counts[c], 9) for w, c in zip(auto, classes)}) == 1
    assert sum(w * counts[c] for w, c in zip(auto, classes)) == pytest.approx(132)
    assert recipe.class_weights({"c": 5.0}, classes, counts) == [1.0, 1.0, 5.0]
    with pytest.raises(ValueError, match="does not have: d"):
        recipe.class_weights({"d": 2.0}, classes, counts)


def test_warmup_is_a_tenth_at_least_one_step():
    assert [recipe.warmup_steps(n) for n in (1, 9, 10, 11, 100)] == [1, 1, 1, 2, 10]


def test_early_stopping_comparisons():
    assert recipe.is_better("val_loss", (0.5, 0.1), None)
    assert recipe.is_better("val_loss", (0.4, 0.1), (0.5, 0.9))
    assert not recipe.is_better("val_loss", (0.5, 0.9), (0.5, 0.1))  # strictly lower only
    assert recipe.is_better("val_accuracy", (0.9, 0.8), (0.1, 0.7))
    assert recipe.is_better("val_accuracy", (0.4, 0.7), (0.5, 0.7))  # a tie in accuracy: lower loss wins
    assert not recipe.is_better("val_accuracy", (0.6, 0.7), (0.5, 0.7))
    assert not recipe.is_better("val_accuracy", (0.1, 0.6), (0.5, 0.7))


# ---------------------------------------------------------------- train.search's choice


def _trial(loss: float, accuracy: float) -> dict:
    return {"learning_rate": 1e-4, "val_loss": loss, "val_accuracy": accuracy}


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 1)), min_size=1, max_size=6))
def test_the_chosen_trial_is_the_first_of_the_best(scores):
    trials = [_trial(loss, accuracy) for loss, accuracy in scores]
    by_loss = recipe.choose_trial("val_loss", trials)
    assert by_loss == min(range(len(scores)), key=lambda i: (scores[i][0], i))  # lowest loss, earliest on a tie
    by_accuracy = recipe.choose_trial("val_accuracy", trials)
    assert by_accuracy == min(range(len(scores)), key=lambda i: (-scores[i][1], scores[i][0], i))
    multi = [{"val_loss": loss, "val_map": accuracy} for loss, accuracy in scores]
    assert recipe.choose_trial("val_map", multi) == by_accuracy  # mAP like accuracy: higher is better


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 1)), min_size=1, max_size=6),
       st.lists(st.sampled_from([float("nan"), float("inf")]), min_size=1, max_size=3), st.data())
def test_a_diverged_trial_is_never_chosen_over_a_finite_one(scores, lost, data):
    # A rate of train.search.learning_rates that diverges (loss NaN) is a trial lost, not the run: before, its NaN
    # either won (compared first, nothing is "better" than NaN) or stopped the run.
    trials = [_trial(loss, accuracy) for loss, accuracy in scores]
    for value in lost:
        trials.insert(data.draw(st.integers(0, len(trials))), _trial(value, float("nan")))
    finite = [t for t in trials if math.isfinite(t["val_loss"])]
    for metric in ("val_loss", "val_accuracy"):
        assert trials[recipe.choose_trial(metric, trials)] is finite[recipe.choose_trial(metric, finite)]
    assert recipe.choose_trial("val_loss", [_trial(float("nan"), 0.5)]) == 0  # nothing else to choose
    # ... and then the chosen trial is known to have diverged: every rate did (job/search.py stops the run, exit 2,
    # where it exported a model of NaNs as complete).
    chosen = trials[recipe.choose_trial("val_loss", trials)]
    assert recipe.diverged(chosen) == (not finite)
    assert recipe.diverged(_trial(float("nan"), 0.5)) and recipe.diverged(_trial(0.5, float("inf")))
    assert not recipe.diverged(_trial(0.5, 0.9)) and not recipe.diverged({"val_loss": 0.5, "val_map": None})


@given(st.floats(0, 100), st.integers(1, 10_000))
def test_the_average_spans_about_the_epochs_asked(epochs, steps):
    momentum = recipe.average_momentum(epochs, steps)
    assert 0.0 <= momentum <= 0.9999
    if epochs * steps <= 1:
        assert momentum == 0.0  # a horizon of a step or less: the weights themselves
    elif momentum < 0.9999:
        assert 1.0 / (1.0 - momentum) == pytest.approx(epochs * steps)  # the horizon, in steps


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 1)), min_size=0, max_size=8),
       st.sampled_from(["val_loss", "val_accuracy"]), st.booleans())
def test_the_refit_takes_the_epoch_early_stopping_kept(scores, metric, validated):
    """recipe.best_epoch (train.refit's epochs) reads a phase's records as the loop's RunState kept its best epoch,
    with validation entries or, without them, on the training loss and accuracy."""
    from job.runstate import RunState

    state = RunState()
    state.start("finetune")
    records = []
    for epoch, (loss, accuracy) in enumerate(scores, 1):
        record = ({"epoch": epoch, "loss": 9.0, "accuracy": 0.0, "val_loss": loss, "val_accuracy": accuracy}
                  if validated else {"epoch": epoch, "loss": loss, "accuracy": accuracy})
        records.append(record)
        state.end_epoch(record, (loss, accuracy), metric, patience=0, epochs=len(scores))
    assert recipe.best_epoch(metric, records) == state.best_epoch


@given(st.integers(1, 300), st.floats(0.01, 1.0), st.data())
def test_layer_rates_rise_from_the_lowest_to_the_full_rate(layers, lowest, data):
    """train.finetune.layer_decay: the first layer at `lowest`, the last and the head (None) at the full rate, never
    lower with depth, and one rate for all at 1."""
    depths = data.draw(st.lists(st.one_of(st.none(), st.integers(0, layers - 1)), max_size=40))
    rates = recipe.layer_rates([0, layers - 1, *depths, None], layers, lowest)
    assert rates[0] == pytest.approx(lowest if layers > 1 else 1.0) and rates[1] == 1.0 and rates[-1] == 1.0
    assert all(lowest - 1e-12 <= r <= 1.0 for r in rates)
    by_depth = sorted((d, r) for d, r in zip(depths, rates[2:-1]) if d is not None)
    assert all(a[1] <= b[1] for a, b in zip(by_depth, by_depth[1:]))
    assert recipe.layer_rates(depths, layers, 1.0) == [1.0] * len(depths)
