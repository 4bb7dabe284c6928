"""Saving under torch.distributed: a snapshot on the training thread, then a collective write.

:func:`snapshot` takes what a save needs from the live objects (rank 0's replicated tensors
copied to the host when the save runs in the background, every rank's RNGs and per-rank
states); :func:`write` is the collective that writes, gathers and commits it (see
:mod:`.distributed`). ``save`` is both at once. ``async_save`` runs :func:`write` on a thread
of its own with a gloo group of its own, so the training group's collectives stay the
caller's and the training thread blocks only for the snapshot.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from modelver.checkpoint import commit
from modelver.checkpoint import format as fmt
from modelver.checkpoint.delta import DeltaEncoder
from modelver.checkpoint.distributed import (
    Group,
    all_gather,
    barrier,
    broadcast,
    per_rank,
    rank_file,
)
from modelver.checkpoint.hooks import NodeTier
from modelver.checkpoint.io import BufferPool, plan_shards, storage_key, write_shard
from modelver.checkpoint.sharded import is_sharded, writer_class
from modelver.checkpoint.state import (
    FlatTensor,
    capture_rng,
    component_state,
    flatten,
    frozen_names,
    is_stateful,
    optimizer_param_names,
    safe_filename,
)
from modelver.errors import CheckpointWriteError, InvalidArgumentError, UploadError

# --- splitting the state --------------------------------------------------------------------


@dataclass
class _Parts:
    components: dict[str, dict[str, Any]] = field(default_factory=dict)  # shared skeletons
    per_rank: dict[str, dict[str, Any]] = field(default_factory=dict)
    replicated: list[FlatTensor] = field(default_factory=list)
    sharded: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # comp -> name -> t


def _split(state: Mapping[str, Any]) -> _Parts:
    parts = _Parts()
    param_names = optimizer_param_names(state)
    for comp, obj in state.items():
        if not isinstance(comp, str) or not comp:
            raise ValueError("state keys must be non-empty strings")
        skeleton, flat = flatten(comp, component_state(obj), frozen_names(obj))
        entry = {"kind": "stateful" if is_stateful(obj) else "value", "state": skeleton}
        if comp in param_names:  # which parameter each optimizer state id belongs to
            entry["param_names"] = param_names[comp]
        if per_rank(obj):
            if flat:
                raise ValueError(f"per-rank component '{comp}' holds tensors; keep it JSON-only")
            parts.per_rank[comp] = entry
            continue
        parts.components[comp] = entry
        for ft in flat:
            if is_sharded(ft.tensor):
                parts.sharded.setdefault(comp, {})[ft.name] = ft.tensor
            else:
                parts.replicated.append(ft)
    return parts


def _host_tensors(
    flat: list[FlatTensor], *, pool: BufferPool | None
) -> tuple[list[FlatTensor], dict[str, str]]:
    """CPU, contiguous, tied tensors stored once (as :func:`io.take_snapshot` does); with a
    ``pool``, copies in its reused (pinned, for GPU tensors) buffers, never the live storage."""
    seen: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    out = []
    for ft in flat:
        key = storage_key(ft.tensor)
        if key in seen and ft.tensor.numel() > 0:
            aliases[ft.name] = seen[key]
            continue
        seen[key] = ft.name
        t = ft.tensor.detach()  # synchronous: written before training goes on, no copy
        t = pool.copy(ft.name, t) if pool is not None else t.cpu().contiguous()
        out.append(FlatTensor(ft.name, t, ft.group, ft.frozen))
    return out, aliases


def _host_shard(pool: BufferPool, comp: str, name: str, t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):  # a ShardedTensor: DCP's older type, not copied here
        raise InvalidArgumentError(
            "async_save", True, expected=f"False with ShardedTensor state ('{comp}/{name}')"
        )
    local = pool.copy(name, t.to_local())
    return DTensor.from_local(
        local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
    )


# --- save -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """One rank's part of a checkpoint, independent of the live objects once taken."""

    step: int
    epoch: int | None
    metrics: Mapping[str, float] | None
    extras: Mapping[str, Any] | None
    run: str | None
    parts: _Parts
    host: list[FlatTensor]  # rank 0: the replicated tensors (host copies in the background)
    aliases: dict[str, str]
    rng: dict[str, Any]


def snapshot(
    state: Mapping[str, Any],
    *,
    step: int,
    epoch: int | None,
    metrics: Mapping[str, float] | None,
    extras: Mapping[str, Any] | None,
    run: str | None,
    pool: BufferPool | None,
) -> Snapshot:
    """No collective. With a ``pool`` (of reused host buffers) the save finishes in the
    background while training goes on, so rank 0's replicated tensors are copied into it (the
    others' are never written), and so is every rank's local shards, as host DTensors on the
    same mesh for DCP to plan on."""
    import torch.distributed as dist

    parts = _split(state)
    if pool is not None:
        for comp, tensors in parts.sharded.items():
            parts.sharded[comp] = {n: _host_shard(pool, comp, n, t) for n, t in tensors.items()}
    host: list[FlatTensor] = []
    aliases: dict[str, str] = {}
    if dist.get_rank() == 0:
        host, aliases = _host_tensors(parts.replicated, pool=pool)
    if pool is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the copies into pinned buffers were asynchronous
    return Snapshot(step, epoch, metrics, extras, run, parts, host, aliases, capture_rng())


def write(
    root: Path,
    snap: Snapshot,
    *,
    group: Group = None,
    delta: DeltaEncoder | None = None,
    tier: NodeTier | None = None,
) -> fmt.Manifest:
    """Collective over ``group``: every rank calls it for the same step; rank 0 commits once
    all parts are in.

    ``delta`` (rank 0's encoder) stores the replicated safetensors files as XOR deltas against
    rank 0's previous checkpoint; DCP shard files stay plain. With ``tier`` (node-local) each
    rank's ``root`` is its own disk: every rank commits its files there and uploads them, and
    the checkpoint is complete once rank 0 has committed it in the remote (:mod:`.hooks`)."""
    import torch.distributed as dist

    me, world = dist.get_rank(), dist.get_world_size()
    step, parts = snap.step, snap.parts
    final = root / fmt.step_dirname(step)
    if tier is not None:  # one upload in flight: the previous one ends (or fails) first
        failed = [f for f in all_gather(tier.outcome(), group) if f]
        if failed:
            raise UploadError("; ".join(failed))
    # the temp dir carries rank 0's pid, so a restarted rank 0 can tell it is stale
    token = broadcast(commit.writer_token() if me == 0 else None, group)
    tmp = commit.leftover(final, "tmp", token)
    files: dict[str, fmt.FileEntry] = {}
    tensors: dict[str, fmt.TensorEntry] = {}
    deltas: dict[str, fmt.DeltaEntry] = {}
    own_error: Exception | None = None
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        doc = {
            "rank": me,
            "world_size": world,
            "step": step,
            "rng": snap.rng,
            "components": parts.per_rank,
        }
        name = rank_file(me)
        files[name] = commit.write_small(tmp / name, json.dumps(doc).encode())  # order kept, see io
        if me == 0:
            against = None if delta is None else (delta, delta.begin(root, step))
            for fname, members in plan_shards(snap.host):
                fentry, tentries, dentry = write_shard(tmp / fname, members, delta=against)
                files[fentry.path] = fentry
                tensors.update((e.name, e) for e in tentries)
                if dentry is not None:
                    deltas[fname] = dentry
    except Exception as e:  # reported to every rank, so none waits for a part that never comes
        own_error = e
    reports = all_gather((None if own_error is None else f"rank {me}: {own_error}", files), group)
    problems = [r[0] for r in reports if r[0]]
    if problems:
        _abort(me, tmp, group, own=tier is not None)
        if isinstance(own_error, OSError):  # the hint fits its errno (disk full, read-only…)
            raise CheckpointWriteError(final, own_error) from own_error
        if own_error is not None:
            raise own_error
        raise CheckpointWriteError(final, RuntimeError("; ".join(problems)))
    layout: dict[str, Any] = {}
    index: list[str] = []
    try:
        import torch.distributed.checkpoint as dcp

        for comp in sorted(parts.sharded):
            writer = writer_class()(tmp, "dcp-" + safe_filename(comp))
            dcp.save(parts.sharded[comp], storage_writer=writer, process_group=group)
            files.update(writer.files)
            index += writer.index
            layout.update(writer.layout)
    except Exception as e:  # DCP raises on every rank when any rank failed
        _abort(me, tmp, group, own=tier is not None)
        raise CheckpointWriteError(final, e) from e
    outcome: tuple[str | None, fmt.Manifest | None] = (None, None)
    if me == 0:
        for _, rank_files in reports:
            files.update(rank_files)
        outcome = _commit(tmp, final, files, tensors, layout, snap, world, deltas, index)
    problem, manifest = broadcast(outcome, group)
    if tier is not None and problem is None and manifest is not None:
        problem = _local_commit(me, tmp, final, manifest, tier, group)
    elif tier is not None and me != 0:  # rank 0 removed its own temp dir
        shutil.rmtree(tmp, ignore_errors=True)
    if problem is not None or manifest is None:
        code, _, text = (problem or "").partition(" ")
        cause = OSError(int(code), text) if code.isdigit() else RuntimeError(text or problem)
        raise CheckpointWriteError(final, cause)
    if delta is not None and me == 0:
        delta.finish(final.name, used_delta=bool(manifest.deltas))
    return manifest


def _local_commit(
    me: int, tmp: Path, final: Path, manifest: fmt.Manifest, tier: NodeTier, group: Group
) -> str | None:
    """Node-local: every other rank seals its own copy (its files and the manifest) as rank 0
    did, then each starts uploading what it holds. Collective: a rank that failed fails all."""
    problem = None
    try:
        if me != 0:
            for sub in tmp.iterdir():  # rank 0's DCP coordinator syncs only its own folders
                if sub.is_dir():
                    commit.fsync_path(sub)
            commit.seal(tmp, final, manifest)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        problem = f"{getattr(e, 'errno', None) or '-'} rank {me}: {e}"
    failed = [p for p in all_gather(problem, group) if p]
    if failed:  # no rank uploads: the remote keeps naming the previous checkpoint
        return failed[0]
    held = [n for n in manifest.files if (final / n).is_file()]
    tier.upload(final, [*held, fmt.MANIFEST], manifest)
    return None

def _abort(me: int, tmp: Path, group: Group, *, own: bool) -> None:
    """``own``: each rank's temp dir is on its own disk (node-local), each removes its own."""
    barrier(group)  # every rank has stopped writing into tmp
    if me == 0 or own:
        shutil.rmtree(tmp, ignore_errors=True)

def _commit(
    tmp: Path,
    final: Path,
    files: dict[str, fmt.FileEntry],
    tensors: dict[str, fmt.TensorEntry],
    layout: dict[str, Any],
    snap: Snapshot,
    world: int,
    deltas: dict[str, fmt.DeltaEntry],
    index: list[str],
) -> tuple[str | None, fmt.Manifest | None]:
    """Rank 0: state.json, then the manifest (the commit marker), then the rename."""
    step, epoch, extras, parts, aliases = (
        snap.step, snap.epoch, snap.extras, snap.parts, snap.aliases
    )
    try:
        doc = {
            "format_version": fmt.FORMAT_VERSION,
            "step": step,
            "epoch": epoch,
            "components": parts.components,
            "aliases": aliases,
            "rng": snap.rng,
            "extras": dict(extras or {}),
            "sharded": layout,
            "per_rank": sorted(parts.per_rank),
            "world_size": world,
        }
        payload = json.dumps(doc).encode()  # dict order kept, as in io.write_checkpoint
        files[fmt.STATE_FILE] = commit.write_small(tmp / fmt.STATE_FILE, payload)
        manifest = fmt.Manifest(
            step=step,
            epoch=epoch,
            created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            metrics={k: float(v) for k, v in (snap.metrics or {}).items()},
            files=files,
            tensors=tensors,
            aliases=aliases,
            world_size=world,
            extras=dict(extras or {}),
            format_version=(
                fmt.INDEX_FORMAT_VERSION if index
                else fmt.DELTA_FORMAT_VERSION if deltas else fmt.FORMAT_VERSION
            ),
            index=tuple(index),
            deltas=deltas,
            run=snap.run,
        )
        commit.seal(tmp, final, manifest)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"{getattr(e, 'errno', None) or '-'} {e}", None  # errno first: the hint fits
    return None, manifest
