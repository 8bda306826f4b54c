"""Where bytes come from and go to: S3-compatible storage through one boto3 client, or a local folder.

TensorFlow has no s3:// filesystem, so datasets are staged to local disk with parallel GETs and
tf.data reads local files. Botocore's standard retry mode handles transient 5xx, throttling and
connection resets; every failed attempt is counted in finetune_job_s3_errors_total (an expected
absence or a conditional write refused as designed is an answer, not a failure).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from pathlib import Path

from job import logs, metrics
from job.errors import ConfigError, DataError, NotFound, StorageError
from job.files import atomic_path, write_text
from job.layout import IMAGE_EXTENSIONS
from job.uris import expanded, is_s3, masked, s3_form, split_s3

DOWNLOAD_THREADS = 32
RANGED_MIN = 16 * 2**20  # objects this large (tar shards) are fetched with parallel ranged GETs
RANGED_CHUNK = 8 * 2**20
STREAM_ATTEMPTS = 5
INDEX_NAME = ".finetune-job-staged.json"
NAME_MAX = 255  # bytes of one file or folder name on Linux file systems; a part of an S3 key may have 1,024
log = logs.get()
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


@dataclass(frozen=True)
class Entry:
    """One object below a store's root: path relative to the root, size, and ETag (or mtime locally)."""

    rel: str
    size: int
    etag: str


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def endpoint_url(configured: str = "") -> str:
    """The S3 endpoint in effect: the config's, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else AWS."""
    return configured or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


_clients: dict[str, object] = {}
_clients_lock = threading.Lock()


# Replies that answer the question asked rather than fail it: an absent object (404), an unchanged one
# (304), a conditional write whose condition does not hold (412; 409 where a concurrent one won).
_ANSWERS = {304, 404, 412}


def is_failed_attempt(status: int | None, caught_exception: object, operation: str) -> bool:
    """Whether one request attempt failed: no reply at all, or an error status that is not an answer."""
    if caught_exception is not None:
        return True
    if status is None or status < 400 or status in _ANSWERS:
        return False
    return not (status == 409 and operation == "PutObject")


def _count_failed_attempt(attempts=None, response=None, caught_exception=None, operation=None, **_):
    """needs-retry hook: runs after every attempt; counts the ones that failed."""
    status = response[0].status_code if response else None
    name = getattr(operation, "name", "unknown")
    if is_failed_attempt(status, caught_exception, name):
        metrics.s3_error(name)


def client(endpoint: str = ""):
    """One boto3 S3 client per endpoint, shared by all threads (boto3 clients are thread-safe)."""
    import boto3
    from botocore.config import Config as BotoConfig

    url = endpoint_url(endpoint)
    with _clients_lock:
        if url not in _clients:
            cfg = BotoConfig(
                retries={"mode": "standard", "max_attempts": 5},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=DOWNLOAD_THREADS + 8,
                # Custom endpoints (MinIO, Ceph, moto) want path-style addressing.
                s3={"addressing_style": "path"} if url else {},
            )
            try:
                c = boto3.session.Session().client("s3", endpoint_url=url or None, config=cfg)
            except ValueError as e:  # AWS_ENDPOINT_URL=127.0.0.1:9000 (no scheme): exit 1, "unexpected"
                shown, why = masked(repr(url)), masked(str(e))
                raise ConfigError(f"config: S3 endpoint {shown} (s3.endpoint_url or AWS_ENDPOINT_URL): {why}; write it "
                                  f"as a URL, http://host:port") from None
            c.meta.events.register("needs-retry.s3", _count_failed_attempt)
            _clients[url] = c
        return _clients[url]


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn botocore failures into one-line StorageErrors that say what was being done."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except StorageError:
        raise
    except NoCredentialsError:
        raise StorageError(f"{what}: no S3 credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                           "a profile, or an IAM role)") from None
    except ClientError as e:
        raise _client_error(what, e) from None
    except S3UploadFailedError as e:  # the transfer manager wraps the ClientError that caused it
        cause = e.__context__
        raise (_client_error(what, cause) if isinstance(cause, ClientError) else StorageError(f"{what}: {e}")) from None
    except BotoCoreError as e:  # its text quotes the endpoint's URL: user:password@ there is masked
        raise StorageError(f"{what}: storage unreachable ({masked(str(e))})") from None
    except FileNotFoundError as e:
        raise NotFound(f"{what}: {e.strerror or e}") from None
    except OSError as e:
        raise StorageError(f"{what}: {e.strerror or e}") from None


def _backoff(attempt: int, scale: float = 1.0) -> None:
    """The wait before retrying a read the job retries itself: full jitter, doubling, at most 20 s."""
    time.sleep(min(20.0, random.uniform(0, 2**attempt) * scale))


def _same_version(uri: str, reply: dict, size: int, etag: str, again: bool = False) -> None:
    """StorageError when a GET's or HEAD's reply is of another size than the listing's (the object was rewritten
    after it); a warning when only its ETag differs. `again` (a streamed shard, read every epoch): each later read
    must have the ETag of the first in this process, else a StorageError (a rewrite at the same size, which tar's
    padding makes the rule, was a warning, and the run trained on both versions)."""
    if not etag:
        return
    got, tag = reply.get("ContentLength"), str(reply.get("ETag", "")).strip('"')
    if size and got is not None and got != size:
        raise StorageError(f"{uri}: rewritten after the dataset was listed ({got} bytes, listed {size}); run again "
                           "once the dataset stops changing: the rerun lists it anew")
    if again and _first_read.setdefault((uri, etag), tag) != tag:  # per listing: a rerun in this process lists anew
        raise StorageError(f"{uri}: rewritten during the run (the same size, another version than its first read); "
                           "run again once the dataset stops changing: the rerun lists it anew")
    if tag not in ("", etag) and uri not in _warned_versions:
        _warned_versions.add(uri)  # once: a streamed shard is read every epoch
        if is_s3(uri):
            log.warning("an object's ETag on download is not its listing's: rewritten at the same size, or the "
                        "store gives GETs other ETags than listings (encrypted objects)", uri=uri)
        else:
            log.warning("a file's modification time is not its listing's: rewritten at the same size since the "
                        "dataset was listed", path=uri)


_warned_versions: set[str] = set()
_first_read: dict[tuple[str, str], str] = {}  # (shard, listed ETag) -> the ETag (local: mtime) at its first read


class _KnownVersion:
    """A transfer-manager subscriber that hands it the size and ETag a HEAD found, so it makes no HEAD of its own
    and conditions every ranged GET on that version; it also counts the bytes in `finetune_job_s3_bytes_*`."""

    def __init__(self, size: int, etag: str | None):
        self.size, self.etag = size, etag

    def on_queued(self, future, **_) -> None:
        future.meta.provide_transfer_size(self.size)
        future.meta.provide_object_etag(self.etag)

    def on_progress(self, future, bytes_transferred: int, **_) -> None:
        metrics.s3_bytes_downloaded(bytes_transferred)


def _client_error(what: str, e) -> StorageError:
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in _DENIED or status == 403:
        return StorageError(f"{what}: access denied ({code or status})")
    if code == "NoSuchBucket":
        return StorageError(f"{what}: bucket does not exist")
    if code in _MISSING or status == 404:
        return NotFound(f"{what}: {code or status}: {e.response.get('Error', {}).get('Message', e)}")
    return StorageError(f"{what}: {code or status}: {e.response.get('Error', {}).get('Message', e)}")


class S3Store:
    """Objects below s3://bucket/prefix/."""

    def __init__(self, uri: str, endpoint: str = ""):
        self.uri = uri.rstrip("/")
        self.bucket, self.prefix = split_s3(uri)
        self.client = client(endpoint)
        if not self.bucket:
            raise StorageError(f"{uri}: no bucket in the URI (expected s3://bucket/prefix)")

    def _key(self, rel: str) -> str:
        return "/".join(p for p in (self.prefix, rel.strip("/")) if p)

    def list(self, sub: str = "") -> list[Entry]:
        base = self._key(sub)
        base = base + "/" if base else ""
        root = self.prefix + "/" if self.prefix else ""
        out = []
        with storage_errors(f"listing {join(self.uri, sub)}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    out.append(Entry(obj["Key"][len(root):], obj["Size"], obj["ETag"].strip('"')))
        return out

    def holds_any(self, sub: str) -> bool:
        """Whether any object lies below `sub/` (one request, one key: a prefix of millions is not listed)."""
        with storage_errors(f"listing {join(self.uri, sub)}"):
            reply = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(sub) + "/", MaxKeys=1)
        return bool(reply.get("KeyCount") or reply.get("Contents"))

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        with storage_errors(f"checking {join(self.uri, rel)}"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise

    def download(self, rel: str, dest: Path, size: int = 0, etag: str = "") -> int:
        """Atomic download to dest (a temporary name, then rename); returns the bytes written. With `etag` and
        `size` (the listing's), the reply is checked against them: an object rewritten since it was listed, to
        another size, is a StorageError saying so (staging recorded the listed version and trained on the new one);
        one whose reply has another ETag at the listed size is a warning (a store may give GETs other ETags than
        listings, encrypted objects on MinIO; no condition is sent, which some stores mishandle).

        Objects of RANGED_MIN bytes and more (tar shards) go through boto3's transfer manager: parallel
        ranged GETs, each retried on its own. Smaller ones are one GET: botocore retries failed requests,
        and a connection dropped while the body streams is retried here, with the same backoff, since
        botocore has already handed the response over.
        """
        from botocore.exceptions import ReadTimeoutError, ResponseStreamingError

        if size >= RANGED_MIN:
            return self._download_ranged(rel, dest, size, etag)

        with storage_errors(f"downloading {join(self.uri, rel)}"), atomic_path(dest) as tmp:
            for attempt in range(1, STREAM_ATTEMPTS + 1):
                reply = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))  # botocore retries
                _same_version(join(self.uri, rel), reply, size, etag)
                try:
                    with open(tmp, "wb") as f:
                        shutil.copyfileobj(reply["Body"], f, 1 << 20)
                    break
                except (ResponseStreamingError, ReadTimeoutError):
                    metrics.s3_error("GetObject")
                    if attempt == STREAM_ATTEMPTS:
                        raise
                    _backoff(attempt)
        size = dest.stat().st_size
        metrics.s3_bytes_downloaded(size)
        return size

    def _download_ranged(self, rel: str, dest: Path, size: int, etag: str) -> int:
        """The transfer manager's parallel ranged GETs, every one of them conditional (If-Match) on the version a
        HEAD found here, checked against the listing first: a rewrite after that HEAD fails the parts (412) where
        the manager's own HEAD took the new version and staged it as the listed one."""
        from boto3.s3.transfer import TransferConfig, create_transfer_manager
        from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError

        # the classic manager: the CRT one (awscrt installed, on some GPU instances) takes no known size or ETag
        config = TransferConfig(multipart_threshold=RANGED_MIN, multipart_chunksize=RANGED_CHUNK, max_concurrency=8,
                                preferred_transfer_client="classic")
        uri = join(self.uri, rel)
        with storage_errors(f"downloading {uri}"), atomic_path(dest) as tmp:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            _same_version(uri, head, size, etag)
            with create_transfer_manager(self.client, config) as manager:
                future = manager.download(self.bucket, self._key(rel), str(tmp),
                                          subscribers=[_KnownVersion(head["ContentLength"], head.get("ETag"))])
                try:
                    future.result()
                except S3DownloadFailedError:  # the manager's word for a part refused by its If-Match (412)
                    raise StorageError(f"{uri}: rewritten while it downloaded; run again once the dataset stops "
                                       "changing") from None
                except RetriesExceededError as e:  # a part failed every retry: what failed it, in one line
                    raise e.last_exception from None
        return dest.stat().st_size

    def upload(self, src: Path, rel: str) -> None:
        with storage_errors(f"uploading {join(self.uri, rel)}"):
            self.client.upload_file(str(src), self.bucket, self._key(rel), Callback=metrics.s3_bytes_uploaded)

    # ------------------------------------------------------------ conditional writes (job.lease)

    def put_new(self, rel: str, data: bytes) -> str | None:
        """Create `rel` only where it does not exist (If-None-Match: *): its ETag, or None if it exists."""
        return self._put_conditional(rel, data, IfNoneMatch="*")

    def replace(self, rel: str, data: bytes, etag: str) -> str | None:
        """Overwrite `rel` only while its ETag is still `etag` (If-Match): the new ETag, or None."""
        return self._put_conditional(rel, data, IfMatch=f'"{etag}"')

    def _put_conditional(self, rel: str, data: bytes, **condition) -> str | None:
        from botocore.exceptions import ClientError

        with storage_errors(f"writing {join(self.uri, rel)}"):
            try:
                reply = self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, **condition)
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status in (409, 412) or e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None  # the condition did not hold (or a concurrent conditional write won)
                if status == 501:
                    raise ConditionalWritesUnsupported(f"{self.uri}: no conditional writes") from None
                raise
        metrics.s3_bytes_uploaded(len(data))
        return reply["ETag"].strip('"')

    def stat(self, rel: str) -> tuple[str, float] | None:
        """(ETag, seconds since it was last written by the server's own clock), or None if absent."""
        from botocore.exceptions import ClientError

        with storage_errors(f"checking {join(self.uri, rel)}"):
            try:
                reply = self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        import datetime as dt
        import email.utils

        now = email.utils.parsedate_to_datetime(reply["ResponseMetadata"]["HTTPHeaders"]["date"])
        written = reply["LastModified"]
        now, written = (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc) for t in (now, written))
        return reply["ETag"].strip('"'), max(0.0, (now - written).total_seconds())

    def open_stream(self, rel: str, listed: Entry | None = None) -> _Resumable:
        """The object's body as a file-like stream (read as it arrives; job.stream); a connection lost in the
        middle is picked up where it stopped. With `listed` (its listing), the reply is checked against it as a
        download's is: a streamed run reads its shards every epoch, and a shard rewritten in the middle of the run
        mixed two versions of the dataset into one training."""
        return _Resumable(self.client, self.bucket, self._key(rel), join(self.uri, rel), listed)

    def read(self, rel: str, head: int = 0) -> bytes:
        """The object's bytes; its first `head` bytes only if given (a ranged GET)."""
        ranged = {"Range": f"bytes=0-{head - 1}"} if head else {}
        with storage_errors(f"reading {join(self.uri, rel)}"):
            data = self.client.get_object(Bucket=self.bucket, Key=self._key(rel), **ranged)["Body"].read()
        metrics.s3_bytes_downloaded(len(data))
        return data

    def delete(self, rels: list[str]) -> None:
        """StorageError where a key is not deleted: DeleteObjects answers 200 and lists each refused key under
        `Errors` (a policy without s3:DeleteObject). Thrown away, the lease stayed for each next attempt to wait
        out, `output.overwrite` deleted nothing and said it had, and `checkpoint.keep: 1` kept four."""
        with storage_errors(f"deleting below {self.uri}"):
            for i in range(0, len(rels), 1000):
                batch = [{"Key": self._key(k)} for k in rels[i : i + 1000]]
                reply = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                refused = reply.get("Errors") or []
                if refused:
                    code = str(refused[0].get("Code", ""))
                    why = f"access denied ({code})" if code in _DENIED else f"{code}: {refused[0].get('Message', '')}"
                    raise StorageError(f"deleting s3://{self.bucket}/{refused[0].get('Key', '')}: {why} "
                                       f"({len(refused)} of {len(batch)} keys not deleted)")

    def delete_all(self) -> None:
        self.delete([e.rel for e in self.list()])


INDEX_SAVE_SECONDS = 30.0  # the staging index is saved this often while files come in, and when staging ends
CLOCK_PROBE = ".finetune-job-clock-"  # `_file_system_now`'s file, there for a moment: never listed


def _file_system_now(folder: Path) -> float:
    """The time by the clock that stamps files in `folder`: the modification time of a byte written there now. On a
    shared volume (NFS, EFS) the file server stamps them, and a pod's clock minutes ahead of it took a live holder's
    lease at once (or, minutes behind, waited out a dead one's for as long). A file with no name where the file system
    makes one (O_TMPFILE: nothing to list, nothing left by a kill), else a named one, never listed; this machine's
    clock, said once, where nothing can be written there."""
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600)
    except (AttributeError, OSError):  # (not Linux; NFS has no O_TMPFILE)
        fd = None
    if fd is not None:
        try:
            os.write(fd, b"0")
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
    probe = folder / f"{CLOCK_PROBE}{uuid.uuid4().hex}"
    try:
        with open(probe, "wb") as f:
            f.write(b"0")
        return probe.stat().st_mtime  # (after the close: a network file system's own stamp, not a cached one)
    except OSError as e:
        if not _clock_fallback_said:
            _clock_fallback_said.append(True)
            log.warning("lease ages by this machine's clock: nothing can be written beside the lease to read the file "
                        "system's", folder=str(folder), reason=e.strerror or str(e))
        return time.time()
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


_clock_fallback_said: list[bool] = []


def _version(st: os.stat_result) -> str:
    """A local file's version, as an ETag is an object's: its modification time in nanoseconds."""
    return str(st.st_mtime_ns)


class LocalStore:
    """Files below a local folder; same interface as S3Store."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/") or "/"
        try:
            self.root = expanded(uri)
        except ValueError as e:  # `--from ~nosuchuser/runs`: exit 1 with a traceback
            raise ConfigError(f"{uri}: {e}") from None

    def list(self, sub: str = "") -> list[Entry]:
        base = self.root / sub
        out = []
        with storage_errors(f"listing {base}"):
            if not base.is_dir():
                return []
            # Symlinked folders are followed (a class folder linked from elsewhere is a class), except one that
            # leads back to a folder it is in (a loop): each folder's (device, inode) and those above it.
            above: dict[str, frozenset] = {}
            for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
                st = os.stat(dirpath)
                chain = above.get(os.path.dirname(dirpath), frozenset())
                if (st.st_dev, st.st_ino) in chain:
                    dirnames.clear()
                    continue
                above[dirpath] = chain | {(st.st_dev, st.st_ino)}
                dirnames.sort()
                for name in sorted(filenames):
                    if not name.startswith(CLOCK_PROBE):
                        out.append(self._entry(Path(dirpath, name)))
        return out

    def _entry(self, p: Path) -> Entry:
        rel = p.relative_to(self.root).as_posix()
        try:
            st = p.stat()
        except OSError:
            if not rel.lower().endswith(IMAGE_EXTENSIONS):  # a linked class or split folder that is not there
                target = f" (to {os.readlink(p)})" if p.is_symlink() else ""
                raise DataError(f"{p}: a broken link{target}; is a volume not mounted?") from None
            return Entry(rel, 0, "")  # a broken link to an image: left out as an image that cannot be read
        return Entry(rel, st.st_size, _version(st))

    def empty_folders(self) -> list[str]:
        """`<rel>/` of every folder with nothing in it: what an S3 listing shows as a folder marker."""
        with storage_errors(f"listing {self.root}"):
            return sorted(f"{p.relative_to(self.root).as_posix()}/" for p in self.root.rglob("*")
                          if p.is_dir() and not any(p.iterdir()))

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def download(self, rel: str, dest: Path, size: int = 0, etag: str = "") -> int:  # (no versions here)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with storage_errors(f"copying {self.root / rel}"):
            shutil.copyfile(self.root / rel, dest)
        return dest.stat().st_size

    def upload(self, src: Path, rel: str) -> None:
        dest = self.root / rel
        with storage_errors(f"writing {dest}"), atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)

    def put_new(self, rel: str, data: bytes) -> str | None:
        path = self.root / rel
        with storage_errors(f"writing {path}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            except BaseException:  # a full disk left an empty lease, which the next attempt waited out as live
                path.unlink(missing_ok=True)
                raise
            return _version(path.stat())

    def replace(self, rel: str, data: bytes, etag: str) -> str | None:
        path = self.root / rel
        try:
            found = _version(path.stat())  # (its version only: no age, so no clock probe)
        except FileNotFoundError:
            return None
        if found != etag:
            return None
        with storage_errors(f"writing {path}"), atomic_path(path) as tmp:
            tmp.write_bytes(data)
        return _version(path.stat())

    def stat(self, rel: str) -> tuple[str, float] | None:
        """(version, seconds since it was written), the age by the file system's clock, as S3's is by the server's."""
        path = self.root / rel
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return _version(st), max(0.0, _file_system_now(path.parent) - st.st_mtime)

    def open_stream(self, rel: str, listed: Entry | None = None):
        """The file, checked against its listing when given (size, then modification time), as S3Store's."""
        with storage_errors(f"reading {self.root / rel}"):
            f = open(self.root / rel, "rb")  # noqa: SIM115 (the reader closes it)
            if listed is not None:
                st = os.fstat(f.fileno())
                try:
                    _same_version(str(self.root / rel), {"ContentLength": st.st_size, "ETag": _version(st)},
                                  listed.size, listed.etag, again=True)
                except StorageError:
                    f.close()
                    raise
            return f

    def read(self, rel: str, head: int = 0) -> bytes:
        with storage_errors(f"reading {self.root / rel}"), open(self.root / rel, "rb") as f:
            return f.read(head or -1)

    def delete(self, rels: list[str]) -> None:
        with storage_errors(f"deleting below {self.root}"):
            for rel in rels:
                (self.root / rel).unlink(missing_ok=True)

    def remove_emptied(self, rels: list[str]) -> None:
        """The folders below the root that deleting `rels` left empty, deepest first (a folder on S3 is gone with its
        last object): an overwrite with fewer formats left tf_serving/classifier/1/variables/ behind, empty, which a
        TF Serving watching it took for a broken version 1."""
        folders = {p for rel in rels for p in (self.root / rel).parents if self.root in p.parents}
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty, or gone
                folder.rmdir()

    def delete_all(self) -> None:
        with storage_errors(f"deleting {self.root}"):
            shutil.rmtree(self.root, ignore_errors=True)


class _Resumable:
    """An object's body read as it arrives, its bytes counted in finetune_job_s3_bytes_downloaded_total. A
    connection lost in the middle (botocore has already handed the response over, so it does not retry) is
    resumed with a ranged GET from the byte where it stopped, on the same version of the object (If-Match its
    ETag), STREAM_ATTEMPTS times in all with backoff; each loss counts in finetune_job_s3_errors_total."""

    def __init__(self, client, bucket: str, key: str, uri: str, listed: Entry | None = None):
        self.client, self.bucket, self.key, self.uri = client, bucket, key, uri
        self.offset, self.etag, self.losses = 0, "", 0
        self.body = self._get(listed)

    def _get(self, listed: Entry | None = None):
        ranged = {"Range": f"bytes={self.offset}-", "IfMatch": self.etag} if self.offset else {}
        with storage_errors(f"reading {self.uri}"):
            reply = self.client.get_object(Bucket=self.bucket, Key=self.key, **ranged)  # botocore retries
            if listed is not None:
                _same_version(self.uri, reply, listed.size, listed.etag, again=True)
        self.etag = self.etag or reply["ETag"]
        return reply["Body"]

    def read(self, size: int = -1) -> bytes:
        from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

        while True:
            try:
                data = self.body.read(size if size is not None and size >= 0 else None)
                break
            except (ResponseStreamingError, ReadTimeoutError, IncompleteReadError) as e:
                self._lost(e)
        self.offset += len(data)
        metrics.s3_bytes_downloaded(len(data))
        return data

    def _lost(self, e: Exception) -> None:
        self.losses += 1
        metrics.s3_error("GetObject")
        if self.losses >= STREAM_ATTEMPTS:
            raise StorageError(f"reading {self.uri}: connection lost {self.losses} times, last at byte "
                               f"{self.offset} ({type(e).__name__})") from None
        log.warning("object read interrupted; resuming with a ranged GET", uri=self.uri, at_byte=self.offset,
                    attempt=self.losses + 1)
        self.body.close()
        _backoff(self.losses, 0.25)
        self.body = self._get()

    def close(self) -> None:
        self.body.close()


Store = S3Store | LocalStore


class ConditionalWritesUnsupported(StorageError):
    """The storage rejects If-None-Match / If-Match writes (job.lease then warns and goes on)."""


def open_store(uri: str, endpoint: str = "") -> Store:
    try:  # `s3:/bucket/x` (one slash) was a local folder named `s3:`: `predict --model`, `pack --to`, `tensorboard`
        s3_form(uri)
    except ValueError as e:
        raise ConfigError(f"{masked(uri)}: {e}") from None
    if is_s3(uri):
        return S3Store(uri, endpoint)
    return LocalStore(uri)


def staged(root: Path, rel: str) -> Path:
    """Where an object (or a shard's member) `rel` lies once staged under `root`: at its own path, except that a
    part of it a local file system cannot hold as a name (over 255 bytes of UTF-8) becomes its first 100 bytes,
    `~`, a digest of the whole part and its extension; so does a part a path cannot hold (``, `.`, `..`). Distinct
    paths stay distinct."""
    if not rel:
        return root
    return root.joinpath(*(_short(p) if len(p.encode()) > NAME_MAX or p in ("", ".", "..") else p
                           for p in rel.split("/")))


def _short(part: str) -> str:
    ext = os.path.splitext(part)[1]
    ext = ext if len(ext.encode()) <= 16 else ""
    head = part.encode()[:100].decode("utf-8", "ignore")
    return f"{head}~{hashlib.sha256(part.encode()).hexdigest()[:32]}{ext}"


STOP_WAIT_SECONDS = 10  # how long a stop while staging waits for the downloads in flight


def stage(store: Store, entries: list[Entry], cache_dir: Path, progress: Callable[[int], None] | None = None,
          stop: Callable[[], None] | None = None) -> tuple[Path, dict[str, int]]:
    """Make `entries` available as local files and return the local root they live under.

    A local store is used in place. For S3, files go to <cache_dir>/<bucket>/<prefix>/ with parallel
    GETs; a file already staged with the same size and ETag is not downloaded again (an index next
    to the files remembers the ETags; it is saved every INDEX_SAVE_SECONDS and when staging ends
    or fails). `stop` is called after each file and may raise to end the staging (SIGTERM).
    """
    if isinstance(store, LocalStore):
        if progress:
            progress(len(entries))
        return store.root, {"downloaded": 0, "reused": 0, "read_in_place": len(entries), "bytes": 0}
    root = staged(Path(cache_dir) / store.bucket, store.prefix)
    root.mkdir(parents=True, exist_ok=True)
    index_path = root / INDEX_NAME
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    todo = []
    for e in entries:
        known = index.get(e.rel)
        local = staged(root, e.rel)
        if known == [e.size, e.etag] and local.is_file() and local.stat().st_size == e.size:
            continue
        todo.append(e)
    stats = {"downloaded": 0, "reused": len(entries) - len(todo), "bytes": 0}
    if progress and stats["reused"]:
        progress(stats["reused"])
    saved = [time.monotonic()]

    def save_index():
        write_text(index_path, json.dumps(index))
        saved[0] = time.monotonic()

    pool = ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="stage")
    ok = stopping = False
    futures: dict = {}
    try:
        futures = {pool.submit(store.download, e.rel, staged(root, e.rel), e.size, e.etag): e for e in todo}
        for fut in as_completed(futures):
            e = futures[fut]
            stats["bytes"] += fut.result()
            stats["downloaded"] += 1
            index[e.rel] = [e.size, e.etag]
            if progress:
                progress(1)
            if time.monotonic() - saved[0] >= INDEX_SAVE_SECONDS:  # (every 500 files rewrote it whole 600 times at
                save_index()  # 300,000 objects: minutes of CPU and gigabytes written, growing with the square)
            if stop:
                stopping = True
                stop()
                stopping = False
        ok = True
    finally:
        # One failure ends the staging now, not after every queued GET; a stop gives the GETs in flight a few
        # seconds (a SIGTERM's grace is short; a shard may take minutes) and keeps those that ended: the index had
        # only the files seen done (1 of 60 on disk), so the rerun fetched them again.
        pool.shutdown(wait=ok, cancel_futures=True)
        if stopping:  # (a cancelled future is never "done" to wait(): every stop waited the whole 10 s)
            wait_for([f for f in futures if not f.cancelled()], timeout=STOP_WAIT_SECONDS)
        for fut, e in futures.items():
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                index[e.rel] = [e.size, e.etag]
        save_index()
    return root, stats
