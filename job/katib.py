"""`metrics.file`: the run's metrics as lines for Katib's File metrics collector (TEXT format).

Katib injects a sidecar into each trial pod that tails this file and, when training ends, parses every line
with its filter; the default one (DefaultFilter in kubeflow/katib pkg/metricscollector/v1beta1/common/const.go,
quoted in tests/unit/test_katib.py) finds `name=value` pairs. A line here is an RFC 3339 time, which Katib
records as the time of the line's values (so its `latest` metric strategy picks the final line), then the pairs:

    2025-01-01T10:00:00.000000Z head_epoch=1 train_loss=0.9 train_accuracy=0.7 val_loss=0.6 val_accuracy=0.8
    2025-01-01T10:05:00.000000Z finetune_epoch=1 train_loss=0.4 train_accuracy=0.9 val_loss=0.4 val_accuracy=0.9
    2025-01-01T10:09:00.000000Z val_loss=0.38 val_accuracy=0.91 ... test_loss=0.41 test_accuracy=0.9

One line per finished epoch (`head_epoch` or `finetune_epoch`: the phase's epoch, 1-based; multi-label runs
have `val_map` instead of `val_accuracy`) and one when the run is complete: the exported model's validation
(`val_`) and test (`test_`) metrics, the values of metrics.json (`loss`, `accuracy`, `balanced_accuracy`,
`macro_f1`; multi-label `loss`, `map`, `micro_f1`, `macro_f1`). Values are numbers only: a word such as
`phase=head` matches the filter with an empty value, which Katib's early-stopping watcher fails on. Values
that are not finite (nan without a validation split) are left out. Only the chief writes: every worker has
the same values. No TensorFlow import.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

SPLITS = (("validation", "val"), ("test", "test"))
REPORT_KEYS = ("loss", "accuracy", "balanced_accuracy", "map", "micro_f1", "macro_f1")


def number(value) -> str | None:
    """`value` as Katib's filter reads it whole (Python's shortest round-trip form), or None when it is not a
    finite number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    try:
        value = float(value)  # NumPy scalars too
    except (TypeError, ValueError):
        return None
    return repr(value) if math.isfinite(value) else None


def line(values: dict, when: dt.datetime | None = None) -> str:
    """A timestamped line of `name=value` pairs; values that are not finite numbers are left out."""
    when = when or dt.datetime.now(dt.timezone.utc)
    pairs = [f"{name}={text}" for name, value in values.items() if (text := number(value)) is not None]
    return " ".join([when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), *pairs])


def check_writable(path: str) -> None:
    """ConfigError unless lines can be appended to `path` (its folders created, the file too, empty): a folder or a
    read-only place failed the run after its first epoch, with a traceback (exit 1, which a Job retries)."""
    from job.errors import ConfigError

    if not path:
        return
    check_path(path)  # below a file: "cannot be written (File exists)" pointed the wrong way
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).open("a", encoding="utf-8").close()
    except OSError as e:
        raise ConfigError(f"config: metrics.file {path}: cannot be written ({e.strerror or e})") from None


def check_path(path: str) -> None:
    """ConfigError where `path` can never be the metrics file, whatever the machine: a folder, or below a file. No
    write: `validate` runs where the trial's folders (Katib's `/var/log/katib`) need not exist."""
    from job.errors import ConfigError

    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"config: metrics.file {path}: a folder, not a file")
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"config: metrics.file {path}: {blocking} is a file, so no file can be below it")


def append(path: str, text: str) -> None:
    """Append one line to `path` (its folders created), flushed at once: Katib tails the file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a", encoding="utf-8") as f:
        f.write(text + "\n")


def epoch_values(phase: str, record: dict) -> dict:
    """The values of an epoch's record (job.loop): the phase's epoch, training and validation metrics."""
    values = {f"{phase}_epoch": record["epoch"], "train_loss": record["loss"], "train_accuracy": record["accuracy"]}
    return values | {k: v for k, v in record.items() if k.startswith("val_")}


def final_values(reports: dict) -> dict:
    """The run's validation and test metrics, as in metrics.json, under `val_` and `test_` names."""
    return {f"{prefix}_{key}": reports[split][key]
            for split, prefix in SPLITS if split in reports for key in REPORT_KEYS if key in reports[split]}


def epoch_done(path: str, phase: str, record: dict, *, chief: bool) -> None:
    """An epoch of `phase` finished with `record`: its line, when `metrics.file` is set and this is the chief."""
    if path and chief:
        append(path, line(epoch_values(phase, record)))


def run_done(path: str, reports: dict, *, chief: bool) -> None:
    """The run is complete with these evaluation `reports`: the final line, from the chief."""
    if path and chief:
        append(path, line(final_values(reports)))
