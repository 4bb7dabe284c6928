"""On-disk checkpoint format: safetensors files, state.json, MANIFEST.json (the commit marker).

A checkpoint is a directory ``step-NNNNNNNN``. Readers trust nothing that is not listed in a
valid ``MANIFEST.json``; the manifest is written last, after every file is fsync'd.

The safetensors files are written by :func:`write_safetensors` directly from tensor memory (no
intermediate ``bytes`` copy, no pickle) and stay readable by the ``safetensors`` library.
Tensors are ordered by element size so each data offset is aligned for zero-copy views.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

import xxhash

from modelver.errors import CheckpointCorruptedError, CheckpointNotFoundError
from modelver.untrusted import STEP_DIR_RE

FORMAT_NAME = "modelver-checkpoint"
FORMAT_VERSION = 1
DELTA_FORMAT_VERSION = 2  # a manifest with delta-encoded files: older readers refuse it
DELTA_SUFFIX = ".delta"
MANIFEST = "MANIFEST.json"
STATE_FILE = "state.json"
HASH_ALGO = "xxh3-128"
CHUNK = 16 << 20

# torch dtype name -> (safetensors dtype, element size)
DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint64": ("U64", 8),
    "uint32": ("U32", 4),
    "uint16": ("U16", 2),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
    "complex64": ("C64", 8),
}
ST_TO_TORCH = {st: name for name, (st, _) in DTYPES.items()}


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def new_hasher() -> Any:
    return xxhash.xxh3_128()


def hash_bytes(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def tree_hash(header: bytes | bytearray, digests: Iterable[bytes]) -> str:
    """A safetensors file's hash: its header, then each tensor's digest in file order.

    Any changed byte changes a tensor digest or the header, so this detects what a plain content
    hash detects, while the writer hashes every tensor byte once, not twice.
    """
    h = new_hasher()
    h.update(header)
    for d in digests:
        h.update(d)
    return str(h.hexdigest())


def hash_safetensors_file(path: Path) -> str:
    """Recompute :func:`tree_hash` from a file's content (raises ValueError if malformed)."""
    with open(path, "rb", buffering=0) as f:
        return hash_safetensors_stream(f)


def hash_safetensors_stream(f: Any) -> str:
    """:func:`tree_hash` of an open file-like object positioned at 0 (a file or a delta chain)."""
    start, header = read_safetensors_header(f)
    f.seek(0)
    head = f.read(start)
    header.pop("__metadata__", None)
    ranges = sorted(
        (int(v["data_offsets"][0]), int(v["data_offsets"][1])) for v in header.values()
    )
    digests = []
    pos = 0
    buf = bytearray(CHUNK)
    for begin, end in ranges:
        if begin != pos or end < begin:
            raise ValueError("tensor data ranges leave gaps or overlap")
        h = new_hasher()
        left = end - begin
        while left:
            n = f.readinto(memoryview(buf)[: min(left, CHUNK)])
            if not n:
                raise ValueError("file is truncated")
            h.update(memoryview(buf)[:n])
            left -= n
        digests.append(h.digest())
        pos = end
    if f.read(1):
        raise ValueError("bytes after the last tensor")
    return tree_hash(head, digests)


def hash_file(path: Path) -> str:
    h = new_hasher()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(view):
            h.update(view[:n])
    return str(h.hexdigest())


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives and what it hashes to; enough to diff without reading data."""

    name: str
    file: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # absolute byte range inside ``file``
    hash: str

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offsets": list(self.offsets),
            "hash": self.hash,
        }

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Any]) -> TensorEntry:
        return cls(
            name=name,
            file=str(d["file"]),
            dtype=str(d["dtype"]),
            shape=tuple(int(x) for x in d["shape"]),
            offsets=(int(d["offsets"][0]), int(d["offsets"][1])),
            hash=str(d["hash"]),
        )


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    hash: str
    md5: str | None = None  # what DVC computes; recorded when known so DVC need not rehash

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"size": self.size, "hash": self.hash}
        if self.md5:
            d["md5"] = self.md5
        return d


@dataclass(frozen=True)
class DeltaEntry:
    """A safetensors file stored as an XOR delta against the same file of an earlier checkpoint.

    ``name`` is the logical file the tensor index points into; ``stored`` is the file on disk
    (listed in ``files``); ``base`` the sibling step directory holding the base, whose logical
    file must hash to ``base_hash``; ``size``/``hash`` describe the logical (decoded) file.
    """

    name: str
    stored: str
    base: str
    base_hash: str
    size: int
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {
            "stored": self.stored,
            "base": self.base,
            "base_hash": self.base_hash,
            "size": self.size,
            "hash": self.hash,
        }

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Any]) -> DeltaEntry:
        base = str(d["base"])
        if not STEP_DIR_RE.match(base):
            raise ValueError(f"delta base {base!r} is not a step directory")
        return cls(
            name, str(d["stored"]), base, str(d["base_hash"]), int(d["size"]), str(d["hash"])
        )


@dataclass(frozen=True)
class Manifest:
    """The parsed ``MANIFEST.json`` of one checkpoint."""

    step: int
    epoch: int | None
    created: str
    metrics: dict[str, float]
    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]
    aliases: dict[str, str] = field(default_factory=dict)  # tied tensor -> stored tensor
    world_size: int = 1
    extras: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    deltas: dict[str, DeltaEntry] = field(default_factory=dict)  # logical file -> its delta

    @property
    def total_bytes(self) -> int:
        """Bytes stored in this directory (delta files count as stored, not decoded)."""
        return sum(f.size for f in self.files.values())

    @property
    def bases(self) -> tuple[str, ...]:
        """Step directories this checkpoint's delta files decode against (directly)."""
        return tuple(sorted({d.base for d in self.deltas.values()}))

    def logical(self, name: str) -> tuple[int, str]:
        """(size, hash) of a logical safetensors file, whether stored plain or as a delta."""
        d = self.deltas.get(name)
        if d is not None:
            return d.size, d.hash
        entry = self.files[name]
        return entry.size, entry.hash

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "hash_algorithm": HASH_ALGO,
            "step": self.step,
            "epoch": self.epoch,
            "created": self.created,
            "metrics": self.metrics,
            "world_size": self.world_size,
            "extras": self.extras,
            "files": {k: v.to_json() for k, v in sorted(self.files.items())},
            "tensors": {k: v.to_json() for k, v in self.tensors.items()},
            "aliases": self.aliases,
            **({"deltas": {k: v.to_json() for k, v in sorted(self.deltas.items())}}
               if self.deltas else {}),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Manifest:
        if d.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} manifest")
        version = int(d.get("format_version", 0))
        if version > DELTA_FORMAT_VERSION:
            raise ValueError(f"format version {version} is newer than this modelver reads")
        files = {
            k: FileEntry(k, int(v["size"]), str(v["hash"]), v.get("md5"))
            for k, v in d["files"].items()
        }
        tensors = {k: TensorEntry.from_json(k, v) for k, v in d["tensors"].items()}
        deltas = {k: DeltaEntry.from_json(k, v) for k, v in (d.get("deltas") or {}).items()}
        if any(v.stored not in files for v in deltas.values()):
            raise ValueError("a delta's stored file is not listed in files")
        return cls(
            step=int(d["step"]),
            epoch=None if d.get("epoch") is None else int(d["epoch"]),
            created=str(d.get("created", "")),
            metrics=dict(d.get("metrics") or {}),
            files=files,
            tensors=tensors,
            aliases=dict(d.get("aliases") or {}),
            world_size=int(d.get("world_size", 1)),
            extras=dict(d.get("extras") or {}),
            format_version=version,
            deltas=deltas,
        )


def read_manifest(path: str | Path) -> Manifest:
    """Parse a checkpoint's manifest; a missing or unreadable one means "no checkpoint here"."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointNotFoundError(
            path, reason="no MANIFEST.json (incomplete or not a checkpoint)"
        )
    try:
        return Manifest.from_json(json.loads(mpath.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointCorruptedError(path, [f"unreadable manifest: {e}"]) from e


def delta_chain(path: Path, manifest: Manifest) -> list[tuple[Path, Manifest]]:
    """The sibling step directories a checkpoint's delta files need, nearest first (none when
    it is full); raises like :func:`read_manifest` when one is missing or unreadable."""
    chain: list[tuple[Path, Manifest]] = []
    todo = list(manifest.bases)
    while todo:
        base = todo.pop(0)
        if any(p.name == base for p, _ in chain):
            continue
        base_path = path.parent / base
        base_manifest = read_manifest(base_path)
        chain.append((base_path, base_manifest))
        todo += base_manifest.bases
    return chain


def check_sizes(path: Path, manifest: Manifest) -> list[str]:
    """Cheap structural check (no data read): every listed file exists with its size."""
    problems = []
    for name, entry in manifest.files.items():
        fp = path / name
        try:
            size = fp.stat().st_size
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if size != entry.size:
            problems.append(f"{name} has {size} bytes, manifest says {entry.size}")
    return problems


def verify_files(path: Path, manifest: Manifest, names: Iterable[str] | None = None) -> list[str]:
    """Full check: sizes and content hashes of the listed files."""
    problems = check_sizes(path, manifest)
    if problems:
        return problems
    for name in names if names is not None else sorted(manifest.files):
        hasher = hash_safetensors_file if name.endswith(".safetensors") else hash_file
        problem = hash_problem(name, partial(hasher, path / name), manifest.files[name].hash)
        if problem:
            problems.append(problem)
    return problems


def hash_problem(label: str, compute: Callable[[], str], expected: str) -> str | None:
    """What is wrong with content whose hash ``compute`` recomputes, if anything."""
    try:
        actual = compute()
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{label} is malformed: {e}"
    return None if actual == expected else f"{label} content hash differs from the manifest"


def iter_checkpoint_dirs(directory: Path) -> Iterator[tuple[int, Path]]:
    """Step directories that carry a manifest file (validity is checked by the caller)."""
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        m = STEP_DIR_RE.match(child.name)
        if m and (child / MANIFEST).is_file():
            yield int(m.group(1)), child


# --- safetensors --------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def plan_layout(tensors: list[PlannedTensor]) -> tuple[bytes, list[tuple[PlannedTensor, int, int]]]:
    """Header bytes and (tensor, start, end) data ranges relative to the data section."""
    order = sorted(tensors, key=lambda t: -DTYPES[t.dtype][1])  # stable: keeps name order
    header: dict[str, Any] = {}
    ranges = []
    pos = 0
    for t in order:
        header[t.name] = {
            "dtype": DTYPES[t.dtype][0],
            "shape": list(t.shape),
            "data_offsets": [pos, pos + t.nbytes],
        }
        ranges.append((t, pos, pos + t.nbytes))
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw, ranges


WRITE_SLICE = 1 << 20


def write_all(f: IO[bytes], data: memoryview | bytes) -> None:
    """Write everything, 1 MiB per call: one huge write() stalls in the kernel's dirty-page
    throttling (measured here: 1 GiB in 1.0-2.2 s as 64+ MiB calls, 1.0 s as 1 MiB calls)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = f.write(view[:WRITE_SLICE])
        if n is None:  # pragma: no cover - raw files always return a count
            n = view.nbytes
        view = view[n:]


def fdatasync_path(path: Path) -> None:
    """Flush a file's data and the metadata needed to read it back (its size), not its times:
    the manifest and directory fsyncs that follow make the commit durable. Measured here: one
    checkpoint of 16 files synced in 1.2 s with fdatasync, 2.1 s with fsync (one file: 1.2 s)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a directory's entries: new names, renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_safetensors_header(f: Any) -> tuple[int, dict[str, Any]]:
    """Return (data section start, header dict) of an open safetensors file."""
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError("file shorter than a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if n > 100 << 20:
        raise ValueError("safetensors header too large")
    header = json.loads(f.read(n))
    return 8 + n, header
