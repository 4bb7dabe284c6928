"""Content hashes, one read loop for all of them.

Three hashes name content here: MD5 is the id DVC stores a file under, SHA-256 the id of a Git
LFS object, XXH3-128 the checkpoint format's own integrity hash (fast enough to check every
restore). Stdlib and ``xxhash`` only, so every layer may use it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import xxhash

CHUNK = 16 << 20  # reads of whole files (publish, pull, verify)


def new_hasher(algo: str) -> Any:
    if algo == "xxh3":
        return xxhash.xxh3_128()
    if algo == "md5":
        return hashlib.md5(usedforsecurity=False)
    return hashlib.new(algo)


def update_from(h: Any, f: Any, buf: bytearray) -> Any:
    """Feed ``h`` everything left in the binary file ``f``, through ``buf`` (reused)."""
    view = memoryview(buf)
    while n := f.readinto(view):
        h.update(view[:n])
    return h


def file_digest(path: Path | str, algo: str) -> str:
    with open(path, "rb", buffering=0) as f:
        # no larger than the file: manifests and state.json are a few KiB, not 16 MiB to zero
        buf = bytearray(max(1, min(CHUNK, os.fstat(f.fileno()).st_size)))
        return str(update_from(new_hasher(algo), f, buf).hexdigest())


def md5_file(path: Path | str) -> str:
    """The id DVC stores a file under."""
    return file_digest(path, "md5")


def sha256_file(path: Path | str) -> str:
    """The id Git LFS stores a file under."""
    return file_digest(path, "sha256")


def md5_parts(parts: Iterable[bytes | memoryview]) -> str:
    """MD5 of bytes in memory (releases the GIL on large buffers: runs beside the writes)."""
    h = hashlib.md5(usedforsecurity=False)
    for part in parts:
        h.update(part)
    return h.hexdigest()


def xxh3_bytes(data: bytes | memoryview) -> str:
    h = xxhash.xxh3_128()
    h.update(data)
    return str(h.hexdigest())
