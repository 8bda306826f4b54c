"""`model.weights: none` really trains (issue 17, item 5): BatchNormalization in training mode and trainable,
the whole network from the first epoch, moving statistics that settle. It used to exit 0 with a constant
classifier at chance: the base was called with training=False, so BatchNormalization kept its initial
statistics and a head on frozen random features learned nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BACKBONE, SIZE, run_cli, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scratch(sample_data, tmp_path_factory):
    """One from-scratch run on the sample shapes (3 classes x 30 training images, one colour family each)."""
    tmp = tmp_path_factory.mktemp("scratch")
    cfg = write_config(
        tmp / "c.yaml",
        run_id="scratch",
        data={"uri": str(sample_data), "image_size": [SIZE, SIZE], "cache_dir": str(tmp / "cache")},
        model={"backbone": BACKBONE, "weights": "none"},
        # From scratch trains the whole network for head + finetune epochs (the head phase is skipped); all
        # of them (patience 0), so that the run's length does not hang on 18 validation images.
        train={"batch_size": 16, "head": {"epochs": 6}, "finetune": {"epochs": 6}, "early_stopping_patience": 0},
        output={"uri": str(tmp / "out")},
        metrics={"port": 0, "linger_seconds": 0},
        export={"formats": ["saved_model"]},
    )
    result = run_cli("train", "--config", str(cfg))
    return {"result": result, "out": tmp / "out" / "scratch"}


def _training_images(sample_data):
    from job.dataset import image_dataset
    from job.layout import discover

    rels = [p.relative_to(sample_data).as_posix() for p in sorted(sample_data.rglob("*")) if p.is_file()]
    layout = discover(rels, str(sample_data))
    paths, labels = layout.items("train")
    batches = image_dataset([str(sample_data / p) for p in paths], labels, (SIZE, SIZE), 128)
    return np.concatenate([x.numpy() for x, _ in batches]), np.asarray(labels), layout.classes


def test_from_scratch_run_learns_the_training_images(scratch, sample_data):
    import keras

    import job.model  # noqa: F401  registers the Preprocess layer for loading model.keras

    result = scratch["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    model = keras.models.load_model(scratch["out"] / "model.keras")
    images, labels, classes = _training_images(sample_data)
    probs = model.predict(images, verbose=0)
    predicted = probs.argmax(-1)
    # Not a constant classifier: every class is predicted, and the probabilities move from image to image.
    assert set(predicted.tolist()) == set(range(len(classes))), np.bincount(predicted, minlength=len(classes))
    assert probs.std(axis=0).max() > 0.1
    # Far above chance (1/3) on the images it trained on: 93% measured (a deterministic run on CPU).
    accuracy = float(np.mean(predicted == labels))
    assert accuracy >= 0.75, accuracy


def _batch_normalization(model):
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            yield layer
        elif isinstance(layer, keras.Model):
            yield from _batch_normalization(layer)


def test_batch_normalization_trained_and_its_statistics_settled(scratch):
    import keras

    import job.model  # noqa: F401  registers the Preprocess layer for loading model.keras

    assert scratch["result"].returncode == 0, scratch["result"].stderr[-3000:]
    model = keras.models.load_model(scratch["out"] / "model.keras")
    layers = list(_batch_normalization(model))
    from job import backbones

    fresh = getattr(keras.applications, backbones.get(BACKBONE).constructor)(include_top=False, weights=None,
                                                                             input_shape=(SIZE, SIZE, 3))
    assert len(layers) == len(list(_batch_normalization(fresh))) > 20  # every one of the backbone's
    for layer in layers:
        # Moving statistics left their initial values (mean 0, variance 1) in every layer, with a momentum
        # short enough for a short run (keras.applications builds 0.999).
        assert layer.momentum <= 0.99
        assert not np.allclose(layer.moving_mean.numpy(), 0.0), layer.name
        assert not np.allclose(layer.moving_variance.numpy(), 1.0), layer.name
    # gamma was trained too (BatchNormalization trainable from the first epoch), not only the statistics.
    gammas = [layer.gamma.numpy() for layer in layers if layer.scale]
    assert sum(not np.allclose(g, 1.0) for g in gammas) == len(gammas)


def test_head_phase_skipped_and_every_epoch_trains_the_whole_network(scratch):
    result = scratch["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    records = result.records()
    skipped = [r for r in records if r["event"] == "phase skipped" and r.get("phase") == "head"]
    assert skipped and "weights is none" in skipped[0]["reason"]
    started = next(r for r in records if r["event"] == "phase started")
    assert started["phase"] == "finetune" and started["epochs"] == 12  # head.epochs + finetune.epochs
    history = json.loads((scratch["out"] / "history.json").read_text())
    assert history["head"] == [] and len(history["finetune"]) == 12


def test_early_stopping_restores_the_moving_statistics_of_the_best_epoch(tmp_path):
    """BatchNormalization that trains: the best epoch's weights come back with that epoch's moving statistics,
    not the last epoch's (they are not trainable variables, but they belong to the weights)."""
    import keras

    from job import dataset, distribute, loop, storage
    from job.checkpoint import Checkpoints
    from job.runstate import RunState

    cluster = distribute.setup("one_device", 0, False)
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(40, 4)).astype(np.float32)
    y = (x[:, 0] > 3.0).astype(np.int32)
    keras.utils.set_random_seed(0)
    with cluster.strategy.scope():
        inputs = keras.Input((4,))
        h = keras.layers.BatchNormalization(momentum=0.5)(keras.layers.Dense(8)(inputs))
        model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(h))
    scripted = iter([1.0, 0.5, 0.8, 0.9, 0.95])  # best at epoch 2; patience 2 stops after epoch 4
    snapshots = []

    def validate():
        snapshots.append([w.copy() for w in model.get_weights()])
        return {"val_loss": next(scripted), "val_accuracy": 0.5}

    phase = loop.Phase(name="finetune", model=model,
                       dataset_fn=lambda ctx, start: dataset.feature_dataset(x, y, 8, shuffle=True, seed=1, repeat=True,
                                                                         start=start),
                       examples=len(y), epochs=5, learning_rate=0.05, validate=validate)
    state = RunState()
    ckpt = Checkpoints(storage.LocalStore(str(tmp_path / "out")), tmp_path / "work", cluster, keep=2)
    loop.run_phase(phase, cluster, 8, loop.Options(patience=2), ckpt, state)
    assert state.best_epoch == 2 and len(state.history["finetune"]) == 4
    moving = [i for i, v in enumerate(model.weights) if "moving" in v.path]
    assert len(moving) == 2 and all(not np.array_equal(snapshots[3][i], snapshots[1][i]) for i in moving)
    for restored, best in zip(model.get_weights(), snapshots[1]):  # moving mean and variance included
        np.testing.assert_array_equal(restored, best)


def test_the_from_scratch_schedule():
    from job import recipe

    # From scratch: both phases' epochs at the head's rate; with pre-trained weights: the phase's own.
    assert recipe.finetune_schedule(10, 1e-3, 10, 1e-4, from_scratch=True) == (20, 1e-3)
    assert recipe.finetune_schedule(10, 1e-3, 10, 1e-4, from_scratch=False) == (10, 1e-4)
