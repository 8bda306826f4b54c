"""bench/quality.py --report on ablation parts: the table is computed from the runs' JSON, whatever they hold."""

import json
import statistics
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import quality  # noqa: E402

accuracy = st.integers(0, 200).map(lambda n: n / 200)  # whole images of 200: exact in JSON and in the table


def run(seed: int, val: float, test: float) -> dict:
    scores = lambda a: {"accuracy": a, "loss": 1.0, "macro_f1": a, "balanced_accuracy": a}  # noqa: E731
    return {"seed": seed, "validation": scores(val), "test": scores(test), "seconds": 10.0}


def part(task: str, recipes: dict[str, list[dict]]) -> dict:
    return {"kind": "ablation", "mode": "full", "seeds": [1, 2], "started": "2026-12-05T18:00:00Z", "seconds": 60,
            "machine": {"cpu_model": "cpu", "cores": 2, "tensorflow": "x", "keras": "x", "python": "x"},
            "load_average": {"before": [0.1], "after": [0.2]}, "conditions": {"keras_job_recipe": "a script"},
            "tasks": {task: {"task": {"backbone": "mobilenet_v2"},
                             "recipes": {n: {"runs": r, **quality.summarize(r)} for n, r in recipes.items()}}}}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(accuracy, accuracy, accuracy, accuracy), min_size=2, max_size=2),
       st.lists(st.tuples(accuracy, accuracy, accuracy, accuracy), min_size=2, max_size=2))
def test_each_tasks_cell_is_the_change_of_the_mean_on_validation_and_on_test(tmp_path_factory, first, second):
    tmp = tmp_path_factory.mktemp("report")
    files = []
    for task, values in (("fashion-15", first), ("shapes-60", second)):
        recipes = {"default": [run(s, dv, dt) for s, (dv, dt, _, _) in enumerate(values, 1)],
                   "change": [run(s, cv, ct) for s, (_, _, cv, ct) in enumerate(values, 1)]}
        if task == "shapes-60":  # a row of one task only (class_weight_none runs on the imbalanced task alone)
            recipes["only_here"] = recipes["change"]
        files.append(tmp / f"{task}.json")
        files[-1].write_text(json.dumps(part(task, recipes)))
    docs = tmp / "QUALITY.md"
    docs.write_text("prose\n<!-- quality:ablation -->\nold\n<!-- /quality:ablation -->\n"
                    "<!-- quality:ablation-conditions -->\n<!-- /quality:ablation-conditions -->\n")
    assert quality.report_only(files, tmp / "out.json", str(docs)) == 0
    text = docs.read_text()
    assert "old" not in text and text.startswith("prose\n")
    row = next(line for line in text.splitlines() if line.startswith("| `change` |")).split(" | ")
    changes = []
    for values in (first, second):
        means = [round(statistics.mean(v[i] for v in values), 4) for i in range(4)]  # as the JSON keeps them
        changes.append((means[2] - means[0], means[3] - means[1]))
    assert row[1:3] == [f"{dv * 100:+.1f} / {dt * 100:+.1f}" for dv, dt in changes]
    assert row[3] == f"{sum(dv for dv, _ in changes) / 2 * 100:+.1f}"
    assert row[4] == f"{sum(dt for _, dt in changes) / 2 * 100:+.1f}"
    only = next(line for line in text.splitlines() if line.startswith("| `only_here` |")).split(" | ")
    assert only[1:3] == ["", row[2]] and only[3] == f"{changes[1][0] * 100:+.1f}", only
    assert "part: fashion-15.json" in text and "part: shapes-60.json" in text
    assert "keras_job_recipe" not in text, "the ablation runs no script: its conditions name none"
