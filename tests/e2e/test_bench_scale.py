"""`make bench-scale` runs in its quick mode so that it cannot rot: every way of keeping the data runs and
reports. Nothing here asserts a timing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_fashion_mnist

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_scale_bench_writes_well_formed_results(tmp_path):
    """`make bench-scale` on 700 Fashion-MNIST images: every way of keeping the data runs and reports."""
    need_fashion_mnist()
    out = tmp_path / "scale.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--out", str(out),
                        "--cache", str(tmp_path / "cache")], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "quick" and result["images"] == {"train": 600, "test": 100}
    runs = result["runs"]
    assert set(runs) == {"objects", "manifest", "shards", "shards_stream", "objects_tenth"}
    assert [runs[w]["staging"]["mode"] for w in ("objects", "shards", "shards_stream")] == ["copy", "copy", "stream"]
    assert runs["objects"]["images"] == runs["manifest"]["images"] == runs["shards"]["images"] == 700
    for name, run in runs.items():
        assert 0 <= run["test_accuracy"] <= 1, name
        assert len(run["finetune_images_per_s"]) == 2, name
    for key, t in result["targets"].items():
        assert {"value", "target", "better", "met"} <= set(t) and math.isfinite(t["value"]), key
