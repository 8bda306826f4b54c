"""Where the images come from, as users keep them: a folder per class, a manifest (CSV or JSON lines),
or tar shards. `open_source` reads what a listing can tell (no image is downloaded: `validate` uses
it); `stage` makes the images local files (`data.staging: copy`); with `stream`, shards are read from
storage every epoch instead (job/stream.py).

No TensorFlow here. Keys name images: a path relative to `data.uri`, a full URI (a manifest's object
outside `data.uri`), or `<split>/<key><ext>` (a sample of a shard).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from job import layout as layout_lib
from job import logs, manifest, shards, storage
from job.config import Config
from job.errors import DataError, StorageError
from job.files import write_text

log = logs.get()
MARGIN = 1.2  # copy only when the dataset and its image cache fit in the free space with this margin


@dataclass
class Source:
    kind: str  # folder | manifest | shards
    uri: str
    layout: layout_lib.Layout
    entries: dict[str, tuple[storage.Store, storage.Entry]] = field(default_factory=dict)  # key -> object
    shard_entries: dict[str, list[storage.Entry]] = field(default_factory=dict)  # split -> shards (kind shards)
    store: storage.Store | None = None  # data.uri

    def bytes(self) -> int:
        sizes = [e.size for _, e in self.entries.values()] + [e.size for es in self.shard_entries.values()
                                                              for e in es]
        return sum(sizes)

    def images(self) -> int:
        return sum(n for per in self.layout.counts().values() for n in per.values())


def open_source(cfg: Config) -> Source:
    """List the dataset (no image downloads) and check its layout; the validation split is carved later."""
    store = storage.open_store(cfg.data.uri, cfg.s3.endpoint_url)
    if cfg.data.manifest:
        return _manifest_source(cfg, store)
    listing = store.list()
    found = shards.shard_names(e.rel for e in listing)
    if found:
        return _shard_source(cfg, store, listing, found)
    layout = layout_lib.discover([e.rel for e in listing], cfg.data.uri.rstrip("/"))
    if layout.ignored:
        log.warning("objects ignored (not images in a class folder)", count=len(layout.ignored),
                    examples=layout.ignored[:5])
    wanted = {p for per in layout.files.values() for ps in per.values() for p in ps}
    return Source("folder", cfg.data.uri, layout, {e.rel: (store, e) for e in listing if e.rel in wanted},
                  store=store)


def _read(uri: str, endpoint: str) -> bytes:
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not storage.is_s3(uri) and not Path(uri).is_file():
        raise DataError(f"{uri}: no such file")
    try:
        return storage.open_store(parent or ".", endpoint).read(name)
    except StorageError as e:
        if "NoSuchKey" in str(e) or "404" in str(e):
            raise DataError(f"{uri}: no such object") from None
        raise


def _manifest_source(cfg: Config, store: storage.Store) -> Source:
    name = cfg.data.manifest
    rows = manifest.parse(_read(name, cfg.s3.endpoint_url), name)
    entries: dict[str, tuple[storage.Store, storage.Entry]] = {}
    root = cfg.data.uri.rstrip("/")
    for prefix in manifest.listing_prefixes(rows, cfg.data.uri):
        where = store if prefix == root else storage.open_store(prefix, cfg.s3.endpoint_url)
        for e in where.list():
            key = e.rel if where is store else f"{prefix}/{e.rel}"
            entries[key] = (where, e)
    layout = manifest.to_layout(rows, name, cfg.data.uri, set(entries))
    wanted = {p for per in layout.files.values() for ps in per.values() for p in ps}
    return Source("manifest", cfg.data.uri, layout, {k: v for k, v in entries.items() if k in wanted}, store=store)


def _shard_source(cfg: Config, store: storage.Store, listing: list[storage.Entry],
                  found: dict[str, list[str]]) -> Source:
    """Classes from classes.txt; counts from index.json (pack writes it) until the shards are read."""
    by_rel = {e.rel: e for e in listing}
    if shards.CLASSES not in by_rel:
        raise DataError(f"{cfg.data.uri}/{shards.CLASSES}: missing (the shards' class names, one per line)")
    classes = shards.parse_classes(store.read(shards.CLASSES).decode("utf-8", "replace"),
                                   f"{cfg.data.uri}/{shards.CLASSES}")
    if "train" not in found:
        raise DataError(f"{cfg.data.uri}: shards but no train/shard-NNNNNN.tar")
    counts = {}
    if shards.INDEX in by_rel:
        try:
            counts = json.loads(store.read(shards.INDEX))["counts"]
        except (ValueError, KeyError, TypeError):
            log.warning("index.json beside the shards is not readable; counts come from the shards",
                        file=f"{cfg.data.uri}/{shards.INDEX}")
    files = {s: {c: [""] * counts.get(s, {}).get(c, 0) for c in classes} for s in found}
    return Source("shards", cfg.data.uri, layout_lib.Layout(classes, files), store=store,
                  shard_entries={s: [by_rel[r] for r in rels] for s, rels in found.items()})


# ---------------------------------------------------------------- copy or stream


def staging_mode(source: Source, mode: str, cache_dir: Path, image_bytes: int) -> str:
    """`data.staging` resolved: copy when the dataset and the image cache fit the free disk (with margin),
    else stream when the data is sharded, else DataError naming the sizes."""
    if mode != "auto":
        if mode == "stream" and source.kind != "shards":
            raise DataError(f"data.staging: stream needs tar shards; {source.uri} is a {source.kind} dataset "
                            "(finetune-job pack turns it into shards)")
        return mode
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    need = int((source.bytes() + source.images() * image_bytes) * MARGIN)
    free = shutil.disk_usage(cache_dir).free
    if need <= free or isinstance(source.store, storage.LocalStore) and source.kind == "folder":
        return "copy"
    if source.kind == "shards":
        log.info("streaming: the dataset does not fit the cache disk", needed_bytes=need, free_bytes=free)
        return "stream"
    raise DataError(f"{source.uri}: {need / 1e9:.1f} GB needed to stage it and cache its images in "
                    f"{cache_dir}, {free / 1e9:.1f} GB free; give the job more disk, or pack the dataset into "
                    "shards (finetune-job pack) to stream it")


def stage(source: Source, cache_dir: Path, progress: Callable[[int], None],
          stop: Callable[[], None]) -> tuple[dict[str, Path], layout_lib.Layout, dict[str, int]]:
    """Local files of every image: ({key: path}, the layout, stats). Shards are downloaded (parallel
    ranged GETs) and their samples extracted; the layout of a sharded dataset comes from its samples."""
    if source.kind == "shards":
        return _stage_shards(source, cache_dir, progress, stop)
    by_store: dict[int, tuple[storage.Store, list[str]]] = {}
    for key, (store, _) in source.entries.items():
        by_store.setdefault(id(store), (store, []))[1].append(key)
    local, stats = {}, {"downloaded": 0, "reused": 0, "bytes": 0}
    for store, keys in by_store.values():
        root, got = storage.stage(store, [source.entries[k][1] for k in keys], cache_dir, progress, stop)
        for key in keys:
            local[key] = root / source.entries[key][1].rel
        stats = {k: stats[k] + got[k] for k in stats}
    return local, source.layout, stats


def _stage_shards(source: Source, cache_dir: Path, progress, stop):
    store = source.store
    entries = [e for es in source.shard_entries.values() for e in es]
    root, stats = storage.stage(store, entries, cache_dir, None, stop)
    # Extracted under the cache, also for a local store (read in place): the user's folder stays as it is.
    extracted = Path(cache_dir) / "extracted" / hashlib.sha256(source.uri.encode()).hexdigest()[:16]
    files: dict[str, dict[str, list[str]]] = {}
    local = {}
    classes = source.layout.classes
    for split, shard_list in source.shard_entries.items():
        per = files.setdefault(split, {c: [] for c in classes})
        for entry in shard_list:
            for name, label in _extract(root / entry.rel, extracted / entry.rel, entry.etag,
                                        f"{source.uri}/{entry.rel}", classes):
                key = f"{entry.rel}:{name}"
                local[key] = extracted / entry.rel / name
                per[classes[label]].append(key)
            progress(1)
            stop()
    layout = layout_lib.Layout(classes, {s: files[s] for s in layout_lib.SPLITS if s in files})
    return local, layout, stats


def _extract(shard: Path, folder: Path, etag: str, name: str, classes: list[str]) -> list[tuple[str, int]]:
    """[(image file name, label)] of a downloaded shard, its images extracted into `folder` once per ETag."""
    done = folder / ".complete.json"
    try:
        record = json.loads(done.read_text())
        if record["etag"] == etag:
            return [tuple(x) for x in record["samples"]]
    except (OSError, ValueError, KeyError):
        pass
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    samples = []
    with open(shard, "rb") as f:
        for sample in shards.samples(f, name, classes):
            (folder / f"{sample.key}{sample.ext}").write_bytes(sample.image)
            samples.append((f"{sample.key}{sample.ext}", sample.label))
    write_text(done, json.dumps({"etag": etag, "samples": samples}))
    return samples


def count_shards(source: Source) -> dict[str, dict[str, int]]:
    """Images per split and class of a sharded dataset, by reading every shard as a stream."""
    classes = source.layout.classes
    counts = {split: dict.fromkeys(classes, 0) for split in source.shard_entries}
    for split, entries in source.shard_entries.items():
        for entry in entries:
            body = source.store.open_stream(entry.rel)
            try:
                for sample in shards.samples(body, f"{source.uri}/{entry.rel}", classes):
                    counts[split][classes[sample.label]] += 1
            finally:
                body.close()
    return counts
