"""Where the images come from, as users keep them: a folder per class, a manifest (CSV or JSON lines),
or tar shards. `open_source` reads what a listing can tell (no image is downloaded: `validate` uses
it); `staging_mode` decides between copying the images to local disk and streaming shards from storage;
job/readers.py stages them.

No TensorFlow here. Keys name images: a path relative to `data.uri`, a full URI (a manifest's object
outside `data.uri`), or `<split>/shard-NNNNNN.tar:<member>` (a sample of a shard).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from job import layout as layouts
from job import logs, manifest, shards, storage
from job.config import Config
from job.errors import ConfigError, DataError, NotFound
from job.layout import Layout, MultiLayout, broken_lines, case_clashes, discover, require_training_images

log = logs.get()
MARGIN = 1.2  # copy only when the dataset and its image cache fit in the free space with this margin


@dataclass
class Source:
    kind: str  # folder | manifest | shards
    uri: str
    layout: Layout  # as listed: a sharded dataset's files are known only once its shards are read
    entries: dict[str, tuple[storage.Store, storage.Entry]] = field(default_factory=dict)  # key -> object
    shard_entries: dict[str, list[storage.Entry]] = field(default_factory=dict)  # split -> shards (kind shards)
    shard_counts: dict[str, int] = field(default_factory=dict)  # shard -> samples, as index.json counts them
    store: storage.Store | None = None  # data.uri

    def bytes(self) -> int:
        sizes = [e.size for _, e in self.entries.values()] + [e.size for es in self.shard_entries.values()
                                                              for e in es]
        return sum(sizes)

    def image_count(self) -> int:
        return sum(self.layout.count(split) for split in self.layout.splits)

    def fingerprint(self) -> str:
        """A digest of what the listing says: every object's key, size and ETag, and each listed image's split and
        label. It changes when an image is added, removed, relabelled or (in storage) rewritten. A local file's
        modification time is left out: a folder copied afresh into each pod is the same dataset."""
        def row(key: str, store, e: storage.Entry) -> str:
            return f"{key}\t{e.size}" + ("" if isinstance(store, storage.LocalStore) else f"\t{e.etag}")

        rows = sorted(row(k, store, e) for k, (store, e) in self.entries.items())
        rows += sorted(row(e.rel, self.store, e) for es in self.shard_entries.values() for e in es)
        rows += [*self.layout.classes] + [f"{split}\t{key}\t{label}" for split in self.layout.splits
                                          for key, label in zip(*self.layout.items(split))]
        return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def open_source(cfg: Config) -> Source:
    """List the dataset (no image downloads) and check its layout; the validation split is carved later."""
    source = _open(cfg, storage.open_store(cfg.data.uri, cfg.s3.endpoint_url))
    both = layouts.file_and_folder(source.entries)
    if both:
        raise DataError(f"{storage.join(cfg.data.uri, both[0])}: an image, and also the folder of "
                        f"{storage.join(cfg.data.uri, both[1])}: a local copy cannot be both; rename one")
    broken = broken_lines(source.layout.classes)
    if broken:
        raise DataError(f"{cfg.data.uri}: class name {ascii(broken[0])} holds a line break; labels.txt keeps one "
                        "class per line, so rename it")
    hidden = [c for c in source.layout.classes if any(unicodedata.category(ch) == "Cc" for ch in c)]
    if hidden:  # a NUL or a tab in a label trained and exported without a word, and printed as something else
        raise DataError(f"{cfg.data.uri}: class name {ascii(hidden[0])} holds a control character, which prints "
                        "as nothing or as a jump (a tab, a NUL); rename it")
    blank = [c for c in source.layout.classes if not c.strip()]
    if blank:
        raise DataError(f"{cfg.data.uri}: a class named {blank[0]!r}, only spaces (a folder, or a JSON label): it "
                        "prints as nothing, and classes.txt skips blank lines, so a packed copy lost it; rename it")
    for names in case_clashes(source.layout.classes):
        log.warning("class names that differ only in case, Unicode form, spaces or invisible characters are "
                    "different classes", classes=[layouts.shown(n) for n in names])
    if layouts.numbers_in_text_order(source.layout.classes):
        log.warning("class names are numbers, in the order of text: output column k is labels.txt's line k+1, not "
                    "class k; name them with as many digits each (01, 02, ... 10), or list their order in a "
                    "classes.txt beside a manifest", order=_few(source.layout.classes))
    return source


def _open(cfg: Config, store: storage.Store) -> Source:
    if cfg.data.manifest:
        return _manifest_source(cfg, store)
    listing = store.list()
    found = shards.shard_names(e.rel for e in listing)
    odd = shards.misnamed((e.rel for e in listing), sharded=bool(found))
    if odd:
        raise DataError(f"{cfg.data.uri}/{odd[0]}: a tar the job does not read ({len(odd)} such): shards are "
                        "<split>/shard-NNNNNN.tar, the split train, validation or test, six digits, the tar "
                        "uncompressed or gzipped but named .tar; rename it (or pack the images again)")
    if found:
        return _shard_source(cfg, store, listing, found)
    if cfg.task == "multi_label":
        raise ConfigError(f"task: multi_label needs label lists: a manifest (data.manifest, CSV path,labels or JSON "
                          f"lines with \"labels\") or shards packed from one; {cfg.data.uri} is a folder per class, "
                          "one label per image (task: single_label)")
    markers = store.empty_folders() if isinstance(store, storage.LocalStore) else []  # an empty class folder
    layout = discover([e.rel for e in listing] + markers, cfg.data.uri.rstrip("/"))
    warn_ignored(layout.ignored, "objects ignored (not images in a class folder of train/, validation/ or test/, "
                                 "or hidden)")
    wanted = layout.keys()
    return Source("folder", cfg.data.uri, layout, {e.rel: (store, e) for e in listing if e.rel in wanted},
                  store=store)


def warn_ignored(ignored: list[str], why: str) -> None:
    """Warn of what the listing leaves out: images in formats the job does not read (with their counts and the
    advice to convert them) apart from the other files (`why`)."""
    unread = [n for n in ignored if layouts.unread_extension(n)]
    left = set(unread)
    if unread:
        formats = layouts.formats_named(layouts.unread_formats(unread))
        log.warning(f"images left out: {formats}, in formats the job does not read; convert them to JPEG or PNG",
                    count=len(unread), examples=unread[:5])
    others = [n for n in ignored if n not in left]
    if others:
        log.warning(why, count=len(others), examples=others[:5])


def _read(uri: str, endpoint: str) -> bytes:
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not storage.is_s3(uri) and not Path(uri.removeprefix("file://")).is_file():  # file://: as data.uri takes it
        raise DataError(f"{uri}: no such file")
    try:
        return storage.open_store(parent or ".", endpoint).read(name)
    except NotFound:
        raise DataError(f"{uri}: no such object") from None


def _warn_joined(joined: dict[str, str], multi: bool, **where) -> None:
    """Warn of labels that look like several joined into one (`manifest.joined_labels`)."""
    if not joined:
        return
    how = ("separates an image's labels with '|' in a CSV, a list in JSON lines (and pack keeps those lists)" if multi
           else "has one label an image; several need task: multi_label and a 'labels' column")
    log.warning(f"{len(joined)} label(s) look like several joined into one, and train as one class: a "
                f"{'multi' if multi else 'single'}-label manifest {how}",
                examples={k: joined[k] for k in list(joined)[:5]}, **where)


def _manifest_source(cfg: Config, store: storage.Store) -> Source:
    name = cfg.data.manifest
    rows = manifest.parse(_read(name, cfg.s3.endpoint_url), name)
    metadata = [r for r in rows if layouts.metadata_file(r.path)]
    if metadata:  # `find -name '*.jpg'` after unzipping a Mac's archive: validate counted them, train refused them
        rows = [r for r in rows if not layouts.metadata_file(r.path)]
        log.warning("manifest rows left out: macOS or NAS metadata files, not images (._name, __MACOSX/, @eaDir/)",
                    manifest=name, rows=len(metadata), first=f"line {metadata[0].line}: {metadata[0].path}")
        if not rows:
            raise DataError(f"{name}: every row names a metadata file (._name, __MACOSX/, @eaDir/), no image")
    _check_task(cfg, manifest.is_multi_label(rows), name)
    _warn_joined(manifest.joined_labels(rows), manifest.is_multi_label(rows), manifest=name)
    entries: dict[str, tuple[storage.Store, storage.Entry]] = {}
    root = cfg.data.uri.rstrip("/")
    for prefix in manifest.listing_prefixes(rows, cfg.data.uri, name):
        where = store if prefix == root else storage.open_store(prefix, cfg.s3.endpoint_url)
        for e in where.list():
            key = e.rel if where is store else f"{prefix}/{e.rel}"
            entries[key] = (where, e)
    # classes.txt beside the manifest, when there, sets the classes' order (a single-label manifest's was ignored)
    parent = name.rstrip("/").rpartition("/")[0]
    classes_uri = f"{parent}/{shards.CLASSES}" if parent else shards.CLASSES
    classes = _read_optional(classes_uri, cfg.s3.endpoint_url)
    multi = manifest.is_multi_label(rows)
    parsed = shards.parse_classes(classes, classes_uri, 1 if multi else 2, indexed=False) if classes else None
    if multi:
        layout = manifest.to_multi_layout(rows, name, cfg.data.uri, set(entries), parsed, classes_uri)
    else:
        layout = manifest.to_layout(rows, name, cfg.data.uri, set(entries), parsed, classes_uri)
    wanted = layout.keys()
    return Source("manifest", cfg.data.uri, layout, {k: v for k, v in entries.items() if k in wanted}, store=store)


def manifest_task(name: str, endpoint: str) -> str:
    """The task a manifest's rows describe: multi_label (label lists) or single_label."""
    return "multi_label" if manifest.is_multi_label(manifest.parse(_read(name, endpoint), name)) else "single_label"


def _check_task(cfg: Config, multi: bool, where: str) -> None:
    """A dataset of label lists needs task: multi_label, and one label per image task: single_label."""
    if multi and cfg.task != "multi_label":
        raise ConfigError(f"{where}: a multi-label dataset (label lists) but task is {cfg.task}; set task: multi_label")
    if not multi and cfg.task == "multi_label":
        raise ConfigError(f"{where}: one label per image but task is multi_label; set task: single_label, or give "
                          "label lists (CSV header path,labels; JSON lines \"labels\": [...])")


def _read_optional(uri: str, endpoint: str) -> bytes | None:
    """The object or file at `uri`, or None when there is none."""
    try:
        return _read(uri, endpoint)
    except DataError:
        return None


def _shard_source(cfg: Config, store: storage.Store, listing: list[storage.Entry],
                  found: dict[str, list[str]]) -> Source:
    """Classes from classes.txt; with an index.json (pack writes it), the shards it lists and their counts
    (until the shards are read)."""
    by_rel = {e.rel: e for e in listing}
    if shards.CLASSES not in by_rel:
        raise DataError(f"{cfg.data.uri}/{shards.CLASSES}: missing (the shards' class names, one per line)")
    multi = cfg.task == "multi_label"  # labels by name (.json), not by index (.cls)
    classes = shards.parse_classes(store.read(shards.CLASSES), f"{cfg.data.uri}/{shards.CLASSES}", 1 if multi else 2,
                                   indexed=not multi)
    if "train" not in found:
        raise DataError(f"{cfg.data.uri}: shards but no train/shard-NNNNNN.tar")
    beside = sorted(e.rel for e in listing if e.rel.split("/", 1)[0] in layouts.SPLITS and "/" in e.rel
                    and e.rel.lower().endswith(layouts.IMAGE_EXTENSIONS))
    if beside:  # a test/ folder of images beside train/ shards: never read, and the run had no test report
        raise DataError(f"{cfg.data.uri}/{beside[0]}: {len(beside)} image(s) in split folders beside the tar shards, "
                        "which would not be read (a dataset is all shards, or all class folders); pack them too "
                        "(finetune-job pack), or move them out")
    counts, images, packed_counts = {}, {}, {}
    if shards.INDEX in by_rel:
        index = _read_index(store, f"{cfg.data.uri}/{shards.INDEX}")
        shards.check_listed(set(index["shards"]), found, cfg.data.uri)
        _check_task(cfg, index.get("task", "single_label") == "multi_label", f"{cfg.data.uri}/{shards.INDEX}")
        packed = index.get("classes")
        if isinstance(packed, list) and packed != classes:  # the .cls indices name classes.txt's lines
            raise DataError(f"{cfg.data.uri}/{shards.CLASSES} lists {_few(classes)} but the shards were packed "
                            f"with {_few(packed)} ({shards.INDEX}): their labels would name other classes; restore "
                            f"{shards.CLASSES} as packed, or pack again")
        counts, images = index["counts"], index.get("images") or {}
        packed_counts = {rel: n for rel, n in index["shards"].items() if isinstance(n, int)}
    if cfg.task == "multi_label":  # the labels of each image are known once the shards are read
        _warn_joined(manifest.joined_names(set(classes)), True, classes=f"{cfg.data.uri}/{shards.CLASSES}")
        layout = MultiLayout(classes, {s: {f"#{i}": () for i in range(images.get(s, 0))} for s in found})
    else:
        files = {s: {c: [""] * counts.get(s, {}).get(c, 0) for c in classes} for s in found}
        layout = Layout(classes, files)
        if counts:
            require_training_images(layout, cfg.data.uri)
    return Source("shards", cfg.data.uri, layout, store=store,
                  shard_entries={s: [by_rel[r] for r in rels] for s, rels in found.items()}, shard_counts=packed_counts)


def _few(names: list) -> str:
    return ", ".join(map(str, names[:6])) + f", ... {len(names)} in all" * (len(names) > 6)


def _read_index(store: storage.Store, where: str) -> dict:
    """index.json: {"classes", "counts": {split: {class: n}}, "shards": {shard: n}}; DataError if unreadable
    (it decides which shards are read)."""
    try:
        index = json.loads(store.read(shards.INDEX))
        if isinstance(index["counts"], dict) and isinstance(index["shards"], dict):
            return index
    except (ValueError, KeyError, TypeError):
        pass
    raise DataError(f"{where}: not a readable index (JSON with \"counts\" and \"shards\"); remove it to read "
                    "every shard, or pack again with --overwrite")


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
    # Shards copied from S3 are kept beside their extracted samples: their bytes count twice.
    copies = 2 if source.kind == "shards" and not isinstance(source.store, storage.LocalStore) else 1
    need = int((source.bytes() * copies + source.image_count() * image_bytes) * MARGIN)
    free = shutil.disk_usage(cache_dir).free
    if need <= free or isinstance(source.store, storage.LocalStore) and source.kind != "shards":
        return "copy"  # a local folder or manifest is read in place: nothing is copied
    if source.kind == "shards":
        log.info("streaming: the dataset does not fit the cache disk", needed_bytes=need, free_bytes=free)
        return "stream"
    raise DataError(f"{source.uri}: {need / 1e9:.1f} GB needed to stage it and cache its images in "
                    f"{cache_dir}, {free / 1e9:.1f} GB free; give the job more disk, or pack the dataset into "
                    "shards (finetune-job pack) to stream it")
