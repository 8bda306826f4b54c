"""Export policies and the model card: pure logic, no TensorFlow."""

from __future__ import annotations

import pytest

from job import config, formats, model_card
from job.errors import ExportFailed


class Log:
    def __init__(self):
        self.warnings = []

    def warning(self, event, **kw):
        self.warnings.append((event, kw))


def test_float_formats_must_agree_and_int8_reports_its_drop():
    reference = {"accuracy": 0.90}
    with pytest.raises(formats.ConversionError, match="agrees with the SavedModel on 98.0% of images"):
        formats._judge("onnx", {"agreement": 0.98, "accuracy": 0.9}, reference, 0.02, False, Log())
    formats._judge("tflite", {"agreement": 0.995, "accuracy": 0.9}, reference, 0.02, False, Log())

    log, small = Log(), {"agreement": 0.97, "accuracy": 0.89}
    formats._judge("tflite_int8", small, reference, 0.02, False, log)
    assert small["accuracy_drop"] == pytest.approx(0.01) and not small["accuracy_drop_exceeded"] and not log.warnings

    log, large = Log(), {"agreement": 0.9, "accuracy": 0.85}
    formats._judge("tflite_int8", large, reference, 0.02, False, log)
    assert large["accuracy_drop_exceeded"] and log.warnings[0][0] == "export accuracy drop"
    with pytest.raises(ExportFailed, match="0.050 below the SavedModel's.*fail_on_accuracy_drop"):
        formats._judge("tflite_int8", dict(large), reference, 0.02, True, Log())


def test_export_formats_config():
    base = ["data.uri=/d", "output.uri=/o"]
    assert config.load(None, base, environ={}).export.formats is None  # the defaults
    assert config.load(None, base + ["export.formats=[onnx, tflite_int8]"], environ={}).export.formats == [
        "onnx", "tflite_int8"]
    with pytest.raises(Exception, match="export.formats"):
        config.load(None, base + ["export.formats=[pytorch]"], environ={})


def test_model_card():
    cfg = config.redacted(config.load(None, ["data.uri=s3://b/flowers", "output.uri=/o", "run_id=r7"], environ={}))
    per_class = {"rose": {"precision": 0.9, "recall": 0.95, "f1": 0.9, "support": 20},
                 "tulip": {"precision": 0.8, "recall": 0.55, "f1": 0.6, "support": 20}}
    report = {"examples": 40, "accuracy": 0.75, "loss": 0.6, "macro_f1": 0.74, "balanced_accuracy": 0.75,
              "per_class": per_class}
    checked = {"saved_model": {"accuracy": 0.75, "bytes": 9e6, "latency_ms_batch1": 3.0},
               "onnx": {"error": "onnx: conversion failed: ImportError: no tf2onnx"}}
    card = model_card.render("r7", cfg, ["rose", "tulip"], {"train": {"rose": 80, "tulip": 70},
                                                            "test": {"rose": 20, "tulip": 20}},
                             {"test": report}, checked, 2, {"finetune_job": "0.2.0", "tensorflow": "2.21.0"})
    assert "# r7: an image classifier of 2 classes" in card and "`s3://b/flowers`" in card
    assert "| rose | 80 | 20 |" in card and "| **total** | 150 | 40 |" in card
    assert "| test | 40 | 75.0% | 74.0% | 75.0% | 0.600 |" in card
    assert "`tulip`: recall 55.0% on test" in card and "`rose`: recall" not in card
    assert "| onnx | not written: onnx: conversion failed" in card
    # predict's formats: the ones this run has (every format was offered, onnx here too)
    assert "`finetune-job predict --model <this run> image.jpg`." in card
    checked["tflite"] = {"accuracy": 0.75, "agreement": 1.0, "bytes": 2e6, "latency_ms_batch1": 1.0}
    assert "image.jpg [--format tflite]`." in model_card.render(
        "r7", cfg, ["rose", "tulip"], {"train": {"rose": 80, "tulip": 70}}, {"test": report}, checked, 2, {})
    assert "2 image(s) were skipped" in card


def test_multilabel_agreement_is_of_label_decisions_not_whole_label_sets(tmp_path):
    # 100 labels: a float16 format that flips one borderline label in each of 30 images agreed with the SavedModel
    # on 0% of whole label sets, and a listed `tflite` failed a run that had trained (exit 1).
    import numpy as np

    rng = np.random.default_rng(0)
    n, labels = 30, 100
    scores = rng.uniform(0, 1, (n, labels)).astype(np.float32)
    reference = (scores, scores >= 0.5)
    flipped = scores.copy()
    flipped[np.arange(n), rng.integers(0, labels, n)] += 0.004  # float16's rounding, one label an image ...
    flipped[np.arange(n), 0] = 0.5 + np.where(scores[:, 0] >= 0.5, -1e-3, 1e-3)  # ... and one that crosses for sure

    class Run:
        def predict(self, x):
            rows = x[:, 0, 0, 0].astype(int)
            return flipped[rows], (flipped[rows] >= 0.5).astype(np.float32)

    pixels = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 1, 1, 3), np.float32)
    (tmp_path / "m").write_bytes(b"x")
    truth = (rng.uniform(0, 1, (n, labels)) > 0.7).astype(np.float32)
    result = formats.check_multi(Run(), pixels, truth, reference, tmp_path / "m")
    decisions = float(((flipped >= 0.5) == reference[1]).mean())
    assert result["agreement"] == pytest.approx(decisions) and 0.98 < decisions < 1.0
    assert result["label_set_agreement"] == pytest.approx(float(np.all((flipped >= 0.5) == reference[1], 1).mean()))
    assert result["label_set_agreement"] == 0.0
    formats._judge("tflite", {"agreement": 0.995, "label_set_agreement": 0.0, "micro_f1": 0.5}, {}, 0.02, False, Log())
    with pytest.raises(formats.ConversionError, match=r"on 98\.0% of label decisions \(image and label\)"):
        formats._judge("onnx", {"agreement": 0.98, "label_set_agreement": 0.0, "micro_f1": 0.5}, {}, 0.02, False,
                       Log())
    # With sparse labels an export that says no to everything agrees on 99% of the decisions: its scores do not.
    for broken in (np.full_like(scores, np.nan), np.zeros_like(scores)):
        flipped[:] = broken
        result = formats.check_multi(Run(), pixels, truth, reference, tmp_path / "m")
        with pytest.raises(formats.ConversionError, match=r"^tflite: its scores differ from the SavedModel's by up "
                                                          r"to (nan|0\.9\d*) \(at most 0\.1 expected"):
            formats._judge("tflite", {**result, "agreement": 0.995}, {}, 0.02, False, Log())


def test_a_multilabel_decision_float16_turns_at_its_threshold_does_not_fail_a_float_format(tmp_path):
    # 15 images x 3 labels: one score 0.00036 above its threshold came out below it in float16, agreement 97.8% of
    # 45 decisions < 99%, and a listed `tflite` failed a multi-label run after training (exit 1).
    import numpy as np

    rng = np.random.default_rng(2)
    n, labels = 15, 3
    scores = rng.uniform(0, 1, (n, labels)).astype(np.float32)
    scores[4, 1] = 0.50036
    thresholds = np.full(labels, 0.5, np.float32)
    reference = (scores, scores >= 0.5, thresholds)
    pixels = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 1, 1, 3), np.float32)
    (tmp_path / "m").write_bytes(b"x")

    def checked(out, above=None, ref=reference):
        class Run:
            def predict(self, x):
                rows = x[:, 0, 0, 0].astype(int)
                return out[rows], (out[rows] >= ref[2] if above is None else above[rows]).astype(np.float32)

        return formats.check_multi(Run(), pixels, (scores > 0.6).astype(np.float32), ref, tmp_path / "m")

    def at_4_1(value):
        out = scores.copy()
        out[4, 1] = value
        return out

    rounded = checked(at_4_1(0.4998))  # across the threshold by rounding
    assert rounded["agreement"] == pytest.approx(44 / 45) and rounded["near_ties"] == 1
    assert rounded["agreement_beyond_near_ties"] == 1.0
    formats._judge("tflite", rounded, {}, 0.02, False, Log())
    wrong = checked(at_4_1(0.45))  # across it by far more than rounding: the export's own doing
    assert wrong["near_ties"] == 0 and "agreement_beyond_near_ties" not in wrong
    with pytest.raises(formats.ConversionError, match=r"on 97\.8% of label decisions \(image and label\) \(at least"):
        formats._judge("tflite", wrong, {}, 0.02, False, Log())
    # Broken exports the rule must not excuse (a review's cases): decisions inverted with the scores right; a
    # constant 0.5 export of a model whose scores sit at its thresholds; all zeros from a low-confidence model.
    near = (0.5 + rng.uniform(-0.015, 0.015, (n, labels))).astype(np.float32)
    low = rng.uniform(0, 0.018, (n, labels)).astype(np.float32)
    low_thresholds = np.full(labels, 0.009, np.float32)
    for result in (checked(scores, above=scores < 0.5),
                   checked(np.full_like(near, 0.5), ref=(near, near >= 0.5, thresholds)),
                   checked(np.zeros_like(low), ref=(low, low >= 0.009, low_thresholds))):
        assert result["near_ties"] == 0, result
        with pytest.raises(formats.ConversionError):
            formats._judge("tflite", result, {}, 0.02, False, Log())


def test_a_near_tie_that_float16_turns_does_not_fail_a_float_format(tmp_path):
    # 37 check images, one whose top two classes were 0.005 apart: float16 weights turned it, agreement 97.3% < 99%,
    # and a listed `tflite` failed the run after training (exit 1), every probability within 0.005 of the SavedModel's.
    import numpy as np

    rng = np.random.default_rng(1)
    n, classes = 37, 4
    reference = rng.dirichlet(np.ones(classes) * 0.5, n).astype(np.float32)
    reference[0] = [0.1178, 0.2821, 0.2976, 0.3025]  # a near tie: the top two 0.0049 apart
    served = reference.copy()

    class Run:
        def predict(self, x):
            return served[x[:, 0, 0, 0].astype(int)]

    pixels = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 1, 1, 3), np.float32)
    labels = reference.argmax(-1)
    (tmp_path / "m").write_bytes(b"x")
    served[0] = [0.1178, 0.2869, 0.2981, 0.2972]  # float16's rounding turns it
    turned = formats.check(Run(), pixels, labels, reference, tmp_path / "m")
    assert turned["agreement"] == pytest.approx(36 / 37) and turned["near_ties"] >= 1
    assert turned["agreement_beyond_near_ties"] == 1.0 and turned["max_score_difference"] == pytest.approx(0.0053)
    formats._judge("tflite", turned, {"accuracy": 1.0}, 0.02, False, Log())
    # An image that is no near tie, turned: a real disagreement, and still refused.
    clear = int(np.argmax(np.sort(reference, -1)[:, -1] - np.sort(reference, -1)[:, -2]))
    served[clear] = np.roll(reference[clear], 1)
    wrong = formats.check(Run(), pixels, labels, reference, tmp_path / "m")
    with pytest.raises(formats.ConversionError, match=r"^tflite: agrees with the SavedModel on 97\.\d% of images "
                                                      r"beyond \d near tie\(s\) \(the SavedModel's top two within "):
        formats._judge("tflite", wrong, {"accuracy": 1.0}, 0.02, False, Log())
    # Every top-1 the same, yet the probabilities far off (an export broken short of its decisions): refused too.
    served[:] = reference * 0.5 + 0.5 / classes
    shrunk = formats.check(Run(), pixels, labels, reference, tmp_path / "m")
    assert shrunk["agreement"] == 1.0
    with pytest.raises(formats.ConversionError, match="its scores differ from the SavedModel's by up to"):
        formats._judge("onnx", shrunk, {"accuracy": 1.0}, 0.02, False, Log())


@pytest.mark.parametrize("broken", ["zeros", "uniform", "shuffled", "rounded"])
def test_a_broken_export_of_a_low_confidence_model_is_refused(tmp_path, broken):
    # Scores within 0.1 of the SavedModel's, decisions lost: a tie band that grew with the measured difference
    # excused every image, and an all-zeros export of a 100-class model (top scores about 0.04) passed.
    import numpy as np

    rng = np.random.default_rng(2)
    n, classes = 200, 100
    reference = rng.dirichlet(np.ones(classes) * 5, n).astype(np.float32)  # low confidence: top scores ~0.03
    if broken == "zeros":
        served = np.zeros_like(reference)
    elif broken == "uniform":
        served = np.full_like(reference, 1.0 / classes)
    elif broken == "shuffled":  # each image's scores on other classes
        served = reference[:, rng.permutation(classes)]
    else:  # not broken: float16's rounding, which turns the top-1 of many of these near ties
        served = reference + rng.uniform(-0.002, 0.002, reference.shape).astype(np.float32)

    class Run:
        def predict(self, x):
            return served[x[:, 0, 0, 0].astype(int)]

    pixels = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 1, 1, 3), np.float32)
    (tmp_path / "m").write_bytes(b"x")
    result = formats.check(Run(), pixels, reference.argmax(-1), reference, tmp_path / "m")
    assert result["max_score_difference"] <= formats.FLOAT_SCORE_DIFFERENCE  # the scores alone do not show it
    assert result["near_ties"] == n  # every image: top-1 agreement says nothing of the export here
    if broken == "rounded":  # a correct export (it agreed on 51 to 78% of the images, and failed)
        assert result["agreement"] < 0.9
        formats._judge("onnx", result, {"accuracy": 1.0}, 0.02, False, Log())
        return
    with pytest.raises(formats.ConversionError, match="^onnx: every check image is a near tie, and its scores differ "
                                                      "from the SavedModel's by up to"):
        formats._judge("onnx", result, {"accuracy": 1.0}, 0.02, False, Log())


@pytest.mark.parametrize("fmt", ["tflite", "tf_serving"])
def test_a_full_disk_while_converting_is_a_storage_error_not_a_format_left_out(tmp_path, monkeypatch, fmt):
    # A default format that hit a full disk was "left out" (a warning), the run exit 0 with _SUCCESS and without it,
    # and its rerun "already complete"; a listed one was exit 1. Now exit 4: the retry exports again.
    import errno
    import shutil

    from job.errors import StorageError

    (tmp_path / "saved_model").mkdir()

    def full(*_a, **_k):
        if fmt == "tf_serving":  # copytree gathers its failures in one shutil.Error, errno None
            raise shutil.Error([("a", "b", "[Errno 28] No space left on device: 'b'")])
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.tflite"))

    monkeypatch.setattr(formats, "_tflite", full)
    monkeypatch.setattr(formats.shutil, "copytree", full)
    with pytest.raises(StorageError, match=f"^{fmt}: no space left on the local disk .* while converting; .*rerun "
                                           "the same run_id") as e:
        formats.convert(fmt, tmp_path, None, (8, 8), iter(()), ["a", "b"])
    assert e.value.exit_code == 4
    monkeypatch.setattr(formats, "_tflite", lambda *a: (_ for _ in ()).throw(ValueError("unsupported op")))
    with pytest.raises(formats.ConversionError, match="tflite: conversion failed: ValueError: unsupported op"):
        formats.convert("tflite", tmp_path, None, (8, 8), iter(()), ["a", "b"])
