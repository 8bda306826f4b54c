"""`make bench-quality` in its quick mode, so that it cannot rot: one tiny transfer task, one seed, every
recipe of the comparison. Only the shape of the results is checked: accuracy is never a CI threshold."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_fashion_mnist

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {"job_default", "keras_seeds_recipe", "job_head_only", "job_weights_none"}


@pytest.mark.slow
def test_quick_quality_bench_writes_well_formed_results(tmp_path):
    need_fashion_mnist()
    out, docs = tmp_path / "quality.json", tmp_path / "QUALITY.md"
    docs.write_text("# Quality\n\n<!-- quality:comparison -->\nold table\n<!-- /quality:comparison -->\n\nprose\n")
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--jobs", "2", "--out", str(out),
                        "--docs", str(docs), "--cache", str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["kind"] == "comparison" and report["mode"] == "quick" and report["seeds"] == [1]
    (task,) = report["tasks"].values()
    assert set(task["recipes"]) == RECIPES
    for name, recipe in task["recipes"].items():
        (run,) = recipe["runs"]
        for split in ("validation", "test"):
            for key in ("accuracy", "macro_f1", "balanced_accuracy"):
                assert 0.0 <= run[split][key] <= 1.0, (name, split, key)
            assert math.isfinite(run[split]["loss"]), name
        assert recipe["test_accuracy"] == {"mean": run["test"]["accuracy"], "std": 0.0}
        assert run["seconds"] > 0
        if name.startswith("job"):
            finetuned = run["epochs"]["finetune"]
            assert run["epochs"]["head"] >= 1 and (finetuned == 0 if name == "job_head_only" else finetuned >= 1)
    margin = report["acceptance"]["job_minus_keras_test_accuracy"]
    assert set(margin) == set(report["tasks"])
    text = docs.read_text()
    assert "old table" not in text and text.count("<!-- quality:comparison -->") == 1 and "prose" in text
    assert "plain Keras, seeds' recipe" in text and "<!-- quality:comparison-conditions -->" in text
