"""Reading a checkpoint back: into new CPU tensors (:func:`load_checkpoint`), or into live
objects (:func:`restore_checkpoint`), everything checked before anything live changes."""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from collections.abc import Collection, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from modelver.checkpoint import format as fmt
from modelver.checkpoint.catalog import newest_first, resolve_checkpoint_dir
from modelver.checkpoint.hooks import RestoreAware
from modelver.checkpoint.io import class_name, paused_gc
from modelver.checkpoint.reader import read_state_json, read_tensors
from modelver.checkpoint.runid import run_dir
from modelver.checkpoint.sharded import load_sharded, plan_sharded, sharded_index
from modelver.checkpoint.shardindex import chunk_names, read_index
from modelver.checkpoint.state import (
    flatten,
    is_stateful,
    live_tensors,
    prepare_rng,
    safe_filename,
    skeleton_is_dict,
    unflatten,
)
from modelver.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    CheckpointUnreadableError,
    InvalidArgumentError,
    MalformedDataError,
    ModelverError,
    StateMismatchError,
)

# Optimizer state entries that have their parameter's shape (checked before anything is read).
_PARAM_SHAPED = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg"}


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint read into memory: ``state[component]`` is what ``state_dict()`` returned."""

    path: Path
    manifest: fmt.Manifest
    state: dict[str, Any]
    rng: dict[str, Any]

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def epoch(self) -> int | None:
        return self.manifest.epoch

    @property
    def metrics(self) -> dict[str, float]:
        return self.manifest.metrics

    @property
    def extras(self) -> dict[str, Any]:
        return self.manifest.extras


def load_checkpoint(
    path: str | Path, *, verify: bool = True, run: object = None
) -> LoadedCheckpoint:
    """Read one checkpoint (a step directory, or the newest of a checkpoints root; with
    ``run``, of that run in the root) into CPU memory.

    From a root, a newest checkpoint that a writer retires while it is read is not an error:
    the next newest is read instead."""
    path = run_dir(Path(path), run)
    if fmt.manifest_token(path) is not None:
        return _load_one(path, verify=verify)
    for found in newest_first(path):
        for info in found:
            token = fmt.manifest_token(info.path)
            try:
                return _load_one(info.path, verify=verify)
            except (CheckpointNotFoundError, CheckpointCorruptedError):
                if not fmt.retired(info.path, token):
                    raise
    raise CheckpointNotFoundError(path)


def _load_one(path: Path, *, verify: bool) -> LoadedCheckpoint:
    manifest = read_index(path, fmt.read_manifest(path))
    problems = fmt.check_sizes(path, manifest)
    if problems:
        raise CheckpointCorruptedError(path, problems)
    meta = read_state_json(path, manifest)
    chunks = chunk_names(manifest)
    plan = plan_sharded(path, manifest, meta, live={}, state=None)
    tensors = read_tensors(path, manifest, names=set(manifest.tensors) - chunks, verify=verify)
    tensors.update(load_sharded(path, manifest, plan))  # DCP chunks, assembled to full tensors
    tensors.update({a: tensors[t] for a, t in meta.get("aliases", {}).items()})
    state = {c: unflatten(d["state"], tensors) for c, d in meta["components"].items()}
    return LoadedCheckpoint(path, manifest, state, meta.get("rng", {}))


def _two_sided(saved: set[Any], now: set[Any]) -> bool:
    """Key sets of two different classes: each has keys the other lacks (a newer torch only
    adds keys, so a one-sided difference is tolerated)."""
    return bool(saved - now) and bool(now - saved)


def _class_mismatch(comp: str, entry: Mapping[str, Any], obj: Any) -> None:
    """An optimizer or scheduler restores only into the class it was saved from; checkpoints
    that predate the recorded class are compared by their state keys instead."""
    recorded = entry.get("class")
    if recorded is not None:
        if recorded != class_name(obj):
            raise StateMismatchError(
                comp, detail=f"saved from {recorded}, restoring into {class_name(obj)}"
            )
        return
    saved = entry["state"]
    if isinstance(obj, torch.optim.Optimizer):
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if isinstance(groups, list):
            for g_saved, g in zip(groups, obj.param_groups, strict=False):
                if isinstance(g_saved, dict) and _two_sided(set(g_saved), set(g)):
                    raise StateMismatchError(
                        comp, detail="its parameter groups have another optimizer's settings"
                    )
            inner = saved.get("state")
            per_param = inner.get("__dict__") if isinstance(inner, dict) else None
            live = {i: set(v) for i, v in enumerate(obj.state.values())}
            for i, pair in enumerate(per_param if isinstance(per_param, list) else []):
                v = pair[1] if isinstance(pair, list) and len(pair) == 2 else None
                if isinstance(v, dict) and i in live and _two_sided(set(v), live[i]):
                    raise StateMismatchError(comp, detail="its state is another optimizer's")
    elif isinstance(saved, dict) and _two_sided(set(saved), set(obj.state_dict())):
        raise StateMismatchError(comp, detail="its saved state is another scheduler's")


def _optimizer_mismatch(
    comp: str, saved: Mapping[str, Any], opt: torch.optim.Optimizer, manifest: fmt.Manifest
) -> None:
    saved_groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(saved_groups, list) or not all(
        isinstance(g, dict)
        and isinstance(g.get("params"), list)
        and all(isinstance(i, int) for i in g["params"])
        for g in saved_groups
    ):
        raise StateMismatchError(comp, detail="the checkpoint holds no optimizer state here")
    per_param = saved.get("state")  # torch calls .items() on it and on each value
    values: list[Any] = []
    if isinstance(per_param, dict):  # int keys: a __dict__ marker of pairs (checked)
        marked = list(per_param) == ["__dict__"]
        values = [v for _, v in per_param["__dict__"]] if marked else list(per_param.values())
    if not skeleton_is_dict(per_param) or not all(skeleton_is_dict(v) for v in values):
        raise StateMismatchError(comp, detail="its per-parameter state is not a mapping")
    now = [len(g["params"]) for g in opt.param_groups]
    was = [len(g["params"]) for g in saved_groups]
    if now != was:
        raise StateMismatchError(
            comp, detail=f"parameter groups hold {was} parameters in the checkpoint, {now} now"
        )
    params = {
        sid: p
        for g_saved, g in zip(saved_groups, opt.param_groups, strict=True)
        for sid, p in zip(g_saved["params"], g["params"], strict=True)
    }
    mismatched = []
    prefix = f"{comp}/state/"
    for name, e in manifest.tensors.items():
        parts = name[len(prefix) :].split("/") if name.startswith(prefix) else []
        if len(parts) == 2 and parts[1] in _PARAM_SHAPED and parts[0].isdigit():
            p = params.get(int(parts[0]))
            if p is not None and tuple(p.shape) != e.shape:
                mismatched.append((name, str(list(e.shape)), str(list(p.shape))))
    if mismatched:
        raise StateMismatchError(comp, mismatched=mismatched)


def _check_keys(comp: str, sd: Mapping[str, Any], skeleton: Any) -> None:
    """The state.json entry of a module names what its ``load_state_dict`` will be given: it
    must be a mapping with the module's keys (``sd``), checked before any tensor is read in
    place."""
    value = unflatten(skeleton, _Placeholders())
    if not isinstance(value, Mapping):
        raise StateMismatchError(comp, detail="its saved state is not a mapping")
    live = set(sd)
    missing, unexpected = sorted(live - set(value)), sorted(set(value) - live)
    if missing or unexpected:
        raise StateMismatchError(comp, missing=missing, unexpected=unexpected)


class _Placeholders(dict[str, torch.Tensor]):
    """Every tensor name maps to an empty tensor: the state's structure without its bytes."""

    def __contains__(self, key: object) -> bool:
        return True

    def __missing__(self, key: str) -> torch.Tensor:
        return torch.empty(0)


def _dry_run(comp: str, opt: torch.optim.Optimizer, entry: Mapping[str, Any]) -> None:
    """Let the optimizer's own ``load_state_dict`` judge the saved structure on a throwaway
    twin (same class, groups copied, empty tensors), so a refusal that depends on the class
    (Adam state without ``step``) comes before any live tensor is overwritten.

    With the class recorded (and equal) the checkpoint is at fault: malformed, so a manager
    falls back to an earlier one. Without it, the live optimizer may be another one.
    """
    twin = object.__new__(type(opt))
    twin.__dict__.update(opt.__dict__)
    twin.param_groups = [dict(g) for g in opt.param_groups]
    twin.state = defaultdict(dict)
    try:
        twin.load_state_dict(_one_of_each(unflatten(entry["state"], _Placeholders())))
    except Exception as e:  # whatever the class raises: its verdict on this checkpoint
        if entry.get("class") is not None:
            raise MalformedDataError(
                fmt.STATE_FILE, f"components.{comp}", str(e), expected="a state its class accepts"
            ) from e
        raise StateMismatchError(comp, detail=f"its load_state_dict refused the state: {e}") from e


def _one_of_each(saved: Any) -> Any:
    """The saved optimizer state with one parameter's entry per distinct set of keys and value
    types: what a class's ``load_state_dict`` judges is the same for each of them, and it
    costs a cast per tensor (a model of 10^4 layers paid seconds for the twin alone)."""
    per_param = saved.get("state") if isinstance(saved, dict) else None
    if not isinstance(per_param, dict):
        return saved  # malformed: the class's own verdict on it as it is
    kept: dict[Any, Any] = {}
    seen: set[tuple[tuple[str, str], ...]] = set()
    for pid, entry in per_param.items():
        shape = (
            tuple(sorted((str(k), type(v).__name__) for k, v in entry.items()))
            if isinstance(entry, dict) else (("", type(entry).__name__),)
        )
        if shape not in seen:
            seen.add(shape)
            kept[pid] = entry
    return {**saved, "state": kept}


def _saved_index(
    manifest: fmt.Manifest, meta: Mapping[str, Any]
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor name a state can hold (stored, sharded, tied) -> (shape, dtype)."""
    chunks = chunk_names(manifest)
    index = {n: (e.shape, e.dtype) for n, e in manifest.tensors.items() if n not in chunks}
    index.update(sharded_index(meta))
    for alias, target in meta.get("aliases", {}).items():
        index[alias] = index[target]
    return index


def _live_index(
    comp: str, module: torch.nn.Module, sd: Mapping[str, Any] | None = None
) -> dict[str, tuple[tuple[int, ...], str]]:
    _, flat = flatten(comp, module.state_dict() if sd is None else sd)
    return {
        f.name: (tuple(f.tensor.shape), str(f.tensor.dtype).removeprefix("torch.")) for f in flat
    }


def _check_fit(manifest: fmt.Manifest, meta: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    saved_components = meta["components"]
    index = _saved_index(manifest, meta)
    for comp, obj in state.items():
        if comp not in saved_components:
            raise StateMismatchError(comp, detail="the checkpoint has no such component")
        if isinstance(obj, torch.nn.Module):
            sd = obj.state_dict()
            current = _live_index(comp, obj, sd)
            saved = {n: v for n, v in index.items() if n.startswith(comp + "/")}
            strip = len(comp) + 1
            mismatched = [
                (n[strip:], f"{list(saved[n][0])} {saved[n][1]}", f"{list(c[0])} {c[1]}")
                for n, c in current.items()
                if n in saved and saved[n] != c
            ]
            missing = [n[strip:] for n in current if n not in saved]
            unexpected = [n[strip:] for n in saved if n not in current]
            if mismatched or missing or unexpected:
                raise StateMismatchError(
                    comp, missing=missing, unexpected=unexpected, mismatched=mismatched
                )
            _check_keys(comp, sd, saved_components[comp]["state"])
        elif isinstance(obj, torch.optim.Optimizer):
            _class_mismatch(comp, saved_components[comp], obj)
            _optimizer_mismatch(comp, saved_components[comp]["state"], obj, manifest)
            _dry_run(comp, obj, saved_components[comp])
        elif isinstance(obj, LRScheduler):
            _class_mismatch(comp, saved_components[comp], obj)
        if is_stateful(obj) and saved_components[comp]["kind"] != "stateful":
            raise StateMismatchError(comp, detail="the checkpoint holds a plain value here")


def restore_checkpoint(
    path: str | Path,
    state: MutableMapping[str, Any],
    *,
    restore_rngs: bool = True,
    held: Collection[str] | None = None,
) -> int:
    """Load a checkpoint into live objects (in place where possible) and the global RNGs.

    Everything is read and checked before any live object changes: the manifest, state.json in
    full, shapes, dtypes and optimizer/scheduler classes, then every file's hash. On any failure
    the live objects are as before (:class:`StateMismatchError` when they do not fit the
    checkpoint, :class:`CheckpointCorruptedError` when the checkpoint is bad). Only an I/O
    error in the final read into live memory can leave a model partly loaded: the error then
    carries ``partial=True``.
    """
    path = resolve_checkpoint_dir(path)
    try:
        with paused_gc():
            return _restore(path, state, restore_rngs=restore_rngs, held=held)
    except ModelverError:
        raise
    except OSError as e:  # EIO, EACCES on a path that does not go through open_member
        raise CheckpointUnreadableError(path, "a file", e) from e


def _restore(
    path: Path, state: MutableMapping[str, Any], *, restore_rngs: bool,
    held: Collection[str] | None,
) -> int:
    """``held``: the files this process reads (a rank of the world size the checkpoint was
    saved with: its share, and of the index shards its own); None: all."""
    manifest = read_index(path, fmt.read_manifest(path), only=held)
    problems = fmt.check_sizes(path, manifest, held)
    if problems:
        raise CheckpointCorruptedError(path, problems)
    meta = read_state_json(path, manifest)  # validated in full, RNG states included
    try:
        _check_fit(manifest, meta, state)
    except MalformedDataError as e:  # the optimizer's own verdict on a state of its class
        raise CheckpointCorruptedError(path, [e.message]) from e
    if restore_rngs and "rng" not in meta:
        raise CheckpointCorruptedError(path, [f"{fmt.STATE_FILE} has no RNG states"])
    set_rngs = prepare_rng(meta["rng"]) if restore_rngs else None
    chunks = chunk_names(manifest)
    comps = meta["components"]
    if meta.get("sharded"):  # DCP writes chunk by chunk into live shards: hash them all first
        dirs = tuple(f"dcp-{safe_filename(c)}/" for c in state)
        files = {f for f in manifest.files if f.startswith(dirs)}
        if held is not None:
            files &= set(held)
        problems = fmt.verify_files(path, manifest, sorted(files))
        if problems:
            raise CheckpointCorruptedError(path, problems)
    into: dict[str, torch.Tensor] = {}
    for comp, obj in state.items():
        if is_stateful(obj) or isinstance(obj, torch.Tensor):
            into.update(live_tensors(comp, obj))
    sharded = plan_sharded(path, manifest, meta, live=into, state=state)
    wanted = {n for n in manifest.tensors if n.split("/", 1)[0] in state and n not in chunks}
    referenced = (*manifest.tensors, *meta.get("sharded", {}), *meta.get("aliases", {}))
    with_tensors = {n.split("/", 1)[0] for n in referenced}
    # small stateful objects (schedulers, samplers) first, each with a backup: their own
    # load_state_dict may refuse the state, and then nothing else has changed yet
    small = [
        c for c, o in state.items()
        if is_stateful(o) and not isinstance(o, torch.nn.Module | torch.optim.Optimizer)
        and c not in with_tensors
    ]
    backups: dict[str, Any] = {}
    try:
        for comp in small:
            backups[comp] = backup(state[comp])
            state[comp].load_state_dict(unflatten(comps[comp]["state"], {}))
        tensors = read_tensors(path, manifest, into=into, names=wanted)
    except Exception as e:
        roll_back(state, backups)
        if isinstance(e, ModelverError):
            raise
        comp = next(reversed(backups)) if backups else "state"
        raise StateMismatchError(comp, detail=f"its load_state_dict refused the state: {e}") from e
    tensors.update(load_sharded(path, manifest, sharded))
    tensors.update({a: tensors[t] for a, t in meta.get("aliases", {}).items() if t in tensors})
    done = set(small)
    try:
        for comp, obj in state.items():
            if comp in done:
                continue
            value = unflatten(comps[comp]["state"], tensors)
            if isinstance(obj, torch.nn.Module) and _read_in_place(obj, value):
                pass  # load_state_dict would copy each tensor onto itself (see _read_in_place)
            elif is_stateful(obj):
                obj.load_state_dict(value)
            elif isinstance(obj, torch.Tensor):
                if value is not obj:
                    obj.copy_(value)
            else:
                state[comp] = value
            done.add(comp)
    except Exception as e:  # checked above; a user object's own refusal lands here
        roll_back(state, backups)
        comp = next((c for c in state if c not in done), "state")
        err = StateMismatchError(comp, detail=f"its load_state_dict refused the state: {e}")
        err.partial = True  # type: ignore[attr-defined]
        raise err from e
    if set_rngs is not None:
        set_rngs()
        after_restore(state)
    return manifest.step


_PLAIN = torch.nn.Module
_HOOKS = ("_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks")  # fmt: skip


def _read_in_place(module: torch.nn.Module, value: Mapping[str, Any]) -> bool:
    """Whether the read already put every tensor of ``value`` into the module's own storage,
    with nothing else for ``load_state_dict`` to do (no hooks, no extra state, no override of
    the state dict methods anywhere in the tree). It would only copy each tensor onto itself,
    scanning the whole dict once per submodule: quadratic, 10^4 ``Linear`` took minutes."""
    for m in module.modules():
        cls = type(m)
        if (
            any(getattr(m, h, None) for h in _HOOKS)
            or cls._load_from_state_dict is not _PLAIN._load_from_state_dict
            or cls.load_state_dict is not _PLAIN.load_state_dict
            or cls.state_dict is not _PLAIN.state_dict
            or cls.get_extra_state is not _PLAIN.get_extra_state
        ):
            return False
    live = module.state_dict(keep_vars=True)
    if live.keys() != value.keys():
        return False
    for name, t in value.items():
        cur = live[name]
        if not (
            isinstance(t, torch.Tensor) and t.device == cur.device and t.dtype == cur.dtype
            and t.shape == cur.shape and t.stride() == cur.stride()
            and t.data_ptr() == cur.data_ptr()
        ):
            return False
    return True


def backup(obj: Any) -> Any:
    try:
        return copy.deepcopy(obj.state_dict())
    except Exception:  # not copyable: that object cannot be rolled back
        return None


def roll_back(state: Mapping[str, Any], backups: Mapping[str, Any]) -> None:
    for comp, saved in backups.items():
        if saved is not None:
            with contextlib.suppress(Exception):
                state[comp].load_state_dict(saved)


def after_restore(state: Mapping[str, Any]) -> None:
    """Tell restored objects that the RNGs are back (:class:`RestoreAware`)."""
    for obj in state.values():
        if isinstance(obj, RestoreAware):
            obj.modelver_after_restore()


# --- partial restore (fine-tuning from a checkpoint) -------------------------------------------


@dataclass(frozen=True)
class RestoreReport:
    """What a partial restore loaded and what it did not. Names are ``component/key``."""

    step: int
    restored: tuple[str, ...]  # components restored, in whole or in part
    missing: tuple[str, ...]  # selected live tensors (or components) the checkpoint lacks: kept
    unexpected: tuple[str, ...]  # selected saved tensors the live objects lack: not loaded
    left_out: tuple[str, ...]  # saved components, and tensors ``only`` did not select

    def summary(self) -> str:
        parts = [f"restored {', '.join(self.restored) or 'nothing'} from step {self.step}"]
        for what, names in (("not in the checkpoint, kept as they were", self.missing),
                            ("in the checkpoint, not in the live objects", self.unexpected)):
            if names:
                more = f" (+{len(names) - 8} more)" if len(names) > 8 else ""
                parts.append(f"{what}: {', '.join(names[:8])}{more}")
        return "; ".join(parts)


class _Subset:
    """A module seen through the tensors a partial restore loads: only those are read into
    its memory and handed to its ``load_state_dict`` (``strict=False``)."""

    def __init__(self, module: torch.nn.Module, keys: list[str]) -> None:
        self.module, self.keys = module, keys

    def state_dict(self) -> dict[str, Any]:
        live = self.module.state_dict()
        return {k: live[k] for k in self.keys}

    def load_state_dict(self, value: Mapping[str, Any]) -> None:
        self.module.load_state_dict({k: value[k] for k in self.keys}, strict=False)


def restore_partial(
    path: str | Path,
    state: MutableMapping[str, Any],
    *,
    only: Sequence[str] | None = None,
    strict: bool = False,
    restore_rngs: bool = False,
) -> RestoreReport:
    """Restore part of a checkpoint into live objects, for fine-tuning from it.

    ``only``: component names (``"model"``) and/or tensor-name prefixes of a module
    (``"model/encoder."``); None selects every component of ``state``. With ``strict=False``
    a selected tensor or component on one side only is skipped and reported instead of
    refused; a shape or dtype that differs is always refused. Everything is checked before
    anything live changes, as in :func:`restore_checkpoint`; the RNGs stay as they are unless
    ``restore_rngs``.
    """
    path = resolve_checkpoint_dir(path)
    manifest = read_index(path, fmt.read_manifest(path))
    meta = read_state_json(path, manifest)
    saved_comps = meta["components"]
    index = _saved_index(manifest, meta)
    entries = list(only) if only is not None else list(state)
    for e in entries:
        comp = e.split("/", 1)[0] if isinstance(e, str) else None
        if comp not in state or (e != comp and not (
            isinstance(state[comp], torch.nn.Module)
            and any(n.startswith(e) for n in (*index, *_live_index(comp, state[comp])))
        )):
            raise InvalidArgumentError(
                "only", e, expected="a component of the state, or COMPONENT/PREFIX of some "
                "tensor's name in a module",
            )

    def selected(name: str) -> bool:
        return any(name.split("/", 1)[0] == e if "/" not in e else name.startswith(e)
                   for e in entries)

    view: dict[str, Any] = {}
    missing: list[str] = []
    unexpected: list[str] = []
    left_out = [c for c in saved_comps if c not in {e.split("/", 1)[0] for e in entries}]
    for comp in dict.fromkeys(e.split("/", 1)[0] for e in entries):
        obj = state[comp]
        if comp not in saved_comps:
            if strict:
                raise StateMismatchError(comp, detail="the checkpoint has no such component")
            missing.append(comp)
            continue
        if not isinstance(obj, torch.nn.Module):
            view[comp] = obj
            continue
        live = _live_index(comp, obj)
        saved = {n: v for n, v in index.items() if n.startswith(comp + "/")}
        chosen_live = [n for n in live if selected(n)]
        chosen_saved = [n for n in saved if selected(n)]
        strip = len(comp) + 1
        mismatched = [(n[strip:], f"{list(saved[n][0])} {saved[n][1]}",
                       f"{list(live[n][0])} {live[n][1]}")
                      for n in chosen_live if n in saved and saved[n] != live[n]]
        lacking = [n for n in chosen_live if n not in saved]
        extra = [n for n in chosen_saved if n not in live]
        if mismatched or (strict and (lacking or extra)):
            raise StateMismatchError(comp, missing=[n[strip:] for n in lacking],
                                     unexpected=[n[strip:] for n in extra],
                                     mismatched=mismatched)
        missing += lacking
        unexpected += extra
        left_out += [n for n in saved if not selected(n)]
        keys = [n[strip:] for n in chosen_live if n in saved]
        whole = len(keys) == len(live) == len(saved)
        view[comp] = obj if whole else _Subset(obj, keys)
    step = restore_checkpoint(path, view, restore_rngs=restore_rngs)
    state.update({c: v for c, v in view.items() if not is_stateful(state[c])})
    return RestoreReport(step, tuple(view), tuple(missing), tuple(unexpected), tuple(left_out))
