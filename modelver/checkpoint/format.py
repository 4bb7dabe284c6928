"""On-disk checkpoint format: the step directory, its MANIFEST.json (the commit marker) and
how its files are opened, checked, listed and made durable.

A checkpoint is a directory ``step-NNNNNNNN``. Readers trust nothing that is not listed in a
valid ``MANIFEST.json``; the manifest is written last, after every file is fsync'd. One
safetensors file (dtypes, header, layout, tree hash) is :mod:`modelver.checkpoint.tensorfile`.
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from modelver import untrusted
from modelver.checkpoint.tensorfile import (
    DTYPES,
    HASH_ALGO,
    MAX_DIMS,
    MAX_SIZE,
    READ_BUF,
    hash_safetensors,
)
from modelver.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    CheckpointUnreadableError,
    MalformedDataError,
    UnsafeCheckpointError,
    UnsafePathError,
    clip,
)
from modelver.hashing import new_hasher, update_from, xxh3_bytes
from modelver.untrusted import RUN_ID_RE, STEP_DIR_RE

FORMAT_NAME = "modelver-checkpoint"
FORMAT_VERSION = 1
DELTA_FORMAT_VERSION = 2  # a manifest with delta-encoded files: older readers refuse it
INDEX_FORMAT_VERSION = 4  # DCP chunks and their boxes only in per-rank shards (.shardindex)
DELTA_SUFFIX = ".delta"
MANIFEST = "MANIFEST.json"
STATE_FILE = "state.json"
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


_WHAT = "MANIFEST.json"


def _int(value: object, field: str, *, minimum: int = 0, maximum: int = MAX_SIZE) -> int:
    return untrusted.integer(value, what=_WHAT, field=field, minimum=minimum, maximum=maximum)


def _str(value: object, field: str, max_len: int = 256) -> str:
    return untrusted.string(value, what=_WHAT, field=field, max_len=max_len)


def _member(value: object, field: str, where: str | Path) -> str:
    """A file name inside the step directory, in its one normal spelling."""
    rel = untrusted.relative_path(value, field=field, root=where)
    if str(rel) != value:
        raise UnsafePathError(field, value, root=where, reason="not in normal form")
    return str(rel)


def _shape(value: object, field: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise MalformedDataError(_WHAT, field, value, expected=f"a list of ≤ {MAX_DIMS} sizes")
    return tuple(_int(x, field) for x in value)


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
        """One index entry, its byte count checked against dtype and shape (no allocation
        ever trusts a shape alone). Its file must be one the manifest lists, whose names are
        checked as paths once: :meth:`Manifest.from_json` refuses any other."""
        field = f"tensors.{name}"
        d = untrusted.mapping(d, what=_WHAT, field=field)
        dtype = _str(d.get("dtype"), f"{field}.dtype")
        if dtype not in DTYPES:
            raise MalformedDataError(_WHAT, f"{field}.dtype", dtype, expected="a known dtype")
        shape = _shape(d.get("shape"), f"{field}.shape")
        offsets = d.get("offsets")
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise MalformedDataError(_WHAT, f"{field}.offsets", offsets, expected="[begin, end]")
        begin, end = (_int(x, f"{field}.offsets") for x in offsets)
        if end - begin != math.prod(shape) * DTYPES[dtype][1]:
            raise MalformedDataError(
                _WHAT, f"{field}.offsets", offsets, expected=f"{shape} {dtype} bytes"
            )
        return cls(
            name=name,
            file=_str(d.get("file"), f"{field}.file", max_len=4096),
            dtype=dtype,
            shape=shape,
            offsets=(begin, end),
            hash=_str(d.get("hash"), f"{field}.hash"),
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

    @classmethod
    def from_json(cls, name: str, d: object) -> FileEntry:
        d = untrusted.mapping(d, what=_WHAT, field=f"files.{name}")
        md5 = d.get("md5")
        return cls(
            name,
            _int(d.get("size"), f"files.{name}.size"),
            _str(d.get("hash"), f"files.{name}.hash"),
            None if md5 is None else _str(md5, f"files.{name}.md5"),
        )


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
    def from_json(
        cls, name: str, d: Mapping[str, Any], *, where: str | Path = "the checkpoint"
    ) -> DeltaEntry:
        field = f"deltas.{name}"
        d = untrusted.mapping(d, what=_WHAT, field=field)
        return cls(
            _member(name, "deltas key", where),
            _member(d.get("stored"), f"{field}.stored", where),
            untrusted.step_dirname(d.get("base"), field=f"{field}.base", root=where),
            _str(d.get("base_hash"), f"{field}.base_hash"),
            _int(d.get("size"), f"{field}.size"),
            _str(d.get("hash"), f"{field}.hash"),
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
    run: str | None = None  # the run it belongs to (checkpoint.runid), None without runs
    # per-rank index files of DCP chunks (checkpoint.shardindex): their entries are in
    # ``tensors`` only once read (``read_index``), so a rank reads just its own
    index: tuple[str, ...] = ()

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
            **({"run": self.run} if self.run is not None else {}),
            **({"index": list(self.index)} if self.index else {}),
        }

    @classmethod
    def from_json(cls, d: object, *, where: str | Path = "the checkpoint") -> Manifest:
        """The one place a manifest is checked: every path relative and inside the step
        directory, every number an int in range, every tensor's byte range inside its file.

        Raises :class:`UnsafePathError` or :class:`MalformedDataError` (both ValueErrors)
        naming the field and the value."""
        d = untrusted.mapping(d, what=_WHAT, field="the manifest")
        if d.get("format") != FORMAT_NAME:
            raise MalformedDataError(_WHAT, "format", d.get("format"), expected=FORMAT_NAME)
        version = _int(d.get("format_version", 0), "format_version", maximum=1 << 30)
        if version > INDEX_FORMAT_VERSION:
            raise MalformedDataError(
                _WHAT, "format_version", version,
                expected=f"at most {INDEX_FORMAT_VERSION} (a newer modelver wrote it)",
            )
        raw_files = untrusted.mapping(d.get("files"), what=_WHAT, field="files")
        files = {
            _member(k, "files key", where): FileEntry.from_json(k, v)
            for k, v in raw_files.items()
        }
        raw_deltas = untrusted.mapping(d.get("deltas") or {}, what=_WHAT, field="deltas")
        deltas = {k: DeltaEntry.from_json(k, v, where=where) for k, v in raw_deltas.items()}
        for k, v in deltas.items():
            if v.stored not in files or k in files:
                raise MalformedDataError(
                    _WHAT, f"deltas.{k}.stored", v.stored, expected="a file listed in files"
                )
        raw_tensors = untrusted.mapping(d.get("tensors"), what=_WHAT, field="tensors")
        tensors = {k: TensorEntry.from_json(k, v) for k, v in raw_tensors.items()}
        stored = {v.stored for v in deltas.values()}
        for k, t in tensors.items():
            check_place(k, t, files, deltas, stored)
        index = d.get("index") or []
        if not isinstance(index, list) or not all(isinstance(n, str) and n in files
                                                  for n in index):
            raise MalformedDataError(_WHAT, "index", index, expected="files listed in files")
        aliases = dict(untrusted.mapping(d.get("aliases") or {}, what=_WHAT, field="aliases"))
        for k, v in aliases.items():
            if _str(v, f"aliases.{k}", max_len=4096) not in tensors:
                raise MalformedDataError(_WHAT, f"aliases.{k}", v, expected="a stored tensor")
        epoch = d.get("epoch")
        run = d.get("run")
        if run is not None and not (isinstance(run, str) and RUN_ID_RE.fullmatch(run)):
            raise MalformedDataError(_WHAT, "run", run, expected="a run id (letters, digits, ._-)")
        return cls(
            step=_int(d.get("step"), "step"),
            epoch=None if epoch is None else _int(epoch, "epoch"),
            created=_str(d.get("created", ""), "created"),
            metrics=untrusted.metrics(d.get("metrics"), what=_WHAT),
            files=files,
            tensors=tensors,
            aliases=aliases,
            world_size=_int(d.get("world_size", 1), "world_size", minimum=1, maximum=1 << 24),
            extras=dict(untrusted.mapping(d.get("extras") or {}, what=_WHAT, field="extras")),
            format_version=version,
            deltas=deltas,
            run=run,
            index=tuple(index),
        )


def check_place(
    name: str,
    t: TensorEntry,
    files: Mapping[str, FileEntry],
    deltas: Mapping[str, DeltaEntry],
    stored: Collection[str] = (),
) -> None:
    """A tensor entry's file is a listed safetensors file and its bytes lie inside it."""
    if t.file in stored or not (t.file in files or t.file in deltas):
        raise MalformedDataError(
            _WHAT, f"tensors.{name}.file", t.file, expected="a safetensors file listed"
        )
    size = deltas[t.file].size if t.file in deltas else files[t.file].size
    if t.offsets[1] > size:
        raise MalformedDataError(
            _WHAT, f"tensors.{name}.offsets", list(t.offsets),
            expected=f"a range inside {t.file} ({size} bytes)",
        )


# --- opening files of a checkpoint (never through a symlink, never outside) ------------------


def manifest_token(path: Path) -> tuple[int, int] | None:
    """Identity of a checkpoint's manifest file (device, inode), None once it is gone: a
    reader that sees it change knows the checkpoint was retired or replaced, not damaged."""
    try:
        st = os.lstat(path / MANIFEST)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def retired(path: Path, token: tuple[int, int] | None) -> bool:
    """Whether the checkpoint read with manifest ``token`` is no longer the one at ``path``."""
    return token is None or manifest_token(path) != token


def unsafe(path: Path, e: UnsafePathError) -> UnsafeCheckpointError:
    """The checkpoint-level error for a path refused by :mod:`modelver.untrusted`."""
    reason = e.message[len(f"refusing {e.field} {clip(e.value)}: ") :].rsplit(" (root ", 1)[0]
    return UnsafeCheckpointError(path, e.field, e.value, reason=reason)


def member_error(path: Path, name: str, e: OSError) -> CheckpointCorruptedError:
    """The error for a listed file that could not be opened; raises if the checkpoint itself
    vanished (retired by a writer) since that is not damage."""
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        if manifest_token(path) is None:
            raise CheckpointNotFoundError(path, reason="checkpoint was retired while being read")
        return CheckpointCorruptedError(path, [f"{name} is missing"])
    if e.errno == errno.ELOOP:
        return UnsafeCheckpointError(path, "file", name, reason="is a symlink")
    return CheckpointUnreadableError(path, name, e)


def open_fd(path: Path, name: str, *, field: str = "files key") -> int:
    """A read-only descriptor of the regular file ``name`` of step directory ``path``: inside
    it, through no symlink (O_NOFOLLOW for the last part), never blocking on a FIFO."""
    try:
        full = untrusted.inside(path, name, field=field)
    except UnsafePathError as e:
        raise unsafe(path, e) from e
    try:
        fd = os.open(full, _OPEN_FLAGS)
    except OSError as e:
        raise member_error(path, name, e) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointCorruptedError(path, [f"{name} is not a regular file"])
    return fd


def open_member(path: Path, name: str, *, field: str = "files key") -> io.FileIO:
    """:func:`open_fd` as an unbuffered binary file object."""
    return io.FileIO(open_fd(path, name, field=field), "rb", closefd=True)


def read_member(path: Path, name: str, *, limit: int) -> bytes:
    """The whole content of a small listed file (state.json, a rank file), size-capped."""
    with open_member(path, name) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise CheckpointCorruptedError(path, [f"{name} is {size} bytes, over {limit}"])
        try:
            return f.read()
        except OSError as e:
            raise member_error(path, name, e) from e


def read_listed(path: Path, manifest: Manifest, name: str) -> bytes:
    """A small JSON file the manifest lists (state.json, a rank file, an index shard), read
    whole under :data:`~modelver.untrusted.MAX_JSON_BYTES` and checked against its hash."""
    entry = manifest.files.get(name)
    if entry is None:
        raise CheckpointCorruptedError(path, [f"{name} is not listed in the manifest"])
    data = read_member(path, name, limit=untrusted.MAX_JSON_BYTES)
    if xxh3_bytes(data) != entry.hash:
        raise CheckpointCorruptedError(path, [f"{name} content hash differs"])
    return data


def read_manifest(path: str | Path) -> Manifest:
    """Parse and check a checkpoint's manifest; a missing one means "no checkpoint here".

    A step directory that is a symlink, a manifest that is one, or any entry leaving the
    directory is refused (:class:`UnsafeCheckpointError`); anything malformed is
    :class:`CheckpointCorruptedError`; an unreadable one :class:`CheckpointUnreadableError`."""
    path = Path(path)
    missing = CheckpointNotFoundError(
        path, reason="no MANIFEST.json (incomplete or not a checkpoint)"
    )
    try:
        if STEP_DIR_RE.match(path.name) and stat.S_ISLNK(os.lstat(path).st_mode):
            raise UnsafeCheckpointError(path, "step directory", path.name, reason="is a symlink")
        fd = os.open(path / MANIFEST, _OPEN_FLAGS)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise missing from e
        raise member_error(path, MANIFEST, e) from e
    with open(fd, "rb", buffering=0, closefd=True) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise missing
        if st.st_size > untrusted.MAX_JSON_BYTES:
            raise CheckpointCorruptedError(path, [f"{MANIFEST} is {st.st_size} bytes"])
        try:
            data = f.read()
        except OSError as e:
            raise member_error(path, MANIFEST, e) from e
    key = (str(path), xxh3_bytes(data))
    with _PARSED_LOCK:
        known = _PARSED.get(key)
        if known is not None:
            _PARSED.move_to_end(key)
            return known
    try:
        manifest = Manifest.from_json(untrusted.load_json(data, what=MANIFEST), where=path)
    except UnsafePathError as e:
        raise unsafe(path, e) from e
    except MalformedDataError as e:
        raise CheckpointCorruptedError(path, [f"unreadable manifest: {e.message}"]) from e
    with _PARSED_LOCK:
        _PARSED[key] = manifest
        if len(_PARSED) > _PARSED_MAX:
            _PARSED.popitem(last=False)
    return manifest


# A restore reads a manifest several times (choosing the checkpoint, checking its run, reading
# it), and checking one costs time per tensor: the bytes are read each time, the parse is
# reused when they are the same (a hash of them, not the file's identity, is the key). The
# save and retention threads read manifests too: one lock
_PARSED: OrderedDict[tuple[str, str], Manifest] = OrderedDict()
_PARSED_MAX = 8
_PARSED_LOCK = threading.Lock()


def delta_chain(path: Path, manifest: Manifest) -> list[tuple[Path, Manifest]]:
    """The sibling step directories a checkpoint's delta files need, nearest first (none when
    it is full); raises like :func:`read_manifest` when one is missing or unreadable."""
    chain: list[tuple[Path, Manifest]] = []
    todo = list(manifest.bases)
    while todo:
        base = todo.pop(0)
        if any(p.name == base for p, _ in chain):
            continue
        base_path = path.parent / base  # a step-NNNNNNNN name (checked): a sibling
        base_manifest = read_manifest(base_path)
        chain.append((base_path, base_manifest))
        todo += base_manifest.bases
    return chain


def check_sizes(
    path: Path, manifest: Manifest, names: Collection[str] | None = None
) -> list[str]:
    """Cheap structural check (no data read): every listed file (of ``names``, when given)
    exists with its size."""
    problems = []
    for name, entry in manifest.files.items():
        if names is not None and name not in names:
            continue
        try:
            fd = open_fd(path, name)
        except CheckpointCorruptedError as e:
            problems += e.problems
            continue
        try:
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size != entry.size:
            problems.append(f"{name} has {size} bytes, manifest says {entry.size}")
    return problems


def verify_files(path: Path, manifest: Manifest, names: Iterable[str] | None = None) -> list[str]:
    """Full check: sizes and content hashes of the listed files (``names``; None: all)."""
    names = sorted(manifest.files) if names is None else list(names)
    problems = check_sizes(path, manifest, set(names))
    if problems:
        return problems
    buf = bytearray(READ_BUF)
    for name in names:
        compute = partial(hash_member, path, name, buf)
        problem = hash_problem(name, compute, manifest.files[name].hash)
        if problem:
            problems.append(problem)
    return problems


def hash_member(path: Path, name: str, buf: bytearray | None = None) -> str:
    """The recorded kind of hash of one listed file (tree hash for safetensors files), read
    once through ``buf`` (a :data:`~modelver.checkpoint.tensorfile.READ_BUF` one by default)."""
    buf = buf if buf is not None else bytearray(READ_BUF)
    with open_member(path, name) as f:
        try:
            if name.endswith(".safetensors"):
                return hash_safetensors(f, buf)
            return str(update_from(new_hasher("xxh3"), f, buf).hexdigest())
        except OSError as e:
            raise member_error(path, name, e) from e


def hash_problem(label: str, compute: Callable[[], str], expected: str) -> str | None:
    """What is wrong with content whose hash ``compute`` recomputes, if anything."""
    try:
        actual = compute()
    except CheckpointNotFoundError:
        raise
    except CheckpointCorruptedError as e:
        return "; ".join(e.problems)
    except (ValueError, UnicodeDecodeError) as e:
        return f"{label} is malformed: {getattr(e, 'message', e)}"
    return None if actual == expected else f"{label} content hash differs from the manifest"


LIST_RETRIES = 5
RETIRING_SECONDS = 60.0  # how long a reader of a root keeps up with a writer retiring its finds
EMPTY_RELISTS = 3  # an empty listing is taken after this many more, unless an entry vanished


def while_retiring() -> Iterator[int]:
    """Attempts at reading "the newest" of a root: each fails only because a writer retired
    what it found, so keep trying (at least once) until the writer is outpaced or time is up;
    a count would give up under a fast ``keep_last=1`` writer on a loaded machine."""
    deadline = time.monotonic() + RETIRING_SECONDS
    attempt = 0
    while attempt == 0 or time.monotonic() < deadline:
        yield attempt
        attempt += 1


def dir_stamp(directory: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ctime_ns, st.st_nlink


def iter_checkpoint_dirs(directory: Path) -> Iterator[tuple[int, Path]]:
    """Step directories that carry a manifest file (validity is checked by the caller).

    Symlinked step directories and manifests are not followed; a directory that vanishes while
    listed (retention) is skipped."""
    entries: list[os.DirEntry[str]] = []
    for _ in range(LIST_RETRIES):  # readdir may miss an entry renamed in while it runs
        before = dir_stamp(directory)
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            return
        if before is not None and dir_stamp(directory) == before:
            break
    for child in entries:
        m = STEP_DIR_RE.match(child.name)
        if not m:
            continue
        try:
            if not child.is_dir(follow_symlinks=False):
                continue
            st = os.lstat(Path(child.path) / MANIFEST)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            yield int(m.group(1)), Path(child.path)


# --- durable writes -----------------------------------------------------------------------


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
