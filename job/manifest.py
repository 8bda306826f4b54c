"""Datasets described by a manifest: a CSV (header `path,label[,split]`) or JSON-lines file.

Pure logic, no TensorFlow. `path` is relative to `data.uri` or a full `s3://` URI; `split` is train,
validation or test (absent: the seeded validation split carves validation out of train). The manifest
is checked as strictly as a folder layout, before any download: every problem is a DataError (exit 3)
naming the manifest and the line.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

from job.errors import DataError
from job.layout import IMAGE_EXTENSIONS, SPLITS, Layout

HEADERS = (["path", "label"], ["path", "label", "split"])


@dataclass(frozen=True)
class Row:
    line: int
    path: str  # as written: relative to data.uri, or a full s3:// URI
    label: str
    split: str | None


def parse(data: bytes, name: str) -> list[Row]:
    """The rows of a manifest file (`name` is its URI, for messages). CSV unless it ends in .jsonl/.json."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.start} cannot be decoded)") from None
    rows = _jsonl(text, name) if name.lower().endswith((".jsonl", ".json")) else _csv(text, name)
    if not rows:
        raise DataError(f"{name}: no entries")
    return rows


def _csv(text: str, name: str) -> list[Row]:
    # newline="": the csv module sees the line endings as written (\n, \r\n, or the old Mac \r).
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return _csv_rows(reader, name)
    except csv.Error as e:
        raise DataError(f"{name} line {reader.line_num}: not CSV ({e})") from None


def _csv_rows(reader, name: str) -> list[Row]:
    header = [h.strip().lower() for h in next(reader, [])]
    if header not in HEADERS:
        raise DataError(f"{name} line 1: the header must be 'path,label' or 'path,label,split', "
                        f"not {','.join(header)!r}")
    rows = []
    for fields in reader:
        line = reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise DataError(f"{name} line {line}: {len(fields)} fields, expected {len(header)} ({','.join(header)})")
        values = dict(zip(header, (f.strip() for f in fields)))
        rows.append(_row(values, line, name))
    return rows


def _jsonl(text: str, name: str) -> list[Row]:
    rows = []
    # JSON Lines are separated by \n alone: U+2028 and the like may stand raw inside a JSON string.
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            values = json.loads(raw)
        except ValueError as e:
            raise DataError(f"{name} line {line}: not a JSON object ({e.msg})") from None
        if not isinstance(values, dict) or "path" not in values or "label" not in values:
            raise DataError(f"{name} line {line}: expected an object with \"path\" and \"label\" (and \"split\")")
        # A label is exact, as JSON quotes it (a folder named `cat ` is a class `cat `); a path or split is
        # stripped, as in a CSV.
        rows.append(_row({k: "" if v is None else str(v) if k == "label" else str(v).strip()
                          for k, v in values.items()}, line, name))
    return rows


def _row(values: dict[str, str], line: int, name: str) -> Row:
    path, label, split = values.get("path", ""), values.get("label", ""), values.get("split") or None
    if not path:
        raise DataError(f"{name} line {line}: empty path")
    if not label:
        raise DataError(f"{name} line {line}: empty label for {path}")
    if split is not None and split not in SPLITS:
        raise DataError(f"{name} line {line}: unknown split {split!r} (train, validation or test)")
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        raise DataError(f"{name} line {line}: {path} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
    return Row(line, path, label, split)


def to_layout(rows: list[Row], name: str, data_uri: str, existing: set[str]) -> Layout:
    """The layout of the manifest's rows. Paths become keys: relative to `data_uri` when inside it, else the
    full URI. `existing` holds the keys of the objects that exist (from listings): anything else is
    missing. Splits named nowhere make every row train (the seeded validation split applies then)."""
    root = data_uri.rstrip("/") + "/"
    seen: dict[str, int] = {}
    files: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        key = row.path[len(root):] if row.path.startswith(root) else row.path
        if key in seen:
            raise DataError(f"{name} line {row.line}: {row.path} is listed twice (first on line {seen[key]})")
        seen[key] = row.line
        if key not in existing:
            raise DataError(f"{name} line {row.line}: {row.path} does not exist"
                            + ("" if "://" in key else f" under {data_uri}"))
        files.setdefault(row.split or "train", {}).setdefault(row.label, []).append(key)
    if "train" not in files:
        raise DataError(f"{name}: no training images (every row has split validation or test)")
    classes = sorted(files["train"])
    if len(classes) < 2:
        raise DataError(f"{name}: {len(classes)} class(es) in train; at least 2 are needed")
    for row in rows:
        if (row.split or "train") != "train" and row.label not in files["train"]:
            raise DataError(f"{name} line {row.line}: class {row.label!r} of split {row.split} has no training "
                            "images")
    return Layout(classes, {s: {c: sorted(files[s].get(c, [])) for c in classes} for s in SPLITS if s in files})


def listing_prefixes(rows: list[Row], data_uri: str) -> list[str]:
    """Where the manifest's objects live: `data_uri`, plus for full URIs outside it the longest common
    prefix of their keys in each bucket (one listing per bucket, not one request per object)."""
    root = data_uri.rstrip("/") + "/"
    outside: dict[str, list[str]] = {}
    for row in rows:
        if "://" in row.path and not row.path.startswith(root):
            scheme, _, rest = row.path.partition("://")
            bucket, _, key = rest.partition("/")
            outside.setdefault(f"{scheme}://{bucket}", []).append(key)
    prefixes = [data_uri.rstrip("/")]
    for bucket, keys in sorted(outside.items()):
        common = _common_prefix(keys)
        prefixes.append(f"{bucket}/{common}".rstrip("/"))
    return prefixes


def _common_prefix(keys: list[str]) -> str:
    first, last = min(keys), max(keys)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n].rpartition("/")[0]
