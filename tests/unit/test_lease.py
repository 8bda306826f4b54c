"""One writer per run (job/lease.py) against the real S3 server on 127.0.0.1: a second holder is refused
naming the first, a lease that is not renewed is taken over, a holder whose lease was taken notices,
and storage that ignores conditional writes gets a warning instead of a lease."""

from __future__ import annotations

import json
import time

import pytest
from fault_proxy import FaultProxy

from job import storage
from job.errors import StorageError
from job.lease import NAME, Lease


@pytest.fixture
def store(s3):
    bucket = s3.bucket()
    return storage.S3Store(f"s3://{bucket}/runs/r1", s3.endpoint)


def test_a_live_lease_refuses_a_second_holder(store, s3):
    first = Lease(store, "r1", seconds=6)
    first.acquire()
    try:
        info = json.loads(store.read(NAME))
        assert info["holder"] == first.holder and info["run_id"] == "r1"
        second = Lease(store, "r1", seconds=6)
        second.holder = "other-pod/pid-1"
        t0 = time.monotonic()
        with pytest.raises(StorageError) as e:
            second.acquire()
        message = str(e.value)
        assert "held by " + first.holder in message and " s old" in message and "\n" not in message
        assert time.monotonic() - t0 < 6  # refused as soon as the first renewed it (every second)
        first.check()  # still ours
    finally:
        first.release()
    assert store.stat(NAME) is None  # released: the next attempt takes it at once
    third = Lease(store, "r1", seconds=6)
    third.acquire()
    third.release()


def test_a_lease_not_renewed_is_taken_over_and_its_old_holder_notices(store):
    dead = Lease(store, "r1", seconds=3)
    dead.acquire()
    dead._stop.set()  # a holder killed with -9: no more renewals, no release
    dead._thread.join()
    successor = Lease(store, "r1", seconds=3)
    t0 = time.monotonic()
    successor.acquire()
    try:
        assert 2 <= time.monotonic() - t0 < 12
        assert json.loads(store.read(NAME))["holder"] == successor.holder
        assert dead.store.replace(NAME, dead._body(), dead.etag) is None  # its ETag is stale now
    finally:
        successor.release()


def test_a_holder_whose_lease_was_taken_stops_writing(store):
    holder = Lease(store, "r1", seconds=3)
    holder.acquire()
    try:
        # Someone else overwrites it (as a takeover would); the next renewal finds a foreign ETag.
        store.client.put_object(Bucket=store.bucket, Key=store._key(NAME), Body=b'{"holder": "x"}')
        deadline = time.monotonic() + 10
        while not holder.lost and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(StorageError, match="another run took over"):
            holder.check()
    finally:
        holder.release()
    assert json.loads(store.read(NAME)) == {"holder": "x"}  # not deleted: it is not ours


def test_storage_that_ignores_conditional_writes_gets_a_warning(s3, capsys):
    bucket = s3.bucket()
    with FaultProxy(s3.endpoint, share=0.0, drop_headers=("If-None-Match", "If-Match")) as proxy:
        store = storage.S3Store(f"s3://{bucket}/runs/r1", proxy.url)
        lease = Lease(store, "r1", seconds=6)
        lease.acquire()
        assert lease.unsupported and lease.etag is None
        lease.release()
        assert store.stat(NAME) is None
    assert "does not honour conditional writes" in capsys.readouterr().out


def test_a_local_output_folder_has_a_lease_too(tmp_path):
    store = storage.LocalStore(str(tmp_path / "runs" / "r1"))
    first = Lease(store, "r1", seconds=6)
    first.acquire()
    with pytest.raises(StorageError, match="held by"):
        Lease(store, "r1", seconds=6).acquire()
    first.release()
    assert not (tmp_path / "runs" / "r1" / NAME).exists()
