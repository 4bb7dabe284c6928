"""XOR deltas of safetensors files against the previous checkpoint, for full training (opt-in).

When every weight changes, identical-file dedup saves nothing. Consecutive checkpoints still
share most high-order bits: the XOR of the raw bits, with each element's bytes regrouped into
planes (all first bytes, then all second bytes, …), compresses well with zstd, and XOR again
gives back the exact bits. A delta decodes only against its base (the same logical file one
checkpoint earlier), so chains are bounded: every K-th checkpoint is written in full.

Stored file (``<name>.safetensors.delta``)::

    b"MVDELTA1" | one zstd frame per chunk … | footer JSON | u64 footer length | b"MVDELTA1"

The footer lists chunks ``[start, length, itemsize, offset, compressed length]`` of the
logical file. Chunks follow the safetensors layout (the header, then each tensor in pieces of
at most 4 MiB), so a tensor decodes without its neighbours and a reader can start anywhere.
"""

from __future__ import annotations

import bisect
import json
import os
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from modelver import untrusted
from modelver.checkpoint import format as fmt
from modelver.checkpoint import tensorfile as tf
from modelver.errors import CheckpointCorruptedError, CheckpointNotFoundError

MAGIC = b"MVDELTA1"
PIECE = 4 << 20  # bytes per chunk (a multiple of every element size)
MAX_CHAIN = 10_000  # guards against a cycle of hand-edited manifests
MAX_FOOTER = 64 << 20  # a chunk table (1 TiB of state in 4 MiB chunks: ~10 MiB)
MAX_CHUNK = tf.MAX_HEADER + 8  # the largest chunk: a header (tensor pieces are PIECE)
_TRAILER = struct.Struct("<Q8s")

_local = threading.local()
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    """zstd and numpy release the GIL: chunks are (de)compressed on every core."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="modelver-delta")
        return _pool


def _compressor(level: int) -> zstandard.ZstdCompressor:
    key = f"c{level}"
    c = getattr(_local, key, None)
    if c is None:
        c = zstandard.ZstdCompressor(level=level)
        setattr(_local, key, c)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def _u8(view: memoryview | bytes) -> np.ndarray:
    return np.frombuffer(view, dtype=np.uint8)


# --- encoding -----------------------------------------------------------------------------------


@dataclass
class _Kept:
    """The last saved content of one logical file: what the next save's delta is taken against."""

    header: bytes
    data: np.ndarray  # uint8, the whole logical file
    hash: str
    stored_plain: bool


def _pieces(header: bytes, parts: Sequence[tuple[memoryview, int]]) -> list[tuple[Any, int, int]]:
    """(new bytes, logical start, element size) per chunk: the header, then each tensor's
    pieces of at most :data:`PIECE` bytes."""
    out: list[tuple[Any, int, int]] = [(memoryview(header), 0, 1)] if header else []
    pos = len(header)
    for view, itemsize in parts:
        step = PIECE - PIECE % itemsize
        for lo in range(0, view.nbytes, step):
            piece = view[lo : lo + step]
            out.append((piece, pos + lo, itemsize))
        pos += view.nbytes
    return out


class DeltaEncoder:
    """Keeps the last checkpoint's bytes in host memory (one copy of the state) and encodes the
    next checkpoint's files against them.

    ``full_every``: every K-th checkpoint is full, so a restore decodes at most K-1 deltas.
    A file is stored plain when it is new, changed layout, is unchanged against a plain base
    (identical files dedup in DVC), or when its delta would save less than ``min_saving``.
    """

    def __init__(self, *, full_every: int, level: int = 1, min_saving: float = 0.05) -> None:
        if full_every < 2:
            raise ValueError("delta chains need full_every >= 2 (1 would make every save full)")
        self.full_every = full_every
        self.level = level
        self.min_saving = min_saving
        self._kept: dict[str, _Kept] = {}
        self._base: str | None = None  # step dir the kept bytes belong to; None: unusable
        self._chain = 0  # deltas since the last full checkpoint
        self._seen: set[str] = set()
        self._seeding: threading.Thread | None = None

    def begin(self, root: Path, step: int) -> str | None:
        """Start a save; return the base step directory, or None for a full checkpoint.

        The kept bytes stay unusable until :meth:`finish`, so a failed save leads to a full
        checkpoint next time rather than a delta against bytes that never reached the disk.
        """
        self.join()
        base, self._base = self._base, None
        self._seen = set()
        if base is None or self._chain + 1 >= self.full_every:
            return None
        m = fmt.STEP_DIR_RE.match(base)
        if m is None or int(m.group(1)) >= step:
            return None  # replacing the base itself, or going back in steps
        try:
            on_disk = fmt.read_manifest(root / base)
        except (CheckpointNotFoundError, CheckpointCorruptedError):
            return None
        for name, kept in self._kept.items():
            if name not in on_disk.files and name not in on_disk.deltas:
                return None
            if on_disk.logical(name)[1] != kept.hash:
                return None
        return base

    def seed(self, path: Path) -> None:
        """Continue the chain of a restored checkpoint: its logical files become the kept bytes,
        so the first save of a resumed process (each ``dvc repro``) can be a delta too.

        The files are read (a delta chain decoded again) on a background thread while training
        goes on; the next :meth:`begin` waits for it. On any read problem the encoder stays
        unseeded and that save is full."""
        self.join()
        self._base, self._kept = None, {}  # no second copy of the state while seeding
        self._seeding = threading.Thread(
            target=self._seed, args=(path,), name="modelver-delta-seed", daemon=True
        )
        self._seeding.start()

    def join(self) -> None:
        """Wait for a seed started by :meth:`seed` (before a save, and on close)."""
        if self._seeding is not None:
            self._seeding.join()
            self._seeding = None

    def _seed(self, path: Path) -> None:
        try:
            manifest = fmt.read_manifest(path)
            depth = len(fmt.delta_chain(path, manifest))
            kept: dict[str, _Kept] = {}
            # the files this encoder writes: not the shard files DCP writes into dcp-*/
            names = {e.file for e in manifest.tensors.values() if "/" not in e.file}
            for name in sorted(names):
                with open_logical(path, manifest, name) as f:
                    data = np.empty(f.size, dtype=np.uint8)
                    if f.pread_into(0, data.data) != f.size:
                        return
                hlen = 8 + int.from_bytes(data[:8].tobytes(), "little")
                stored_plain = name not in manifest.deltas
                kept[name] = _Kept(data[:hlen].tobytes(), data, f.hash, stored_plain)
        except Exception:  # an optimisation only: the next save is then full
            return
        self._kept, self._base, self._chain = kept, path.name, depth

    def finish(self, step_dir: str, *, used_delta: bool) -> None:
        """The checkpoint is committed: its bytes become the next base."""
        self._kept = {k: v for k, v in self._kept.items() if k in self._seen}
        self._base = step_dir
        self._chain = self._chain + 1 if used_delta else 0

    def keep(
        self, name: str, header: bytes, parts: Sequence[tuple[memoryview, int]], file_hash: str
    ) -> None:
        """Remember a file stored plain (copied into the buffer kept from the last save)."""
        self._seen.add(name)
        size = len(header) + sum(v.nbytes for v, _ in parts)
        kept = self._kept.get(name)
        data = kept.data if kept is not None and kept.data.size == size else None
        if data is None:
            data = np.empty(size, dtype=np.uint8)
        for piece, start, _ in _pieces(header, parts):
            data[start : start + piece.nbytes] = _u8(piece)
        self._kept[name] = _Kept(header, data, file_hash, stored_plain=True)

    def encode(
        self,
        name: str,
        header: bytes,
        parts: Sequence[tuple[memoryview, int]],
        file_hash: str,
    ) -> tuple[list[bytes], str] | None:
        """(the stored delta file's content, the base's hash), or None to store the file plain.
        Either way the kept copy becomes this content."""
        size = len(header) + sum(v.nbytes for v, _ in parts)
        kept = self._kept.get(name)
        if not (kept is not None and kept.header == header and kept.data.size == size):
            self.keep(name, header, parts, file_hash)
            return None
        self._seen.add(name)
        if file_hash == kept.hash and kept.stored_plain:
            return None  # unchanged: the identical plain file dedups
        level = self.level
        base_hash = kept.hash

        def one(job: tuple[Any, int, int]) -> bytes:
            piece, start, itemsize = job
            new = _u8(piece)
            old = kept.data[start : start + new.size]
            x = np.bitwise_xor(new, old)
            old[...] = new
            if itemsize > 1:
                x = np.ascontiguousarray(x.reshape(-1, itemsize).T)
            return _compressor(level).compress(x)

        jobs = _pieces(header, parts)
        frames = list(_threads().map(one, jobs))
        kept.hash = file_hash
        chunks = []
        offset = len(MAGIC)
        for (piece, start, itemsize), frame in zip(jobs, frames, strict=True):
            chunks.append([start, piece.nbytes, itemsize, offset, len(frame)])
            offset += len(frame)
        footer = json.dumps({"size": size, "chunks": chunks}, separators=(",", ":")).encode()
        stored = offset + len(footer) + _TRAILER.size
        if stored > (1 - self.min_saving) * size:
            kept.stored_plain = True
            return None
        kept.stored_plain = False
        return [MAGIC, *frames, footer, _TRAILER.pack(len(footer), MAGIC)], base_hash


# --- decoding -----------------------------------------------------------------------------------


class _DeltaFile:
    """A stored delta file: its chunk table, and the XOR bytes of one chunk on request."""

    def __init__(self, step_dir: Path, stored: str, expected_size: int) -> None:
        self.path = step_dir / stored
        self.fd = fmt.open_fd(step_dir, stored, field="deltas.stored")
        try:
            total = os.fstat(self.fd).st_size
            head = os.pread(self.fd, len(MAGIC), 0)
            tail = os.pread(self.fd, _TRAILER.size, max(0, total - _TRAILER.size))
            if head != MAGIC or len(tail) != _TRAILER.size:
                raise ValueError("not a modelver delta file")
            flen, magic = _TRAILER.unpack(tail)
            # every size is checked against the file before anything is read or allocated
            body_end = total - _TRAILER.size - flen
            if magic != MAGIC or body_end < len(MAGIC) or flen > MAX_FOOTER:
                raise ValueError("delta file trailer is damaged")
            what = f"delta footer of {stored}"
            footer = untrusted.mapping(
                untrusted.load_json(os.pread(self.fd, flen, body_end), what=what),
                what=what, field="footer",
            )
            rows = footer.get("chunks")
            if not isinstance(rows, list) or not all(
                isinstance(c, list) and len(c) == 5 for c in rows
            ):
                raise ValueError("delta chunk table is not a list of 5-number rows")
            self.chunks = [
                tuple(untrusted.integer(x, what=what, field="chunks", maximum=tf.MAX_SIZE)
                      for x in c)
                for c in rows
            ]
            pos, frame_at = 0, len(MAGIC)
            for start, length, itemsize, off, clen in self.chunks:
                if start != pos or itemsize not in (1, 2, 4, 8) or length % itemsize:
                    raise ValueError("delta chunks leave gaps")
                if length > MAX_CHUNK or off != frame_at or off + clen > body_end:
                    raise ValueError("delta chunk lies outside the file")
                pos += length
                frame_at = off + clen
            if pos != expected_size or footer.get("size") != expected_size:
                raise ValueError("delta file size differs from the manifest")
            self.starts = [c[0] for c in self.chunks]
        except BaseException:
            os.close(self.fd)
            raise

    def decode(self, i: int) -> np.ndarray:
        """Chunk ``i``'s XOR bytes in element order (a strided view when split into planes)."""
        _, length, itemsize, off, clen = self.chunks[i]
        frame = os.pread(self.fd, clen, off)
        if len(frame) != clen:
            raise ValueError("delta file is truncated")
        raw = _decompressor().decompress(frame, max_output_size=length)
        if len(raw) != length:
            raise ValueError("delta chunk decodes to the wrong size")
        x = _u8(raw)
        return x.reshape(itemsize, -1).T if itemsize > 1 else x

    def xor_into(self, i: int, x: np.ndarray, dest: np.ndarray, offset: int) -> None:
        """XOR decoded chunk ``i`` into ``dest``, which holds logical bytes from ``offset`` on."""
        start, length = self.chunks[i][0], self.chunks[i][1]
        lo, hi = max(start, offset), min(start + length, offset + dest.size)
        if lo == start and hi == start + length:
            target = dest[lo - offset : hi - offset].reshape(x.shape)
            np.bitwise_xor(target, x, out=target)
        else:
            flat = np.ascontiguousarray(x).reshape(-1)[lo - start : hi - start]
            part = dest[lo - offset : hi - offset]
            np.bitwise_xor(part, flat, out=part)

    def overlapping(self, lo: int, hi: int) -> range:
        first = max(0, bisect.bisect_right(self.starts, lo) - 1)
        last = bisect.bisect_left(self.starts, hi)
        return range(first, last)

    def close(self) -> None:
        os.close(self.fd)


class LogicalFile:
    """Read-only, file-like view of one logical safetensors file of a checkpoint: the plain file,
    or its delta decoded over its base chain. ``pread_into`` is safe from several threads."""

    def __init__(
        self, path: Path, manifest: fmt.Manifest, name: str, *, _depth: int = 0
    ) -> None:
        self.size, self.hash = manifest.logical(name)
        self.pos = 0
        self._base: LogicalFile | None = None
        self._delta: _DeltaFile | None = None
        self._fd: int | None = None
        self._root: LogicalFile | None = None  # the plain file at the start of the chain
        self._deltas: list[_DeltaFile] = []  # every delta from the root's successor to here
        d = manifest.deltas.get(name)
        if d is None:
            self._fd = fmt.open_fd(path, name)
            on_disk = os.fstat(self._fd).st_size
            if on_disk != self.size:  # what every allocation from the index is bounded by
                os.close(self._fd)
                self._fd = None
                raise CheckpointCorruptedError(
                    path, [f"{name} has {on_disk} bytes, manifest says {self.size}"]
                )
            return
        base_dir = path.parent / d.base
        problem = None
        try:
            bm = fmt.read_manifest(base_dir)
        except CheckpointNotFoundError:
            problem = f"{name} is a delta against {d.base}, which is missing"
        else:
            if name not in bm.files and name not in bm.deltas:
                problem = f"{name}: its delta base {d.base} has no such file"
            elif bm.logical(name) != (d.size, d.base_hash) and bm.logical(name)[1] == d.base_hash:
                problem = f"{name}: its delta base {d.base} has another size"
            elif bm.logical(name)[1] != d.base_hash:
                problem = f"{name}: its delta base {d.base} was replaced"
            elif _depth >= MAX_CHAIN or bm.step >= manifest.step:
                problem = f"{name}: the delta chain through {d.base} does not end"
        if problem:
            raise CheckpointCorruptedError(path, [problem])
        try:
            self._delta = _DeltaFile(path, d.stored, self.size)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointCorruptedError(path, [f"{d.stored} is malformed: {e}"]) from e
        try:
            self._base = LogicalFile(base_dir, bm, name, _depth=_depth + 1)
        except BaseException:
            self._delta.close()
            raise
        self._root = self._base._root or self._base
        self._deltas = [*self._base._deltas, self._delta]

    def pread_into(self, offset: int, view: memoryview) -> int:
        """Fill ``view`` with logical bytes from ``offset``; return how many were available."""
        n = max(0, min(view.nbytes, self.size - offset))
        view = view.cast("B")[:n]
        if self._fd is not None:
            got = 0
            while got < n:
                r = os.preadv(self._fd, [view[got:]], offset + got)
                if r == 0:
                    break
                got += r
            return got
        # XOR is associative: the root's bytes, then every delta of the chain in any order.
        # Chunks are decompressed in parallel (the costly part); the XOR into one place of
        # ``dest`` is serialised by a lock per chunk position (all levels share the layout)
        assert self._root is not None
        got = self._root.pread_into(offset, view)
        if got < n:
            return got
        dest = _u8(view) if n else np.empty(0, np.uint8)
        if not dest.flags.writeable:
            raise ValueError("a delta can only be decoded into writable memory")
        jobs = [(d, i) for d in self._deltas for i in d.overlapping(offset, offset + n)]
        locks = {d.chunks[i][0]: threading.Lock() for d, i in jobs}

        def one(job: tuple[_DeltaFile, int]) -> None:
            d, i = job
            try:
                x = d.decode(i)
                with locks[d.chunks[i][0]]:
                    d.xor_into(i, x, dest, offset)
            except (ValueError, zstandard.ZstdError) as e:
                raise CheckpointCorruptedError(d.path.parent, [f"{d.path.name}: {e}"]) from e

        if len(jobs) > 1:
            list(_threads().map(one, jobs))
        elif jobs:
            one(jobs[0])
        return n

    # file-like interface (sequential readers: restore, hashing, header parsing)
    def readinto(self, view: memoryview | bytearray) -> int:
        n = self.pread_into(self.pos, memoryview(view))
        self.pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else n
        buf = bytearray(max(0, min(n, self.size - self.pos)))
        got = self.readinto(buf)
        return bytes(buf[:got])

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.size + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._delta is not None:
            self._delta.close()
            self._delta = None
        if self._base is not None:
            self._base.close()
            self._base = None

    def __enter__(self) -> LogicalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_logical(path: Path, manifest: fmt.Manifest, name: str) -> LogicalFile:
    """Open a checkpoint's safetensors file for reading, decoding a delta chain if it is one."""
    return LogicalFile(path, manifest, name)
