"""Checkpoints under torch.distributed (DDP, FSDP2/DTensor) in the ordinary checkpoint format.

One checkpoint per step, committed by rank 0 (manifest + rename) only after every rank reported
its part, so a checkpoint is either complete for all ranks or invisible:

- replicated state (a DDP model, its optimizer, the scheduler) is written once, by rank 0;
- per-rank state (global RNGs, a rank-aware :class:`ResumableSampler`) goes to
  ``rank-NNNNN.json``, written by every rank and listed, with its hash, in the manifest;
- sharded tensors (DTensor / ShardedTensor, e.g. FSDP2 ``fully_shard``) go through
  ``torch.distributed.checkpoint`` into ``dcp-<component>/`` (see :mod:`.sharded`).

Restoring, the ranks agree on the newest checkpoint that is intact (each rank hashes 1/world of
its files), then each loads the shared state and its own rank file.

torch.distributed itself is imported lazily: single-process users never pay for it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from modelver import untrusted
from modelver.checkpoint import commit
from modelver.checkpoint import format as fmt
from modelver.checkpoint.delta import DeltaEncoder
from modelver.checkpoint.hooks import PerRank
from modelver.checkpoint.io import (
    plan_shards,
    storage_key,
    write_shard,
)
from modelver.checkpoint.reader import read_state_json
from modelver.checkpoint.sharded import chunk_names as chunk_names  # re-exported
from modelver.checkpoint.sharded import is_sharded, writer_class
from modelver.checkpoint.sharded import sharded_index as sharded_index  # re-exported
from modelver.checkpoint.state import (
    FlatTensor,
    capture_rng,
    component_state,
    flatten,
    frozen_names,
    is_stateful,
    prepare_rng,
    safe_filename,
    unflatten,
)
from modelver.errors import (
    CheckpointCorruptedError,
    CheckpointWriteError,
    MalformedDataError,
    ModelverWarning,
    StateMismatchError,
)
from modelver.hashing import xxh3_bytes


def active() -> bool:
    """True inside an initialised process group: the manager then coordinates all ranks."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def rank_file(r: int) -> str:
    return f"rank-{r:05d}.json"


def per_rank(obj: object) -> bool:
    """Objects whose state differs per rank say so (a ResumableSampler with num_replicas > 1)."""
    return isinstance(obj, PerRank) and bool(obj.modelver_per_rank)


# --- collectives (small Python objects between our own ranks; nothing here reads files) -----


def _broadcast(obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(signum: int, due: bool) -> tuple[int, bool]:
    """One all-reduce (MAX): a stop signal or a due save on any rank applies to every rank."""
    import torch.distributed as dist

    device = torch.device("cpu")
    if "nccl" in str(dist.get_backend()):
        device = torch.device("cuda", torch.cuda.current_device())
    flags = torch.tensor([signum, int(due)], dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags[0]), bool(flags[1])


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


# --- splitting the state --------------------------------------------------------------------


@dataclass
class _Parts:
    components: dict[str, dict[str, Any]] = field(default_factory=dict)  # shared skeletons
    per_rank: dict[str, dict[str, Any]] = field(default_factory=dict)
    replicated: list[FlatTensor] = field(default_factory=list)
    sharded: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # comp -> name -> t


def _split(state: Mapping[str, Any]) -> _Parts:
    parts = _Parts()
    for comp, obj in state.items():
        if not isinstance(comp, str) or not comp:
            raise ValueError("state keys must be non-empty strings")
        skeleton, flat = flatten(comp, component_state(obj), frozen_names(obj))
        entry = {"kind": "stateful" if is_stateful(obj) else "value", "state": skeleton}
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


def _host_tensors(flat: list[FlatTensor]) -> tuple[list[FlatTensor], dict[str, str]]:
    """CPU, contiguous, tied tensors stored once (as :func:`io.take_snapshot` does)."""
    seen: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    out = []
    for ft in flat:
        key = storage_key(ft.tensor)
        if key in seen and ft.tensor.numel() > 0:
            aliases[ft.name] = seen[key]
            continue
        seen[key] = ft.name
        t = ft.tensor.detach().cpu().contiguous()
        out.append(FlatTensor(ft.name, t, ft.group, ft.frozen))
    return out, aliases


# --- save -------------------------------------------------------------------------------------


def save(
    root: Path,
    state: Mapping[str, Any],
    *,
    step: int,
    epoch: int | None,
    metrics: Mapping[str, float] | None,
    extras: Mapping[str, Any] | None,
    delta: DeltaEncoder | None = None,
    run: str | None = None,
) -> fmt.Manifest:
    """Collective: every rank calls it with the same step; rank 0 commits once all parts are in.

    ``delta`` (rank 0's encoder) stores the replicated safetensors files as XOR deltas against
    rank 0's previous checkpoint; DCP shard files stay plain."""
    import torch.distributed as dist

    me, world = dist.get_rank(), dist.get_world_size()
    final = root / fmt.step_dirname(step)
    # the temp dir carries rank 0's pid, so a restarted rank 0 can tell it is stale
    token = _broadcast(commit.writer_token() if me == 0 else None)
    tmp = commit.leftover(final, "tmp", token)
    files: dict[str, fmt.FileEntry] = {}
    tensors: dict[str, fmt.TensorEntry] = {}
    aliases: dict[str, str] = {}
    deltas: dict[str, fmt.DeltaEntry] = {}
    own_error: Exception | None = None
    parts = _Parts()
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        parts = _split(state)
        doc = {
            "rank": me,
            "world_size": world,
            "step": step,
            "rng": capture_rng(),
            "components": parts.per_rank,
        }
        name = rank_file(me)
        files[name] = commit.write_small(tmp / name, json.dumps(doc).encode())  # order kept, see io
        if me == 0:
            host, aliases = _host_tensors(parts.replicated)
            against = None if delta is None else (delta, delta.begin(root, step))
            for fname, members in plan_shards(host):
                fentry, tentries, dentry = write_shard(tmp / fname, members, delta=against)
                files[fentry.path] = fentry
                tensors.update((e.name, e) for e in tentries)
                if dentry is not None:
                    deltas[fname] = dentry
    except Exception as e:  # reported to every rank, so none waits for a part that never comes
        own_error = e
    reports = _all_gather((None if own_error is None else f"rank {me}: {own_error}", files))
    problems = [r[0] for r in reports if r[0]]
    if problems:
        _abort(me, tmp)
        if isinstance(own_error, OSError):  # the hint fits its errno (disk full, read-only…)
            raise CheckpointWriteError(final, own_error) from own_error
        if own_error is not None:
            raise own_error
        raise CheckpointWriteError(final, RuntimeError("; ".join(problems)))
    layout: dict[str, Any] = {}
    try:
        import torch.distributed.checkpoint as dcp

        for comp in sorted(parts.sharded):
            writer = writer_class()(tmp, "dcp-" + safe_filename(comp))
            dcp.save(parts.sharded[comp], storage_writer=writer)
            files.update(writer.files)
            tensors.update(writer.tensors)
            layout.update(writer.layout)
    except Exception as e:  # DCP raises on every rank when any rank failed
        _abort(me, tmp)
        raise CheckpointWriteError(final, e) from e
    outcome: tuple[str | None, fmt.Manifest | None] = (None, None)
    if me == 0:
        for _, rank_files in reports:
            files.update(rank_files)
        outcome = _commit(
            tmp,
            final,
            files,
            tensors,
            aliases,
            layout,
            parts,
            world,
            deltas,
            step=step,
            epoch=epoch,
            metrics=metrics,
            extras=extras,
            run=run,
        )
    problem, manifest = _broadcast(outcome)
    if problem is not None or manifest is None:
        code, _, text = (problem or "").partition(" ")
        cause = OSError(int(code), text) if code.isdigit() else RuntimeError(text or problem)
        raise CheckpointWriteError(final, cause)
    if delta is not None and me == 0:
        delta.finish(final.name, used_delta=bool(manifest.deltas))
    return manifest


def _abort(me: int, tmp: Path) -> None:
    barrier()  # every rank has stopped writing into tmp
    if me == 0:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit(
    tmp: Path,
    final: Path,
    files: dict[str, fmt.FileEntry],
    tensors: dict[str, fmt.TensorEntry],
    aliases: dict[str, str],
    layout: dict[str, Any],
    parts: _Parts,
    world: int,
    deltas: dict[str, fmt.DeltaEntry],
    *,
    step: int,
    epoch: int | None,
    metrics: Mapping[str, float] | None,
    extras: Mapping[str, Any] | None,
    run: str | None,
) -> tuple[str | None, fmt.Manifest | None]:
    """Rank 0: state.json, then the manifest (the commit marker), then the rename."""
    try:
        doc = {
            "format_version": fmt.FORMAT_VERSION,
            "step": step,
            "epoch": epoch,
            "components": parts.components,
            "aliases": aliases,
            "rng": capture_rng(),
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
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            files=files,
            tensors=tensors,
            aliases=aliases,
            world_size=world,
            extras=dict(extras or {}),
            format_version=fmt.DELTA_FORMAT_VERSION if deltas else fmt.FORMAT_VERSION,
            deltas=deltas,
            run=run,
        )
        commit.seal(tmp, final, manifest)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        return f"{getattr(e, 'errno', None) or '-'} {e}", None  # errno first: the hint fits
    return None, manifest


# --- restore ----------------------------------------------------------------------------------


def _verify_share(path: Path, me: int, world: int) -> list[str]:
    """This rank's share of a full check: every size, the hashes of every world-th file."""
    from modelver.checkpoint.verify import index_problems

    try:
        manifest = fmt.read_manifest(path)
        problems = fmt.verify_files(path, manifest, sorted(manifest.files)[me::world])
        if not problems and me == 0:
            problems = index_problems(path, manifest)
    except (CheckpointCorruptedError, OSError) as e:
        problems = [str(e)]
    return problems


def _choose(root: Path, step: int | None, me: int, world: int) -> Path | None:
    """Collective: the newest checkpoint all ranks (each hashing 1/world of it) found intact."""
    from modelver.checkpoint.catalog import list_checkpoints

    listed = None
    if me == 0:
        listed = [
            str(i.path) for i in reversed(list_checkpoints(root)) if step is None or i.step == step
        ]
    for candidate in _broadcast(listed):
        path = Path(candidate)
        problems = [p for share in _all_gather(_verify_share(path, me, world)) for p in share]
        if not problems:
            return path
        if me == 0:
            warnings.warn(
                f"skipping corrupted checkpoint {path}: {'; '.join(problems[:3])}",
                ModelverWarning,
                stacklevel=4,
            )
    return None


def restore(root: Path, state: MutableMapping[str, Any], *, step: int | None = None) -> int:
    """Collective: all ranks agree on the checkpoint, then load shared state and their own file."""
    import torch.distributed as dist

    me, world = dist.get_rank(), dist.get_world_size()
    path = _choose(root, step, me, world)
    if path is None:
        if step is not None:
            raise CheckpointCorruptedError(
                root / fmt.step_dirname(step), ["no committed checkpoint at this step"]
            )
        return 0
    error: Exception | None = None
    restored = 0
    try:
        restored = _restore_one(path, state, me, world)
    except Exception as e:  # every rank learns of it, so none trains from a mixed state
        error = e
    problems = [p for p in _all_gather(None if error is None else f"rank {me}: {error}") if p]
    if error is not None:
        raise error
    if problems:
        raise CheckpointCorruptedError(path, problems)
    return restored


def _restore_one(path: Path, state: MutableMapping[str, Any], me: int, world: int) -> int:
    """This rank's own file is read and checked before anything live changes; its objects are
    loaded first (with a backup) so the shared restore's refusal can put them back."""
    from modelver.checkpoint.restore import after_restore, backup, restore_checkpoint, roll_back

    manifest = fmt.read_manifest(path)
    meta = read_state_json(path, manifest)
    saved_per_rank = set(meta.get("per_rank", []))
    shared = {c: o for c, o in state.items() if c not in saved_per_rank}
    name = rank_file(me)
    if manifest.world_size != world or name not in manifest.files:
        restore_checkpoint(path, shared, restore_rngs=False)
        state.update({c: shared[c] for c in shared if not is_stateful(state[c])})
        warnings.warn(
            f"{path} was saved by {manifest.world_size} ranks, this run has {world}: "
            "per-rank RNG and data positions are not restored",
            ModelverWarning,
            stacklevel=3,
        )
        return manifest.step
    doc, set_rngs = _read_rank_file(path, manifest, name)
    missing = [c for c in state if c in saved_per_rank and c not in doc["components"]]
    if missing:
        raise StateMismatchError(missing[0], detail=f"{name} has no such component")
    mine = {c: unflatten(e["state"], {}) for c, e in doc["components"].items() if c in state}
    backups: dict[str, Any] = {}
    try:
        for comp, value in mine.items():
            if is_stateful(state[comp]):
                backups[comp] = backup(state[comp])
                state[comp].load_state_dict(value)
        restore_checkpoint(path, shared, restore_rngs=False)
    except BaseException:
        roll_back(state, backups)
        raise
    state.update({c: shared[c] for c in shared if not is_stateful(state[c])})
    state.update({c: v for c, v in mine.items() if not is_stateful(state[c])})
    set_rngs()
    after_restore(state)
    return manifest.step


def _read_rank_file(
    path: Path, manifest: fmt.Manifest, name: str
) -> tuple[dict[str, Any], Any]:
    """A rank file, hash-checked and validated in full (states and RNGs), or corrupted."""
    data = fmt.read_member(path, name, limit=untrusted.MAX_JSON_BYTES)
    if xxh3_bytes(data) != manifest.files[name].hash:
        raise CheckpointCorruptedError(path, [f"{name} content hash differs"])
    try:
        doc = dict(untrusted.mapping(untrusted.load_json(data, what=name), what=name,
                                     field="content"))
        comps = untrusted.mapping(doc.get("components"), what=name, field="components")
        for comp, entry in comps.items():
            entry = untrusted.mapping(entry, what=name, field=f"components.{comp}")
            unflatten(entry.get("state"), None, names=set())
        return doc, prepare_rng(doc.get("rng"))
    except MalformedDataError as e:
        raise CheckpointCorruptedError(path, [e.message]) from e
