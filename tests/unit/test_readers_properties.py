"""Property-based tests of the readers (job/readers.py) over generated datasets, without TensorFlow.

A dataset is generated as (image bytes, class, split) triples laid out as a folder per class: class names
with spaces, punctuation, non-ASCII letters and case variants, images in nested folders, the same file
names in several classes, single-image classes, train with optional validation and test. Read as a folder,
packed into shards (copied and streamed), or described by a CSV or JSON-lines manifest, it reads back as
exactly the triples generated. Invalid datasets fail with the documented DataErrors. No image is decoded
(checks=None), so the bytes are arbitrary.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import tar_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

from job import readers, sources
from job.config import Config
from job.errors import DataError
from job.pack import pack

SETTINGS = settings(max_examples=20, deadline=None)
# No '/', NUL or line breaks; spaces, CSV-hostile commas and quotes, non-ASCII letters, case variants.
CHARS = "aAbBzZ09 é猫ßΩ,'\"-_()+:#%"
EXTENSIONS = (".jpg", ".JPG", ".jpeg", ".png", ".Png", ".bmp", ".gif")
SIZE = (8, 8)


def _name(chars: str, max_size: int) -> st.SearchStrategy[str]:
    # Strip-stable: classes.txt lines and manifest fields are stripped (test_pack_keeps_surrounding_spaces
    # covers names that are not).
    return st.text(chars, min_size=1, max_size=max_size).filter(lambda s: s == s.strip() and not s.startswith("."))


# Case variants are two classes on a case-sensitive filesystem (and in S3).
class_names = st.one_of(st.sampled_from(["cat", "Cat", "ÉTÉ", "été", "a, \"b\"", "x y"]), _name(CHARS + ".", 10))
folder_names = _name(CHARS, 6)  # no dot: never equal to an image file's name
file_names = st.tuples(st.one_of(st.sampled_from(["0001", "img 1", "photo.v2"]), _name(CHARS + ".", 6)),
                       st.sampled_from(EXTENSIONS)).map("".join)
images = st.lists(st.tuples(st.lists(folder_names, max_size=2).map(tuple), file_names, st.binary(max_size=40)),
                  min_size=1, max_size=3, unique_by=lambda f: f[0] + (f[1],))


@st.composite
def datasets(draw, min_classes: int = 2, max_classes: int = 4):
    """{"classes": [...], "files": {relative path: (bytes, class, split)}, "noise": [relative paths]}."""
    classes = draw(st.lists(class_names, min_size=min_classes, max_size=max_classes, unique=True))
    splits = ["train"] + [s for s in ("validation", "test") if draw(st.booleans())]
    files = {}
    for split in splits:
        for c in classes:
            for folders, name, data in draw(images):
                files["/".join((split, c, *folders, name))] = (data, c, split)
    noise = draw(st.lists(st.sampled_from(
        ["train/README.md", f"train/{classes[0]}/notes.txt", f"train/{classes[-1]}/.DS_Store",
         f"train/{classes[0]}/.thumbs/x.jpg", "other/x.jpg", ".hidden/train/a/x.jpg"]), unique=True))
    return {"classes": classes, "files": files, "noise": noise}


def write(root: Path, dataset: dict) -> None:
    for rel, (data, _, _) in dataset["files"].items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for rel in dataset["noise"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"not an image of the dataset")


def expected(dataset: dict) -> Counter:
    return Counter(dataset["files"].values())


@contextlib.contextmanager
def fresh(tmp_path_factory):
    """A new folder per generated example (hypothesis reuses a test's tmp_path across examples)."""
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as tmp:
        yield Path(tmp)


def config(uri: Path, work: Path, manifest: str = "") -> Config:
    return Config.model_validate({"data": {"uri": str(uri), "manifest": manifest},
                                  "output": {"uri": str(work / "out")}, "model": {"weights": "none"}})


def stage(uri: Path, work: Path, mode: str = "copy", manifest: str = "") -> readers.Reader:
    source = sources.open_source(config(uri, work, manifest))
    reader = readers.create(source, mode, readers.Staging(work / "cache", work / "images", SIZE))
    assert reader.mode == mode
    return reader


def read(uri: Path, work: Path, mode: str = "copy", manifest: str = "", seed: int = 0) -> tuple[Counter, list[str]]:
    """The (image bytes, class, split) multiset a reader gives, settled without carving; and its classes."""
    reader = stage(uri, work, mode, manifest).settle(0.0, seed)
    got = Counter()
    for split in reader.layout.files:
        keys = []
        for key, image, label in reader.samples(split):
            got[(image, reader.layout.classes[label], split)] += 1
            keys.append(key)
        assert keys == sorted(set(keys))  # each key once, in key order
        assert Counter(reader.layout.items(split)[1]) == Counter(
            reader.layout.classes.index(c) for _, c, s in got.elements() if s == split)
    return got, reader.layout.classes


# ---------------------------------------------------------------- the round trips


@SETTINGS
@given(dataset=datasets(), seed=st.integers(0, 2**16))
def test_folder_reads_as_generated(tmp_path_factory, dataset, seed):
    with fresh(tmp_path_factory) as tmp:
        write(tmp / "data", dataset)
        got, classes = read(tmp / "data", tmp, seed=seed)
        assert classes == sorted(dataset["classes"])
        assert got == expected(dataset)


@SETTINGS
@given(dataset=datasets(), shard_size=st.integers(1, 4000), seed=st.integers(0, 2**16))
def test_folder_packed_into_shards_reads_as_generated(tmp_path_factory, dataset, shard_size, seed):
    with fresh(tmp_path_factory) as tmp:
        write(tmp / "data", dataset)
        result = pack(str(tmp / "data"), str(tmp / "shards"), shard_size, seed=seed)
        assert result["classes"] == sorted(dataset["classes"])
        for mode in ("copy", "stream"):
            got, classes = read(tmp / "shards", tmp / mode, mode, seed=seed)
            assert classes == sorted(dataset["classes"])
            assert got == expected(dataset), mode


def csv_manifest(rows: list[tuple[str, str, str | None]], with_split: bool, bom: bool) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)  # quotes the commas and quotes of class names and paths
    writer.writerow(["path", "label", "split"] if with_split else ["path", "label"])
    for path, label, split in rows:
        writer.writerow([path, label, split] if with_split else [path, label])
    return ("\ufeff" if bom else "").encode() + buf.getvalue().encode()


def jsonl_manifest(rows: list[tuple[str, str, str | None]], with_split: bool, ascii_only: bool) -> bytes:
    lines = []
    for path, label, split in rows:
        row = {"path": path, "label": label}
        if with_split and (split != "train" or ascii_only):  # a train row may leave its split out
            row["split"] = split
        lines.append(json.dumps(row, ensure_ascii=ascii_only))
    return ("\n".join(lines) + "\n").encode()


@SETTINGS
@given(dataset=datasets(), kind=st.sampled_from(["labels.csv", "labels.jsonl"]), flag=st.booleans(),
       split_column=st.booleans(), order=st.randoms(use_true_random=False))
def test_manifest_reads_as_generated(tmp_path_factory, dataset, kind, flag, split_column, order):
    # The images under images/ (no train/ folder: the manifest alone says the classes and splits).
    with fresh(tmp_path_factory) as tmp:
        write(tmp / "data" / "images", dataset)
        rows = [(f"images/{rel}", c, s) for rel, (_, c, s) in dataset["files"].items()]
        order.shuffle(rows)
        with_split = split_column or any(s != "train" for _, _, s in rows)  # without it, every row is train
        text = csv_manifest(rows, with_split, bom=flag) if kind.endswith(".csv") else jsonl_manifest(
            rows, with_split, ascii_only=flag)
        (tmp / "data" / kind).write_bytes(text)
        got, classes = read(tmp / "data", tmp, manifest=str(tmp / "data" / kind))
        assert classes == sorted(dataset["classes"])
        assert got == expected(dataset)


# ---------------------------------------------------------------- invalid datasets: the documented errors


def refused(uri: Path, work: Path, manifest: str = "") -> str:
    with pytest.raises(DataError) as e:
        stage(uri, work, manifest=manifest).settle(0.0, 0)
    return str(e.value)


@SETTINGS
@given(dataset=datasets(), empty=class_names, content=st.sampled_from(["notes.txt", "sub/notes.txt", "sub/x.jpg/"]))
def test_a_train_class_folder_without_images_is_refused(tmp_path_factory, dataset, empty, content):
    if empty in dataset["classes"]:
        return
    with fresh(tmp_path_factory) as tmp:  # train only: another split would lack the class (checked first)
        write(tmp / "data", {"files": {r: v for r, v in dataset["files"].items() if v[2] == "train"}, "noise": []})
        path = tmp / "data/train" / empty / content
        if content.endswith("/"):  # a folder named like an image, holding a file that is not one
            path = path / "notes"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"no image")
        assert f"/train/: class folder(s) with no images: {empty}" in refused(tmp / "data", tmp)


def test_an_empty_train_class_folder_is_refused(tmp_path):
    # The local form of an S3 folder marker `train/c/` (test_layout): an empty directory is a class
    # folder with no images, not a class that does not exist.
    for c in ("cat", "dog"):
        (tmp_path / "data/train" / c).mkdir(parents=True)
        (tmp_path / "data/train" / c / "1.jpg").write_bytes(b"J")
    (tmp_path / "data/train/empty").mkdir()
    assert "/train/: class folder(s) with no images: empty" in refused(tmp_path / "data", tmp_path)


@SETTINGS
@given(dataset=datasets(min_classes=1, max_classes=1),
       kind=st.sampled_from(["", "labels.csv", "labels.jsonl"]))
def test_fewer_than_two_classes_are_refused(tmp_path_factory, dataset, kind):
    with fresh(tmp_path_factory) as tmp:
        write(tmp / "data", dataset)
        manifest = ""
        if kind:
            rows = [(rel, c, s) for rel, (_, c, s) in dataset["files"].items()]
            maker = csv_manifest if kind.endswith(".csv") else jsonl_manifest
            (tmp / kind).write_bytes(maker(rows, True, False))
            manifest = str(tmp / kind)
        assert "at least 2 are needed" in refused(tmp / "data", tmp, manifest)


@SETTINGS
@given(dataset=datasets(), split=st.sampled_from(["validation", "test"]), extra=class_names, drop=st.booleans())
def test_a_split_with_a_class_train_lacks_is_refused_and_one_lacking_a_class_is_read(tmp_path_factory, dataset,
                                                                                       split, extra, drop):
    """A validation or test split that names a class train/ lacks is refused, as a folder and as a manifest; one
    that lacks a training class (or has it as an empty folder) reads as written, as a manifest's split may: its
    scores do not measure that class (a warning). Before, no folder dataset could run with such a split."""
    if extra in dataset["classes"]:
        return
    with fresh(tmp_path_factory) as tmp:
        files = {rel: v for rel, v in dataset["files"].items() if v[2] != split}
        for rel, (data, c, s) in dataset["files"].items():
            if s == "train" and not (drop and c == dataset["classes"][0]):
                files[split + rel.removeprefix("train")] = (data, c, split)
        if drop:
            write(tmp / "data", {"files": files, "noise": []})
            (tmp / "data" / split / dataset["classes"][0]).mkdir(parents=True, exist_ok=True)  # empty, or absent
            assert read(tmp / "data", tmp)[0] == expected({"files": files})
            return
        files[f"{split}/{extra}/1.jpg"] = (b"J", extra, split)
        write(tmp / "data", {"files": files, "noise": []})
        assert f"/{split}/: class folders differ from train/ (not in train/: {extra})" in refused(tmp / "data", tmp)
        rows = [(rel, c, s) for rel, (_, c, s) in files.items()]
        (tmp / "labels.csv").write_bytes(csv_manifest(rows, True, False))
        assert f"class {extra!r} of split {split} has no training images" in refused(
            tmp / "data", tmp, str(tmp / "labels.csv"))


# ---------------------------------------------------------------- hand-made shards


def write_shards(root: Path, classes: list[str], shards: dict[str, list[list[tuple[str, bytes]]]]) -> None:
    """`shards`: {split: [[members of shard 0], ...]}; classes.txt beside them, no index.json."""
    root.mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for split, members in shards.items():
        (root / split).mkdir()
        for n, shard in enumerate(members):
            (root / split / f"shard-{n:06d}.tar").write_bytes(tar_bytes(shard))


def read_both(root: Path, work: Path) -> dict[str, list[tuple[str, bytes, str, str]]]:
    """{mode: sorted (member, image, class, split)} read by copying and by streaming."""
    out = {}
    for mode in ("copy", "stream"):
        reader = stage(root, work / mode, mode).settle(0.0, 0)
        out[mode] = sorted((key.split(":", 1)[1], image, reader.layout.classes[label], split)
                           for split in reader.layout.files for key, image, label in reader.samples(split))
    return out


def test_the_same_file_name_in_two_class_folders_is_two_samples(tmp_path):
    write_shards(tmp_path / "s", ["cat", "dog"], {"train": [[
        ("cat/0001.jpg", b"CAT"), ("cat/0001.cls", b"0"), ("dog/0001.jpg", b"DOG"), ("dog/0001.cls", b"1")]]})
    expected_samples = [("cat/0001.jpg", b"CAT", "cat", "train"), ("dog/0001.jpg", b"DOG", "dog", "train")]
    assert read_both(tmp_path / "s", tmp_path) == {"copy": expected_samples, "stream": expected_samples}


@pytest.mark.parametrize("mode", ["copy", "stream"])
def test_the_same_key_twice_in_a_split_names_both_shards(tmp_path, mode):
    sample = [("cat/0001.jpg", b"C"), ("cat/0001.cls", b"0")]
    write_shards(tmp_path / "s", ["cat", "dog"], {"train": [sample + [("dog/1.png", b"D"), ("dog/1.cls", b"1")],
                                                            [("cat/0001.png", b"C2"), ("cat/0001.cls", b"0")]]})
    with pytest.raises(DataError) as e:
        stage(tmp_path / "s", tmp_path, mode)
    message = str(e.value)
    assert "cat/0001 occurs twice in split train" in message
    assert "train/shard-000000.tar:cat/0001.jpg" in message and "train/shard-000001.tar:cat/0001.png" in message


def test_the_same_key_in_two_splits_is_fine(tmp_path):
    one = [("cat/1.jpg", b"C"), ("cat/1.cls", b"0"), ("dog/1.jpg", b"D"), ("dog/1.cls", b"1")]
    write_shards(tmp_path / "s", ["cat", "dog"], {"train": [one], "test": [one]})
    for got in read_both(tmp_path / "s", tmp_path).values():
        assert [(member, split) for member, _, _, split in got] == [
            ("cat/1.jpg", "test"), ("cat/1.jpg", "train"), ("dog/1.jpg", "test"), ("dog/1.jpg", "train")]


def test_license_and_readme_members_are_skipped(tmp_path):
    write_shards(tmp_path / "s", ["cat", "dog"], {"train": [[
        ("LICENSE.txt", b"CC-BY"), ("a/1.jpg", b"A"), ("a/1.cls", b"0"), ("README", b"about"),
        ("b/1.png", b"B"), ("b/1.txt", b"dog\n"), ("docs/notes.json", b"{}")]]})
    expected_samples = [("a/1.jpg", b"A", "cat", "train"), ("b/1.png", b"B", "dog", "train")]
    assert read_both(tmp_path / "s", tmp_path) == {"copy": expected_samples, "stream": expected_samples}


def test_a_repeated_non_sample_member_is_skipped(tmp_path):
    # Members of no sample are skipped, wherever they are: `LICENSE.txt` first and `LICENSE.md` last are not a
    # sample `LICENSE` that occurs twice.
    write_shards(tmp_path / "s", ["cat", "dog"], {"train": [[
        ("LICENSE.txt", b"CC-BY"), ("a/1.jpg", b"A"), ("a/1.cls", b"0"), ("b/1.png", b"B"), ("b/1.cls", b"1"),
        ("LICENSE.md", b"CC-BY")]]})
    expected_samples = [("a/1.jpg", b"A", "cat", "train"), ("b/1.png", b"B", "dog", "train")]
    assert read_both(tmp_path / "s", tmp_path) == {"copy": expected_samples, "stream": expected_samples}


member_folders = st.lists(_name(CHARS + ".", 5), min_size=1, max_size=2).map("/".join)
member_stems = st.one_of(st.sampled_from(["0001", "img 1"]), _name(CHARS, 5))


@st.composite
def shard_datasets(draw):
    """(classes, {split: [[members of a shard]]}, expected sorted (member, image, class, split))."""
    classes = draw(st.lists(class_names, min_size=2, max_size=4, unique=True))
    shards, want = {}, []
    for split in ["train"] + [s for s in ("validation", "test") if draw(st.booleans())]:
        keys = draw(st.lists(st.tuples(member_folders, member_stems).map("/".join), unique=True,
                             min_size=len(classes) if split == "train" else 1, max_size=8))
        n = draw(st.integers(1, 3))
        shards[split] = [[] for _ in range(n)]
        for i, key in enumerate(keys):  # every class has a training image
            label = i if split == "train" and i < len(classes) else draw(st.integers(0, len(classes) - 1))
            ext, data = draw(st.sampled_from(EXTENSIONS)), draw(st.binary(max_size=20))
            by_name = draw(st.booleans())
            members = [(key + ext, data), (f"{key}.txt", classes[label].encode()) if by_name
                       else (f"{key}.cls", str(label).encode())]
            shard = shards[split][draw(st.integers(0, n - 1))]
            noise = draw(st.sampled_from([None, ("LICENSE.txt", b"CC"), ("README", b"r"), ("x/notes.json", b"{}")]))
            if noise and noise not in shard:  # once a shard (test_a_repeated_non_sample_member_is_skipped)
                shard.append(noise)
            shard.extend(members if draw(st.booleans()) else members[::-1])
            want.append((key + ext, data, classes[label], split))  # the member as the tar names it
    return classes, shards, sorted(want)


@SETTINGS
@given(generated=shard_datasets())
def test_hand_made_shards_read_as_written(tmp_path_factory, generated):
    classes, shards, want = generated
    with fresh(tmp_path_factory) as tmp:
        write_shards(tmp / "s", classes, shards)
        assert read_both(tmp / "s", tmp) == {"copy": want, "stream": want}


# ---------------------------------------------------------------- findings outside the properties' alphabet


def test_pack_keeps_surrounding_spaces_of_class_names(tmp_path):
    # A folder class ` cat` (a space first) reads as ` cat`; packed, it must still be ` cat`, and `dog` and
    # `dog ` stay two classes.
    for c in (" cat", "dog", "dog "):
        (tmp_path / "data/train" / c).mkdir(parents=True)
        (tmp_path / "data/train" / c / "1.jpg").write_bytes(c.encode())
    want = Counter({(c.encode(), c, "train"): 1 for c in (" cat", "dog", "dog ")})
    assert read(tmp_path / "data", tmp_path / "folder")[0] == want
    pack(str(tmp_path / "data"), str(tmp_path / "shards"), 10_000)
    assert read(tmp_path / "shards", tmp_path / "packed")[0] == want
