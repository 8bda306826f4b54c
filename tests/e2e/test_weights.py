"""`model.weights` as an s3:// URI of a weights file (what air-gapped clusters use) is really loaded."""

import numpy as np
import pytest
from conftest import BACKBONE, SIZE, run_cli, write_config

pytestmark = pytest.mark.slow


def test_base_weights_come_from_the_s3_file(s3, sample_data, base_weights, tmp_path):
    import keras

    import job.model  # noqa: F401  registers the Preprocess layer for loading model.keras
    from job import backbones

    bucket = s3.bucket()
    s3.client.upload_file(str(base_weights), bucket, "weights/base.weights.h5")
    cfg = write_config(
        tmp_path / "c.yaml",
        run_id="weights",
        data={"uri": str(sample_data), "image_size": [SIZE, SIZE], "cache_dir": str(tmp_path / "cache")},
        model={"backbone": BACKBONE, "weights": f"s3://{bucket}/weights/base.weights.h5", "head_units": 0},
        train={"batch_size": 16, "head": {"epochs": 1}, "finetune": {"epochs": 0}},
        output={"uri": str(tmp_path / "out")},
        metrics={"port": 0, "linger_seconds": 0},
        export={"formats": ["saved_model"]},
    )
    result = run_cli("train", "--config", str(cfg), env=s3.env())
    assert result.returncode == 0, result.stderr[-2000:]

    trained = keras.models.load_model(tmp_path / "out/weights/model.keras")
    base = next(layer for layer in trained.layers if isinstance(layer, keras.Model))  # the backbone, nested
    constructor = getattr(keras.applications, backbones.get(BACKBONE).constructor)
    from_file = constructor(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    random_init = [w.copy() for w in from_file.get_weights()]
    from_file.load_weights(base_weights)
    got, want = base.get_weights(), from_file.get_weights()
    assert len(got) == len(want) > 100
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    # ...and the file is not a random init: the comparison above would have caught a missed load.
    assert any(not np.array_equal(r, w) for r, w in zip(random_init, want))


def test_unknown_weights_file_exits_2(tmp_path, sample_data):
    cfg = write_config(
        tmp_path / "c.yaml",
        data={"uri": str(sample_data), "image_size": [SIZE, SIZE], "cache_dir": str(tmp_path / "cache")},
        model={"backbone": BACKBONE, "weights": str(tmp_path / "nope.weights.h5")},
        output={"uri": str(tmp_path / "out")},
        metrics={"port": 0},
        export={"formats": ["saved_model"]},
    )
    result = run_cli("train", "--config", str(cfg))
    assert result.returncode == 2 and "model.weights: no weights file" in result.stderr
    assert "Traceback" not in result.stderr


def test_weights_of_another_backbone_exit_2(tmp_path, sample_data, base_weights):
    cfg = write_config(
        tmp_path / "c.yaml",
        data={"uri": str(sample_data), "image_size": [SIZE, SIZE], "cache_dir": str(tmp_path / "cache")},
        model={"backbone": "densenet121", "weights": str(base_weights)},
        output={"uri": str(tmp_path / "out")},
        metrics={"port": 0},
        export={"formats": ["saved_model"]},
    )
    result = run_cli("train", "--config", str(cfg))
    assert result.returncode == 2 and "does not fit densenet121" in result.stderr, result.stderr[-1500:]
    assert "Traceback" not in result.stderr
