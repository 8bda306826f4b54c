"""`make bench-quality` in its quick mode, so that it cannot rot: one tiny transfer task, one seed, every
recipe of the comparison, and a tiny multi-label task with its two rows (the job, the Keras sigmoid script).
Beyond the shape of the results, one accuracy is checked, with a wide margin: the job's default recipe is far
above chance on the quick task (a recipe that learns nothing is at chance)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_fashion_mnist

ROOT = Path(__file__).resolve().parents[2]
# Every recipe of the comparison but its choices' rows and from scratch (bench/quality.py CHOICES, QUICK_LEFT_OUT).
RECIPES = {"job_default", "keras_seeds_recipe", "keras_job_recipe", "job_head_only"}
MULTILABEL_RECIPES = {"job_default", "keras_sigmoid_recipe"}
# fashion-8 (coat, shirt, sneaker; 6 test images each), a base pre-trained briefly on the source classes: the
# job's default recipe scored 0.72, 0.67 and 0.72 test accuracy with seeds 1, 2 and 3 (the quick mode runs seed 1,
# and the job is deterministic). Chance is 1/3; a constant classifier scores exactly that.
JOB_DEFAULT_AT_LEAST = 0.5


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
    single = {n: t for n, t in report["tasks"].items() if not t["task"]["multi_label"]}
    multi = {n: t for n, t in report["tasks"].items() if t["task"]["multi_label"]}
    ((name, task),) = single.items()
    assert set(task["recipes"]) == RECIPES
    test_images = task["task"]["test"] * len(task["task"]["classes"])
    for recipe_name, recipe in task["recipes"].items():
        (run,) = recipe["runs"]
        for split in ("validation", "test"):
            scores = run[split]
            assert 0.0 <= scores["macro_f1"] <= 1.0 and math.isfinite(scores["loss"]), (recipe_name, split)
            # Every class has as many images in each split: balanced accuracy (mean recall) is the accuracy.
            assert scores["balanced_accuracy"] == pytest.approx(scores["accuracy"], abs=1e-3), (recipe_name, split)
        right = run["test"]["accuracy"] * test_images  # a number of images
        assert right == pytest.approx(round(right), abs=0.01) and 0 <= round(right) <= test_images, recipe_name
        assert run["seconds"] > 0
        if recipe_name.startswith("job"):
            finetuned = run["epochs"]["finetune"]
            assert run["epochs"]["head"] >= 1 and (finetuned == 0 if recipe_name == "job_head_only" else finetuned >= 1)
    job, keras, head_only = (task["recipes"][r]["runs"][0]["test"]["accuracy"]
                             for r in ("job_default", "keras_seeds_recipe", "job_head_only"))
    assert job >= JOB_DEFAULT_AT_LEAST, f"the job's default recipe: test accuracy {job} (chance 1/3)"
    # Fine-tuning must add to the head it starts from: the defaults beat their own head-only lower bound.
    assert job > head_only, f"the job's default recipe {job} is not above its head-only bound {head_only}"
    trials = task["recipes"]["job_default"]["runs"][0]["search"]  # train.search's trials, one chosen
    assert [t["learning_rate"] for t in trials] == [1.0e-4, 3.0e-4] and sum(t["chosen"] for t in trials) == 1
    assert report["acceptance"]["job_minus_keras_test_accuracy"] == {name: pytest.approx(job - keras, abs=1e-4)}
    text = docs.read_text()
    assert "old table" not in text and text.count("<!-- quality:comparison -->") == 1 and "prose" in text
    assert "plain Keras, seeds' recipe" in text and "<!-- quality:comparison-conditions -->" in text
    # The refreshed table shows each recipe's own number in its own column.
    assert f"| {name} | {job * 100:.1f} ± 0.0 | {keras * 100:.1f} ± 0.0 |" in text
    _check_multilabel(report, multi, text)


def _check_multilabel(report: dict, multi: dict, text: str) -> None:
    """The multi-label rows: mAP and micro-F1 in [0, 1] for both recipes, the margin, and their table."""
    ((name, task),) = multi.items()
    assert set(task["recipes"]) == MULTILABEL_RECIPES
    assert sum(task["task"]["images"].values()) <= 60, "the quick multi-label task must stay tiny"
    for recipe_name, recipe in task["recipes"].items():
        (run,) = recipe["runs"]
        for split in ("validation", "test"):
            scores = run[split]
            for key in ("map", "micro_f1"):
                assert 0.0 <= scores[key] <= 1.0, (recipe_name, split, key, scores)
                assert recipe[f"{split}_{key}"] == {"mean": scores[key], "std": 0.0}, (recipe_name, split, key)
            assert math.isfinite(scores["loss"]) and scores["loss"] > 0, (recipe_name, split)
        assert run["seconds"] > 0 and run["epochs"]["head"] >= 1 and run["epochs"]["finetune"] >= 1, run["epochs"]
    job, keras = (task["recipes"][r]["runs"][0]["test"]["map"] for r in ("job_default", "keras_sigmoid_recipe"))
    assert report["acceptance"]["job_minus_keras_test_map"] == {name: pytest.approx(job - keras, abs=1e-4)}
    assert text.count("<!-- quality:multilabel -->") == 1 and "plain Keras, sigmoid" in text
    assert f"| {name} | **job, defaults** | {job * 100:.1f} ± 0.0 |" in text
