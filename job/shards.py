"""Datasets as tar shards, in the WebDataset convention: `<split>/shard-NNNNNN.tar` under `data.uri`,
each sample a group of adjacent members `<key>.<jpg|png|...>` with its label in `<key>.cls` (an index
into `classes.txt` beside the shards) or `<key>.txt` (the class name); multi-label samples carry theirs
in `<key>.json`, `{"labels": [names in classes.txt]}` (an empty list: none). A key is the member's whole path
up to the first dot of its file name (`cat/0001.jpg` and `dog/0001.jpg` are two samples); a key may
occur once per split. Members of no sample (no image among them: `LICENSE.txt`, `README`) are skipped
and named. `finetune-job pack` writes shards with an `index.json` of the counts and the shards (so
`validate` and streaming know the sizes without reading shards, and the job reads only those shards).

Pure Python (tarfile), no TensorFlow. Problems are DataErrors (exit 3) naming the shard and member.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from job.errors import ConfigError, DataError
from job.layout import IMAGE_EXTENSIONS, NOT_UTF8, SPLIT_ALIASES, SPLITS, lookalike, raw_name, utf8

SHARD = re.compile(r"^(train|validation|test)/shard-(\d{6})\.tar$")
TAR = re.compile(r"\.(tar|tgz|tar\.(gz|bz2|xz))$", re.IGNORECASE)
CLASSES = "classes.txt"
INDEX = "index.json"


@dataclass(frozen=True)
class Sample:
    key: str  # the member path up to the first dot of its file name: `cat/0001` for `cat/0001.jpg`
    ext: str  # ".png", ...: the image member's, as the tar writes it (".JPG" too)
    image: bytes
    label: int | tuple[int, ...]  # index into the classes; multi-label: the indices (sorted, maybe none)


def shard_names(rels: Iterable[str]) -> dict[str, list[str]]:
    """{split: [shard paths in order]} of the shards among these relative paths (empty: not sharded)."""
    found: dict[str, list[str]] = {}
    for rel in rels:
        match = SHARD.match(rel)
        if match:
            found.setdefault(match.group(1), []).append(rel)
    return {s: sorted(found[s]) for s in SPLITS if s in found}


def misnamed(rels: Iterable[str], sharded: bool) -> list[str]:
    """Tars that look like shards but are not named as the job reads them (`train/shard-2.tar`, `.TAR`,
    `.tar.gz`, `val/shard-000000.tar`, a `shard-000000.tar` outside a split folder): they were ignored without
    a word, and their images never trained. Beside shards (`sharded`) any tar in a split folder is one; in a folder
    dataset only a tar named `shard...` (an archive of the originals there stays an ignored object). Hidden files
    (macOS' `._shard-000000.tar`) are no shards."""
    odd = []
    for rel in rels:
        parts = rel.lower().split("/")
        if SHARD.match(rel) or not TAR.search(rel) or any(p.startswith(".") for p in parts):
            continue
        in_split = len(parts) == 2 and (parts[0] in SPLITS or parts[0] in SPLIT_ALIASES)
        if (sharded and in_split) or (parts[-1].startswith("shard") and (in_split or len(parts) == 1)):
            odd.append(rel)
    return sorted(odd)


def parse_classes(data: bytes, where: str, minimum: int = 2, indexed: bool = True) -> list[str]:
    """The class names of classes.txt (UTF-8; a byte-order mark, as Windows' Notepad writes, is not part of the
    first name), one per `\n`-ended line (`\r\n` too), exactly as written (a folder named ` cat` is a class
    ` cat`; pack writes it so); blank lines are skipped, but where labels are indices (`indexed`: single-label
    shards' `.cls`) a blank line before the last name is a DataError: whether it counts is anyone's guess
    (skipped, it shifted every label after it by one); multi-label labels are names. At least `minimum` (2 for
    single-label; multi-label may have one label). Other bytes are a DataError: decoded with replacement, a
    Latin-1 `café` was a class `caf�`."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    blank = [n for n, line in enumerate(lines, 1) if not line.strip()]
    if blank and indexed:
        raise DataError(f"{where} line {blank[0]}: blank, between class names: a .cls label is the index of a name, "
                        "and a blank line would shift (or not) the names after it; remove it")
    classes = [line for line in lines if line.strip()]
    if len(classes) < minimum:
        needed = "1 is" if minimum == 1 else f"{minimum} are"
        raise DataError(f"{where}: {len(classes)} class(es); at least {needed} needed")
    first: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        if line in first:
            raise DataError(f"{where} line {n}: class {line!r} is listed twice (first on line {first[line]})")
        if line.strip():
            first[line] = n
    return classes


# A sample is a run of adjacent members (WebDataset's convention): a tar written from a folder as `tar -cf x.tar .`
# lists its files in directory order, so an image and its label can be far apart, and the image had "no label".
BESIDE = ("beside it: a sample's members are adjacent in the tar (write it with `tar --sort=name`, or "
          "`finetune-job pack`)")


def check_listed(listed: set[str], found: dict[str, list[str]], where: str) -> None:
    """Every shard found is one that index.json lists, and the other way round: a shard it does not list is
    left over from an earlier pack, and its images would be trained under today's classes.txt."""
    for rels in found.values():
        for rel in rels:
            if rel not in listed:
                raise DataError(f"{where}/{rel}: a shard that {INDEX} does not list (left over from an earlier "
                                f"pack?); remove it, or pack again with --overwrite")
    missing = sorted(listed - {rel for rels in found.values() for rel in rels})
    if missing:
        raise DataError(f"{where}/{missing[0]}: listed in {INDEX} but missing")


def check_count(where: str, read: int, counted: int | None) -> None:
    """A shard read to its end holds the samples index.json counts (None: not counted)."""
    if counted is not None and read != counted:
        raise DataError(f"{where}: {read} sample(s) read, but {INDEX} counts {counted}: the shard changed after it "
                        "was packed (cut short, or rewritten); pack again")


def member_key(name: str, where: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member in the WebDataset convention: the whole path up to the first dot of
    the file name (`cat/0001.jpg` -> `cat/0001`, `.jpg`). None for a member that belongs to no sample (no
    dot in its file name, or a hidden file). DataError for a path that would leave the extraction folder."""
    path = name.removeprefix("./")
    if path.startswith("/") or any(p in ("", ".", "..") for p in path.split("/")):
        raise DataError(f"{where}: member {name!r} is not a plain relative path")
    folder, _, base = path.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    if not utf8(name):  # a member of a sample (the others are skipped, and their names logged escaped)
        raise DataError(f"{where}: member {raw_name(name)}: {NOT_UTF8} (and pack again)")
    return (f"{folder}/{stem}" if folder else stem), "." + ext.lower()


def samples(fileobj, name: str, classes: list[str] | None, ignored: list[str] | None = None,
            multi: bool = False) -> Iterator[Sample]:
    """The samples of one shard, read as a stream (a file or an HTTP body; no seeking). Members that belong
    to no sample (no image among them: `LICENSE.txt`, `README`) are skipped and named in `ignored`.
    `multi`: labels from `<key>.json` (multi-label); a sample labelled the other way is a ConfigError."""
    groups = _groups(fileobj, name, ignored)
    seen: set[str] = set()
    for key, members, written in groups:
        for sample in _sample(key, members, written, name, classes, ignored, multi):
            if key in seen:
                raise DataError(f"{name}: sample {key} occurs twice (its members are not adjacent, or two "
                                "samples share a key)")
            seen.add(key)
            yield sample


def _groups(fileobj, name: str, ignored: list[str] | None) -> Iterator[tuple[str, dict[str, bytes], dict[str, str]]]:
    """(key, {extension: bytes}, {extension: member name}) of each run of adjacent members that share a key; the
    extensions lower-case."""
    current: dict[str, bytes] = {}
    names: dict[str, str] = {}  # the member names of `current`
    key = None
    try:
        with _open(fileobj) as tar:
            for member in tar:
                if (member.islnk() or member.issym()) and (member_key(member.name, name) or ("", ""))[1] in \
                        IMAGE_EXTENSIONS:  # an image dropped, and its label named as a member of no sample
                    raise DataError(f"{name}: member {member.name} is a {'hard' if member.islnk() else 'symbolic'} "
                                    f"link (to {member.linkname}), which a shard read as a stream cannot follow; "
                                    "write the shard with the files themselves (tar --hard-dereference "
                                    "--dereference), or pack it")
                if not member.isfile():
                    continue
                found = member_key(member.name, name)
                if found is None:
                    if ignored is not None:
                        ignored.append(f"{name}:{member.name}")
                    continue
                if found[0] != key:
                    if key is not None:
                        yield key, current, names
                    key, current, names = found[0], {}, {}
                if found[1] in current:  # `x.cls` and `x.CLS`: the last one won, without a word
                    raise DataError(f"{name}: member {member.name} occurs twice" if names[found[1]] == member.name
                                    else f"{name}: sample {key} has two {found[1]} members (extensions differ only "
                                    f"in case; {member.name} is the second)")
                current[found[1]], names[found[1]] = tar.extractfile(member).read(), member.name
            _check_end(tar, name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{name}: not a readable tar file ({type(e).__name__}: {e}); is it truncated?") from None
    if key is not None:
        yield key, current, names


def _open(fileobj) -> tarfile.TarFile:
    """The shard as a tar stream (`r|*`: compressed or not)."""
    try:
        return _Tar.open(fileobj=fileobj, mode="r|*")
    except TypeError:  # tarfile's gzip reader on a stream cut inside the gzip header, `ord(b"")`: exit 1, a traceback
        raise tarfile.ReadError("cut inside the gzip header") from None


class _Tar(tarfile.TarFile):
    """A TarFile whose stream keeps what _check_end needs from its first read on (the first header is read as the
    TarFile is made)."""

    def __init__(self, name=None, mode="r", fileobj=None, **kwargs):
        if fileobj is not None and hasattr(fileobj, "comptype"):  # the stream of mode `r|*`
            _keep_last_header(fileobj)
        super().__init__(name, mode, fileobj, **kwargs)


def _keep_last_header(stream) -> None:
    """Keep the last header block tarfile reads (`last_block`): it ends the archive at a header that is cut short or
    damaged as it ends it at the end-of-archive block, and only the block tells them apart. And the CRC-32 of
    everything read (`crc`): tarfile checks no gzip trailer, so a damaged .tar.gz gave other pixels."""
    read = stream.read
    stream.crc = 0

    def reading(size=None):
        data = read(size)
        stream.crc = zlib.crc32(data, stream.crc)
        if size == tarfile.BLOCKSIZE:
            stream.last_block = data
        return data

    stream.read = reading


def _check_end(tar: tarfile.TarFile, name: str) -> None:
    """A tar read to its end has its end-of-archive block, and only zeros after it. tarfile reads a tar cut at a
    member's boundary or inside a header as a shorter tar, stops at a damaged header as at an end, and stops at the
    first end of tars joined one after the other (`cat a.tar b.tar`): each way samples were lost without a word."""
    stream = tar.fileobj  # the (decompressed) stream: at the end, it has read the end block past the last member
    last = getattr(stream, "last_block", None)
    if stream.tell() == tar.offset or (last is not None and len(last) < tarfile.BLOCKSIZE):
        raise DataError(f"{name}: ends after a member or inside a member's header, without the tar's end-of-archive "
                        "block: cut short (a copy or upload that stopped?); copy it again, or pack again")
    if last is not None and last.strip(b"\0"):
        raise DataError(f"{name}: a damaged member header at byte {tar.offset} (not a tar header, and not the "
                        "end-of-archive block): the shard is corrupt; copy it again, or pack again")
    if any(chunk.strip(b"\0") for chunk in _rest(stream, name)):
        raise DataError(f"{name}: holds data after the tar's end-of-archive block (tars joined with `cat`?), whose "
                        "samples would be lost; write one tar (`tar -A` joins tars), or pack again")


def _rest(stream, name: str) -> Iterator[bytes]:
    """What follows the tar's end block: the rest of its (decompressed) stream, then for a compressed tar what
    follows the compressed stream's end (tarfile decompresses one gzip member: `cat a.tar.gz b.tar.gz` read as a)."""
    while chunk := stream.read(1 << 16):
        yield chunk
    comptype = getattr(stream, "comptype", "tar")
    if comptype != "tar":
        after = getattr(stream.cmp, "unused_data", b"")
        if comptype == "gz":  # its trailer: the CRC-32 and size of what it holds, 8 bytes
            while len(after) < 8 and (more := stream.fileobj.read(8 - len(after))):
                after += more
            if len(after) < 8 or int.from_bytes(after[:4], "little") != getattr(stream, "crc", None):
                raise DataError(f"{name}: its gzip data fails its CRC check "
                                "(damaged or cut short); copy it again, or pack again")
            after = after[8:]
        yield after
        while chunk := stream.fileobj.read(1 << 16):
            yield chunk


def _sample(key: str, members: dict[str, bytes], written: dict[str, str], name: str, classes: list[str] | None,
            ignored: list[str] | None, multi: bool = False) -> Iterator[Sample]:
    images = [ext for ext in members if ext in IMAGE_EXTENSIONS]
    if not images:  # not a sample: a LICENSE.txt, a notes.json
        if ignored is not None:
            ignored.extend(f"{name}:{key}{ext}" for ext in members)
        return
    if len(images) != 1:
        raise DataError(f"{name}: sample {key} has {len(images)} images ({', '.join(members)}); expected one")
    single = ".cls" in members or ".txt" in members
    if multi and single and ".json" not in members:
        raise ConfigError(f"{name}: sample {key} has one label ({key}.cls or .txt), but task is multi_label: "
                          "set task: single_label, or pack the multi-label manifest")
    if not multi and not single and _holds_labels(members.get(".json")):
        raise ConfigError(f"{name}: sample {key} has a label list ({key}.json): a multi-label dataset; set "
                          "task: multi_label")
    label = _label_list(key, members, name, classes) if multi else _label(key, members, name, classes, images[0])
    # the image's extension as the tar writes it: a bad `x.JPG` was reported as `x.jpg`, which `tar xf` cannot find
    yield Sample(key, "." + written[images[0]].rpartition("/")[2].partition(".")[2], members[images[0]], label)


def _holds_labels(data: bytes | None) -> bool:
    """Whether a `<key>.json` is a label list ({"labels": [...]}), not other metadata (WebDataset samples often
    carry a caption or a source in one: that is no label, and said so, not advice to train multi-label)."""
    try:
        return isinstance(json.loads(data or b"null").get("labels"), list)
    except (ValueError, AttributeError):
        return False


def _label_list(key: str, members: dict[str, bytes], name: str, classes: list[str] | None) -> tuple[int, ...]:
    """A multi-label sample's labels: `<key>.json` holds {"labels": [names in classes.txt]}."""
    if ".json" not in members:
        raise DataError(f"{name}: sample {key} has no labels ({key}.json with {{\"labels\": [...]}}) {BESIDE}")
    try:
        labels = json.loads(members[".json"])["labels"]
    except (ValueError, KeyError, TypeError):
        labels = None
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise DataError(f"{name}: {key}.json is not {{\"labels\": [label names]}}")
    if len(set(labels)) != len(labels):
        raise DataError(f"{name}: {key}.json lists a label twice")
    outside = [x for x in labels if x not in (classes or [])]
    if outside:
        raise DataError(f"{name}: {key}.json names label {outside[0]!r}, which {CLASSES} does not list"
                        f"{lookalike(outside[0], classes or [])}")
    return tuple(sorted(classes.index(x) for x in labels))


def _label(key: str, members: dict[str, bytes], name: str, classes: list[str] | None, image: str) -> int:
    """The class index of `<key>.cls`, else of the class `<key>.txt` names; both there, they must agree (the
    .cls won without a word)."""
    if ".cls" in members and ".txt" in members:
        by_index = _label(key, {".cls": members[".cls"]}, name, classes, image)
        by_name = _label(key, {".txt": members[".txt"]}, name, classes, image)
        if by_index != by_name:
            raise DataError(f"{name}: sample {key} has two labels: {key}.cls says {classes[by_index]!r}, {key}.txt "
                            f"says {classes[by_name]!r}")
        return by_index
    if ".cls" in members:
        raw = members[".cls"].decode("utf-8-sig", "replace").strip()
        if not (raw.isascii() and raw.isdigit()) or classes is None or int(raw) >= len(classes):
            known = f"0..{len(classes) - 1}" if classes else f"no {CLASSES} beside the shards"
            raise DataError(f"{name}: {key}.cls is {raw!r}, not a class index ({known})")
        return int(raw)
    if ".txt" in members:
        try:
            raw = members[".txt"].decode("utf-8-sig").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError:
            raise DataError(f"{name}: {key}.txt is not UTF-8 text (classes.txt is)") from None
        if classes is not None and raw in classes:
            return classes.index(raw)
        stripped = [i for i, c in enumerate(classes or []) if c.strip() == raw.strip()]
        if len(stripped) > 1:  # spaces around a name are forgiven only when that leaves no doubt
            raise DataError(f"{name}: {key}.txt names class {raw!r}, which could be any of "
                            f"{', '.join(repr(classes[i]) for i in stripped)} in {CLASSES} (names are exact, spaces "
                            "included)")
        if not stripped:
            raise DataError(f"{name}: {key}.txt names class {raw.strip()!r}, which {CLASSES} does not list"
                            f"{lookalike(raw.strip(), classes or [])}")
        return stripped[0]
    raise DataError(f"{name}: {key}{image} has no label ({key}.cls or {key}.txt) {BESIDE}")


class SplitKeys:
    """Where each sample key of one split was first seen: a key that occurs twice in a split (two shards
    holding `cat/0001`) is a DataError naming both places."""

    def __init__(self, split: str):
        self.split, self.first = split, {}

    def add(self, key: str, where: str) -> None:
        if key in self.first:
            raise DataError(f"sample key {key} occurs twice in split {self.split}: {self.first[key]} and {where}")
        self.first[key] = where


# ---------------------------------------------------------------- writing (finetune-job pack)


def _in_tar(size: int) -> int:
    """The bytes a member of `size` bytes takes in a tar: its header block and its data padded to whole blocks (the
    members' names are short: no extended header)."""
    return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _closed(members: int) -> int:
    """A tar's size once closed: its members, the two end-of-archive blocks, padded to whole records (tarfile's
    10,240 bytes). `--shard-size 1MB` made shards of 1,126,400 bytes when this was left out."""
    return -(-(members + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class ShardWriter:
    """Writes samples into `<folder>/<split>/shard-NNNNNN.tar` files of at most `max_bytes` each (one
    sample may exceed it alone); `on_shard(path)` runs for each shard once it is complete."""

    def __init__(self, folder: Path, split: str, max_bytes: int, on_shard):
        self.folder, self.split, self.max_bytes, self.on_shard = Path(folder), split, max_bytes, on_shard
        self.number, self.tar, self.path, self.size = -1, None, None, 0
        self.counts: dict[str, int] = {}  # shard -> samples

    def add(self, key: str, ext: str, image: bytes, label: int | list[str]) -> str:
        """One sample: its label an index (`<key>.cls`) or, multi-label, a list of names (`<key>.json`); returns
        where its image went, as training names it (`train/shard-000000.tar:00000036.jpg`)."""
        if isinstance(label, int):
            member = (f"{key}.cls", str(label).encode())
        else:
            member = (f"{key}.json", json.dumps({"labels": label}).encode())
        size = _in_tar(len(image)) + _in_tar(len(member[1]))
        if self.tar is None or (self.size and _closed(self.size + size) > self.max_bytes):
            self._next()
        for name, data in ((f"{key}{ext}", image), member):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self.tar.addfile(info, io.BytesIO(data))
        self.size += size
        rel = self.path.relative_to(self.folder).as_posix()
        self.counts[rel] = self.counts.get(rel, 0) + 1
        return f"{rel}:{key}{ext}"

    def _next(self) -> None:
        self.close()
        self.number += 1
        self.path = self.folder / self.split / f"shard-{self.number:06d}.tar"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tar, self.size = tarfile.open(self.path, "w"), 0  # noqa: SIM115 (closed in close())

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.on_shard(self.path)
            self.tar = None


def index(classes: list[str], counts: dict[str, dict[str, int]], shard_counts: dict[str, int],
          task: str = "single_label", images: dict[str, int] | None = None) -> str:
    """index.json: the task, classes, images per split and class (multi-label: carrying each label), images
    per split, samples per shard."""
    return json.dumps({"task": task, "classes": classes, "counts": counts, "images": images or {},
                       "shards": shard_counts}, indent=2) + "\n"
