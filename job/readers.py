"""The staged dataset: what every stage after staging reads, behind one interface with two implementations,
chosen once by `create` (in the manner of timm's `timm/data/readers/` behind `create_reader`):

    Copied    every image a local file (objects downloaded, shards downloaded and extracted); training reads
              them through the image cache (job/dataset.py)
    Streamed  tar shards read from storage on every pass (job/stream.py); nothing kept on disk

Both are built by one pass over the data that also finds the samples' keys and labels (a sharded dataset's
are known only once its shards are read) and, given `checks`, the images the job cannot train on. Both end
alike: the validation split carved (seeded), bad images out, empty splits absent, a class left with no
training image refused.

Keys name images: a path relative to `data.uri`, a full URI (a manifest's object outside `data.uri`), or
`<split>/shard-NNNNNN.tar:<member>` (a sample of a shard). TensorFlow is imported only where images are
decoded, so the readers' listing and `samples` run without it (the property tests use them so).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from job import layout, logs, shards, storage
from job.errors import DataError, StorageError
from job.files import write_text
from job.sources import Source, warn_ignored

log = logs.get()
Share = tuple[int, int]  # (this worker's index, number of workers): the part of a split it reads
# The extraction record's layout; older records are extracted again (4: members named with their extension's case,
# `x.JPG`, where 3 wrote `x.jpg`)
EXTRACTED_FORMAT = 4


@dataclass(frozen=True)
class Checks:
    """Which images cannot be trained on: {name: why} for local files and for images in memory."""

    local_files: Callable[[list[str]], dict[str, str]]  # paths -> {path: why}
    encoded: Callable[[list[tuple[str, bytes]]], dict[str, str]]  # (key, encoded image) -> {key: why}


class Reader:
    """A staged dataset. `layout`: the images by split and class, as training sees them; `bad`: {key: why}
    of the images left out."""

    mode = ""

    def __init__(self, listed: layout.Layout | layout.MultiLayout, bad: dict[str, str], where: str,
                 image_size: tuple[int, int]):
        self.layout, self.bad, self.where, self.image_size = listed, dict(sorted(bad.items())), where, image_size
        self.digests: dict[str, bytes] = {}  # key -> SHA-256 of its bytes (layout.identical), until staging ends

    @property
    def multi(self) -> bool:
        return self.layout.multi_label

    def settle(self, validation_split: float, seed: int) -> Reader:
        """Leave the bad images out, carve the validation split from what is left, drop empty splits (once,
        after staging)."""
        self.layout = settled(self.layout, set(self.bad), self.where, validation_split, seed)
        return self

    def targets(self, labels: list):
        """Labels as training reads them: int32 [n] class indices, or multi-label float32 [n, labels] 0/1."""
        import numpy as np

        if not self.multi:
            return np.asarray(labels, np.int32).reshape(-1)
        out = np.zeros((len(labels), len(self.layout.classes)), np.float32)
        for row, indices in enumerate(labels):
            out[row, list(indices)] = 1.0
        return out

    def count(self, split: str) -> int:
        return self.layout.count(split)

    def items(self, split: str, share: Share | None = None) -> tuple[list[str], list[int]]:
        """(keys, labels) of a split, or of this worker's share of it (training)."""
        keys, labels = self.layout.items(split)
        if share is None:
            return keys, labels
        return self._share(split, keys, labels, share)

    def _share(self, split, keys, labels, share: Share):
        index, workers = share
        return keys[index::workers], labels[index::workers]

    def pick(self, split: str, limit: int) -> list[str]:
        """Up to `limit` keys of a split, its classes in turn (int8 calibration): no class is left out."""
        return self.layout.pick(split, limit)

    # What each implementation provides.
    def samples(self, split: str) -> Iterator[tuple[str, bytes, int]]:
        """(key, encoded image, label) of every image of a split, in key order (no TensorFlow)."""
        raise NotImplementedError

    def images(self, split: str, batch: int, *, shuffle: bool = False, seed: int = 0, repeat: bool = False,
               share: Share | None = None, start: int = 0):
        """(image float32 0..255, label) batches of a split, or of this worker's share of it; from example `start`
        of the (repeated) stream on (copied: exactly; streamed: a new seeded order instead)."""
        raise NotImplementedError

    def identity(self, split: str, share: Share | None = None) -> list:
        """What identifies a split's images and their labels (the feature cache's key)."""
        raise NotImplementedError

    def pixels(self, split: str, keys: list[str] | None = None):
        """(uint8 [n, h, w, 3], labels) of a split, or of only `keys` of it (the others are not decoded)."""
        raise NotImplementedError


class Copied(Reader):
    mode = "copy"

    def __init__(self, listed, bad, where, image_size, local: dict[str, Path], cache: Path):
        super().__init__(listed, bad, where, image_size)
        self.local, self.cache = local, cache

    def samples(self, split):
        for key, label in sorted(zip(*self.items(split))):
            yield key, self.local[key].read_bytes(), label

    def _paths(self, keys: list[str]) -> list[str]:
        return [str(self.local[k]) for k in keys]

    def images(self, split, batch, *, shuffle=False, seed=0, repeat=False, share=None, start=0):
        from job import dataset

        keys, labels = self.items(split, share)
        return dataset.image_dataset(self._paths(keys), self.targets(labels), self.image_size, batch, shuffle=shuffle,
                                     seed=seed, repeat=repeat, cache_dir=self.cache, start=start)

    def identity(self, split, share=None):
        # size and modification time, as the image cache's name has them: an image rewritten at the same size (in
        # storage, then staged again) met the features of its old bytes after a resume
        keys, labels = self.items(split, share)
        return [[p, (st := Path(p).stat()).st_size, st.st_mtime_ns, y] for p, y in zip(self._paths(keys), labels)]

    def pixels(self, split, keys=None):
        from job import dataset

        all_keys, labels = self.items(split)
        if keys is None:  # the whole split: through the image cache, as training reads it
            return dataset.pixels(self._paths(all_keys), self.image_size, self.cache), self.targets(labels)
        label_of = dict(zip(all_keys, labels))
        return (dataset.pixels(self._paths(keys), self.image_size, None),
                self.targets([label_of[k] for k in keys]))


def settled(listed, bad: set[str], where: str, validation_split: float, seed: int):
    """The layout without the bad images, the validation split carved from what is left, empty splits dropped;
    DataError for a class left without training images (`validate` with the images it knows to be bad, as `train`
    after staging: it showed such a class with 0 and said ok)."""
    kept = listed.without(bad)
    before, after = listed.counts(), kept.counts()
    # A class left without training images cannot be learned. One left without validation or test images is what
    # an empty folder there is: a warning that those scores do not measure it (pipeline.unmeasured); it was exit 3
    # when its images were bad and a warning when its folder was empty.
    emptied = [c for c, n in after.get("train", {}).items() if not n and before["train"][c]]
    if emptied:
        raise DataError(f"{where}/train/: no usable images left in {', '.join(emptied)}")
    kept.require_training_images(where)
    return kept.carve(validation_split, seed).nonempty()


class Streamed(Reader):
    mode = "stream"

    def __init__(self, listed, bad, where, image_size, store: storage.Store, versions: dict[str, storage.Entry],
                 keep: Path | None = None):
        super().__init__(listed, bad, where, image_size)
        self.store, self.versions = store, versions  # shard -> its listing (size, ETag)
        self.keep = keep  # where decoded shards are kept after their first read (job/stream.py), or None

    def shards(self, split: str, share: Share | None = None) -> list[str]:
        """The shards holding a split's images (this worker's part of them with `share`: shards balanced by
        their images, `balanced`)."""
        held = Counter(shard_of(k) for k in self.layout.items(split)[0])
        return sorted(held) if share is None else balanced(held, share[1])[share[0]]

    def _share(self, split, keys, labels, share):
        mine = set(self.shards(split, share))
        picked = [(k, y) for k, y in zip(keys, labels) if shard_of(k) in mine]
        return [k for k, _ in picked], [y for _, y in picked]

    def samples(self, split):
        keys = set(self.items(split)[0])
        yield from sorted(read_shards(self.store, self.shards(split), self.layout.classes, keys, multi=self.multi,
                                      versions=self.versions))

    def images(self, split, batch, *, shuffle=False, seed=0, repeat=False, share=None, start=0):
        from job import stream

        # Shards are read in a seeded order through a shuffle buffer: skipping to `start` would read the shards
        # again, so a resumed streamed phase reads on in an order of its own (a seed moved by where it stopped).
        seed += start
        keys = set(self.items(split, share)[0])
        return stream.dataset(self.store, self.shards(split, share), self.layout.classes, keys, self.image_size,
                              batch, shuffle=shuffle, seed=seed, repeat=repeat, multi=self.multi, keep=self.keep,
                              versions=self.versions)

    def identity(self, split, share=None):
        keys, labels = self.items(split, share)
        return [[rel, self.versions[rel].etag] for rel in self.shards(split, share)] + sorted(zip(keys, labels))

    def pixels(self, split, keys=None):
        from job import stream

        wanted = set(self.items(split)[0] if keys is None else keys)
        rels = sorted({shard_of(k) for k in wanted})
        return stream.pixels(self.store, rels, self.layout.classes, wanted, self.image_size, multi=self.multi,
                             versions=self.versions, spill=self.keep)


def balanced(images: dict[str, int], workers: int) -> list[list[str]]:
    """Whole shards to `workers` workers, their images as even as whole shards allow: the largest shard first, each
    to the worker with the fewest images so far (every worker runs the same steps, so a worker with fewer images
    repeats them more often: every third shard to a worker had given one 7 images and another 233)."""
    shares: list[list[str]] = [[] for _ in range(workers)]
    held = [0] * workers
    for rel in sorted(images, key=lambda r: (-images[r], r)):
        worker = min(range(workers), key=lambda w: (held[w], w))
        shares[worker].append(rel)
        held[worker] += images[rel]
    return [sorted(share) for share in shares]


def image_uri(data_uri: str, key: str) -> str:
    """Where an image key is for the user: a URI (a shard's sample: `<shard URI>:<member>`)."""
    return key if "://" in key else storage.join(data_uri, key)


def shard_of(key: str) -> str:
    """`train/shard-000001.tar:cat/0001.jpg` -> `train/shard-000001.tar`."""
    return key.split(":", 1)[0]


def read_shards(store: storage.Store, rels: list[str], classes: list[str], allowed: set[str] | None = None,
                ignored: list[str] | None = None, multi: bool = False,
                versions: dict[str, storage.Entry] | None = None) -> Iterator[tuple[str, bytes, int | tuple]]:
    """(key, encoded image, label) of the shards `rels`, in order, read as streams (no TensorFlow); `multi`:
    each label a tuple of indices; `versions`: the shards' listings, each read checked against its own."""
    for rel in rels:
        body = store.open_stream(rel, (versions or {}).get(rel))
        try:
            for sample in shards.samples(body, f"{store.uri}/{rel}", classes, ignored, multi):
                key = f"{rel}:{sample.key}{sample.ext}"
                if allowed is None or key in allowed:
                    yield key, sample.image, sample.label
        finally:
            body.close()


# ---------------------------------------------------------------- staging: one pass over the data


@dataclass(frozen=True)
class Staging:
    """Where staging writes (copies under `cache_dir`, a copied dataset's decoded images under `image_cache`),
    what it checks (`checks`: None, nothing is decoded) and what it reports to."""

    cache_dir: Path
    image_cache: Path
    image_size: tuple[int, int]
    checks: Checks | None = None
    progress: Callable[[int], None] = lambda n: None  # one call per object or shard staged
    stop: Callable[[], None] = lambda: None  # raises to end staging (SIGTERM)
    measure: Callable[[str], AbstractContextManager] = lambda stage: contextlib.nullcontext()  # timings


def create(source: Source, mode: str, how: Staging) -> Reader:
    """Stage the dataset as `mode` (copy | stream) in one pass: the reader, with the bad images found (given
    checks) but not yet settled (`Reader.settle`)."""
    if mode == "stream":
        with how.measure("shard_survey"):
            return _stream(source, how)
    with how.measure("download"):
        if source.kind == "shards":
            local, listed, stats = _copy_shards(source, Path(how.cache_dir), how.progress, how.stop)
        else:
            local, stats = _copy_objects(source, Path(how.cache_dir), how.progress, how.stop)
            listed = source.layout
    log.info("dataset staged", kind=source.kind, mode="copy", images=len(local), **stats)
    how.stop()
    with how.measure("bad_image_check"), ThreadPoolExecutor(8) as pool:
        keys = sorted(local)
        found = how.checks.local_files([str(local[k]) for k in keys]) if how.checks else {}
        key_of = {str(local[k]): k for k in keys}
        bad = {key_of[p]: reason for p, reason in found.items()}
        good = [k for k in keys if k not in bad]
        digests = {k: d for k, d in zip(good, pool.map(lambda k: _file_digest(local[k]), good)) if d}
    copied = Copied(listed, bad, source.uri, how.image_size, local, Path(how.image_cache))
    copied.digests = digests
    return copied


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()  # 32 bytes an image, held until staging is checked


def _file_digest(path: Path) -> bytes:
    """The digest of a local file, or b"" when it cannot be read (the checks name it as a bad image)."""
    try:
        return _digest(path.read_bytes())
    except OSError:
        return b""


def _copy_objects(source: Source, cache_dir: Path, progress, stop) -> tuple[dict[str, Path], dict[str, int]]:
    by_store: dict[int, tuple[storage.Store, list[str]]] = {}
    for key, (store, _) in source.entries.items():
        by_store.setdefault(id(store), (store, []))[1].append(key)
    local, stats = {}, {"downloaded": 0, "reused": 0, "read_in_place": 0, "bytes": 0}
    for store, keys in by_store.values():
        root, got = storage.stage(store, [source.entries[k][1] for k in keys], cache_dir, progress, stop)
        for key in keys:
            local[key] = storage.staged(root, source.entries[key][1].rel)
        stats = {k: stats[k] + got.get(k, 0) for k in stats}  # a local folder is read in place: nothing "reused"
    return local, stats


def _copy_shards(source: Source, cache_dir: Path, progress, stop):
    """Download the shards (parallel ranged GETs) and extract their samples under the cache, also for a local
    store (read in place): the user's folder stays as it is."""
    entries = [e for es in source.shard_entries.values() for e in es]
    root, stats = storage.stage(source.store, entries, cache_dir, None, stop)
    extracted = cache_dir / "extracted" / hashlib.sha256(source.uri.encode()).hexdigest()[:16]
    found: dict[str, list] = {}
    local: dict[str, Path] = {}
    classes, multi = source.layout.classes, source.layout.multi_label
    ignored: list[str] = []
    for split, shard_list in source.shard_entries.items():
        pairs, seen = found.setdefault(split, []), shards.SplitKeys(split)
        for entry in shard_list:
            where = f"{source.uri}/{entry.rel}"
            folder = storage.staged(extracted, entry.rel)
            record = _extract(storage.staged(root, entry.rel), folder, entry.etag, where, classes, multi)
            shards.check_count(where, len(record["samples"]), source.shard_counts.get(entry.rel))
            for name, label in record["samples"]:
                seen.add(shards.member_key(name, where)[0], f"{where}:{name}")
                key = f"{entry.rel}:{name}"
                local[key] = storage.staged(folder, name)
                pairs.append((key, tuple(label) if multi else label))
            ignored += record["ignored"]
            progress(1)
            stop()
    _warn_ignored(ignored)
    return local, layout.build(classes, found, multi), stats


def _extract(shard: Path, folder: Path, etag: str, where: str, classes: list[str], multi: bool) -> dict:
    """{"samples": [(member name, label)], "ignored": [...]} of a downloaded shard, its images extracted
    into `folder` (under their own paths) once per ETag, class list and task (labels are indices into it).

    Extracted beside it and renamed into place whole: runs that shared data.cache_dir and extracted one shard at once
    deleted each other's files (exit 1 "File exists", or images counted bad that another run had just deleted)."""
    found = _extracted(folder, etag, classes, multi)
    if found:
        return found
    unique = uuid.uuid4().hex  # (pods sharing a ReadWriteMany cache may share process and thread ids)
    part = folder.with_name(f".{folder.name[:40]}.{unique}.part")  # (a name of 225 to 255 bytes has no room more)
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    try:
        record = {"etag": etag, **_extract_into(shard, part, where, classes, multi)}
        write_text(part / ".complete.json", json.dumps(record))
        for _ in range(3):
            try:
                os.rename(part, folder)  # refused where the folder is there and not empty
                return record
            except OSError:
                found = _extracted(folder, etag, classes, multi)
                if found:  # another run extracted the same shard meanwhile: its files, which it reads
                    return found
                stale = folder.with_name(f".{folder.name[:40]}.{unique}.stale")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(folder, stale)  # another ETag's, or an extraction cut short
                shutil.rmtree(stale, ignore_errors=True)
        raise StorageError(f"{where}: could not put its extracted images in place at {folder}")
    finally:
        shutil.rmtree(part, ignore_errors=True)


def _extracted(folder: Path, etag: str, classes: list[str], multi: bool) -> dict | None:
    """The record of `folder` when it holds this ETag's extraction for this class list and task, else None."""
    try:
        record = json.loads((folder / ".complete.json").read_text(encoding="utf-8"))
        same = (record["etag"], record.get("format"), record.get("classes"), record.get("multi")) == \
            (etag, EXTRACTED_FORMAT, classes, multi)
        if same and all(storage.staged(folder, name).is_file() for name, _ in record["samples"]):
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _extract_into(shard: Path, folder: Path, where: str, classes: list[str], multi: bool) -> dict:
    """Extract a shard's images into `folder`; its record but for the ETag."""
    samples, ignored = [], []
    with open(shard, "rb") as f:
        for sample in shards.samples(f, where, classes, ignored, multi):
            name = f"{sample.key}{sample.ext}"
            path = storage.staged(folder, name)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(sample.image)
            except (FileExistsError, NotADirectoryError, IsADirectoryError):
                raise DataError(f"{where}: member {name} collides with another member's path (a file and a "
                                "folder of the same name)") from None
            samples.append((name, sample.label))
    return {"format": EXTRACTED_FORMAT, "classes": classes, "multi": multi, "samples": samples, "ignored": ignored}


def _stream(source: Source, how: Staging) -> Streamed:
    """One pass over every shard for the samples' keys and labels (and the bad images); nothing kept."""
    classes, multi = source.layout.classes, source.layout.multi_label
    found: dict[str, list] = {}
    bad: dict[str, str] = {}
    digests: dict[str, bytes] = {}
    ignored: list[str] = []
    for split, entries in source.shard_entries.items():
        pairs, seen = found.setdefault(split, []), shards.SplitKeys(split)
        for entry in entries:
            chunk = []
            for key, image, label in read_shards(source.store, [entry.rel], classes, ignored=ignored, multi=multi,
                                                 versions={entry.rel: entry}):
                seen.add(shards.member_key(key.split(":", 1)[1], key)[0], f"{source.uri}/{key}")
                pairs.append((key, label))
                chunk.append((key, image))
                digests[key] = _digest(image)
            shards.check_count(f"{source.uri}/{entry.rel}", len(chunk), source.shard_counts.get(entry.rel))
            if how.checks:
                bad |= how.checks.encoded(chunk)
            how.progress(1)
            how.stop()
    _warn_ignored(ignored)
    versions = {e.rel: e for es in source.shard_entries.values() for e in es}
    listed = layout.build(classes, found, multi)
    total = sum(listed.count(split) for split in listed.splits)
    streamed = Streamed(listed, bad, source.uri, how.image_size, source.store, versions, _keep(how, total))
    streamed.digests = digests
    return streamed


def _keep(how: Staging, images: int) -> Path | None:
    """Where streamed shards are kept decoded (h x w x 3 bytes per image, beside copy mode's image cache), when
    the disk has room for them with margin; else None (decoded every epoch)."""
    folder = Path(how.image_cache) / "streamed"
    need = int(images * how.image_size[0] * how.image_size[1] * 3 * 1.2)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need > free // 2:
        log.warning("streamed shards not kept decoded: not enough free disk, decoding every epoch",
                    folder=str(folder), needed_bytes=need, free_bytes=free)
        return None
    return folder


def _warn_ignored(ignored: list[str]) -> None:
    warn_ignored(ignored, "shard members ignored (they belong to no sample: no image among them)")
