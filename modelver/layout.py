"""Where each tensor of a checkpoint sits in the training state, told for people.

A manifest names tensors by their storage path (``optimizer/state/5/exp_avg``); ``state.json``
holds the rest: the components in the order they were saved, each state dict in its own order
(the model's layout), and, recorded at save, the parameter each optimizer state id belongs to.
From these a diff lists model tensors first, in layout order, and optimizer state under the
parameter's name. A name is only ever taken from what was recorded, never inferred.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelver import untrusted
from modelver.checkpoint import format as fmt
from modelver.errors import CheckpointCorruptedError, MalformedDataError

MODULE, OTHER, OPTIMIZER = "module", "other", "optimizer"
_RANK = {MODULE: 0, OTHER: 1, OPTIMIZER: 2}


@dataclass(frozen=True)
class Place:
    """One tensor's place: ``component`` and ``key`` inside it (``fc1.weight``, ``exp_avg``);
    for optimizer state, ``param``: the parameter it belongs to (``fc1.weight``; ``#5`` when no
    name was recorded); ``order`` sorts tensors as the state was laid out."""

    component: str
    role: str  # MODULE (its parameters are an optimizer's), OPTIMIZER, or OTHER
    key: str
    param: str | None
    order: tuple[int, int, int]  # (role rank, component position, position in its state)

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "role": self.role, "key": self.key,
                "param": self.param}


def by_name(name: str) -> Place:
    """The place of a tensor no state.json describes: its first path segment is the component."""
    component, _, key = name.partition("/")
    return Place(component, OTHER, key or name, None, (_RANK[OTHER], 1 << 30, 0))


def _tensor_names(skeleton: Any) -> list[str]:
    """``__tensor__`` references in the order they appear (the state dict's order)."""
    out: list[str] = []
    stack = [skeleton]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if set(v) == {"__tensor__"} and isinstance(v["__tensor__"], str):
                out.append(v["__tensor__"])
            else:
                stack.extend(reversed(list(v.values())))
        elif isinstance(v, list):
            stack.extend(reversed(v))
    return out


def _is_optimizer(state: object) -> bool:
    """torch's optimizer state dict: ``state`` and ``param_groups`` (a list of dicts)."""
    return (isinstance(state, dict) and set(state) == {"state", "param_groups"}
            and isinstance(state["param_groups"], list)
            and all(isinstance(g, dict) for g in state["param_groups"]))


def _param_ids(groups: list[dict[str, Any]]) -> list[object]:
    ids: list[object] = []
    for g in groups:
        params = g.get("params")
        ids.extend(params if isinstance(params, list) else [])
    return ids


def _names(comp: str, entry: Mapping[str, Any], groups: list[dict[str, Any]]) -> dict[str, str]:
    """State id (as its path segment) -> the parameter's full tensor name, as recorded: by
    modelver at save (``param_names``), else by torch (optimizers built from named parameters
    keep ``param_names`` in each group)."""
    ids = _param_ids(groups)
    recorded = entry.get("param_names")
    if recorded is not None:
        field = f"components.{comp}.param_names"
        if not isinstance(recorded, list) or len(recorded) != len(ids):
            raise MalformedDataError(fmt.STATE_FILE, field, recorded,
                                     expected="one name (or null) per optimizer parameter")
        names = [None if n is None else untrusted.string(n, what=fmt.STATE_FILE, field=field,
                                                         max_len=1024) for n in recorded]
    else:
        names = []
        for g in groups:
            own = g.get("param_names")
            params = g.get("params")
            n = len(params) if isinstance(params, list) else 0
            if isinstance(own, list) and len(own) == n and all(isinstance(x, str) for x in own):
                names.extend(own)
            else:
                names.extend([None] * n)
    return {str(i): n for i, n in zip(ids, names, strict=True) if n is not None}


def read_layout(meta: Mapping[str, Any]) -> dict[str, Place]:
    """Every tensor named in a state.json, with its place. Each value taken is type-checked
    here, so a state.json not checked in full (:func:`read_layout_file`) is read safely too."""
    components = meta.get("components")
    if not isinstance(components, dict):
        return {}
    refs: dict[str, list[str]] = {}
    params: dict[str, dict[str, str]] = {}
    for comp, entry in components.items():
        state = entry.get("state") if isinstance(entry, dict) else None
        refs[comp] = _tensor_names(state)
        if _is_optimizer(state):
            assert isinstance(entry, dict) and isinstance(state, dict)
            params[comp] = _names(comp, entry, state["param_groups"])
    owners = {n.partition("/")[0] for names in params.values() for n in names.values()}
    modules = owners & set(components)
    prefix = f"{next(iter(modules))}/" if len(modules) == 1 else None
    out: dict[str, Place] = {}
    for pos, (comp, names) in enumerate(refs.items()):
        role = OPTIMIZER if comp in params else MODULE if comp in modules else OTHER
        for i, name in enumerate(names):
            key = name.removeprefix(f"{comp}/")
            param = None
            if role == OPTIMIZER:
                head, _, tail = key.partition("/")
                pid, _, rest = tail.partition("/")
                if head == "state" and rest:
                    full = params[comp].get(pid)
                    param = f"#{pid}" if full is None else (
                        full.removeprefix(prefix) if prefix else full)
                    key = rest
            out.setdefault(name, Place(comp, role, key, param, (_RANK[role], pos, i)))
    return out


def read_layout_file(path: Path, manifest: fmt.Manifest) -> dict[str, Place]:
    """The places in a checkpoint's state.json, hash-checked against its manifest, without the
    full check of ``checkpoint.reader`` (it needs torch, which a report does not import):
    :func:`read_layout` type-checks each value it takes and skips what it cannot use."""
    data = fmt.read_listed(path, manifest, fmt.STATE_FILE)
    try:
        meta = untrusted.load_json(data, what=fmt.STATE_FILE)
        return read_layout(untrusted.mapping(meta, what=fmt.STATE_FILE, field="content"))
    except MalformedDataError as e:
        raise CheckpointCorruptedError(path, [e.message]) from e
