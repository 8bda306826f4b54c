"""`model.weights` that cannot be used fails before training with exit 2. That an s3:// weights file (what
air-gapped clusters use) is really loaded is checked on tests/e2e/test_train.py's run."""

import pytest
from conftest import BACKBONE, SIZE, run_cli, write_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("command, where", [("train", "local"), ("train", "s3"), ("validate", "local"),
                                            ("validate", "s3")])
def test_unknown_weights_file_exits_2(tmp_path, sample_data, s3, command, where):
    # `validate` checks what `train` would refuse before any work: a weights file or object that is not there.
    weights = str(tmp_path / "nope.weights.h5") if where == "local" else f"s3://{s3.bucket()}/nope.weights.h5"
    cfg = write_config(
        tmp_path / "c.yaml",
        data={"uri": str(sample_data), "image_size": [SIZE, SIZE], "cache_dir": str(tmp_path / "cache")},
        model={"backbone": BACKBONE, "weights": weights},
        output={"uri": str(tmp_path / "out")},
        metrics={"port": 0},
        export={"formats": ["saved_model"]},
    )
    result = run_cli(command, "--config", str(cfg), env={**s3.env(), "PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 2 and f"model.weights: no weights file at {weights}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "job.pipeline" in imported and "tensorflow" not in imported  # refused within a second, before the import


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
    # One line (Keras warned once per layer before it: 198 lines), whole, naming the weights as configured.
    assert "UserWarning" not in result.stderr and result.stderr.count("\n") <= 2, result.stderr[-1500:]
    line = next(x for x in result.stderr.splitlines() if x.startswith("finetune-job: error:"))
    assert line.startswith(f"finetune-job: error: config: model.weights: {base_weights} does not fit densenet121: ")
    assert line.endswith("(weights of another backbone?)")
