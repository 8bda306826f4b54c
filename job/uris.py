"""Storage locations compared without touching storage: an s3:// URI or a local path. Pure, standard library only
(the config imports it)."""

from __future__ import annotations

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
        inner, outer = (Path(u.removeprefix("file://")).expanduser().resolve().parts for u in (uri, folder))
    return list(inner[:len(outer)]) == list(outer)


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
        raise ValueError(f"bucket name {bucket!r}: letters, digits, '.', '-' and '_' only")
    return v
