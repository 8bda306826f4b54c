"""SIGTERM/SIGINT (preemption, eviction, node drain): ask the training loop to stop at the next step.

The handler only sets a flag; the loop saves a checkpoint at the next step boundary and raises
Preempted (exit 143). A second signal stops at once.
"""

from __future__ import annotations

import signal
import threading

from job import logs
from job.errors import Preempted

_requested = threading.Event()
_signal_name = ["SIGTERM"]


def _handler(signum, frame):
    # Only set the flag here: logging could deadlock on a lock the interrupted code holds.
    _signal_name[0] = signal.Signals(signum).name
    _requested.set()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def install() -> None:
    """Route SIGTERM and SIGINT to the flag (main thread only, as Python requires)."""
    _requested.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)


def take_back() -> None:
    """Route the signals to the flag again, keeping a stop already asked for: MultiWorkerMirroredStrategy installs
    TensorFlow's own SIGTERM handler in C, which `signal.getsignal` does not show, and the job's never ran again (a
    multi-worker run trained on to SIGKILL, exit 137, its work since the last checkpoint lost)."""
    if not _requested.is_set() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)


def requested() -> bool:
    return _requested.is_set()


def check(where: str) -> None:
    """Outside training steps there is nothing new to save: stop right here."""
    if _requested.is_set():
        raise stopped(f"during {where}")


def pause(seconds: float, where: str) -> None:
    """Sleep up to `seconds`, or raise Preempted as soon as a stop is asked for (a wait that slept on through SIGTERM
    was SIGKILLed at the end of the pod's grace period)."""
    if _requested.wait(seconds):
        raise stopped(where)


def stopped(where: str) -> Preempted:
    logs.get().warning("stop requested", signal=_signal_name[0], where=where)
    return Preempted(f"stopped by {_signal_name[0]} {where}; re-run the same run_id to resume")
