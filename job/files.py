"""Local files written safely: a temporary name beside the destination, renamed onto it when complete.

A reader (a resumed run, another worker, tf.data) never sees a half-written file, and a failed write
leaves nothing behind under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

# A run's files that say what it is, beside its artifacts (job.export writes them, job.predict reads them without
# TensorFlow: a mistyped --model is said in a second, not after TensorFlow's import).
SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
THRESHOLDS = "thresholds.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_CALLS = itertools.count()


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it becomes `dest`, on failure it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, and unique per process, thread and call: parallel writers of one file never share a temporary (two
    # generators of tf.data that stream one shard run interleaved on one thread: per thread, the first rename took
    # the second's temporary, and training failed with FileNotFoundError, exit 1).
    # The name's first 40 characters only: a name of 225 to 255 bytes fits, and had no room for the rest.
    tmp = dest.with_name(f".{dest.name[:40]}.{os.getpid()}-{threading.get_ident()}-{next(_CALLS)}.part")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(dest: Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


# labels.txt of a run, classes.txt of shards: one class per line, in index order, UTF-8 whatever the locale (a
# class `café` or `猫` under LANG=C). A name that holds a line break is refused earlier (layout.broken_lines).
def write_labels(dest: Path, classes: list[str]) -> None:
    write_text(dest, "".join(f"{c}\n" for c in classes))


def read_labels(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def finite(tree):
    """The tree with each NaN or infinite number as None (numpy scalars as Python's): JSON has no NaN, and
    Python's `NaN` in metrics.json or a log line is refused by strict readers (`JSON.parse`, `jq`, Go)."""
    if isinstance(tree, dict):
        return {k: finite(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [finite(v) for v in tree]
    if hasattr(tree, "dtype") and hasattr(tree, "item") and not getattr(tree, "shape", ()):
        tree = tree.item()
    return None if isinstance(tree, float) and not math.isfinite(tree) else tree


def json_text(tree, **options) -> str:
    """Strict JSON of `tree` (`finite`): NaN and infinity as null. Indented, a list of numbers stays on one line: a
    confusion matrix of 1,000 classes put a million cells one per line (metrics.json of 22 MB, 2 million lines)."""
    tree = finite(tree)
    if options.get("indent") is None:
        return json.dumps(tree, allow_nan=False, **options)
    rows: list[str] = []
    marker = f"@@row-{uuid.uuid4().hex}-"

    def fold(node):
        if isinstance(node, dict):
            return {k: fold(v) for k, v in node.items()}
        if isinstance(node, list) and node and all(v is None or (isinstance(v, (int, float)) and
                                                                 not isinstance(v, bool)) for v in node):
            rows.append(json.dumps(node, allow_nan=False))
            return f"{marker}{len(rows) - 1}"
        return [fold(v) for v in node] if isinstance(node, list) else node

    text = json.dumps(fold(tree), allow_nan=False, **options)
    return re.sub(f'"{marker}(\\d+)"', lambda m: rows[int(m.group(1))], text)
