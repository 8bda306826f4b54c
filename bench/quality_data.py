"""The quality benchmark's data: transfer tasks written as image folders, and the source-pretrained base.

Everything comes from what is on this machine: Fashion-MNIST (Debian package `dataset-fashion-mnist`)
and shapes drawn by `job.sample_data`. The base is pre-trained on *source* classes and every task's
*target* classes are disjoint from them, so each task is a transfer to classes the base never saw.
One task is multi-label: 2x2 mosaics of target items and blanks, each image labelled with the set of
target classes in it, the labels in a `labels.jsonl` manifest.

No TensorFlow at import: the driver (bench/quality.py) only writes files; pre-training runs in a
process of its own.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t_shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")
# Each target class has relatives among the source classes (tops: pullover and dress; shoes: sandal), as
# ImageNet has relatives of most users' classes, but none is seen in pre-training. Three of the targets
# (coat, shirt, t-shirt) are the classes Fashion-MNIST models confuse most.
SOURCE = ("trouser", "pullover", "dress", "sandal", "bag")
TARGET = ("ankle_boot", "coat", "shirt", "sneaker", "t_shirt")
MINORITY = "shirt"  # the imbalanced task's rare class: the hardest one
SHAPES_TARGET = ("circle", "square", "triangle", "cross", "ring", "bar")
# The multi-label mosaics: 2x2 cells, each blank (black) or one Fashion-MNIST item of a target class. A cell is
# the item resized from 28x28 to 32x32 as the base's pre-training images are (`source_images`), so the base sees
# each item at the scale it learnt on, and a 64x64 mosaic gives MobileNetV2 (stride 32) one feature per cell.
MOSAIC_CELL = 32
MOSAIC_BLANK = 0.5  # chance that a cell is blank: 1/16 of the images have no label, a label is in ~1/3 of them
MANIFEST = "labels.jsonl"


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "fashion" | "shapes" | "mosaic" (multi-label)
    train: int  # training images per class ("mosaic": training images in all)
    validation: int  # validation images per class ("mosaic": in all)
    test: int  # test images per class ("mosaic": in all)
    minority: int = 0  # > 0: MINORITY gets this many training images (imbalanced target)
    classes: tuple[str, ...] = field(default=TARGET)
    note: str = ""

    @property
    def multi_label(self) -> bool:
        return self.kind == "mosaic"

    def per_class_train(self) -> dict[str, int]:
        return {c: (self.minority if self.minority and c == MINORITY else self.train) for c in self.classes}


def tasks(quick: bool) -> list[Task]:
    if quick:
        return [Task("fashion-8", "fashion", 8, 4, 6, classes=TARGET[1:4], note="quick mode")]
    return [
        Task("fashion-15", "fashion", 15, 5, 200, note="15 images per class"),
        Task("fashion-60", "fashion", 60, 15, 200, note="60 images per class"),
        Task("fashion-300", "fashion", 300, 75, 200, note="300 images per class"),
        Task("fashion-60-imbalanced", "fashion", 60, 15, 200, minority=12,
             note=f"{MINORITY} has 12 training images, the others 60"),
        Task("shapes-60", "shapes", 60, 15, 100, classes=SHAPES_TARGET,
             note="drawn shapes in random colours: a different kind of image from the source"),
    ]


def multilabel_tasks(quick: bool) -> list[Task]:
    """The multi-label task (comparison only, not the ablation): sized for a few minutes per run on 2 cores."""
    if quick:
        return [Task("fashion-multilabel-quick", "mosaic", 24, 12, 12, classes=TARGET[1:4], note="quick mode")]
    return [Task("fashion-multilabel", "mosaic", 300, 100, 300,
                 note="2x2 mosaics of target items and blanks (64x64), labels: the classes present")]


def _idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


def load_fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels uint8 [n]) of Fashion-MNIST's `train` or `t10k` split."""
    images = _idx(FASHION_DIR / f"{split}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _idx(FASHION_DIR / f"{split}-labels-idx1-ubyte.gz", 8)
    return images, labels


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _fashion_files(task: Task, seed: int) -> dict[str, bytes]:
    """{relative path: PNG bytes}; train and validation from Fashion-MNIST's train split, test from t10k."""
    rng = np.random.default_rng(seed)
    files = {}
    train_x, train_y = load_fashion("train")
    test_x, test_y = load_fashion("t10k")
    for c in task.classes:
        label = FASHION_CLASSES.index(c)
        pool = rng.permutation(np.flatnonzero(train_y == label))
        n_train = task.per_class_train()[c]
        picks = {"train": pool[:n_train], "validation": pool[n_train:n_train + task.validation],
                 "test": rng.permutation(np.flatnonzero(test_y == label))[:task.test]}
        for split, idx in picks.items():
            source = test_x if split == "test" else train_x
            for i in idx:
                files[f"{split}/{c}/{c}_{int(i):05d}.png"] = _png(source[i])
    return files


def _shapes_files(task: Task, seed: int) -> dict[str, bytes]:
    from job.sample_data import draw

    rng = random.Random(seed)
    files = {}
    for c in task.classes:
        counts = {"train": task.per_class_train()[c], "validation": task.validation, "test": task.test}
        for split, n in counts.items():
            for i in range(n):
                buf = io.BytesIO()
                draw(c, None, 32, rng).save(buf, "PNG")
                files[f"{split}/{c}/{c}_{i:05d}.png"] = buf.getvalue()
    return files


def _cell(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((MOSAIC_CELL, MOSAIC_CELL), Image.BILINEAR))


def _mosaic_grid(task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """{split: [n, 4] class index of each cell, -1 for a blank}."""
    n = len(task.classes)
    p = [MOSAIC_BLANK] + [(1 - MOSAIC_BLANK) / n] * n
    counts = {"train": task.train, "validation": task.validation, "test": task.test}
    return {split: rng.choice(n + 1, size=(count, 4), p=p) - 1 for split, count in counts.items()}


def _mosaic_files(task: Task, seed: int) -> tuple[dict[str, bytes], list[dict]]:
    """({relative path: PNG bytes}, manifest rows): every item drawn once, train and validation from
    Fashion-MNIST's train split, test from t10k."""
    rng = np.random.default_rng(seed)
    grid = _mosaic_grid(task, rng)
    train_x, train_y = load_fashion("train")
    test_x, test_y = load_fashion("t10k")
    items = {}
    for k, c in enumerate(task.classes):
        label = FASHION_CLASSES.index(c)
        pool = rng.permutation(np.flatnonzero(train_y == label))
        n_train = int((grid["train"] == k).sum())
        items["train", k] = iter(pool[:n_train])
        items["validation", k] = iter(pool[n_train:])
        items["test", k] = iter(rng.permutation(np.flatnonzero(test_y == label)))
    files, rows = {}, []
    for split, cells in grid.items():
        source = test_x if split == "test" else train_x
        for i, row in enumerate(cells):
            image = np.zeros((2 * MOSAIC_CELL, 2 * MOSAIC_CELL), np.uint8)
            for j, k in enumerate(row):
                if k >= 0:
                    y, x = divmod(j, 2)
                    image[y * MOSAIC_CELL:(y + 1) * MOSAIC_CELL, x * MOSAIC_CELL:(x + 1) * MOSAIC_CELL] = \
                        _cell(source[next(items[split, k])])
            rel = f"{split}/{i:05d}.png"
            files[rel] = _png(image)
            rows.append({"path": rel, "labels": sorted({task.classes[k] for k in row if k >= 0}), "split": split})
    _check_labels(task, rows)
    return files, rows


def _check_labels(task: Task, rows: list[dict]) -> None:
    """Average precision needs a positive and a negative of every label in every split."""
    counts = label_counts(rows)
    for split in ("train", "validation", "test"):
        n = sum(r["split"] == split for r in rows)
        bad = [c for c in task.classes if not 0 < counts.get(split, {}).get(c, 0) < n]
        if bad:
            raise ValueError(f"{task.name}: no positive or no negative of {bad} in {split}; change the sizes or seed")


def label_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    """{split: {label: images with it}} of manifest rows."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        split = out.setdefault(r["split"], {})
        for c in r["labels"]:
            split[c] = split.get(c, 0) + 1
    return {s: {c: out[s].get(c, 0) for c in sorted({c for r in rows for c in r["labels"]})} for s in out}


def read_manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines() if line.strip()]


def write_task(task: Task, root: Path, seed: int = 0) -> Path:
    """The task's images under root/<task>/{train,validation,test}/<class>/, once (kept between runs); a
    multi-label task's under root/<task>/{train,validation,test}/, with their labels in root/<task>/labels.jsonl."""
    folder = root / task.name
    stamp = folder / ".task.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == _stamp(task, seed):
        return folder
    rows = None
    if task.multi_label:
        files, rows = _mosaic_files(task, seed)
    else:
        files = (_fashion_files if task.kind == "fashion" else _shapes_files)(task, seed)
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    if rows is not None:
        (folder / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in rows))
    stamp.write_text(json.dumps(_stamp(task, seed)))
    return folder


def _stamp(task: Task, seed: int) -> dict:
    """What the files were made from, as JSON reads it back (tuples are lists there)."""
    made = {**asdict(task), "seed": seed}
    if task.multi_label:
        made |= {"cell": MOSAIC_CELL, "blank": MOSAIC_BLANK}
    return json.loads(json.dumps(made))


def source_images(per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The pre-training set: `per_class` Fashion-MNIST training images of each SOURCE class, as RGB 32x32."""
    train_x, train_y = load_fashion("train")
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(np.flatnonzero(train_y == FASHION_CLASSES.index(c)))[:per_class]
                          for c in SOURCE])
    labels = np.concatenate([[k] * per_class for k in range(len(SOURCE))])
    images = np.stack([np.asarray(Image.fromarray(train_x[i]).convert("RGB").resize((32, 32), Image.BILINEAR))
                       for i in idx])
    return images, labels.astype(np.int32)


def source_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
