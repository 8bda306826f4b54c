"""The data guards (job/layout.py, job/manifest.py, job/shards.py) at their edges: exact messages, boundaries,
case and whitespace, orders, and what is kept or skipped. Written against the mutants that `make mutation`
left alive. Pure Python: no TensorFlow, in-memory tars and tmp folders only."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile

import numpy as np
import pytest
from conftest import tar_bytes
from hypothesis import given
from hypothesis import strategies as st

from job import layout, manifest, shards
from job.errors import DataError
from job.layout import Layout, discover, split_validation
from job.pack import pack

# ---------------------------------------------------------------- layout.py


def test_discover_sorts_files_keeps_split_order_and_reads_extensions_in_any_case():
    rels = ["test/b/2.png", "train/b/9.GIF", "train/b/1.Jpeg", "validation/a/1.bmp", "train/a/z.PNG",
            "train/a/a.jpg", "test/a/1.jpg", "validation/b/1.jpg", "train/a/m.JPG"]
    got = discover(rels, "d")
    assert got.classes == ["a", "b"]
    assert list(got.files) == ["train", "validation", "test"]
    assert got.files["train"] == {"a": ["train/a/a.jpg", "train/a/m.JPG", "train/a/z.PNG"],
                                  "b": ["train/b/1.Jpeg", "train/b/9.GIF"]}
    assert got.ignored == []


def test_discover_ignores_a_bare_split_object_and_folder_markers_are_not_ignored_objects():
    # An object named `train` (no slash) belongs to no class; a marker `train/b/` makes a class, ignored nowhere;
    # the S3 console's "Create folder" makes `train/` and `test/` too: no "objects ignored" warning for those.
    got = discover(["", "train", "train/", "train/a/1.jpg", "train/b/", "train/b/1.jpg", "validation", "test",
                    "test/"], "d")
    assert got.counts() == {"train": {"a": 1, "b": 1}}
    assert got.ignored == []


def test_discover_names_every_empty_class_in_any_split_and_both_differences():
    # test/ with empty class folders only: no test images (a split with no image is absent, not empty)
    got = discover(["train/a/1.jpg", "train/b/1.jpg", "test/b/", "test/a/"], "s3://x/d")
    assert got.counts()["test"] == {"a": 0, "b": 0} and got.nonempty().splits == ["train"]
    with pytest.raises(DataError) as e:
        discover(["train/c/1.jpg", "train/a/1.jpg", "train/b/", "train/d/"], "s3://x/d")
    assert str(e.value) == "s3://x/d/train/: class folder(s) with no images: b, d"
    with pytest.raises(DataError) as e:
        discover(["train/a/1.jpg", "train/b/1.jpg", "train/c/1.jpg", "validation/c/1.jpg", "validation/z/1.jpg",
                  "validation/y/1.jpg"], "s3://x/d")
    assert str(e.value) == "s3://x/d/validation/: class folders differ from train/ (missing a, b; not in train/: y, z)"


def test_discover_messages_for_no_train_and_one_class():
    with pytest.raises(DataError) as e:
        discover(["test/a/1.jpg"], "s3://x/d")
    assert str(e.value) == "no train/ folder with class folders under s3://x/d (expected s3://x/d/train/<class>/<image>)"
    with pytest.raises(DataError) as e:
        discover(["train/a/1.jpg"], "s3://x/d")
    assert str(e.value) == "s3://x/d/train/ has 1 class folder(s); at least 2 are needed"


def test_layout_helpers_keep_the_ignored_objects():
    full = Layout(["a", "b"], {"train": {"a": ["t/a/1", "t/a/2"], "b": ["t/b/1"]}, "test": {"a": [], "b": []}},
                  ["train/x.txt"])
    assert full.count("test") == 0 and full.count("validation") == 0 and full.count("train") == 3
    assert full.nonempty() == Layout(["a", "b"], {"train": full.files["train"]}, ["train/x.txt"])
    assert layout.without(full, {"t/a/1"}) == Layout(
        ["a", "b"], {"train": {"a": ["t/a/2"], "b": ["t/b/1"]}, "test": {"a": [], "b": []}}, ["train/x.txt"])
    carved = split_validation(full.nonempty(), 0.5, 0)
    assert carved.ignored == ["train/x.txt"]


def test_items_of_an_absent_split_or_class_are_empty():
    partial = Layout(["a", "b", "c"], {"train": {"a": ["1", "2"], "c": ["3"]}})
    assert partial.items("train") == (["1", "2", "3"], [0, 0, 2])
    assert partial.items("validation") == ([], [])


def test_require_training_images_without_a_train_split_names_every_class():
    layout.require_training_images(Layout(["a", "b"], {"train": {"a": ["1"], "b": ["2"]}}), "d")
    with pytest.raises(DataError) as e:
        layout.require_training_images(Layout(["b", "a"], {"test": {"a": ["1"], "b": ["2"]}}), "s3://x/d")
    assert str(e.value) == "s3://x/d/train/: class folder(s) with no images: a, b"


@given(st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b and b[:1] != b"."))
def test_a_name_that_is_not_utf8_is_refused_naming_its_bytes(raw):
    """A local name listed as the file system gives it (os.fsdecode: bytes that are not UTF-8 as surrogates, as an
    old zip's Latin-1 names come out on Linux): refused with its bytes shown, not a traceback when written."""
    name = os.fsdecode(raw)
    rels = ["train/a/1.jpg", "train/b/1.jpg", f"train/b/{name}.jpg", f"train/a/{name}.txt"]  # the .txt: ignored
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(DataError) as e:
            discover(rels, "d")
        shown = raw.decode("utf-8", "backslashreplace")
        assert str(e.value).startswith(f"d/train/b/{shown}.jpg: a name that is not UTF-8")
        str(e.value).encode("utf-8")  # printable as it is
        with pytest.raises(DataError, match="^d/train/"):  # a class folder's name too
            discover(["train/a/1.jpg", f"train/{name}/1.jpg"], "d")
    else:
        assert discover(rels, "d").counts()["train"]["b"] == 2
    assert discover(rels[:2] + rels[3:], "d").ignored == [rels[3]]  # a file that is no image: left out, not refused


def test_case_clashes_are_groups_of_two_or_more():
    assert layout.case_clashes(["a", "b"]) == []
    assert layout.case_clashes(["Straße", "STRASSE", "x", "X", "x ", "y"]) == [("Straße", "STRASSE"), ("x", "X", "x ")]
    # A folder `circle ` beside `circle`, and inner spaces: printed alike, so warned about; shown escaped.
    assert layout.case_clashes(["circle", "circle ", "ice cream", "ice  cream", "ice\tcream", "icecream"]) == [
        ("circle", "circle "), ("ice cream", "ice  cream", "ice\tcream")]
    assert [layout.shown(n) for n in ("circle", "circle ", " circle", "ice  cream", "ice cream")] == [
        "circle", "'circle '", "' circle'", "'ice  cream'", "ice cream"]
    # Invisible format characters (a zero-width space, a byte-order mark, a soft hyphen) printed `cat` twice without
    # a warning; a CSV's trimming keeps them.
    assert layout.case_clashes(["cat", "cat\u200b", "\ufeffcat", "dog", "ice\u00adcream", "icecream"]) == [
        ("cat", "cat\u200b", "\ufeffcat"), ("ice\u00adcream", "icecream")]
    assert [layout.shown(n) for n in ("cat\u200b", "\ufeffcat", "cat")] == ["'cat\\u200b'", "'\\ufeffcat'", "cat"]
    # A joiner too (`cat\u200d` printed as `cat`), though it shapes Persian and Indic words: a warning of two classes
    # that do differ costs less than two that print alike unsaid.
    assert layout.case_clashes(["cat", "cat\u200d"]) == [("cat", "cat\u200d")]


def test_numbers_in_text_order():
    assert layout.numbers_in_text_order(["0", "1", "10", "2"])
    assert not layout.numbers_in_text_order(["00", "01", "02", "10"])  # as many digits: text order is number order
    assert not layout.numbers_in_text_order(["1", "2", "cat"]) and not layout.numbers_in_text_order(["10"])
    assert not layout.numbers_in_text_order(["0", "1", "2"])
    assert not layout.numbers_in_text_order(["\u0661", "\u0660"])  # Arabic-Indic digits: not what int() ordering means


def _train(**sizes: int) -> Layout:
    return Layout(sorted(sizes), {"train": {c: [f"train/{c}/{i:02d}.jpg" for i in range(n)] for c, n in sizes.items()}})


def test_split_validation_counts_at_the_edges():
    def counts(fraction, **sizes):
        carved = split_validation(_train(**sizes), fraction, 1)
        return {c: (len(carved.files["train"][c]), len(carved.files["validation"][c])) for c in sizes}

    # round(n * fraction), at least one when a class has two, never the last training image
    assert counts(0.2, a=3, b=2, c=1, d=8) == {"a": (2, 1), "b": (1, 1), "c": (1, 0), "d": (6, 2)}
    assert counts(1.0, a=1, b=2, c=5) == {"a": (1, 0), "b": (1, 1), "c": (1, 4)}
    assert counts(0.5, a=4, b=3) == {"a": (2, 2), "b": (1, 2)}  # round half to even: 1.5 -> 2
    assert counts(0.01, a=2, b=3) == {"a": (1, 1), "b": (2, 1)}
    assert split_validation(_train(a=4, b=4), 0.0, 1) == _train(a=4, b=4)
    assert split_validation(_train(a=4, b=4), -0.5, 1) == _train(a=4, b=4)


def test_empty_validation_class_folders_are_carved_like_an_absent_validation_folder():
    # The S3 console's "Create folder" (or `mkdir -p validation/{a,b}`) leaves validation/ with empty class folders:
    # the run had no validation split at all (no early stopping on it, no report), where an absent folder is carved.
    rels = [f"train/{c}/{i}.png" for c in "ab" for i in range(5)]
    absent = discover(rels, "s3://b/d").carve(0.2, 3).nonempty()
    markers = discover([*rels, "validation/", "validation/a/", "validation/b/"], "s3://b/d").carve(0.2, 3).nonempty()
    assert markers.counts()["validation"] == {"a": 1, "b": 1} and markers.files == absent.files
    # Images in validation/, even in one class only, are the user's split: nothing is carved.
    given_one = discover([*rels, "validation/a/v.png", "validation/b/"], "s3://b/d").carve(0.2, 3)
    assert given_one.counts()["train"] == {"a": 5, "b": 5} and given_one.counts()["validation"] == {"a": 1, "b": 0}
    multi = layout.MultiLayout(["a", "b"], {"train": {str(i): (i % 2,) for i in range(10)}, "validation": {}})
    assert multi.carve(0.2, 3).count("validation") == 2 and multi.carve(0.2, 3).count("train") == 8


def test_a_label_written_in_another_unicode_form_says_so_wherever_it_is_written():
    # A manifest's validation row, a shard's .txt, a multi-label shard's .json: `cafe\u0301` beside `café` printed
    # "class 'café' ... has no training images" and "names class 'café', which classes.txt does not list".
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    hint = "; 'cafe\\u0301' is caf\u00e9 in another case, Unicode form or spacing"
    rows = [{"path": f"t{i}.png", "label": c} for i, c in enumerate([nfc, nfc, "tea", "tea"])] + [
        {"path": "v.png", "label": nfd, "split": "validation"}]
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with pytest.raises(DataError) as e:
        manifest.to_layout(manifest.parse(text, "m.jsonl"), "m.jsonl", "/d", {r["path"] for r in rows})
    assert str(e.value) == f"m.jsonl line 5: class {nfd!r} of split validation has no training images{hint}"
    assert shard_refusal([("k.png", b"P"), ("k.txt", nfd.encode())], classes=(nfc, "tea")) == \
        f"{NAME}: k.txt names class {nfd!r}, which classes.txt does not list{hint}"
    assert layout.lookalike("tea", [nfc, "tea"]) == "" and layout.lookalike("dog", [nfc]) == ""
    assert layout.lookalike("Tea ", ["tea"]) == "; 'Tea ' is tea in another case, Unicode form or spacing"


def test_split_validation_is_pinned_per_seed_and_class_and_ignores_listing_order():
    # A resumed run (or another worker) must carve exactly the same split: pin it for one seed.
    base = _train(a=6, b=6)
    carved = split_validation(base, 0.5, 42)
    assert carved.files["validation"] == {"a": ["train/a/00.jpg", "train/a/01.jpg", "train/a/05.jpg"],
                                          "b": ["train/b/02.jpg", "train/b/03.jpg", "train/b/05.jpg"]}
    assert carved.files["train"] == {"a": ["train/a/02.jpg", "train/a/03.jpg", "train/a/04.jpg"],
                                     "b": ["train/b/00.jpg", "train/b/01.jpg", "train/b/04.jpg"]}
    reversed_listing = Layout(base.classes, {"train": {c: ps[::-1] for c, ps in base.files["train"].items()}})
    assert split_validation(reversed_listing, 0.5, 42).files == carved.files
    with_test = Layout(base.classes, dict(base.files, test={"a": ["t/a"], "b": ["t/b"]}), ["x"])
    assert list(split_validation(with_test, 0.5, 42).files) == ["train", "validation", "test"]


# ---------------------------------------------------------------- manifest.py


def parse(text: str, name: str = "m.csv"):
    return manifest.parse(text.encode(), name)


def refusal(text: str, name: str = "m.csv") -> str:
    with pytest.raises(DataError) as e:
        parse(text, name)
    return str(e.value)


def test_manifest_kind_is_chosen_by_suffix_in_any_case():
    jsonl = '{"path": "a.png", "label": "cat"}\n'
    for name in ("m.jsonl", "M.JSONL", "s3://b/m.json", "m.Json"):
        assert [(r.path, r.label, r.split) for r in parse(jsonl, name)] == [("a.png", "cat", None)]
    assert refusal(jsonl, "m.csvx").startswith("m.csvx line 1: the header must be")


def test_csv_header_and_fields_are_stripped_and_blank_lines_skipped():
    got = parse(" Path , LABEL ,Split\n a/1.PNG , cat , \n ,  , \n\nb.Jpeg,dog,test\n")
    assert [(r.line, r.path, r.label, r.split) for r in got] == [(2, "a/1.PNG", "cat", None),
                                                                 (5, "b.Jpeg", "dog", "test")]


def test_csv_messages_name_the_line_and_the_header():
    header = "m.csv line 1: the header must be 'path,label[,split]' (or multi-label 'path,labels[,split]')"
    assert refusal("") == f"{header}, not ''"
    assert refusal("path;label\n") == f"{header}, not 'path;label'"
    assert refusal("File, Class\n") == f"{header}, not 'file,class'"
    assert refusal("path,label,split\na.png,cat\n") == "m.csv line 2: 2 fields, expected 3 (path,label,split)"
    assert refusal("path,label\n,cat\n") == "m.csv line 2: empty path"
    assert refusal("path,label\na.png, \n") == "m.csv line 2: empty label for a.png"
    assert refusal("path,label,split\na.png,cat,Train\n") == \
        "m.csv line 2: unknown split 'Train' (train, validation or test; did you mean train?)"
    assert refusal("path,label,split\na.png,cat,val\n") == \
        "m.csv line 2: unknown split 'val' (train, validation or test; did you mean validation?)"
    assert refusal("path,label\na.tif,cat\n") == "m.csv line 2: a.tif is in an image format the job does not read: " \
        "convert it to JPEG or PNG (.jpg, .jpeg, .jpe, .jfif, .png, .bmp, .gif)"
    assert refusal("path,label\na.txt,cat\n") == \
        "m.csv line 2: a.txt is not an image (.jpg, .jpeg, .jpe, .jfif, .png, .bmp, .gif)"
    assert refusal("path,label\n\n") == "m.csv: no entries"


def test_manifest_not_utf8_names_the_byte():
    with pytest.raises(DataError) as e:
        manifest.parse(b"path,label\nx\xff.png,a\n", "m.csv")
    assert str(e.value) == "m.csv: not UTF-8 text (byte 12 cannot be decoded)"


def test_jsonl_values_and_messages():
    got = parse('{"path": " a.png ", "label": 3, "split": null}\n{"path": "b.gif", "label": "x", "split": ""}\n'
                '\n{"path": "c.bmp", "label": "y", "split": "validation", "note": null}\n', "m.jsonl")
    assert [(r.line, r.path, r.label, r.split) for r in got] == [(1, "a.png", "3", None), (2, "b.gif", "x", None),
                                                                 (4, "c.bmp", "y", "validation")]
    assert refusal('{"path": "a.png", "label": null}\n', "m.jsonl") == "m.jsonl line 1: empty label for a.png"
    expected = ('m.jsonl line 2: expected an object with "path" and "label" (multi-label: "labels", a list) and '
                'maybe "split"')
    for bad in ('["a.png", "cat"]', '{"label": "cat"}', '{"path": "a.png"}', '"a.png"'):
        assert refusal('{"path": "a.png", "label": "c"}\n' + bad + "\n", "m.jsonl") == expected
    assert refusal('{"path": "a.png", "label": "c"}\n{"path": \n', "m.jsonl") == \
        "m.jsonl line 2: not a JSON object (Expecting value)"


def rows_of(*lines: str):
    return parse("path,label,split\n" + "\n".join(lines) + "\n")


def to_layout(rows, data_uri="s3://b/data", existing=()):
    return manifest.to_layout(rows, "m.csv", data_uri, set(existing))


def layout_refusal(rows, data_uri="s3://b/data", existing=()) -> str:
    with pytest.raises(DataError) as e:
        to_layout(rows, data_uri, existing)
    return str(e.value)


def test_manifest_layout_with_a_trailing_slash_sorted_files_and_split_order():
    rows = rows_of("s3://b/data/z.png,cat,test", "y.png,dog,", "x.png,cat,train", "s3://b/data/w.png,cat,",
                   "v.png,dog,validation", "u.png,dog,test")
    got = to_layout(rows, "s3://b/data/", {"z.png", "y.png", "x.png", "w.png", "v.png", "u.png"})
    assert got == Layout(["cat", "dog"], {"train": {"cat": ["w.png", "x.png"], "dog": ["y.png"]},
                                          "validation": {"cat": [], "dog": ["v.png"]},
                                          "test": {"cat": ["z.png"], "dog": ["u.png"]}})
    assert list(got.files) == ["train", "validation", "test"]


def test_manifest_layout_messages():
    existing = {"a.png", "b.png", "s3://o/c.png"}
    assert layout_refusal(rows_of("a.png,cat,", "s3://o/d.png,dog,"), existing=existing) == \
        "m.csv line 3: s3://o/d.png does not exist"
    assert layout_refusal(rows_of("a.png,cat,", "s3://b/data/a.png,dog,"), existing=existing) == \
        "m.csv line 3: s3://b/data/a.png is listed twice (first on line 2)"
    assert layout_refusal(rows_of("a.png,cat,test", "b.png,dog,validation"), existing=existing) == \
        "m.csv: no training images (every row has split validation or test)"
    assert layout_refusal(rows_of("a.png,cat,", "b.png,cat,train", "s3://o/c.png,dog,test"), existing=existing) == \
        "m.csv: 1 class(es) in train; at least 2 are needed"
    assert layout_refusal(rows_of("a.png,cat,", "b.png,dog,", "s3://o/c.png,emu,validation"),
                          existing=existing) == "m.csv line 4: class 'emu' of split validation has no training images"


def test_a_missing_path_names_the_object_it_is_in_another_case_or_unicode_form():
    # A manifest's `train/café/1.png` (composed) against storage's decomposed key, as macOS uploads it: "does not
    # exist", printing a name that looked exactly like the one in storage.
    existing = {"train/cafe\u0301/1.png", "train/cat/1.png", "train/dog/2.png"}
    assert layout_refusal(rows_of("train/caf\u00e9/1.png,cafe,", "train/dog/2.png,dog,"), existing=existing) == (
        "m.csv line 2: train/caf\u00e9/1.png does not exist under s3://b/data (storage holds "
        "'train/cafe\\u0301/1.png': the same name in another case or Unicode form)")
    assert layout_refusal(rows_of("train/Cat/1.png,cat,", "train/dog/2.png,dog,"), existing=existing).endswith(
        "(storage holds 'train/cat/1.png': the same name in another case or Unicode form)")
    assert layout_refusal(rows_of("train/emu/1.png,emu,", "train/dog/2.png,dog,"), existing=existing).endswith(
        "train/emu/1.png does not exist under s3://b/data")


def test_listing_prefixes_per_bucket_at_the_edges():
    def prefixes(*paths, data_uri="s3://b/data"):
        return manifest.listing_prefixes(rows_of(*(f"{p},c," for p in paths)), data_uri)

    assert prefixes("a.png", "s3://b/data/x/1.png", data_uri="s3://b/data/") == ["s3://b/data"]
    for other in ("https://b.s3.amazonaws.com/x/1.png", "s3a://b/x/1.png", "S3://b/x/1.png"):  # exit 4, row unnamed
        with pytest.raises(DataError, match=f"^manifest line 3: {re.escape(other)}: a full URI must be s3://"):
            prefixes("a.png", other)
    assert prefixes("s3://z/p/q/1.png", "s3://a/1.png", "s3://a/2.png", "s3://m/p/10.png", "s3://m/p/11.png",
                    "s3://m/p/1.png") == ["s3://b/data", "s3://a", "s3://m/p", "s3://z/p/q"]
    # one key, or one key a prefix of another: no index past the end of the shorter
    assert prefixes("s3://o/k/a.png") == ["s3://b/data", "s3://o/k"]
    assert prefixes("s3://o/k/a.png", "s3://o/k/a.png.png") == ["s3://b/data", "s3://o/k"]
    assert prefixes("s3://o/k/a/1.png", "s3://o/k/b/1.png", "s3://p/x/1.png") == ["s3://b/data", "s3://o/k",
                                                                                 "s3://p/x"]
    assert prefixes("s3://b/database/1.png") == ["s3://b/data", "s3://b/database"]  # outside data/, though alike
    # the common prefix is compared character by character, from the first
    assert prefixes("s3://o/a/1.png", "s3://o/b/1.png") == ["s3://b/data", "s3://o"]
    assert prefixes("s3://o/ab/x/1.png", "s3://o/ac/x/1.png") == ["s3://b/data", "s3://o"]
    # URIs and keys that end in `X` or hold `://` are nothing special
    assert prefixes("s3://b/imgX/1.png", "s3://o/boX/1.png", data_uri="s3://b/imgX/") == ["s3://b/imgX", "s3://o/boX"]
    assert prefixes("s3://o/odd://1.png") == ["s3://b/data", "s3://o/odd:"]


def test_manifest_layout_of_a_data_uri_ending_in_x():
    rows = rows_of("s3://b/imgX/1.png,cat,", "2.png,dog,")
    assert to_layout(rows, "s3://b/imgX/", {"1.png", "2.png"}).files == {"train": {"cat": ["1.png"], "dog": ["2.png"]}}


# ---------------------------------------------------------------- shards.py


def test_shard_names_sorted_per_split_in_split_order():
    rels = ["test/shard-000001.tar", "train/shard-000002.tar", "train/shard-000000.tar", "validation/shard-000000.tar",
            "test/shard-000000.tar", "train/shard-1.tar", "x/train/shard-000000.tar", "train/shard-000000.tar.gz"]
    got = shards.shard_names(rels)
    assert got == {"train": ["train/shard-000000.tar", "train/shard-000002.tar"],
                   "validation": ["validation/shard-000000.tar"],
                   "test": ["test/shard-000000.tar", "test/shard-000001.tar"]}
    assert list(got) == ["train", "validation", "test"]
    assert shards.shard_names(["classes.txt", "train/a/1.jpg"]) == {}


def test_parse_classes_keeps_names_as_written():
    assert shards.parse_classes(b"cat\n dog\r\nemu \n\n  \r\n", "w") == ["cat", " dog", "emu "]
    for text, line in ((b"cat\n\ndog\n", 2), (b"\ncat\ndog", 1), (b"cat\ndog\n \r\nemu\n\n", 3)):
        # a .cls index counts names: whether a blank line counts is a guess (skipped, it shifted the labels after it)
        with pytest.raises(DataError, match=f"^s3://b/classes.txt line {line}: blank, between class names"):
            shards.parse_classes(text, "s3://b/classes.txt")
        assert shards.parse_classes(text, "w", indexed=False) == [n for n in text.decode().split() if n]  # by name
    # A byte-order mark (Windows' Notepad) is not part of the first name; bytes that are not UTF-8 are refused.
    assert shards.parse_classes("\ufeffcaf\u00e9\r\ndog\r\n".encode(), "w") == ["caf\u00e9", "dog"]
    with pytest.raises(DataError, match="^s3://b/classes.txt: not UTF-8 text$"):
        shards.parse_classes("caf\u00e9\ndog\n".encode("latin-1"), "s3://b/classes.txt")
    with pytest.raises(DataError) as e:
        shards.parse_classes(b"cat\n\n", "s3://b/classes.txt")
    assert str(e.value) == "s3://b/classes.txt: 1 class(es); at least 2 are needed"
    with pytest.raises(DataError) as e:
        shards.parse_classes(b"cat\ndog\ncat\n", "s3://b/classes.txt")
    assert str(e.value) == "s3://b/classes.txt line 3: class 'cat' is listed twice (first on line 1)"
    with pytest.raises(DataError) as e:  # by name (multi-label), blank lines counted as lines
        shards.parse_classes(b"a\n\nb\nc\n\nb\n", "w", indexed=False)
    assert str(e.value) == "w line 6: class 'b' is listed twice (first on line 3)"


def test_check_listed_messages():
    found = {"train": ["train/shard-000000.tar", "train/shard-000001.tar"]}
    shards.check_listed({"train/shard-000000.tar", "train/shard-000001.tar"}, found, "s3://b/d")
    with pytest.raises(DataError) as e:
        shards.check_listed({"train/shard-000000.tar"}, found, "s3://b/d")
    assert str(e.value) == ("s3://b/d/train/shard-000001.tar: a shard that index.json does not list (left over from "
                            "an earlier pack?); remove it, or pack again with --overwrite")
    with pytest.raises(DataError) as e:
        shards.check_listed(set(found["train"]) | {"test/shard-000000.tar", "train/shard-000009.tar"}, found, "s3://b/d")
    assert str(e.value) == "s3://b/d/test/shard-000000.tar: listed in index.json but missing"


def test_member_keys():
    assert shards.member_key("cat/1.JPG", "s") == ("cat/1", ".jpg")
    assert shards.member_key("a/b/1.v2.PNG", "s") == ("a/b/1", ".v2.png")
    assert shards.member_key("cat/README", "s") is None and shards.member_key("cat/.hidden.jpg", "s") is None
    assert shards.member_key("v1.2/cat.x/1.jpg", "s") == ("v1.2/cat.x/1", ".jpg")  # dots in folders are no ext
    for name in ("a/./b.jpg", "./../b.jpg", "a/b/.", "/a.jpg", "a/"):
        with pytest.raises(DataError) as e:
            shards.member_key(name, "s3://b/t.tar")
        assert str(e.value) == f"s3://b/t.tar: member {name!r} is not a plain relative path"


NAME = "s3://b/train/shard-000000.tar"


def read(data: bytes, classes=("a", "b"), ignored=None):
    return [(s.key, s.ext, s.image, s.label)
            for s in shards.samples(io.BytesIO(data), NAME, None if classes is None else list(classes), ignored)]


def test_a_samples_extension_is_the_one_its_tar_writes():
    # Matched in lower case, but named so too: a bad `bad.BMP` was reported as `shard.tar:bad.bmp`, a member `tar xf`
    # does not find.
    data = tar_bytes([("x/bad.BMP", b"BM"), ("x/bad.cls", b"0"), ("y.Jpeg", b"\xff"), ("y.CLS", b"1"),
                      ("z.png", b"\x89"), ("z.txt", b"a")])
    assert [(key, ext) for key, ext, _, _ in read(data)] == [("x/bad", ".BMP"), ("y", ".Jpeg"), ("z", ".png")]


def shard_refusal(members, classes=("a", "b")) -> str:
    with pytest.raises(DataError) as e:
        read(tar_bytes(members), classes)
    return str(e.value)


def test_folders_and_links_in_a_shard_are_skipped():
    # (a link named as an image is refused: test_datasets_as_kept.py, test_a_linked_image_member_is_refused_by_name)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind in (("a", tarfile.DIRTYPE), ("a/1.png", tarfile.REGTYPE), ("a/1.cls", tarfile.REGTYPE),
                           ("b/LICENSE", tarfile.SYMTYPE), ("c", tarfile.DIRTYPE), ("c/1.png", tarfile.REGTYPE),
                           ("c/1.txt", tarfile.REGTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            data = {"a/1.png": b"A", "a/1.cls": b"1", "c/1.png": b"C", "c/1.txt": b"a"}.get(name, b"")
            if kind == tarfile.SYMTYPE:
                info.linkname = "../a/1.png"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ignored = []
    assert read(buf.getvalue(), ignored=ignored) == [("a/1", ".png", b"A", 1), ("c/1", ".png", b"C", 0)]
    assert ignored == []


def test_members_of_no_sample_are_named():
    ignored = []
    members = [("LICENSE.txt", b"L"), ("README", b"R"), ("k.png", b"P"), ("k.cls", b"0"), ("docs/n.json", b"{}"),
               ("docs/n.txt", b"t"), ("docs/.hidden", b"h")]
    assert read(tar_bytes(members), ignored=ignored) == [("k", ".png", b"P", 0)]
    assert sorted(ignored) == [f"{NAME}:{m}" for m in ("LICENSE.txt", "README", "docs/.hidden", "docs/n.json",
                                                          "docs/n.txt")]
    assert read(tar_bytes(members)) == [("k", ".png", b"P", 0)]  # without a list to fill


def test_a_sample_whose_members_are_not_adjacent_is_refused():
    members = [("k1.png", b"1"), ("k1.cls", b"0"), ("k2.png", b"2"), ("k2.cls", b"1"), ("k1.jpg", b"3"),
               ("k1.cls", b"1")]
    assert shard_refusal(members) == (f"{NAME}: sample k1 occurs twice (its members are not adjacent, or two samples "
                                      "share a key)")
    # A stray label after its image's group is a group of no sample: skipped and named, not a second k1.
    ignored = []
    members = [("k1.png", b"1"), ("k1.cls", b"0"), ("k2.png", b"2"), ("k2.cls", b"1"), ("k1.txt", b"b")]
    assert read(tar_bytes(members), ignored=ignored) == [("k1", ".png", b"1", 0), ("k2", ".png", b"2", 1)]
    assert ignored == [f"{NAME}:k1.txt"]
    # `tar -cf x.tar .` in a folder: directory order, each label away from its image: said so, with the remedy.
    members = [("./2.txt", b"a"), ("./1.png", b"1"), ("./2.png", b"2"), ("./1.txt", b"b")]
    assert shard_refusal(members) == f"{NAME}: 1.png has no label (1.cls or 1.txt) {shards.BESIDE}"


def test_shard_messages():
    assert shard_refusal([("k.png", b"P"), ("k.jpg", b"J"), ("k.cls", b"0")]) == \
        f"{NAME}: sample k has 2 images (.png, .jpg, .cls); expected one"
    assert shard_refusal([("k.png", b"P")]) == f"{NAME}: k.png has no label (k.cls or k.txt) {shards.BESIDE}"
    assert shard_refusal([("k.png", b"P"), ("k.cls", b"2")]) == f"{NAME}: k.cls is '2', not a class index (0..1)"
    assert shard_refusal([("k.png", b"P"), ("k.cls", b"-1")]) == f"{NAME}: k.cls is '-1', not a class index (0..1)"
    assert shard_refusal([("k.png", b"P"), ("k.cls", b"\xff")]) == \
        f"{NAME}: k.cls is '\ufffd', not a class index (0..1)"
    assert shard_refusal([("k.png", b"P"), ("k.cls", b"0")], classes=None) == \
        f"{NAME}: k.cls is '0', not a class index (no classes.txt beside the shards)"
    assert shard_refusal([("k.png", b"P"), ("k.txt", b"a")], classes=None) == \
        f"{NAME}: k.txt names class 'a', which classes.txt does not list"
    assert shard_refusal([("k.png", b"P"), ("k.txt", b"\xff\n")]) == f"{NAME}: k.txt is not UTF-8 text (classes.txt is)"
    assert shard_refusal([("k.png", b"P"), ("k.txt", b"cat")], classes=(" cat", "cat ")) == \
        f"{NAME}: k.txt names class 'cat', which could be any of ' cat', 'cat ' in classes.txt (names are exact, " \
        "spaces included)"


def test_corrupt_shard_message():
    data = tar_bytes([("k.png", b"P" * 2000), ("k.cls", b"0")])[:1000]
    with pytest.raises(DataError) as e:
        read(data)
    assert str(e.value).startswith(f"{NAME}: not a readable tar file (ReadError: ") and \
        str(e.value).endswith("); is it truncated?")


def test_a_shard_member_that_would_leave_the_folder_names_the_shard():
    assert shard_refusal([("k.png", b"P"), ("k.cls", b"0"), ("../k2.png", b"P")]) == \
        f"{NAME}: member '../k2.png' is not a plain relative path"


class Body:
    """An HTTP body: read() only, no seek or tell."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def read(self, n=-1):
        return self._data.read(n)


def test_a_member_name_that_is_not_utf8_is_refused_naming_its_bytes():
    # Written by a tool that kept Latin-1 names (tarfile writes surrogate escapes back as the bytes they stand for).
    name = os.fsdecode(b"caf\xe9.png")
    refusal = shard_refusal([(name, b"P"), (os.fsdecode(b"caf\xe9.cls"), b"0")])
    assert refusal == f"{NAME}: member caf\\xe9.png: {layout.NOT_UTF8} (and pack again)"


def test_labels_written_with_a_byte_order_mark_read_as_without():
    # Windows' Notepad starts a UTF-8 file with a byte-order mark: `k.txt` names class b all the same.
    members = [("k1.png", b"1"), ("k1.txt", "\ufeffb\r\n".encode()), ("k2.png", b"2"), ("k2.cls", "\ufeff0".encode())]
    assert read(tar_bytes(members)) == [("k1", ".png", b"1", 1), ("k2", ".png", b"2", 0)]


def test_a_shard_is_read_as_a_stream_plain_or_compressed():
    members = [("k1.png", b"1" * 3000), ("k1.cls", b"1"), ("k2.jpg", b"2"), ("k2.txt", b"a")]
    want = [("k1", ".png", b"1" * 3000, 1), ("k2", ".jpg", b"2", 0)]
    for data in (tar_bytes(members), tar_bytes(members, "w:gz")):
        got = [(s.key, s.ext, s.image, s.label) for s in shards.samples(Body(data), NAME, ["a", "b"])]
        assert got == want


def test_labels_by_index_and_by_name_at_the_edges():
    members = [("k0.png", b"0"), ("k0.cls", b" 1\n"), ("k1.png", b"1"), ("k1.txt", b"dog \n"),
               ("k2.png", b"2"), ("k2.txt", b"dog \r\n"), ("k3.png", b"3"), ("k3.txt", b"dog"),
               ("k4.png", b"4"), ("k4.txt", b" cat"), ("k5.png", b"5"), ("k5.txt", b"cat\n"),
               ("k6.png", b"6"), ("k6.cls", b"2")]
    got = read(tar_bytes(members), classes=(" cat", "dog", "dog "))
    assert [(key, label) for key, _, _, label in got] == [("k0", 1), ("k1", 2), ("k2", 2), ("k3", 1), ("k4", 0),
                                                          ("k5", 0), ("k6", 2)]
    # `dog` plus spaces could be either class: refused, not guessed
    assert shard_refusal([("k.png", b"P"), ("k.txt", b" dog")], classes=(" cat", "dog", "dog ")) == \
        f"{NAME}: k.txt names class ' dog', which could be any of 'dog', 'dog ' in classes.txt (names are exact, " \
        "spaces included)"


def test_split_keys_name_both_places():
    keys = shards.SplitKeys("validation")
    keys.add("cat/1", "s0:cat/1.jpg")
    keys.add("cat/2", "s0:cat/2.jpg")
    with pytest.raises(DataError) as e:
        keys.add("cat/1", "s1:cat/1.png")
    assert str(e.value) == "sample key cat/1 occurs twice in split validation: s0:cat/1.jpg and s1:cat/1.png"


def _writer(tmp_path, max_bytes):
    done = []
    return shards.ShardWriter(tmp_path / "out", "train", max_bytes, done.append), done


def _members(path):
    with tarfile.open(path) as tar:
        return [(m.name, m.size, m.mode, m.mtime, m.type, tar.extractfile(m).read()) for m in tar]


def test_shard_writer_fills_shards_up_to_max_bytes(tmp_path):
    # A shard on disk is at most max_bytes (a sample may exceed it alone) and holds as many samples as fit.
    # `--shard-size 1MB` made shards of 1,126,400 bytes: the estimate left out the members' padding to whole blocks,
    # the two end blocks and tarfile's padding of the archive to whole 10,240-byte records.
    writer, done = _writer(tmp_path, 20_480)  # a 4,000-byte image and its label: 5,632 bytes in a tar; 3 fit
    for n in range(7):
        writer.add(f"c/{n}", ".png", b"x" * 4000, n % 2)
    writer.close()
    writer.close()  # once more: nothing is reported twice
    out = tmp_path / "out"
    assert done == [out / f"train/shard-00000{n}.tar" for n in range(3)]
    assert writer.counts == {"train/shard-000000.tar": 3, "train/shard-000001.tar": 3, "train/shard-000002.tar": 1}
    assert [p.stat().st_size for p in done] == [20_480, 20_480, 10_240]
    assert _members(done[0])[:2] == [("c/0.png", 4000, 0o644, 0, tarfile.REGTYPE, b"x" * 4000),
                                     ("c/0.cls", 1, 0o644, 0, tarfile.REGTYPE, b"0")]
    with open(done[2], "rb") as f:
        assert [(s.key, s.ext, s.label) for s in shards.samples(f, "s", ["a", "b"])] == [("c/6", ".png", 0)]
    # Samples of many sizes against a 1 MB limit: every shard within it, none that the next sample would have fit.
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 3000, 1500).tolist()  # small images: their blocks' padding is a good share of them
    writer, done = _writer(tmp_path / "many", 1_000_000)
    for n, size in enumerate(sizes):
        writer.add(f"c/{n}", ".jpg", b"j" * size, 0)
    writer.close()
    assert all(p.stat().st_size <= 1_000_000 for p in done)
    firsts = np.cumsum([0, *(writer.counts[p.relative_to(tmp_path / "many" / "out").as_posix()] for p in done)])
    for i, path in enumerate(done[:-1]):  # the next shard's first sample would not have fitted in this one
        grown = tmp_path / "grown.tar"
        with tarfile.open(path) as tar, tarfile.open(grown, "w") as out_tar:
            for member in tar.getmembers():
                out_tar.addfile(member, tar.extractfile(member))
            for name, data in ((f"c/{firsts[i + 1]}.jpg", b"j" * sizes[firsts[i + 1]]), ("x.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                out_tar.addfile(info, io.BytesIO(data))
        assert grown.stat().st_size > 1_000_000


def test_shard_writer_puts_an_oversized_sample_alone(tmp_path):
    writer, done = _writer(tmp_path, 1000)
    writer.add("big", ".jpg", b"J" * 5000, 11)
    writer.add("small", ".jpg", b"j", 1)
    writer.add("big2", ".jpg", b"J" * 5000, 0)
    assert len(done) == 2  # complete shards are reported as soon as the next one starts
    writer.close()
    assert writer.counts == {"train/shard-000000.tar": 1, "train/shard-000001.tar": 1, "train/shard-000002.tar": 1}
    assert [m[0] for m in _members(done[0])] == ["big.jpg", "big.cls"] and _members(done[0])[1][-1] == b"11"


def test_shard_writer_without_samples_writes_nothing(tmp_path):
    writer, done = _writer(tmp_path, 1000)
    writer.close()
    assert done == [] and writer.counts == {} and not (tmp_path / "out").exists()


def test_index_json():
    text = shards.index(["a", "b"], {"train": {"a": 1, "b": 2}}, {"train/shard-000000.tar": 3})
    assert text.endswith("}\n")
    assert json.loads(text) == {"task": "single_label", "classes": ["a", "b"], "counts": {"train": {"a": 1, "b": 2}},
                                "images": {}, "shards": {"train/shard-000000.tar": 3}}


# ---------------------------------------------------------------- bugs these tests found (fixed in c8ffc49)


def test_a_csv_manifest_with_cr_line_endings_is_read_and_csv_errors_are_data_errors():
    # Classic Mac line endings (Excel "CSV (Macintosh)") were a csv.Error escaping parse() (exit 1, no line named).
    for data in (b"path,label\ra.png,cat\rb.png,dog\r", b"path,label\r\na.png,cat\r\nb.png,dog\r\n"):
        assert [(r.line, r.path, r.label) for r in manifest.parse(data, "m.csv")] == [(2, "a.png", "cat"),
                                                                                     (3, "b.png", "dog")]
    assert refusal("path,label\na\rb.png,cat\n") == "m.csv line 2: 1 fields, expected 2 (path,label)"
    # A line break inside a quoted field is a quote left open, never a path or a label (a file named with a CR,
    # which this once read, is not worth the open quote it hides).
    assert refusal('path,label\n"a\rb.png",cat\n') == "m.csv line 2: a quoted field runs over lines 2 to 3: a " \
                                                       "quote left open? (a path or a label holds no line break)"
    assert refusal("path,label\n" + "x" * 200_000 + ".png,cat\n") == \
        "m.csv line 2: not CSV (field larger than field limit (131072))"


def test_a_jsonl_manifest_is_split_at_newlines_only_and_its_labels_are_exact():
    # json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw inside strings; str.splitlines() cut
    # the line there and refused a valid manifest as "not a JSON object". (In a path here: a label holding a line
    # break is refused at its line, below.)
    lines = [json.dumps({"path": f" {n}{odd}.png ", "label": label}, ensure_ascii=False)
             for n, (odd, label) in enumerate([("a\u2028b", "x"), ("c\x85", "y"), ("d\u2029", " cat ")])]
    got = parse("\n".join(lines) + "\n", "m.jsonl")
    assert [(r.line, r.path, r.label) for r in got] == [(1, "0a\u2028b.png", "x"), (2, "1c\x85.png", "y"),
                                                        (3, "2d\u2029.png", " cat ")]
    for label in ("a\u2028b", "c\x85", "x\x0cy"):
        line = json.dumps({"path": "5.png", "label": label}, ensure_ascii=False)
        assert refusal(lines[0] + "\n" + line + "\n", "m.jsonl") == \
            f"m.jsonl line 2: label {ascii(label)} holds a line break; labels.txt keeps one class per line, so " \
            "rename it"


def test_a_jsonl_number_past_pythons_digit_limit_is_a_data_error():
    # json's ValueError for an int of over 4,300 digits has no .msg: AttributeError, exit 1 with a traceback
    text = '{"path": "a.png", "label": ' + "1" * 4301 + "}\n"
    assert refusal(text, "m.jsonl").startswith("m.jsonl line 1: not a JSON object (Exceeds the limit (4300 digits)")


def test_a_cls_label_of_a_non_ascii_digit_is_a_data_error():
    # "²".isdigit() is True but int("²") raised ValueError: exit 1 instead of a DataError naming the member.
    for digit in ("²", "١"):
        assert shard_refusal([("k.png", b"P"), ("k.cls", digit.encode())]) == \
            f"{NAME}: k.cls is {digit!r}, not a class index (0..1)"


def test_packed_class_names_read_back_as_packed(tmp_path):
    # pack writes classes.txt one class per line. A class name with any break that str.splitlines splits at
    # (\n, \r, \x0b, \x0c, \x1c-\x1e, \x85, U+2028, U+2029) would shift the names after it in classes.txt or in
    # a run's labels.txt as other tools read them: the listing refuses it, so pack writes nothing.
    for c in ("dog", "cat\u00e9  two spaces"):
        (tmp_path / "data/train" / c).mkdir(parents=True)
        (tmp_path / "data/train" / c / "1.png").write_bytes(b"P")
    result = pack(str(tmp_path / "data"), str(tmp_path / "shards"), 10_000)
    text = (tmp_path / "shards" / shards.CLASSES).read_bytes()
    assert shards.parse_classes(text, "classes.txt") == result["classes"]
    assert shards.parse_classes(b"a\r\nb\rc\nd\r\n\r\n", "w") == ["a", "b\rc", "d"]
    for i, c in enumerate(("page\x0cbreak", "line\u2028sep", "next\x85line", "two\nlines")):
        (tmp_path / "data/train" / c).mkdir()
        (tmp_path / "data/train" / c / "1.png").write_bytes(b"P")
        with pytest.raises(DataError, match=f"class name {re.escape(ascii(c))} holds a line break"):
            pack(str(tmp_path / "data"), str(tmp_path / f"shards{i}"), 10_000)
        assert not (tmp_path / f"shards{i}").exists()
        (tmp_path / "data/train" / c / "1.png").unlink()
        (tmp_path / "data/train" / c).rmdir()


@pytest.mark.parametrize(("line", "expected"), [
    # "Split" or "subset" beside the keys read was ignored: the test images were trained on, without a word.
    ('{"path": "a.png", "label": "c", "Split": "test"}', "key 'Split' is not read (did you mean 'split'? keys are "
                                                         "lower case, as written)"),
    ('{"path": "a.png", "label": "c", "subset": "val"}', "key 'subset' holds the split name 'val', but the split is "
                                                         "read from \"split\" only: rename the key (`jq -c '.split = "
                                                         ".subset | del(.subset)'`)"),
    ('{"path": "a.png", "labels": ["c"], " LABEL": "x"}', "key ' LABEL' is not read (did you mean 'label'?"),
    # Written twice: Python's JSON reader kept the last silently (the image trained as the second class).
    ('{"path": "a.png", "label": "c", "label": "d"}', "key 'label' written twice (a JSON reader keeps one of them "
                                                      "silently)"),
])
def test_a_json_line_key_that_would_be_ignored_or_overwritten_is_refused(line, expected):
    message = refusal('{"path": "b.png", "label": "c", "source": "web", "note": null}\n' + line + "\n", "m.jsonl")
    assert message.startswith(f"m.jsonl line 2: {expected}")


def test_other_json_keys_are_metadata_even_when_they_hold_split_like_words():
    # Beside "split" (the split is read there), and for words that are more than split names.
    rows = parse('{"path": "a.png", "label": "c", "split": "train", "orig_split": "validation"}\n'
                 '{"path": "b.png", "label": "d", "annotator": "dev", "stage": "eval"}\n', "m.jsonl")
    assert [(r.path, r.split) for r in rows] == [("a.png", "train"), ("b.png", None)]


def test_local_manifest_paths_are_read_however_they_are_spelled(tmp_path, monkeypatch):
    # `images//a.png` and `images/./b.png` were "does not exist"; an absolute path inside data.uri was "outside
    # data.uri" when data.uri was relative, held a `..` or a symlink; a file:// URI of an image listed by its
    # relative path too was two images.
    data = tmp_path / "d"
    (data / "images").mkdir(parents=True)
    (tmp_path / "link").symlink_to(data)
    existing = {f"images/{n}.png" for n in "abcdef"}
    monkeypatch.chdir(tmp_path)
    rows = rows_of("images//a.png,cat,", "images/./b.png,dog,", f"{data}/images/c.png,cat,",
                   f"{tmp_path}/x/../d/images/d.png,dog,", f"{tmp_path}/link/images/e.png,cat,",
                   f"file://{data}/images/f.png,dog,", f"{data}/images/../images/g.png,cat,")
    existing.add("images/g.png")
    for uri in ("d", str(data), f"{tmp_path}/link", f"file://{data}"):
        assert sorted(to_layout(rows, uri, existing).keys()) == sorted(existing), uri
    twice = rows_of("images/a.png,cat,", f"file://{data}/images/a.png,cat,", "images/b.png,dog,")
    assert layout_refusal(twice, str(data), existing) == f"m.csv line 3: file://{data}/images/a.png is listed twice " \
                                                         "(first on line 2)"
    outside = rows_of("images/a.png,cat,", f"{tmp_path}/elsewhere/b.png,dog,")
    assert "is outside data.uri" in layout_refusal(outside, "d", existing)
    assert "has a '..' part" in layout_refusal(rows_of("images/../images/a.png,cat,", "images/b.png,dog,"), "d",
                                               existing)


@given(st.lists(st.booleans(), min_size=1, max_size=8), st.data())
def test_a_quote_left_open_in_a_csv_is_named_at_its_line(blank_after, data):
    # It swallowed the lines after it into one field: a class named with line breaks, said of data.uri with no
    # line, or "1 class(es) in train" when the quote sat on the first row.
    lines, where = [], {}
    for i, blank in enumerate(blank_after):
        where[i] = len(lines) + 2  # (line 1 is the header)
        lines.append(f"{i}.png,c{i % 2}")
        if blank:
            lines.append("")
    k = data.draw(st.integers(0, len(blank_after) - 1))
    lines[where[k] - 2] = f'"{k}.png,c{k % 2}'
    ending = data.draw(st.sampled_from(["\n", "\r\n"]))
    message = refusal(ending.join(["path,label", *lines]) + ending)
    assert message.startswith(f"m.csv line {where[k]}: a quoted field runs over lines {where[k]} to ")
    assert message.endswith("a quote left open? (a path or a label holds no line break)")


def test_ndjson_is_json_lines():
    # `.ndjson` was read as a CSV and refused for its header.
    rows = parse('{"path": "a.png", "label": "cat"}\n{"path": "b.png", "label": "dog"}\n', "m.ndjson")
    assert [(r.path, r.label) for r in rows] == [("a.png", "cat"), ("b.png", "dog")]


def test_a_sample_labelled_twice_is_refused_unless_its_labels_agree():
    # `x.cls` 0 beside `x.txt` b: the .cls won without a word; `x.cls` and `x.CLS`: the last one won.
    assert shard_refusal([("x.png", b"P"), ("x.cls", b"0"), ("x.txt", b"b")]) == \
        f"{NAME}: sample x has two labels: x.cls says 'a', x.txt says 'b'"
    assert read(tar_bytes([("x.png", b"P"), ("x.cls", b"1"), ("x.txt", b"b")])) == [("x", ".png", b"P", 1)]
    assert shard_refusal([("x.png", b"P"), ("x.cls", b"0"), ("x.CLS", b"1")]) == \
        f"{NAME}: sample x has two .cls members (extensions differ only in case; x.CLS is the second)"
