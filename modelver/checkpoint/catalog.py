"""Find, verify, load and restore checkpoints without a manager."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from modelver.checkpoint import format as fmt
from modelver.checkpoint.delta import open_logical
from modelver.checkpoint.io import read_state_json, read_tensors
from modelver.checkpoint.sharded import chunk_names, load_sharded, sharded_index
from modelver.checkpoint.state import (
    component_state,
    flatten,
    is_stateful,
    restore_rng,
    unflatten,
)
from modelver.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    ModelverWarning,
    StateMismatchError,
)

# Optimizer state entries that have their parameter's shape (checked before anything is read).
_PARAM_SHAPED = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg"}


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as listed from its manifest (data not read)."""

    path: Path
    step: int
    epoch: int | None
    metrics: dict[str, float]
    created: str
    size: int
    n_tensors: int
    bases: tuple[str, ...] = ()  # step dirs its delta files decode against


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


def _info(path: Path, m: fmt.Manifest) -> CheckpointInfo:
    return CheckpointInfo(
        path, m.step, m.epoch, m.metrics, m.created, m.total_bytes, len(m.tensors), m.bases
    )


def list_checkpoints(root: str | Path) -> list[CheckpointInfo]:
    """Committed checkpoints under ``root`` in step order; unreadable manifests are skipped."""
    out = []
    for _, path in fmt.iter_checkpoint_dirs(Path(root)):
        try:
            out.append(_info(path, fmt.read_manifest(path)))
        except CheckpointCorruptedError as e:
            warnings.warn(f"skipping {path}: {e.problems[0]}", ModelverWarning, stacklevel=2)
    return sorted(out, key=lambda i: i.step)


def latest_checkpoint(root: str | Path) -> CheckpointInfo | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A step directory, or a checkpoints root (its newest committed checkpoint)."""
    path = Path(path)
    if (path / fmt.MANIFEST).is_file():
        return path
    newest = latest_checkpoint(path)
    if newest is None:
        raise CheckpointNotFoundError(path)
    return newest.path


def verify_checkpoint(path: str | Path) -> fmt.Manifest:
    """Check every file's size and content hash and the tensor index; raise on any mismatch."""
    path = resolve_checkpoint_dir(path)
    manifest = fmt.read_manifest(path)
    problems = fmt.verify_files(path, manifest)
    if not problems:
        problems = _delta_problems(path, manifest) + _index_problems(path, manifest)
    if problems:
        raise CheckpointCorruptedError(path, problems)
    return manifest


def _delta_problems(path: Path, manifest: fmt.Manifest) -> list[str]:
    """A delta file is only as good as its base chain: decode it and check the logical hash."""
    problems = []
    for name, d in sorted(manifest.deltas.items()):
        decoded = partial(_decoded_hash, path, manifest, name)
        try:
            problem = fmt.hash_problem(f"{name} decoded from {d.stored}", decoded, d.hash)
        except CheckpointCorruptedError as e:  # a base is missing, replaced or damaged
            problems += e.problems
            continue
        if problem:
            problems.append(problem)
    return problems


def _decoded_hash(path: Path, manifest: fmt.Manifest, name: str) -> str:
    with open_logical(path, manifest, name) as f:
        return fmt.hash_safetensors_stream(f)


def _index_problems(path: Path, manifest: fmt.Manifest) -> list[str]:
    """The tensor index must agree with each safetensors header (names, dtypes, ranges)."""
    problems = []
    by_file: dict[str, dict[str, fmt.TensorEntry]] = {}
    for e in manifest.tensors.values():
        by_file.setdefault(e.file, {})[e.name] = e
    for fname, entries in by_file.items():
        with open_logical(path, manifest, fname) as f:
            start, header = fmt.read_safetensors_header(f)
        header.pop("__metadata__", None)
        if set(header) != set(entries):
            problems.append(f"{fname}: tensor index does not match the file header")
            continue
        for name, h in header.items():
            e = entries[name]
            rng = (start + h["data_offsets"][0], start + h["data_offsets"][1])
            if (
                fmt.ST_TO_TORCH.get(h["dtype"]) != e.dtype
                or tuple(h["shape"]) != e.shape
                or rng != e.offsets
            ):
                problems.append(f"{fname}: entry {name} differs from the tensor index")
    return problems


def load_checkpoint(path: str | Path, *, verify: bool = True) -> LoadedCheckpoint:
    """Read one checkpoint (a step directory or a checkpoints root) into CPU memory."""
    path = resolve_checkpoint_dir(path)
    manifest = fmt.read_manifest(path)
    problems = fmt.check_sizes(path, manifest)
    if problems:
        raise CheckpointCorruptedError(path, problems)
    meta = read_state_json(path, manifest)
    chunks = chunk_names(meta)
    names = set(manifest.tensors) - chunks if chunks else None
    tensors = read_tensors(path, manifest, names=names, verify=verify)
    if chunks:  # DCP chunks of a sharded run, assembled to full tensors
        tensors.update(load_sharded(path, manifest, meta, live={}, state=None))
    tensors.update({a: tensors[t] for a, t in meta.get("aliases", {}).items()})
    state = {c: unflatten(d["state"], tensors) for c, d in meta["components"].items()}
    return LoadedCheckpoint(path, manifest, state, meta["rng"])


def _optimizer_mismatch(
    comp: str, saved: Mapping[str, Any], opt: torch.optim.Optimizer, manifest: fmt.Manifest
) -> None:
    saved_groups = saved.get("param_groups", [])
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


def _check_fit(manifest: fmt.Manifest, meta: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    saved_components = meta["components"]
    chunks = chunk_names(meta)
    index = {n: (e.shape, e.dtype) for n, e in manifest.tensors.items() if n not in chunks}
    index.update(sharded_index(meta))
    for alias, target in meta.get("aliases", {}).items():
        index[alias] = index[target]
    for comp, obj in state.items():
        if comp not in saved_components:
            raise StateMismatchError(comp, detail="the checkpoint has no such component")
        if isinstance(obj, torch.nn.Module):
            _, flat = flatten(comp, obj.state_dict())
            current = {
                f.name: (tuple(f.tensor.shape), str(f.tensor.dtype).removeprefix("torch."))
                for f in flat
            }
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
        elif isinstance(obj, torch.optim.Optimizer):
            skeleton = saved_components[comp]["state"]
            _optimizer_mismatch(comp, skeleton, obj, manifest)


def restore_checkpoint(
    path: str | Path, state: MutableMapping[str, Any], *, restore_rngs: bool = True
) -> int:
    """Load a checkpoint into live objects (in place where possible) and the global RNGs.

    Shapes are checked before any data is read, so a mismatch changes nothing. A hash mismatch
    found while reading raises :class:`CheckpointCorruptedError` with ``partial=True`` set on it
    when tensors were already overwritten in place.
    """
    path = resolve_checkpoint_dir(path)
    manifest = fmt.read_manifest(path)
    problems = fmt.check_sizes(path, manifest)
    if problems:
        raise CheckpointCorruptedError(path, problems)
    meta = read_state_json(path, manifest)
    _check_fit(manifest, meta, state)
    into: dict[str, torch.Tensor] = {}
    for comp, obj in state.items():
        if is_stateful(obj) or isinstance(obj, torch.Tensor):
            _, flat = flatten(comp, component_state(obj))
            into.update((f.name, f.tensor.detach()) for f in flat)
    chunks = chunk_names(meta)
    wanted = {n for n in manifest.tensors if n.split("/", 1)[0] in state and n not in chunks}
    try:
        tensors = read_tensors(path, manifest, into=into, names=wanted)
    except CheckpointCorruptedError as e:
        e.partial = bool(into)  # type: ignore[attr-defined]
        raise
    if meta.get("sharded"):
        tensors.update(load_sharded(path, manifest, meta, live=into, state=state))
    tensors.update({a: tensors[t] for a, t in meta.get("aliases", {}).items() if t in tensors})
    for comp, obj in state.items():
        value = unflatten(meta["components"][comp]["state"], tensors)
        if is_stateful(obj):
            obj.load_state_dict(value)
        elif isinstance(obj, torch.Tensor):
            if value is not obj:
                obj.copy_(value)
        else:
            state[comp] = value
    if restore_rngs:
        restore_rng(meta["rng"])
        for obj in state.values():
            hook = getattr(obj, "_modelver_after_restore", None)
            if callable(hook):
                hook()
    return manifest.step
