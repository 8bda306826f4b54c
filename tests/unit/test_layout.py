"""Class discovery and the stratified split: pure logic, no TensorFlow."""

from collections import Counter

import hypothesis.strategies as st
import pytest
from hypothesis import example, given

from job.errors import DataError, exit_code_for
from job.layout import Layout, MultiLayout, discover, split_validation, unmeasured, unread_formats, without


def rels(spec: dict[str, dict[str, int]]) -> list[str]:
    return [f"{s}/{c}/img{i}.jpg" for s, per in spec.items() for c, n in per.items() for i in range(n)]


def test_classes_are_sorted_train_folders():
    layout = discover(rels({"train": {"zebra": 2, "ant": 3}, "test": {"ant": 1, "zebra": 1}}), "s3://b/d")
    assert layout.classes == ["ant", "zebra"]
    paths, labels = layout.items("train")
    assert Counter(labels) == {0: 3, 1: 2}
    assert all(p.startswith("train/ant/") for p, lab in zip(paths, labels) if lab == 0)


def test_non_images_and_loose_files_are_ignored():
    layout = discover(rels({"train": {"a": 2, "b": 2}}) + ["train/a/notes.txt", "train/readme.md", "other/x.jpg",
                                                            "train/.hidden/x.jpg"], "d")
    assert layout.counts() == {"train": {"a": 2, "b": 2}}
    assert sorted(layout.ignored) == ["train/.hidden/x.jpg", "train/a/notes.txt", "train/readme.md"]


def test_images_left_out_of_the_splits_are_said_and_thumbnails_and_metadata_are_not_trained():
    # A hidden class folder or image, and images in class folders of a folder that is not a split (`holdout/`,
    # `test.bak/`), were left out without a word; a NAS's thumbnails (`@eaDir/`) were trained on as photos.
    layout = discover(rels({"train": {"a": 2, "b": 2}}) + [
        "train/.old/1.jpg", "train/a/.1.png", "holdout/a/1.jpg", "test.bak/b/2.png", "holdout/zzz/1.jpg",
        "runs/r1/curves.png", "train/a/._1.jpg", "train/.DS_Store", "train/a/@eaDir/1.jpg/SYNOPHOTO_THUMB_M.jpg",
        "__MACOSX/train/a/._1.jpg", "train/__MACOSX/a/._1.jpg", "holdout/a/@eaDir/1.jpg/SYNOPHOTO_THUMB_XL.jpg",
        "@eaDir/a/x.jpg", "holdout/B/3.png"], "d")
    assert layout.counts() == {"train": {"a": 2, "b": 2}}
    assert sorted(layout.ignored) == ["holdout/B/3.png", "holdout/a/1.jpg", "test.bak/b/2.png", "train/.old/1.jpg",
                                      "train/a/.1.png"]


@pytest.mark.parametrize(
    "objects, message",
    [
        (rels({"validation": {"a": 1, "b": 1}}), "no train/ folder"),
        ([], "nothing under s3://b/d: no such folder or prefix, or an empty one"),  # a mistyped data.uri
        (rels({"train": {"a": 3}}), "at least 2 are needed"),
        (rels({"train": {"a": 3, "b": 2}}) + ["train/c/"], "train/: class folder(s) with no images: c"),
        (rels({"train": {"a": 3, "b": 2}, "validation": {"a": 1, "b": 1, "c": 1}}), "not in train/: c"),
        # A split named as other tools name it: its images would be ignored without a word.
        (rels({"train": {"a": 3, "b": 2}, "val": {"a": 1, "b": 1}}), "s3://b/d/val/: the job reads the splits"),
        (rels({"train": {"a": 3, "b": 2}, "Test": {"a": 1, "b": 1}}), "rename it test/"),
        (rels({"Train": {"a": 3, "b": 2}}), "Train/: the job reads the splits train/, validation/ and test/"),
        (rels({"training": {"a": 3, "b": 2}}), "rename it train/"),
        # Its class folders in another case too: `Validation/Cat/` beside `train/cat/` was dropped without a word.
        (rels({"train": {"cat": 3, "dog": 2}, "Validation": {"Cat": 1, "Dog": 1}}), "rename it validation/"),
        (rels({"train": {"cat": 3, "dog": 2}, "val": {"kitty": 1, "CAT": 1}}), "val/: the job reads the splits"),
        # A split folder with a space before or after its name, or named `tests/` or `validate/`.
        (rels({"train": {"a": 3, "b": 2}, "validation ": {"a": 1, "b": 1}}), "d/validation /: the job reads"),
        (rels({"train ": {"a": 3, "b": 2}}), "rename it train/"),
        (rels({"train": {"a": 3, "b": 2}, "tests": {"a": 1}}), "tests/: the job reads the splits"),
        (rels({"train": {"a": 3, "b": 2}, "validate": {"b": 1}}), "rename it validation/"),
        (rels({"train": {"a": 3, "b": 2}, "validation": {"a": 1, "b": 1}, "val": {"b": 1}}),
         "val/: the job reads the splits train/, validation/ and test/, so its images would be ignored; merge it "
         "into validation/ or remove it"),
        # The class folders at the top, as Keras' image_dataset_from_directory reads them.
        ([f"{c}/{i}.jpg" for c in "abcd" for i in range(2)], "; a, b, c, ... hold images: move the class folders"),
        # An S3 key with an empty folder name: `train//x.png` was a class named "", `train/a//x.png` an image of a
        # that the staging wrote over `train/a/x.png`; a prefix written with a double slash listed no train/.
        (rels({"train": {"a": 3, "b": 2}}) + ["train//5.png"], "s3://b/d/train//5.png: an empty folder name ('//')"),
        (rels({"train": {"a": 3, "b": 2}}) + ["train/a//0.png"], "s3://b/d/train/a//0.png: an empty folder name"),
        (["/" + r for r in rels({"train": {"a": 3, "b": 2}})], "s3://b/d//train/a/img0.jpg: an empty folder name"),
        # Images only in formats the job does not read: said so, not "no images".
        (rels({"train": {"a": 2}}) + ["train/b/1.webp", "train/b/2.WEBP", "train/b/3.tiff", "train/b/x.txt"],
         "train/: class folder(s) with no images: b (the job reads .jpg .jpeg .jpe .jfif .png .bmp .gif; the "
         "dataset has 2 .webp, 1 .tiff: convert them to JPEG or PNG)"),
        # A validation folder copied from macOS names café decomposed: it prints exactly like train/'s.
        (rels({"train": {"caf\u00e9": 2, "tea": 2}, "validation": {"cafe\u0301": 1, "tea": 1}}),
         "validation/: class folders differ from train/ (missing caf\u00e9; not in train/: 'cafe\\u0301'); "
         "'cafe\\u0301' is caf\u00e9 in another case, Unicode form or spacing: rename the folder"),
    ],
)
def test_bad_layouts_say_what_and_where(objects, message):
    with pytest.raises(DataError) as e:
        discover(objects, "s3://b/d")
    assert message in str(e.value) and "s3://b/d" in str(e.value)
    assert exit_code_for(e.value) == 3


@pytest.mark.parametrize("where, objects, hint", [
    ("s3://b/d/train", ["a/1.jpg", "b/1.jpg"], "; it looks like a split folder: set data.uri to s3://b/d, the folder"),
    ("/data/d/val", ["a/1.jpg", "b/1.jpg"], "; it looks like a split folder: set data.uri to /data/d, the folder"),
    ("/data/d/train/a", ["1.jpg", "2.png"], "; images lie directly under it, as in a class folder: data.uri is"),
    ("/data/d", ["a/1.jpg", "b/1.jpg"], "; a, b hold images: move the class folders into train/"),
    ("/data/d", ["notes.txt", "x/notes.txt"], "<image>)"),
    # Kaggle's cats-vs-dogs layout: the class only in the file name. Not "train hold images: move the class folders
    # into train/" (train/ taken for a class folder at the top), nor a test/ beside it taken so.
    ("/data/d", ["train/cat.1.jpg", "train/dog.1.jpg", "test/1.jpg"], "; train/ holds images but no class folders: "
     "put each class's images in train/<class>/ (a file name such as cat.1.jpg names no class), or list them"),
    ("/data/d", ["test/1.jpg", "a/1.jpg"], "; a hold images: move the class folders into train/"),
    # A dataset uploaded as an archive: said so, before any other guess.
    ("s3://b/up", ["flowers.tar.gz", "README.md"], "; flowers.tar.gz is an archive: the job reads a folder per class, "
     "a manifest or tar shards (<split>/shard-NNNNNN.tar), not an archive of them: extract it into storage)"),
    # WebDataset's own shard names: "no train/ folder" without a word of the tars.
    ("s3://b/wds", ["train/imagenet-train-000000.tar", "test/imagenet-test-000000.tar", "classes.txt"],
     "; train/imagenet-train-000000.tar looks like a tar shard: shards are read as <split>/shard-NNNNNN.tar (six "
     "digits), with classes.txt beside the split folders: rename them"),
    # A folder holding a manifest, data.manifest not set: "no train/ folder" alone.
    ("s3://b/m", ["labels.csv", "imgs/cat/1.png"], "; labels.csv looks like a manifest: set data.manifest to "
     "s3://b/m/labels.csv"),
])
def test_no_train_folder_says_what_data_uri_seems_to_name(where, objects, hint):
    with pytest.raises(DataError) as e:
        discover(objects, where)
    assert str(e.value).startswith(f"no train/ folder with class folders under {where} (") and hint in str(e.value)


@pytest.mark.parametrize("where", ["s3://b/flowers.zip", "/data/flowers.TAR", "/data/flowers.tgz"])
def test_a_data_uri_naming_an_archive_says_so(where):
    with pytest.raises(DataError) as e:
        discover([], where)
    assert str(e.value).endswith(f"; {where.rpartition('/')[2]} is an archive: the job reads a folder per class, a "
                                 "manifest or tar shards (<split>/shard-NNNNNN.tar), not an archive of them: "
                                 "extract it into storage")
    with pytest.raises(DataError) as e:
        discover([], "s3://b/flowers")
    assert "archive" not in str(e.value)


def test_a_test_or_validation_split_may_lack_a_class_folder_or_have_it_empty():
    # Before, a folder dataset whose test/ lacked a class could not run at all: without the folder it was "class
    # folders differ", with it empty "no images". A manifest's split could lack a class; now a folder's can too.
    layout = discover(rels({"train": {"a": 3, "b": 2}, "test": {"a": 1}, "validation": {"b": 1}}) + ["validation/a/"],
                      "d")
    assert layout.counts() == {"train": {"a": 3, "b": 2}, "validation": {"a": 0, "b": 1}, "test": {"a": 1, "b": 0}}
    assert unmeasured(layout.counts(), layout.classes, {s: layout.count(s) for s in layout.splits}) == \
        {"validation": ["a"], "test": ["b"]}


def test_empty_folder_markers_and_jpeg_aliases_are_not_refused():
    # A folder marker object (`train/c/`) ends in an empty name: it is not an empty folder name; .jfif is JPEG.
    layout = discover(rels({"train": {"a": 2}}) + ["train/a/", "train/b/", "train/b/x.JFIF", "train/b/y.jpe"], "d")
    assert layout.counts() == {"train": {"a": 2, "b": 2}}


@given(st.lists(st.sampled_from(["a.webp", "b.TIFF", "c.tif", "d.txt", "e.jpg", "f", "webp", "g.heic", "x/.webp"]),
                max_size=30))
def test_unread_formats_count_the_images_the_job_does_not_read(names):
    counts = unread_formats(names)
    expected = Counter("." + n.rsplit(".", 1)[1].lower() for n in names if n in ("a.webp", "b.TIFF", "c.tif", "g.heic"))
    assert counts == dict(expected) and list(counts.values()) == sorted(counts.values(), reverse=True)


def test_a_folder_named_like_a_split_without_training_classes_stays_ignored():
    # A run's artifacts under the dataset (output.uri s3://b/d/eval): their PNGs are no class's images.
    objects = rels({"train": {"a": 3, "b": 2}}) + ["eval/run-1/curves.png", "dev/run-2/confusion_matrix.png"]
    assert discover(objects, "d").counts() == {"train": {"a": 3, "b": 2}}


def test_split_is_stratified_seeded_and_disjoint():
    layout = discover(rels({"train": {"a": 50, "b": 10, "c": 2}}), "d")
    one = split_validation(layout, 0.2, seed=7)
    assert one.counts()["validation"] == {"a": 10, "b": 2, "c": 1}
    assert one.counts()["train"] == {"a": 40, "b": 8, "c": 1}
    for c in layout.classes:
        assert not set(one.files["train"][c]) & set(one.files["validation"][c])
        assert sorted(one.files["train"][c] + one.files["validation"][c]) == sorted(layout.files["train"][c])
    assert split_validation(layout, 0.2, seed=7).files == one.files  # same seed, same split
    assert split_validation(layout, 0.2, seed=8).files != one.files


def test_existing_validation_folder_wins():
    layout = discover(rels({"train": {"a": 5, "b": 5}, "validation": {"a": 1, "b": 1}}), "d")
    assert split_validation(layout, 0.5, 0).counts()["validation"] == {"a": 1, "b": 1}


def test_without_drops_bad_files():
    layout = discover(rels({"train": {"a": 3, "b": 2}}), "d")
    assert without(layout, {"train/a/img0.jpg"}).counts()["train"] == {"a": 2, "b": 2}


@given(st.dictionaries(st.sampled_from(["train", "validation", "test"]),
                       st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 4), min_size=1), min_size=1),
       st.dictionaries(st.sampled_from(["train", "validation", "test"]),
                       st.dictionaries(st.text("xyz", min_size=1, max_size=3),
                                       st.tuples(*[st.integers(0, 2)] * 2).map(lambda t: tuple(sorted(set(t)))))))
def test_train_and_validation_read_as_one_split(spec, sets):
    """train.refit's split: train's items then validation's, counted together, for both kinds of layout."""
    single = Layout(["a", "b", "c"], {s: {c: [f"{s}/{c}/{i}.png" for i in range(n)] for c, n in per.items()}
                                      for s, per in spec.items()})
    multi = MultiLayout(["a", "b", "c"], {s: {f"{s}/{k}": v for k, v in per.items()} for s, per in sets.items()})
    for listed in (single, multi):
        keys, labels = listed.items("train+validation")
        train, validation = listed.items("train"), listed.items("validation")
        assert keys == train[0] + validation[0] and labels == train[1] + validation[1]
        assert listed.count("train+validation") == listed.count("train") + listed.count("validation") == len(keys)


CLASSES = ["a", "b", "c", "d"]


@given(st.dictionaries(st.sampled_from(["train", "validation", "test"]),
                       st.dictionaries(st.sampled_from(CLASSES), st.integers(0, 3)), min_size=1),
       st.dictionaries(st.sampled_from(["train", "validation", "test"]), st.integers(0, 3)))
@example({"validation": {}}, {"validation": 4})
def test_unmeasured_names_each_class_a_scored_split_lacks(counts, unlabelled):
    """A split with images but none of a class cannot score that class (a class of 1 or 2 images keeps them all in
    train when validation is carved at 0.2): named so that a warning can say so. Train and empty splits: never.
    `unlabelled`: multi-label images carrying no label; a split of only those was left out (its counts sum to 0)."""
    images = {split: sum(per.values()) + unlabelled.get(split, 0) for split, per in counts.items()}
    said = unmeasured(counts, CLASSES, images)
    for split, per in counts.items():
        lacking = [c for c in CLASSES if per.get(c, 0) == 0]
        scored = split != "train" and images[split] > 0
        assert said.get(split, []) == (lacking if scored else [])
    assert set(said) <= set(counts) - {"train"}


def test_a_carved_validation_split_lacks_a_class_of_one_image():
    layout = discover(rels({"train": {"a": 1, "b": 20, "c": 20}}), "s3://b/data")
    carved = split_validation(layout, 0.2, seed=1)
    assert unmeasured(carved.counts(), carved.classes, {s: carved.count(s) for s in carved.splits}) == \
        {"validation": ["a"]}
