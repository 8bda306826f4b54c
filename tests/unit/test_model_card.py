"""MODEL_CARD.md (job/model_card.py) from a small fake run: its sections, tables and known limits, from the
run's own numbers; no TensorFlow."""

from __future__ import annotations

import subprocess
import sys

from job import config, model_card

PER_CLASS = {"rose": {"precision": 0.9, "recall": 0.95, "f1": 0.9, "support": 20},
             "tulip": {"precision": 0.8, "recall": 0.55, "f1": 0.6, "support": 20},
             "daisy": {"precision": 0.7, "recall": 0.35, "f1": 0.5, "support": 3}}
TEST = {"examples": 43, "accuracy": 0.75, "loss": 0.6, "macro_f1": 0.74, "balanced_accuracy": None,
        "per_class": PER_CLASS}
VALIDATION = {**TEST, "examples": 30, "accuracy": 0.9, "per_class": {"rose": {"recall": 0.9, "support": 30}}}
FORMATS = {"saved_model": {"accuracy": 0.75, "bytes": 9e6, "latency_ms_batch1": 3.0},
           "tflite": {"accuracy": 0.7, "agreement": 0.99, "bytes": 2.5e6, "latency_ms_batch1": 1.25},
           "onnx": {"error": "onnx: conversion failed: ImportError: no tf2onnx"}}
COUNTS = {"train": {"rose": 80, "tulip": 70}, "test": {"rose": 20, "tulip": 20, "daisy": 3}}


def _card(reports=None, overrides=(), **keywords) -> str:
    cfg = config.redacted(config.load(None, ["data.uri=s3://b/flowers", "output.uri=/o", "run_id=r7",
                                             "data.image_size=[96,128]", *overrides], environ={}))
    return model_card.render("r7", cfg, ["rose", "tulip", "daisy"], COUNTS,
                             reports or {"validation": VALIDATION, "test": TEST}, FORMATS, 2,
                             {"finetune_job": "0.2.0", "tensorflow": "2.21.0"}, **keywords)


def _tables(card: str) -> list[list[list[str]]]:
    tables, current = [], []
    for line in [*card.splitlines(), ""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_the_card_has_its_sections_in_order():
    card = _card()
    assert card.startswith("---\nlibrary_name: keras\npipeline_tag: image-classification\n"
                           "tags: [finetune-job, mobilenet_v2, transfer-learning]\n---\n")
    headings = [line for line in card.splitlines() if line.startswith("#") and not line.startswith("#!")]
    assert headings == ["# r7: an image classifier of 3 classes", "## Intended input", "## Training data",
                        "## Training recipe", "## Results", "### Exported formats (checked on the test split)",
                        "## Known limits", "## How to use"]
    assert ("**mobilenet_v2** (weights: `imagenet`) fine-tuned by finetune-job 0.2.0 (TensorFlow 2.21.0) on "
            "`s3://b/flowers`. Classes, in output order: `rose`, `tulip`, `daisy`.") in card
    assert "resized to 96x128 (bilinear," in card and 'there is no "none of them".\n' in card
    assert card.endswith("image.jpg [--format tflite]`.\n")  # the formats this run has (_card: tflite)


def test_the_tables_hold_the_run_numbers():
    card = _card()
    counts, results, formats = _tables(card)
    assert counts == [["class", "train", "test"], ["---", "---", "---"], ["rose", "80", "20"],
                      ["tulip", "70", "20"], ["daisy", "0", "3"], ["**total**", "150", "43"]]
    assert results[2:] == [["validation", "30", "90.0%", "74.0%", "n/a", "0.600"],
                           ["test", "43", "75.0%", "74.0%", "n/a", "0.600"]]
    assert formats[2] == ["saved_model", "75.0%", "reference", "9.0 MB", "3.0 ms"]
    assert formats[3] == ["tflite", "70.0%", "99.0%", "2.5 MB", "1.2 ms"]
    assert formats[4][:2] == ["onnx", "not written: onnx: conversion failed: ImportError: no tf2onnx"]
    for table in (counts, results, formats):
        assert len({len(row) for row in table}) == 1, table  # every row as wide as its header
    assert "\n2 image(s) were skipped as undecodable or too large" in card


def test_class_names_with_a_pipe_or_a_backtick_keep_the_tables_and_the_code_spans_whole():
    # A class `a|b` split its row into one cell more: the counts stood under the wrong split.
    import re

    classes = ["a|b", "x`y", "``z"]
    counts = {"train": {c: 10 + i for i, c in enumerate(classes)}, "test": {c: 1 for c in classes}}
    per_class = {c: {"precision": 0.5, "recall": 0.2, "f1": 0.3, "support": 1} for c in classes}
    test = {**TEST, "per_class": per_class}
    cfg = config.redacted(config.load(None, ["data.uri=s3://b/d", "output.uri=/o", "run_id=r7"], environ={}))
    card = model_card.render("r7", cfg, classes, counts, {"test": test}, FORMATS, 0, {})
    rows = [re.split(r"(?<!\\)\|", line.strip()[1:-1]) for line in card.splitlines() if line.startswith("| a")]
    assert [[c.strip() for c in row] for row in rows] == [["a\\|b", "10", "1"]]
    assert "in output order: `a|b`, ``x`y``, ``` ``z ```." in card
    assert "- ``x`y``: recall 20.0% on test" in card


def test_the_recipe_and_the_known_limits():
    card = _card(overrides=["train.head.epochs=4", "train.finetune.unfreeze=20", "train.lr_schedule=cosine"])
    assert "- head: 4 epochs at 0.001 (cached_features), augment: False\n" in card
    assert "- fine-tuning: 10 epochs at 0.0001, unfreeze: 20, augment: False\n" in card
    assert "schedule cosine, class weights auto\n- the complete resolved configuration is `config.yaml`" in card
    limits = card.split("## Known limits\n\n")[1].split("\n\n")[0].splitlines()
    assert limits[:2] == ["- `daisy`: recall 35.0% on test (its images are often given another class).",
                          "- `tulip`: recall 55.0% on test (its images are often given another class)."]
    assert limits[2].startswith("- the smallest split has 43 images")
    assert model_card._smallest(1).startswith("- the smallest split has 1 image:")
    assert model_card._smallest(1000) == ""  # one image is 0.1 point there: "several points" was false
    only_validation = _card({"validation": VALIDATION})
    assert "checked on the validation split" in only_validation
    assert "- every class has a recall of at least 80.0% on validation." in only_validation


def test_the_model_card_does_not_import_tensorflow():
    code = "import sys, job.model_card; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_multilabel_card_gives_map_f1s_and_each_labels_threshold():
    per_label = {"rose": {"precision": 0.9, "recall": 0.95, "f1": 0.92, "average_precision": 0.97, "support": 20,
                          "threshold": 0.41},
                 "tulip": {"precision": 0.8, "recall": 0.5, "f1": 0.62, "average_precision": None, "support": 0,
                           "threshold": 0.5}}
    report = {"examples": 40, "map": 0.97, "micro_f1": 0.85, "macro_f1": 0.77, "subset_accuracy": 0.6, "loss": 0.31,
              "per_label": per_label}
    counts, totals = {"train": {"rose": 30, "tulip": 12}}, {"train": {"unlabelled": 5, "images": 40}}
    formats = {"saved_model": {"map": 0.97, "micro_f1": 0.85, "bytes": 9e6, "latency_ms_batch1": 3.0},
               "tflite": {"map": 0.96, "micro_f1": 0.84, "agreement": 0.99, "bytes": 2e6, "latency_ms_batch1": 1.0}}
    cfg = config.redacted(config.load(None, ["data.uri=/d", "output.uri=/o", "task=multi_label"], environ={}))
    card = model_card.render("m1", cfg, ["rose", "tulip"], counts, {"test": report}, formats, 0, {}, totals=totals)
    assert "# m1: a multi-label image classifier of 2 labels" in card and "Labels, in output order" in card
    assert 'there is no "none of them"' not in card and "maybe none" in card
    # It said an image "must show one object of one of the classes above", beside "maybe none".
    assert "one object of one of" not in card and "may show what any of the labels above names" in card
    one = model_card.render("m1", cfg, ["rose"], counts, {"test": report}, formats, 0, {}, totals=totals)
    assert "# m1: a multi-label image classifier of 1 label\n" in one  # not "of 1 labels"
    data, results, labels, fmts = _tables(card)
    assert data[-2:] == [["*(no label)*", "5"], ["**images**", "40"]]
    # A label named `images` or `(no label)` had its counts overwritten by those rows (45 for 31).
    named = model_card.render("m1", cfg, ["(no label)", "images"], {"train": {"(no label)": 30, "images": 31}},
                              {"test": report}, formats, 0, {}, totals=totals)
    assert _tables(named)[0][2:] == [["(no label)", "30"], ["images", "31"], ["*(no label)*", "5"],
                                     ["**images**", "40"]]
    single = config.redacted(config.load(None, ["data.uri=/d", "output.uri=/o"], environ={}))
    plain = model_card.render("s1", single, ["cat", "images"], {"train": {"cat": 3, "images": 4}},
                              {"test": TEST | {"per_class": {}}}, FORMATS, 0, {})
    assert _tables(plain)[0][2:] == [["cat", "3"], ["images", "4"], ["**total**", "7"]]
    # The smallest split's line read a class named `images` as the split's size, and summed multi-label counts
    # (labels, not images: 42 where the split has 40).
    assert "- the smallest split has 7 images:" in plain
    assert "- the smallest split has 40 images:" in card
    assert results[2] == ["test", "40", "97.0%", "85.0%", "77.0%", "60.0%", "0.310"]
    assert labels[2] == ["rose", "20", "97.0%", "90.0%", "95.0%", "92.0%", "0.410"]
    assert labels[3][2] == "n/a"  # no positive example: no average precision
    assert fmts[0][1] == "micro-F1" and fmts[3] == ["tflite", "84.0%", "99.0%", "2.0 MB", "1.0 ms"]
    # No test image carries tulip: its recall of 0 measures nothing (it was listed as "often missed").
    assert "- `tulip`: recall" not in card
    assert "- every label measured has a recall of at least 80.0% on test.\n- not measured, no test image carries " \
           "them: `tulip`." in card
    report["per_label"]["tulip"]["support"] = 6
    card = model_card.render("m1", cfg, ["rose", "tulip"], counts, {"test": report}, formats, 0, {}, totals=totals)
    assert "- `tulip`: recall 50.0% on test (often missed on images that carry it)." in card
    assert "not measured" not in card
    report["map"] = float("nan")  # no positive in the split: no mean average precision
    card = model_card.render("m1", cfg, ["rose", "tulip"], counts, {"test": report}, formats, 0, {}, totals=totals)
    assert _tables(card)[1][2][2] == "n/a" and "nan" not in card
    assert "Per label on test, at the thresholds chosen on validation:" in card
    # The thresholds' fallbacks named: "chosen on validation" was said of a run without validation images.
    chosen = [{"threshold": 0.41, "chosen_by": "validation_f1"}, {"threshold": 0.5, "chosen_by": "no_positive_example"}]
    card = model_card.render("m1", cfg, ["rose", "tulip"], counts, {"test": report}, formats, 0, {}, thresholds=chosen)
    assert "Per label on test, at the thresholds chosen on validation, but 0.5 for `tulip` (no validation image " \
           "carries them):" in card
    none = [{"threshold": 0.5, "chosen_by": "no_validation_images"}] * 2
    card = model_card.render("m1", cfg, ["rose", "tulip"], counts, {"test": report}, formats, 0, {}, thresholds=none)
    assert "Per label on test, at the fallback threshold 0.5 (no validation images carry the labels" in card
    # A label neither in the split nor predicted has no precision, recall or F1 (they were 0.0%, in macro-F1 too).
    report["per_label"]["tulip"].update(precision=None, recall=None, f1=None, support=0)
    assert _tables(model_card.render("m1", cfg, ["rose", "tulip"], counts, {"test": report}, formats, 0,
                                     {}))[2][3][3:6] == ["n/a", "n/a", "n/a"]


def test_the_card_names_the_rate_the_search_chose_and_every_trials_scores():
    cfg = config.redacted(config.load(None, ["data.uri=s3://b/flowers", "output.uri=/o"], environ={}))
    trials = [{"learning_rate": 1e-4, "epochs": 3, "best_epoch": 3, "val_loss": 0.5, "val_accuracy": 0.8,
               "chosen": False},
              {"learning_rate": 3e-4, "epochs": 3, "best_epoch": 2, "val_loss": 0.4, "val_accuracy": 0.75,
               "chosen": True}]
    card = model_card.render("r7", cfg, ["rose", "tulip", "daisy"], COUNTS, {"test": TEST}, FORMATS, 0, {},
                             trials)
    line = next(x for x in card.splitlines() if "train.search" in x)
    assert line.startswith("- fine-tuning learning rate **0.0003**, chosen on validation by train.search")
    assert "0.0001: val_loss 0.5000, val_accuracy 0.8000 after 3 epochs" in line
    assert "0.0003: val_loss 0.4000, val_accuracy 0.7500 after 3 epochs" in line
    assert "train.search" not in _card()  # no search, no line


def test_a_refit_says_what_the_model_trained_on_and_what_validation_measured():
    lines = model_card._refit_lines({"head_epochs": 4, "finetune_epochs": 6, "learning_rate": 3e-4})
    assert len(lines) == 1 and "training + validation" in lines[0]
    assert "head 4 epochs" in lines[0] and "fine-tuning 6 epochs at 0.0003" in lines[0]
    assert model_card._refit_lines({}) == []
    # Without a test split the card said the refit model was "scored on test", and its formats' scores (92.9%, the
    # model before the refit 28.6%) were on validation images the refit had trained on, without a word.
    refit = {"head_epochs": 4, "finetune_epochs": 6, "learning_rate": 3e-4}
    cfg = config.redacted(config.load(None, ["data.uri=s3://b/flowers", "output.uri=/o", "run_id=r7",
                                             "train.refit=true"], environ={}))
    untested = model_card.render("r7", cfg, ["rose", "tulip", "daisy"], COUNTS, {"validation": VALIDATION}, FORMATS,
                                 0, {}, refit=refit, checked_on="validation")
    assert "scored on test" not in untested and "no test split scored it" in untested
    assert "checked on the validation split, which the refit trained on" in untested
    tested = model_card.render("r7", cfg, ["rose", "tulip", "daisy"], COUNTS, {"validation": VALIDATION, "test": TEST},
                               FORMATS, 0, {}, refit=refit, checked_on="test")
    assert "exported and scored on test" in tested and "which the refit trained on" not in tested


def _records(val_losses: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "loss": 1.0, "accuracy": 0.5, "val_loss": v, "val_accuracy": 0.5}
            for i, v in enumerate(val_losses)]


def test_the_recipe_says_what_trained_not_what_was_set():
    # The card gave the configured epochs and rates: with `weights: none` "head: 1 epochs at 0.001" (no head phase
    # ran) and "fine-tuning: ... at 0.0001" (it trained every layer at 0.001); beside the search's chosen 3e-4 the
    # configured 1e-4; the maximum epochs where early stopping had ended the phase.
    def card(history, overrides=(), search=()):
        cfg = config.redacted(config.load(None, ["data.uri=s3://b/flowers", "output.uri=/o", "run_id=r7",
                                                 *overrides], environ={}))
        return model_card.render("r7", cfg, ["rose", "tulip"], COUNTS, {"test": TEST}, FORMATS, 0, {}, search,
                                 None, history)

    text = card({"head": _records([0.9, 0.8]), "finetune": _records([0.7, 0.5, 0.6, 0.65])},
                ["train.head.epochs=2", "train.finetune.epochs=10", "train.search.learning_rates=[]"])
    assert "- head: 2 epochs trained of at most 2 at 0.001 (cached_features)" in text
    assert "- fine-tuning: 4 epochs trained of at most 10, the best (epoch 2) kept at 0.0001, unfreeze: " in text
    trials = [{"learning_rate": 1e-4, "epochs": 1, "best_epoch": 1, "val_loss": 0.5, "val_accuracy": 0.8,
               "chosen": False},
              {"learning_rate": 3e-4, "epochs": 1, "best_epoch": 1, "val_loss": 0.4, "val_accuracy": 0.8,
               "chosen": True}]
    text = card({"head": _records([0.9]), "finetune": _records([0.7, 0.5])}, search=trials)
    assert "- fine-tuning: 2 epochs trained of at most 10 at 0.0003, unfreeze: " in text
    text = card({"head": [], "finetune": _records([0.9, 0.8, 0.7])},
                ["model.weights=none", "train.head.epochs=1", "train.finetune.epochs=2",
                 "train.search.learning_rates=[]"])
    assert "- head: none (from scratch: no pre-trained base to keep)\n" in text
    assert ("- fine-tuning: 3 epochs trained of at most 3 at 0.001, unfreeze: every layer, BatchNormalization "
            "included (from scratch), augment: ") in text
    # From scratch neither a rate decay (no base) nor a moving average (BatchNormalization trains) runs: the card
    # claimed the decay. With a base, the average is what was exported: the card never said so.
    scratch = card({"head": [], "finetune": _records([0.9])},
                   ["model.weights=none", "train.finetune.layer_decay=0.5", "train.finetune.average_epochs=2"])
    assert "rate decay" not in scratch and "moving average" not in scratch
    based = card({"head": _records([0.9]), "finetune": _records([0.7])},
                 ["train.finetune.layer_decay=0.5", "train.finetune.average_epochs=2"])
    assert ", layer-wise rate decay to 0.5 at the first layer, the weights' moving average over 2 epochs validated " \
           "and kept (exported)" in based
    none = card({"head": _records([0.9]), "finetune": []}, ["train.finetune.epochs=0", "train.finetune.augment=true",
                                                            "train.finetune.layer_decay=0.5"])
    assert "- fine-tuning: none (train.finetune.epochs: 0)\n" in none and "rate decay" not in none


def test_a_run_without_validation_or_test_images_claims_no_score():
    # It showed an empty results table, "every class has a recall of at least 80.0% on validation", the formats'
    # scores on the training images "checked on the validation split", and early stopping on val_loss.
    cfg = config.redacted(config.load(None, ["data.uri=s3://b/flowers", "output.uri=/o", "run_id=r7"], environ={}))
    card = model_card.render("r7", cfg, ["rose", "tulip"], {"train": {"rose": 30, "tulip": 30}}, {}, FORMATS, 0,
                             {}, checked_on="train")
    assert "recall" not in card and "on validation" not in card and "val_loss" not in card
    assert card.count(model_card.NOT_MEASURED) == 2  # the results and the known limits
    assert "### Exported formats (checked on the training images: the run had no validation or test split" in card
    assert "early stopping on the training loss (no validation images) (patience" in card
    assert "train.refit was set but not done" not in card
    asked = config.redacted(config.load(None, ["data.uri=s3://b/flowers", "output.uri=/o", "run_id=r7",
                                               "train.refit=true"], environ={}))
    assert "- train.refit was set but not done: it needs" in model_card.render(
        "r7", asked, ["rose", "tulip"], {"train": {"rose": 30, "tulip": 30}}, {}, FORMATS, 0, {}, checked_on="train")
    full = model_card.render("r7", cfg, ["rose", "tulip"], {**COUNTS, "validation": {"rose": 5, "tulip": 5}},
                             {"validation": VALIDATION, "test": TEST}, FORMATS, 0, {}, checked_on="test")
    assert "### Exported formats (checked on the test split)" in full and "early stopping on val_loss (" in full
    assert model_card.NOT_MEASURED not in full and "recall" in full


def test_a_format_past_its_accuracy_drop_is_a_known_limit():
    # tflite_int8 66.7% against the SavedModel's 83.3%: a warning in the logs, `accuracy_drop_exceeded` in the
    # manifest, and in the card only a number in the formats' table.
    cfg = config.redacted(config.load(None, ["data.uri=s3://b/flowers", "output.uri=/o", "run_id=r7"], environ={}))
    flagged = {**FORMATS, "tflite_int8": {"accuracy": 0.667, "accuracy_drop": 0.167, "accuracy_drop_exceeded": True,
                                          "agreement": 0.83, "bytes": 1e6, "latency_ms_batch1": 1.0}}
    card = model_card.render("r7", cfg, ["rose", "tulip", "daisy"], COUNTS, {"test": TEST}, flagged, 0, {})
    limits = card.split("## Known limits")[1].split("## How to use")[0]
    assert ("- `tflite_int8` scores 66.7% accuracy, 16.7 points below the SavedModel, past export.max_accuracy_drop"
            in limits)
    assert "scores" not in _card().split("## Known limits")[1].split("## How to use")[0]  # none flagged: no line
    within = {**flagged, "tflite_int8": {**flagged["tflite_int8"], "accuracy_drop_exceeded": False}}
    assert "max_accuracy_drop" not in model_card.render("r7", cfg, ["rose", "tulip", "daisy"], COUNTS, {"test": TEST},
                                                        within, 0, {})


def test_known_limits_name_at_most_the_twenty_weakest_classes():
    # 1,000 classes, nearly all below 80% recall: 999 lines in the card's known limits (108 KB).
    per_class = {f"c{i:03d}": {"precision": 0.5, "recall": i / 1000, "f1": 0.5, "support": 2} for i in range(1000)}
    text = model_card._limits(per_class, "test")
    lines = text.splitlines()
    assert len(lines) == 21 and lines[0].startswith("- `c000`: recall 0.0% on test")
    assert lines[19].startswith("- `c019`:") and lines[20] == ("- ... and 780 more classes with a recall below 80.0% "
                                                               "on test (metrics.json has each).")


def test_a_run_resumed_on_changed_images_says_so():
    # A resume whose dataset changed exported a card describing only the new images, with no word of the old ones.
    changed = _card(splits_changed=True)
    assert "resumed a checkpoint trained on other images" in changed.split("## Known limits")[1].split("## How")[0]
    assert "resumed a checkpoint" not in _card()
