"""Storage locations compared without touching storage: an s3:// URI or a local path. Pure, standard library only
(the config imports it)."""

from __future__ import annotations

import os
import re
from pathlib import Path


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key prefix) of `s3://bucket/prefix`, the prefix as written but for its trailing `/`: `#` and `?`
    are characters of S3 keys, where a URL parser cut them off as a fragment or a query (`s3://b/my#data` read
    `s3://b/my`, and wrote a run's artifacts beside it)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def within(uri: str, folder: str) -> bool:
    """Whether `uri` is `folder` or below it: the same bucket and a prefix at or under the folder's (s3://), or the
    same directory or one below it once resolved (local paths). Pure; no storage touched."""
    if is_s3(uri) != is_s3(folder):
        return False
    if is_s3(uri):
        inner, outer = (u.removeprefix("s3://").strip("/").split("/") for u in (uri, folder))
        inner, outer = [p for p in inner if p], [p for p in outer if p]
    else:
        inner, outer = (_as_written_or_expanded(u).resolve().parts for u in (uri, folder))
    return list(inner[:len(outer)]) == list(outer)


def expanded(uri: str) -> Path:
    """A local location (a path or file://) as a Path, `~` and `~user` expanded; ValueError for a user this machine
    does not know (pathlib's RuntimeError was exit 1 with a traceback)."""
    path = uri.removeprefix("file://")
    full = os.path.expanduser(path)
    if path.startswith("~") and full == path:
        raise ValueError(f"{path.split('/')[0]}: no such user here, so no home folder to expand; write the path in "
                         "full")
    return Path(full)


def _as_written_or_expanded(uri: str) -> Path:
    try:
        return expanded(uri)
    except ValueError:  # (compared as written: refused where it is used)
        return Path(uri.removeprefix("file://"))


def s3_form(v: str) -> str:
    """A location whose text starts with `s3:` must be s3://bucket[/prefix]: `s3:/bucket/models` (one slash) or
    `s3://` (no bucket) were local folders named `s3:` in the working directory, where the artifacts were lost
    with the pod. Another scheme than s3:// or file:// (gs://, http://) is refused."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", v)
    if scheme and scheme.group(1).lower() not in ("s3", "file"):  # exit 4 "unsupported scheme" for output.uri, exit 3
        # "no such file" for data.manifest: a config error, and said so before any work
        raise ValueError(f"{scheme.group(1)}:// is not storage the job reads: s3://bucket/prefix (AWS S3, or other "
                         "S3-compatible storage through s3.endpoint_url) or a local path")
    bucket = split_s3(v)[0] if is_s3(v) else ""
    if v[:3].lower() == "s3:" and not bucket:
        raise ValueError("expected s3://bucket/prefix (two slashes, then the bucket)")
    if bucket and not re.fullmatch(r"[A-Za-z0-9._-]+", bucket):  # boto3's check: exit 4, "storage unreachable"
        if ":" in bucket or "@" in v.split("/", 3)[2 if v.startswith("s3://") else 0]:  # a user:password@ (a `/` in
            # the password cut the "bucket" there, and it was quoted: the key id and part of the secret)
            raise ValueError("s3:// takes no user:password@: give credentials in the environment (AWS_ACCESS_KEY_ID, "
                             "AWS_SECRET_ACCESS_KEY) or the chart's Secret")
        raise ValueError(f"bucket name {masked(repr(bucket))}: letters, digits, '.', '-' and '_' only")
    return v


# A URL's user:password@ in text: from its scheme to the last `@` before white space, unencoded `/ # ? ' "` in the
# password included (they ended the match, and the password's tail or all of it was printed); or, without a scheme,
# a `user:password@` that begins a value.
_WITH_SCHEME = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)\S+@")
_WITHOUT = re.compile(r"(^|[\s\"'(`])(?!\S*://)[^\s\"'(`/:@]+:\S*@")


def masked(text: str) -> str:
    """`text` with the user:password@ of any URL in it as `***@` (config.yaml masks them so; error lines printed
    them). Errs on the side of masking: a path's `@` masks what precedes it too."""
    return _WITHOUT.sub(r"\1***@", _WITH_SCHEME.sub(r"\1***@", text))


def credentials_parse(url: str) -> None:
    """ValueError unless a URL's user:password@ parse as such: `#`, `?` or `/` unencoded in the password cut the
    URL there (the host read as `user`, the port as the password's start: every push failed, exit 0, and the
    password went into the log and config.yaml unmasked); a port that is not a number was exit 1, a traceback."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if "@" in url and "@" not in parts.netloc:
        raise ValueError("user:password@ cut short by a character the URL reads otherwise: percent-encode # ? / @ : "
                         "in them (%23 %3F %2F %40 %3A)")
    try:
        parts.port  # noqa: B018 (urllib checks it when asked)
    except ValueError:
        raise ValueError("the port must be a number 0..65535") from None
