"""Typed errors raised by the domain code; only the CLI turns them into exit codes."""

import threading


class JobError(Exception):
    """An expected failure with a one-line message and a documented exit code."""

    exit_code = 1


class ConfigError(JobError):
    """Invalid configuration or usage."""

    exit_code = 2


class DataError(JobError):
    """Missing or empty dataset layout, or too many undecodable images."""

    exit_code = 3


class StorageError(JobError):
    """Storage unreachable, access denied, or artifacts in the way."""

    exit_code = 4


class NotFound(StorageError):
    """The object or file read is not there (S3's NoSuchKey / 404). Told by the reply's code, not by its text: a
    message that quoted an endpoint on port 4040 was "no such object" (exit 3), where nothing listened (exit 4)."""


class LeaseHeld(StorageError):
    """Another attempt of the run holds its lease and renews it (exit 4). That attempt is alive: this one's metrics
    must not report the run failed (its Pushgateway group is the live attempt's)."""


class WorkerLost(JobError):
    """Another worker of a multi-worker run went away mid-run (exit 1: the Job's next attempt resumes)."""

    exit_code = 1


class Preempted(JobError):
    """Stopped by SIGTERM/SIGINT after a checkpoint was saved."""

    exit_code = 143


class ExportFailed(JobError):
    """A format listed in export.formats could not be written or failed its check (exit 1)."""

    exit_code = 1


_carried: dict[str, JobError] = {}  # by message, the latest few (shards are read several at a time, in threads)
_carried_lock = threading.Lock()


def carry(exc: JobError) -> None:
    """Remember an expected error raised inside a tf.data generator (a streamed shard that cannot be read):
    TensorFlow hands it on as its own UnknownError, the traceback in the message, which was exit 1 "unexpected
    error" for a storage or data failure; the CLI reports this one instead (`carried`)."""
    if str(exc):  # (an empty message would match any error)
        with _carried_lock:
            _carried[str(exc)] = exc
            while len(_carried) > 16:
                del _carried[next(iter(_carried))]


def carried(exc: BaseException) -> BaseException:
    """The expected error a TensorFlow error carries (see `carry`): the one whose message it holds, or `exc`."""
    if type(exc).__module__.startswith("tensorflow"):
        text = str(exc)
        with _carried_lock:
            known = list(_carried.items())
        return next((e for message, e in reversed(known) if message in text), exc)
    return exc


def disk_full(exc: BaseException) -> str | None:
    """Where a full local disk is the cause of `exc` or of an exception it came from (OSError ENOSPC, or
    TensorFlow's ResourceExhaustedError when it writes a checkpoint or a cache file): the file it was writing when
    known, else "" ; None when it is not."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left on device" in str(exc):
            return str(getattr(exc, "filename", "") or "")
        exc = exc.__cause__ or exc.__context__
    return None


def first_line(exc: BaseException) -> str:
    """The first line of a TensorFlow error's message, without the graph node it names (`{{function_node ...}}`),
    or its type's name when it says nothing."""
    import re

    said = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", str(getattr(exc, "message", None) or exc)).strip()
    return said.splitlines()[0] if said else type(exc).__name__


def exit_code_for(exc: BaseException) -> int:
    """Exit code of the contract for any exception: typed errors carry theirs, the rest is 1."""
    return exc.exit_code if isinstance(exc, JobError) else 1


def did_you_mean(word: str, choices, prefix: str = "") -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""
