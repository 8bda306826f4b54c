"""TensorFlow's native log lines on stderr (job/logs.py): which lines are chatter at which
TF_CPP_MIN_LOG_LEVEL, and the filter on file descriptor 2 that drops them as they come."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from job import logs
from job.logs import is_native_chatter

INFO = "I0000 00:00:1796453644.687724   23047 port.cc:153] oneDNN custom operations are on."
LINES = {"I": INFO, "W": "W0000 00:00:1796453644.687724   23047 loop.cc:12] End of sequence",
         "E": "E0000 00:00:1796453644.687724   23047 op.cc:9] out of memory",
         "F": "F0000 00:00:1796453644.687724   23047 op.cc:9] check failed"}


def test_native_lines_below_the_level_are_chatter():
    for level in range(4):
        for severity, line in LINES.items():
            assert is_native_chatter(line, level) == ("IWEF".index(severity) < level), (level, severity)
    for line in ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
                 "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
                 "fully_quantize: 0, inference_type: 6, input_inference_type: UINT8, output_inference_type: UINT8",
                 # libjpeg on a damaged JPEG, before predict's own one-line error naming the file
                 "Improper call to JPEG library in state 201", "Input file read error",
                 "Corrupt JPEG data: 2 extraneous bytes before marker 0xd9", "Premature end of JPEG file"):
        assert is_native_chatter(line, 1) and not is_native_chatter(line, 0)


@given(st.text(max_size=80))
def test_other_lines_are_never_chatter(line):
    """A job's own error, a traceback, a Python warning: kept whatever the level."""
    if line.startswith(("I0", "W0", "E0", "F0", "WARNING: All log", "INFO: ", "fully_quantize: ")):
        return
    for level in range(4):
        assert not is_native_chatter(line, level)


CHILD = """
import os, sys
from job import logs
with logs.native_lines_filtered():
    os.write(2, b"I0000 00:00:1796453644.687724   23047 port.cc:153] chatter\\n")
    os.write(2, b"E0000 00:00:1796453644.687724   23047 op.cc:9] an error\\n")
    print("a Python warning", file=sys.stderr)
print("after", file=sys.stderr)
"""


def _child(level: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"} | (
        {"TF_CPP_MIN_LOG_LEVEL": level} if level is not None else {})
    return subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env,
                          timeout=60, check=True).stderr


def test_the_filter_drops_chatter_written_to_the_file_descriptor():
    out = _child("2")
    assert "chatter" not in out and "op.cc:9] an error" in out
    assert out.index("a Python warning") < out.index("after")  # order kept, nothing lost after the filter ends
    everything = _child("0")
    assert "chatter" in everything and "an error" in everything and "after" in everything


HIDDEN = """
import sys
from job import logs
with logs.matplotlib_hidden():
    try:
        import matplotlib.pyplot
    except ImportError as e:
        print("hidden:", type(e).__name__)
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
print("after:", plt.get_backend())
with logs.matplotlib_hidden():  # once loaded, it stays visible
    import matplotlib.figure
    print("loaded:", matplotlib.figure.__name__)
"""


def test_matplotlib_is_hidden_while_tensorflow_loads_and_importable_after():
    """Keras' "matplotlib is not installed" fallback while TensorFlow loads (job/logs.py matplotlib_hidden); the
    job's plots import it afterwards as usual."""
    out = subprocess.run([sys.executable, "-c", HIDDEN], capture_output=True, text=True, timeout=60,
                         check=True).stdout.splitlines()
    assert out == ["hidden: ModuleNotFoundError", "after: Agg", "loaded: matplotlib.figure"]


def test_a_long_stage_logs_its_progress_without_a_terminal(monkeypatch):
    # Staging 6,000 objects ran 52 s without a record in JSON logs: the progress bar is drawn on a terminal only.
    import threading

    import structlog.testing

    from job import logs

    monkeypatch.setattr(logs, "PROGRESS_SECONDS", 0.0)  # every advance is due
    reported = []
    report = lambda d, t: reported.append((d, t))  # noqa: E731
    with structlog.testing.capture_logs() as logged, logs.progress("staging", 40, report=report) as step:
        threads = [threading.Thread(target=lambda: [step(1) for _ in range(10)]) for _ in range(4)]  # staging threads
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert reported[0] == (0, 40) and reported[-1] == (40, 40) and len(reported) == 41
    assert sorted(d for d, _ in reported) == [d for d, _ in reported]  # counted under a lock, in order
    records = [r for r in logged if r["event"] == "staging: in progress"]
    assert len(records) == 39 and all(r["total"] == 40 and r["per_second"] > 0 for r in records)  # not at the end
    assert records[-1]["done"] == 39 and records[-1]["seconds_left"] >= 0
    monkeypatch.setattr(logs, "PROGRESS_SECONDS", 3600.0)
    with structlog.testing.capture_logs() as logged, logs.progress("staging", 40) as step:
        step(40)
    assert not logged  # a short stage says nothing


@pytest.mark.parametrize("level, quiet", [("2", True), ("3", True), ("1", False), ("0", False)])
def test_tensorflows_python_warnings_follow_its_native_level(monkeypatch, level, quiet):
    # `WARNING:tensorflow:5 out of the last 7 calls to ... triggered tf.function retracing` reached stderr (train.search
    # with averaging and refit), TensorFlow's Python logger left as it was.
    import logging

    logger = logging.getLogger("tensorflow")
    monkeypatch.setattr(logger, "level", logging.NOTSET)  # restored after the test
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
    logs.quiet_tensorflow()
    assert (logger.level == logging.ERROR) == quiet
