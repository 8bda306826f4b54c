"""A format that fails: one the user listed fails the run (exit 1, one line); a default one is left out
with a warning and an entry in the manifest, and the run (here the failed one, resumed) completes. The
failures are real ones: a tf2onnx (the ONNX converter) or an ai_edge_litert (the LiteRT runtime that checks
the .tflite files) that cannot be imported, shadowing the installed one."""

from __future__ import annotations

import json

import pytest
from conftest import BACKBONE, SIZE, run_cli, write_config

pytestmark = pytest.mark.slow


def broken(tmp_path, package: str) -> dict[str, str]:
    folder = tmp_path / "shadow" / package
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(f'raise ImportError("{package} is broken here on purpose")\n')
    return {"PYTHONPATH": str(tmp_path / "shadow")}


def config(tmp_path, sample_data, base_weights, run_id, **export):
    return write_config(
        tmp_path / f"{run_id}.yaml", run_id=run_id,
        data={"uri": str(sample_data), "image_size": [SIZE, SIZE], "cache_dir": str(tmp_path / "cache")},
        model={"backbone": BACKBONE, "weights": str(base_weights), "head_units": 16},
        train={"batch_size": 16, "head": {"epochs": 2}, "finetune": {"epochs": 0}},
        output={"uri": str(tmp_path / "out")}, metrics={"port": 0, "linger_seconds": 0}, export=export)


def test_a_listed_format_that_fails_is_exit_1_and_a_default_one_is_left_out(tmp_path, sample_data, base_weights):
    """The same run twice: with onnx listed and tf2onnx broken, exit 1; then, resumed from its trained checkpoint
    with the default formats and LiteRT broken, complete without the LiteRT formats."""
    cfg = config(tmp_path, sample_data, base_weights, "formats", formats=["saved_model", "onnx"])
    result = run_cli("train", "--config", str(cfg), env=broken(tmp_path / "onnx", "tf2onnx"))
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("finetune-job: error:")]
    assert len(lines) == 1 and lines[0].startswith(
        "finetune-job: error: export.formats: onnx: conversion failed: ImportError: ") and "tf2onnx" in lines[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "out/formats/_SUCCESS").exists()

    config(tmp_path, sample_data, base_weights, "formats", formats=None)  # export.* may change on a resume
    result = run_cli("train", "--config", str(cfg), env=broken(tmp_path / "litert", "ai_edge_litert"))
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = next(r for r in result.records() if r["event"] == "resuming from checkpoint")
    assert resumed["phase"] == "trained", resumed  # nothing trained again: the export alone
    warned = [r for r in result.records() if r["event"] == "export format left out"]
    assert [r["format"] for r in warned] == ["tflite", "tflite_int8"]
    run = tmp_path / "out/formats"
    checked = json.loads((run / "manifest.json").read_text())["formats"]
    assert set(checked) == {"saved_model", "tf_serving", "tflite", "tflite_int8"}  # the defaults
    for fmt in ("tflite", "tflite_int8"):
        assert checked[fmt] == {"error": f"{fmt}: check failed: ImportError: ai_edge_litert is broken here on purpose"}
    assert not list(run.glob("*.tflite*"))  # nothing half-checked is shipped
    assert not (run / "model.onnx").exists()  # nor the first attempt's ONNX file
    assert checked["tf_serving"]["agreement"] == 1.0 and (run / "_SUCCESS").is_file()
    done = (run / "_SUCCESS").stat().st_mtime_ns  # written last: TensorBoard's event file was copied after it
    assert list(run.glob("tensorboard/*")) and not [p for p in run.rglob("*") if p.stat().st_mtime_ns > done]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["formats"] == checked
