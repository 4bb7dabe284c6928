"""Per-rank index shards of DCP chunks: a manifest that scales with the number of ranks.

Under torch.distributed each rank indexes the chunks it wrote in its own
``dcp-<component>/index-NNNNN.json`` beside its data file (one entry per chunk: file, dtype,
shape, byte range, hash), and rank 0's ``MANIFEST.json`` lists those files with their sizes and
hashes (``Manifest.index``) instead of every chunk. So rank 0 neither gathers nor writes the
whole index, and a reader loads only the shards it needs: a restoring rank its own (at the
world size of the save), ``verify``, ``diff`` and ``export`` all of them.

A shard is untrusted like the manifest: hash-checked against its manifest entry, every entry
checked as :meth:`Manifest.from_json` checks its own (a file the manifest lists, bytes inside
it, no name twice).

The shards are also the only record of the chunk layout (since format 4): a chunk's box is
the offsets in its name, ``<tensor>@<offsets>``, and the shape of its entry, so ``state.json``
holds each sharded tensor's shape and dtype only and no process parses the boxes of chunks it
does not read. :func:`chunk_layout` rebuilds the layout from the entries read, and
:func:`cover_problem` checks that it tiles what a reader fills: DCP reads whatever chunks meet a
box and silently leaves the rest unfilled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from modelver import untrusted
from modelver.checkpoint import format as fmt
from modelver.errors import CheckpointCorruptedError, MalformedDataError

INDEX_RE = re.compile(r"^index-(\d{5,})\.json$")
OFFSETS_RE = re.compile(r"^\d{1,19}(,\d{1,19})*$", re.ASCII)
MAX_PAIRS = 1 << 22  # chunk pairs compared per box: a real layout needs a few per chunk


@dataclasses.dataclass(frozen=True)
class Chunk:
    name: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ShardedTensor:
    """A sharded tensor of ``state.json`` with the chunks of it that were read."""

    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


def index_name(rank: int) -> str:
    return f"index-{rank:05d}.json"


def rank_of(name: str) -> int | None:
    """The rank whose index (``.../index-NNNNN.json``) or chunk file (``NNNNN.safetensors``)
    ``name`` is, None for any other file."""
    base = name.rsplit("/", 1)[-1]
    m = INDEX_RE.match(base)
    if m:
        return int(m.group(1))
    stem = base.removesuffix(".safetensors")
    return int(stem) if stem != base and stem.isdigit() else None


def encode(entries: Mapping[str, fmt.TensorEntry]) -> bytes:
    """One rank's shard: compact JSON (C encoder), entries in the order written."""
    return json.dumps(
        {"tensors": {k: v.to_json() for k, v in entries.items()}}, separators=(",", ":")
    ).encode()


def read_index(
    path: Path, manifest: fmt.Manifest, *, only: Collection[str] | None = None
) -> fmt.Manifest:
    """``manifest`` with the chunk entries of its index shards (those in ``only``; None: all)."""
    if not manifest.index:
        return manifest
    tensors = dict(manifest.tensors)
    for name in manifest.index:
        if only is not None and name not in only:
            continue
        data = fmt.read_listed(path, manifest, name)
        try:
            doc = untrusted.mapping(untrusted.load_json(data, what=name), what=name,
                                    field="content")
            for k, v in untrusted.mapping(doc.get("tensors"), what=name, field="tensors").items():
                entry = fmt.TensorEntry.from_json(k, v)
                fmt.check_place(k, entry, manifest.files, manifest.deltas)
                if k in tensors:
                    raise MalformedDataError(name, f"tensors.{k}", k,
                                             expected="a name indexed once")
                tensors[k] = entry
        except MalformedDataError as e:
            raise CheckpointCorruptedError(path, [f"{name}: {e.message}"]) from e
    return dataclasses.replace(manifest, tensors=tensors)


def _chunks(manifest: fmt.Manifest) -> dict[str, fmt.TensorEntry]:
    """DCP chunks live in ``dcp-<component>/``, other tensors in top-level files (a checkpoint
    without such a folder is not walked tensor by tensor: it may hold 10^5 of them)."""
    if not any(f.startswith("dcp-") for f in manifest.files):
        return {}
    return {n: e for n, e in manifest.tensors.items() if e.file.startswith("dcp-")}


def chunk_names(manifest: fmt.Manifest) -> set[str]:
    return set(_chunks(manifest))


def chunk_layout(
    sharded: Mapping[str, Any], manifest: fmt.Manifest
) -> dict[str, ShardedTensor]:
    """The sharded tensors of ``state.json`` (shapes and dtypes already checked) with their
    chunks among ``manifest``'s entries; :class:`MalformedDataError` for a chunk entry that is
    no box inside a sharded tensor of its dtype."""
    found: dict[str, list[Chunk]] = {n: [] for n in sharded}
    for name, e in _chunks(manifest).items():
        fqn, _, offs = name.rpartition("@")
        spec = sharded.get(fqn)
        shape = () if spec is None else tuple(spec["shape"])
        offsets = _offsets(offs)
        if (
            spec is None or offsets is None
            or e.dtype != spec["dtype"]
            or len(offsets) != len(shape) or len(e.shape) != len(shape)
            or any(o + n > d for o, n, d in zip(offsets, e.shape, shape, strict=True))
        ):
            raise MalformedDataError(e.file, f"tensors.{name}", name,
                                     expected="a chunk inside a sharded tensor of its dtype")
        found[fqn].append(Chunk(name, offsets, e.shape))
    return {
        n: ShardedTensor(spec["dtype"], tuple(spec["shape"]), tuple(found[n]))
        for n, spec in sharded.items()
    }


def _offsets(text: str) -> tuple[int, ...] | None:
    if text == "":  # a 0-d tensor
        return ()
    return tuple(int(o) for o in text.split(",")) if OFFSETS_RE.match(text) else None


def cover_problem(
    name: str, tensor: ShardedTensor, offsets: Sequence[int], sizes: Sequence[int]
) -> str | None:
    """None when the chunks tile the box (``offsets``, ``sizes``) exactly once.

    Clipped to the box, the chunks must fill its volume and be pairwise disjoint; a sweep along
    the first dimension compares only chunks whose rows meet (one per row band when sharded
    along rows, as FSDP shards), so a real layout costs O(n log n)."""
    if 0 in sizes:
        return None
    ends = [o + n for o, n in zip(offsets, sizes, strict=True)]
    inside = []
    for c in tensor.chunks:
        lo = tuple(max(a, b) for a, b in zip(c.offsets, offsets, strict=True))
        hi = tuple(min(a + n, e) for a, n, e in zip(c.offsets, c.sizes, ends, strict=True))
        if all(x < y for x, y in zip(lo, hi, strict=True)):
            inside.append((lo, hi))
    where = f"{list(offsets)}+{list(sizes)}" if tuple(sizes) != tensor.shape else "it"
    filled = sum(math.prod(y - x for x, y in zip(lo, hi, strict=True)) for lo, hi in inside)
    if filled < math.prod(sizes):
        return f"{name}: the chunks read for {where} leave part of it without data"
    overlap = f"{name}: the chunks read for {where} overlap"
    if filled > math.prod(sizes) or (not sizes and len(inside) > 1):
        return overlap
    inside.sort()
    active: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    budget = MAX_PAIRS
    for lo, hi in inside if sizes else ():
        active = [b for b in active if b[1][0] > lo[0]]
        budget -= len(active)
        if budget < 0:
            return f"{name}: {len(inside)} chunks are too many to check against each other"
        if any(all(x < bh and bl < y for x, y, bl, bh in zip(lo, hi, *b, strict=True))
               for b in active):
            return overlap
        active.append((lo, hi))
    return None
