"""The training loop and its checkpoints, driven directly with a tiny model on one CPU device: early
stopping restores the best epoch, a crashed phase resumes at its next epoch with its optimizer, and
`Checkpoints` on a local folder ignores stray files, never reuses numbers and restores what it saved."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import structlog.testing
from hypothesis import given, settings
from hypothesis import strategies as st

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402

from job import dataset, distribute, loop, storage  # noqa: E402
from job.checkpoint import Checkpoints, number  # noqa: E402
from job.runstate import RunState  # noqa: E402

BATCH = 8


@pytest.fixture(scope="module")
def cluster():
    return distribute.setup("one_device", 0, False)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    return x, y


def tiny_model(cluster) -> keras.Model:
    keras.utils.set_random_seed(0)
    with cluster.strategy.scope():
        inputs = keras.Input((4,))
        return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))


def training(x, y, start: int = 0):
    return dataset.feature_dataset(x, y, BATCH, shuffle=True, seed=1, repeat=True, start=start)


def phase_of(model, data, epochs: int, validate) -> loop.Phase:
    x, y = data
    return loop.Phase(name="head", model=model,
                      dataset_fn=lambda ctx, start: training(x, y, start),
                      examples=len(y), epochs=epochs, learning_rate=0.05, validate=validate)


def checkpoints(folder, cluster) -> Checkpoints:
    return Checkpoints(storage.LocalStore(str(folder / "out")), folder / "work", cluster, keep=2)


def test_early_stopping_restores_the_best_epoch(tmp_path, cluster, data):
    model = tiny_model(cluster)
    scripted = iter([1.0, 0.5, 0.8, 0.9, 0.95, 0.97])  # best at epoch 2; patience 2 stops after epoch 4
    snapshots = []

    def validate():
        snapshots.append([w.copy() for w in model.get_weights()])
        return {"val_loss": next(scripted), "val_accuracy": 0.5}

    state = RunState()
    loop.run_phase(phase_of(model, data, 6, validate), cluster, BATCH, loop.Options(patience=2),
                   checkpoints(tmp_path, cluster), state)
    assert [r["epoch"] for r in state.history["head"]] == [1, 2, 3, 4]
    assert state.best_epoch == 2 and state.epoch == 6
    for restored, best in zip(model.get_weights(), snapshots[1]):
        np.testing.assert_array_equal(restored, best)
    assert not np.array_equal(model.get_weights()[0], snapshots[3][0])  # epoch 4 trained on


class Crash(Exception):
    pass


def test_a_crashed_phase_resumes_at_its_next_epoch(tmp_path, cluster, data):
    model = tiny_model(cluster)
    calls = []

    def crash_in_epoch_3():
        calls.append(1)
        if len(calls) == 3:
            raise Crash  # after epoch 2's checkpoint, before epoch 3's
        return {"val_loss": 1.0 / len(calls), "val_accuracy": 0.5}

    with pytest.raises(Crash):
        loop.run_phase(phase_of(model, data, 4, crash_in_epoch_3), cluster, BATCH, loop.Options(patience=0),
                       checkpoints(tmp_path, cluster), RunState())

    model = tiny_model(cluster)  # a new process: fresh weights, restored from storage
    ckpt = checkpoints(tmp_path, cluster)
    state = ckpt.fetch()
    assert (state.phase, state.epoch, state.step) == ("head", 2, 0)
    assert ckpt.number == 2
    seen = []
    validate = lambda: {"val_loss": seen.append(1) or 0.1, "val_accuracy": 0.5}  # noqa: E731
    loop.run_phase(phase_of(model, data, 4, validate), cluster, BATCH, loop.Options(patience=0), ckpt, state)
    assert len(seen) == 2 and [r["epoch"] for r in state.history["head"]] == [1, 2, 3, 4]
    assert ckpt.number == 4  # numbering continued after the fetched checkpoint


def test_checkpoints_ignore_stray_files_and_restore_what_they_saved(tmp_path, cluster):
    model = tiny_model(cluster)
    ckpt = checkpoints(tmp_path, cluster)
    state = RunState(config={"train.seed": 1})
    state.start("head")
    ckpt.save(state, weights=model)
    saved = [w.copy() for w in model.get_weights()]
    model.set_weights([np.zeros_like(w) for w in saved])
    ckpt.restore(weights=model)  # without a fetch: the checkpoint this run saved
    for w, s in zip(model.get_weights(), saved):
        np.testing.assert_array_equal(w, s)

    remote = tmp_path / "out" / "checkpoints"
    (remote / ".ckpt-7.index.123-456.part").write_bytes(b"half")  # an interrupted copy
    (remote / "notes.txt").write_text("not a checkpoint")
    for _ in range(3):
        ckpt.save(state, weights=model)
    fresh = checkpoints(tmp_path, cluster)
    assert fresh.fetch() == state and fresh.number == 4
    names = sorted(p.name for p in remote.iterdir())
    assert {number(n) for n in names} - {None} == {3, 4}  # keep=2 pruned 1 and 2, left the strays alone
    assert ".ckpt-7.index.123-456.part" in names and "notes.txt" in names


def test_checkpoint_file_names():
    assert number("ckpt-12.index") == 12 and number("ckpt-3.data-00000-of-00001") == 3
    assert number("checkpoint") is None and number(".ckpt-7.index.1-2.part") is None and number("x-1.txt") is None


@pytest.mark.parametrize("every_seconds, saves", [(3600.0, 1), (0.0, 4), (1e-9, 20)])
def test_checkpoints_by_time(tmp_path, cluster, data, every_seconds, saves):
    """Never more often than asked: an hour apart, only the phase's end; 0, every epoch end; due all the
    time, every step boundary (4 mid-epoch + the epoch's end, 5 steps an epoch)."""
    model = tiny_model(cluster)
    ckpt = checkpoints(tmp_path, cluster)
    loop.run_phase(phase_of(model, data, 4, lambda: {"val_loss": 0.5, "val_accuracy": 0.5}), cluster, BATCH,
                   loop.Options(patience=0, every_seconds=every_seconds), ckpt, RunState())
    assert ckpt.number == saves


def test_the_multilabel_loss_is_binary_cross_entropy_with_positive_weights():
    import tensorflow as tf

    per_example = loop._loss_fn(loop.Options(multi_label=True, class_weights=(2.0, 1.0)), 2)
    y = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    p = np.array([[0.8, 0.3], [0.4, 0.9], [0.6, 0.2]], np.float32)
    expected = -np.mean(np.array([2.0, 1.0]) * y * np.log(p) + (1 - y) * np.log(1 - p), axis=-1)
    np.testing.assert_allclose(per_example(tf.constant(y), tf.constant(p)).numpy(), expected, rtol=1e-5)
    correct = loop._correct(tf.constant(y), tf.constant(p), multi_label=True)
    assert float(correct) == pytest.approx(1.0 + 1.0 + 0.5)  # per example: the share of labels right at 0.5


def test_a_multilabel_phase_trains_and_validates_on_map(tmp_path, cluster, data):
    x, _ = data
    y = np.stack([x[:, 0] > 0, x[:, 1] > 0], axis=1).astype(np.float32)  # two labels, any number per example
    keras.utils.set_random_seed(0)
    with cluster.strategy.scope():
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(2, activation="sigmoid")(inputs))
    phase = loop.Phase(name="head", model=model,
                       dataset_fn=lambda ctx, start: training(x, y, start),
                       examples=len(y), epochs=4, learning_rate=0.05,
                       validate=loop.validator(model, dataset.feature_dataset(x, y, 16), multi_label=True))
    state = RunState()
    loop.run_phase(phase, cluster, BATCH, loop.Options(patience=0, multi_label=True, metric="val_map"),
                   checkpoints(tmp_path, cluster), state)
    records = state.history["head"]
    keys = ["accuracy", "epoch", "images_per_second", "learning_rate", "loss", "seconds", "val_accuracy", "val_loss",
            "val_map"]
    assert [sorted(r) for r in records] == [keys] * 4
    probs = model.predict(x, verbose=0)  # the best epoch's weights: its record's binary accuracy at 0.5
    assert records[state.best_epoch - 1]["val_accuracy"] == pytest.approx(float(np.mean((probs >= 0.5) == y)))
    assert records[-1]["val_loss"] < records[0]["val_loss"] and 0 < records[-1]["val_map"] <= 1
    assert state.best_epoch == max(range(1, 5), key=lambda e: (records[e - 1]["val_map"], -records[e - 1]["val_loss"]))


def test_validation_reports_its_progress_as_a_stage(cluster, data, monkeypatch):
    # A validation pass moved no metric: a long one (a large validation split on CPU) fired FinetuneJobStalled.
    from job import metrics

    x, y = data
    keras.utils.set_random_seed(0)
    model = keras.Model(inputs := keras.Input((4,)), keras.layers.Dense(2, activation="softmax")(inputs))
    seen = []
    real = metrics.stage_progress
    monkeypatch.setattr(metrics, "stage_progress", lambda *a: seen.append(a) or real(*a))
    record = loop.validator(model, dataset.feature_dataset(x, y, 16), images=len(y))()
    assert set(record) == {"val_loss", "val_accuracy"}
    assert seen == [("validation", done, 40) for done in (0, 16, 32, 40)]
    labels = {**metrics._run.labels, "stage": "validation"}
    assert metrics.REGISTRY.get_sample_value("finetune_job_stage_items_done", labels) == 40


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 9), st.integers(0, 40), st.integers(0, 3))
def test_the_training_order_read_on_from_any_point_is_the_uninterrupted_one(n, start, seed):
    def read(begin: int, count: int) -> list[int]:
        ds = dataset._indices(n, shuffle=True, seed=seed, repeat=True, start=begin)
        return [int(i) for i in ds.take(count).as_numpy_iterator()]

    whole = read(0, start + 12)
    assert read(start, 12) == whole[start:]
    epochs = [sorted(whole[k:k + n]) for k in range(0, len(whole) - n + 1, n)]
    assert all(e == list(range(n)) for e in epochs)  # every epoch a permutation


def improving(state, crash_at=0):
    """A validation that improves every epoch, raising Crash at epoch `crash_at`."""
    def validate():
        if len(state.history["head"]) + 1 == crash_at:
            raise Crash
        return {"val_loss": 1.0 / (len(state.history["head"]) + 1), "val_accuracy": 0.5}
    return validate


def test_a_phase_resumed_mid_epoch_ends_with_the_uninterrupted_weights(tmp_path, cluster, data):
    """Checkpoints every 2 steps (5 an epoch); a crash at epoch 3's validation resumes at its step 4 and reads
    on in the same order: the same per-epoch training losses and the same final weights. Validation improves
    every epoch, so the final weights are the last epoch's (not an early best that hides the difference)."""
    options = loop.Options(patience=0, every_steps=2)

    whole_state, model = RunState(), tiny_model(cluster)
    loop.run_phase(phase_of(model, data, 4, improving(whole_state)), cluster, BATCH, options,
                   checkpoints(tmp_path / "whole", cluster), whole_state)
    whole = model.get_weights()
    cut = RunState()
    with pytest.raises(Crash):
        loop.run_phase(phase_of(tiny_model(cluster), data, 4, improving(cut, crash_at=3)), cluster, BATCH, options,
                       checkpoints(tmp_path / "cut", cluster), cut)
    ckpt = checkpoints(tmp_path / "cut", cluster)
    state = ckpt.fetch()
    assert (state.epoch, state.step) == (2, 4)
    model = tiny_model(cluster)  # a new process: fresh weights, restored from storage
    loop.run_phase(phase_of(model, data, 4, improving(state)), cluster, BATCH, options, ckpt, state)
    assert [r["loss"] for r in state.history["head"]] == [r["loss"] for r in whole_state.history["head"]]
    for a, b in zip(whole, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def averaged_phase(model, data, epochs: int, validate, average_epochs: float = 1.0) -> loop.Phase:
    phase = phase_of(model, data, epochs, validate)
    phase.average_epochs = average_epochs
    return phase


def test_an_averaged_phase_trains_alike_and_keeps_the_moving_average(tmp_path, cluster, data):
    """train.finetune.average_epochs: the average is what validation sees and what the phase ends with, while
    training itself goes on from the live weights: the same training losses as without it."""
    def recording(state, seen):
        def validate():
            seen.append([w.copy() for w in state["model"].get_weights()])
            return {"val_loss": 1.0 / len(seen), "val_accuracy": 0.5}
        return validate

    runs = {}
    for name, average in (("plain", 0.0), ("averaged", 1.0)):
        model, seen, state = tiny_model(cluster), [], RunState()
        loop.run_phase(averaged_phase(model, data, 3, recording({"model": model}, seen), average), cluster, BATCH,
                       loop.Options(patience=0), checkpoints(tmp_path / name, cluster), state)
        runs[name] = (model.get_weights(), seen, [r["loss"] for r in state.history["head"]])
    (plain, plain_seen, plain_losses), (averaged, averaged_seen, averaged_losses) = runs["plain"], runs["averaged"]
    assert averaged_losses == plain_losses  # the average never feeds back into training
    for a, b in zip(averaged, averaged_seen[-1]):
        np.testing.assert_array_equal(a, b)  # the phase ends with the last (best) epoch's average
    assert not np.array_equal(averaged[0], plain[0])
    assert not np.array_equal(averaged_seen[0][0], plain_seen[0][0])  # validation saw the average


def test_a_phase_that_keeps_its_last_epoch_keeps_its_moving_average(tmp_path, cluster, data):
    # train.refit with train.finetune.average_epochs: the refit (no validation, its last epoch kept) exported the live
    # weights, though the fine-tuning had chosen its epochs on the average's scores and the card promised the average.
    options = loop.Options(patience=0)
    model, state = tiny_model(cluster), RunState()
    loop.run_phase(averaged_phase(model, data, 3, improving(state)), cluster, BATCH, options,
                   checkpoints(tmp_path / "best", cluster), state)  # improving: its best is its last epoch's average
    last_average = model.get_weights()
    model = tiny_model(cluster)
    refit = dataclasses.replace(averaged_phase(model, data, 3, lambda: None), restore_best=False)
    loop.run_phase(refit, cluster, BATCH, options, checkpoints(tmp_path / "refit", cluster), RunState())
    for a, b in zip(last_average, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    model = tiny_model(cluster)  # without the average: its live weights, as before
    loop.run_phase(dataclasses.replace(refit, model=model, average_epochs=0.0), cluster, BATCH, options,
                   checkpoints(tmp_path / "plain", cluster), RunState())
    assert not np.array_equal(model.get_weights()[0], last_average[0])


def test_an_averaged_phase_resumed_mid_epoch_ends_with_the_uninterrupted_weights(tmp_path, cluster, data):
    """The moving average is in the checkpoint: a phase resumed mid-epoch ends exactly as an uninterrupted one."""
    options = loop.Options(patience=0, every_steps=2)

    whole_state, model = RunState(), tiny_model(cluster)
    loop.run_phase(averaged_phase(model, data, 4, improving(whole_state)), cluster, BATCH, options,
                   checkpoints(tmp_path / "whole", cluster), whole_state)
    whole = model.get_weights()
    cut = RunState()
    with pytest.raises(Crash):
        loop.run_phase(averaged_phase(tiny_model(cluster), data, 4, improving(cut, crash_at=3)), cluster, BATCH,
                       options, checkpoints(tmp_path / "cut", cluster), cut)
    ckpt = checkpoints(tmp_path / "cut", cluster)
    state = ckpt.fetch()
    model = tiny_model(cluster)
    loop.run_phase(averaged_phase(model, data, 4, improving(state)), cluster, BATCH, options, ckpt, state)
    for a, b in zip(whole, model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_reused_trainer_trains_at_another_rate_as_a_fresh_one(tmp_path, cluster, data, schedule):
    """loop.Reuse (train.search's trials): a phase after another on the same model, at another rate and from the
    same start, trains bit for bit as the same phase on a fresh optimizer, with the step traced once."""
    options = loop.Options(patience=0, lr_schedule=schedule)

    def train(model, rate, folder, reuse=None):
        state = RunState()
        phase = averaged_phase(model, data, 3, improving(state))
        phase.learning_rate = rate
        loop.run_phase(phase, cluster, BATCH, options, checkpoints(tmp_path / folder, cluster), state, reuse)
        return model.get_weights(), [(r["loss"], r["learning_rate"]) for r in state.history["head"]]

    reuse, model = loop.Reuse(), tiny_model(cluster)
    start = [v.numpy() for v in model.variables]
    first = train(model, 0.05, "first", reuse)
    trainer = reuse.trainer
    for variable, value in zip(model.variables, start):
        variable.assign(value)
    second = train(model, 0.2, "second", reuse)
    alone = train(tiny_model(cluster), 0.2, "alone")
    assert reuse.trainer is trainer and trainer.step.experimental_get_tracing_count() == 1
    assert second[1] == alone[1] and second[1] != first[1]
    for a, b in zip(second[0], alone[0]):
        np.testing.assert_array_equal(a, b)


def test_rate_scales_scale_each_variables_rate(tmp_path, cluster, data):
    """train.finetune.layer_decay's mechanism: a variable at share 0 does not move, shares of 1 train bit for bit
    as without shares, and a share in between moves a variable, but not as far as the full rate."""
    options = loop.Options(patience=0)

    def train(scales, folder):
        state, model = RunState(), tiny_model(cluster)
        start = [v.numpy() for v in model.trainable_variables]
        phase = phase_of(model, data, 2, improving(state))
        phase.rate_scales = scales
        loop.run_phase(phase, cluster, BATCH, options, checkpoints(tmp_path / folder, cluster), state)
        return start, [v.numpy() for v in model.trainable_variables]

    start, plain = train((), "plain")
    _, ones = train((1.0, 1.0), "ones")
    _, frozen = train((0.0, 1.0), "frozen")  # kernel, bias
    _, slow = train((0.1, 1.0), "slow")
    for a, b in zip(plain, ones):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(frozen[0], start[0])
    assert not np.array_equal(frozen[1], start[1])
    assert 0 < np.abs(slow[0] - start[0]).max() < np.abs(plain[0] - start[0]).max()


def test_layer_depths_count_the_bases_layers_with_weights():
    """Each trainable variable's depth among the base's layers with weights (activations have none and do not
    count); the head's variables are not the base's."""
    from job import model as model_lib

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(2, 3, name="first")(inputs)
    x = keras.layers.BatchNormalization(name="norm")(x)
    x = keras.layers.ReLU()(x)
    base = keras.Model(inputs, keras.layers.Conv2D(2, 3, name="last")(x))
    head = keras.layers.Dense(2, name="head")
    whole = keras.Model(inputs, head(keras.layers.GlobalAveragePooling2D()(base(inputs))))
    model_lib.unfreeze_top(base, 4)
    depths, layers = model_lib.layer_depths(base, whole.trainable_variables)
    names = [v.path for v in whole.trainable_variables]
    assert layers == 3
    assert dict(zip(names, depths)) == {"first/kernel": 0, "first/bias": 0, "last/kernel": 2, "last/bias": 2,
                                        "head/kernel": None, "head/bias": None}


def test_a_diverged_phase_stops_before_its_epoch_is_saved(tmp_path, cluster, data):
    # A loss of NaN went on to an exported model of NaNs, and the run ended complete with exit 0.
    from job.errors import ConfigError

    model, state, ckpt = tiny_model(cluster), RunState(), checkpoints(tmp_path, cluster)
    phase = phase_of(model, data, 3, lambda: {"val_loss": 0.5, "val_accuracy": 0.5})
    phase = dataclasses.replace(phase, learning_rate=1e38)  # Adam steps by about the rate: weights of 1e38
    with pytest.raises(ConfigError, match=r"^training diverged: head epoch 1 has loss (nan|inf) at learning rate "
                                          r"1e\+38; lower train\.head\.learning_rate \(under a new run_id where "):
        loop.run_phase(phase, cluster, BATCH, loop.Options(), ckpt, state)
    assert ckpt.latest is None and state.epoch == 0  # nothing of the diverged epoch kept
    scripted = iter([0.5, float("nan")])  # the validation loss alone, in the second epoch
    phase = phase_of(tiny_model(cluster), data, 3, lambda: {"val_loss": next(scripted), "val_accuracy": 0.5})
    with pytest.raises(ConfigError, match=r"^training diverged: head epoch 2 has val_loss nan"):
        loop.run_phase(phase, cluster, BATCH, loop.Options(), checkpoints(tmp_path / "2", cluster), RunState())


def test_a_search_whose_every_trial_diverged_stops_the_run(tmp_path, cluster, data):
    # Every rate of train.search diverged (loss NaN from its first epoch): the NaN trial was chosen, as nothing was
    # better, and a model of NaNs exported as complete with exit 0 (a trial's divergence is ranked, not refused).
    from types import SimpleNamespace

    from job import search
    from job.errors import ConfigError

    model = tiny_model(cluster)

    def validate():  # NaN from the first epoch, as a rate far too high gives it
        return {"val_loss": float("nan"), "val_accuracy": float("nan")}

    def make_phase(rate, pause_after=0, on_epoch=False):
        return dataclasses.replace(phase_of(model, data, 3, validate), name="finetune", learning_rate=rate,
                                   pause_after=pause_after)

    run = SimpleNamespace(parts=SimpleNamespace(model=model), cluster=cluster, options=loop.Options(),
                          cfg=SimpleNamespace(train=SimpleNamespace(batch_size=BATCH)), work=tmp_path, multi=False,
                          state=RunState(), ckpt=checkpoints(tmp_path, cluster))
    with pytest.raises(ConfigError, match=r"^training diverged: every train.search trial has val_loss nan "
                                          r"\(learning rates 0.1, 0.3\); lower train.search.learning_rates, under a "
                                          r"new run_id"):
        search.run(run, make_phase, [0.1, 0.3], 1, lambda record: None)
    assert run.ckpt.latest is None  # nothing of the diverged trials kept in storage


def test_the_epoch_gauges_show_the_chosen_trial_not_the_last_one(tmp_path, cluster, data):
    # The gauges held the last trial's results (a loser's) to the end where the chosen trial ran no epoch more.
    from types import SimpleNamespace

    from job import metrics, pipeline, search

    model = tiny_model(cluster)
    scores = iter([1.0, 1.0, 3.0, 3.0])  # trial 1 (chosen), then trial 2, two epochs each

    def validate():
        return {"val_loss": next(scores), "val_accuracy": 0.5}

    def make_phase(rate, pause_after=0, on_epoch=False):
        return dataclasses.replace(phase_of(model, data, 2, validate), name="finetune", learning_rate=rate,
                                   pause_after=pause_after)

    run = SimpleNamespace(parts=SimpleNamespace(model=model), cluster=cluster, options=loop.Options(),
                          cfg=SimpleNamespace(train=SimpleNamespace(batch_size=BATCH),
                                              metrics=SimpleNamespace(file="")),
                          work=tmp_path, multi=False, board=None, state=RunState(), ckpt=checkpoints(tmp_path, cluster))
    search.run(run, make_phase, [1e-3, 3e-3], 2, lambda record: pipeline._replay(run, record))
    assert [r["chosen"] for r in run.state.search] == [True, False]
    labels = {**metrics._run.labels, "phase": "finetune"}
    assert metrics.REGISTRY.get_sample_value("finetune_job_val_loss", labels) == 1.0
    assert metrics.REGISTRY.get_sample_value("finetune_job_train_loss", labels) == run.state.history["finetune"][-1][
        "loss"]


def test_one_search_rate_is_no_search_and_says_so(capsys):
    # `learning_rates: [3e-4]` fine-tuned at the default 1e-4 without a word, and config.yaml kept the 3e-4.
    from job import config, search

    def rates(*sets):
        return search.rates(config.load(None, ["data.uri=/d", "output.uri=/o", *sets], environ={}), True)

    capsys.readouterr()
    assert rates("train.search.learning_rates=[3e-4]") == [] and "holds one rate" in capsys.readouterr().out
    assert rates("train.search.learning_rates=[3e-4]", "train.finetune.learning_rate=3e-4") == []
    assert "holds one rate" not in capsys.readouterr().out  # the rate it names is the one fine-tuned at
    assert rates("train.search.learning_rates=[1e-4, 3e-4]") == [1e-4, 3e-4]


def test_the_features_cache_key_follows_the_base_weights(monkeypatch, tmp_path):
    # The key named `model.weights` as configured: a weights file replaced at the same path between attempts met the
    # old base's cached features on the resume.
    from types import SimpleNamespace

    from job import config, pipeline

    keys = []
    monkeypatch.setattr(dataset, "cached_features", lambda extractor, batches, count, key, *_: keys.append(key))
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    data = SimpleNamespace(identity=lambda split, share: [["a.png", 1, 2, 0]], items=lambda split, share: (["a"], [0]),
                           images=lambda split, batch, share=None: None)
    run = SimpleNamespace(cfg=config.load(None, ["data.uri=/d", "output.uri=/o"], environ={}), data=data,
                          parts=SimpleNamespace(base=base, features=base), classes=["a", "b"], cache=tmp_path)
    pipeline._features(run, "train", None)
    pipeline._features(run, "train", None)
    base.layers[0].kernel.assign(base.layers[0].kernel + 1.0)  # another base at the same path
    pipeline._features(run, "train", None)
    assert keys[0] == keys[1] != keys[2]


def test_an_unfreeze_that_names_nothing_to_train_is_refused():
    """`unfreeze: 1` (MobileNetV2's out_relu: no weights) or down to a BatchNormalization (kept frozen) fine-tuned
    none of the base without a word, where `unfreeze: 0` is refused; the first count that reaches weights trains."""
    from job import model as model_lib

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(2, 3, name="first")(inputs)
    x = keras.layers.Conv2D(2, 3, name="last")(x)
    x = keras.layers.BatchNormalization(name="norm")(x)
    base = keras.Model(inputs, keras.layers.ReLU(name="relu")(x))
    for unfreeze in (1, 2, "norm", "relu"):
        count = model_lib.check_unfreeze(base, unfreeze, "tiny")
        assert re.fullmatch(r"config: train.finetune.unfreeze: \S+ unfreezes no layer with weights to train "
                            r"\((norm, )?relu: none, or BatchNormalization, kept frozen\); the top one is last: "
                            r"unfreeze 3 or more", model_lib.idle_unfreeze(base, count, unfreeze))
    counts = [model_lib.check_unfreeze(base, u, "tiny") for u in (3, "last", "all")]
    assert counts == [3, 3, 4] and [model_lib.idle_unfreeze(base, c, "x") for c in counts] == [None] * 3
    model_lib.unfreeze_top(base, 3)
    assert [v.path for v in base.trainable_variables] == ["last/kernel", "last/bias"]


def test_a_stop_asked_before_a_phase_begins_stops_before_it_is_built(tmp_path, cluster, data):
    # It waited for the phase to be built and traced (5 to 25 s of the grace period) to save its first step; what came
    # before is checkpointed at its end. (A phase partway through, a resumed one or the search's continued trial, saves
    # its next step and stops then, as before: tests/e2e/test_fault_tolerance.py.)
    from job import signals
    from job.errors import Preempted

    model, state, ckpt = tiny_model(cluster), RunState(), checkpoints(tmp_path, cluster)
    phase = phase_of(model, data, 3, lambda: {"val_loss": 0.5, "val_accuracy": 0.5})
    before = [w.numpy() for w in model.weights]
    signals._requested.set()  # what the handler does when SIGTERM arrives (the handlers are not installed here)
    try:
        with pytest.raises(Preempted, match="^stopped by SIGTERM before head began; re-run the same run_id"):
            loop.run_phase(phase, cluster, BATCH, loop.Options(), ckpt, state)
        assert state.step == 0 and ckpt.store.list() == []
        assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))
    finally:
        signals._requested.clear()


def test_unfreeze_is_refused_for_a_new_run_only_where_the_fine_tuning_runs(tmp_path, cluster):
    # With train.finetune.epochs: 0 unfreeze is unused (and said to be): `unfreeze: 1` was refused there too. A run
    # begun by a version that took it, resumed from its checkpoint, goes on with a warning: the refusal's advice
    # (another value) was refused as a change of recipe, and only a new run_id went on.
    from job import model as model_lib
    from job import pipeline
    from job.config import Config
    from job.errors import ConfigError

    parts = model_lib.build("mobilenet_v2", None, (32, 32), 2, 16, 0.1)

    def cfg(epochs: int) -> Config:
        return Config.model_validate({"data": {"uri": "/d", "image_size": [32, 32]}, "output": {"uri": "/o"},
                                      "model": {"weights": "/w.weights.h5"},
                                      "train": {"finetune": {"epochs": epochs, "unfreeze": 1}}})

    pipeline._unfreeze_trains_something(cfg(0), parts, 1, {})
    with pytest.raises(ConfigError, match="^config: train.finetune.unfreeze: 1 unfreezes no layer with weights to "
                                          "train .*the top one is Conv_1: unfreeze 3 or more$"):
        pipeline._unfreeze_trains_something(cfg(1), parts, 1, {})
    with structlog.testing.capture_logs() as logged:
        pipeline._unfreeze_trains_something(cfg(1), parts, 1, {"phase": "head", "epochs_done": 1, "steps_done": 0})
    assert [r["log_level"] for r in logged] == ["warning"] and "this run began with it" in logged[0]["event"]
    pipeline._unfreeze_trains_something(cfg(1), parts, 3, {})


def test_an_overwrite_refused_for_its_unfreeze_deletes_nothing(monkeypatch, tmp_path):
    # Checked after the resume point, the refusal came after the overwrite had deleted the complete run: nothing left.
    from job import pipeline
    from job.config import Config
    from job.errors import ConfigError
    from job.sample_data import write_sample_dataset

    monkeypatch.setattr(pipeline, "resolve_weights", lambda cfg, work: (None, False))  # a base as built, no file
    monkeypatch.setattr(pipeline, "check_weights", lambda cfg: None)
    monkeypatch.setattr(tf.config.experimental, "enable_op_determinism", lambda: None)  # (global: not for a test)
    write_sample_dataset(tmp_path / "d", classes=2, per_class=4, size=32, seed=0, test_per_class=0)
    run = tmp_path / "out" / "r1"
    run.mkdir(parents=True)
    for name in ("_SUCCESS", "model.keras", "metrics.json", "config.yaml"):
        (run / name).write_text("{}")
    cfg = Config.model_validate({"data": {"uri": str(tmp_path / "d"), "image_size": [32, 32],
                                          "cache_dir": str(tmp_path / "cache")},
                                 "output": {"uri": str(tmp_path / "out"), "overwrite": True}, "run_id": "r1",
                                 "model": {"weights": "/w.weights.h5"}, "metrics": {"port": 0},
                                 "train": {"finetune": {"unfreeze": 1}}})
    with pytest.raises(ConfigError, match="train.finetune.unfreeze: 1 unfreezes no layer with weights to train"):
        pipeline.prepare(cfg)
    assert sorted(p.name for p in run.iterdir()) == ["_SUCCESS", "config.yaml", "metrics.json", "model.keras"]
