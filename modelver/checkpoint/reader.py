"""Read a checkpoint back: tensors straight into their destination, state.json validated in full.

Every file is hash-checked first, then read sequentially into the destination tensors' own
memory (the page cache serves the second pass), so a corrupted file never half-overwrites a
live model; state.json is checked entirely before any caller acts on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import xxhash

from modelver import untrusted
from modelver.checkpoint import format as fmt
from modelver.checkpoint import tensorfile as tf
from modelver.checkpoint.delta import LogicalFile, open_logical
from modelver.checkpoint.io import BATCH_BYTES, SMALL_TENSOR, bytes_view
from modelver.checkpoint.shardindex import chunk_layout, chunk_names
from modelver.checkpoint.state import prepare_rng, unflatten
from modelver.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    CheckpointUnreadableError,
    MalformedDataError,
)


def readinto_exact(f: Any, view: memoryview) -> bool:
    while view.nbytes:
        n = f.readinto(view)
        if not n:
            return False
        view = view[n:]
    return True


KEEP_OPEN = 256  # files held open between the hash pass and the read pass of a restore


def read_tensors(
    path: Path,
    manifest: fmt.Manifest,
    *,
    into: Mapping[str, torch.Tensor] | None = None,
    names: set[str] | None = None,
    verify: bool = True,
) -> dict[str, torch.Tensor]:
    """Read tensors (all, or those in files holding ``names``), verifying each file's hash.

    A tensor in ``into`` with the saved shape and dtype, contiguous on the CPU, is filled in
    place: then every file is hash-checked first (a sequential pass that the page cache serves
    to the second), so a corrupted file never leaves live memory half-overwritten. Without
    ``into`` each file is read once, hashed as it arrives.
    """
    into = into or {}
    by_file: dict[str, list[fmt.TensorEntry]] = {}
    for e in manifest.tensors.values():
        by_file.setdefault(e.file, []).append(e)
    wanted = {
        fname: sorted(entries, key=lambda e: e.offsets[0])
        for fname, entries in sorted(by_file.items())
        if names is None or any(e.name in names for e in entries)
    }
    layout = [p for fname, es in wanted.items() if (p := _layout_problem(manifest, fname, es))]
    if layout:
        raise CheckpointCorruptedError(path, layout)
    opened: dict[str, LogicalFile] = {}
    try:
        live = verify and any(e.name in into for es in wanted.values() for e in es)
        if live:  # hash pass: nothing live is written before every file checked out
            problems = []
            bufs: dict[bool, bytearray] = {}  # one reused buffer per kind: plain, delta
            for fname in wanted:
                f = open_logical(path, manifest, fname)
                decoded = fname in manifest.deltas
                if decoded not in bufs:
                    bufs[decoded] = bytearray(tf.DECODED_BUF if decoded else tf.READ_BUF)
                hasher = partial(tf.hash_safetensors, f, bufs[decoded])
                problem = fmt.hash_problem(fname, hasher, manifest.logical(fname)[1])
                if problem:
                    problems.append(problem)
                if len(opened) < KEEP_OPEN:  # held: a retired checkpoint stays readable
                    opened[fname] = f
                else:
                    f.close()
            if problems:
                raise CheckpointCorruptedError(path, problems)
        # every destination that is not live memory is allocated before live memory changes
        dests = {e.name: _destination(e, into) for es in wanted.values() for e in es}
        out: dict[str, torch.Tensor] = {}
        problems = []
        for fname, entries in wanted.items():
            f = opened.pop(fname) if fname in opened else open_logical(path, manifest, fname)
            opened[fname] = f
            f.seek(0)
            digest = _read_file(f, entries, dests, hash_now=verify and not live)
            if digest == "truncated":
                problems.append(f"{fname} is truncated")
            elif digest is not None and digest != manifest.logical(fname)[1]:
                problems.append(f"{fname} content hash differs from the manifest")
            out.update((e.name, dests[e.name]) for e in entries)
            f.close()
        if problems:
            raise CheckpointCorruptedError(path, problems)
        return out
    except OSError as e:
        if isinstance(e, CheckpointNotFoundError):
            raise
        raise CheckpointUnreadableError(path, "a tensor file", e) from e
    finally:
        for f in opened.values():
            f.close()


def _layout_problem(
    manifest: fmt.Manifest, fname: str, entries: list[fmt.TensorEntry]
) -> str | None:
    """The index must tile the file (header, then each tensor back to back, up to its end):
    checked before any byte is read, so a read never lands anywhere but where it should."""
    pos = entries[0].offsets[0] if entries else manifest.logical(fname)[0]
    if pos < 8:
        return f"{fname}: the tensor index starts inside the header length"
    for e in entries:
        if e.offsets[0] != pos:
            return f"{fname}: tensor ranges of the index leave gaps or overlap at {e.name}"
        pos = e.offsets[1]
    if pos != manifest.logical(fname)[0]:
        return f"{fname}: the tensor index does not reach the end of the file"
    return None


def _destination(e: fmt.TensorEntry, into: Mapping[str, torch.Tensor]) -> torch.Tensor:
    dtype = getattr(torch, e.dtype)
    dest = into.get(e.name)
    if (
        dest is not None
        and type(dest) is torch.Tensor  # not a DTensor: its bytes are elsewhere
        and dest.is_cpu  # not dest.device: that builds an object, per tensor
        and dest.dtype == dtype
        and dest.shape == e.shape
        and dest.is_contiguous()
    ):
        return dest
    return torch.empty(e.shape, dtype=dtype)


def _read_file(
    f: LogicalFile,
    entries: list[fmt.TensorEntry],
    dests: Mapping[str, torch.Tensor],
    *,
    hash_now: bool,
) -> str | None:
    """Read one file's tensors in file order; return "truncated", its tree hash (with
    ``hash_now``), or None."""
    header = bytearray(entries[0].offsets[0] if entries else f.size)
    complete = readinto_exact(f, memoryview(header))
    digests: list[bytes] = []
    run: list[fmt.TensorEntry] = []  # small tensors: one read into ``batch``, then copied out
    batch = memoryview(bytearray(min(BATCH_BYTES, f.size)))
    for e in entries:
        if e.nbytes < SMALL_TENSOR:
            if run and e.offsets[1] - run[0].offsets[0] > len(batch):
                complete = complete and _read_run(f, run, batch, dests, digests, hash_now)
                run = []
            run.append(e)
            continue
        complete = complete and _read_run(f, run, batch, dests, digests, hash_now)
        run = []
        view = bytes_view(dests[e.name])
        complete = complete and readinto_exact(f, view)
        if hash_now:
            digests.append(xxhash.xxh3_128_digest(view))
    complete = complete and _read_run(f, run, batch, dests, digests, hash_now)
    if not (complete and f.read(1) == b""):
        return "truncated"
    return tf.tree_hash(header, digests) if hash_now else None


def _read_run(
    f: LogicalFile,
    run: list[fmt.TensorEntry],
    batch: memoryview,
    dests: Mapping[str, torch.Tensor],
    digests: list[bytes],
    hash_now: bool,
) -> bool:
    """Tensors back to back in the file, read in one call and copied into their destinations
    (nothing copied when the file ends first); False when it did."""
    if not run:
        return True
    start = run[0].offsets[0]
    view = batch[: run[-1].offsets[1] - start]
    if not readinto_exact(f, view):
        return False
    for e in run:
        src = view[e.offsets[0] - start : e.offsets[1] - start]
        bytes_view(dests[e.name])[:] = src
        if hash_now:
            digests.append(xxhash.xxh3_128_digest(src))
    return True


def read_state_json(path: Path, manifest: fmt.Manifest) -> dict[str, Any]:
    """``state.json``, hash-checked and validated in full (every marker, every tensor reference,
    the RNG states) before any caller acts on it."""
    data = fmt.read_listed(path, manifest, fmt.STATE_FILE)
    try:
        meta = dict(untrusted.mapping(
            untrusted.load_json(data, what=fmt.STATE_FILE), what=fmt.STATE_FILE, field="content"
        ))
        check_state_json(meta, manifest)
    except MalformedDataError as e:
        raise CheckpointCorruptedError(path, [e.message]) from e
    return meta


def check_state_json(meta: Mapping[str, Any], manifest: fmt.Manifest) -> None:
    """Raise :class:`MalformedDataError` unless ``meta`` is a state.json this reader can apply:
    every key a consumer reads (with the default it reads it with) has its type and range."""
    what = fmt.STATE_FILE

    def mapping(value: object, field: str) -> Mapping[str, Any]:
        return untrusted.mapping(value, what=what, field=field)

    def name(value: object, field: str) -> str:
        return untrusted.string(value, what=what, field=field, max_len=4096)

    def sizes(value: object, field: str) -> list[int]:
        if not isinstance(value, list) or len(value) > tf.MAX_DIMS:
            raise MalformedDataError(what, field, value, expected="a list of sizes")
        return [untrusted.integer(x, what=what, field=field, maximum=tf.MAX_SIZE) for x in value]

    sharded = mapping(meta.get("sharded", {}), "sharded")
    for tname, spec in sharded.items():
        field = f"sharded.{tname}"
        spec = mapping(spec, field)
        if name(spec.get("dtype"), f"{field}.dtype") not in tf.DTYPES:
            raise MalformedDataError(what, f"{field}.dtype", spec.get("dtype"),
                                     expected="a dtype")
        sizes(spec.get("shape"), f"{field}.shape")
    chunk_layout(sharded, manifest)  # each chunk indexed (so far) is a box inside its tensor
    # what a state or an alias may name: a stored tensor or a sharded one, never a DCP chunk
    names = (set(manifest.tensors) - chunk_names(manifest)) | set(sharded)
    aliases = mapping(meta.get("aliases", {}), "aliases")
    for alias, target in aliases.items():
        if name(target, f"aliases.{alias}") not in names:
            raise MalformedDataError(what, f"aliases.{alias}", target, expected="a tensor")
    names |= set(aliases)
    per_rank = meta.get("per_rank", [])
    if not isinstance(per_rank, list):
        raise MalformedDataError(what, "per_rank", per_rank, expected="component names")
    for i, comp in enumerate(per_rank):
        name(comp, f"per_rank.{i}")
    for comp, d in mapping(meta.get("components"), "components").items():
        d = mapping(d, f"components.{comp}")
        if d.get("kind") not in ("stateful", "value") or "state" not in d:
            raise MalformedDataError(what, f"components.{comp}", d.get("kind"),
                                     expected="a stateful or value component with a state")
        if d.get("class") is not None:
            untrusted.string(d["class"], what=what, field=f"components.{comp}.class", max_len=512)
        unflatten(d["state"], None, names=names)
    if "rng" in meta:  # absent: a restore that asks for RNG states refuses it
        prepare_rng(meta["rng"])
