"""structlog set-up: JSON lines when stdout is not a terminal, readable lines when it is.

`run_id` (and the worker index) are bound with contextvars and appear on every record.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator

import structlog


def interactive() -> bool:
    return sys.stdout.isatty()


def setup(json: bool | None = None, level: str = "INFO") -> None:
    json = not interactive() if json is None else json
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    # TensorFlow's C++ start-up chatter is noise in a job log; errors still get through.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def bind(**values) -> None:
    structlog.contextvars.bind_contextvars(**values)


def get(name: str = "finetune-job"):
    return structlog.get_logger(name)


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal (stderr); nothing otherwise. Yields `advance(n)`."""
    if not (interactive() and sys.stderr.isatty()) or total <= 0:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
