"""The staged dataset (job/readers.py) and the edges of the three dataset forms: shard keys are whole member
paths, a pack never mixes with an older one, empty splits are absent, shards are checked as strictly as
folders, copied and streamed readers agree. Local folders; no TensorFlow except where images are decoded."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import hypothesis.strategies as st
import pytest
import structlog.testing
from conftest import tar_bytes
from hypothesis import given

from job import errors, files, layout, pipeline, readers, shards, sources, storage
from job.config import Config
from job.errors import ConfigError, DataError, StorageError
from job.pack import pack
from job.sample_data import write_sample_dataset


def config(uri: Path | str, **data) -> Config:
    return Config.model_validate({"data": {"uri": str(uri), **data}, "output": {"uri": "/tmp/unused"},
                                  "model": {"weights": "none"}})


def stage(uri, mode: str = "copy", tmp: Path | None = None, **data) -> readers.Reader:
    cfg = config(uri, **data)
    cache = (tmp or Path(uri).parent) / f"cache-{mode}"
    return readers.create(sources.open_source(cfg), mode, readers.Staging(cache, cache / "images", (8, 8)))


def as_read(reader: readers.Reader) -> dict[str, list[tuple[bytes, str]]]:
    """{split: sorted (image bytes, class name)} of what a reader reads."""
    classes = reader.layout.classes
    return {split: sorted((image, classes[label]) for _, image, label in reader.samples(split))
            for split in reader.layout.files}


def shard_dataset(root: Path, splits: dict[str, list[list[tuple[str, bytes]]]], classes=("cat", "dog")) -> Path:
    """A sharded dataset by hand: {split: [members of each shard]} and classes.txt (no index.json)."""
    for split, shard_members in splits.items():
        for n, members in enumerate(shard_members):
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / split / f"shard-{n:06d}.tar").write_bytes(tar_bytes(members))
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


# ---------------------------------------------------------------- defect 1: keys are whole paths


def class_folders_tarred(same_name="0001"):
    """A shard made by tarring class folders as they are: the same file name in every class."""
    return [(f"cat/{same_name}.jpg", b"CAT"), (f"cat/{same_name}.txt", b"cat"),
            (f"dog/{same_name}.jpg", b"DOG"), (f"dog/{same_name}.txt", b"dog")]


@pytest.mark.parametrize("mode", ["copy", "stream"])
def test_same_file_names_in_several_class_folders_are_several_samples(tmp_path, mode):
    root = shard_dataset(tmp_path / "d", {"train": [class_folders_tarred() + [("x/a.jpg", b"X"), ("x/a.cls", b"0")]]})
    reader = stage(root, mode, tmp_path)
    assert as_read(reader) == {"train": [(b"CAT", "cat"), (b"DOG", "dog"), (b"X", "cat")]}
    assert sorted(reader.items("train")[0]) == ["train/shard-000000.tar:cat/0001.jpg",
                                               "train/shard-000000.tar:dog/0001.jpg",
                                               "train/shard-000000.tar:x/a.jpg"]


def test_copied_shards_extract_under_the_whole_key(tmp_path):
    reader = stage(shard_dataset(tmp_path / "d", {"train": [class_folders_tarred()]}), "copy", tmp_path)
    files = {key: path.read_bytes() for key, path in reader.local.items()}
    assert sorted(files.values()) == [b"CAT", b"DOG"]
    assert all(path.parent.name in ("cat", "dog") for path in reader.local.values())


@pytest.mark.parametrize("mode", ["copy", "stream"])
def test_a_key_twice_in_a_split_names_both_places(tmp_path, mode):
    root = shard_dataset(tmp_path / "d", {"train": [class_folders_tarred(), [("cat/0001.png", b"P"),
                                                                             ("cat/0001.cls", b"1")]]})
    with pytest.raises(DataError) as e:
        stage(root, mode, tmp_path)
    assert "sample key cat/0001 occurs twice in split train" in str(e.value)
    assert "train/shard-000000.tar:cat/0001.jpg" in str(e.value)
    assert "train/shard-000001.tar:cat/0001.png" in str(e.value)


def test_the_same_key_in_two_splits_is_two_images(tmp_path):
    one = [("cat/0001.jpg", b"A"), ("cat/0001.cls", b"0"), ("dog/1.jpg", b"B"), ("dog/1.cls", b"1")]
    root = shard_dataset(tmp_path / "d", {"train": [one], "test": [one]})
    assert as_read(stage(root, "copy", tmp_path))["test"] == [(b"A", "cat"), (b"B", "dog")]


def test_runs_extracting_one_shard_at_once_all_read_it_whole(tmp_path):
    # Runs sharing data.cache_dir that extracted one shard at once deleted each other's files: exit 1 "File exists",
    # or images counted bad (deleted by another run), exit 3.
    import threading

    from job import readers

    members = [m for n in range(200) for m in ((f"c{n}/{n:04d}.jpg", b"%d" % n), (f"c{n}/{n:04d}.cls", b"%d" % (n % 2)))
               ]
    root = shard_dataset(tmp_path / "d", {"train": [members]})
    shard = next((root / "train").glob("shard-*.tar"))
    folder, results, errors = tmp_path / "extracted" / "x", [], []
    start = threading.Barrier(4)

    def extract():
        start.wait()
        try:
            results.append(readers._extract(shard, folder, "etag-1", "shard", ["a", "b"], False))
        except Exception as e:  # noqa: BLE001 - what a run would have died of
            errors.append(e)

    threads = [threading.Thread(target=extract) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 4
    samples = [[list(pair) for pair in r["samples"]] for r in results]  # (one's own, the others' read from JSON)
    assert all(one == samples[0] for one in samples) and len(samples[0]) == 200
    assert {name: (folder / name).read_bytes() for name, _ in results[0]["samples"]} == {
        f"c{n}/{n:04d}.jpg": b"%d" % n for n in range(200)}
    assert sorted(p.name for p in folder.parent.iterdir()) == ["x"]  # no part or stale folder left
    again = readers._extract(shard, folder, "etag-2", "shard", ["a", "b"], False)  # the shard rewritten: redone
    assert again["etag"] == "etag-2" and sorted(p.name for p in folder.parent.iterdir()) == ["x"]


def test_a_member_key_may_not_leave_the_extraction_folder():
    assert shards.member_key("./cat/0001.tar.gz", "s") == ("cat/0001", ".tar.gz")
    assert shards.member_key("README", "s") is None and shards.member_key("cat/.hidden", "s") is None
    for name in ("../evil.jpg", "/etc/x.jpg", "a/../../b.jpg", "a//b.jpg"):
        with pytest.raises(DataError, match="not a plain relative path"):
            shards.member_key(name, "s")


# ---------------------------------------------------------------- defect 2: a second pack


def test_pack_refuses_a_destination_with_shards_unless_overwrite(tmp_path):
    write_sample_dataset(tmp_path / "a", classes=3, per_class=6, size=8, seed=0, test_per_class=0)
    write_sample_dataset(tmp_path / "b", classes=2, per_class=3, size=8, seed=1, test_per_class=0)
    pack(str(tmp_path / "a"), str(tmp_path / "shards"), shard_size=2_000)
    first = sorted(p.name for p in (tmp_path / "shards/train").iterdir())
    with pytest.raises(StorageError, match="already holds .* pass --overwrite"):
        pack(str(tmp_path / "b"), str(tmp_path / "shards"), shard_size=2_000)
    assert sorted(p.name for p in (tmp_path / "shards/train").iterdir()) == first  # nothing touched
    result = pack(str(tmp_path / "b"), str(tmp_path / "shards"), shard_size=100_000, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "shards/train").iterdir()) == ["shard-000000.tar"] != first
    reader = stage(tmp_path / "shards", "copy", tmp_path)
    assert reader.layout.counts() == result["counts"] == {"train": {"circle": 3, "square": 3}}
    # Into a folder dataset, --overwrite or not: its images were hidden by the shards beside them, without a word.
    for overwrite in (False, True):
        with pytest.raises(StorageError, match=f"--to {tmp_path / 'a'}: holds a folder dataset \\(train/"):
            pack(str(tmp_path / "b"), str(tmp_path / "a"), shard_size=100_000, overwrite=overwrite)
    assert not (tmp_path / "a" / "classes.txt").exists()


@pytest.mark.parametrize("source, dest, endpoint, expected", [
    ("s3:/bkt/ds", "x", "", "--from: expected s3://bucket/prefix (two slashes, then the bucket) (got 's3:/bkt/ds')"),
    ("{d}", "s3://", "", "--to: expected s3://bucket/prefix"),
    ("{d}", "s3://bad bucket/x", "", "--to: bucket name 'bad bucket': letters, digits, '.', '-' and '_' only"),
    ("s3://b/ds", "x", "127.0.0.1:9", "--endpoint-url: expected a URL such as http://127.0.0.1:9"),
])
def test_pack_refuses_malformed_locations_by_their_options(tmp_path, source, dest, endpoint, expected):
    # Exit 1, "unexpected error", and pydantic's traceback naming data.uri or output.uri, which pack users never set.
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}"):
        pack(source.format(d=tmp_path), dest, shard_size=2_000, endpoint=endpoint)


@pytest.mark.parametrize("uri", ["s3:/bkt/models/run1", "S3:bkt/x", "s3://", "s3://my bucket/x"])
def test_every_command_refuses_an_s3_location_of_the_wrong_form(uri):
    # `predict --model s3:/b/x` and `tensorboard --from s3:/b/x` read a local folder named `s3:`: "no such folder"
    # (exit 4), or a TensorBoard serving nothing with only a "no runs yet" warning.
    from job import storage

    with pytest.raises(ConfigError, match=f"^{re.escape(uri)}: (expected s3://bucket/prefix|bucket name)"):
        storage.open_store(uri)


def test_pack_names_the_images_training_will_skip_with_the_members_they_became(tmp_path):
    # pack copied an empty file, a WebP named .jpg and a text named .png without a word, renumbered: training then
    # named `shard-000000.tar:00000036.jpg`, which nothing traced back to the user's file.
    from PIL import Image

    write_sample_dataset(tmp_path / "a", classes=2, per_class=4, size=8, seed=0, test_per_class=0)
    folder = tmp_path / "a" / "train" / "circle"
    (folder / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(folder / "webp.jpg", format="WEBP")
    (folder / "notes.png").write_text("not an image")
    with structlog.testing.capture_logs() as logged:
        pack(str(tmp_path / "a"), str(tmp_path / "shards"), shard_size=100_000)
    (record,) = [r for r in logged if "training will skip" in r["event"]]
    assert record["count"] == 3 and record["log_level"] == "warning"
    reasons = {}
    for example in record["examples"]:
        key, _, rest = example.partition(" -> ")
        member, _, reasons[key] = rest.partition(": ")
        shard, _, name = member.partition(":")
        with tarfile.open(tmp_path / "shards" / shard) as tar:  # the member holds that very file
            assert tar.extractfile(name).read() == (tmp_path / "a" / key).read_bytes(), example
    assert reasons == {"train/circle/empty.jpg": "empty (0 bytes)", "train/circle/notes.png": "not an image that can "
                       "be read", "train/circle/webp.jpg": "a WEBP image, a format the job does not read: convert it "
                       "to JPEG or PNG"}


def test_a_shard_that_index_json_does_not_list_is_refused(tmp_path):
    write_sample_dataset(tmp_path / "a", classes=2, per_class=4, size=8, seed=0, test_per_class=0)
    pack(str(tmp_path / "a"), str(tmp_path / "shards"), shard_size=1_500)
    stray = tmp_path / "shards/train/shard-000099.tar"
    stray.write_bytes(tar_bytes([("k.png", b"P"), ("k.cls", b"0")]))
    with pytest.raises(DataError, match="shard-000099.tar: a shard that index.json does not list"):
        sources.open_source(config(tmp_path / "shards"))
    stray.unlink()
    (tmp_path / "shards/train/shard-000000.tar").unlink()
    with pytest.raises(DataError, match="shard-000000.tar: listed in index.json but missing"):
        sources.open_source(config(tmp_path / "shards"))


# ---------------------------------------------------------------- defect 3: empty splits are absent


def test_no_validation_split_is_absent_not_empty(tmp_path):
    write_sample_dataset(tmp_path / "d", classes=2, per_class=3, size=8, seed=0, test_per_class=0)
    reader = stage(tmp_path / "d", "copy", tmp_path).settle(0.0, seed=1)
    assert list(reader.layout.files) == ["train"] and reader.count("validation") == 0
    validated = pipeline.validate(config(tmp_path / "d", validation_split=0.0))
    assert validated.counts() == {"train": {"circle": 3, "square": 3}}


def test_single_image_classes_leave_no_empty_validation_split(tmp_path):
    write_sample_dataset(tmp_path / "d", classes=3, per_class=1, size=8, seed=0, test_per_class=0)
    reader = stage(tmp_path / "d", "copy", tmp_path).settle(0.2, seed=1)
    assert list(reader.layout.files) == ["train"] and reader.count("train") == 3


# ---------------------------------------------------------------- defect 4: shards as strict as folders


@pytest.mark.parametrize("mode", ["copy", "stream"])
def test_a_class_of_classes_txt_without_training_images_is_refused_like_a_folder(tmp_path, mode):
    root = shard_dataset(tmp_path / "d", {"train": [class_folders_tarred()]}, classes=("cat", "dog", "emu"))
    with pytest.raises(DataError) as e:
        stage(root, mode, tmp_path).settle(0.0, seed=1)
    assert str(e.value) == f"{root}/train/: class folder(s) with no images: emu"
    for name, file in (("cat", "1.png"), ("dog", "1.png"), ("emu", "notes.txt")):
        (tmp_path / "f/train" / name).mkdir(parents=True)
        (tmp_path / "f/train" / name / file).write_bytes(b"P")
    with pytest.raises(DataError) as folder_error:
        stage(tmp_path / "f", "copy", tmp_path)
    assert str(folder_error.value) == f"{tmp_path / 'f'}/train/: class folder(s) with no images: emu"


def test_a_class_index_json_counts_as_empty_is_refused_before_any_download(tmp_path):
    root = shard_dataset(tmp_path / "d", {"train": [class_folders_tarred()]})
    (root / "index.json").write_text(json.dumps({"counts": {"train": {"cat": 1, "dog": 0}},
                                                 "shards": {"train/shard-000000.tar": 2}}))
    with pytest.raises(DataError, match="class folder\\(s\\) with no images: dog"):
        sources.open_source(config(root))


@pytest.mark.parametrize("mode", ["copy", "stream"])
def test_members_of_no_sample_are_skipped_and_named(tmp_path, mode, caplog):
    members = [("LICENSE.txt", b"MIT"), ("README", b"hi")] + class_folders_tarred() + [("notes/x.json", b"{}")]
    root = shard_dataset(tmp_path / "d", {"train": [members]})
    with caplog.at_level(logging.WARNING):
        reader = stage(root, mode, tmp_path)
    assert as_read(reader) == {"train": [(b"CAT", "cat"), (b"DOG", "dog")]}


def test_streaming_needs_a_training_shard_per_worker(tmp_path, monkeypatch):
    write_sample_dataset(tmp_path / "d", classes=2, per_class=3, size=8, seed=0, test_per_class=0)
    pack(str(tmp_path / "d"), str(tmp_path / "s"), shard_size=1_500)  # one image per shard: 6 shards
    cfg = config(tmp_path / "s", staging="stream")
    source = sources.open_source(cfg)
    workers = {"cluster": {"worker": [f"127.0.0.1:{1000 + i}" for i in range(7)]}, "task": {"type": "worker"}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(workers))
    with pytest.raises(DataError, match="6 training shard\\(s\\) for 7 workers"):
        pipeline._staging(cfg, source)
    workers["cluster"]["worker"].pop()
    monkeypatch.setenv("TF_CONFIG", json.dumps(workers))
    assert pipeline._staging(cfg, source) == "stream"


# ---------------------------------------------------------------- copied and streamed agree


def test_copied_and_streamed_read_the_same_samples_and_shares(tmp_path):
    write_sample_dataset(tmp_path / "d", classes=3, per_class=9, size=8, seed=0, test_per_class=2)
    pack(str(tmp_path / "d"), str(tmp_path / "s"), shard_size=1_500)
    copied = stage(tmp_path / "s", "copy", tmp_path).settle(0.25, seed=3)
    streamed = stage(tmp_path / "s", "stream", tmp_path).settle(0.25, seed=3)
    assert copied.layout == streamed.layout and copied.count("validation") == 6
    assert as_read(copied) == as_read(streamed)
    # Both know each image's content: the same digests, one per image, equal where the bytes are.
    assert copied.digests == streamed.digests and len(copied.digests) == 3 * 9 + 3 * 2
    assert all(copied.digests[k] == hashlib.sha256(image).digest() for k, image, _ in copied.samples("test"))
    # The validation split is carved from keys, which differ between forms: compare the forms uncarved.
    assert as_read(stage(tmp_path / "s", "stream", tmp_path).settle(0, 3)) == \
        as_read(stage(tmp_path / "d", "copy", tmp_path).settle(0, 3))
    for reader in (copied, streamed):
        shares = [reader.items("train", (i, 2)) for i in range(2)]
        assert sorted(shares[0][0] + shares[1][0]) == sorted(reader.items("train")[0])
        assert not set(shares[0][0]) & set(shares[1][0])
    # Streaming shares whole shards: each worker's keys come from its own shards.
    assert not {readers.shard_of(k) for k in streamed.items("train", (0, 2))[0]} & \
        {readers.shard_of(k) for k in streamed.items("train", (1, 2))[0]}


def test_calibration_keys_are_spread_over_classes():
    listed = layout.Layout(["a", "b"], {"train": {"a": [f"a{i}" for i in range(300)], "b": ["b0", "b1"]}})
    picked = readers.Reader(listed, {}, "d", (8, 8)).pick("train", 256)
    assert len(picked) == 256 and {"b0", "b1"} < set(picked) and len(set(picked)) == 256


def test_copied_pixels_of_picked_keys_decode_only_those(tmp_path):
    write_sample_dataset(tmp_path / "d", classes=2, per_class=5, size=8, seed=0, test_per_class=0)
    reader = stage(tmp_path / "d", "copy", tmp_path).settle(0.0, seed=1)
    keys, labels = reader.items("train")
    picked = [keys[0], keys[-1]]
    for key in keys[1:-1]:  # the others are gone: decoding any of them would fail
        reader.local[key].unlink()
    pixels, got = reader.pixels("train", picked)
    assert pixels.shape == (2, 8, 8, 3) and list(got) == [labels[0], labels[-1]]


# ---------------------------------------------------------------- smaller ones (defect 8)


def test_a_local_manifest_dataset_is_read_in_place(tmp_path):
    write_sample_dataset(tmp_path / "d", classes=2, per_class=2, size=8, seed=0, test_per_class=0)
    files = sorted((tmp_path / "d").rglob("*.*"))
    rows = [f"{p.relative_to(tmp_path / 'd').as_posix()},{p.parent.name}" for p in files]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    source = sources.open_source(config(tmp_path / "d", manifest=str(tmp_path / "m.csv")))
    # Even when the disk looks full: nothing is copied from a local folder.
    assert sources.staging_mode(source, "auto", tmp_path, 10**15) == "copy"


def test_class_names_that_differ_only_in_case_are_named(tmp_path, capsys):
    assert layout.case_clashes(["Cat", "cat", "dog", "DOG", "emu"]) == [("Cat", "cat"), ("dog", "DOG")]
    # café written composed (most systems) and decomposed (file names from macOS), a ligature: they print alike
    assert layout.case_clashes(["caf\u00e9", "cafe\u0301", "cafe"]) == [("caf\u00e9", "cafe\u0301")]
    assert layout.case_clashes(["\ufb01sh", "fish"]) == [("\ufb01sh", "fish")]
    for name in ("Cat", "cat", "caf\u00e9", "cafe\u0301"):
        (tmp_path / "d/train" / name).mkdir(parents=True)
        (tmp_path / "d/train" / name / "1.png").write_bytes(b"P")
    sources.open_source(config(tmp_path / "d"))
    out = capsys.readouterr().out
    assert "differ only in case" in out and "u0301" in out  # the decomposed one escaped (\u0301, not an accent)


# ---------------------------------------------------------------- found in review


def test_a_changed_classes_txt_relabels_the_extracted_cache(tmp_path):
    root = shard_dataset(tmp_path / "d", {"train": [class_folders_tarred()]})
    assert as_read(stage(root, "copy", tmp_path))["train"] == [(b"CAT", "cat"), (b"DOG", "dog")]
    (root / "classes.txt").write_text("ant\ncat\ndog\n")  # same shard (same ETag), a class in front
    reader = stage(root, "copy", tmp_path)
    assert as_read(reader)["train"] == [(b"CAT", "cat"), (b"DOG", "dog")]


def test_member_order_does_not_change_the_validation_split(tmp_path):
    pairs = [[(f"c{n}.png", b"%d" % n), (f"c{n}.cls", b"%d" % (n % 2))] for n in range(10)]
    root = shard_dataset(tmp_path / "d", {"train": [[m for pair in reversed(pairs) for m in pair]]})
    copied = stage(root, "copy", tmp_path).settle(0.4, seed=0)
    streamed = stage(root, "stream", tmp_path).settle(0.4, seed=0)
    assert copied.layout == streamed.layout and copied.count("validation") == 4


def test_bad_images_leave_before_the_validation_split(tmp_path):
    write_sample_dataset(tmp_path / "d", classes=2, per_class=2, size=8, seed=0, test_per_class=0)
    reader = stage(tmp_path / "d", "copy", tmp_path)
    reader.bad = {reader.items("train")[0][0]: "cannot be decoded"}  # one of circle's two images
    settled = reader.settle(0.5, seed=0)
    assert settled.layout.counts() == {"train": {"circle": 1, "square": 1}, "validation": {"circle": 0, "square": 1}}


def test_images_in_split_folders_beside_shards_are_refused(tmp_path):
    # train/ as shards and test/<class>/*.png as a folder: the test images were never read, and the run said only
    # "no test images" at info level; loose images beside the training shards, not a word.
    root = shard_dataset(tmp_path / "d", {"train": [[("x.jpg", b"A"), ("x.cls", b"0")]]})
    sources.open_source(config(root))
    (root / "test" / "cat").mkdir(parents=True)
    (root / "test" / "cat" / "1.png").write_bytes(b"P")
    (root / "test" / "cat" / "2.PNG").write_bytes(b"P")
    (root / "README.png").write_bytes(b"P")  # beside the splits: not the dataset's
    with pytest.raises(DataError, match=f"^{re.escape(str(root))}/test/cat/1.png: 2 image\\(s\\) in split folders "
                                        "beside the tar shards, which would not be read"):
        sources.open_source(config(root))


def test_a_file_and_a_folder_of_the_same_name_in_a_shard(tmp_path):
    root = shard_dataset(tmp_path / "d", {"train": [[("x.jpg", b"A"), ("x.cls", b"0"), ("x.jpg/y.jpg", b"B"),
                                                    ("x.jpg/y.cls", b"1")]]})
    with pytest.raises(DataError, match="x.jpg/y.jpg collides with another member's path"):
        stage(root, "copy", tmp_path)


def test_streaming_workers_each_need_a_training_shard_after_the_validation_split(tmp_path, capsys):
    nine = [m for n in range(9) for m in ((f"a{n}.png", b"%d" % n), (f"a{n}.cls", b"%d" % (n % 2)))]
    root = shard_dataset(tmp_path / "d", {"train": [nine, [("z.png", b"Z"), ("z.cls", b"1")]]})
    staged = stage(root, "stream", tmp_path)

    def carved(seed):
        return readers.Streamed(staged.layout, {}, "d", (8, 8), staged.store, staged.versions).settle(0.2, seed)

    seed = next(s for s in range(100) if "train/shard-000001.tar:z.png" in carved(s).items("validation")[0])
    reader = carved(seed)
    assert reader.shards("train", (1, 2)) == []  # the one-image shard went to validation

    rows = [[], []]  # what each worker puts into the all-gather
    resumed = [SimpleNamespace(phase="head", epoch=2, step=0)] * 2  # where each worker's checkpoint left it

    def run_of(worker):
        def gather(row):
            rows[worker] = row
            return rows if all(rows) else [row]
        return SimpleNamespace(data=reader, share=(worker, 2), cfg=config(root), state=resumed[worker],
                               cluster=SimpleNamespace(num_workers=2, gather=gather, is_chief=worker == 0))

    pipeline._workers_agree_on_dataset(run_of(0))  # alone, worker 0 sees nothing wrong
    with pytest.raises(DataError, match="1 shard\\(s\\) hold training images .* for 2 workers"):
        pipeline._workers_agree_on_dataset(run_of(1))
    # Uncarved, the workers hold 9 and 1 training images: the chief says the one is seen 9 times as often.
    reader = readers.Streamed(staged.layout, {}, "d", (8, 8), staged.store, staged.versions).settle(0, seed)
    rows[:] = [[], []]
    capsys.readouterr()
    pipeline._workers_agree_on_dataset(run_of(1))
    assert "unequal shares" not in capsys.readouterr().out  # the chief says it, once
    pipeline._workers_agree_on_dataset(run_of(0))
    out = capsys.readouterr().out
    assert out.count("unequal shares of the training images") == 1 and "[9, 1]" in out and "9.0" in out
    # A worker that fell back to an older checkpoint would train other steps than the others: all stop.
    resumed[1] = SimpleNamespace(phase="head", epoch=1, step=0)
    rows[:] = [[], []]
    pipeline._workers_agree_on_dataset(run_of(1))
    with pytest.raises(StorageError, match=r"the workers resumed from different checkpoints .*\[\[2, 0\], \[1, 0\]\]"):
        pipeline._workers_agree_on_dataset(run_of(0))


def test_validate_refuses_what_train_would(tmp_path, monkeypatch, capsys):
    write_sample_dataset(tmp_path / "d", classes=2, per_class=2, size=8, seed=0, test_per_class=0)
    with pytest.raises(DataError, match="stream needs tar shards"):
        pipeline.validate(config(tmp_path / "d", staging="stream"))
    # validate said ok to both, which train refuses before any work
    cfg = config(tmp_path / "d")
    def metrics_file(path) -> Config:
        return cfg.model_copy(update={"metrics": cfg.metrics.model_copy(update={"file": str(path)})})

    with pytest.raises(ConfigError, match=f"metrics.file {tmp_path}: a folder, not a file"):
        pipeline.validate(metrics_file(tmp_path))
    with pytest.raises(ConfigError, match="is a file, so no file can be below it"):
        pipeline.validate(metrics_file(tmp_path / "d" / "train" / "circle" / "circle_0000.png" / "m.txt"))
    pipeline.validate(metrics_file(tmp_path / "not" / "yet" / "m.txt"))  # a trial pod's folder: made by train
    assert not (tmp_path / "not").exists()  # validate writes nothing
    # multi_worker without TF_CONFIG: the chart sets it in the Job's pods only, and its `helm test` validates
    # without it: a warning there, where train refuses it.
    monkeypatch.delenv("TF_CONFIG", raising=False)
    multi = cfg.model_copy(update={"distribution": cfg.distribution.model_copy(update={"strategy": "multi_worker"})})
    capsys.readouterr()
    pipeline.validate(multi)
    assert "multi_worker needs TF_CONFIG" in capsys.readouterr().out
    # It said ok where train then refused the batch (a machine without GPUs), or did nothing (a complete run).
    odd = cfg.model_copy(update={"distribution": cfg.distribution.model_copy(update={"cpu_replicas": 3})})
    pipeline.validate(odd)
    assert "train.batch_size 32 is not divisible by distribution.cpu_replicas 3: train refuses it" in \
        capsys.readouterr().out
    (tmp_path / "out" / cfg.run_id).mkdir(parents=True)
    (tmp_path / "out" / cfg.run_id / "_SUCCESS").write_text("")
    done = cfg.model_copy(update={"output": cfg.output.model_copy(update={"uri": str(tmp_path / "out")})})
    pipeline.validate(done)
    assert f"run {cfg.run_id} is complete in {tmp_path / 'out' / cfg.run_id}: train will end 'already complete'" in \
        capsys.readouterr().out
    redo = done.model_copy(update={"output": done.output.model_copy(update={"overwrite": True})})
    pipeline.validate(redo)
    assert "is complete" not in capsys.readouterr().out


@pytest.mark.parametrize("strategy", ["one_device", "mirrored"])
def test_a_one_node_strategy_among_several_workers_is_refused(strategy):
    # TF_CONFIG of 3 workers (the chart's `workers: 3`) with a one-node strategy: one_device failed with a traceback
    # (exit 1, retried by the Job), mirrored trained each worker alone and the chief exported its own model, exit 0.
    from job import distribute

    three = {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:1", "c:1"]}, "task": {"type": "worker",
                                                                                         "index": 1}})}
    with pytest.raises(ConfigError, match=f"strategy: {strategy} trains on this node alone, but TF_CONFIG names 3 "
                                          "workers"):
        distribute.check_strategy(strategy, three)
    for fine in ("auto", "multi_worker"):
        distribute.check_strategy(fine, three)
    distribute.check_strategy(strategy, {})  # one node: its own choice
    one = {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}})}
    distribute.check_strategy(strategy, one)


# ---------------------------------------------------------------- streamed shards kept decoded


def _pixels(reader: readers.Reader, split: str = "train") -> list[tuple[bytes, int]]:
    import numpy as np

    return sorted((x.tobytes(), int(y)) for xs, ys in reader.images(split, 4)
                  for x, y in zip(xs.numpy().astype(np.uint8), ys.numpy()))


def test_streamed_shards_are_kept_decoded_and_read_back_as_copy_mode_reads_them(tmp_path, monkeypatch):
    """A first streamed pass keeps each shard's decoded samples; the next reads them back, not the storage,
    bit for bit; and streamed pixels are exactly copy mode's (both rounded to uint8 rows)."""
    write_sample_dataset(tmp_path / "d", classes=3, per_class=9, size=8, seed=0, test_per_class=2)
    pack(str(tmp_path / "d"), str(tmp_path / "s"), shard_size=1_500)
    copied = stage(tmp_path / "s", "copy", tmp_path).settle(0.25, seed=3)
    streamed = stage(tmp_path / "s", "stream", tmp_path).settle(0.25, seed=3)
    first = _pixels(streamed)
    assert first == _pixels(copied) and len(first) == copied.count("train")
    kept = sorted(p.name for p in streamed.keep.iterdir())
    assert len(kept) == 2 * len(streamed.shards("train")) and all(n.endswith((".rows", ".labels.npy")) for n in kept)

    def unreachable(rel, listed=None):
        raise AssertionError(f"{rel} read from storage")

    monkeypatch.setattr(streamed.store, "open_stream", unreachable)
    assert _pixels(streamed) == first
    with pytest.raises(Exception, match="read from storage"):  # another split's samples are kept apart
        _pixels(streamed, "validation")


def test_kept_shards_are_not_read_back_under_other_classes(tmp_path):
    # The kept rows hold class indices: an overwrite of the run with classes.txt reordered (or a class added) read
    # them back under the new order, and every class trained under another's name, exit 0.
    from PIL import Image

    from job import stream

    def png(i):
        out = io.BytesIO()
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(out, "PNG")
        return out.getvalue()

    members = [m for i in range(12) for m in ((f"{i}.png", png(i)), (f"{i}.txt", b"cat" if i % 2 else b"dog"))]
    root = shard_dataset(tmp_path / "s", {"train": [members]})  # labels by name (.txt), as webdataset writes them
    reader = stage(root, "stream", tmp_path).settle(0, 0)
    keys, rels, classes = set(reader.items("train")[0]), reader.shards("train"), reader.layout.classes

    def labelled(order):
        ds = stream.dataset(reader.store, rels, order, keys, (8, 8), 4, keep=tmp_path / "kept",
                            versions=reader.versions)
        return {x.tobytes(): order[int(y)] for xs, ys in ds for x, y in zip(xs.numpy(), ys.numpy())}

    first = labelled(classes)
    assert len(first) == 12 and sorted(first.values()) == sorted(classes * 6)
    assert labelled(classes) == first  # read back from the kept rows
    assert labelled(classes[::-1]) == first  # the same names under the other order


def test_a_shard_read_partly_is_not_kept(tmp_path, monkeypatch):
    from job import stream

    write_sample_dataset(tmp_path / "d", classes=2, per_class=6, size=8, seed=0, test_per_class=0)
    pack(str(tmp_path / "d"), str(tmp_path / "s"), shard_size=100_000)
    reader = stage(tmp_path / "s", "stream", tmp_path).settle(0, 0)
    rel, = reader.shards("train")
    keys = set(reader.items("train")[0])
    kept = tmp_path / "kept" / "shard"
    partial = stream._decoded(reader.store, rel, reader.layout.classes, keys, (8, 8), False, kept)
    next(partial)
    partial.close()  # the epoch (or the run) ended in the middle of the shard
    assert not list((tmp_path / "kept").iterdir())
    def flat(chunks):
        return [(x.tobytes(), int(y)) for xs, ys in chunks for x, y in zip(xs, ys)]

    monkeypatch.setattr(stream, "CHUNK", 5)  # chunks of 5, 5 and 2 images
    whole = list(stream._decoded(reader.store, rel, reader.layout.classes, keys, (8, 8), False, kept))
    assert [len(ys) for _, ys in whole] == [5, 5, 2] and sorted(p.name for p in (tmp_path / "kept").iterdir()) == [
        "shard.labels.npy", "shard.rows"]
    again = list(stream._decoded(reader.store, rel, reader.layout.classes, keys, (8, 8), False, kept))
    assert flat(again) == flat(whole) and len(flat(whole)) == 12


@given(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=5, unique=True))
def test_labels_txt_keeps_exactly_the_class_names_that_are_not_refused(tmp_path_factory, classes):
    # labels.txt (and a pack's classes.txt) round-trips every list the listing lets through, and no other:
    # a name with a line break (\n, \r, \x85, U+2028, ...) would shift the names of the classes after it.
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    files.write_labels(path, classes)
    assert (files.read_labels(path) == classes) == (layout.broken_lines(classes) == [])


def test_a_class_name_with_a_line_break_is_refused(tmp_path):
    for name in ("a", "b\rc"):
        (tmp_path / "d/train" / name).mkdir(parents=True)
        (tmp_path / "d/train" / name / "1.png").write_bytes(b"P")
    with pytest.raises(DataError, match=r"class name 'b\\rc' holds a line break"):
        sources.open_source(config(tmp_path / "d"))


def test_labels_are_utf8_whatever_the_locale(tmp_path):
    # LANG=C without Python's UTF-8 coercion: the locale's encoding is ASCII, which cannot write café or 猫.
    code = ("import sys; from pathlib import Path; from job import files; p = Path(sys.argv[1]); "
            "files.write_labels(p, ['caf\\u00e9', '\\u732b']); print(ascii(files.read_labels(p)))")
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "labels.txt")], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == ascii(["caf\u00e9", "\u732b"])
    assert (tmp_path / "labels.txt").read_bytes() == "caf\u00e9\n\u732b\n".encode()


@given(st.data())
def test_identical_images_are_counted_against_training_and_across_labels(data):
    # A layout of up to 12 images in 3 splits and 3 classes, whose contents are drawn from 5 values: the brute
    # force over pairs of images says what `identical` must.
    splits = data.draw(st.lists(st.sampled_from(layout.SPLITS), min_size=1, max_size=12))
    images = [(s, f"{s}/{i}.png", data.draw(st.integers(0, 2)), data.draw(st.sampled_from("uvwxy")))
              for i, s in enumerate(splits)]
    classes = ["a", "b", "c"]
    files = {s: {c: sorted(k for s2, k, label, _ in images if s2 == s and classes[label] == c) for c in classes}
             for s in layout.SPLITS if s in splits}
    found = layout.identical(layout.Layout(classes, files), {k: content for _, k, _, content in images})
    trained = {content for s, _, _, content in images if s == "train"}
    assert found["in_training"] == {s: n for s in ("validation", "test") if (n := sum(
        1 for s2, _, _, content in images if s2 == s and content in trained))}
    clashing = {content for _, _, label, content in images
                for _, _, other, same in images if same == content and other != label}
    assert found["labelled_differently"] == sorted(
        sorted(k for _, k, _, content in images if content == c) for c in clashing)
    # training images that repeat an earlier one of the same content and label, pair by pair
    assert found["copies_in_training"] == sum(
        1 for i, (s, _, label, content) in enumerate(images) if s == "train" and any(
            s2 == "train" and label2 == label and same == content for s2, _, label2, same in images[:i]))


def test_identical_images_are_warned_of_and_counted_for_the_manifest(tmp_path, capsys):
    write_sample_dataset(tmp_path / "d", classes=2, per_class=4, size=8, seed=0, test_per_class=1)
    train = sorted((tmp_path / "d/train").rglob("*.png"))
    (tmp_path / "d/test" / train[-1].parent.name / "copy.png").write_bytes(train[0].read_bytes())
    # The same photo twice in its class, as a Mac's upload (NFD) and a Linux one (NFC) of `café.png` make it.
    (train[1].parent / "cafe\u0301.png").write_bytes(train[1].read_bytes())
    (train[1].parent / "caf\u00e9.png").write_bytes(train[1].read_bytes())
    reader = stage(tmp_path / "d", "copy", tmp_path).settle(0, seed=1)
    run = SimpleNamespace(data=reader, cfg=config(tmp_path / "d"), identical={})
    pipeline._warn_identical(run)
    # a copy of class 0's image filed under 1; two copies of one training image in its own class
    assert run.identical == {"test": 1, "labelled_differently": 1, "copies_in_training": 2}
    out = capsys.readouterr().out
    assert "1 test image(s) are byte-identical to training images" in out and "one of each is mislabelled" in out
    assert "2 training image(s) are byte-identical copies of another of the same label" in out


def test_a_broken_link_in_a_local_folder_is_a_bad_image(tmp_path):
    write_sample_dataset(tmp_path / "d", classes=2, per_class=4, size=8, seed=0, test_per_class=0)
    cls = sorted((tmp_path / "d/train").iterdir())[0]
    (cls / "gone.png").symlink_to(tmp_path / "nowhere.png")
    key = f"train/{cls.name}/gone.png"
    unchecked = stage(tmp_path / "d", "copy", tmp_path)  # no image checks (validate): no digest, no failure
    assert key not in unchecked.digests and len(unchecked.digests) == 8
    from job import dataset  # (TensorFlow: the checks decode)

    checks = readers.Checks(lambda paths: dataset.find_bad(paths, 10**8), lambda named: {})
    cache = tmp_path / "cache-checked"
    checked = readers.create(sources.open_source(config(tmp_path / "d")), "copy",
                             readers.Staging(cache, cache / "images", (8, 8), checks))
    assert checked.bad == {key: "cannot be read (a broken link, or no permission)"}


def test_the_dataset_fingerprint_changes_with_its_images_and_labels_not_with_a_fresh_copy(tmp_path):
    import shutil

    write_sample_dataset(tmp_path / "d", classes=2, per_class=3, size=8, seed=0, test_per_class=1)
    first = sources.open_source(config(tmp_path / "d")).fingerprint()
    shutil.copytree(tmp_path / "d", tmp_path / "copy")  # as an init container copies it into each pod
    assert sources.open_source(config(tmp_path / "copy")).fingerprint() == first
    images = sorted((tmp_path / "copy/train").rglob("*.png"))
    last_class = sorted((tmp_path / "copy/train").iterdir())[-1]
    changes = [lambda: images[0].write_bytes(images[0].read_bytes() + b"x"),  # rewritten (another size)
               lambda: images[1].rename(images[1].with_name("other.png")),  # renamed: removed and added
               lambda: images[0].rename(last_class / images[0].name)]  # moved to another class: relabelled
    seen = {first}
    for change in changes:
        change()
        now = sources.open_source(config(tmp_path / "copy")).fingerprint()
        assert now not in seen
        seen.add(now)
    # A manifest moves an image to the other class without touching a file.
    images = sorted((tmp_path / "d/train").rglob("*.png"))
    rows = [[p.relative_to(tmp_path / "d").as_posix(), p.parent.name] for p in images]
    for i in range(2):
        (tmp_path / f"m{i}.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
        rows[0][1] = images[-1].parent.name
    assert len({sources.open_source(config(tmp_path / "d", manifest=str(tmp_path / f"m{i}.csv"))).fingerprint()
                for i in range(2)}) == 2


def test_a_resume_on_a_changed_dataset_warns_and_keeps_the_new_fingerprint(tmp_path, capsys):
    from job.runstate import RunState, training_config

    cfg = config(tmp_path / "d")
    cfg.run_id = "r1"
    stored = RunState(phase="finetune", epoch=2, config=training_config(pipeline.redacted(cfg)), classes=["a", "b"])
    for kept, now, warned in (("", "f1", False), ("f1", "f1", False), ("f1", "f2", True)):
        stored.dataset = kept
        ckpt = SimpleNamespace(fetch=lambda: stored)
        state = pipeline._resume_point(cfg, ckpt, "incomplete", ["a", "b"], now)
        assert state.epoch == 2 and state.dataset == now
        assert ("changed since run r1's checkpoint" in capsys.readouterr().out) == warned
    assert pipeline._resume_point(cfg, None, "empty", ["a", "b"], "f3").dataset == "f3"  # a new run keeps it


def test_a_resume_keeps_its_checkpoints_class_order_where_a_manifests_classes_txt_sets_another(tmp_path, capsys):
    # A run begun before this version read classes.txt beside a single-label manifest kept its classes sorted; its
    # resume met them in classes.txt's order and was refused, exit 3 "another order".
    from job.errors import DataError
    from job.runstate import RunState, training_config

    cfg = config(tmp_path / "d")
    cfg.run_id = "r1"
    stored = RunState(phase="finetune", epoch=2, config=training_config(pipeline.redacted(cfg)),
                      classes=["0", "1", "10", "2"], dataset="f-sorted")
    ckpt = SimpleNamespace(fetch=lambda: stored)
    kept = []
    state = pipeline._resume_point(cfg, ckpt, "incomplete", ["0", "1", "2", "10"], "f-listed", "",
                                   lambda order: (kept.append(order) or order, "f-sorted"))
    assert kept == [["0", "1", "10", "2"]] and state.classes == ["0", "1", "10", "2"] and state.dataset == "f-sorted"
    out = capsys.readouterr().out
    assert "the run keeps the checkpoint's order" in out and "changed since" not in out
    with pytest.raises(DataError, match="another order"):  # where nothing can keep it (folders, shards): refused
        pipeline._resume_point(cfg, ckpt, "incomplete", ["0", "1", "2", "10"], "f-listed")
    with pytest.raises(DataError, match="new: 3"):  # other classes are refused whatever the order
        pipeline._resume_point(cfg, ckpt, "incomplete", ["0", "1", "2", "3"], "f", "", lambda order: (order, "f"))


def test_a_resume_over_other_base_weights_at_the_same_path_is_refused(tmp_path):
    # The weights file replaced between attempts: the head trained on the old base's features went on over the new
    # base, and the run was exported as complete, matching neither an uninterrupted run on the one nor the other.
    from job.runstate import RunState, training_config

    cfg = config(tmp_path / "d")
    cfg.run_id = "r1"
    stored = RunState(phase="head", epoch=2, config=training_config(pipeline.redacted(cfg)), classes=["a", "b"])
    for kept, now in (("", "b1"), ("b1", "b1"), ("b1", "")):  # not kept (older checkpoints), the same, from scratch
        stored.base = kept
        state = pipeline._resume_point(cfg, SimpleNamespace(fetch=lambda: stored), "incomplete", ["a", "b"], "f", now)
        assert state.epoch == 2 and state.base == now
    stored.base = "b1"
    with pytest.raises(ConfigError, match=r"^config: model\.weights: the base weights of .* are not those run r1's "
                                          r"checkpoint was trained on \(the file was replaced\)"):
        pipeline._resume_point(cfg, SimpleNamespace(fetch=lambda: stored), "incomplete", ["a", "b"], "f", "b2")
    assert pipeline._resume_point(cfg, None, "empty", ["a", "b"], "f", "b3").base == "b3"  # a new run keeps it


# ---------------------------------------------------------------- names a local file system cannot hold


def test_shard_members_named_too_long_for_a_local_file_system_are_extracted(tmp_path):
    long_key = "x" * 300 + "/" + "\u00fc" * 130  # a folder of 300 bytes, a file of 260 (and its extension)
    members = [(f"{long_key}.jpg", b"CAT"), (f"{long_key}.cls", b"0"), ("dog/1.jpg", b"DOG"), ("dog/1.cls", b"1")]
    root = shard_dataset(tmp_path / "d", {"train": [members]})
    reader = stage(root, "copy", tmp_path)
    assert as_read(reader) == {"train": [(b"CAT", "cat"), (b"DOG", "dog")]}
    assert as_read(stage(root, "copy", tmp_path)) == as_read(reader)  # read back from the extracted cache


def test_objects_named_too_long_for_a_local_file_system_are_read_in_copy_mode(tmp_path, s3, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    bucket, long_class = s3.bucket(), "\u00fc" * 130
    for key, body in ((f"d/train/{long_class}/{'y' * 300}.png", b"LONG"), ("d/train/b/1.png", b"B")):
        s3.client.put_object(Bucket=bucket, Key=key, Body=body)
    reader = stage(f"s3://{bucket}/d", "copy", tmp_path)
    assert as_read(reader) == {"train": [(b"B", "b"), (b"LONG", long_class)]}


def test_images_in_formats_the_job_does_not_read_are_counted_apart(tmp_path):
    # They were "objects ignored (not images in a class folder)", among notes and licences.
    from structlog.testing import capture_logs

    for rel in ("train/a/1.png", "train/a/2.webp", "train/a/3.WEBP", "train/b/1.png", "train/b/2.tiff",
                "train/b/notes.txt"):
        (tmp_path / "d" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / rel).write_bytes(b"P")
    with capture_logs() as records:
        sources.open_source(config(tmp_path / "d"))
    assert [(r["event"], r["count"]) for r in records if r["event"].startswith("images left out")] == [
        ("images left out: 2 .webp, 1 .tiff, in formats the job does not read; convert them to JPEG or PNG", 3)]
    assert [(r["count"], r["examples"]) for r in records if r["event"].startswith("objects ignored")] == \
        [(1, ["train/b/notes.txt"])]


def _with_bmps(root: Path, palette: int, grey: int = 2) -> Path:
    """A folder dataset of 6 PNGs a class plus `palette` palette BMPs and `grey` greyscale ones in one class."""
    from PIL import Image

    write_sample_dataset(root, classes=2, per_class=6, size=16, seed=0, test_per_class=0)
    folder = next((root / "train").iterdir())
    for i in range(palette):
        Image.new("RGB", (16, 16), (200, 30 * i, 10)).convert("P").save(folder / f"p{i}.BMP")
    for i in range(grey):
        Image.new("L", (16, 16), 40 * i).save(folder / f"g{i}.bmp")  # the grey ramp: TensorFlow reads it right
    return root


def _placed(root: Path, where: str, request) -> tuple[str, str]:
    """(data.uri, s3 endpoint) of a local dataset folder, read in place or uploaded to the S3 server."""
    if where != "s3":
        return str(root), ""
    s3 = request.getfixturevalue("s3")
    bucket = s3.bucket()
    s3.upload_dir(root, bucket, "d")
    return f"s3://{bucket}/d", s3.endpoint


def _validated(place: tuple[str, str], tmp_path: Path, capsys, **data) -> str:
    """What `validate` logs of the dataset at `place` (`_placed`), without a validation split."""
    uri, endpoint = place
    cfg = Config.model_validate({"data": {"uri": uri, "validation_split": 0.0, **data},
                                 "output": {"uri": str(tmp_path / "out")}, "model": {"weights": "none"},
                                 "s3": {"endpoint_url": endpoint}})
    _validated.layout = pipeline.validate(cfg)
    return capsys.readouterr().out


@pytest.mark.parametrize("where", ["local", "s3"])
def test_validate_reads_the_bmps_headers_warns_of_palette_ones_and_refuses_as_train_would(tmp_path, where, request,
                                                                                          capsys):
    # validate downloaded nothing, so a dataset of palette BMPs (bad images to train: headers.PALETTE_BMP) said ok,
    # and its run failed after staging.
    def validated(palette: int, **data):
        place = _placed(_with_bmps(tmp_path / f"d{palette}", palette), where, request)
        return _validated(place, tmp_path, capsys, **data)

    assert "BMP" not in validated(0)  # grey BMPs are read right
    (line,) = [x for x in validated(2, max_bad_fraction=0.2).splitlines() if "BMPs or GIFs that training will skip"
               in x]
    assert "colour palette" in line and "count=2" in line and "checked=4" in line  # 2 of 4 BMPs, 2 of 16 images
    # and left out of the table, as train leaves them out (it counted them, and the run then trained 2 fewer)
    kept = _validated.layout.keys()
    assert _validated.layout.count("train") == 14 and not [k for k in kept if k.endswith(".BMP")]
    with pytest.raises(DataError, match=r"^3 of 17 images are bad \(17\.6% > data\.max_bad_fraction 1\.0%\), "
                                        r"e\.g\. .*/train/\w+/p0\.BMP: a BMP with a colour palette"):
        validated(3)


def test_validate_reads_the_gifs_headers_too(tmp_path, capsys):
    # A GIF whose frame is covering only part of its canvas is a bad image to train (headers.PARTIAL_GIF); validate
    # read BMPs' headers only, said ok, and train refused the dataset after staging.
    import io as _io

    from PIL import Image

    root = _with_bmps(tmp_path / "d", 0, 0)
    folder = next((root / "train").iterdir())
    out = _io.BytesIO()
    Image.new("RGB", (4, 4), (220, 20, 20)).save(out, format="GIF")
    data = bytearray(out.getvalue())
    data[6:10] = (8).to_bytes(2, "little") * 2  # an 8x8 canvas
    at = data.index(b"\x2c\x00\x00\x00\x00\x04\x00\x04\x00")
    data[at + 1:at + 5] = (4).to_bytes(2, "little") * 2  # the frame at (4, 4)
    (folder / "trimmed.gif").write_bytes(bytes(data))
    (line,) = [x for x in _validated((str(root), ""), tmp_path, capsys, max_bad_fraction=0.2).splitlines()
               if "BMPs or GIFs that training will skip" in x]
    assert "covers only part of its canvas" in line and "count=1" in line
    assert _validated.layout.count("train") == 12


@pytest.mark.parametrize("where", ["local", "s3"])
def test_validate_counts_empty_images_as_train_does(tmp_path, where, request, capsys):
    # validate said ok of a dataset whose empty files train then refused (exit 3) as "cannot be decoded".
    root = tmp_path / "d"
    write_sample_dataset(root, classes=2, per_class=6, size=16, seed=0, test_per_class=0)
    folder = next((root / "train").iterdir())
    (folder / "empty.bmp").write_bytes(b"")  # S3 refuses a ranged GET of an empty object: none is asked
    (folder / "empty.jpg").write_bytes(b"")
    place = _placed(root, where, request)

    def validated(**data):
        return _validated(place, tmp_path, capsys, **data)

    if where == "local":  # a broken link is listed with size 0 too: it cannot be read, as train says
        (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (line,) = [x for x in validated(max_bad_fraction=0.3).splitlines() if "empty or unreadable images" in x]
    assert "empty.bmp: empty (0 bytes)" in line and "empty.jpg: empty (0 bytes)" in line
    assert ("count=3" in line and "gone.jpg: cannot be read (a broken link" in line) if where == "local" else \
        "count=2" in line
    assert _validated.layout.count("train") == 12  # the empty ones left out of the table, as train leaves them
    (folder / "gone.jpg").unlink(missing_ok=True)
    with pytest.raises(DataError, match=r"^2 of 14 images are bad \(14\.3% > data\.max_bad_fraction 1\.0%\), "
                                        r"e\.g\. .*/train/\w+/empty\.bmp: empty \(0 bytes\)$"):
        validated()
    assert dataset_find_bad([str(folder / "empty.jpg")]) == {str(folder / "empty.jpg"): "empty (0 bytes)"}
    # A class whose every image is known bad: train refuses it (exit 3); validate showed it with 0 and said ok.
    other = next(p for p in (root / "train").iterdir() if p != folder)
    for image in other.iterdir():
        image.write_bytes(b"")
    with pytest.raises(DataError, match=f"/train/: no usable images left in {other.name}$"):
        _validated(_placed(root, where, request), tmp_path, capsys, max_bad_fraction=1.0)


def dataset_find_bad(paths: list[str]) -> dict:
    from job import dataset

    return dataset.find_bad(paths, 10**8)


@pytest.mark.parametrize("name", ["re\x00d", "red\tshoe", "\x1b[31mred"])
def test_a_class_name_with_a_control_character_is_refused(tmp_path, name):
    # A NUL or a tab in a label (JSON lines, a CSV field, a folder) trained and exported without a word.
    write_sample_dataset(tmp_path / "d", classes=2, per_class=2, size=8, seed=0, test_per_class=0)
    rows = [{"path": str(p.relative_to(tmp_path / "d")), "label": name if i % 2 else "blue"}
            for i, p in enumerate(sorted((tmp_path / "d").rglob("*.png")))]
    (tmp_path / "d" / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"class name {re.escape(ascii(name))} holds a control character"):
        sources.open_source(config(tmp_path / "d", manifest=str(tmp_path / "d" / "m.jsonl")))
    if "\x00" not in name:  # (a file system holds no NUL in a name)
        (tmp_path / "d" / "train" / name).mkdir()
        (tmp_path / "d" / "train" / name / "1.png").write_bytes((tmp_path / "d" / rows[0]["path"]).read_bytes())
        with pytest.raises(DataError, match="holds a control character"):
            sources.open_source(config(tmp_path / "d"))


def test_overwriting_a_run_never_deletes_a_complete_run_below_it(tmp_path):
    # output.uri set to a run's folder put a second run inside the first; overwriting the first deleted it.
    from job import storage
    from job.errors import ConfigError

    run = tmp_path / "out" / "r1"
    for rel in ("_SUCCESS", "model.keras", "checkpoints/ckpt-1.index", "_LEASE"):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("x")
    assert sorted(pipeline._own_files(storage.LocalStore(str(run)))) == ["_SUCCESS", "checkpoints/ckpt-1.index",
                                                                        "model.keras"]
    (run / "nested").mkdir()
    (run / "nested" / "_SUCCESS").write_text("")
    with pytest.raises(ConfigError, match=f"^config: output.overwrite: {run} holds another complete run below it "
                                          f"\\({run}/nested\\), which overwriting would delete"):
        pipeline._own_files(storage.LocalStore(str(run)))
    # train refuses it on every worker before they meet (a chief alone refusing left the others waiting)
    write_sample_dataset(tmp_path / "d", classes=2, per_class=2, size=8, seed=0, test_per_class=0)
    cfg = Config.model_validate({"data": {"uri": str(tmp_path / "d")}, "output": {"uri": str(tmp_path / "out"),
                                 "overwrite": True}, "model": {"weights": "none"}, "run_id": "r1"})
    with pytest.raises(ConfigError, match="holds another complete run below it"):
        pipeline.prepare(cfg)
    assert (run / "model.keras").is_file() and (run / "nested" / "_SUCCESS").is_file()


def test_fine_tuning_keys_a_run_cannot_use_are_said(capsys):
    from job import config as config_module

    # From scratch (or with no fine-tuning epoch) a search, a moving average and a rate decay that were set were
    # dropped without a word, and the model card claimed the decay.
    def said(*sets) -> str:
        capsys.readouterr()
        pipeline._warn_unused(config_module.load(None, ["data.uri=/d", "output.uri=/o", *sets], environ={}))
        return capsys.readouterr().out

    scratch = said("model.weights=none", "train.search.learning_rates=[1e-3, 3e-3]", "train.finetune.average_epochs=2",
                   "train.finetune.layer_decay=0.5", "train.finetune.augment=true")
    assert ("train.search.learning_rates, train.finetune.average_epochs, train.finetune.layer_decay ignored: "
            "model.weights is none") in scratch and "augment" not in scratch  # from scratch the one phase augments
    assert said("model.weights=none") == ""  # the default search is no one's setting: nothing to say
    none = said("train.finetune.epochs=0", "train.search.learning_rates=[1e-3, 3e-3]", "train.finetune.augment=true")
    assert "train.search.learning_rates, train.finetune.augment ignored: train.finetune.epochs is 0" in none
    assert said("train.finetune.layer_decay=0.5", "train.finetune.average_epochs=2") == ""  # both apply


def test_a_complete_run_asked_again_with_another_recipe_says_so(tmp_path, capsys):
    # It ended "already complete", exit 0, without a word that the stored model was trained otherwise.
    from job.config import redacted, to_yaml

    write_sample_dataset(tmp_path / "d", classes=2, per_class=2, size=8, seed=0, test_per_class=0)

    def cfg(seed: int) -> Config:
        return Config.model_validate({"data": {"uri": str(tmp_path / "d")}, "output": {"uri": str(tmp_path / "out")},
                                      "model": {"weights": "none"}, "run_id": "r1", "train": {"seed": seed}})

    (tmp_path / "out" / "r1").mkdir(parents=True)
    (tmp_path / "out" / "r1" / "config.yaml").write_text(to_yaml(cfg(1)))
    (tmp_path / "out" / "r1" / "_SUCCESS").write_text("")
    assert redacted(cfg(1))["run_id"] == "r1"
    assert pipeline.prepare(cfg(1))["status"] == "already complete"
    assert "another config" not in capsys.readouterr().out
    assert pipeline.prepare(cfg(5))["status"] == "already complete"
    out = capsys.readouterr().out
    assert "run r1 is complete, trained with another config, and is not redone" in out and "train.seed: 1 -> 5" in out
    grown = cfg(1).model_copy(update={"train": cfg(1).train.model_copy(update={"head": cfg(1).train.head.model_copy(
        update={"epochs": 40})})})
    assert pipeline.prepare(grown)["status"] == "already complete"  # more epochs: not trained either, so said
    assert f"train.head.epochs: {cfg(1).train.head.epochs} -> 40" in capsys.readouterr().out
    # A format asked for that the run was not exported as (or whose export failed): exit 0, no such file, no word.
    (tmp_path / "out" / "r1" / "manifest.json").write_text(json.dumps({"formats": {
        "saved_model": {"accuracy": 1.0}, "tflite": {"accuracy": 1.0}, "onnx": {"error": "onnx: failed"}}}))

    def asked(formats) -> str:
        run = cfg(1).model_copy(update={"export": cfg(1).export.model_copy(update={"formats": formats})})
        assert pipeline.prepare(run)["status"] == "already complete"
        return capsys.readouterr().out

    for formats in (["tflite", "saved_model"], ["saved_model"]):  # what it has, in any order: nothing to say
        assert "not exported again" not in asked(formats)
    out = asked(["saved_model", "onnx"])
    assert "run r1 is complete and not exported again, and it has no onnx" in out
    assert "another config" not in out  # export.* is safe to change: no training key differs
    assert "it has no tf_serving, tflite_int8" in asked(None)  # the defaults, which it lacks in part
    assert "not exported again" not in asked([])  # none listed: the SavedModel alone, which it has
    (tmp_path / "out" / "r1" / "config.yaml").unlink()  # an older run without one: still said
    assert "it has no onnx" in asked(["onnx"])


def test_a_run_completed_by_another_attempt_while_waiting_for_the_lease_is_not_redone(tmp_path, monkeypatch, capsys):
    # A second `train` of one run_id waited for the first's lease; once it had it, it resumed from the "trained"
    # checkpoint and exported over the finished run (its manifest, timings and SavedModel replaced), exit 0.
    write_sample_dataset(tmp_path / "d", classes=2, per_class=2, size=8, seed=0, test_per_class=0)
    cfg = Config.model_validate({"data": {"uri": str(tmp_path / "d"), "image_size": [32, 32],
                                          "cache_dir": str(tmp_path / "cache")},
                                 "output": {"uri": str(tmp_path / "out")}, "run_id": "r1",
                                 "model": {"weights": "none", "backbone": "mobilenet"}})
    taken = pipeline._take_lease

    def the_other_finishes_first(cfg, out):
        lease = taken(cfg, out)
        out.put_new("_SUCCESS", b"")  # (as the other attempt, done while this one waited)
        return lease

    monkeypatch.setattr(pipeline, "_take_lease", the_other_finishes_first)
    assert pipeline.prepare(cfg)["status"] == "already complete"
    assert "was completed by another attempt while this one waited for its lease" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out" / "r1").iterdir()) == ["_SUCCESS"]  # its lease given back

    # Two workers: the chief looks, and tells the other in one gather (it resumed and exported over the run too).
    (tmp_path / "out" / "r1" / "_SUCCESS").unlink()
    started = pipeline._start_strategy
    asked = []

    def worker(index, chief_found):
        def two_workers(cfg):
            cluster = started(cfg)
            cluster.worker_index, cluster.num_workers = index, 2

            def gather(values):
                asked.append(values)
                rows = [[int(chief_found), 0], values] if index else [values, [0, 0]]
                return rows
            cluster.gather = gather
            return cluster
        return two_workers

    monkeypatch.setattr(pipeline, "_start_strategy", worker(1, True))
    assert pipeline.prepare(cfg)["status"] == "already complete" and asked == [[0, 0]]  # it holds no lease: 0
    monkeypatch.setattr(pipeline, "_start_strategy", worker(0, False))
    assert pipeline.prepare(cfg)["status"] == "already complete" and asked[-1] == [1, 0]  # the chief found _SUCCESS
    (tmp_path / "out" / "r1" / "_SUCCESS").unlink()
    monkeypatch.setattr(pipeline, "_take_lease", taken)
    monkeypatch.setattr(pipeline, "_start_strategy", worker(1, False))
    assert isinstance(pipeline.prepare(cfg), pipeline.Run)  # nothing found: the run goes on
    # The chief's look fails (storage): it still meets the others in the gather, and all stop (it raised before it,
    # and the others waited in the gather for ever).
    asked.clear()
    exists, leased = storage.LocalStore.exists, []

    def failing(self, rel):
        if rel == "_SUCCESS" and leased:  # (output_state's look, before the lease, goes through)
            raise StorageError("checking s3://b/out/r1/_SUCCESS: storage unreachable")
        return exists(self, rel)

    def lease_then_fail(cfg, out):
        leased.append(1)
        return taken(cfg, out)

    monkeypatch.setattr(storage.LocalStore, "exists", failing)
    monkeypatch.setattr(pipeline, "_take_lease", lease_then_fail)

    def two(index):
        def two_workers(cfg):
            cluster = started(cfg)
            cluster.worker_index, cluster.num_workers = index, 2

            def gather(values):
                asked.append(values)
                return [values, [0, 0]] if index == 0 else [[0, 1], values]
            cluster.gather = gather
            return cluster
        return two_workers

    monkeypatch.setattr(pipeline, "_start_strategy", two(0))
    with pytest.raises(StorageError, match="storage unreachable"):
        pipeline.prepare(cfg)
    assert asked[-1] == [0, 1]  # it told the others
    # Its lease refused (an output that denies writes, a live attempt's): the same, before the chief raises.
    def refused(cfg, out):
        raise StorageError("writing s3://b/out/r1/_LEASE: access denied")

    monkeypatch.setattr(pipeline, "_take_lease", refused)
    asked.clear()
    leased.clear()
    with pytest.raises(StorageError, match="access denied"):
        pipeline.prepare(cfg)
    assert asked == [[0, 1]]
    monkeypatch.setattr(pipeline, "_take_lease", lease_then_fail)
    leased.clear()  # this worker takes no lease: its own looks go through
    monkeypatch.setattr(pipeline, "_start_strategy", two(1))
    with pytest.raises(StorageError, match="the chief could not take or read the run's output"):
        pipeline.prepare(cfg)


def test_a_complete_run_asked_again_after_its_dataset_changed_says_so(tmp_path, capsys):
    # A class added to the dataset, then `train` again: "already complete", exit 0, a model without the class and
    # not a word. manifest.json keeps the listing's fingerprint; a rerun compares it.
    write_sample_dataset(tmp_path / "d", classes=2, per_class=2, size=8, seed=0, test_per_class=0)
    cfg = Config.model_validate({"data": {"uri": str(tmp_path / "d")}, "output": {"uri": str(tmp_path / "out")},
                                 "model": {"weights": "none"}, "run_id": "r1"})
    run = tmp_path / "out" / "r1"
    run.mkdir(parents=True)
    (run / "_SUCCESS").write_text("")
    trained = sources.open_source(cfg).layout.classes

    def rerun(fingerprint) -> str:
        (run / "manifest.json").write_text(json.dumps({"classes": trained, "dataset": {"fingerprint": fingerprint}}))
        assert pipeline.prepare(cfg)["status"] == "already complete"
        return capsys.readouterr().out

    assert "changed since" not in rerun(sources.open_source(cfg).fingerprint())  # the same dataset: nothing said
    assert "changed since" not in rerun(None)  # an older run without one: nothing to compare
    kept = sources.open_source(cfg).fingerprint()
    image = next((tmp_path / "d" / "train" / trained[0]).iterdir())
    shutil.copy(image, image.with_name("added" + image.suffix))
    out = rerun(kept)
    assert f"run r1 is complete, trained on the dataset under {tmp_path / 'd'} as it was, and is not redone" in out
    assert "classes_added" not in out
    shutil.copytree(tmp_path / "d" / "train" / trained[0], tmp_path / "d" / "train" / "zebra")
    assert "classes_added=['zebra']" in rerun(kept)
    shutil.rmtree(tmp_path / "d" / "train")  # no dataset there now: said, and the complete run still ends well
    assert "its dataset could not be listed to compare" in rerun(kept)


def test_a_classes_txt_unlike_the_one_packed_is_refused(tmp_path):
    # classes.txt reordered after pack: the .cls indices named other classes, trained on without a word (validate
    # took index.json's counts by name and so contradicted training).
    write_sample_dataset(tmp_path / "data", classes=3, per_class=4, size=8, seed=0, test_per_class=0)
    pack(str(tmp_path / "data"), str(tmp_path / "shards"), 20_000)
    packed = (tmp_path / "shards" / "classes.txt").read_text().split()
    (tmp_path / "shards" / "classes.txt").write_text("\n".join(reversed(packed)) + "\n")
    with pytest.raises(DataError, match=rf"classes.txt lists {', '.join(reversed(packed))} but the shards were "
                                        rf"packed with {', '.join(packed)} \(index.json\)"):
        sources.open_source(config(tmp_path / "shards"))
    (tmp_path / "shards" / "classes.txt").write_text("\n".join(packed) + "\n")
    assert sources.open_source(config(tmp_path / "shards")).layout.classes == packed


def test_each_pass_of_a_repeated_stream_is_every_training_sample_once(tmp_path):
    """Streaming repeats pass after pass behind its shuffle buffer: each pass of n samples is the n samples (with
    the repeat before the buffer, a pass of fewer samples than the buffer was a random multiset of several)."""
    from job import stream

    write_sample_dataset(tmp_path / "d", classes=3, per_class=8, size=8, seed=0, test_per_class=0)
    pack(str(tmp_path / "d"), str(tmp_path / "s"), shard_size=1_500)
    reader = stage(tmp_path / "s", "stream", tmp_path).settle(0, 0)
    keys = set(reader.items("train")[0])
    rels = reader.shards("train")
    assert len(rels) > 1 and len(keys) == 24
    ds = stream.dataset(reader.store, rels, reader.layout.classes, keys, (8, 8), 4, shuffle=True, seed=5,
                        repeat=True)
    rows = [(x.tobytes(), int(y)) for xs, ys in ds.take(3 * 24 // 4) for x, y in zip(xs.numpy(), ys.numpy())]
    passes = [sorted(rows[i * 24:(i + 1) * 24]) for i in range(3)]
    assert len(set(passes[0])) == 24 and passes[0] == passes[1] == passes[2]
    assert rows[:24] != rows[24:48]  # each pass in an order of its own


def test_a_streamed_shard_rewritten_during_the_run_is_not_read_as_the_listed_one(tmp_path):
    """A streamed run reads its shards every epoch: a shard rewritten after the listing was read as it then was,
    and one training mixed two versions of the dataset. Another size is refused; the same size, a warning once."""
    from job import stream

    write_sample_dataset(tmp_path / "d", classes=2, per_class=6, size=8, seed=0, test_per_class=0)
    pack(str(tmp_path / "d"), str(tmp_path / "s"), shard_size=100_000)
    reader = stage(tmp_path / "s", "stream", tmp_path).settle(0, 0)
    keys, rels = set(reader.items("train")[0]), reader.shards("train")
    shard = tmp_path / "s" / rels[0]

    def one_pass():
        ds = stream.dataset(reader.store, rels, reader.layout.classes, keys, (8, 8), 4, versions=reader.versions)
        return sum(len(y) for _, y in ds)

    assert one_pass() == 12
    body = shard.read_bytes()
    shard.write_bytes(body)  # the same bytes written again: another modification time
    # A same-size rewrite (tar pads to 512 bytes: most relabels are one) was a warning, and trained on both versions.
    with pytest.raises(Exception) as raised:
        one_pass()
    assert re.fullmatch(rf".*/{rels[0]}: rewritten during the run \(the same size, another version than its first "
                        r"read\); run again once the dataset stops changing: the rerun lists it anew",
                        str(errors.carried(raised.value)))
    shard.write_bytes(body + b"\0" * 512)
    with pytest.raises(Exception) as raised:  # TensorFlow's own error, from the tf.data generator
        one_pass()
    error = errors.carried(raised.value)  # what the CLI reports: the error the generator raised
    assert isinstance(error, StorageError) and re.fullmatch(
        rf".*/{rels[0]}: rewritten after the dataset was listed \({len(body) + 512} bytes, listed {len(body)}\); "
        "run again once the dataset stops changing: the rerun lists it anew", str(error))


@pytest.mark.parametrize("mode", ["copy", "stream"])
def test_a_packed_shard_that_lost_samples_is_refused_against_its_index(tmp_path, mode):
    """index.json counts each shard's samples: a shard with fewer (cut short and closed again as a tar, or
    rewritten) lost images without a word before."""
    write_sample_dataset(tmp_path / "d", classes=2, per_class=6, size=8, seed=0, test_per_class=0)
    pack(str(tmp_path / "d"), str(tmp_path / "s"), shard_size=100_000)
    shard = tmp_path / "s" / "train" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        kept = [(m, tar.extractfile(m).read()) for m in tar.getmembers()[:-2]]  # all but the last sample
    with tarfile.open(shard, "w") as tar:
        for member, data in kept:
            tar.addfile(member, io.BytesIO(data))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 's'}/train/shard-000000.tar: 11 sample(s) read, "
                                                  "but index.json counts 12: the shard changed after it was packed")):
        stage(tmp_path / "s", mode, tmp_path)


def test_pack_overwrite_reads_the_source_before_deleting_the_old_pack(tmp_path):
    """A source that lists but does not read (here: its images are links into a folder since moved; in S3, no
    s3:GetObject) failed only after --overwrite had deleted the old pack: the destination was left empty."""
    write_sample_dataset(tmp_path / "a", classes=2, per_class=4, size=8, seed=0, test_per_class=0)
    write_sample_dataset(tmp_path / "real", classes=2, per_class=3, size=8, seed=1, test_per_class=0)
    for image in sorted((tmp_path / "real").rglob("*.png")):
        link = tmp_path / "linked" / image.relative_to(tmp_path / "real")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(image)
    (tmp_path / "real").rename(tmp_path / "moved")
    pack(str(tmp_path / "a"), str(tmp_path / "shards"), shard_size=100_000)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "shards").rglob("*") if p.is_file()}
    with pytest.raises(StorageError, match="reading .*linked/train/"):
        pack(str(tmp_path / "linked"), str(tmp_path / "shards"), shard_size=100_000, overwrite=True)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "shards").rglob("*") if p.is_file()} == before


def test_a_validation_or_test_class_left_without_images_by_bad_ones_is_what_an_empty_folder_is(tmp_path):
    # Its only images undecodable: exit 3 ("no usable images left"), where an empty folder there is a warning that
    # those scores do not measure the class. A training class left without images still cannot be learned.
    write_sample_dataset(tmp_path / "d", classes=2, per_class=4, size=8, seed=0, test_per_class=2)
    (tmp_path / "d" / "validation" / "circle").mkdir(parents=True)
    (tmp_path / "d" / "validation" / "circle" / "x.png").write_bytes(b"\x89PNG junk")
    listed = sources.open_source(config(tmp_path / "d")).layout
    test_square = [k for k in listed.items("test")[0] if "/square/" in k]
    bad = {"validation/circle/x.png": "undecodable", **{k: "undecodable" for k in test_square}}
    settled = readers.Reader(listed, bad, str(tmp_path / "d"), (8, 8)).settle(0.2, 0)
    carved = settled.layout.items("validation")[0]  # its one image was bad: carved from train, as an empty folder is
    assert carved and all(k.startswith("train/") for k in carved)
    assert settled.layout.counts()["test"] == {"circle": 2, "square": 0}
    assert [(split, classes) for _, split, classes in pipeline.unmeasured(settled.layout)] == [("test", ["square"])]
    train_circle = [k for k in listed.items("train")[0] if "/circle/" in k]
    with pytest.raises(DataError, match=r"/train/: no usable images left in circle$"):
        readers.Reader(listed, {k: "undecodable" for k in train_circle}, str(tmp_path / "d"), (8, 8)).settle(0.2, 0)


def test_a_carved_validation_split_far_above_its_fraction_is_said(tmp_path, capsys):
    # 300 classes of 3 images at validation_split 0.01: one image of each class, a third of them, without a word.
    from job import layout

    def listed(per_class: int, classes: int = 30) -> layout.Layout:
        files = {f"c{i}": [f"train/c{i}/{j}.png" for j in range(per_class)] for i in range(classes)}
        return layout.Layout(list(files), {"train": files})

    def said(per_class: int, fraction: float) -> str:
        capsys.readouterr()
        source = listed(per_class)
        pipeline._warn_carved_share(config(tmp_path, validation_split=fraction), source, source.carve(fraction, 0))
        return capsys.readouterr().out

    assert "holds 33% of the training images, not the 1% of data.validation_split" in said(3, 0.01)
    assert said(100, 0.01) == "" and said(3, 0.3) == "" and said(10, 0.2) == ""  # as asked, or near it
    given = listed(3)  # a validation/ folder of the user's: not carved, nothing to say
    given.files["validation"] = {c: [k.replace("train/", "validation/") for k in v]
                                 for c, v in given.files["train"].items()}
    capsys.readouterr()
    pipeline._warn_carved_share(config(tmp_path, validation_split=0.01), given, given)
    assert capsys.readouterr().out == ""
    # validate says it too (train did, and validate printed "ok" above a validation split of 50%)
    write_sample_dataset(tmp_path / "d", classes=4, per_class=2, size=8, seed=0, test_per_class=0)
    pipeline.validate(config(tmp_path / "d", validation_split=0.2))
    assert "the carved validation split holds 50% of the training images, not the 20%" in capsys.readouterr().out


def test_pack_logs_its_progress(tmp_path, monkeypatch):
    # 6,000 images packed for 40 s before its first record (the split's, at its end).
    from job import logs

    write_sample_dataset(tmp_path / "a", classes=2, per_class=300, size=8, seed=0, test_per_class=0)
    monkeypatch.setattr(logs, "PROGRESS_SECONDS", 0.0)  # every advance is due
    with structlog.testing.capture_logs() as logged:
        pack(str(tmp_path / "a"), str(tmp_path / "shards"), shard_size=100_000)
    done = [r["done"] for r in logged if r["event"] == "packing: in progress"]
    assert done == [256, 512] and all(r["total"] == 600 for r in logged if r["event"] == "packing: in progress")


def test_a_pack_that_fails_midway_says_what_the_destination_holds(tmp_path, monkeypatch):
    # A read failing after --overwrite had deleted the old pack (storage gone away, one object denied): the error named
    # the object alone, the destination held neither pack, and nothing said so or what to do.
    from job import pack as pack_module

    write_sample_dataset(tmp_path / "a", classes=2, per_class=40, size=8, seed=0, test_per_class=0)
    pack(str(tmp_path / "a"), str(tmp_path / "shards"), shard_size=2_000)
    old = len(list((tmp_path / "shards").rglob("shard-*.tar")))
    reads, real = [], pack_module._read

    def failing(source, key):
        reads.append(key)
        if len(reads) > 30:
            raise StorageError(f"reading {key}: access denied")
        return real(source, key)

    monkeypatch.setattr(pack_module, "_read", failing)
    where = re.escape(str(tmp_path / "shards"))
    with pytest.raises(StorageError, match=rf"access denied; pack stopped midway: {where} has no classes.txt, so it "
                                           rf"is no dataset \(shards there are this unfinished pack's; the {old} "
                                           r"shard\(s\) there before were deleted first \(--overwrite\)\); pack again "
                                           r"with --overwrite"):
        pack(str(tmp_path / "a"), str(tmp_path / "shards"), shard_size=2_000, overwrite=True)
    assert not (tmp_path / "shards" / "classes.txt").exists()
    reads.clear()
    with pytest.raises(StorageError, match=r"so it is no dataset \(shards there are this unfinished pack's\); pack "
                                           r"again with --overwrite"):  # nothing deleted
        pack(str(tmp_path / "a"), str(tmp_path / "fresh"), shard_size=2_000)
    reads[:] = range(100)  # fails at the first read: nothing written there nor deleted, the error as it was
    with pytest.raises(StorageError, match=r"access denied$"):
        pack(str(tmp_path / "a"), str(tmp_path / "untouched"), shard_size=2_000)
    # A full TMPDIR (the local shard): exit 4 with advice for train's cache, and not a word of the unfinished pack.
    import errno

    monkeypatch.setattr(pack_module, "_read", real)
    added, add = [], pack_module.shards.ShardWriter.add

    def full(self, *args):
        added.append(1)
        if len(added) > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return add(self, *args)

    monkeypatch.setattr(pack_module.shards.ShardWriter, "add", full)
    with pytest.raises(StorageError, match=r"^writing a shard in .*: No space left on device \(set TMPDIR to a larger "
                                           r"folder\); pack stopped midway: .* has no classes.txt"):
        pack(str(tmp_path / "a"), str(tmp_path / "tmpdir-full"), shard_size=2_000)


@given(st.dictionaries(st.from_regex(r"train/shard-[0-9]{6}\.tar", fullmatch=True), st.integers(1, 300),
                       min_size=1, max_size=12), st.integers(1, 5))
def test_streaming_shares_are_whole_shards_balanced_by_their_images(images, workers):
    """Every shard goes to exactly one worker, and the workers' images differ by at most the largest shard (every
    n-th shard to a worker had given one 7 images and another 233 of two shards 7, 233 and a third)."""
    shares = readers.balanced(images, workers)
    assert sorted(rel for share in shares for rel in share) == sorted(images) and len(shares) == workers
    held = [sum(images[r] for r in share) for share in shares]
    assert max(held) - min(held) <= max(images.values())
    assert shares == readers.balanced(dict(reversed(images.items())), workers)  # the same on every worker
    if workers == 2 and len(images) == 3:  # the largest shard alone, the two others together
        single, pair = sorted(shares, key=len)
        assert len(pair) == 2 and images[single[0]] == max(images.values())


def test_the_listing_of_shards_without_an_index_does_not_count_zero_images(tmp_path):
    nine = [m for n in range(9) for m in ((f"a{n}.png", b"%d" % n), (f"a{n}.cls", b"%d" % (n % 2)))]
    bare = sources.open_source(config(shard_dataset(tmp_path / "d", {"train": [nine]})))
    assert pipeline.listed_counts(bare) == "known once the shards are read (staging)"  # it logged 0 of each class
    write_sample_dataset(tmp_path / "f", classes=2, per_class=3, size=8, seed=0, test_per_class=0)
    pack(str(tmp_path / "f"), str(tmp_path / "s"), shard_size=100_000)
    for uri in ("f", "s"):
        assert pipeline.listed_counts(sources.open_source(config(tmp_path / uri))) == \
            {"train": {"circle": 3, "square": 3}}


def test_validate_warns_of_a_run_that_will_measure_nothing(tmp_path):
    # validate said only "ok"; the run then exported scores on its own training images (its card now says so).
    from conftest import run_cli, write_config

    write_sample_dataset(tmp_path / "d", classes=2, per_class=4, size=8, seed=0, test_per_class=0)
    said = {}
    for split in (0, 0.25):
        cfg = write_config(tmp_path / f"c{split}.yaml", data={"uri": str(tmp_path / "d"), "validation_split": split},
                           output={"uri": str(tmp_path / "o")}, model={"weights": "none"})
        result = run_cli("validate", "--config", str(cfg), timeout=60)
        assert result.returncode == 0, result.stderr
        said[split] = "warning: no validation or test images" in result.stderr
    assert said == {0: True, 0.25: False}


def test_a_batch_larger_than_the_training_images_is_warned_of(tmp_path):
    # 48 images at batch 64 trained one step of 64 an epoch, 16 of them twice, without a word.
    write_sample_dataset(tmp_path / "d", classes=2, per_class=3, size=8, seed=0, test_per_class=0)
    listed = sources.open_source(config(tmp_path / "d")).layout
    cfg = config(tmp_path / "d")
    said = {b: pipeline.batch_over_images(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"batch_size": b})}), listed) for b in (5, 6, 7)}
    assert said[5] == said[6] == "" and said[7].startswith("train.batch_size 7 is more than the 6 training images")


def test_streaming_workers_read_shares_balanced_by_images(tmp_path):
    # Every other shard to a worker: shards of 6, 1 and 5 images gave one worker 11 images and the other 1.
    def samples(prefix, n):
        return [m for i in range(n) for m in ((f"{prefix}{i}.png", b"%s%d" % (prefix.encode(), i)),
                                              (f"{prefix}{i}.cls", b"%d" % (i % 2)))]

    root = shard_dataset(tmp_path / "d", {"train": [samples("a", 6), samples("b", 1), samples("c", 5)]})
    reader = stage(root, "stream", tmp_path).settle(0, 0)
    shares = [reader.items("train", (w, 2))[0] for w in range(2)]
    assert [len(s) for s in shares] == [6, 6] and sorted(shares[0] + shares[1]) == sorted(reader.items("train")[0])


def test_an_image_rewritten_at_its_size_changes_what_identifies_the_split(tmp_path):
    # The feature cache's key had paths and sizes only: after a resume, new images at the same keys and sizes (staged
    # again from storage) trained the head on the old images' features.
    write_sample_dataset(tmp_path / "d", classes=2, per_class=3, size=8, seed=0, test_per_class=0)
    before = stage(tmp_path / "d", "copy", tmp_path).settle(0, 0).identity("train")
    image = sorted((tmp_path / "d" / "train").rglob("*.png"))[0]
    image.write_bytes(bytes(reversed(image.read_bytes())))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    after = stage(tmp_path / "d", "copy", tmp_path).settle(0, 0).identity("train")
    assert len(after) == len(before) == 6 and after != before
    assert [row for row in after if row[0] != str(image)] == [row for row in before if row[0] != str(image)]


def test_resumed_from_says_where_an_attempt_took_over():
    # It gave the phase's epoch budget after early stopping (the state's epoch jumps to it), dropped the steps of a
    # part-finished epoch, and {"phase": "trained", "epochs_done": 0} for an attempt that only exported.
    from job.runstate import RunState

    assert pipeline._resumed_from(RunState()) == {}
    stopped = RunState(phase="finetune", epoch=10, step=0, history={"head": [{}] * 4, "finetune": [{}] * 3})
    assert pipeline._resumed_from(stopped) == {"phase": "finetune", "epochs_done": 3, "steps_done": 0}
    midway = RunState(phase="head", epoch=1, step=5, history={"head": [{}], "finetune": []})
    assert pipeline._resumed_from(midway) == {"phase": "head", "epochs_done": 1, "steps_done": 5}
    assert pipeline._resumed_from(RunState(phase="trained", history={"head": [{}]})) == {"phase": "trained"}


def test_a_resume_whose_splits_differ_from_its_checkpoints_warns():
    # A job upgraded mid-run carved an empty validation/ (or judged a WebP named .jpg bad) where the checkpoint's
    # attempt had not: images it trained on became validation images, without a word (same config, same listing).
    from job.layout import Layout
    from job.runstate import RunState

    def run(files: dict, kept: str) -> SimpleNamespace:
        state = RunState(phase="finetune", epoch=2, best=[0.3, 0.9], best_epoch=1, patience_used=1, splits=kept)
        return SimpleNamespace(data=SimpleNamespace(layout=Layout(["a", "b"], files)), state=state,
                               cfg=config("/d"), resumed_from={"phase": "finetune"},
                               parts=SimpleNamespace(from_scratch=False))

    first = run({"train": {"a": ["1", "2"], "b": ["3", "4"]}, "validation": {"a": ["5"], "b": ["6"]}}, "")
    with structlog.testing.capture_logs() as logged:
        pipeline._check_splits(first)
    assert first.state.splits and not logged
    same = run({"train": {"a": ["1", "2"], "b": ["3", "4"]}, "validation": {"a": ["5"], "b": ["6"]}},
               first.state.splits)
    moved = run({"train": {"a": ["1", "5"], "b": ["3", "4"]}, "validation": {"a": ["2"], "b": ["6"]}},
                first.state.splits)  # the same counts, one image moved
    with structlog.testing.capture_logs() as logged:
        pipeline._check_splits(same)
        pipeline._check_splits(moved)
    assert [r["log_level"] for r in logged] == ["warning"] and "checkpoint was trained with" in logged[0]["event"]
    assert moved.state.splits != first.state.splits == same.state.splits
    # The best epoch was judged on the old validation images: kept, it won over every later epoch and was exported,
    # while the card described the new dataset. Early stopping starts over, and manifest and card say so.
    assert (moved.state.best, moved.state.best_epoch, moved.state.patience_used) == (None, 0, 0)
    assert moved.resumed_from == {"phase": "finetune", "splits_changed": True}
    assert (same.state.best, same.state.best_epoch, same.resumed_from) == ([0.3, 0.9], 1, {"phase": "finetune"})
    # A phase with no epoch left keeps its best (it is restored at its end): the head early-stopped, then the pod
    # died before the fine-tuning began.
    done = run({"train": {"a": ["1", "5"], "b": ["3", "4"]}, "validation": {"a": ["2"], "b": ["6"]}},
               first.state.splits)
    done.state.phase, done.state.epoch = "head", done.cfg.train.head.epochs
    with structlog.testing.capture_logs():
        pipeline._check_splits(done)
    assert (done.state.best_epoch, done.resumed_from["splits_changed"]) == (1, True)
    # A shard member's key kept its extension's case from this version on: an earlier version's digest still fits.
    shard = {"train": {"a": ["s.tar:x/1.JPG"], "b": ["s.tar:y/2.png"]}}
    old = run(shard, pipeline._splits_digest(Layout(["a", "b"], {"train": {"a": ["s.tar:x/1.jpg"],
                                                                          "b": ["s.tar:y/2.png"]}})))
    with structlog.testing.capture_logs() as logged:
        pipeline._check_splits(old)
    assert not logged and old.state.best_epoch == 1


def test_a_failing_run_reports_its_own_error_not_the_event_files_upload():
    # Storage gone away while staging: the run's error was replaced by the TensorBoard event file's upload failing in
    # the `finally`, and the staging download that failed appeared nowhere.
    class Board:
        def close(self):
            raise StorageError("uploading s3://b/runs/r1/tensorboard/events.out.tfevents.1: storage unreachable")

    with structlog.testing.capture_logs() as logged:
        pipeline._close_board(Board(), failing=True)
    assert [r["event"] for r in logged] == ["tensorboard event files not copied to storage"]
    with pytest.raises(StorageError, match="tensorboard/events"):  # a run that succeeded: the upload's own failure
        pipeline._close_board(Board(), failing=False)


def test_the_refits_auto_class_weights_count_the_images_it_trains_on():
    # The refit trains on train + validation, with the weights of the training split: a validation split of 2 and 40
    # images trained at weights 1 and 1, so `auto`'s "every class the same total weight" did not hold for the export.
    from job.layout import Layout, MultiLayout

    listed = Layout(["a", "b"], {"train": {"a": ["1"] * 10, "b": ["2"] * 10},
                                 "validation": {"a": ["3"] * 2, "b": ["4"] * 40}})
    cfg = config("/d")
    assert pipeline.class_weights(cfg, listed) == [1.0, 1.0]
    assert pipeline.class_weights(cfg, listed, "train+validation") == [62 / (2 * 12), 62 / (2 * 50)]
    multi = MultiLayout(["x", "y"], {"train": {"1": (0,), "2": (1,)}, "validation": {"3": (0,), "4": (0,)}})
    assert pipeline.class_weights(cfg.model_copy(update={"task": "multi_label"}), multi, "train+validation") == \
        pipeline.class_weights(cfg, MultiLayout(["x", "y"], {"train": {**multi.sets["train"],
                                                                       **multi.sets["validation"]}}))


def test_a_complete_runs_damaged_metrics_for_metrics_file_is_a_storage_error(tmp_path):
    # A complete run asked again with metrics.file (Katib's) read its metrics.json: damaged, exit 1 with a traceback.
    from job.config import to_yaml

    write_sample_dataset(tmp_path / "d", classes=2, per_class=2, size=8, seed=0, test_per_class=0)
    cfg = Config.model_validate({"data": {"uri": str(tmp_path / "d")}, "output": {"uri": str(tmp_path / "out")},
                                 "model": {"weights": "none"}, "run_id": "r1",
                                 "metrics": {"file": str(tmp_path / "katib" / "metrics.log")}})
    run = tmp_path / "out" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "metrics.json").write_text('{"test": {"accuracy": 0.9')  # cut short
    (run / "_SUCCESS").write_text("")
    for damaged in ('{"test": {"accuracy": 0.9', "null", '{"test": 1}'):  # cut short, or of another shape
        (run / "metrics.json").write_text(damaged)
        with pytest.raises(StorageError, match=r"r1/metrics.json: the complete run's metrics are not JSON of its "):
            pipeline.prepare(cfg)


@given(st.lists(st.text("ab/.", min_size=1, max_size=4), unique=True, max_size=4),  # (shard paths have no colon)
       st.lists(st.text("xy:", max_size=3), max_size=5), st.lists(st.text("ab:x", max_size=5), max_size=4))
def test_each_shards_samples_are_found_in_one_pass_as_by_a_scan(rels, members, strays):
    # A scan of every key for each shard (58 s at 300,000 images in 790 shards, at every pass over the data) named
    # each shard's kept decoded rows; one pass must find the same keys, so that those files keep their names.
    from job import stream

    allowed = {f"{rel}:{m}" for rel in rels for m in members} | set(strays)
    assert stream.samples_of(rels, allowed) == {rel: sorted(k for k in allowed if k.startswith(rel + ":"))
                                                for rel in rels}


def test_a_streamed_split_for_the_formats_check_is_mapped_from_a_file_not_held_in_memory(tmp_path):
    # The export's check split (test, else validation) was gathered in memory: 6.8 GB more at the export for 30,000
    # test images at 224x224, where copy mode maps its image cache. Now written beside the kept shards and mapped,
    # the same pixels and labels, and no file left there.
    import numpy as np

    write_sample_dataset(tmp_path / "d", classes=3, per_class=6, size=8, seed=0, test_per_class=3)
    pack(str(tmp_path / "d"), str(tmp_path / "s"), shard_size=1_500)
    copied = stage(tmp_path / "s", "copy", tmp_path).settle(0.25, seed=3)
    streamed = stage(tmp_path / "s", "stream", tmp_path).settle(0.25, seed=3)
    before = sorted(streamed.keep.iterdir())
    mapped, labels = streamed.pixels("test")
    assert isinstance(mapped, np.memmap) and len(mapped) == copied.count("test") == 9
    order = np.lexsort(mapped.reshape(len(mapped), -1).T)  # (streamed in shard order; copy mode in class order)
    rows, copied_labels = copied.pixels("test")
    copy_order = np.lexsort(np.asarray(rows).reshape(len(rows), -1).T)
    assert np.array_equal(mapped[order], np.asarray(rows)[copy_order])
    assert np.array_equal(labels[order], np.asarray(copied_labels)[copy_order])
    assert sorted(streamed.keep.iterdir()) == before
