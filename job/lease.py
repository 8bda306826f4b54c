"""One writer per run: a lease object under the run's output prefix, taken with a conditional write.

Two Jobs started with the same run_id would otherwise write over each other's checkpoints and
artifacts. The chief takes `<output.uri>/<run_id>/_LEASE` with `If-None-Match: *` (AWS S3, MinIO and
the test server honour it), renews it every `checkpoint.lease_seconds / 6` with `If-Match` on its
own ETag, and deletes it when the run ends, whatever the reason (a SIGTERM-ed pod's successor takes
it at once).

A lease that exists is alive if it is renewed: the newcomer watches it, saying so. Renewed (within one renewal
interval for a live holder) -> another run holds it: exit 4 naming the holder and how long ago storage saw it
renewed. Not renewed for `checkpoint.lease_seconds` (by the storage server's clock; the newcomer waits up to that
long) -> its holder died without letting go (kill -9, a lost node, storage gone before it could delete it): the
newcomer takes it over with `If-Match`, so of two newcomers only one can.
Storage that ignores or rejects conditional writes gets a warning, and the run goes on without a lease.

A conditional write whose reply is lost is retried by botocore, and the retry is refused (412): the first
attempt changed the ETag. So a refused write is read back: if the lease holds the very bytes this run
sent since its last confirmed write, the write landed and the lease is still ours (its ETag is adopted).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable

from job import logs, signals
from job.errors import LeaseHeld, StorageError
from job.storage import ConditionalWritesUnsupported, Store

NAME = "_LEASE"
log = logs.get()


def held_by_another(store: Store, seconds: float) -> bool:
    """Whether a live attempt holds this run's lease (of `seconds`), for an attempt that never took it: one renewed
    within a renewal interval (seconds / 6, plus the rounding of storage's clock). A dead attempt's lease, older, is
    not (a lease left by an OOM-killed pod kept the next pods' failures from being pushed); False when storage
    cannot tell."""
    try:
        seen = store.stat(NAME)
        return seen is not None and seen[1] <= max(seconds, holders_seconds(store)) / 6 + 5
    except StorageError:
        return False


def holders_seconds(store: Store) -> float:
    """The `checkpoint.lease_seconds` the lease's holder renews it by (its body says; 0 when it does not): an attempt
    with a shorter one judged a live holder's lease stale and took it over."""
    try:
        value = json.loads(store.read(NAME)).get("seconds", 0)
        return float(value) if isinstance(value, (int, float)) and value > 0 else 0.0
    except (StorageError, ValueError, AttributeError):
        return 0.0


class Lease:
    def __init__(self, store: Store, run_id: str, seconds: float):
        self.store = store
        self.run_id = run_id
        self.seconds = seconds  # a lease not renewed for this long is taken over
        self.renew_every = seconds / 6
        self.holder = f"{socket.gethostname()}/pid-{os.getpid()}"
        self.acquired = time.time()
        self.etag: str | None = None  # ours while we hold it
        self.lost: str | None = None  # why we no longer hold it
        self.unsupported = False  # the storage ignores conditional writes: no lease, only a warning
        self._sent: list[bytes] = []  # bodies written since the last confirmed write (their replies may be lost)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "run_id": self.run_id, "acquired": self.acquired,
                           "renewed": time.time(), "seconds": self.seconds}).encode()

    def _write(self, conditional_write: Callable[[bytes], str | None]) -> str | None:
        """One conditional write of a fresh body: the lease's new ETag, or None if it is not ours."""
        body = self._body()
        self._sent.append(body)
        etag = conditional_write(body)
        if etag is None:
            etag = self._landed()
        if etag is not None:
            self._sent.clear()
        return etag

    def _landed(self) -> str | None:
        """After a refused write: the lease's ETag if it holds bytes this run sent (a lost reply), else None."""
        before = self.store.stat(NAME)
        if before is None or self.store.read(NAME) not in self._sent:
            return None
        after = self.store.stat(NAME)  # unchanged while it was read: the bytes belong to this ETag
        if after is None or after[0] != before[0]:
            return None
        log.info("lease write landed though its reply was lost; still ours", lease=f"{self.store.uri}/{NAME}")
        return after[0]

    # ------------------------------------------------------------ taking it

    def acquire(self) -> None:
        """Take the lease or raise StorageError (exit 4) naming the live holder."""
        try:
            self.etag = self._write(lambda body: self.store.put_new(NAME, body))
            # A second create-if-absent must fail; where it succeeds too, the storage ignores the condition.
            if self.etag is not None and self.store.put_new(NAME, self._body()) is not None:
                return self._unsupported()
        except ConditionalWritesUnsupported:
            return self._unsupported()
        if self.etag is not None:
            return self._start()
        self._wait_or_take_over()

    def _unsupported(self) -> None:
        self.etag, self.unsupported = None, True
        log.warning("storage does not honour conditional writes: two runs with this run_id would not be "
                    "detected", lease=f"{self.store.uri}/{NAME}")

    def _wait_or_take_over(self) -> None:
        """Someone's lease is there: watch it until it is renewed (a live holder) or goes stale."""
        seen = self.store.stat(NAME)
        stale = max(self.seconds, holders_seconds(self.store))  # the holder's own renewal interval, if longer
        # Ages come from whole-second timestamps (HTTP Date, S3 LastModified): allow for their rounding.
        deadline = time.monotonic() + stale + stale / 6 + 5
        if seen is not None:  # a rerun after storage went away waited 3 minutes here without a word
            log.info("waiting on the lease of another attempt of this run: a live one renews it (then exit 4), a "
                     "dead one's goes stale and is taken over", lease=f"{self.store.uri}/{NAME}",
                     seconds_since_renewed=round(seen[1]), stale_after_seconds=round(stale, 1),
                     at_most_seconds=round(deadline - time.monotonic()))
        while True:  # each look acted on, the last too (with slow storage it came back past the deadline, stale,
            # and a dead holder's lease was reported as another run's: exit 4)
            if seen is None:  # released meanwhile
                self.etag = self._write(lambda body: self.store.put_new(NAME, body))
            elif seen[1] > stale:
                self.etag = self._write(lambda body, old=seen[0]: self.store.replace(NAME, body, old))
                if self.etag is not None:
                    log.warning("took over a stale lease", lease=f"{self.store.uri}/{NAME}",
                                seconds_since_renewed=round(seen[1]))
            if self.etag is not None:
                return self._start()
            if time.monotonic() >= deadline:  # (looked at again: another newcomer may have just taken it)
                raise self._held_by_another(self.store.stat(NAME))
            signals.pause(min(2.0, self.renew_every / 2), "while waiting on another attempt's lease (nothing taken)")
            now = self.store.stat(NAME)
            if seen is not None and now is not None and now[0] != seen[0]:
                raise self._held_by_another(now)
            seen = now

    def _held_by_another(self, seen: tuple[str, float] | None) -> LeaseHeld:
        """The live holder named, with how long ago storage says it renewed the lease (by storage's clock: the age
        from its `acquired` by this machine's clock read "-548 s old" on a clock behind)."""
        try:
            holder = json.loads(self.store.read(NAME)).get("holder", "unknown")
        except (StorageError, ValueError, AttributeError):
            holder = "unknown"
        renewed = f"renewed {seen[1]:.0f} s ago" if seen is not None else "just renewed"
        return LeaseHeld(f"run {self.run_id} is being written by another run: its lease {self.store.uri}/{NAME} "
                            f"is held by {holder} ({renewed}); use another run_id, or stop that run")

    # ------------------------------------------------------------ holding it

    def _start(self) -> None:
        log.info("lease taken", lease=f"{self.store.uri}/{NAME}", holder=self.holder)
        self._thread = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                etag = self._write(lambda body: self.store.replace(NAME, body, self.etag))
            except StorageError as e:
                log.warning("lease renewal failed, will retry", reason=str(e))
                continue
            if etag is None:
                self.lost = "another run took over this run's lease (it was not renewed in time)"
                log.error("lease lost", reason=self.lost)
                return
            self.etag = etag

    def check(self) -> None:
        """Raise StorageError (exit 4) if the lease was lost: nothing more may be written."""
        if self.lost:
            raise StorageError(f"run {self.run_id}: {self.lost}; stopping before writing over it")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        if (self.etag is None or self.lost) and not self.unsupported:
            return
        try:
            current = self.store.stat(NAME)
            if current is not None and (self.unsupported or current[0] == self.etag):
                self.store.delete([NAME])
        except StorageError as e:
            log.warning("lease not released; it expires by itself", reason=str(e), seconds=self.seconds)
