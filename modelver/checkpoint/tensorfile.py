"""One safetensors file: its dtypes, its header (parsed strictly), the layout the writer plans
and the tree hash every reader recomputes.

The files are written by :mod:`modelver.checkpoint.io` straight from tensor memory and stay
readable by the ``safetensors`` library. Tensors are ordered by element size so each data
offset is aligned for zero-copy views. No torch here: ``modelver list`` stays fast.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import xxhash

from modelver import untrusted
from modelver.errors import MalformedDataError
from modelver.hashing import new_hasher

HASH_ALGO = "xxh3-128"
# Hashing reads through one reused buffer. A plain file: 1 MiB, which stays in the CPU cache, so
# the hash reads cache, not memory (measured here, 0.5 GiB warm: 3-5.8 GB/s; 16 MiB: 1.5-2.4).
# A delta chain: 16 MiB, over its 4 MiB chunks, so each is decoded about once, not per read.
READ_BUF = 1 << 20
DECODED_BUF = 16 << 20
MAX_HEADER = 100 << 20  # a safetensors header (the writer's are a few KiB)
MAX_SIZE = 1 << 50  # any size or offset in a manifest or header: 1 PiB
MAX_DIMS = 64

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


def tree_hash(header: bytes | bytearray | memoryview, digests: Iterable[bytes]) -> str:
    """A safetensors file's hash: its header, then each tensor's digest in file order.

    Any changed byte changes a tensor digest or the header, so this detects what a plain content
    hash detects, while the writer hashes every tensor byte once, not twice.
    """
    h = new_hasher("xxh3")
    h.update(header)
    for d in digests:
        h.update(d)
    return str(h.hexdigest())


def hash_safetensors(f: Any, buf: bytearray) -> str:
    """:func:`tree_hash` recomputed from an open file-like object (a plain file or a decoded
    delta chain) in one pass through ``buf`` (:data:`READ_BUF` or :data:`DECODED_BUF` bytes,
    reused across files). Plain reads, not a mapping: a file truncated meanwhile is a short
    read and a ValueError, where a mapped page past the new end kills the process (SIGBUS).
    The buffer is filled whole, and each tensor inside it hashed from there: one read for
    many small tensors, not one each."""
    f.seek(0)
    start, header = read_safetensors_header(f)
    f.seek(0)
    head = f.read(start)
    if len(head) != start:
        raise ValueError("file is truncated")
    header.pop("__metadata__", None)
    view = memoryview(buf)
    digests = []
    at = held = 0  # the buffer's unhashed bytes are view[at:held]
    pos = 0
    for begin, end in sorted(tuple(v["data_offsets"]) for v in header.values()):
        if begin != pos:
            raise ValueError("tensor data ranges leave gaps or overlap")
        n = end - begin
        if n > held - at and n <= len(view):  # move what is left to the front, fill the rest
            view[: held - at] = view[at:held]
            held -= at
            at = 0
            held += _fill(f, view[held:])
        if n <= held - at:
            digests.append(xxhash.xxh3_128_digest(view[at : at + n]))
            at += n
        else:  # larger than the buffer: what it holds, then the rest through it
            h = new_hasher("xxh3")
            h.update(view[at:held])
            left = n - (held - at)
            at = held = 0
            while left:
                got = f.readinto(view[: min(left, len(view))])
                if not got:
                    raise ValueError("file is truncated")
                h.update(view[:got])
                left -= got
            digests.append(h.digest())
        pos = end
    if at != held or f.read(1):
        raise ValueError("bytes after the last tensor")
    return tree_hash(head, digests)


def _fill(f: Any, view: memoryview) -> int:
    """Read into ``view`` until it is full or the file ends; the bytes read."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def read_safetensors_header(f: Any) -> tuple[int, dict[str, Any]]:
    """Return (data section start, header dict) of an open safetensors file, every entry checked:
    a known dtype, a shape whose bytes fill exactly its range, every range inside the file.
    The checks are inline (a header can list 10^5 tensors); a value that fails one goes to
    :mod:`modelver.untrusted`, whose error names it."""
    size = getattr(f, "size", None)
    if size is None:
        size = os.fstat(f.fileno()).st_size
    what = f"safetensors header of {getattr(f, 'name', 'a file')}"
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError("file shorter than a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER or 8 + n > size:
        raise MalformedDataError(what, "length", n, expected=f"at most {min(MAX_HEADER, size)}")
    header = dict(untrusted.mapping(untrusted.load_json(f.read(n), what=what), what=what,
                                    field="header"))
    data = size - 8 - n
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise MalformedDataError(what, "__metadata__", meta, expected="string values")
    for name, v in header.items():
        if name == "__metadata__":
            continue
        if type(v) is not dict:  # parsed JSON: a dict's keys are strings
            v = untrusted.mapping(v, what=what, field=name)
        st_dtype = v.get("dtype")
        dtype = ST_TO_TORCH.get(st_dtype) if isinstance(st_dtype, str) else None
        if dtype is None:
            raise MalformedDataError(what, f"{name}.dtype", v.get("dtype"), expected="a dtype")
        shape = v.get("shape")
        if type(shape) is not list or len(shape) > MAX_DIMS:
            raise MalformedDataError(what, f"{name}.shape", shape, expected="a list of sizes")
        nbytes = DTYPES[dtype][1]
        for x in shape:
            if type(x) is not int or not 0 <= x <= MAX_SIZE:
                untrusted.integer(x, what=what, field=f"{name}.shape", maximum=MAX_SIZE)
            nbytes *= x
        offs = v.get("data_offsets")
        if type(offs) is not list or len(offs) != 2:
            raise MalformedDataError(what, f"{name}.data_offsets", offs, expected="[begin, end]")
        begin, end = offs
        for x in offs:
            if type(x) is not int or not 0 <= x <= data:
                untrusted.integer(x, what=what, field=f"{name}.data_offsets", maximum=data)
        if end - begin != nbytes:
            raise MalformedDataError(
                what, f"{name}.data_offsets", offs, expected=f"{shape} {dtype} inside the file"
            )
    return 8 + n, header


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
