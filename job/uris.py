"""Storage locations compared without touching storage: an s3:// URI or a local path. Pure, standard library only
(the config imports it)."""

from __future__ import annotations

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
