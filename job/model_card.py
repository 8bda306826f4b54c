"""MODEL_CARD.md of a run, in the manner of Hugging Face model cards: what the model is, what it was
trained on, how well it does (per split and per exported format), how to use it, and where it is weak.
Pure text from the run's own numbers; no TensorFlow.

The card is one `string.Template` (CARD); the helpers below fill in its tables and lists.
"""

from __future__ import annotations

import math
import re
from string import Template

from job import recipe

LOW_RECALL = 0.8  # classes below this recall on the headline split are named as a known limit
SHOWN = 20  # at most this many of them, the weakest first

# A backslash at the end of a line continues the paragraph: the card has one line per paragraph.
CARD = Template("""\
---
library_name: keras
pipeline_tag: image-classification
tags: [finetune-job, $backbone, transfer-learning]
---

# $run_id: $kind_title

A `keras.applications` **$backbone** (weights: `$weights`) fine-tuned by finetune-job $version \
(TensorFlow $tensorflow) on `$data_uri`. $kind_names, in output order: $class_list.

## Intended input

Photos or images like the training data, any size: they are resized to ${height}x${width} (bilinear, \
antialiased, no crop, so the aspect ratio is not kept) and $kind_subject. \
The SavedModel takes encoded JPEG/PNG/BMP/GIF bytes; LiteRT and ONNX take decoded RGB pixels (0..255, \
resized, rounded to whole numbers as training read them), as the JSON beside each file says. $kind_rule

## Training data

$counts_table

$bad_images image(s) were skipped as undecodable or too large (listed in metrics.json).

## Training recipe

$recipe
- the complete resolved configuration is `config.yaml`

## Results

$results_table

### Exported formats ($checked)

$formats_table

## Known limits

$limits
$smallest- the model knows only these classes and has not been checked for fairness or robustness.

## How to use

```python
import tensorflow as tf
serve = tf.saved_model.load("saved_model").signatures["serving_default"]
out = serve(image_bytes=tf.constant([open("image.jpg", "rb").read()]))
$usage
```

Or `finetune-job predict --model <this run> image.jpg$predict_formats`.
""")


SINGLE = {"kind_title": "an image classifier of {n} classes", "kind_names": "Classes",
          "kind_subject": "must show one object of one of the classes above",
          "kind_rule": 'Every image gets one of these classes: there is no "none of them".',
          "usage": 'print(out["label"].numpy(), out["probabilities"].numpy())'}
MULTI = {"kind_title": "a multi-label image classifier of {n} label{s}", "kind_names": "Labels",
         "kind_subject": "may show what any of the labels above names, several of them or none",
         "kind_rule": "Each label is decided on its own: an image gets every label whose score reaches its threshold "
                      "(thresholds.json, built into every format), maybe none.",
         "usage": 'print(out["labels"].numpy(), out["scores"].numpy())  # names above threshold ("" elsewhere)'}


def render(run_id: str, config: dict, classes: list[str], counts: dict[str, dict[str, int]], reports: dict,
           formats: dict[str, dict], bad_images: int, versions: dict[str, str], search: list[dict] = (),
           refit: dict | None = None, history: dict[str, list[dict]] | None = None, checked_on: str = "",
           thresholds: list[dict] = (), splits_changed: bool = False,
           totals: dict[str, dict[str, int]] | None = None) -> str:
    """`history`: the epochs trained per phase (history.json), so that the recipe says what ran, not what was set.
    `checked_on`: the split the formats were scored on (manifest.json's formats_checked_on). Without validation and
    test splits, nothing is measured on images the model did not train on, and the card says so (it claimed
    recall on validation, and the formats' scores on the training images as validation's). `thresholds`:
    multi-label, each label's threshold and how it was chosen (thresholds.json), so the card names the fallbacks.
    `splits_changed`: the run resumed a checkpoint trained on other splits (manifest.json's resumed_from says so).
    `totals`: multi-label, each split's `images` and those of them with no label (`unlabelled`), apart from `counts`
    (a label named `images` or `(no label)` had its counts overwritten by them)."""
    data, model = config["data"], config["model"]
    height, width = data["image_size"]
    split = next((s for s in ("test", "validation") if s in reports), "")
    multi = config.get("task") == "multi_label"
    kind = {k: v.format(n=len(classes), s="s" * (len(classes) != 1)) for k, v in (MULTI if multi else SINGLE).items()}
    per_label = reports.get(split, {}).get("per_label" if multi else "per_class", {})
    validated = _images(counts, totals, "validation") > 0
    return CARD.substitute(**kind,
        run_id=run_id, backbone=model["backbone"], weights=model["weights"], data_uri=data["uri"],
        version=versions.get("finetune_job", ""), tensorflow=versions.get("tensorflow", ""),
        num_classes=len(classes), class_list=", ".join(_code(c) for c in classes), height=height, width=width,
        counts_table=_counts_table(classes, counts, totals), bad_images=bad_images,
        recipe=_recipe(config["train"], search, refit or {}, history, model["weights"] == "none", validated,
                       "test" in reports),
        results_table=(_multi_results(reports, per_label, split, _fallbacks(classes, thresholds)) if multi
                       else _results_table(reports)) if split
        else NOT_MEASURED, checked=_checked(checked_on or split or "train", bool(refit)),
        predict_formats=_predict_formats(formats), formats_table=_formats_table(formats),
        limits=(_limits(per_label, split, multi) if split else f"- {NOT_MEASURED}") + _format_drops(formats)
        + SPLITS_CHANGED * splits_changed,
        smallest=_smallest(min((_images(counts, totals, split) for split in counts), default=0)))


SPLITS_CHANGED = ("\n- This run resumed a checkpoint trained on other images (added, removed or relabelled since): "
                  "its epochs before the resume trained on those, and the counts above are the images as they are "
                  "now.")
NOT_MEASURED = ("not measured: the run had no validation or test images, so nothing was scored on images the model "
                "did not train on.")


def _smallest(images: int) -> str:
    """The line on the smallest split's size, where one image moves its accuracy by a third of a point or more (it
    said "several points" of a split of 1,000 images too)."""
    if images >= 300:
        return ""
    return (f"- the smallest split has {_plural(images, 'image')}: accuracy moves by several points from one sample "
            "to the next at that size.\n")


def _images(counts: dict[str, dict[str, int]], totals: dict[str, dict[str, int]] | None, split: str) -> int:
    """A split's images (multi-label: its `totals` entry; a single-label class named `images` was taken for it)."""
    if totals is not None:
        return (totals.get(split) or {}).get("images", 0)
    return sum((counts.get(split) or {}).values())


def _checked(split: str, refit: bool = False) -> str:
    if split == "train":
        return "checked on the training images: the run had no validation or test split, so these scores are on " \
               "images the model trained on"
    if split == "validation" and refit:  # (92.9% where the model before the refit scored 28.6%, with no word)
        return "checked on the validation split, which the refit trained on: these scores are on images the " \
               "exported model trained on"
    return f"checked on the {split} split"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x * 100:.1f}%"  # NaN: no positive to rank


def _row(*cells) -> str:
    """A table row; a `|` inside a cell (a class named `a|b`) escaped, so that it stays one cell."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _code(text: str) -> str:
    """`text` as a Markdown code span, also when it holds backticks (fenced by one backtick more than its longest
    run of them, padded when it starts or ends with one)."""
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _table(header: list[str], rows: list[str]) -> str:
    return "\n".join([_row(*header), "|" + "---|" * len(header), *rows])


def _counts_table(classes: list[str], counts: dict[str, dict[str, int]],
                  totals: dict[str, dict[str, int]] | None) -> str:
    if totals is not None:  # multi-label: images carrying each label, then those carrying none, and all
        rows = [_row(c, *(counts[s].get(c, 0) for s in counts)) for c in classes]
        rows.append(_row("*(no label)*", *(totals[s]["unlabelled"] for s in counts)))
        rows.append(_row("**images**", *(totals[s]["images"] for s in counts)))
        return _table(["label", *counts], rows)
    rows = [_row(c, *(counts[s].get(c, 0) for s in counts)) for c in classes]
    rows.append(_row("**total**", *(sum(v.values()) for v in counts.values())))
    return _table(["class", *counts], rows)


def _predict_formats(formats: dict[str, dict]) -> str:
    """predict's `--format` choices this run has (it offered every format, those not exported too)."""
    others = [f for f, r in formats.items() if f != "saved_model" and "error" not in r]
    return f" [--format {'|'.join(others)}]" if others else ""


def _fallbacks(classes: list[str], thresholds: list[dict]) -> list[str]:
    """The labels whose threshold is the 0.5 fallback (no validation images, or none carrying the label)."""
    return [c for c, t in zip(classes, thresholds) if t.get("chosen_by") != "validation_f1"]


def _multi_results(reports: dict, per_label: dict[str, dict], split: str, fallbacks: list[str] = ()) -> str:
    """Multi-label: the splits' mAP, F1s and subset accuracy, then each label on the headline split, at thresholds
    chosen on validation but for `fallbacks` (the card said "chosen on validation" of a run without validation)."""
    rows = [_row(name, r["examples"], _pct(r["map"]), _pct(r["micro_f1"]), _pct(r["macro_f1"]),
                 _pct(r["subset_accuracy"]), f"{r['loss']:.3f}") for name, r in reports.items()]
    table = _table(["split", "images", "mAP", "micro-F1", "macro-F1", "subset accuracy", "loss"], rows)
    labels = [_row(c, v["support"], _pct(v["average_precision"]), _pct(v["precision"]), _pct(v["recall"]),
                   _pct(v["f1"]), f"{v['threshold']:.3f}") for c, v in per_label.items()]
    if fallbacks and len(fallbacks) == len(per_label):
        how = "at the fallback threshold 0.5 (no validation images carry the labels: none was chosen on them)"
    elif fallbacks:
        shown = ", ".join(_code(c) for c in fallbacks[:10]) + f", ... {len(fallbacks)} in all" * (len(fallbacks) > 10)
        how = f"at the thresholds chosen on validation, but 0.5 for {shown} (no validation image carries them)"
    else:
        how = "at the thresholds chosen on validation"
    return table + f"\n\nPer label on {split}, {how}:\n\n" + _table(
        ["label", "images with it", "average precision", "precision", "recall", "F1", "threshold"], labels)


def _recipe(train: dict, search: list[dict] = (), refit: dict | None = None,
            history: dict[str, list[dict]] | None = None, from_scratch: bool = False, validated: bool = True,
            tested: bool = True) -> str:
    """The recipe as it ran: with `history`, the epochs each phase trained (early stopping ends them before their
    maximum) and the best kept, the fine-tuning rate the search chose, and from scratch the single phase that trains
    every layer at the head's rate (the card gave the configured epochs and rates, which did not run)."""
    head, finetune = train["head"], train["finetune"]
    epochs, rate = recipe.finetune_schedule(head["epochs"], head["learning_rate"], finetune["epochs"],
                                            finetune["learning_rate"], from_scratch)
    rate = next((t["learning_rate"] for t in search if t["chosen"]), rate)
    unfreeze = "every layer, BatchNormalization included (from scratch)" if from_scratch else finetune["unfreeze"]
    head_line = "- head: none (from scratch: no pre-trained base to keep)" if from_scratch else \
        f"- head: {_epochs(head['epochs'], history, 'head', train)} at {head['learning_rate']:g} ({head['mode']}), " \
        f"augment: {head['augment']}"
    skipped = ["- train.refit was set but not done: it needs a single-label task, pre-trained weights, "
               "head.mode cached_features and a validation split (the log's 'refit skipped' says which was missing)"
               ] if train.get("refit") and not refit else []
    # From scratch BatchNormalization trains, so nothing is averaged, and no base is kept to decay the rate towards:
    # the card claimed both where they were set; with no fine-tuning epoch, it gave the settings of a phase that
    # did not run.
    finetune_line = "- fine-tuning: none (train.finetune.epochs: 0)" if epochs <= 0 else (
        f"- fine-tuning: {_epochs(epochs, history, 'finetune', train)} at {rate:g}, unfreeze: {unfreeze}, "
        f"augment: {finetune['augment']}"
        + (f", layer-wise rate decay to {finetune['layer_decay']:g} at the first layer"
           if finetune.get("layer_decay", 1.0) < 1.0 and not from_scratch else "")
        + (f", the weights' moving average over {finetune['average_epochs']:g} epochs validated and kept (exported)"
           if finetune.get("average_epochs", 0) > 0 and not from_scratch else ""))
    return "\n".join([*_search_lines(search), *_refit_lines(refit or {}, tested), *skipped, head_line, finetune_line,
        f"- batch {train['batch_size']}, seed {train['seed']}, early stopping on "
        f"{train['early_stopping_metric'] if validated else 'the training loss (no validation images)'} "
        f"(patience {train['early_stopping_patience']}), label smoothing {train['label_smoothing']}, "
        f"weight decay {train['weight_decay']}, schedule {train['lr_schedule']}, "
        f"class weights {train['class_weight']}",
    ])


def _epochs(at_most: int, history: dict[str, list[dict]] | None, phase: str, train: dict) -> str:
    """'4 epochs', or as trained: '3 epochs trained of at most 10, the best (epoch 2) kept'."""
    if history is None:
        return _plural(at_most, "epoch")
    records = history.get(phase)
    if not records:
        return "no epoch trained" + f" (at most {at_most})" * bool(at_most)
    best = recipe.best_epoch(train["early_stopping_metric"], records)
    kept = f", the best (epoch {best}) kept" if best and best != len(records) else ""
    return f"{_plural(len(records), 'epoch')} trained of at most {at_most}{kept}"


def _search_lines(search: list[dict]) -> list[str]:
    """train.search: the fine-tuning rate chosen on validation, and every trial's scores at its pause."""
    if not search:
        return []
    chosen = next(t for t in search if t["chosen"])
    second = "val_map" if "val_map" in chosen else "val_accuracy"
    scores = "; ".join(f"{t['learning_rate']:g}: val_loss {t['val_loss']:.4f}, {second} {t[second]:.4f} after "
                       f"{_plural(t['epochs'], 'epoch')}" for t in search)
    return [f"- fine-tuning learning rate **{chosen['learning_rate']:g}**, chosen on validation by train.search: "
            f"each rate trained from the head's weights, the best continued ({scores})"]


def _refit_lines(refit: dict, tested: bool = True) -> list[str]:
    """train.refit: what the exported model was trained on, and which model the validation row is (`tested`: a test
    split scored the exported model; without one, nothing did on images it had not trained on, where the card said
    it was "scored on test")."""
    if not refit:
        return []
    scored = "exported and scored on test" if tested else \
        "exported, and no test split scored it: nothing measured it on images it did not train on"
    return [f"- **refit on training + validation images**: once validation had chosen the epochs, the model was "
            f"trained again from the pre-trained base on both splits, the head {refit['head_epochs']} epochs and "
            f"the fine-tuning {refit['finetune_epochs']} epochs at {refit['learning_rate']:g}; this is the model "
            f"{scored}. The validation row is the model the choices were made with, before the refit (train.refit)"]


def _results_table(reports: dict) -> str:
    rows = [_row(name, r["examples"], _pct(r["accuracy"]), _pct(r["macro_f1"]), _pct(r["balanced_accuracy"]),
                 f"{r['loss']:.3f}") for name, r in reports.items()]
    return _table(["split", "images", "accuracy", "macro-F1", "balanced accuracy", "loss"], rows)


def _formats_table(formats: dict[str, dict]) -> str:
    rows = []
    score = "micro_f1" if any("micro_f1" in r for r in formats.values()) else "accuracy"  # micro-F1: multi-label
    for fmt, r in formats.items():
        if "error" in r:
            rows.append(_row(fmt, f"not written: {r['error']}", "", "", ""))
            continue
        agreement = "reference" if fmt == "saved_model" else _pct(r.get("agreement"))
        rows.append(_row(fmt, _pct(r[score]), agreement, f"{r['bytes'] / 1e6:.1f} MB",
                         f"{r['latency_ms_batch1']:.1f} ms"))
    agreement = "agreement with the SavedModel" + (" (label decisions)" if score == "micro_f1" else "")
    return _table(["format", "micro-F1" if score == "micro_f1" else "accuracy", agreement, "size",
                   "latency, 1 image, CPU"], rows)


def _format_drops(formats: dict[str, dict]) -> str:
    """A line for each format whose score fell past export.max_accuracy_drop (kept, flagged): the card showed only its
    number in the formats' table, the warning was in the logs and the flag in manifest.json."""
    lines = []
    for fmt, r in formats.items():
        if r.get("accuracy_drop_exceeded"):
            score = "micro_f1" if "micro_f1_drop" in r else "accuracy"
            lines.append(f"\n- `{fmt}` scores {_pct(r[score])} {score.replace('_', '-')}, "
                         f"{r[f'{score}_drop'] * 100:.1f} points below the SavedModel, past "
                         "export.max_accuracy_drop: prefer another format where that matters.")
    return "".join(lines)


def _limits(per_class: dict[str, dict], split: str, multi: bool = False) -> str:
    kind, why = ("label", "often missed on images that carry it") if multi else ("class", "its images are often "
                                                                                 "given another class")
    # A class with no image in the split has recall 0 there, which measures nothing: listed apart, not as weak.
    weak = sorted((v["recall"], c) for c, v in per_class.items() if v["support"] and v["recall"] < LOW_RECALL)
    absent = [c for c, v in per_class.items() if not v["support"]]
    # The weakest first, at most SHOWN of them: 1,000 classes gave 999 such lines (a card of 108 KB).
    lines = [f"- {_code(c)}: recall {_pct(recall)} on {split} ({why})." for recall, c in weak[:SHOWN]]
    if len(weak) > SHOWN:
        lines.append(f"- ... and {len(weak) - SHOWN} more {'labels' if multi else 'classes'} with a recall below "
                     f"{_pct(LOW_RECALL)} on {split} "
                     "(metrics.json has each).")
    if not weak:
        lines.append(f"- every {kind} {'measured ' * bool(absent)}has a recall of at least {_pct(LOW_RECALL)} on "
                     f"{split}.")
    if absent:
        shown = ", ".join(_code(c) for c in absent[:10]) + f", ... {len(absent)} in all" * (len(absent) > 10)
        lines.append(f"- not measured, no {split} image {'carries' if multi else 'of'} them: {shown}.")
    return "\n".join(lines)
