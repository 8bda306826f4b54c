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
    """`make bench-scale` on 350 Fashion-MNIST images: the uploads, the manifest and the pack, then its quick ways
    (objects copied, shards streamed) run and report, with the targets those two ways measure."""
    need_fashion_mnist()
    out = tmp_path / "scale.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--out", str(out),
                        "--cache", str(tmp_path / "cache")], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "quick" and result["images"] == {"train": 300, "test": 50}
    # The tenth: 3 training images per class; its 5 test images are none per class.
    assert result["uploads"]["objects"]["objects"] == 350 and result["uploads"]["tenth"]["objects"] == 30
    assert "shards" in result["uploads"]["shards"]["said"] and result["bare_listing_seconds"] > 0
    runs = result["runs"]
    assert set(runs) == {"objects", "shards_stream"}
    assert [runs[w]["staging"]["mode"] for w in ("objects", "shards_stream")] == ["copy", "stream"]
    assert runs["objects"]["images"] == runs["shards_stream"]["images"] == 350
    for name, run in runs.items():
        assert 0 <= run["test_accuracy"] <= 1, name
        assert len(run["finetune_images_per_s"]) == 2, name
        assert run["peak_rss_mib"] > 0 and run["validate_seconds"] > 0, name
    assert set(result["targets"]) == {"validate_objects_seconds", "validate_vs_bare_listing"}
    for key, t in result["targets"].items():
        assert {"value", "target", "better", "met"} <= set(t) and math.isfinite(t["value"]), key
