"""Storage against a real S3 server on 127.0.0.1: listing with pagination, staging, re-use, failures."""

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import given

from job import metrics, storage
from job.errors import ConfigError, DataError, StorageError


def test_listing_paginates_past_1000_keys(s3):
    bucket = s3.bucket()
    keys = [f"d/train/c{i % 2}/{i:05d}.png" for i in range(1003)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.client.put_object(Bucket=bucket, Key=k, Body=b"x"), keys))
    entries = storage.open_store(f"s3://{bucket}/d", s3.endpoint).list()
    assert sorted(e.rel for e in entries) == sorted(k.removeprefix("d/") for k in keys)


def test_stage_downloads_once_and_refetches_changed_objects(s3, tmp_path):
    bucket = s3.bucket()
    for i in range(20):
        s3.client.put_object(Bucket=bucket, Key=f"ds/train/a/{i}.png", Body=f"image {i}".encode())
    store = storage.open_store(f"s3://{bucket}/ds", s3.endpoint)
    root, stats = storage.stage(store, store.list(), tmp_path)
    assert stats["downloaded"] == 20 and stats["reused"] == 0
    assert (root / "train/a/7.png").read_bytes() == b"image 7"

    _, again = storage.stage(store, store.list(), tmp_path)
    assert again["downloaded"] == 0 and again["reused"] == 20  # same size and ETag: nothing new

    s3.client.put_object(Bucket=bucket, Key="ds/train/a/7.png", Body=b"IMAGE 7")  # same size, new ETag
    _, changed = storage.stage(store, store.list(), tmp_path)
    assert changed["downloaded"] == 1
    assert (root / "train/a/7.png").read_bytes() == b"IMAGE 7"


def test_an_object_rewritten_after_the_listing_is_not_staged_as_the_listed_one(s3, tmp_path):
    # The object rewritten between the listing and its GET: staging kept the new bytes under the listed size and
    # ETag, and the run's dataset fingerprint described a version it never trained on. The reply is checked against
    # the listing (no If-Match sent: some stores mishandle it); a key holding "412" is no sign of anything.
    import structlog.testing

    bucket = s3.bucket()
    s3.client.put_object(Bucket=bucket, Key="ds/train/a/IMG_4120.png", Body=b"listed")
    s3.client.put_object(Bucket=bucket, Key="ds/train/a/big.tar", Body=b"s" * storage.RANGED_MIN)
    store = storage.open_store(f"s3://{bucket}/ds", s3.endpoint)
    listed = store.list()
    s3.client.put_object(Bucket=bucket, Key="ds/train/a/IMG_4120.png", Body=b"rewritten")
    s3.client.put_object(Bucket=bucket, Key="ds/train/a/big.tar", Body=b"t" * (storage.RANGED_MIN + 1))  # ranged
    for entry in listed:
        with pytest.raises(StorageError, match=rf"ds/{entry.rel}: rewritten after the dataset was listed \(\d+ bytes, "
                                               rf"listed {entry.size}\); run again"):
            storage.stage(store, [entry], tmp_path)
    new = (b"rewritten", b"t" * (storage.RANGED_MIN + 1))
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() in new]  # nothing of them staged
    root, stats = storage.stage(store, store.list(), tmp_path / "again")  # listed anew: staged
    assert (root / "train/a/IMG_4120.png").read_bytes() == b"rewritten" and stats["downloaded"] == 2
    # Rewritten at the same size: the ETag alone differs, which a store may do for its own reasons: a warning.
    listed = store.list()
    s3.client.put_object(Bucket=bucket, Key="ds/train/a/IMG_4120.png", Body=b"REWRITTEN")
    with structlog.testing.capture_logs() as logged:
        storage.stage(store, [e for e in listed if e.rel.endswith(".png")], tmp_path / "third")
    assert [r["event"].split(":")[0] for r in logged if r["log_level"] == "warning"] == [
        "an object's ETag on download is not its listing's"]


def test_a_shard_rewritten_after_its_check_fails_its_download(s3, tmp_path, monkeypatch):
    # The ranged download checked the version by a HEAD, then the transfer manager made a HEAD of its own and
    # fetched whatever it found: a rewrite at the listed size in between was staged as the listed version.
    bucket = s3.bucket()
    body = b"s" * (storage.RANGED_MIN + 1)
    s3.client.put_object(Bucket=bucket, Key="ds/train/a/big.tar", Body=body)
    store = storage.open_store(f"s3://{bucket}/ds", s3.endpoint)
    listed = store.list()
    checked = storage._same_version

    def check_then_rewrite(uri, reply, size, etag):
        checked(uri, reply, size, etag)
        s3.client.put_object(Bucket=bucket, Key="ds/train/a/big.tar", Body=b"t" * len(body))

    monkeypatch.setattr(storage, "_same_version", check_then_rewrite)
    with pytest.raises(StorageError, match=r"ds/train/a/big.tar: rewritten while it downloaded; run again"):
        storage.stage(store, listed, tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes().startswith(b"t")]
    monkeypatch.setattr(storage, "_same_version", checked)
    root, stats = storage.stage(store, store.list(), tmp_path / "again")
    assert (root / "train/a/big.tar").read_bytes() == b"t" * len(body) and stats["downloaded"] == 1


def test_a_stream_of_an_object_rewritten_since_its_listing_is_refused(s3):
    # Streamed shards are read every epoch, each read checked against the listing as a download is.
    bucket = s3.bucket()
    s3.client.put_object(Bucket=bucket, Key="d/shard-000000.tar", Body=b"listed")
    store = storage.S3Store(f"s3://{bucket}/d", s3.endpoint)
    [listed] = store.list()
    assert store.open_stream(listed.rel, listed).read() == b"listed"
    s3.client.put_object(Bucket=bucket, Key="d/shard-000000.tar", Body=b"rewritten")
    with pytest.raises(StorageError, match=r"d/shard-000000.tar: rewritten after the dataset was listed \(9 bytes"):
        store.open_stream(listed.rel, listed)
    assert store.open_stream(listed.rel).read() == b"rewritten"  # unchecked without a listing (predict, pack)


# A part of an S3 key may have 1,024 bytes; a local file name 255. A 300-byte file name failed the whole run with exit
# 4 ("File name too long") after `validate` had said ok.
LONG = {"ds/train/" + "\u00fc" * 130 + "/0.png": b"class name of 260 bytes",
        "ds/train/b/" + "x" * 300 + ".png": b"file name of 304 bytes",
        "ds/train/b/" + "\u00e9" * 100 + "y" * 60 + ".png": b"cut inside a two-byte letter",
        "ds/train/b/short.png": b"short",
        # Names that fit, with no room for the download's temporary name beside them: "File name too long", exit 4.
        "ds/train/b/" + "x" * 251 + ".png": b"file name of 255 bytes",
        "ds/train/b/" + "\u00e9" * 118 + ".png": b"file name of 240 bytes"}


def test_objects_named_too_long_for_a_local_file_system_are_staged_under_short_names(s3, tmp_path):
    bucket = s3.bucket()
    for key, body in LONG.items():
        s3.client.put_object(Bucket=bucket, Key=key, Body=body)
    store = storage.open_store(f"s3://{bucket}/ds", s3.endpoint)
    root, stats = storage.stage(store, store.list(), tmp_path)
    assert stats["downloaded"] == len(LONG)
    for key, body in LONG.items():
        local = storage.staged(root, key.removeprefix("ds/"))
        assert local.read_bytes() == body and local.suffix == ".png", key
        assert all(len(part.encode()) <= 255 for part in local.relative_to(root).parts), key
    assert storage.staged(root, "train/b/short.png") == root / "train/b/short.png"  # a name that fits is kept
    assert storage.stage(store, store.list(), tmp_path)[1]["reused"] == len(LONG)


PARTS = st.one_of(st.sampled_from(["", ".", "..", "a", "x" * 255, "x" * 256]),
                  st.text(st.characters(exclude_characters="/", exclude_categories=["Cs"]), min_size=1, max_size=300))


@given(st.lists(st.lists(PARTS, min_size=1, max_size=3), min_size=2, max_size=2))
def test_staged_names_fit_a_file_system_and_stay_distinct(rels):
    one, two = ("/".join(parts) for parts in rels)
    here = storage.Path("/cache")
    for rel in (one, two):
        parts = storage.staged(here, rel).relative_to(here).parts
        if not rel:  # the root itself (an S3 store without a prefix)
            assert parts == ()
            continue
        assert len(parts) == rel.count("/") + 1 and all(0 < len(p.encode()) <= 255 for p in parts)
        if all(0 < len(p.encode()) <= 255 and p not in (".", "..") for p in rel.split("/")):
            assert "/".join(parts) == rel
        assert ".." not in parts
    assert (storage.staged(here, one) == storage.staged(here, two)) == (one == two)


def test_local_folder_is_used_in_place(tmp_path):
    (tmp_path / "train/a").mkdir(parents=True)
    (tmp_path / "train/a/x.png").write_bytes(b"1")
    store = storage.open_store(str(tmp_path))
    assert [e.rel for e in store.list()] == ["train/a/x.png"]
    root, stats = storage.stage(store, store.list(), tmp_path / "cache")
    assert root == tmp_path and stats["downloaded"] == 0
    assert stats["read_in_place"] == 1 and stats["reused"] == 0  # "reused: 6000" of a folder nothing was copied from


def test_upload_read_exists_delete(s3, tmp_path):
    bucket = s3.bucket()
    store = storage.open_store(f"s3://{bucket}/runs/r1", s3.endpoint)
    f = tmp_path / "f.txt"
    f.write_text("hello")
    assert not store.exists("f.txt")
    store.upload(f, "sub/f.txt")
    assert store.exists("sub/f.txt") and store.read("sub/f.txt") == b"hello"
    store.delete_all()
    assert s3.keys(bucket) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_storage_is_a_storage_error(tmp_path):
    store = storage.open_store("s3://bucket/data", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="storage unreachable"):
        store.list()
    assert time.monotonic() - t0 < 60  # the contract's bound, not a performance assertion


def test_missing_bucket_and_bad_scheme(s3):
    with pytest.raises(StorageError, match="bucket does not exist"):
        storage.open_store("s3://no-such-bucket-here/x", s3.endpoint).list()
    with pytest.raises(ConfigError, match="^gs://bucket/x: gs:// is not storage the job reads"):  # exit 2, not 4
        storage.open_store("gs://bucket/x")


def test_a_stream_cut_mid_object_resumes_with_ranged_gets(s3, monkeypatch):
    """A shard whose reply is cut off halfway, twice (the ranged retry too): read to the end, byte for byte,
    each retry a ranged GET from where the last one stopped, each loss counted as an S3 error."""
    monkeypatch.setattr(storage, "_backoff", lambda attempt, scale=1.0: None)  # (its jitter: seconds of nothing)
    import random

    from fault_proxy import FaultProxy

    bucket = s3.bucket()
    data = random.Random(0).randbytes(3 << 20)
    s3.client.put_object(Bucket=bucket, Key="d/train/shard-000000.tar", Body=data)
    before = metrics.s3_errors_total()
    with FaultProxy(s3.endpoint, share=0.0, cut_bodies=2) as proxy:
        body = storage.S3Store(f"s3://{bucket}/d", proxy.url).open_stream("train/shard-000000.tar")
        got = b"".join(iter(lambda: body.read(1 << 16), b""))
        body.close()
    assert got == data
    ranges = [r for path, r in proxy.gets if "shard-000000" in path]
    assert proxy.counts["cut"] == 2 and len(ranges) == 3 and ranges[0] is None
    starts = [int(r.removeprefix("bytes=").removesuffix("-")) for r in ranges[1:]]
    assert 0 < starts[0] <= len(data) // 2 and starts[0] < starts[1] <= starts[0] + (len(data) - starts[0]) // 2
    assert metrics.s3_errors_total() == before + 2


def test_a_stream_cut_too_often_fails_in_one_line(s3, monkeypatch):
    monkeypatch.setattr(storage, "_backoff", lambda attempt, scale=1.0: None)  # (its jitter: seconds of nothing)
    from fault_proxy import FaultProxy

    bucket = s3.bucket()
    s3.client.put_object(Bucket=bucket, Key="d/shard-000000.tar", Body=bytes(1 << 20))
    with FaultProxy(s3.endpoint, share=0.0, cut_bodies=100, cut_from=1) as proxy:
        body = storage.S3Store(f"s3://{bucket}/d", proxy.url).open_stream("shard-000000.tar")
        with pytest.raises(StorageError) as e:
            while body.read(1 << 16):
                pass
    message = str(e.value)
    assert f"connection lost {storage.STREAM_ATTEMPTS} times" in message and "shard-000000.tar" in message
    assert "\n" not in message and proxy.counts["cut"] == storage.STREAM_ATTEMPTS


def test_a_local_listing_follows_linked_folders_but_not_loops_and_lists_broken_links(tmp_path):
    elsewhere = tmp_path / "cats"
    elsewhere.mkdir()
    (elsewhere / "1.png").write_bytes(b"PNG")
    data = tmp_path / "data"
    (data / "train/dog").mkdir(parents=True)
    (data / "train/dog/1.png").write_bytes(b"PNG!")
    (data / "train/cat").symlink_to(elsewhere)  # a class folder kept elsewhere: was not listed, the class was lost
    (data / "train/dog/loop").symlink_to(data)  # back to the dataset: would list it forever
    (data / "train/dog/gone.png").symlink_to(tmp_path / "nowhere.png")  # broken: the listing failed, exit 4
    entries = {e.rel: e.size for e in storage.open_store(str(data)).list()}
    assert entries == {"train/cat/1.png": 3, "train/dog/1.png": 4, "train/dog/gone.png": 0}


def test_a_broken_link_to_a_class_folder_is_refused_not_dropped(tmp_path):

    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "train" / c / "1.png").write_bytes(b"PNG")
    (tmp_path / "train/c").symlink_to("/mnt/not-mounted/c")  # the class would vanish without a word
    with pytest.raises(DataError, match=r"train/c: a broken link \(to /mnt/not-mounted/c\); is a volume not mounted"):
        storage.open_store(str(tmp_path)).list()


@given(st.text(st.sampled_from("ab#?%+ &=/"), min_size=1, max_size=12).filter(lambda k: k.strip("/")))
def test_an_s3_uri_keeps_every_character_of_its_key(key):
    """`#` and `?` are characters of S3 keys: a URL parser dropped them as a fragment or a query, so
    `s3://b/my#data` read `s3://b/my` and a run's artifacts went beside it, without a word."""
    assert storage.S3Store(f"s3://bucket/{key}", "http://127.0.0.1:9").prefix == key.strip("/")


def test_objects_under_a_prefix_with_a_hash_are_the_ones_read(s3, tmp_path):
    bucket = s3.bucket()
    for key in ("my#data/train/cat/0.png", "my/train/old/0.png", "q?v=1/a.png"):
        s3.client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    assert [e.rel for e in storage.open_store(f"s3://{bucket}/my#data", s3.endpoint).list()] == ["train/cat/0.png"]
    assert storage.open_store(f"s3://{bucket}/q?v=1", s3.endpoint).read("a.png") == b"q?v=1/a.png"
    out = storage.open_store(f"s3://{bucket}/models#v2/r1", s3.endpoint)
    (tmp_path / "f").write_text("x")
    out.upload(tmp_path / "f", "_SUCCESS")
    assert "models#v2/r1/_SUCCESS" in s3.keys(bucket)


def test_an_endpoint_without_a_scheme_is_a_config_error(monkeypatch):
    # boto3's ValueError("Invalid endpoint") left as exit 1, "unexpected error".
    from job.errors import ConfigError

    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:5599")
    with pytest.raises(ConfigError, match="S3 endpoint '127.0.0.1:5599' .*write it as a URL, http://host:port"):
        storage.client("")


def test_an_image_that_is_also_a_folder_is_refused_at_listing(s3):
    # S3 holds `cat/x.png` and `cat/x.png/y.png`; no local copy can: it validated, then its run failed with exit 4.
    from job import sources
    from job.config import Config

    bucket = s3.bucket()
    for key in ("d/train/cat/x.png", "d/train/cat/x.png/y.png", "d/train/dog/z.png"):
        s3.client.put_object(Bucket=bucket, Key=key, Body=b"P")
    cfg = Config.model_validate({"data": {"uri": f"s3://{bucket}/d"}, "output": {"uri": "/tmp/unused"},
                                 "model": {"weights": "none"}, "s3": {"endpoint_url": s3.endpoint}})
    with pytest.raises(DataError, match=f"^s3://{bucket}/d/train/cat/x.png: an image, and also the folder of "
                                        f"s3://{bucket}/d/train/cat/x.png/y.png"):
        sources.open_source(cfg)


@given(st.lists(st.lists(st.sampled_from("ab"), min_size=1, max_size=3).map("/".join), max_size=6))
def test_file_and_folder_finds_a_key_that_is_another_keys_folder(keys):
    from job import layout

    found = layout.file_and_folder(keys)
    clash = any(k != o and o.startswith(k + "/") for k in keys for o in keys)
    assert (found is not None) == clash
    if found:
        assert found[0] in keys and found[1] in keys and found[1].startswith(found[0] + "/")


def test_a_stop_during_staging_keeps_every_file_it_fetched(s3, tmp_path, monkeypatch):
    # SIGTERM while staging: the index held only the files the loop had seen done (1 of 60 on disk), so the rerun
    # downloaded the others again ("nothing is downloaded twice", the README said).
    from concurrent.futures import wait

    bucket = s3.bucket()
    for i in range(40):
        s3.client.put_object(Bucket=bucket, Key=f"d/train/c/{i}.png", Body=bytes([i]) * 50_000)
    store = storage.open_store(f"s3://{bucket}/d", s3.endpoint)

    class Stop(Exception):
        pass

    def stop():
        raise Stop

    waited = []
    monkeypatch.setattr(storage, "wait_for", lambda fs, timeout: waited.append(list(fs)) or wait(fs, timeout=timeout))
    with pytest.raises(Stop):
        storage.stage(store, store.list(), tmp_path, stop=stop)
    # It waits for the GETs in flight, not for the cancelled ones too: wait() never counts a cancelled future done,
    # so every stop in staging spent STOP_WAIT_SECONDS (10 s) of the pod's grace period on nothing.
    (passed,) = waited
    assert not any(f.cancelled() for f in passed)
    root = storage.staged(tmp_path / bucket, "d")
    on_disk = [p for p in root.rglob("*.png")]
    again = storage.stage(store, store.list(), tmp_path)[1]
    assert len(on_disk) >= 1 and again["reused"] == len(on_disk) and again["downloaded"] == 40 - len(on_disk)


def test_keys_that_storage_refuses_to_delete_are_a_storage_error(s3, monkeypatch):
    # DeleteObjects answers 200 and lists each refused key under `Errors` (a policy without s3:DeleteObject): thrown
    # away, the lease stayed for each next attempt to wait out, `output.overwrite` deleted nothing and said it had,
    # and the conversion marker counted deaths that did not happen. The reply is AWS's documented shape; the test
    # server enforces no policy, so its client's answer is replaced for this one call.
    bucket = s3.bucket()
    store = storage.S3Store(f"s3://{bucket}/runs/r1", s3.endpoint)
    store.client.put_object(Bucket=bucket, Key="runs/r1/_LEASE", Body=b"{}")
    real = store.client.delete_objects

    def refusing(**kwargs):
        real(**kwargs)  # (it does delete here; storage that refuses would not)
        return {"Errors": [{"Key": "runs/r1/_LEASE", "Code": "AccessDenied", "Message": "Access Denied"}]}

    monkeypatch.setattr(store.client, "delete_objects", refusing)
    with pytest.raises(StorageError, match=rf"^deleting s3://{bucket}/runs/r1/_LEASE: access denied \(AccessDenied\) "
                                           r"\(1 of 1 keys not deleted\)$"):
        store.delete(["_LEASE"])
    monkeypatch.setattr(store.client, "delete_objects", real)
    store.delete(["_LEASE", "absent"])  # deleted, and a key that is not there: no error


def test_folders_a_local_delete_empties_go_with_it(tmp_path):
    # An overwrite with fewer formats left tf_serving/classifier/1/variables/ behind, empty: a TF Serving watching the
    # folder took it for a broken version 1. (On S3 a folder is gone with its last object.)
    store = storage.LocalStore(str(tmp_path / "run"))
    kept = ["saved_model/saved_model.pb", "tf_serving/other/1/x"]
    gone = ["tf_serving/classifier/1/variables/variables.index", "tf_serving/classifier/1/saved_model.pb",
            "model.tflite", "saved_model/variables/v"]
    for rel in kept + gone:
        (tmp_path / "run" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / rel).write_text("x")
    store.delete(gone)
    store.remove_emptied(gone)
    left = sorted(str(p.relative_to(tmp_path / "run")) for p in (tmp_path / "run").rglob("*"))
    assert left == ["saved_model", "saved_model/saved_model.pb", "tf_serving", "tf_serving/other", "tf_serving/other/1",
                    "tf_serving/other/1/x"]
    store.delete(kept)
    store.remove_emptied(kept)
    assert (tmp_path / "run").is_dir() and not any((tmp_path / "run").iterdir())  # the root stays


def test_a_local_create_that_fails_midway_leaves_no_file(tmp_path, monkeypatch):
    # A full disk left an empty _LEASE behind: the next attempt waited it out (3 minutes) as another attempt's.
    import errno
    import io

    store = storage.LocalStore(str(tmp_path / "run"))

    class Full(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fdopen", lambda fd, mode: Full(fd, "wb"))
    with pytest.raises(StorageError, match="No space left on device"):
        store.put_new("_LEASE", b'{"holder": "me"}')
    assert not (tmp_path / "run" / "_LEASE").exists()
    monkeypatch.undo()
    assert store.put_new("_LEASE", b"{}") is not None and (tmp_path / "run" / "_LEASE").read_bytes() == b"{}"


def test_a_missing_object_is_told_by_the_replys_code_not_by_its_text(s3):
    # "404" anywhere in an error's text (a bucket named so, an endpoint on port 4040) made any failure "no such object"
    # (exit 3 where nothing listened, exit 4), and a classes.txt beside a manifest was then skipped without a word.
    from job import sources

    bucket = s3.bucket()
    with pytest.raises(DataError, match="no such object"):
        sources._read(f"s3://{bucket}/data/m.csv", s3.endpoint)
    assert sources._read_optional(f"s3://{bucket}/data/classes.txt", s3.endpoint) is None
    with pytest.raises(StorageError, match="bucket does not exist") as missing_bucket:
        sources._read("s3://no-such-bucket-404/data/m.csv", s3.endpoint)
    with pytest.raises(StorageError, match="storage unreachable") as unreachable:
        sources._read_optional("s3://b404/data/classes.txt", f"http://127.0.0.1:{_closed_port()}")
    assert not isinstance(missing_bucket.value, DataError) and not isinstance(unreachable.value, DataError)


def test_a_home_folder_of_no_user_is_a_config_error_wherever_a_path_is_read(tmp_path):
    # pathlib's RuntimeError ("Could not determine home directory"): predict --model, tensorboard --from, pack --to
    # and --from were exit 1 with a traceback.
    from job.pack import pack

    for uri in ("~nosuchuser-here/runs", "file://~nosuchuser-here/runs"):
        with pytest.raises(ConfigError, match="~nosuchuser-here: no such user here, so no home folder to expand"):
            storage.open_store(uri)
    with pytest.raises(ConfigError, match="^--from ~nosuchuser-here/d: ~nosuchuser-here: no such user here"):
        pack("~nosuchuser-here/d", str(tmp_path / "out"), 1 << 20)
    assert storage.open_store("~/x").root == Path.home() / "x"


@pytest.mark.parametrize(("every", "seen_mid_way"), [(3600.0, 0), (0.0, 1)])
def test_the_staging_index_is_saved_by_time_not_every_so_many_files(s3, tmp_path, monkeypatch, every, seen_mid_way):
    # Saved whole every 500 files: 600 rewrites of a 22 MB index at 300,000 objects (minutes of CPU, gigabytes
    # written, growing with the square). Now at most every INDEX_SAVE_SECONDS, and when staging ends.
    bucket = s3.bucket()
    for i in range(6):
        s3.client.put_object(Bucket=bucket, Key=f"ds/train/a/{i}.png", Body=b"x")
    store = storage.open_store(f"s3://{bucket}/ds", s3.endpoint)
    monkeypatch.setattr(storage, "INDEX_SAVE_SECONDS", every)
    index = storage.staged(tmp_path / bucket, "ds") / storage.INDEX_NAME
    mid_way = []
    storage.stage(store, store.list(), tmp_path, stop=lambda: mid_way.append(index.is_file()))
    assert mid_way[0] == bool(seen_mid_way) and len(mid_way) == 6
    assert set(json.loads(index.read_text())) == {f"train/a/{i}.png" for i in range(6)}  # saved at the end
