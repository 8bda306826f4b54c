"""Strict JSON out of the job: metrics.json, history.json, log lines and `predict --json` hold no NaN or Infinity
(Python writes them, `JSON.parse`, `jq` and Go refuse them). No TensorFlow."""

from __future__ import annotations

import io
import json
import math
import subprocess

import numpy as np
from conftest import CLI
from hypothesis import given
from hypothesis import strategies as st

from job import logs
from job.files import finite, json_text

numbers = st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.none() | st.text(max_size=3)
trees = st.recursive(numbers, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                          max_size=3), max_leaves=12)


def strict(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def expected(tree):
    if isinstance(tree, dict):
        return {k: expected(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [expected(v) for v in tree]
    return None if isinstance(tree, float) and not math.isfinite(tree) else tree


@given(trees)
def test_non_finite_numbers_are_null_and_the_rest_is_kept(tree):
    assert strict(json_text(tree)) == expected(tree)
    assert strict(json_text(tree, indent=2)) == expected(tree)  # indented, lists of numbers on one line


def test_indented_lists_of_numbers_stay_on_one_line():
    # A confusion matrix of 1,000 classes, one cell a line: metrics.json of 22 MB and 2 million lines.
    matrix = np.arange(300 * 300).reshape(300, 300).tolist()
    text = json_text({"test": {"confusion_matrix": matrix, "per_class": {"a": {"recall": 0.5}}}, "labels": ["a"]},
                     indent=2)
    assert strict(text)["test"]["confusion_matrix"] == matrix
    assert len(text.splitlines()) < 320 and '"labels": [\n    "a"\n  ]' in text  # strings keep their own lines
    assert strict(json_text({"a": "@@row-0", "b": [1]}, indent=2)) == {"a": "@@row-0", "b": [1]}  # strings kept


def test_numpy_scalars_are_plain_numbers():
    assert finite({"a": np.float32("nan"), "b": [np.float64(0.5), np.int64(3)]}) == {"a": None, "b": [0.5, 3]}


def test_json_log_lines_are_strict():
    # A multi-label run whose test images carry no label logged `"test_map": NaN`.
    out = io.StringIO()
    logs.setup(json=True, stream=out)
    logs.get().info("run finished", test_map=float("nan"), loss=float("inf"), accuracy=0.5)
    record = strict(out.getvalue())
    assert (record["test_map"], record["loss"], record["accuracy"]) == (None, None, 0.5)


def test_predict_keeps_its_log_records_off_stdout(tmp_path):
    # stdout holds one line (--json: one object) per image; the error's log record went there too, in colour.
    for extra in ([], ["--json"]):
        p = subprocess.run([CLI, "predict", "--model", str(tmp_path), str(tmp_path / "nope.png"), *extra],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stdout == "", (extra, p.stdout)
        assert "nope.png: cannot read image" in p.stderr
