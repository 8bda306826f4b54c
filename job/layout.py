"""The dataset's layout, from a listing: splits, classes, files; and the seeded stratified split.

Pure logic, no TensorFlow: `<uri>/train/<class>/<image>`, optional `validation/` and `test/`
with the same class folders. Classes are the sorted folder names of train/.

Two shapes with one interface: `Layout` (single-label: each image in one class) and `MultiLayout`
(multi-label: each image carries a set of labels, maybe none; from a manifest or shards). What the
stages after staging call: `splits`, `counts`, `count`, `items`, `keys`, `nonempty`, `without`,
`carve`, `require_training_images`, `pick`.
"""

from __future__ import annotations

import random
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from job.errors import DataError

SPLITS = ("train", "validation", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif")  # .jpe, .jfif: JPEG files too
# Images in formats TensorFlow's decoders do not read (WebP they read only in part: not with an alpha channel, and an
# animated one can abort the process): left out of training, and said so, with the advice to convert them.
UNREAD_IMAGE_EXTENSIONS = (".webp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".ico",
                           ".pbm", ".pgm", ".ppm", ".pnm", ".psd", ".svg", ".dng", ".cr2", ".nef", ".arw")
# Top-level folder names that other tools and datasets use for a split: images under them would be ignored.
SPLIT_ALIASES = {"training": "train", "val": "validation", "valid": "validation", "validate": "validation",
                 "eval": "validation", "dev": "validation", "testing": "test", "tests": "test"}
# Folders of thumbnails that NAS boxes write beside each photo (Synology's `@eaDir`): near-copies of the photos, never
# training images; macOS's zip metadata (`__MACOSX`) holds `._name` files only.
JUNK_FOLDERS = ("@eaDir", "__MACOSX")


@dataclass
class Layout:
    """Files (relative paths) per split and class; `classes` in index order."""

    classes: list[str]
    files: dict[str, dict[str, list[str]]]  # split -> class -> relative paths
    ignored: list[str] = field(default_factory=list)  # objects that are not images in a class folder
    multi_label = False

    @property
    def splits(self) -> list[str]:
        return list(self.files)

    def keys(self) -> set[str]:
        """Every image of every split."""
        return {p for per in self.files.values() for ps in per.values() for p in ps}

    def without(self, bad: set[str]) -> Layout:
        return without(self, bad)

    def carve(self, fraction: float, seed: int) -> Layout:
        return split_validation(self, fraction, seed)

    def require_training_images(self, where: str) -> None:
        require_training_images(self, where)

    def pick(self, split: str, limit: int) -> list[str]:
        """Up to `limit` keys of a split, its classes in turn (int8 calibration): no class is left out."""
        per = list(self.files.get(split, {}).values())
        picked = [ks[i] for i in range(max(map(len, per), default=0)) for ks in per if i < len(ks)]
        return picked[:limit]

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {c: len(v) for c, v in per.items()} for s, per in self.files.items()}

    def count(self, split: str) -> int:
        """Images of a split (0 when it is absent); of several with `train+validation`."""
        return sum(sum(len(v) for v in self.files.get(s, {}).values()) for s in split.split("+"))

    def nonempty(self) -> Layout:
        """The layout without its empty splits: a split with no image is absent, not empty."""
        return Layout(self.classes, {s: per for s, per in self.files.items() if self.count(s)}, self.ignored)

    def items(self, split: str) -> tuple[list[str], list[int]]:
        """(paths, label indices) of one split, class by class in index order; `train+validation`: the splits one
        after the other (train.refit)."""
        if "+" in split:
            return joined(self, split)
        paths, labels = [], []
        for i, c in enumerate(self.classes):
            for p in self.files.get(split, {}).get(c, []):
                paths.append(p)
                labels.append(i)
        return paths, labels


def joined(listed: Layout | MultiLayout, splits: str) -> tuple[list[str], list]:
    """The items of `a+b`: a's, then b's."""
    keys, labels = [], []
    for split in splits.split("+"):
        k, y = listed.items(split)
        keys += k
        labels += y
    return keys, labels


def discover(rels: list[str], where: str) -> Layout:
    """Build the layout from object paths relative to the dataset root, or raise DataError."""
    found: dict[str, dict[str, list[str]]] = {}
    ignored = []
    for rel in rels:
        parts = rel.split("/")
        if "" in parts[:-1] and parts[0] in (*SPLITS, ""):
            raise DataError(f"{where}/{rel}: an empty folder name ('//') in the object's key; storage keeps it "
                            f"apart from the path with one '/', so its class would be wrong: rename the object")
        if parts[0] not in SPLITS or len(parts) < 2:
            continue
        if any(p.startswith(".") or p in JUNK_FOLDERS for p in parts):
            if _hidden_image(parts):  # left out, and said: a class folder named `.old` lost its images silently
                ignored.append(rel)
            continue
        split, cls = parts[0], parts[1]
        if len(parts) == 2:
            if parts[1]:  # a file directly under train/: belongs to no class (`train/` alone: a folder marker)
                ignored.append(rel)
            continue
        name = parts[-1]
        image = name.lower().endswith(IMAGE_EXTENSIONS)
        if not utf8(cls) or (image and not utf8(rel)):  # other files: ignored
            raise DataError(f"{where}/{raw_name(rel)}: {NOT_UTF8}, e.g. `convmv -r -f latin1 -t utf-8 --notest "
                            "<folder>`")
        per_class = found.setdefault(split, {}).setdefault(cls, [])
        if name == "":
            continue  # a "folder" marker object: the class exists, maybe empty
        if image:
            per_class.append(rel)
        else:
            ignored.append(rel)
    _refuse_split_aliases(rels, found, where)
    trained = {folded(c) for c in found.get("train", {})}  # `Validation/Cat/` beside `train/cat/` too
    ignored += [rel for rel in rels if _beside_the_splits(rel, trained)]
    if not rels:
        raise DataError(f"nothing under {where}: no such folder or prefix, or an empty one (expected "
                        f"{where}/train/<class>/<image>){_archive_hint([where.rpartition('/')[2]])}")
    if "train" not in found:
        raise DataError(f"no train/ folder with class folders under {where} (expected {where}/train/<class>/<image>"
                        f"{_no_train_hint(rels, where)})")
    classes = sorted(found["train"])
    if len(classes) < 2:
        raise DataError(f"{where}/train/ has {len(classes)} class folder(s); at least 2 are needed")
    _require_images("train", found["train"], where, unread_formats(ignored))
    for split, per in found.items():
        extra = sorted(set(per) - set(classes))
        if extra:  # a validation or test class folder lacking (or empty) is a class its scores do not measure
            missing = sorted(set(classes) - set(per))
            what = "; ".join(x for x in (f"missing {', '.join(map(shown, missing))}" if missing else "",
                                         f"not in train/: {', '.join(map(shown, extra))}") if x)
            raise DataError(f"{where}/{split}/: class folders differ from train/ ({what}){_alike(missing, extra)}")
    files = {s: {c: sorted(found[s].get(c, [])) for c in classes} for s in SPLITS if s in found}
    return Layout(classes, files, ignored)


# A local file name (or a tar member's) whose bytes are not UTF-8 is read with surrogate escapes (`caf\udce9`):
# writing it as UTF-8 (labels.txt, the dataset's digest, the log) failed with a traceback, exit 1.
NOT_UTF8 = ("a name that is not UTF-8 (Latin-1 or a Windows code page, as old zip files hold them): class names and "
            "records are UTF-8, so rename it in UTF-8")


def utf8(name: str) -> bool:
    """Whether a name is text, not surrogate-escaped bytes (`NOT_UTF8`)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def raw_name(name: str) -> str:
    """A name as its bytes read, those that are not UTF-8 as `\\xe9`."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _no_train_hint(rels: list[str], where: str) -> str:
    """Why there may be no train/: data.uri names a split folder or a class folder, or the class folders are at the
    top (Keras' `image_dataset_from_directory` layout)."""
    parent, _, last = where.rstrip("/").rpartition("/")
    tops = sorted({r.split("/")[0] for r in rels if r.count("/") == 1 and r.lower().endswith(IMAGE_EXTENSIONS)})
    if parent and (last in SPLITS or last.lower() in SPLIT_ALIASES) and tops:
        return f"; it looks like a split folder: set data.uri to {parent}, the folder that holds train/"
    archives = _archive_hint([r for r in rels if "/" not in r])
    if archives:
        return archives
    tars = sorted((r.split("/") for r in rels if r.count("/") == 1 and r.split("/")[0] in SPLITS
                   and r.lower().endswith(ARCHIVES[1:6])), key=lambda p: (SPLITS.index(p[0]), p[1]))
    tars = ["/".join(p) for p in tars]
    if tars:  # WebDataset's own names (imagenet-train-000000.tar): "no train/ folder", not a word of the tars
        return (f"; {tars[0]} looks like a tar shard: shards are read as <split>/shard-NNNNNN.tar (six digits), "
                "with classes.txt beside the split folders: rename them (or write them with finetune-job pack)")
    manifests = sorted(r for r in rels if "/" not in r and r.lower().endswith((".csv", ".jsonl", ".ndjson")))
    if manifests:
        return f"; {manifests[0]} looks like a manifest: set data.manifest to {where.rstrip('/')}/{manifests[0]}"
    if "train" in tops:  # Kaggle's cats-vs-dogs layout: train/cat.1.jpg
        return ("; train/ holds images but no class folders: put each class's images in train/<class>/ (a file "
                "name such as cat.1.jpg names no class), or list them with their labels in a manifest (data.manifest)")
    tops = [t for t in tops if t not in SPLITS]
    if tops:
        return f"; {', '.join(tops[:3])}{', ...' * (len(tops) > 3)} hold images: move the class folders into train/"
    if any("/" not in r and r.lower().endswith(IMAGE_EXTENSIONS) for r in rels):
        return "; images lie directly under it, as in a class folder: data.uri is the folder that holds train/"
    return ""


ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".7z", ".rar")


def _archive_hint(names: list[str]) -> str:
    """A hint when data.uri names an archive, or holds one at the top, as a dataset is often uploaded."""
    named = [n for n in names if n.lower().endswith(ARCHIVES)]
    if not named:
        return ""
    return (f"; {named[0]} is an archive: the job reads a folder per class, a manifest or tar shards "
            "(<split>/shard-NNNNNN.tar), not an archive of them: extract it into storage")


def _hidden_image(parts: list[str]) -> bool:
    """Whether a path under a split that the layout leaves out (a hidden name, a NAS's thumbnail folder) is an image a
    user may have meant to train on: not macOS's `._name` metadata nor a thumbnail (`JUNK_FOLDERS`)."""
    return (parts[-1].lower().endswith(IMAGE_EXTENSIONS) and not parts[-1].startswith("._")
            and not any(p in JUNK_FOLDERS for p in parts))


def metadata_file(path: str) -> bool:
    """Whether `path` is an operating system's metadata, never an image: macOS's AppleDouble `._name` (and its
    `__MACOSX/` folder in an unzipped archive) or a NAS's thumbnail folder (`JUNK_FOLDERS`)."""
    parts = path.split("/")
    return parts[-1].startswith("._") or any(p in JUNK_FOLDERS for p in parts[:-1])


def _beside_the_splits(rel: str, trained: set[str]) -> bool:
    """Whether `rel` is an image in a folder named like a training class (`trained`: their names as `folded`) under
    a top-level folder that is not a split (`holdout/cat/1.jpg`, `test.bak/cat/1.jpg`): ignored, and said so. A
    run's artifacts under the data (`runs/<run id>/curves.png`) are not in a class folder."""
    parts = rel.split("/")
    return (len(parts) >= 3 and parts[0] not in SPLITS and folded(parts[1]) in trained
            and not any(p.startswith(".") or p in JUNK_FOLDERS for p in parts)
            and parts[-1].lower().endswith(IMAGE_EXTENSIONS))


def _refuse_split_aliases(rels: list[str], found: dict[str, dict[str, list[str]]], where: str) -> None:
    """DataError for a top-level folder named like a split but not as the job reads it (`val/`, `Train/`,
    `testing/`) that holds images of the training classes (or of any class, when there is no train/): they would
    be silently ignored, the validation split carved from train instead. Other folders (a run's artifacts under
    `eval/<run id>/`) stay ignored."""
    aliased: dict[str, set[str]] = {}
    for rel in rels:
        parts = rel.split("/")
        if len(parts) >= 3 and parts[0] not in SPLITS and parts[-1].lower().endswith(IMAGE_EXTENSIONS):
            aliased.setdefault(parts[0], set()).add(parts[1])
    trained = {folded(c) for c in found.get("train", {})}  # `Validation/Cat/` beside `train/cat/`: meant as one
    for folder, classes in sorted(aliased.items()):
        name = folder.strip().lower()  # `validation ` with a space: the folder the user meant, misnamed
        split = SPLIT_ALIASES.get(name, name if name in SPLITS else None)
        if split and ({folded(c) for c in classes} & trained or split == "train" and not trained):
            fix = f"merge it into {split}/ or remove it" if split in found else f"rename it {split}/"
            raise DataError(f"{where}/{folder}/: the job reads the splits train/, validation/ and test/, so its "
                            f"images would be ignored; {fix}")


def _require_images(split: str, per: dict[str, list[str]], where: str, unread: dict | None = None) -> None:
    empty = sorted(c for c, files in per.items() if not files)
    if empty:
        hint = f" (the job reads {' '.join(IMAGE_EXTENSIONS)}; the dataset has {formats_named(unread)}: convert " \
            "them to JPEG or PNG)" if unread else ""
        raise DataError(f"{where}/{split}/: class folder(s) with no images: {', '.join(empty)}{hint}")


def unread_extension(name: str) -> str:
    """The extension (`.webp`) of a name that is an image in a format the job does not read, else ""."""
    stem, _, ext = name.rpartition("/")[2].rpartition(".")
    return "." + ext.lower() if stem and "." + ext.lower() in UNREAD_IMAGE_EXTENSIONS else ""


def unread_formats(names: list[str]) -> dict[str, int]:
    """{extension: count} of the names that are images in a format the job does not read (`.webp`, `.tiff`)."""
    counts = Counter(ext for ext in map(unread_extension, names) if ext)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def formats_named(counts: dict[str, int]) -> str:
    """`3 .webp, 1 .tiff`."""
    return ", ".join(f"{n} {ext}" for ext, n in counts.items())


def require_training_images(layout: Layout, where: str) -> None:
    """Every class has a training image (the rule of every dataset form: a class folder, a manifest's
    labels, a shard's classes.txt); DataError naming the classes that have none."""
    _require_images("train", layout.files.get("train", {c: [] for c in layout.classes}), where)


def case_clashes(classes: list[str]) -> list[tuple[str, ...]]:
    """Groups of class names that differ only in case (`Cat`, `cat`), in Unicode form (`café` composed, as most
    systems write it, and decomposed, as macOS file names come; a ligature `ﬁ`; full-width letters) or in spaces
    (a folder `cat ` beside `cat`, `ice  cream` beside `ice cream`): likely one class, named twice."""
    groups: dict[str, list[str]] = {}
    for c in classes:
        groups.setdefault(folded(c), []).append(c)
    return [tuple(g) for g in groups.values() if len(g) > 1]


def folded(name: str) -> str:
    """What a name looks like: case, Unicode form and spacing folded, and invisible format characters (a zero-width
    space, a byte-order mark, a soft hyphen: `cat\u200b` printed as `cat`, a third class beside `cat`) left out."""
    visible = "".join(ch for ch in unicodedata.normalize("NFKC", name) if unicodedata.category(ch) != "Cf")
    return " ".join(visible.casefold().split())


def numbers_in_text_order(classes: list[str]) -> bool:
    """Whether every class name is a whole number and their order is not the numbers' (`0, 1, 10, 2`, as sorted
    text): output column k is then not class k, which a client reading `probabilities[:, k]` as class k assumed."""
    numbers = [int(c) for c in classes if c.isascii() and c.isdigit()]
    return len(numbers) == len(classes) > 1 and numbers != sorted(numbers)


def lookalike(name: str, known) -> str:
    """A hint when `name` is one of `known` in another case, Unicode form or spacing (they print alike: a manifest's
    `cafe\u0301` beside classes.txt's `café`), else ""."""
    for group in case_clashes([name, *(k for k in known if k != name)]):
        if name in group:
            other = next(c for c in group if c != name)
            return f"; {ascii(name)} is {shown(other)} in another case, Unicode form or spacing"
    return ""


def _alike(missing: list[str], extra: list[str]) -> str:
    """A hint when a split's folder is a training class written in another case, Unicode form or spacing (a folder
    copied from macOS is decomposed: `cafe\u0301`), which prints exactly like it."""
    pairs = [(m, e) for group in case_clashes(missing + extra) for m in group if m in missing
             for e in group if e in extra]
    if not pairs:
        return ""
    return (f"; {shown(pairs[0][1])} is {shown(pairs[0][0])} in another case, Unicode form or spacing: rename the "
            "folder")


def shown(name: str) -> str:
    """A class name as messages and tables print it: escaped unless in canonical Unicode form with single spaces
    between words, so that look-alikes (`café` composed and decomposed, `cat` and `cat `) can be told apart."""
    plain = unicodedata.is_normalized("NFKC", name) and name == " ".join(name.split()) and not any(
        unicodedata.category(ch) == "Cf" for ch in name)
    return name if plain else ascii(name)


def broken_lines(classes: list[str]) -> list[str]:
    """The class names that hold a line break (`\n`, `\r`, or any other that str.splitlines splits at): labels.txt
    keeps one class per line, so each would shift the names of the classes after it."""
    return [c for c in classes if c and c.splitlines() != [c]]


def file_and_folder(keys: Iterable[str]) -> tuple[str, str] | None:
    """(key, key below it) of the first image whose key is also a folder of another's (`cat/x.png` and
    `cat/x.png/y.png`): storage holds both, a local copy cannot (it validated, then failed its run with exit 4)."""
    known = set(keys)
    for key in sorted(known):
        parts = key.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in known:
                return "/".join(parts[:i]), key
    return None


def identical(listed: Layout | MultiLayout, digests: dict[str, bytes | str]) -> dict:
    """What byte-identical images (same `digests`: key -> content hash) say about the dataset:
    `{split: n}` for validation and test, the images whose bytes are also a training image's (their scores
    overstate accuracy on new images; validation: early stopping and train.search too), `labelled_differently`,
    the groups of identical images that carry different labels (one of them is wrong), each a list of keys, and
    `copies_in_training`, the training images that repeat another of the same label (the same photo uploaded twice,
    say under two Unicode forms of its name: each copy weighs once more, without a word before)."""
    by_digest: dict[bytes | str, list[tuple[str, str, object]]] = {}
    for split in listed.splits:
        for key, label in zip(*listed.items(split)):
            if key in digests:
                by_digest.setdefault(digests[key], []).append((split, key, label))
    trained = {d for d, found in by_digest.items() if any(split == "train" for split, _, _ in found)}
    seen = {split: sum(1 for d, found in by_digest.items() if d in trained for s, _, _ in found if s == split)
            for split in listed.splits if split != "train"}
    clashes = [sorted(key for _, key, _ in found) for found in by_digest.values()
               if len({label for _, _, label in found}) > 1]
    copies = 0
    for found in by_digest.values():
        labels = [repr(label) for split, _, label in found if split == "train"]
        copies += len(labels) - len(set(labels))
    return {"in_training": {s: n for s, n in seen.items() if n}, "labelled_differently": sorted(clashes),
            "copies_in_training": copies}


def unmeasured(counts: dict[str, dict[str, int]], classes: list[str], images: dict[str, int]) -> dict[str, list[str]]:
    """For each split but train that has images (`images`: their number per split): the classes it has none of
    (multi-label: no image carrying the label), which its scores do not measure (for validation: early stopping and
    train.search neither). A multi-label split of images carrying no label at all was left out: its label counts sum
    to 0."""
    out = {}
    for split, per in counts.items():
        missing = [c for c in classes if not per.get(c)]
        if split != "train" and images.get(split) and missing:
            out[split] = missing
    return out


def split_validation(layout: Layout, fraction: float, seed: int) -> Layout:
    """Carve a stratified, seeded validation split out of train/ when validation/ holds no image (absent, or only
    empty class folders, as a console's "Create folder" leaves them).

    Each class keeps at least one training image; a class with 2+ images gives at least one to
    validation (when fraction > 0) so every class is measured.
    """
    if layout.count("validation") or fraction <= 0:
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


# ---------------------------------------------------------------- multi-label

FEW = 5  # `validate` warns about a label carried by fewer training images than this


@dataclass
class MultiLayout:
    """Multi-label: the images of each split with the label indices each carries (sorted; empty: none of
    the labels). `counts` are per label: how many images carry it."""

    classes: list[str]
    sets: dict[str, dict[str, tuple[int, ...]]]  # split -> key -> label indices
    ignored: list[str] = field(default_factory=list)
    multi_label = True

    @property
    def splits(self) -> list[str]:
        return list(self.sets)

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for split, per in self.sets.items():
            n = [0] * len(self.classes)
            for labels in per.values():
                for i in labels:
                    n[i] += 1
            out[split] = dict(zip(self.classes, n))
        return out

    def unlabelled(self, split: str) -> int:
        """Images of a split that carry no label."""
        return sum(1 for labels in self.sets.get(split, {}).values() if not labels)

    def count(self, split: str) -> int:
        return sum(len(self.sets.get(s, {})) for s in split.split("+"))

    def keys(self) -> set[str]:
        return {k for per in self.sets.values() for k in per}

    def items(self, split: str) -> tuple[list[str], list[tuple[int, ...]]]:
        """(keys in sorted order, label index tuples) of one split; `train+validation`: one after the other."""
        if "+" in split:
            return joined(self, split)
        per = self.sets.get(split, {})
        keys = sorted(per)
        return keys, [per[k] for k in keys]

    def nonempty(self) -> MultiLayout:
        return MultiLayout(self.classes, {s: per for s, per in self.sets.items() if per}, self.ignored)

    def without(self, bad: set[str]) -> MultiLayout:
        sets = {s: {k: v for k, v in per.items() if k not in bad} for s, per in self.sets.items()}
        return MultiLayout(self.classes, sets, self.ignored)

    def require_training_images(self, where: str) -> None:
        missing = [c for c, n in self.counts().get("train", {c: 0 for c in self.classes}).items() if not n]
        if missing:
            raise DataError(f"{where}: label(s) with no training image: {', '.join(missing)}")

    def carve(self, fraction: float, seed: int) -> MultiLayout:
        """A seeded validation split out of train when validation is absent, stratified per label (rarest label
        first, each label's images in a seeded order: about `fraction` of each label's images, and of the
        images with no label, go to validation); a move that would leave a label with no training image is
        skipped. The same split whatever order the images were listed in."""
        if self.count("validation") or fraction <= 0:
            return self
        train = self.sets["train"]
        order = sorted(train)
        random.Random(f"{seed}:multi").shuffle(order)
        groups: dict[int, list[str]] = {}  # label (-1: no label) -> keys in the seeded order
        for key in order:
            for label in train[key] or (-1,):
                groups.setdefault(label, []).append(key)
        wanted = {label: _validation_share(len(keys), fraction) for label, keys in groups.items()}
        left = {label: len(keys) for label, keys in groups.items()}  # training images carrying it
        val: set[str] = set()
        for label in sorted(groups, key=lambda g: (len(groups[g]), g)):
            # First the images whose other labels still want validation images too, then any: taking the first
            # images of each label's order whatever else they carried put 30 to 40% of a common label's images in
            # validation at a fraction of 0.2.
            for strict in (True, False):
                for key in groups[label]:
                    if wanted[label] <= 0:
                        break
                    labels = train[key] or (-1,)
                    if key in val or any(left[g] <= 1 and g != -1 for g in labels):
                        continue
                    if strict and any(wanted[g] <= 0 for g in labels if g != label):
                        continue
                    val.add(key)
                    for g in labels:
                        wanted[g] -= 1
                        left[g] -= 1
        sets = dict(self.sets, train={k: v for k, v in train.items() if k not in val},
                    validation={k: train[k] for k in sorted(val)})
        return MultiLayout(self.classes, {s: sets[s] for s in SPLITS if s in sets}, self.ignored)

    def pick(self, split: str, limit: int) -> list[str]:
        """Up to `limit` keys of a split, its labels in turn (then the unlabelled): no label is left out."""
        per: dict[int, list[str]] = {}
        for key, labels in sorted(self.sets.get(split, {}).items()):
            for label in labels or (-1,):
                per.setdefault(label, []).append(key)
        lists = [per[g] for g in sorted(per)]
        picked = dict.fromkeys(ks[i] for i in range(max(map(len, lists), default=0)) for ks in lists if i < len(ks))
        return list(picked)[:limit]


def _validation_share(n: int, fraction: float) -> int:
    """How many of n images go to validation: round(n * fraction), at least one of two or more."""
    return min(max(round(n * fraction), 1 if n >= 2 else 0), max(n - 1, 0))


def build(classes: list[str], found: dict[str, list[tuple[str, int | tuple[int, ...]]]], multi: bool):
    """The layout of (key, label) pairs per split (shards' samples): keys sorted, so the same whichever order
    they came in. `multi`: labels are index tuples."""
    if multi:
        return MultiLayout(classes, {s: {k: tuple(sorted(y)) for k, y in sorted(pairs)} for s, pairs in found.items()})
    files = {s: {c: [] for c in classes} for s in found}
    for split, pairs in found.items():
        for key, label in pairs:
            files[split][classes[label]].append(key)
    return Layout(classes, {s: {c: sorted(ks) for c, ks in per.items()} for s, per in files.items()})
