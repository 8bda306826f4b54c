"""Datasets described by a manifest: a CSV (header `path,label[,split]`) or JSON-lines file.

Multi-label (`task: multi_label`): a CSV with header `path,labels[,split]`, the labels of an image in one
field separated by `|` (`shoe|red`; an empty field: none of the labels), or JSON lines with `"labels": [...]`
(a list of names, maybe empty). The classes are the sorted union of the labels, or `classes.txt` beside the
manifest (one per line) when it is there.

Pure logic, no TensorFlow. `path` is relative to `data.uri` or a full `s3://` URI; `split` is train,
validation or test (absent: the seeded validation split carves validation out of train). The manifest
is checked as strictly as a folder layout, before any download: every problem is a DataError (exit 3)
naming the manifest and the line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
from dataclasses import dataclass

from job import layout
from job.errors import DataError
from job.layout import IMAGE_EXTENSIONS, SPLIT_ALIASES, SPLITS, UNREAD_IMAGE_EXTENSIONS, Layout, MultiLayout, lookalike

HEADERS = (["path", "label"], ["path", "label", "split"])
JSON_LINES = (".jsonl", ".ndjson", ".json")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what ends a line for the csv module
MULTI_HEADERS = (["path", "labels"], ["path", "labels", "split"])
SEPARATOR = "|"  # between the labels of a multi-label CSV row


@dataclass(frozen=True)
class Row:
    line: int
    path: str  # as written: relative to data.uri, or a full s3:// URI
    label: str  # single-label; "" in a multi-label manifest
    split: str | None
    labels: tuple[str, ...] | None = None  # multi-label: the image's labels (maybe none); None: single-label


def is_multi_label(rows: list[Row]) -> bool:
    return rows[0].labels is not None


def parse(data: bytes, name: str) -> list[Row]:
    """The rows of a manifest file (`name` is its URI, for messages). CSV unless it ends in JSON_LINES' suffixes
    (`.ndjson`, the other common name of JSON lines, was read as a CSV and refused for its header)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text (byte {e.start} cannot be decoded)") from None
    rows = _jsonl(text, name) if name.lower().endswith(JSON_LINES) else _csv(text, name)
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
    if header not in HEADERS + MULTI_HEADERS:
        raise DataError(f"{name} line 1: the header must be 'path,label[,split]' (or multi-label "
                        f"'path,labels[,split]'), not {','.join(header)!r}")
    rows = []
    end = reader.line_num  # of the record before (a blank line is a record of no field)
    for fields in reader:
        start, line = end + 1, reader.line_num
        end = line
        if not fields or all(not f.strip() for f in fields):
            continue
        if any(_LINE_BREAK.search(f) for f in fields):  # a quote left open swallowed the lines after it
            raise DataError(f"{name} line {start}: a quoted field runs over lines {start} to {line}: a quote left "
                            "open? (a path or a label holds no line break)")
        if len(fields) != len(header):
            raise DataError(f"{name} line {line}: {len(fields)} fields, expected {len(header)} ({','.join(header)})")
        values = dict(zip(header, (f.strip() for f in fields)))
        if "labels" in values:
            labels = values.pop("labels")
            values["labels"] = [x.strip() for x in labels.split(SEPARATOR)] if labels else []
        rows.append(_row(values, line, name))
    return rows


# What writes JSON lines from the JSON documents users have (an array of objects, objects over several lines).
JQ = "one object per line, as `jq -c '.[]'` writes them from an array"


def _document(text: str):
    """The text as one JSON document, or None where it is not one."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def _jsonl(text: str, name: str) -> list[Row]:
    if text.lstrip().startswith("[") and isinstance(_document(text), list):  # one array, not lines
        raise DataError(f"{name}: a JSON array; a JSON manifest is JSON lines, {JQ}")
    rows = []
    # JSON Lines are separated by \n alone: U+2028 and the like may stand raw inside a JSON string.
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            values = json.loads(raw, object_pairs_hook=_unique_keys)
        except _KeyTwice as e:
            raise DataError(f"{name} line {line}: key {e.args[0]!r} written twice (a JSON reader keeps one of them "
                            "silently)") from None
        except ValueError as e:
            spread = "; an object over several lines? JSON lines keep each object on one line" * (raw.strip() == "{")
            raise DataError(f"{name} line {line}: not a JSON object ({getattr(e, 'msg', e)}){spread}") from None
        _refuse_other_keys(values, line, name)
        if not isinstance(values, dict) or "path" not in values or ("label" in values) == ("labels" in values):
            raise DataError(f"{name} line {line}: expected an object with \"path\" and \"label\" (multi-label: "
                            "\"labels\", a list) and maybe \"split\"")
        label = values.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
            hint = " (a list of labels is multi-label: \"labels\" and task: multi_label)" * isinstance(label, list)
            raise DataError(f"{name} line {line}: \"label\" must be a class name (a string or an integer), not "
                            f"{json.dumps(label)}{hint}")
        # A label is exact, as JSON quotes it (a folder named `cat ` is a class `cat `); a path or split is
        # stripped, as in a CSV.
        rows.append(_row({k: v if k == "labels" else "" if v is None else str(v) if k == "label" else str(v).strip()
                          for k, v in values.items()}, line, name))
    if rows and any(is_multi_label(rows) != is_multi_label([r]) for r in rows):
        odd = next(r for r in rows if is_multi_label([r]) != is_multi_label(rows))
        raise DataError(f"{name} line {odd.line}: \"label\" and \"labels\" mixed in one manifest (one task per "
                        "dataset)")
    return rows


JSON_KEYS = ("path", "label", "labels", "split")
SPLIT_NAMES = (*SPLITS, "val", "valid", "training", "testing")  # what another key holding the split says


class _KeyTwice(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    found: dict = {}
    for key, value in pairs:
        if key in found:
            raise _KeyTwice(key)
        found[key] = value
    return found


def _refuse_other_keys(values, line: int, name: str) -> None:
    """Other keys are kept out of the way (metadata), but not one that reads like a key of JSON_KEYS in another case
    (`"Split"`), nor one holding a split's name (`"subset": "test"`): both were ignored, so the test images were
    trained on."""
    for key, value in values.items() if isinstance(values, dict) else ():
        if key in JSON_KEYS:
            continue
        if key.strip().lower() in JSON_KEYS:
            raise DataError(f"{name} line {line}: key {key!r} is not read (did you mean '{key.strip().lower()}'? "
                            "keys are lower case, as written)")
        # Only where "split" is absent, and not for words that are more than split names (`"annotator": "dev"`).
        if "split" not in values and isinstance(value, str) and value.strip().lower() in SPLIT_NAMES:
            raise DataError(f"{name} line {line}: key {key!r} holds the split name {value!r}, but the split is read "
                            f"from \"split\" only: rename the key (`jq -c '.split = .{key} | del(.{key})'`)")


def _row(values: dict, line: int, name: str) -> Row:
    path, label, split = values.get("path", ""), values.get("label", ""), values.get("split") or None
    labels = _labels(values["labels"], line, name) if "labels" in values else None
    if not path:
        raise DataError(f"{name} line {line}: empty path")
    if labels is None and not label:
        raise DataError(f"{name} line {line}: empty label for {path}")
    broken = [x for x in (labels if labels is not None else (label,)) if x and x.splitlines() != [x]]
    if broken:  # (refused for the dataset later too, but without the file and line)
        raise DataError(f"{name} line {line}: label {ascii(broken[0])} holds a line break; labels.txt keeps one "
                        "class per line, so rename it")
    if split is not None and split not in SPLITS:
        alias = SPLIT_ALIASES.get(split.lower(), split.lower() if split.lower() in SPLITS else "")
        hint = f"; did you mean {alias}?" if alias else ""
        raise DataError(f"{name} line {line}: unknown split {split!r} (train, validation or test{hint})")
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        what = "in an image format the job does not read: convert it to JPEG or PNG" \
            if path.lower().endswith(UNREAD_IMAGE_EXTENSIONS) else "not an image"
        raise DataError(f"{name} line {line}: {path} is {what} ({', '.join(IMAGE_EXTENSIONS)})")
    return Row(line, path, label, split, labels)


def _labels(value, line: int, name: str) -> tuple[str, ...]:
    """A multi-label row's labels: a list of non-empty names, none twice (an empty list: none of them)."""
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise DataError(f"{name} line {line}: \"labels\" must be a list of label names, not {value!r}")
    if any(not x.strip() for x in value):
        raise DataError(f"{name} line {line}: a label with an empty name in {SEPARATOR.join(value)!r}")
    twice = sorted({x for x in value if value.count(x) > 1})
    if twice:
        raise DataError(f"{name} line {line}: label {twice[0]!r} listed twice")
    return tuple(value)


def joined_labels(rows: list[Row]) -> dict[str, str]:
    """{label: separator} for the labels that look like several joined the wrong way, trained as one class made of
    both: in a multi-label manifest, one with a `,`, `;` or `|` (the CSV's separator, inside a JSON list's name),
    or with spaces between labels that occur on their own (`haze primary`); in a single-label one, one with `|`."""
    if not is_multi_label(rows):
        return {r.label: SEPARATOR for r in rows if SEPARATOR in r.label}
    return joined_names({x for r in rows for x in r.labels})


def joined_names(labels: set[str]) -> dict[str, str]:
    """`joined_labels` of a multi-label dataset's label names (a manifest's, or classes.txt beside shards)."""
    found = {}
    for x in sorted(labels):
        for sep in (",", ";", SEPARATOR, " "):
            parts = [p.strip() for p in x.split(sep) if p.strip()]
            if len(parts) > 1 and (sep != " " or all(p in labels for p in parts)):
                found[x] = sep
                break
    return found


def _keys(rows: list[Row], name: str, data_uri: str, existing: set[str]) -> list[str]:
    """Each row's key: relative to `data_uri` when inside it (a leading `./` dropped), else the full URI;
    DataError for a path listed twice or missing from `existing`."""
    root = data_uri.rstrip("/") + "/"
    local = "://" not in data_uri or data_uri.startswith("file://")
    seen: dict[str, int] = {}
    for row in rows:
        if local and (row.path.startswith(("/", "file://"))):  # resolved whole: `/data/train/dog/../cat/1.jpg` too
            key = _local_key(row.path, data_uri)
        else:
            key = row.path[len(root):] if row.path.startswith(root) else row.path
            key = _local_key(key, data_uri) if local and "://" not in key else key
        while key.startswith("./"):  # as `find .` writes paths: the same object as without
            key = key[2:]
        if ".." in key.split("/"):  # its copy would land outside the staging folder
            raise DataError(f"{name} line {row.line}: {row.path} has a '..' part; give the path below data.uri "
                            f"({data_uri}) without one, or as a full URI")
        if key in seen:
            raise DataError(f"{name} line {row.line}: {row.path} is listed twice (first on line {seen[key]})")
        seen[key] = row.line
        if key not in existing and key.startswith("/"):  # a local absolute path that data.uri does not hold
            raise DataError(f"{name} line {row.line}: {row.path} is outside data.uri ({data_uri}); paths are relative "
                            "to it, or full s3:// URIs: set data.uri to a folder that holds them all")
        if key not in existing:
            slashed = key.replace("\\", "/").removeprefix("./")  # a path written on Windows (`.\\a\\1.png` too)
            hint = f" ({slashed} does: write paths with '/')" if "\\" in key and slashed in existing else \
                _lookalike_key(key, existing)
            raise DataError(f"{name} line {row.line}: {row.path} does not exist"
                            + ("" if "://" in key else f" under {data_uri}") + hint)
    return list(seen)


def _lookalike_key(key: str, existing: set[str]) -> str:
    """A hint naming the object that `key` names in another case or Unicode form (`café` composed in the manifest,
    decomposed in storage as macOS uploads it: the message printed two names that looked the same), else ""."""
    target = layout.folded(key)
    other = next((k for k in sorted(existing) if layout.folded(k) == target), None)
    return f" (storage holds {ascii(other)}: the same name in another case or Unicode form)" if other else ""


def _local_key(path: str, data_uri: str) -> str:
    """A local manifest path as the listing names it: `a//b` and `a/./b` as `a/b` (they were "does not exist"),
    and an absolute path (or `file://` URI) inside data.uri relative to it, however either is spelled (a relative
    data.uri, a `..`, a symlink: they were "outside data.uri"). A path with a `..` part is left as written."""
    path = path.removeprefix("file://")
    if not path.startswith("/"):
        return path if ".." in path.split("/") else posixpath.normpath(path)
    base = data_uri.removeprefix("file://")
    for resolve in (os.path.abspath, os.path.realpath):
        inside = os.path.relpath(resolve(path), resolve(base))
        if inside != "." and not inside.startswith(".."):
            return inside
    return path


def to_layout(rows: list[Row], name: str, data_uri: str, existing: set[str], classes: list[str] | None = None,
              classes_name: str = "") -> Layout:
    """The layout of the manifest's rows. Paths become keys: relative to `data_uri` when inside it, else the
    full URI. `existing` holds the keys of the objects that exist (from listings): anything else is
    missing. Splits named nowhere make every row train (the seeded validation split applies then). The classes
    are `classes` in its order (classes.txt beside the manifest, named `classes_name`: a label outside it, or a
    class of it without training images, is a DataError), else the training labels sorted."""
    if classes is not None:
        named = set(classes)  # (a list's lookup, for each of a large manifest's rows)
        for row in rows:
            if row.label not in named:
                raise DataError(f"{name} line {row.line}: label {row.label!r} is not in {classes_name}"
                                f"{lookalike(row.label, classes)}")
    files: dict[str, dict[str, list[str]]] = {}
    for row, key in zip(rows, _keys(rows, name, data_uri, existing)):
        files.setdefault(row.split or "train", {}).setdefault(row.label, []).append(key)
    if "train" not in files:
        raise DataError(f"{name}: no training images (every row has split validation or test)")
    untrained = [c for c in classes or [] if c not in files["train"]]
    if untrained:
        raise DataError(f"{classes_name}: class {untrained[0]!r} has no training images in {name} "
                        f"({len(untrained)} such); every class needs one, or remove it from {classes_name}")
    classes = classes or sorted(files["train"])
    if len(classes) < 2:
        raise DataError(f"{name}: {len(classes)} class(es) in train; at least 2 are needed")
    for row in rows:
        if (row.split or "train") != "train" and row.label not in files["train"]:
            raise DataError(f"{name} line {row.line}: class {row.label!r} of split {row.split} has no training "
                            f"images{lookalike(row.label, classes)}")
    return Layout(classes, {s: {c: sorted(files[s].get(c, [])) for c in classes} for s in SPLITS if s in files})


def to_multi_layout(rows: list[Row], name: str, data_uri: str, existing: set[str],
                    classes: list[str] | None = None, classes_name: str = "") -> MultiLayout:
    """The multi-label layout of the manifest's rows (keys as in `to_layout`). The classes are `classes`
    (classes.txt beside the manifest, named `classes_name`: a label outside it is a DataError) or the sorted
    union of the labels; every class needs a training image (DataError naming the line, or classes.txt)."""
    union = sorted({x for row in rows for x in row.labels})
    if classes is None:
        classes = union
    index = {c: i for i, c in enumerate(classes)}
    sets: dict[str, dict[str, tuple[int, ...]]] = {}
    for row, key in zip(rows, _keys(rows, name, data_uri, existing)):
        outside = [x for x in row.labels if x not in index]
        if outside:
            raise DataError(f"{name} line {row.line}: label {outside[0]!r} is not in {classes_name}"
                            f"{lookalike(outside[0], classes)}")
        sets.setdefault(row.split or "train", {})[key] = tuple(sorted(index[x] for x in row.labels))
    if "train" not in sets:
        raise DataError(f"{name}: no training images (every row has split validation or test)")
    if not classes:
        raise DataError(f"{name}: no labels at all (a multi-label dataset needs at least one)")
    trained = {i for labels in sets["train"].values() for i in labels}
    for row in rows:
        untrained = [x for x in row.labels if index[x] not in trained]
        if untrained:
            raise DataError(f"{name} line {row.line}: label {untrained[0]!r} has no training image")
    unused = [c for c in classes if index[c] not in trained]
    if unused:
        raise DataError(f"{classes_name}: label {unused[0]!r} has no training image in {name}")
    return MultiLayout(classes, {s: sets[s] for s in SPLITS if s in sets})


def listing_prefixes(rows: list[Row], data_uri: str, name: str = "manifest") -> list[str]:
    """Where the manifest's objects live: `data_uri`, plus for full URIs outside it the longest common
    prefix of their keys in each bucket (one listing per bucket, not one request per object). DataError for a URI
    of another scheme (`https://`, `s3a://`, `S3://`: exit 4 from storage, the row unnamed)."""
    root = data_uri.rstrip("/") + "/"
    outside: dict[str, list[str]] = {}
    for row in rows:
        if "://" in row.path and not row.path.startswith(("s3://", "file://")):
            raise DataError(f"{name} line {row.line}: {row.path}: a full URI must be s3://bucket/key (lower-case "
                            "s3), or give the path relative to data.uri")
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
