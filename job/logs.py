"""structlog set-up: JSON lines when stdout is not a terminal, readable lines when it is.

`run_id` (and the worker index) are bound with contextvars and appear on every record.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator

import structlog

from job.files import json_text


def interactive() -> bool:
    return sys.stdout.isatty()


def setup(json: bool | None = None, level: str = "INFO", stream=None) -> None:
    """Log records to `stream` (standard output unless given); JSON lines are strict JSON (NaN as null)."""
    json = not interactive() if json is None else json
    out = stream or sys.stdout
    renderer = structlog.processors.JSONRenderer(serializer=json_text) if json else \
        structlog.dev.ConsoleRenderer(colors=_is_terminal(out))  # colour codes in a file or a pipe are noise
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # TensorFlow's C++ logging below errors is noise in a job log; TF_CPP_MIN_LOG_LEVEL=0 turns it back on.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


# ------------------------------------------------------------ TensorFlow's native logging

# TensorFlow's C++ log lines ("I0000 00:00:1796453644.687724   23047 port.cc:153] ..."): severity I, W, E, F.
_NATIVE_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] ")
# Info lines printed by the same libraries without that prefix (absl before its set-up, LiteRT, the quantizer), and
# libjpeg's own warnings on a damaged JPEG, which the job reports itself in one line (predict's error, a bad image).
_NATIVE_INFO = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\) is called|INFO: |"
                          r"fully_quantize: \d|Corrupt JPEG data|Premature end of JPEG file|Improper call to JPEG "
                          r"library|Input file read error|Invalid JPEG file structure|Not a JPEG file)")


def quiet_tensorflow() -> None:
    """TensorFlow's C++ logging below errors off unless TF_CPP_MIN_LOG_LEVEL says otherwise (0 shows it all),
    and TensorFlow imported with the lines its libraries print before reading that variable filtered out."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"].strip() not in ("0", "1"):  # TensorFlow's Python warnings as its C++ ones
        # (`5 out of the last 7 calls to ... triggered tf.function retracing`, with search, averaging and refit)
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    if "tensorflow" not in sys.modules:
        with native_lines_filtered(), matplotlib_hidden():
            import tensorflow  # noqa: F401


@contextlib.contextmanager
def matplotlib_hidden() -> Iterator[None]:
    """Inside: `import matplotlib` fails as if it were not installed. Keras imports matplotlib.pyplot while
    TensorFlow loads it, for keras.visualization (which the job never calls; it then keeps its "not installed"
    fallback): about 1 s of CPU in every process that imports TensorFlow, against 0.3 s for the job's own plots,
    which import it afterwards (job/evaluate.py at export, job/tensorboard.py's image grid). Nothing is hidden
    once matplotlib is loaded."""
    if "matplotlib" in sys.modules:
        yield
        return
    sys.modules["matplotlib"] = None  # the import system's own marker: ModuleNotFoundError
    try:
        yield
    finally:
        if sys.modules.get("matplotlib", 0) is None:
            del sys.modules["matplotlib"]


def is_native_chatter(line: str, min_level: int) -> bool:
    """Whether a line on stderr is native logging below TF_CPP_MIN_LOG_LEVEL (0 info, 1 warning, 2 error)."""
    tagged = _NATIVE_LINE.match(line)
    if tagged:
        return "IWEF".index(tagged.group(1)) < min_level
    return min_level > 0 and bool(_NATIVE_INFO.match(line))


@contextlib.contextmanager
def native_lines_filtered() -> Iterator[None]:
    """Inside: file descriptor 2 goes through a pipe whose lines reach the real stderr as they come, less the
    native chatter below TF_CPP_MIN_LOG_LEVEL. TensorFlow's libraries print some lines at import and in the
    LiteRT converter whatever that variable says; this is where they are dropped."""
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    if level <= 0:
        yield
        return
    sys.stderr.flush()
    read, write = os.pipe()
    real = os.dup(2)
    os.dup2(write, 2)
    os.close(write)

    def forward() -> None:
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                if not is_native_chatter(line.decode(errors="replace"), level):
                    os.write(real, line)

    thread = threading.Thread(target=forward, name="native-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer gone: the thread reads to its end and stops
        thread.join(timeout=10)
        os.close(real)


def bind(**values) -> None:
    structlog.contextvars.bind_contextvars(**values)


def get(name: str = "finetune-job"):
    return structlog.get_logger(name)


# Without a terminal (JSON logs, a pod), a long stage logs how far it is this often: staging 6,000 objects from S3
# ran 52 s without a record, and a cluster's would run many minutes.
PROGRESS_SECONDS = 30.0


@contextlib.contextmanager
def progress(description: str, total: int,
             report: Callable[[int, int], None] | None = None) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal (stderr); otherwise a record every PROGRESS_SECONDS with what is done of `total`,
    the rate and the seconds left. Yields `advance(n)` (any thread may call it); `report(done, total)` is called at
    the start and on every advance (a gauge)."""
    if total <= 0:
        yield lambda n=1: None
        return
    lock, started = threading.Lock(), time.monotonic()
    state = {"done": 0, "next": started + PROGRESS_SECONDS}
    if report:
        report(0, total)

    def count(n: int) -> tuple[int, float, bool]:
        with lock:
            state["done"] += n
            now = time.monotonic()
            due = now >= state["next"]
            if due:
                state["next"] = now + PROGRESS_SECONDS
            if report:
                report(state["done"], total)
            return state["done"], now, due

    if interactive() and sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      transient=True) as bar:
            task = bar.add_task(description, total=total)

            def on_terminal(n: int = 1) -> None:
                count(n)
                bar.advance(task, n)

            yield on_terminal
        return

    def logged(n: int = 1) -> None:
        done, now, due = count(n)
        if due and done < total:
            rate = done / max(now - started, 1e-9)
            get().info(f"{description}: in progress", done=done, total=total, per_second=round(rate, 1),
                       seconds_left=round((total - done) / rate) if rate else None)

    yield logged
