"""The dataset's layout, from a listing: splits, classes, files; and the seeded stratified split.

Pure logic, no TensorFlow: `<uri>/train/<class>/<image>`, optional `validation/` and `test/`
with the same class folders. Classes are the sorted folder names of train/.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from job.errors import DataError

SPLITS = ("train", "validation", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


@dataclass
class Layout:
    """Files (relative paths) per split and class; `classes` in index order."""

    classes: list[str]
    files: dict[str, dict[str, list[str]]]  # split -> class -> relative paths
    ignored: list[str] = field(default_factory=list)  # objects that are not images in a class folder

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {c: len(v) for c, v in per.items()} for s, per in self.files.items()}

    def count(self, split: str) -> int:
        """Images of a split (0 when it is absent)."""
        return sum(len(v) for v in self.files.get(split, {}).values())

    def nonempty(self) -> Layout:
        """The layout without its empty splits: a split with no image is absent, not empty."""
        return Layout(self.classes, {s: per for s, per in self.files.items() if self.count(s)}, self.ignored)

    def items(self, split: str) -> tuple[list[str], list[int]]:
        """(paths, label indices) of one split, class by class in index order."""
        paths, labels = [], []
        for i, c in enumerate(self.classes):
            for p in self.files.get(split, {}).get(c, []):
                paths.append(p)
                labels.append(i)
        return paths, labels


def discover(rels: list[str], where: str) -> Layout:
    """Build the layout from object paths relative to the dataset root, or raise DataError."""
    found: dict[str, dict[str, list[str]]] = {}
    ignored = []
    for rel in rels:
        parts = rel.split("/")
        if parts[0] not in SPLITS or len(parts) < 2 or any(p.startswith(".") for p in parts):
            continue
        split, cls = parts[0], parts[1]
        if len(parts) == 2:
            ignored.append(rel)  # a file directly under train/: belongs to no class
            continue
        per_class = found.setdefault(split, {}).setdefault(cls, [])
        name = parts[-1]
        if name == "":
            continue  # a "folder" marker object: the class exists, maybe empty
        if name.lower().endswith(IMAGE_EXTENSIONS):
            per_class.append(rel)
        else:
            ignored.append(rel)
    if "train" not in found:
        raise DataError(f"no train/ folder with class folders under {where} (expected {where}/train/<class>/<image>)")
    classes = sorted(found["train"])
    if len(classes) < 2:
        raise DataError(f"{where}/train/ has {len(classes)} class folder(s); at least 2 are needed")
    for split, per in found.items():
        _require_images(split, per, where)
        if split != "train" and sorted(per) != classes:
            missing = sorted(set(classes) - set(per))
            extra = sorted(set(per) - set(classes))
            what = "; ".join(
                x for x in (f"missing {', '.join(missing)}" if missing else "",
                            f"not in train/: {', '.join(extra)}" if extra else "") if x
            )
            raise DataError(f"{where}/{split}/: class folders differ from train/ ({what})")
    files = {s: {c: sorted(found[s][c]) for c in classes} for s in SPLITS if s in found}
    return Layout(classes, files, ignored)


def _require_images(split: str, per: dict[str, list[str]], where: str) -> None:
    empty = sorted(c for c, files in per.items() if not files)
    if empty:
        raise DataError(f"{where}/{split}/: class folder(s) with no images: {', '.join(empty)}")


def require_training_images(layout: Layout, where: str) -> None:
    """Every class has a training image (the rule of every dataset form: a class folder, a manifest's
    labels, a shard's classes.txt); DataError naming the classes that have none."""
    _require_images("train", layout.files.get("train", {c: [] for c in layout.classes}), where)


def case_clashes(classes: list[str]) -> list[tuple[str, ...]]:
    """Groups of class names that differ only in case (`Cat`, `cat`): likely one class, named twice."""
    groups: dict[str, list[str]] = {}
    for c in classes:
        groups.setdefault(c.casefold(), []).append(c)
    return [tuple(g) for g in groups.values() if len(g) > 1]


def split_validation(layout: Layout, fraction: float, seed: int) -> Layout:
    """Carve a stratified, seeded validation split out of train/ when validation/ is absent.

    Each class keeps at least one training image; a class with 2+ images gives at least one to
    validation (when fraction > 0) so every class is measured.
    """
    if "validation" in layout.files or fraction <= 0:
        return layout
    train, val = {}, {}
    for c in layout.classes:
        files = sorted(layout.files["train"][c])  # the same split whatever order the files were listed in
        random.Random(f"{seed}:{c}").shuffle(files)
        n_val = round(len(files) * fraction)
        n_val = min(max(n_val, 1 if len(files) >= 2 else 0), len(files) - 1)
        val[c], train[c] = sorted(files[:n_val]), sorted(files[n_val:])
    files = dict(layout.files, train=train, validation=val)
    return Layout(layout.classes, {s: files[s] for s in SPLITS if s in files}, layout.ignored)


def without(layout: Layout, bad: set[str]) -> Layout:
    """The layout minus undecodable files."""
    files = {s: {c: [p for p in ps if p not in bad] for c, ps in per.items()} for s, per in layout.files.items()}
    return Layout(layout.classes, files, layout.ignored)
