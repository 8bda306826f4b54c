"""Classification metrics from predicted probabilities, and the two plots. NumPy and matplotlib only."""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

import numpy as np

EPS = 1e-7


def loss_and_accuracy(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean sparse categorical cross-entropy and accuracy."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    picked = np.clip(probs[np.arange(len(labels)), labels], EPS, 1.0)
    return float(-np.log(picked).mean()), float((probs.argmax(-1) == labels).mean())


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, predicted), 1)
    return cm


def report(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """accuracy, loss, per-class precision/recall/f1/support and the confusion matrix."""
    loss, accuracy = loss_and_accuracy(probs, labels)
    cm = confusion_matrix(labels, probs.argmax(-1) if len(labels) else labels, len(classes))
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(0).astype(float)
    support = cm.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    # A class the split lacks has no recall, and one neither in the split nor predicted no score at all: null, as
    # multi-label's (0.0 read as a class always missed)
    per_class = {
        c: {"precision": float(precision[i]) if support[i] or predicted[i] else None,
            "recall": float(recall[i]) if support[i] else None,
            "f1": float(f1[i]) if support[i] or predicted[i] else None, "support": int(support[i])}
        for i, c in enumerate(classes)
    }
    return {
        "examples": int(len(labels)),
        "accuracy": accuracy,
        "loss": loss,
        # Over the classes the split has or that were predicted (scikit-learn's): a class that validation/ or
        # test/ lacks, predicted as nothing, has no F1; counted as 0 it held a split of every image right below 1.
        "macro_f1": float(f1[(support > 0) | (predicted > 0)].mean()) if len(labels) else 0.0,
        # Mean recall over the classes present: accuracy that an imbalanced split cannot inflate.
        "balanced_accuracy": float(recall[support > 0].mean()) if (support > 0).any() else 0.0,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def plot_curves(history: dict[str, list[dict]], path: Path) -> None:
    """Loss and accuracy per epoch for both phases on one time axis, the phase boundary marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for phase, records in history.items():
        if not records:
            continue
        x = [offset + r["epoch"] for r in records]
        for ax, key in zip(axes, ("loss", "accuracy")):
            ax.plot(x, [r[key] for r in records], marker="o", label=f"{phase} train")
            if any("val_" + key in r for r in records):  # (a run resumed across versions: some epochs lack it,
                # and the export failed with KeyError on every attempt; a gap in the line there)
                values = [r.get("val_" + key, float("nan")) for r in records]
                ax.plot(x, [float("nan") if v is None else v for v in values], marker="s", linestyle="--",
                        label=f"{phase} validation")
        if offset:
            for ax in axes:
                ax.axvline(offset + 0.5, color="grey", linestyle=":")
                ax.text(offset + 0.55, ax.get_ylim()[1], f" {phase}", va="top", color="grey")
        offset += len(records)
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("epoch (both phases)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# The confusion matrix plot stays readable and bounded: 0.5 inch a class up to 60 classes (class names on the
# axes, counts in the cells up to 30), then one figure of at most 32 x 32 inches at 100 dpi (3,200 pixels a side)
# with class indices on the axes. It grew without bound before: 300 classes took 7.4 GB and 35 s after training.
# A class name longer than 30 characters is shortened on the axes (labels.txt has it whole).
NAMED_CLASSES, COUNTED_CLASSES, MAX_INCHES, NAME_CHARS = 60, 30, 32.0, 30


def axis_name(name: str) -> str:
    """A class name as the confusion matrix plot shows it: at most NAME_CHARS characters."""
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 1] + "…"


GLYPH = re.compile(r"Glyph (\d+) .*missing from font")


@contextlib.contextmanager
def drawing_class_names(plot: str):
    """Inside, text is drawn as written: matplotlib read the text between two `$` as mathematics, so a class named
    `cost_$1_to_$5` failed the run after training (ParseSyntaxException, exit 1, and again at every rerun).

    Its font has no glyphs for many scripts (CJK, Thai, ...): it draws such class names as boxes and warned on
    stderr once per glyph and call, raw lines amid the JSON log. One log record instead, naming the characters;
    other warnings pass as they were."""
    import matplotlib

    with warnings.catch_warnings(record=True) as caught, matplotlib.rc_context({"text.parse_math": False}):
        warnings.simplefilter("always")
        yield
    missing = set()
    for w in caught:
        glyph = GLYPH.match(str(w.message))
        if glyph:
            missing.add(chr(int(glyph.group(1))))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if missing:
        from job import logs

        logs.get().warning("class names drawn with boxes in a plot: its font has no glyph for these characters",
                           plot=plot, characters="".join(sorted(missing)))


def plot_confusion(cm: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    with drawing_class_names(path.name):
        _plot_confusion(cm, classes, path, title)


def _plot_confusion(cm: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm, n = np.asarray(cm), len(classes)
    size = min(MAX_INCHES, max(4.0, 0.5 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues", interpolation="nearest")
    if n <= NAMED_CLASSES:
        names = [axis_name(c) for c in classes]
        ax.set_xticks(range(n), names, rotation=45, ha="right")
        ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted" if n <= NAMED_CLASSES else "predicted (class index, as in labels.txt)")
    ax.set_ylabel("true" if n <= NAMED_CLASSES else "true (class index)")
    ax.set_title(title)
    if n <= COUNTED_CLASSES:
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
