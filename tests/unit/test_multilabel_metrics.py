"""Multi-label metrics and thresholds (job/multilabel.py) against brute-force definitions, without TensorFlow.

Score matrices are generated either from a small set of values (many ties) or as arbitrary floats in [0, 1].
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from job import multilabel as ml

TIED = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]


@st.composite
def matrices(draw, min_n: int = 1, max_n: int = 9, max_labels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Draws (scores [n, L] float, truth [n, L] of 0/1 ints)."""
    n, labels = draw(st.integers(min_n, max_n)), draw(st.integers(1, max_labels))
    value = st.sampled_from(TIED) if draw(st.booleans()) else st.floats(0, 1)
    scores = draw(st.lists(value, min_size=n * labels, max_size=n * labels))
    truth = draw(st.lists(st.integers(0, 1), min_size=n * labels, max_size=n * labels))
    return np.array(scores, dtype=float).reshape(n, labels), np.array(truth, dtype=int).reshape(n, labels)


def brute_ap(scores, truth) -> float:
    """Mean over positives of the precision at the threshold equal to that positive's score (ties: one step)."""
    pairs = list(zip(scores.tolist(), truth.tolist()))
    precisions = []
    for s, t in pairs:
        if t:
            above = [u for v, u in pairs if v >= s]
            precisions.append(sum(above) / len(above))
    return sum(precisions) / len(precisions)


def f1_at(scores, truth, threshold: float) -> float:
    """F1 of one label when score >= threshold is predicted positive, counted example by example."""
    tp = sum(1 for s, t in zip(scores, truth) if s >= threshold and t)
    fp = sum(1 for s, t in zip(scores, truth) if s >= threshold and not t)
    fn = sum(1 for s, t in zip(scores, truth) if s < threshold and t)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def candidates(scores) -> list[float]:
    """Every distinct score and one above the maximum: all the different decisions a threshold can make."""
    return sorted(set(scores.tolist())) + [float(scores.max()) + 1]


def plain(value) -> bool:
    """True when value is built only of JSON's plain Python types."""
    if isinstance(value, dict):
        return all(type(k) is str and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or type(value) in (bool, int, float, str)


fast = settings(max_examples=60, deadline=None)


@fast
@given(matrices())
def test_ap_matches_brute_force_and_lies_in_unit_interval(data):
    scores, truth = data
    for j in range(scores.shape[1]):
        ap = ml.average_precision(scores[:, j], truth[:, j])
        if not truth[:, j].any():
            assert ap is None
            continue
        assert 0.0 <= ap <= 1.0
        assert ap == pytest.approx(brute_ap(scores[:, j], truth[:, j]), abs=1e-12)


@fast
@given(st.lists(st.floats(0, 1), min_size=1, max_size=8, unique=True), st.data())
def test_ap_is_one_when_positives_outrank_negatives(values, data):
    ranked = sorted(values, reverse=True)
    positives = data.draw(st.integers(1, len(ranked)))
    truth = np.array([1] * positives + [0] * (len(ranked) - positives))
    assert ml.average_precision(np.array(ranked), truth) == pytest.approx(1.0)


@fast
@given(matrices())
def test_map_is_macro_mean_over_labels_with_positives(data):
    scores, truth = data
    aps = [brute_ap(scores[:, j], truth[:, j]) for j in range(scores.shape[1]) if truth[:, j].any()]
    got = ml.mean_average_precision(scores, truth)
    assert math.isnan(got) if not aps else got == pytest.approx(sum(aps) / len(aps))


@fast
@given(matrices())
def test_chosen_threshold_maximises_f1_with_fewest_positives(data):
    scores, truth = data
    chosen = ml.choose_thresholds(scores, truth, fallback=0.3)
    decided = ml.decide(scores, [c["threshold"] for c in chosen])
    for j, c in enumerate(chosen):
        s, t = scores[:, j], truth[:, j]
        if not t.any():
            assert c == {"threshold": 0.3, "chosen_by": "no_positive_example"}
            continue
        assert c["chosen_by"] == "validation_f1" and type(c["threshold"]) is float
        best = max(f1_at(s, t, x) for x in candidates(s))
        assert f1_at(s, t, c["threshold"]) == best
        tp = int((decided[:, j] & (t == 1)).sum())
        assert 2 * tp / (int(decided[:, j].sum()) + int(t.sum())) == pytest.approx(best)
        fewest = min(int((s >= x).sum()) for x in candidates(s) if f1_at(s, t, x) == best)
        assert int(decided[:, j].sum()) == fewest
        lowest_kept = s[decided[:, j]].min()
        assert c["threshold"] <= lowest_kept and not (s[~decided[:, j]] >= c["threshold"]).any()


@fast
@given(matrices(min_n=0), st.floats(0, 1))
def test_report_counts_match_hand_computation(data, threshold):
    scores, truth = data
    labels = scores.shape[1]
    classes = [f"c{j}" for j in range(labels)]
    rep = ml.report(scores, truth, [threshold] * labels, classes)
    rows = [({j for j in range(labels) if s[j] >= threshold}, {j for j in range(labels) if t[j]})
            for s, t in zip(scores.tolist(), truth.tolist())]
    tp = sum(len(p & r) for p, r in rows)
    fp = sum(len(p - r) for p, r in rows)
    fn = sum(len(r - p) for p, r in rows)
    assert rep["micro_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    n = len(rows)
    assert rep["subset_accuracy"] == pytest.approx(sum(p == r for p, r in rows) / n if n else 0.0)
    assert rep["accuracy"] == rep["subset_accuracy"]  # CONTRACT section 6's key, in every metrics.json
    assert rep["hamming_accuracy"] == pytest.approx(1 - (fp + fn) / (n * labels) if n else 0.0)
    # over the labels the split has or that were predicted (an unmeasured label counted as 0 halved a perfect score)
    measured = [j for j in range(labels) if truth[:, j].any() or (scores[:, j] >= threshold).any()]
    f1s = [f1_at(scores[:, j], truth[:, j], threshold) for j in measured]
    assert rep["macro_f1"] == pytest.approx(sum(f1s) / len(f1s) if f1s else 0.0)
    assert all(rep["per_label"][classes[j]]["f1"] is None for j in range(labels) if j not in measured)
    assert rep["labels_without_positives"] == [c for j, c in enumerate(classes) if not truth[:, j].any()]
    assert rep["examples"] == n and plain(rep)
    json.dumps(rep, allow_nan=True)


def test_hand_checked_average_precision_and_ties():
    assert ml.average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # A positive and a negative tied at the top form one step: P = 1/2 at R = 1.
    assert ml.average_precision(np.array([0.5, 0.5, 0.1]), np.array([True, False, False])) == pytest.approx(0.5)
    assert ml.average_precision(np.array([0.9, 0.2]), np.array([0, 0])) is None


def test_hand_checked_thresholds_and_report():
    scores = np.array([[0.9, 0.4], [0.8, 0.3], [0.7, 0.2], [0.6, 0.1]])
    truth = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    chosen = ml.choose_thresholds(scores, truth)
    # F1 at 0.9 is 2/3, at 0.7 is 4/5 (best), at 0.6 is 2/3: threshold halfway between 0.7 and 0.6.
    assert chosen[0] == {"threshold": pytest.approx(0.65), "chosen_by": "validation_f1"}
    assert chosen[1] == {"threshold": 0.5, "chosen_by": "no_positive_example"}
    rep = ml.report(scores, truth, [c["threshold"] for c in chosen], ["cat", "dog"])
    assert rep["per_label"]["cat"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                       "average_precision": pytest.approx(5 / 6), "support": 2,
                                       "threshold": pytest.approx(0.65)}
    assert rep["per_label"]["dog"]["average_precision"] is None and rep["per_label"]["dog"]["f1"] is None
    assert rep["macro_f1"] == pytest.approx(0.8)  # cat's alone: dog is neither in the split nor predicted
    assert rep["labels_without_positives"] == ["dog"] and rep["map"] == pytest.approx(5 / 6)
    assert rep["subset_accuracy"] == 0.75 and rep["hamming_accuracy"] == 0.875
    # Only one candidate, at the lowest score: threshold is half of it.
    assert ml.choose_thresholds(np.array([[0.4], [0.4]]), np.array([[1], [0]]))[0]["threshold"] == 0.2


def test_loss_and_map():
    loss, mean_ap = ml.loss_and_map(np.array([[0.5, 0.0], [0.2, 0.9]]), np.array([[1, 0], [0, 0]]))
    assert loss == pytest.approx((math.log(2) - math.log(0.8) - math.log(0.1)) / 4, abs=1e-6) and mean_ap == 1.0
    assert math.isnan(ml.mean_average_precision(np.array([[0.3]]), np.array([[0]])))
    assert ml.binary_cross_entropy(np.array([[0.0]]), np.array([[1]])) == pytest.approx(-math.log(1e-7))


def test_empty_input():
    scores, truth = np.zeros((0, 2)), np.zeros((0, 2), dtype=bool)
    fallback = {"threshold": 0.4, "chosen_by": "no_validation_images"}
    assert ml.choose_thresholds(scores, truth, fallback=0.4) == [fallback, fallback]
    assert ml.decide(scores, [0.5, 0.5]).shape == (0, 2)
    loss, mean_ap = ml.loss_and_map(scores, truth)
    assert math.isnan(loss) and math.isnan(mean_ap)
    rep = ml.report(scores, truth, [0.5, 0.5], ["a", "b"])
    assert rep["examples"] == 0 and rep["micro_f1"] == 0.0 and rep["subset_accuracy"] == 0.0
    assert rep["labels_without_positives"] == ["a", "b"] and plain(rep)
    json.dumps(rep, allow_nan=True)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError):
        ml.average_precision(np.array([0.1, 0.2]), np.array([1]))
    with pytest.raises(ValueError):
        ml.decide(np.zeros((2, 3)), [0.5, 0.5])
    with pytest.raises(ValueError):
        ml.report(np.zeros((1, 2)), np.zeros((1, 2)), [0.5, 0.5], ["only one"])
