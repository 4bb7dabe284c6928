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
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Collection, Mapping
from pathlib import Path

from modelver import untrusted
from modelver.checkpoint import format as fmt
from modelver.errors import CheckpointCorruptedError, MalformedDataError

INDEX_RE = re.compile(r"^index-(\d{5,})\.json$")


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
