"""Manifests and tar shards (job/manifest.py, job/shards.py, job/pack.py): parsing, the strict checks with
the file and line (or member) named, and `pack` round-tripping a folder dataset. No TensorFlow."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from conftest import tar_bytes
from hypothesis import example, given
from hypothesis import strategies as st

from job import manifest, shards, sources
from job.config import Config
from job.errors import ConfigError, DataError
from job.pack import pack, parse_size
from job.sample_data import write_sample_dataset
from job.uris import within


def rows(text: str, name: str = "m.csv"):
    return manifest.parse(text.encode(), name)


def test_csv_and_jsonl_manifests():
    csv_rows = rows("path,label,split\na/1.png,cat,train\ns3://other/x/2.jpg,dog,validation\n\n")
    assert [(r.line, r.path, r.label, r.split) for r in csv_rows] == [
        (2, "a/1.png", "cat", "train"), (3, "s3://other/x/2.jpg", "dog", "validation")]
    jsonl = rows('{"path": "a/1.png", "label": "cat"}\n\n{"path": "b.png", "label": "dog", "split": "test"}\n',
                 "m.jsonl")
    assert [(r.line, r.split) for r in jsonl] == [(1, None), (3, "test")]
    assert rows('{"path": "a.png", "label": 3}\n', "m.jsonl")[0].label == "3"  # class ids as integers are names too
    assert rows("\ufeffpath,label\nx.png,a\n")[0].path == "x.png"  # a BOM from Excel is fine


@pytest.mark.parametrize("text, name, message", [
    ("file,class\nx.png,a\n", "m.csv",
     "m.csv line 1: the header must be 'path,label[,split]' (or multi-label 'path,labels[,split]')"),
    ("path,label\nx.png,\n", "m.csv", "m.csv line 2: empty label for x.png"),
    ("path,label,split\nx.png,a,holdout\n", "m.csv", "m.csv line 2: unknown split 'holdout'"),
    ("path,label\nx.png,a,extra\n", "m.csv", "m.csv line 2: 3 fields, expected 2"),
    ("path,label\nnotes.txt,a\n", "m.csv", "m.csv line 2: notes.txt is not an image"),
    ('{"path": "x.png"}\n', "m.jsonl", 'm.jsonl line 1: expected an object with "path" and "label"'),
    ("{nope\n", "m.jsonl", "m.jsonl line 1: not a JSON object"),
    # Lines that are arrays are JSON lines of the wrong shape, not one array to split with jq.
    ('["a/1.png", "cat"]\n["a/2.png", "dog"]\n', "m.jsonl", 'm.jsonl line 1: expected an object with "path"'),
    # One JSON document instead of JSON lines: an array (on one line or many), objects written over several lines.
    ('[{"path": "x.png", "label": "a"}]\n', "m.json", "m.json: a JSON array; a JSON manifest is JSON lines, one "
                                                     "object per line, as `jq -c '.[]'` writes them from an array"),
    ('\ufeff\n [\n  {"path": "x.png",\n   "label": "a"}\n]\n', "m.json", "m.json: a JSON array;"),
    ('{\n "path": "x.png",\n "label": "a"\n}\n', "m.jsonl", "m.jsonl line 1: not a JSON object (Expecting property "
                                                          "name enclosed in double quotes); an object over several "
                                                          "lines? JSON lines keep each object on one line"),
    # A list under "label" used to become the class "['shoe']"; true the class "True".
    ('{"path": "x.png", "label": "a"}\n{"path": "y.png", "label": ["shoe"]}\n', "m.jsonl",
     'm.jsonl line 2: "label" must be a class name (a string or an integer), not ["shoe"] (a list of labels is '
     'multi-label: "labels" and task: multi_label)'),
    ('{"path": "x.png", "label": true}\n', "m.jsonl", 'm.jsonl line 1: "label" must be a class name (a string or an '
     'integer), not true'),
    ('{"path": "x.png", "label": 1.5}\n', "m.jsonl", 'm.jsonl line 1: "label" must be a class name'),
    ("path,label\n", "m.csv", "m.csv: no entries"),
])
def test_bad_manifests_name_the_line(text, name, message):
    with pytest.raises(DataError) as e:
        rows(text, name)
    assert str(e.value).startswith(message)


def test_manifest_not_utf8():
    with pytest.raises(DataError, match="m.csv: not UTF-8 text"):
        manifest.parse("path,label\nbl\xe5.png,a\n".encode("latin-1"), "m.csv")


def test_manifest_layout_checks_objects_duplicates_and_classes():
    text = "path,label,split\n{}\n"
    ok = "a/1.png,cat,train\na/2.png,dog,train\ns3://elsewhere/p/3.png,cat,test\n"
    existing = {"a/1.png", "a/2.png", "s3://elsewhere/p/3.png"}
    layout = manifest.to_layout(rows(text.format(ok)), "m.csv", "s3://b/data", existing)
    assert layout.classes == ["cat", "dog"]
    assert layout.files["test"] == {"cat": ["s3://elsewhere/p/3.png"], "dog": []}
    assert manifest.to_layout(rows("path,label\ns3://b/data/a/1.png,cat\na/2.png,dog\n"), "m.csv", "s3://b/data",
                              existing).files["train"] == {"cat": ["a/1.png"], "dog": ["a/2.png"]}
    # Paths as `find .` writes them name the same objects.
    assert manifest.to_layout(rows("path,label\n./a/1.png,cat\n././a/2.png,dog\n"), "m.csv", "s3://b/data",
                              existing).files["train"] == {"cat": ["a/1.png"], "dog": ["a/2.png"]}
    for body, message in [
        (ok + "./a/1.png,dog,test\n", "m.csv line 5: ./a/1.png is listed twice (first on line 2)"),
        (ok + "../up/1.png,dog,test\n", "m.csv line 5: ../up/1.png has a '..' part; give the path below data.uri "
                                         "(s3://b/data) without one, or as a full URI"),
        (ok + "s3://elsewhere/p/../../x.png,dog,test\n", "m.csv line 5: s3://elsewhere/p/../../x.png has a '..' part"
                                                          "; give the path below data.uri (s3://b/data) without one, "
                                                          "or as a full URI"),
        (ok + "a/9.png,cat,train\n", "m.csv line 5: a/9.png does not exist under s3://b/data"),
        # A path written on Windows that names an object with '/': said so (a '\\' is a legal key character).
        (ok + "a\\1.png,dog,test\n", "m.csv line 5: a\\1.png does not exist under s3://b/data (a/1.png does: "
                                       "write paths with '/')"),
        (ok + "a\\9.png,dog,test\n", "m.csv line 5: a\\9.png does not exist under s3://b/data"),
        # An absolute local path that data.uri does not hold was "does not exist", though it did.
        (ok + "/home/me/a/1.png,dog,test\n", "m.csv line 5: /home/me/a/1.png is outside data.uri (s3://b/data); "
                                            "paths are relative to it, or full s3:// URIs: set data.uri to a folder "
                                            "that holds them all"),
        (ok + ".\\a\\1.png,dog,test\n", "m.csv line 5: .\\a\\1.png does not exist under s3://b/data (a/1.png does: "
                                           "write paths with '/')"),
        (ok + "a/1.png,dog,test\n", "m.csv line 5: a/1.png is listed twice (first on line 2)"),
        (ok.replace("s3://elsewhere/p/3.png,cat,test", "s3://elsewhere/p/3.png,bird,test"),
         "m.csv line 4: class 'bird' of split test has no training images"),
    ]:
        with pytest.raises(DataError) as e:
            manifest.to_layout(rows(text.format(body)), "m.csv", "s3://b/data", existing)
        assert str(e.value) == message
    assert manifest.listing_prefixes(rows(text.format(ok + "s3://elsewhere/p/q/4.png,dog,train\n")),
                                     "s3://b/data") == ["s3://b/data", "s3://elsewhere/p"]


def read(data: bytes, classes=("a", "b")):
    return list(shards.samples(io.BytesIO(data), "s3://b/train/shard-000000.tar", list(classes)))


def test_shard_samples_and_their_labels():
    data = tar_bytes([("k1.png", b"P1"), ("k1.cls", b"1"), ("k2.jpg", b"J2"), ("k2.txt", b"a\n")])
    got = read(data)
    assert [(s.key, s.ext, s.image, s.label) for s in got] == [("k1", ".png", b"P1", 1), ("k2", ".jpg", b"J2", 0)]


@pytest.mark.parametrize("members, message", [
    ([("k1.png", b"P"), ("k2.png", b"P"), ("k2.cls", b"0")], "k1.png has no label (k1.cls or k1.txt)"),
    ([("k1.png", b"P"), ("k1.cls", b"7")], "k1.cls is '7', not a class index (0..1)"),
    ([("k1.png", b"P"), ("k1.txt", b"zebra")], "k1.txt names class 'zebra', which classes.txt does not list"),
    ([("k1.png", b"P"), ("k1.jpg", b"J"), ("k1.cls", b"0")], "sample k1 has 2 images"),
    # said to differ in case, though the names were the same
    ([("k1.png", b"P"), ("k1.png", b"Q"), ("k1.cls", b"0")], "member k1.png occurs twice"),
    # WebDataset metadata that is not a label list: no label, not advice to train multi-label
    ([("k1.png", b"P"), ("k1.json", b'{"caption": "a cat", "labels": "cat"}')], "k1.png has no label (k1.cls or"),
    ([("k1.png", b"P"), ("k1.json", b"\xff not json")], "k1.png has no label (k1.cls or k1.txt)"),
])
def test_bad_shards_name_the_member(members, message):
    with pytest.raises(DataError) as e:
        read(tar_bytes(members))
    assert str(e.value).startswith("s3://b/train/shard-000000.tar: ") and message in str(e.value)


@pytest.mark.parametrize("kind, word", [(tarfile.LNKTYPE, "hard"), (tarfile.SYMTYPE, "symbolic")])
def test_a_linked_image_member_is_refused_by_name(kind, word):
    # Dropped without a word about links: its label was named "a member of no sample", 9 images lost of 81.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("orig/k1.bak", b"P"), ("k0.png", b"P"), ("k0.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("k1.png")
        link.type, link.linkname = kind, "orig/k1.bak"
        tar.addfile(link)
        label = tarfile.TarInfo("k1.cls")
        label.size = 1
        tar.addfile(label, io.BytesIO(b"1"))
    with pytest.raises(DataError, match=f"^s3://b/train/shard-000000.tar: member k1.png is a {word} link \\(to "
                                        "orig/k1.bak\\), which a shard read as a stream cannot follow"):
        read(buf.getvalue())


def test_corrupt_and_truncated_shards():
    good = tar_bytes([("k1.png", b"P" * 2000), ("k1.cls", b"0")])
    for data in (good[:700], b"this is not a tar file at all" * 40):
        with pytest.raises(DataError, match="shard-000000.tar: not a readable tar file"):
            read(data)


def _member_ends(members: list[tuple[str, bytes]]) -> list[int]:
    """The byte offsets where each member of an uncompressed tar_bytes tar ends (header and padded data)."""
    ends, at = [], 0
    for _, data in members:
        at += 512 + -(-len(data) // 512) * 512
        ends.append(at)
    return ends


@given(st.lists(st.binary(min_size=1, max_size=1500), min_size=1, max_size=5), st.data())
def test_a_tar_cut_at_a_members_end_or_joined_to_another_is_refused(images, data):
    """tarfile reads a tar cut at a member's boundary as a shorter tar, and stops at the first end of two tars
    joined with `cat`: both lost samples without a word. Whole tars, compressed or not, read completely."""
    members = [m for i, image in enumerate(images) for m in ((f"k{i}.png", image), (f"k{i}.cls", b"0"))]
    whole = tar_bytes(members)
    assert [s.image for s in read(whole)] == images
    assert [s.image for s in read(tar_bytes(members, "w:gz"))] == images
    j = data.draw(st.integers(0, len(members) - 1), label="cut after member")
    cut = _member_ends(members)[j]
    with pytest.raises(DataError, match="shard-000000.tar: ends after a member or inside a member's header, "
                                        "without the tar's end-of-archive block: cut short"):
        read(whole[:cut])
    if j % 2:  # cut after a label, then ended as a tar: a shorter tar, read as it is
        assert [s.image for s in read(whole[:cut] + bytes(1024))] == images[:(j + 1) // 2]
    other = [("z.png", b"Z"), ("z.cls", b"1")]
    for joined in (whole + tar_bytes(other), tar_bytes(members, "w:gz") + tar_bytes(other, "w:gz")):
        with pytest.raises(DataError, match="holds data after the tar's end-of-archive block .tars joined with `cat`"):
            read(joined)
    assert [s.image for s in read(tar_bytes(members, "w:gz") + bytes(100))] == images  # zeros after it are padding


@given(st.lists(st.binary(min_size=1, max_size=1500), min_size=2, max_size=5), st.data())
def test_a_tar_cut_anywhere_or_with_a_damaged_header_never_reads_as_a_shorter_one(images, data):
    """Cut inside a header after the first member, tarfile ends the archive there: 343 of 1,367 cut points read as
    a shorter tar, exit 0, samples lost. A damaged header was "tars joined with `cat`", or nothing at all."""
    members = [m for i, image in enumerate(images) for m in ((f"k{i}.png", image), (f"k{i}.cls", b"0"))]
    whole = tar_bytes(members)
    for body in (whole, tar_bytes(members, "w:gz")):
        cut = data.draw(st.integers(1, len(body) - 1), label="cut at")
        try:
            assert [s.image for s in read(body[:cut])] == images  # only a cut in the end blocks reads: all of it
        except DataError as e:
            assert "shard-000000.tar:" in str(e)
    header = data.draw(st.sampled_from(_member_ends(members)[:-1]), label="damaged header at")
    damaged = bytearray(whole)
    damaged[header + data.draw(st.integers(0, 99), label="in its name")] ^= 0x5A  # its checksum no longer holds
    with pytest.raises(DataError, match=f"shard-000000.tar: a damaged member header at byte {header} "):
        read(bytes(damaged))
    # A bit flipped in a .tar.gz: tarfile checks no gzip CRC, and 267 of 300 flips gave other image bytes, exit 0.
    packed = bytearray(tar_bytes(members, "w:gz"))
    at = data.draw(st.integers(10, len(packed) - 9), label="bit flipped at")  # past gzip's header, before its trailer
    packed[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    try:  # refused, or (a bit deflate does not use, 4 flips in 300) the very same samples
        assert [s.image for s in read(bytes(packed))] == images
    except DataError as e:
        assert "shard-000000.tar: " in str(e)


def test_a_gzip_shard_whose_data_fails_its_crc_is_refused():
    # A byte of an image changed inside a .tar.gz (deflate's stored blocks keep it where it was): the tar's structure
    # holds, tarfile checks no CRC, and the run trained on other pixels, exit 0.
    import gzip

    image = bytes(range(256)) * 4
    stored = bytearray(gzip.compress(tar_bytes([("k.png", image), ("k.cls", b"0")]), compresslevel=0))
    assert [s.image for s in read(bytes(stored))] == [image]
    stored[stored.index(image) + 100] ^= 0x01
    with pytest.raises(DataError, match="^s3://b/train/shard-000000.tar: its gzip data fails its CRC check "):
        read(bytes(stored))


@given(st.sampled_from(["train", "validation", "test", "val", "Train", "dev", "."]),
       st.from_regex(r"shard-[0-9]{1,7}", fullmatch=True), st.sampled_from([".tar", ".TAR", ".tar.gz", ".tgz"]))
def test_every_tar_named_like_a_shard_is_read_or_refused(split, stem, ext):
    """A shard named otherwise than `<split>/shard-NNNNNN.tar` was ignored without a word (its images never
    trained): each such name is now either read or refused, never both, never neither."""
    rel = f"{stem}{ext}" if split == "." else f"{split}/{stem}{ext}"
    read_as_shard = bool(shards.shard_names([rel]))
    for sharded in (False, True):
        assert read_as_shard != bool(shards.misnamed([rel], sharded))
    assert read_as_shard == (split in ("train", "validation", "test") and ext == ".tar" and len(stem) == 12)
    hidden = f"{split}/._{stem}{ext}"  # macOS' AppleDouble files beside them are no shards
    assert not shards.shard_names([hidden]) and not shards.misnamed([hidden], True)


def test_an_archive_in_a_folder_dataset_stays_an_ignored_object(tmp_path, capsys):
    # Refused as a misnamed shard, a folder dataset with its originals' archive in train/ could not run at all.
    write_sample_dataset(tmp_path / "d", classes=2, per_class=3, size=8, seed=0, test_per_class=0)
    (tmp_path / "d" / "train" / "original-images.tar.gz").write_bytes(b"")
    cfg = Config.model_validate({"data": {"uri": str(tmp_path / "d")}, "output": {"uri": str(tmp_path / "o")},
                                 "model": {"weights": "none"}})
    assert sources.open_source(cfg).layout.count("train") == 6
    assert "original-images.tar.gz" in capsys.readouterr().out
    (tmp_path / "d" / "train" / "shard-000001.tar.gz").write_bytes(b"")  # named as a shard: meant as one
    with pytest.raises(DataError, match="train/shard-000001.tar.gz: a tar the job does not read"):
        sources.open_source(cfg)


def test_misnamed_shards_are_refused_naming_one(tmp_path):
    write_sample_dataset(tmp_path / "d", classes=2, per_class=4, size=8, seed=0, test_per_class=1)
    pack(str(tmp_path / "d"), str(tmp_path / "s"), shard_size=100_000)
    (tmp_path / "s" / "test" / "shard-000000.tar").rename(tmp_path / "s" / "test" / "shard-0.tar")
    (tmp_path / "s" / "train" / "cat.tar").write_bytes(b"")  # a tar in a split folder, named otherwise
    cfg = Config.model_validate({"data": {"uri": str(tmp_path / "s")}, "output": {"uri": str(tmp_path / "o")},
                                 "model": {"weights": "none"}})
    with pytest.raises(DataError, match=r"/s/test/shard-0.tar: a tar the job does not read \(2 such\): shards are "
                                        r"<split>/shard-NNNNNN.tar"):
        sources.open_source(cfg)


def test_sizes():
    assert parse_size("256MB") == 256_000_000 and parse_size("1GiB") == 2**30 and parse_size("4096") == 4096
    with pytest.raises(Exception, match="--shard-size"):
        parse_size("big")


@given(st.integers(0, 5000), st.sampled_from(["", "K", "M", "G", "T"]), st.sampled_from(["", "B", "iB", "b", "ib"]))
@example(1, "K", "B")
@example(999, "", "")
@example(1000, "", "")
@example(1023, "", "B")
@example(1, "K", "iB")
@example(5000, "", "iB")
def test_a_size_is_its_number_times_its_unit_and_at_least_1kb(number, unit, suffix):
    # `1KB` was refused as less than "at least 1 KB" (the floor was 1,024 bytes, 1KiB).
    text = f"{number}{unit}{suffix}"
    if not unit and suffix.lower() == "ib":  # `5000iB` was read as 5,000 bytes: `iB` binds to a unit
        with pytest.raises(ConfigError, match=f"^--shard-size '{text}': expected a size like"):
            parse_size(text)
        return
    bytes_ = number * (1024 if unit and suffix.lower() == "ib" else 1000) ** "_KMGT".index(unit or "_")
    if bytes_ >= 1000:
        assert parse_size(text) == bytes_
    else:
        with pytest.raises(ConfigError, match=f"^--shard-size '{text}': at least 1KB$"):
            parse_size(text)


def test_pack_round_trips_a_folder_dataset(tmp_path):
    write_sample_dataset(tmp_path / "data", classes=3, per_class=10, size=24, seed=0, test_per_class=4)
    result = pack(str(tmp_path / "data"), str(tmp_path / "shards"), shard_size=20_000)
    assert result["counts"] == {"train": {"circle": 10, "square": 10, "triangle": 10},
                                "test": {"circle": 4, "square": 4, "triangle": 4}}
    assert len([s for s in result["shards"] if s.startswith("train/")]) > 1  # small shards: several
    assert (tmp_path / "shards/classes.txt").read_text() == "circle\nsquare\ntriangle\n"
    assert json.loads((tmp_path / "shards/index.json").read_text())["counts"] == result["counts"]
    # Read back: the same images, byte for byte, with the same labels.
    originals = {}
    for path in (tmp_path / "data").rglob("*.*"):
        originals.setdefault(path.parts[-3], []).append((path.read_bytes(), path.parent.name))
    cfg = Config.model_validate({"data": {"uri": str(tmp_path / "shards")}, "output": {"uri": str(tmp_path / "o")},
                                 "model": {"weights": "none"}})
    source = sources.open_source(cfg)
    assert source.kind == "shards" and source.layout.counts() == result["counts"]
    for split, entries in source.shard_entries.items():
        back = []
        for entry in entries:
            with open(tmp_path / "shards" / entry.rel, "rb") as f:
                back += [(s.image, source.layout.classes[s.label]) for s in shards.samples(f, entry.rel,
                                                                                          source.layout.classes)]
        assert sorted(back) == sorted(originals[split])
        assert [label for _, label in back] != sorted(label for _, label in back)  # shuffled across classes


SEGMENT = st.text(st.characters(whitelist_categories=("Ll", "Nd"), whitelist_characters="-_."), min_size=1,
                  max_size=6).filter(lambda t: t not in (".", ".."))


@given(bucket=SEGMENT, folder=st.lists(SEGMENT, max_size=3), below=st.lists(SEGMENT, max_size=3), tail=SEGMENT)
def test_within_is_at_or_below_a_folder_never_a_sibling(tmp_path_factory, bucket, folder, below, tail):
    root = tmp_path_factory.getbasetemp()
    for base in (f"s3://{bucket}", str(root / bucket)):
        outer = "/".join([base, *folder])
        assert within("/".join([outer, *below]), outer) and within(outer + "/", outer)
        if folder:  # a sibling whose name only starts like the folder's (ds and ds-shards) is outside it
            assert not within("/".join([base, *folder[:-1], folder[-1] + tail]), outer)
        assert not within(f"s3://{bucket}x/" + "/".join(folder), f"s3://{bucket}/" + "/".join(folder))  # another bucket
    assert not within(f"s3://{bucket}/a", str(root / bucket))  # storage and a local folder: never the same


def test_pack_reads_a_source_written_from_home(tmp_path, monkeypatch):
    # `pack --from=~/data` (no shell expands it there) and a manifest at `~/...`: the home folder, as in a config.
    monkeypatch.setenv("HOME", str(tmp_path))
    write_sample_dataset(tmp_path / "data", classes=2, per_class=3, size=16, seed=0, test_per_class=0)
    assert pack("~/data", str(tmp_path / "shards"), shard_size=20_000)["counts"] == {"train": {"circle": 3,
                                                                                               "square": 3}}
    (tmp_path / "data" / "m.csv").write_text("path,label\n" + "".join(
        f"{p.relative_to(tmp_path / 'data').as_posix()},{p.parent.name}\n" for p in (tmp_path / "data").rglob("*.*")
        if p.suffix != ".csv"))
    assert pack("~/data/m.csv", str(tmp_path / "shards2"), shard_size=20_000)["counts"]["train"]["square"] == 3


def test_a_class_named_only_with_spaces_is_refused(tmp_path):
    # pack wrote it to classes.txt, whose blank lines are skipped: read back, the shards had a class fewer.
    for c in (" ", "a", "b"):
        (tmp_path / "d/train" / c).mkdir(parents=True)
        (tmp_path / "d/train" / c / "1.png").write_bytes(b"P")
    cfg = Config.model_validate({"data": {"uri": str(tmp_path / "d")}, "output": {"uri": str(tmp_path / "o")},
                                 "model": {"weights": "none"}})
    with pytest.raises(DataError, match=r"a class named ' ', only spaces"):
        sources.open_source(cfg)


def test_pack_into_the_dataset_it_reads_is_refused_before_writing(tmp_path):
    """Shards written into train/ of a folder dataset would be read as a class folder more, and the dataset broken
    for training and for the next pack: refused (exit 2), nothing written. Beside a manifest's files it is fine."""
    write_sample_dataset(tmp_path / "data", classes=3, per_class=4, size=16, seed=0, test_per_class=2)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for dest in ("data/train/shards", "data", "data/shards"):
        with pytest.raises(ConfigError, match=f"--to {tmp_path / dest}: inside the dataset") as e:
            pack(str(tmp_path / "data"), str(tmp_path / dest), shard_size=20_000)
        assert e.value.exit_code == 2 and str(tmp_path / "data-shards") in str(e.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    listed = [f"{p.relative_to(tmp_path / 'data')},{p.parent.name}" for p in sorted((tmp_path / "data").rglob("*.png"))]
    (tmp_path / "data" / "m.csv").write_text("path,label\n" + "\n".join(listed) + "\n")
    result = pack(str(tmp_path / "data" / "m.csv"), str(tmp_path / "data" / "shards"), shard_size=20_000)
    assert sum(result["images"].values()) == len(listed)
    # Not into the manifest's own folder: its classes.txt became the manifest's class list (a label added later was
    # refused by every pack and run after).
    for dest in (tmp_path / "data", tmp_path / "data" / "."):
        with pytest.raises(ConfigError, match="the manifest's own folder"):
            pack(str(tmp_path / "data" / "m.csv"), str(dest), shard_size=20_000)
    assert not (tmp_path / "data" / "classes.txt").exists()


def test_pack_from_a_manifest_named_without_its_folder_reads_beside_it(tmp_path, monkeypatch):
    # `pack --from labels.csv` in the manifest's folder read its paths under a "folder" labels.csv: exit 3.
    write_sample_dataset(tmp_path / "data", classes=2, per_class=2, size=8, seed=0, test_per_class=0)
    listed = [f"{p.relative_to(tmp_path / 'data')},{p.parent.name}" for p in sorted((tmp_path / "data").rglob("*.png"))]
    (tmp_path / "data" / "labels.csv").write_text("path,label\n" + "\n".join(listed) + "\n")
    monkeypatch.chdir(tmp_path / "data")
    result = pack("labels.csv", str(tmp_path / "shards"), shard_size=20_000)
    assert sum(result["images"].values()) == 4


def test_a_manifest_given_as_a_file_uri_is_read(tmp_path):
    # data.manifest took file:// (as data.uri does), then said "no such file" (exit 3) of a file that was there.
    write_sample_dataset(tmp_path / "data", classes=2, per_class=2, size=8, seed=0, test_per_class=0)
    listed = [f"{p.relative_to(tmp_path / 'data')},{p.parent.name}" for p in sorted((tmp_path / "data").rglob("*.png"))]
    (tmp_path / "data" / "m.csv").write_text("path,label\n" + "\n".join(listed) + "\n")
    cfg = Config.model_validate({"data": {"uri": str(tmp_path / "data"), "manifest": f"file://{tmp_path}/data/m.csv"},
                                 "output": {"uri": str(tmp_path / "o")}, "model": {"weights": "none"}})
    assert sources.open_source(cfg).layout.count("train") == 4


def test_packs_layout_hints_name_its_own_option(tmp_path):
    # `pack --from data/train` said "set data.uri to data", a key the user never set; pack's is --from.
    write_sample_dataset(tmp_path / "data", classes=2, per_class=2, size=8, seed=0, test_per_class=0)
    with pytest.raises(DataError, match=f"it looks like a split folder: set --from to {tmp_path / 'data'}, the "
                                        "folder that holds train/\\)$") as e:
        pack(str(tmp_path / "data" / "train"), str(tmp_path / "shards"), shard_size=20_000)
    assert "data.uri" not in str(e.value)


def test_a_single_label_manifests_classes_txt_sets_the_order_and_numbers_in_text_order_are_warned(tmp_path):
    # Labels 0..10 came out 0, 1, 10, 2, ...: output column 2 was class "10", without a word, and a classes.txt beside
    # the manifest listing them in order was read for multi-label manifests only.
    from structlog.testing import capture_logs

    root = tmp_path / "d"
    labels = [str(n) for n in range(11)]
    (root / "img").mkdir(parents=True)
    for label in labels:
        (root / "img" / f"{label}.png").write_bytes(b"\x89PNG")  # listed, never read here
    (root / "m.csv").write_text("path,label\n" + "".join(f"img/{c}.png,{c}\n" for c in labels))
    cfg = Config.model_validate({"data": {"uri": str(root), "manifest": str(root / "m.csv")},
                                 "output": {"uri": str(tmp_path / "o")}, "model": {"weights": "none"}})
    with capture_logs() as logs:
        assert sources.open_source(cfg).layout.classes == sorted(labels)
    warned = [r for r in logs if r["event"].startswith("class names are numbers, in the order of text")]
    assert len(warned) == 1 and warned[0]["order"].startswith("0, 1, 10, 2,")
    (root / "classes.txt").write_text("\n".join(labels) + "\n")
    with capture_logs() as logs:
        assert sources.open_source(cfg).layout.classes == labels
    assert not [r for r in logs if r["event"].startswith("class names are numbers")]
    (root / "classes.txt").write_text("\n".join(labels[:-1]) + "\n")
    with pytest.raises(DataError, match=r"m.csv line 12: label '10' is not in .*/classes.txt"):
        sources.open_source(cfg)
    (root / "classes.txt").write_text("\n".join([*labels, "11"]) + "\n")
    with pytest.raises(DataError, match=r"/classes.txt: class '11' has no training images in .*m.csv"):
        sources.open_source(cfg)


def test_a_manifests_rows_of_macos_metadata_files_are_left_out_and_said(tmp_path):
    # `find -name '*.jpg'` after unzipping a Mac's archive lists `__MACOSX/.../._1.jpg` too: validate counted them as
    # images, and train refused them after staging ("12 of 24 images are bad").
    from structlog.testing import capture_logs

    root = tmp_path / "d"
    lines = ["path,label"]
    for label in ("cat", "dog"):
        (root / "photos" / label).mkdir(parents=True)
        (root / "__MACOSX" / "photos" / label).mkdir(parents=True)
        for i in range(2):
            (root / "photos" / label / f"{i}.jpg").write_bytes(b"\xff\xd8")
            (root / "__MACOSX" / "photos" / label / f"._{i}.jpg").write_bytes(b"\x00\x05\x16\x07")
            lines += [f"photos/{label}/{i}.jpg,{label}", f"__MACOSX/photos/{label}/._{i}.jpg,{label}"]
    (root / "photos" / "cat" / "._x.jpg").write_bytes(b"\x00\x05\x16\x07")
    lines.append("photos/cat/._x.jpg,cat")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    cfg = Config.model_validate({"data": {"uri": str(root), "manifest": str(root / "m.csv")},
                                 "output": {"uri": str(tmp_path / "o")}, "model": {"weights": "none"}})
    with capture_logs() as logs:
        source = sources.open_source(cfg)
    assert source.layout.counts() == {"train": {"cat": 2, "dog": 2}}
    assert all("._" not in key for key in source.entries)
    said = [r for r in logs if r["event"].startswith("manifest rows left out: macOS or NAS metadata")]
    assert [(r["rows"], r["first"]) for r in said] == [(5, "line 3: __MACOSX/photos/cat/._0.jpg")]
    (root / "m.csv").write_text("path,label\n__MACOSX/photos/cat/._0.jpg,cat\n")
    with pytest.raises(DataError, match="every row names a metadata file"):
        sources.open_source(cfg)


def test_keeping_a_checkpoints_order_gives_the_listing_an_earlier_version_fingerprinted(tmp_path):
    # A run begun before classes.txt beside a single-label manifest was read kept its classes sorted, and its
    # checkpoint the fingerprint of that listing: kept in that order, the listing is that dataset again.
    from job import pipeline

    root = tmp_path / "d"
    (root / "img").mkdir(parents=True)
    labels = ["0", "1", "2", "10"]
    for label in labels:
        (root / "img" / f"{label}.png").write_bytes(b"\x89PNG")
    (root / "m.csv").write_text("path,label\n" + "".join(f"img/{c}.png,{c}\n" for c in labels))
    cfg = Config.model_validate({"data": {"uri": str(root), "manifest": str(root / "m.csv")},
                                 "output": {"uri": str(tmp_path / "o")}, "model": {"weights": "none"}})
    earlier = sources.open_source(cfg)  # no classes.txt: sorted, as every earlier version listed it
    (root / "classes.txt").write_text("\n".join(labels) + "\n")
    now = sources.open_source(cfg)
    assert now.layout.classes == labels and now.fingerprint() != earlier.fingerprint()
    order, fingerprint = pipeline._keep_order(now)(list(earlier.layout.classes))
    assert now.layout.classes == order == ["0", "1", "10", "2"] and fingerprint == earlier.fingerprint()
    write_sample_dataset(tmp_path / "f", classes=2, per_class=2, size=8, seed=0, test_per_class=0)
    folders = sources.open_source(Config.model_validate({"data": {"uri": str(tmp_path / "f")},
                                                         "output": {"uri": str(tmp_path / "o")},
                                                         "model": {"weights": "none"}}))
    assert pipeline._keep_order(folders) is None  # sorted folders: no order to keep but their own
