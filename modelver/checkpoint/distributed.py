"""Checkpoints under torch.distributed (DDP, FSDP2/DTensor) in the ordinary checkpoint format.

One checkpoint per step, committed by rank 0 (manifest + rename) only after every rank reported
its part, so a checkpoint is either complete for all ranks or invisible:

- replicated state (a DDP model, its optimizer, the scheduler) is written once, by rank 0;
- per-rank state (global RNGs, a rank-aware :class:`ResumableSampler`) goes to
  ``rank-NNNNN.json``, written by every rank and listed, with its hash, in the manifest;
- sharded tensors (DTensor / ShardedTensor, e.g. FSDP2 ``fully_shard``) go through
  ``torch.distributed.checkpoint`` into ``dcp-<component>/`` (see :mod:`.sharded`).

Saving is in :mod:`.distsave`. Restoring, the ranks agree on the newest checkpoint that is
intact (each rank hashes 1/world of its files), then each loads the shared state and its own
rank file. Node-local checkpoints (each rank's own disk, the DVC remote shared) are restored
from the checkpoint the remote names, each rank fetching what its disk lacks.

torch.distributed itself is imported lazily: single-process users never pay for it.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch

from modelver import untrusted
from modelver.checkpoint import format as fmt
from modelver.checkpoint.hooks import NodeTier, PerRank
from modelver.checkpoint.reader import read_state_json
from modelver.checkpoint.sharded import sharded_index as sharded_index  # re-exported
from modelver.checkpoint.shardindex import rank_of
from modelver.checkpoint.state import is_stateful, prepare_rng, unflatten
from modelver.errors import (
    CheckpointCorruptedError,
    MalformedDataError,
    ModelverWarning,
    StateMismatchError,
    UploadError,
)


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


Group = Any  # a torch.distributed ProcessGroup; None: the default (training) group


def broadcast(obj: Any, group: Group = None) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def all_gather(obj: Any, group: Group = None) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def side_group() -> Group:
    """Collective: a gloo group of our own, for collectives off the training thread."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


def agree(signum: int, due: bool) -> tuple[int, bool]:
    """One all-reduce (MAX): a stop signal or a due save on any rank applies to every rank."""
    import torch.distributed as dist

    device = torch.device("cpu")
    if "nccl" in str(dist.get_backend()):
        device = torch.device("cuda", torch.cuda.current_device())
    flags = torch.tensor([signum, int(due)], dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags[0]), bool(flags[1])


def barrier(group: Group = None) -> None:
    import torch.distributed as dist

    dist.barrier(group=group)


def make_tier(root: Path, target: bool | str, run: str) -> NodeTier:
    """Collective: every rank opens the remote for node-local checkpoints; if one cannot, no
    rank goes on (each says why, or which rank could not)."""
    from modelver.checkpoint.hooks import tier_for

    tier, error = None, None
    try:
        tier = tier_for(root, target, run)
    except Exception as e:
        error = e
    failed = [f for f in all_gather(None if error is None else f"rank {rank()}: {error}") if f]
    if error is not None:
        raise error
    if failed or tier is None:
        raise UploadError(f"another rank cannot open the remote ({failed[0]})")
    return tier


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
    for candidate in broadcast(listed):
        path = Path(candidate)
        problems = [p for share in all_gather(_verify_share(path, me, world)) for p in share]
        if not problems:
            return path
        if me == 0:
            warnings.warn(
                f"skipping corrupted checkpoint {path}: {'; '.join(problems[:3])}",
                ModelverWarning,
                stacklevel=4,
            )
    return None


def restore(
    root: Path,
    state: MutableMapping[str, Any],
    *,
    step: int | None = None,
    tier: NodeTier | None = None,
) -> int:
    """Collective: all ranks agree on the checkpoint, then load shared state and their own file.

    With ``tier`` (node-local) the checkpoint is the one the remote names; each rank keeps the
    local files that verify and fetches the rest of its share."""
    import torch.distributed as dist

    me, world = dist.get_rank(), dist.get_world_size()
    held: list[str] | None = None
    if tier is not None:
        path, held = _from_remote(root, tier, step, me, world)
    else:
        path = _choose(root, step, me, world)  # every file verified, each rank its share
        if path is not None:
            held = _share(fmt.read_manifest(path), me, world)
    if path is None:
        if step is not None:
            raise CheckpointCorruptedError(
                root / fmt.step_dirname(step), ["no committed checkpoint at this step"]
            )
        return 0
    error: Exception | None = None
    restored = 0
    try:
        restored = _restore_one(path, state, me, world, held)
    except Exception as e:  # every rank learns of it, so none trains from a mixed state
        error = e
    problems = [p for p in all_gather(None if error is None else f"rank {me}: {error}") if p]
    if error is not None:
        raise error
    if problems:
        raise CheckpointCorruptedError(path, problems)
    return restored


def _restore_one(
    path: Path, state: MutableMapping[str, Any], me: int, world: int, held: list[str] | None
) -> int:
    """This rank's own file is read and checked before anything live changes; its objects are
    loaded first (with a backup) so the shared restore's refusal can put them back."""
    from modelver.checkpoint.restore import after_restore, backup, restore_checkpoint, roll_back

    manifest = fmt.read_manifest(path)
    meta = read_state_json(path, manifest)
    saved_per_rank = set(meta.get("per_rank", []))
    shared = {c: o for c, o in state.items() if c not in saved_per_rank}
    name = rank_file(me)
    if manifest.world_size != world or name not in manifest.files:
        restore_checkpoint(path, shared, restore_rngs=False, held=held)
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
        restore_checkpoint(path, shared, restore_rngs=False, held=held)
    except BaseException:
        roll_back(state, backups)
        raise
    state.update({c: shared[c] for c in shared if not is_stateful(state[c])})
    state.update({c: v for c, v in mine.items() if not is_stateful(state[c])})
    set_rngs()
    after_restore(state)
    return manifest.step


# --- node-local: the remote names the checkpoint -----------------------------------------------


def _from_remote(
    root: Path, tier: NodeTier, step: int | None, me: int, world: int
) -> tuple[Path | None, list[str] | None]:
    """Collective: rank 0 reads the run's record; local checkpoints the remote does not name
    are dropped (they never completed); each rank then makes its share of the named one
    local, every file hash-checked, fetching what is absent or bad."""
    found: tuple[str, dict[str, str]] | None = None
    error = None
    if me == 0:
        try:
            found = tier.latest()
        except Exception as e:  # a remote down or a crafted record: one line on every rank
            error = getattr(e, "message", None) or str(e)
    found, error = broadcast((found, error))
    if error is not None:
        raise UploadError(f"cannot read this run's record in the remote: {error}")
    named = found[0] if found is not None else None
    _drop_unnamed(root, named)
    if found is None:
        return None, None
    step_dir, md5s = found
    path = root / step_dir
    if step is not None and step_dir != fmt.step_dirname(step):
        raise CheckpointCorruptedError(
            root / fmt.step_dirname(step), [f"the remote's newest checkpoint is {step_dir}"]
        )
    problem, held = None, None
    try:
        held = _make_local(path, md5s, tier, me, world)
    except Exception as e:
        problem = f"rank {me}: {getattr(e, 'message', None) or e}"
    problems = [p for p in all_gather(problem) if p]
    if problems:
        raise CheckpointCorruptedError(path, problems)
    return path, held


def _drop_unnamed(root: Path, named: str | None) -> None:
    """Local step directories newer than the one the remote names never completed: removed,
    so retention never keeps them over the checkpoints this run saves again."""
    newest = -1 if named is None else int(named.rsplit("-", 1)[-1])
    for child in root.iterdir() if root.is_dir() else ():
        m = untrusted.STEP_DIR_RE.match(child.name)
        if m and child.is_dir() and int(m.group(1)) > newest:
            shutil.rmtree(child, ignore_errors=True)


def _share(manifest: fmt.Manifest, me: int, world: int) -> list[str]:
    """The files rank ``me`` reads: the shared ones, its own rank file and, at the world size
    they were written with, its own DCP chunk files and index shards (all at another)."""
    same_world = manifest.world_size == world
    out = []
    for name in sorted(manifest.files):
        if name.startswith("rank-") and name != rank_file(me):
            continue
        if name.startswith("dcp-") and same_world and rank_of(name) != me:
            continue
        out.append(name)
    return out


def _make_local(path: Path, md5s: Mapping[str, str], tier: NodeTier, me: int, world: int
                ) -> list[str]:
    from modelver.hashing import md5_file

    path.mkdir(parents=True, exist_ok=True)
    mpath = path / fmt.MANIFEST
    want = md5s.get(fmt.MANIFEST)
    if want is None:
        raise CheckpointCorruptedError(path, ["the run record names no manifest"])
    if not mpath.is_file() or md5_file(mpath) != want:
        tier.fetch(want, mpath)
        if md5_file(mpath) != want:
            raise CheckpointCorruptedError(path, ["the remote's manifest differs from its md5"])
    manifest = fmt.read_manifest(path)
    if fmt.step_dirname(manifest.step) != path.name or manifest.run != tier.run:
        raise CheckpointCorruptedError(path, [
            f"the remote's manifest is of step {manifest.step} of run {manifest.run}, not of "
            f"{path.name} of run {tier.run}"
        ])
    names = _share(manifest, me, world)
    for name in names:
        if _member_problem(path, manifest, name) is None:
            continue  # the local copy is good
        if name not in md5s:
            raise CheckpointCorruptedError(path, [f"the run record does not name {name}"])
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        tier.fetch(md5s[name], path / name)
        problem = _member_problem(path, manifest, name)
        if problem is not None:
            raise CheckpointCorruptedError(path, [f"fetched from the remote: {problem}"])
    return names


def _member_problem(path: Path, manifest: fmt.Manifest, name: str) -> str | None:
    if not (path / name).is_file():
        return f"{name} is missing"
    problems = fmt.verify_files(path, manifest, [name])
    return "; ".join(problems) if problems else None


def _read_rank_file(
    path: Path, manifest: fmt.Manifest, name: str
) -> tuple[dict[str, Any], Any]:
    """A rank file, hash-checked and validated in full (states and RNGs), or corrupted."""
    data = fmt.read_listed(path, manifest, name)
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
