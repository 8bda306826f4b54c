"""`finetune-job pack`: a folder-per-class dataset or a manifest into tar shards in storage, once.

    finetune-job pack --from s3://b/flowers --to s3://b/flowers-shards [--shard-size 256MB]
    finetune-job pack --from s3://b/labels.csv --to s3://b/flowers-shards   # paths relative to the CSV's folder
    finetune-job pack ... --overwrite     # replace the shards already there (deleted once the source reads)

Each split's images are shuffled (seeded) across its shards, so that streaming reads a mix of classes
from every shard; each sample is `<key>.<ext>` with `<key>.cls` (multi-label: `<key>.json`, its label
list); `classes.txt` and `index.json` (the task, counts per split and class, and the shards: the job reads
only those) go beside the shards, classes.txt last. A
destination that holds shards is refused (exit 4) unless `--overwrite`, which deletes them first: never a
mix of two packs. Images are copied as they are: the job skips undecodable ones when it trains. Those whose
header already shows it (an empty file, no image, a format the job does not read, a BMP its decoder misreads) are
warned of here with the member each became, which training names when it skips it (the members are renumbered).
No TensorFlow.
"""

from __future__ import annotations

import io
import random
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from job import logs, shards, storage
from job.errors import ConfigError, JobError, StorageError, disk_full
from job.files import write_labels
from job.headers import EMPTY, header
from job.layout import IMAGE_EXTENSIONS, SPLITS
from job.manifest import JSON_LINES
from job.uris import within

log = logs.get()
# `iB` only after a unit (KiB, MiB): `5000iB` is no size, not 5,000 bytes.
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?b)?|b?)\s*$", re.I)


def parse_size(text: str) -> int:
    """'256MB' -> 256,000,000; '1GiB' -> 1,073,741,824; a plain number is bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"--shard-size {text!r}: expected a size like 256MB, 1GiB or 100000000")
    number, unit, suffix = float(match.group(1)), (match.group(2) or "").lower(), (match.group(3) or "").lower()
    base = 1024 if suffix == "ib" else 1000
    value = int(number * base ** "_kmgt".index(unit or "_"))
    if value < 1000:  # 1KB itself is fine
        raise ConfigError(f"--shard-size {text!r}: at least 1KB")
    return value


# The config keys pack fills in, by the options they come from
_OPTIONS = {"data.uri": "--from", "data.manifest": "--from", "output.uri": "--to", "s3.endpoint_url": "--endpoint-url"}


def _config(data_uri: str, manifest: str, dest_uri: str, endpoint: str):
    """The config of the source and destination, refused as their options (`--to s3:/b/x` was exit 1 with pydantic's
    traceback naming output.uri, which the user never set)."""
    from pydantic import ValidationError

    from job import sources
    from job.config import Config, one_line

    fields = {"data": {"uri": data_uri, "manifest": manifest}, "output": {"uri": dest_uri},
              "s3": {"endpoint_url": endpoint}, "model": {"weights": "none"}}
    try:
        Config.model_validate(fields)
        task = sources.manifest_task(manifest, endpoint) if manifest else "single_label"
        return Config.model_validate({**fields, "task": task})
    except ValidationError as e:
        line = one_line(e).removeprefix("config: ")
        key = line.partition(":")[0]
        raise ConfigError(f"{_OPTIONS.get(key, key)}{line[len(key):]}") from None


def pack(source_uri: str, dest_uri: str, shard_size: int, endpoint: str = "", seed: int = 0,
         overwrite: bool = False) -> dict:
    """Write the shards; returns index.json's content plus where they went."""
    from job import sources
    from job.config import home_path

    try:
        # as data.uri and data.manifest take it (`--from=~/...`: no shell expands it)
        source_uri = home_path(source_uri)
    except ValueError as e:  # ~user of no user
        raise ConfigError(f"--from {source_uri}: {e}") from None
    manifest = source_uri if source_uri.lower().endswith((".csv", *JSON_LINES)) else ""
    # a manifest's folder: `--from labels.csv` read its paths under a "folder" named labels.csv (exit 3)
    data_uri = (source_uri.rsplit("/", 1)[0] if "/" in source_uri else ".") if manifest else source_uri
    if manifest and within(dest_uri, data_uri) and within(data_uri, dest_uri):
        raise ConfigError(f"--to {dest_uri}: the manifest's own folder, where the pack's classes.txt would become the "
                          f"manifest's class list (a label added later was refused); pack into another prefix, e.g. "
                          f"{data_uri.rstrip('/')}/shards")
    cfg = _config(data_uri, manifest, dest_uri, endpoint)
    try:
        source = sources.open_source(cfg)
    except JobError as e:  # the layout's hints name the config keys ("set data.uri to ..."): here they are --from
        e.args = (re.sub(r"\bdata\.(uri|manifest)\b", "--from", str(e.args[0] if e.args else e)),)
        raise
    if source.kind == "shards":
        raise ConfigError(f"--from {source_uri}: already shards")
    if not manifest and within(dest_uri, data_uri):  # a manifest names its files: shards beside them are not read
        raise ConfigError(f"--to {dest_uri}: inside the dataset --from {source_uri}, whose layout the shards would "
                          f"join (a class folder more, or shards where the folders are); pack into a prefix outside "
                          f"it, e.g. {data_uri.rstrip('/')}-shards")
    layout = source.layout  # (a class name with a line break, which classes.txt cannot hold, is refused there)
    dest = storage.open_store(dest_uri, endpoint)
    _read_one_of_each_store(source)  # before anything is deleted: a source listed but not readable stops here
    deleted = _refuse_or_clear(dest, overwrite)
    uploaded: list[str] = []
    try:
        return _write(source, layout, cfg, dest, shard_size, seed, source_uri, uploaded)
    except (JobError, OSError) as e:  # a read, an upload or the local shard failed midway: what the destination
        # holds now, and what to do (a full TMPDIR said nothing of the unfinished pack it left)
        if isinstance(e, OSError):
            e = StorageError(f"writing a shard in {tempfile.gettempdir()}: {e.strerror or e} (set TMPDIR to a larger "
                             "folder)" if disk_full(e) is not None else f"{e.filename or 'pack'}: {e.strerror or e}")
        if not uploaded and not deleted:  # nothing written nor deleted there (a destination that denies writes)
            raise e from None
        before = f"; the {deleted} shard(s) there before were deleted first (--overwrite)" if deleted else ""
        e.args = (f"{e.args[0] if e.args else e}; pack stopped midway: {dest.uri} has no {shards.CLASSES}, so it is "
                  f"no dataset (shards there are this unfinished pack's{before}); pack again with --overwrite",)
        raise e from None


def _write(source, layout, cfg, dest: storage.Store, shard_size: int, seed: int, source_uri: str,
           uploaded: list[str]) -> dict:
    """Each split's shards, then index.json, then classes.txt (last: without it, a half-written pack is no dataset);
    index.json's content plus where they went. `uploaded`: the shards written so far."""
    shard_counts: dict[str, int] = {}
    suspects: list[str] = []  # "source key -> member: reason"
    total = sum(layout.count(split) for split in layout.splits)  # a record every 30 s: 6,000 images ran 40 s unsaid
    with tempfile.TemporaryDirectory(prefix="finetune-job-pack-") as tmp, ThreadPoolExecutor(16) as pool, \
            logs.progress("packing", total) as advance:
        for split in layout.splits:
            items = [(key, [layout.classes[i] for i in y] if layout.multi_label else y)
                     for key, y in zip(*layout.items(split))]
            random.Random(f"{seed}:{split}").shuffle(items)

            writer = shards.ShardWriter(Path(tmp), split, shard_size,
                                        lambda path: uploaded.append(_upload(dest, path, Path(tmp))))
            for start in range(0, len(items), 256):  # 16 parallel GETs, 256 images in memory at most
                chunk = items[start:start + 256]
                for n, ((key, label), data) in enumerate(zip(chunk, pool.map(lambda i: _read(source, i[0]), chunk))):
                    member = writer.add(f"{start + n:08d}", Path(key).suffix.lower(), data, label)
                    why = _bad(data)
                    if why:
                        suspects.append(f"{key} -> {member}: {why}")
                advance(len(chunk))
            writer.close()
            shard_counts.update(writer.counts)
            log.info("split packed", split=split, images=len(items), shards=len(writer.counts))
        if suspects:
            log.warning("images that training will skip as bad images, packed as they are", count=len(suspects),
                        examples=suspects[:5], source=source_uri)
        index_file = Path(tmp) / shards.INDEX
        images = {split: layout.count(split) for split in layout.splits}
        index_file.write_text(shards.index(layout.classes, layout.counts(), shard_counts, cfg.task, images),
                              encoding="utf-8")
        dest.upload(index_file, shards.INDEX)
        classes_file = Path(tmp) / shards.CLASSES  # last: without it, a half-written pack is not a dataset
        write_labels(classes_file, layout.classes)
        dest.upload(classes_file, shards.CLASSES)
    return {"to": dest.uri, "task": "multi_label" if layout.multi_label else "single_label", "classes": layout.classes,
            "counts": layout.counts(), "images": images, "shards": shard_counts}


def _refuse_or_clear(dest: storage.Store, overwrite: bool) -> int:
    """Refuse a destination that holds shards (StorageError) unless `overwrite`: then delete them, classes.txt
    and index.json first, so that no mix of the old and new pack is ever a readable dataset; how many shards went."""
    rels = [e.rel for e in dest.list()]
    old = [r for r in rels if shards.SHARD.match(r)]
    meta = [r for r in (shards.CLASSES, shards.INDEX) if r in rels]
    images = [r for r in rels if r.lower().endswith(IMAGE_EXTENSIONS) and r.split("/", 1)[0] in SPLITS]
    if images:  # a folder dataset: the shards beside it made it read as shards, its own images dropped unsaid
        raise StorageError(f"--to {dest.uri}: holds a folder dataset ({images[0]}, {len(images)} image(s) under "
                           "train/, validation/ or test/), which the shards would hide; pack into an empty prefix")
    if not old and not meta:
        return 0
    if not overwrite:
        raise StorageError(f"--to {dest.uri}: already holds {len(old)} shard(s) (and {', '.join(meta) or 'no index'}); "
                           "pack into an empty prefix, or pass --overwrite to replace them")
    dest.delete(meta)
    dest.delete(old)
    log.info("old shards deleted", to=dest.uri, shards=len(old))
    return len(old)


def _read_one_of_each_store(source) -> None:
    """Read one image of each place the source's images are in (a manifest may name several buckets): storage
    that lists but does not read (no s3:GetObject, a proxy) fails here, before --overwrite deletes the old pack."""
    first: dict[int, str] = {}
    for key, (store, _) in sorted(source.entries.items()):
        first.setdefault(id(store), key)
    for key in first.values():
        _read(source, key)


def _bad(data: bytes) -> str:
    """Why training will skip these image bytes, where their header shows it without decoding; else ""."""
    if not data:
        return EMPTY
    size, why = header(io.BytesIO(data))
    return why or ("" if size else "not an image that can be read")


def _upload(dest, path: Path, tmp: Path) -> str:
    rel = path.relative_to(tmp).as_posix()
    dest.upload(path, rel)
    path.unlink()
    return rel


def _read(source, key: str) -> bytes:
    store, entry = source.entries[key]
    return store.read(entry.rel)
