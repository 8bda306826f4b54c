"""`make bench` runs in its quick mode so that it cannot rot: the results must be well formed. Nothing
here asserts a timing (CONTRACT section 9: benchmarks are never timed unit tests). The first half of its
sections here, the second in test_bench_run_more.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("startup", "input_pipeline", "training_loop", "head_phase", "memory", "formats", "stages")


def numbers(tree, where: str = ""):
    """(path, value) of every number in a JSON tree; booleans are not numbers here."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from numbers(v, f"{where}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from numbers(v, f"{where}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield where, tree


# `make bench`'s sections in two halves, one per file, so that the two test workers run them side by side.
FIRST_HALF = ("startup", "input_pipeline", "training_loop", "head_phase")


@pytest.mark.slow
def test_quick_bench_writes_well_formed_results(tmp_path):
    check_quick_bench(tmp_path, FIRST_HALF)


def check_quick_bench(tmp_path: Path, names: tuple[str, ...]) -> None:
    out = tmp_path / "latest.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out),
                        "--only", ",".join(names)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    result = json.loads(out.read_text())

    assert result["mode"] == "quick"
    machine = result["machine"]
    assert machine["cores"] > 0 and machine["ram_gib"] > 0
    assert machine["cpu_model"] and machine["tensorflow"] != "not installed"
    assert len(result["load_average"]["before"]) == 3

    sections = result["sections"]
    assert set(names) | {"gpu"} == set(sections)
    for name in names:
        section = sections[name]
        assert section["conditions"], f"{name}: no conditions recorded"
        assert section["measurements"] and section["targets"], name
        for key, t in section["targets"].items():
            assert {"value", "target", "better", "unit"} <= set(t), f"{name}.{key}"
            assert t["better"] in ("higher", "lower") and isinstance(t["met"], bool), f"{name}.{key}"
        checked = [section["measurements"], section["targets"], section.get("context", {})]
        for where, value in numbers(checked, name):
            if where.endswith(".target"):
                continue  # a target's limit, not a measurement
            if where.endswith("accuracy"):  # checked against the SavedModel's below
                continue
            assert math.isfinite(value) and value > 0, f"{where} = {value}"
    if "formats" in names:
        _formats_agree_with_the_saved_model(sections["formats"])
    assert isinstance(sections["gpu"]["available"], bool) and sections["gpu"]["note"]

    rows = result["summary"]
    assert len(rows) == sum(len(sections[n]["targets"]) for n in names)
    assert out.read_text().endswith("\n")


def _formats_agree_with_the_saved_model(section: dict) -> None:
    """The quick model (a few from-scratch steps) learns next to nothing, so its accuracy says little; what must hold is
    that each format classifies the check images as the SavedModel does: the job refuses a float format that
    disagrees on more than 1% of them, which on this handful is any one image."""
    table, images = section["measurements"], section["conditions"]["check_images"]
    assert 0 < images < 100, images
    reference = table["saved_model"]["accuracy"]
    for fmt, row in table.items():
        assert 0 <= row["accuracy"] <= 1 and (row["accuracy"] * images) == pytest.approx(
            round(row["accuracy"] * images), abs=1e-6), (fmt, row["accuracy"], images)  # a share of the images
    for fmt in ("tf_serving", "tflite", "onnx"):
        assert table[fmt]["agreement_with_saved_model"] == 1.0 and table[fmt]["accuracy"] == reference, fmt
    drop = section["targets"]["tflite_int8_accuracy_drop"]["value"]
    assert drop == pytest.approx(max(1e-4, reference - table["tflite_int8"]["accuracy"]), abs=1e-3)
