"""One writer per run (job/lease.py) against the real S3 server on 127.0.0.1: a second holder is refused
naming the first, a lease that is not renewed is taken over, a holder whose lease was taken notices,
and storage that ignores conditional writes gets a warning instead of a lease."""

from __future__ import annotations

import json
import time

import pytest
import structlog.testing
from fault_proxy import FaultProxy

from job import metrics, storage
from job.errors import LeaseHeld, StorageError
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
        assert "held by " + first.holder in message and " s ago)" in message and "\n" not in message
        assert isinstance(e.value, LeaseHeld)  # the CLI then reports nothing to the live run's Pushgateway group
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
    with structlog.testing.capture_logs() as logged:
        successor.acquire()
    try:
        assert 2 <= time.monotonic() - t0 < 12
        # said at once, then the takeover (a rerun after storage went away waited 3 minutes without a word)
        assert [r["event"].split(":")[0] for r in logged] == ["waiting on the lease of another attempt of this run",
                                                              "took over a stale lease", "lease taken"]
        assert logged[0]["stale_after_seconds"] == 3
        assert json.loads(store.read(NAME))["holder"] == successor.holder
        assert dead.store.replace(NAME, dead._body(), dead.etag) is None  # its ETag is stale now
    finally:
        successor.release()


def test_a_stop_asked_for_while_waiting_on_a_stale_lease_stops_at_once(store):
    # The wait slept on through SIGTERM, took the lease over, began to resume and only then stopped ("during
    # staging"); at the default 180 s it outlasted the pod's grace period: SIGKILL, exit 137.
    import threading

    from job import signals
    from job.errors import Preempted

    dead = Lease(store, "r1", seconds=30)
    dead.acquire()
    dead._stop.set()  # killed with -9: it goes stale only after 30 s
    dead._thread.join()
    signals._requested.clear()  # (the handlers are not installed here: the flag is all the job reads)
    threading.Timer(1.0, signals._requested.set).start()  # what the handler does when SIGTERM arrives a second in
    try:  # (no clock read: without the stop it took the lease over after 30 s, and raised nothing)
        with pytest.raises(Preempted, match="^stopped by SIGTERM while waiting on another attempt's lease"):
            Lease(store, "r1", seconds=30).acquire()
        assert json.loads(store.read(NAME))["holder"] == dead.holder  # not taken
    finally:
        signals._requested.clear()


def test_a_newcomer_with_a_shorter_lease_waits_by_the_holders(store):
    # checkpoint.lease_seconds may change between attempts: a newcomer with 1 s judged a live holder's 18 s lease
    # (renewed every 3 s) stale after a second, took it over and resumed from its checkpoint; the holder then exited 4.
    holder = Lease(store, "r1", seconds=18)
    holder.acquire()
    try:
        assert json.loads(store.read(NAME))["seconds"] == 18
        time.sleep(2.2)  # older than the newcomer's 1 s by the storage's whole-second clock, younger than 3 s
        newcomer = Lease(store, "r1", seconds=1)
        newcomer.holder = "other-pod/pid-1"
        with pytest.raises(LeaseHeld, match="held by " + holder.holder):
            newcomer.acquire()
        holder.check()  # still its own
    finally:
        holder.release()


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


# ------------------------------------------------------------ a write that lands but whose reply is lost


class LostReplies:
    """A store whose conditional writes land but whose replies are lost, as botocore sees a PUT whose 200
    never arrived: it sends the same request again, and that retry is refused (412: the ETag has changed)."""

    def __init__(self, store, *, put_new: int = 0, replace: int = 0):
        self.store = store
        self.to_lose = {"put_new": put_new, "replace": replace}  # how many replies of each to lose
        self.lost = {"put_new": 0, "replace": 0}
        self.calls = {"put_new": 0, "replace": 0}

    def __getattr__(self, name):
        return getattr(self.store, name)

    def _call(self, op: str, *args):
        self.calls[op] += 1
        real = getattr(self.store, op)
        if self.lost[op] >= self.to_lose[op]:
            return real(*args)
        self.lost[op] += 1
        real(*args)  # applied on the server; its reply never comes back
        return real(*args)  # the retry: the same request, same condition

    def put_new(self, rel, data):
        return self._call("put_new", rel, data)

    def replace(self, rel, data, etag):
        return self._call("replace", rel, data, etag)


def _wait(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_a_renewal_whose_reply_is_lost_keeps_the_lease(store):
    holder = Lease(store, "r1", seconds=3)  # renewed every 0.5 s
    holder.acquire()
    try:
        lossy = LostReplies(store, replace=3)
        holder.store = lossy
        assert _wait(lambda: lossy.calls["replace"] >= 4)  # three lost replies, then a normal renewal
        holder._stop.set()  # no renewal in flight while the ETags are compared
        holder._thread.join(timeout=30)
        holder.check()  # not "another run took over": every renewal landed
        assert holder.lost is None and holder.etag == store.stat(NAME)[0]
        assert json.loads(store.read(NAME))["holder"] == holder.holder
    finally:
        holder.release()
    assert store.stat(NAME) is None  # still ours at the end, so released


def test_a_create_whose_reply_is_lost_takes_the_lease(store, capsys):
    lossy = LostReplies(store, put_new=1)
    lease = Lease(lossy, "r1", seconds=3)
    lease.acquire()
    try:
        assert lease.etag == store.stat(NAME)[0] and not lease.unsupported
        assert lossy.calls["replace"] == 0  # taken at once: not waited on as a stale lease of someone else's
        assert "took over a stale lease" not in capsys.readouterr().out
        lease.check()
    finally:
        lease.release()
    assert store.stat(NAME) is None


def test_a_takeover_whose_reply_is_lost_takes_the_lease(store):
    dead = Lease(store, "r1", seconds=3)
    dead.acquire()
    dead._stop.set()  # killed with -9
    dead._thread.join()
    lossy = LostReplies(store, replace=1)
    successor = Lease(lossy, "r1", seconds=3)
    successor.acquire()  # before the fix: "held by" itself, exit 4
    try:
        assert lossy.lost["replace"] == 1 and successor.etag == store.stat(NAME)[0]
        assert json.loads(store.read(NAME))["holder"] == successor.holder
    finally:
        successor.release()
    assert store.stat(NAME) is None


def test_a_lease_taken_by_another_is_lost_even_with_lost_replies(store):
    """Read back after a refused write, the lease is ours only if it holds the bytes this run sent: a
    restarted container of the same pod has the same holder name, and still does not own it."""
    holder = Lease(store, "r1", seconds=3)
    holder.acquire()
    holder.store = LostReplies(store, replace=100)
    try:
        same_name = json.loads(store.read(NAME)) | {"renewed": time.time() + 1}
        store.client.put_object(Bucket=store.bucket, Key=store._key(NAME), Body=json.dumps(same_name).encode())
        assert _wait(lambda: holder.lost is not None)
        with pytest.raises(StorageError, match="another run took over"):
            holder.check()
    finally:
        holder.release()
    assert json.loads(store.read(NAME)) == same_name  # not deleted: it is not ours


def test_a_live_lease_refuses_a_second_holder_whose_replies_are_lost(store):
    first = Lease(store, "r1", seconds=6)
    first.acquire()
    try:
        second = Lease(LostReplies(store, put_new=5, replace=5), "r1", seconds=6)
        second.holder = "other-pod/pid-1"
        with pytest.raises(StorageError, match="held by " + first.holder):
            second.acquire()
        first.check()
    finally:
        first.release()


# ------------------------------------------------------------ what finetune_job_s3_errors_total counts


def test_refused_conditional_writes_and_absences_are_not_s3_errors(store, s3):
    """A clean run's lease (whose second create-if-absent is refused by design, 412), a lost race for it,
    and objects that are not there yet are answers, not failed requests: the counter an alert watches stays
    where it was. A request that really fails (the connection reset by the fault proxy) is counted."""
    before = metrics.s3_errors_total()
    first = Lease(store, "r1", seconds=30)
    first.acquire()  # includes the probe: a second If-None-Match: * create, refused with 412
    assert store.put_new(NAME, b"x") is None and store.replace(NAME, b"x", "not-the-etag") is None
    first.release()
    assert store.stat("_SUCCESS") is None and not store.exists("_SUCCESS")
    assert metrics.s3_errors_total() == before
    with FaultProxy(s3.endpoint, share=1.0, max_faults_per_request=1) as proxy:
        proxied = storage.S3Store(store.uri, proxy.url)
        proxied.stat("_SUCCESS")  # fails once (a 5xx or a reset), then retried by botocore and answered
    assert metrics.s3_errors_total() == before + 1


def test_the_last_look_at_a_stale_lease_takes_it_over_though_it_came_back_late(tmp_path, monkeypatch):
    # With slow storage the newcomer's last look came back past its deadline, showing the lease stale (a dead holder),
    # and it exited 4 "being written by another run" without acting on it.
    from types import SimpleNamespace

    from job import lease as lease_module

    store = storage.LocalStore(str(tmp_path))
    dead = Lease(store, "r1", seconds=3)
    dead.holder = "dead-pod/pid-1"
    assert store.put_new(NAME, dead._body()) is not None
    clock = [0.0]
    looks = []
    real_stat = store.stat

    def slow_stat(rel):  # each look takes the whole wait; the lease ages as the time passes
        found = real_stat(rel)
        clock[0] += 10.0
        looks.append(clock[0])
        return None if found is None else (found[0], clock[0] if len(looks) > 2 else 0.0)  # (the 1st: `_landed`)

    monkeypatch.setattr(store, "stat", slow_stat)
    monkeypatch.setattr(lease_module, "time", SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    monkeypatch.setattr(lease_module.signals, "pause", lambda seconds, why: None)
    successor = Lease(store, "r1", seconds=3)
    successor.acquire()  # the look that came back at 30 s (deadline 28.5 s) shows it 30 s old: taken over
    successor._stop.set()
    assert json.loads(store.read(NAME))["holder"] == successor.holder and looks[:3] == [10.0, 20.0, 30.0]


def test_a_local_leases_age_is_by_the_file_systems_clock_not_this_machines(tmp_path, monkeypatch):
    # On a shared volume a pod whose clock ran 10 minutes ahead of the file server's took a live holder's lease at
    # once; one 10 minutes behind waited out a dead holder's for 10 minutes more ("-548 s old").
    import os
    from types import SimpleNamespace

    store = storage.LocalStore(str(tmp_path))
    store.put_new("fresh", b"x")
    store.put_new("old", b"x")
    now = time.time()
    os.utime(tmp_path / "old", (now - 100, now - 100))

    def clock(offset: float):  # this machine's clock, off by `offset` (the module's own time, not the process's)
        monkeypatch.setattr(storage, "time", SimpleNamespace(time=lambda: time.time() + offset,
                                                             monotonic=time.monotonic, sleep=time.sleep))

    for named in (False, True):  # a file with no name (O_TMPFILE), or a named one where there is none (NFS)
        if named:
            monkeypatch.delattr(os, "O_TMPFILE", raising=False)
        clock(600)  # ahead
        assert store.stat("fresh")[1] < 60
        clock(-600)  # behind
        assert 60 < store.stat("old")[1] < 300
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "old"]  # no probe left
    (tmp_path / f"{storage.CLOCK_PROBE}left-by-a-kill").write_bytes(b"0")
    assert sorted(e.rel for e in store.list()) == ["fresh", "old"]  # a probe a kill left is never listed
