"""Property: whatever a hostile or damaged file says, every reader succeeds or raises a
ModelverError, nothing outside the sentinel root changes, and a failed restore leaves the live
objects exactly as they were."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import random
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelver import (
    CheckpointManager,
    list_checkpoints,
    load_checkpoint,
    restore_checkpoint,
    verify_checkpoint,
)
from modelver.checkpoint import format as fmt
from modelver.errors import ModelverError
from tests.helpers import make_state, train_steps

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Values an attacker would try where a path, a name, a number or a structure is expected.
HOSTILE = [
    "../../outside/secret.txt",
    "../outside",
    "/etc/passwd",
    "",
    ".",
    "a/../../b",
    "step-00000001/../../outside",
    "step-99999999",
    "nosuchdtype",
    "\x00",
    10**30,
    -1,
    2**63,
    1.5,
    float("nan"),
    True,
    None,
    [],
    [1],
    {},
    {"__tuple__": 5},
    {"__dtype__": "nosuchdtype"},
    {"__ndarray__": "!!"},
    "x" * 5000,
]

json_leaf = st.one_of(
    st.sampled_from(HOSTILE),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=20),
    st.floats(allow_nan=True, allow_infinity=True),
)
json_value = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                          inner, max_size=3),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoints directory with two committed checkpoints."""
    root = tmp_path_factory.mktemp("pristine") / "ck"
    state = make_state(sampler=False)
    mgr = CheckpointManager(root, every_steps=1, keep_last=None)
    train_steps(state, 2)
    mgr.save(2, state, metrics={"loss": 0.5})
    train_steps(state, 2)
    mgr.save(4, state, metrics={"loss": 0.25})
    mgr.close()
    return root


def snapshot_live(state: dict[str, Any]) -> Any:
    return (
        {k: v.clone() for k, v in state["model"].state_dict().items()},
        copy.deepcopy(state["optimizer"].state_dict()),
        copy.deepcopy(state["scheduler"].state_dict()),
        torch.get_rng_state().clone(),
        random.getstate(),
        np.random.get_state()[1].copy(),
    )


def same_live(a: Any, b: Any) -> bool:
    def eq(x: Any, y: Any) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and torch.equal(x, y)
        if isinstance(x, np.ndarray):
            return bool(np.array_equal(x, y))
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, list | tuple):
            return len(x) == len(y) and all(eq(i, j) for i, j in zip(x, y, strict=True))
        return bool(x == y)

    return eq(a, b)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


class Sandbox:
    """sentinel/ holds outside/ (must never change) and ck/ (a copy of the pristine run)."""

    def __init__(self, pristine: Path) -> None:
        self.top = Path(tempfile.mkdtemp(prefix="mv-prop-"))
        self.outside = self.top / "outside"
        self.outside.mkdir()
        (self.outside / "secret.txt").write_text("secret")
        (self.outside / "step-00000004").mkdir()
        self.ck = self.top / "ck"
        shutil.copytree(pristine, self.ck)
        self.step = self.ck / "step-00000004"
        self.before = tree_digest(self.outside)

    def close(self) -> None:
        assert tree_digest(self.outside) == self.before, "a file outside the root changed"
        shutil.rmtree(self.top, ignore_errors=True)


def mutate(doc: Any, data: st.DataObject) -> Any:
    """Replace, delete or add one node somewhere in a JSON document."""
    path: list[Any] = []
    node = doc
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict)
                                        else list(range(len(node)))))
        path.append(key)
        node = node[key]
    value = data.draw(json_value)
    if not path:
        return value if data.draw(st.booleans()) else _edit(doc, data, value)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace" or isinstance(parent, list):
        parent[path[-1]] = value
    elif action == "delete":
        del parent[path[-1]]
    else:
        parent[data.draw(st.sampled_from(HOSTILE[:9]))] = value
    return doc


def _edit(doc: Any, data: st.DataObject, value: Any) -> Any:
    if isinstance(doc, dict):
        doc[data.draw(st.sampled_from(HOSTILE[:9]))] = value
    return doc


def rehash(step: Path, name: str) -> None:
    """Make the manifest agree with an edited file, as an attacker who writes both would."""
    mpath = step / fmt.MANIFEST
    manifest = json.loads(mpath.read_text())
    entry = manifest["files"][name]
    path = step / name
    entry["size"] = path.stat().st_size
    with contextlib.suppress(ValueError):
        entry["hash"] = fmt.hash_member(step, name)
    mpath.write_text(json.dumps(manifest))


READERS: list[tuple[str, Callable[[Sandbox], Any]]] = [
    ("list", lambda s: list_checkpoints(s.ck)),
    ("verify", lambda s: verify_checkpoint(s.step)),
    ("load", lambda s: load_checkpoint(s.step)),
    ("load-root", lambda s: load_checkpoint(s.ck)),
]


def run_readers(box: Sandbox) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _name, reader in READERS:
            with contextlib.suppress(ModelverError):
                reader(box)
        live = make_state(seed=7, sampler=False)
        before = snapshot_live(live)
        try:
            restore_checkpoint(box.step, live)
        except ModelverError:
            assert same_live(before, snapshot_live(live)), "a failed restore changed live state"
        mgr = CheckpointManager(box.ck, every_steps=1, keep_last=None)
        try:
            live = make_state(seed=7, sampler=False)
            mgr.restore(live)  # falls back or starts at 0: never a non-modelver exception
        except ModelverError:
            pass
        finally:
            mgr.close()


@SETTINGS
@given(data=st.data())
def test_mutated_manifest(pristine: Path, data: st.DataObject) -> None:
    box = Sandbox(pristine)
    try:
        mpath = box.step / fmt.MANIFEST
        doc = mutate(json.loads(mpath.read_text()), data)
        mpath.write_text(json.dumps(doc))
        run_readers(box)
    finally:
        box.close()


@SETTINGS
@given(data=st.data())
def test_mutated_state_json(pristine: Path, data: st.DataObject) -> None:
    box = Sandbox(pristine)
    try:
        spath = box.step / fmt.STATE_FILE
        spath.write_text(json.dumps(mutate(json.loads(spath.read_text()), data)))
        rehash(box.step, fmt.STATE_FILE)
        run_readers(box)
    finally:
        box.close()


@SETTINGS
@given(data=st.data())
def test_mutated_safetensors_header(pristine: Path, data: st.DataObject) -> None:
    box = Sandbox(pristine)
    try:
        name = data.draw(st.sampled_from(sorted(
            p.name for p in box.step.glob("*.safetensors"))))
        path = box.step / name
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = mutate(json.loads(raw[8 : 8 + n]), data)
        new = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])
        rehash(box.step, name)
        run_readers(box)
    finally:
        box.close()


@SETTINGS
@given(target=st.sampled_from(HOSTILE[:8]), which=st.sampled_from(["files", "tensor", "delta"]))
def test_paths_in_manifest_never_leave_the_root(pristine: Path, target: str, which: str) -> None:
    """Path fields pointed outside, at the real sentinel: refused, never read or written."""
    box = Sandbox(pristine)
    try:
        mpath = box.step / fmt.MANIFEST
        doc = json.loads(mpath.read_text())
        name = sorted(n for n in doc["files"] if n.endswith(".safetensors"))[0]
        if which == "files":
            doc["files"][target] = doc["files"].pop(name)
            for t in doc["tensors"].values():
                if t["file"] == name:
                    t["file"] = target
        elif which == "tensor":
            next(iter(doc["tensors"].values()))["file"] = target
        else:
            doc["deltas"] = {name: {"stored": target, "base": target, "base_hash": "0",
                                    "size": 1, "hash": "0"}}
            doc["format_version"] = fmt.DELTA_FORMAT_VERSION
        mpath.write_text(json.dumps(doc))
        run_readers(box)
        with pytest.raises(ModelverError):
            verify_checkpoint(box.step)
    finally:
        box.close()


@pytest.mark.parametrize("what", ["file", "step-dir"])
def test_symlinks_are_not_followed_out(pristine: Path, what: str) -> None:
    """A symlinked file or step directory pointing outside is refused by every reader, and a
    manager's retention never deletes through it."""
    box = Sandbox(pristine)
    try:
        if what == "file":
            name = sorted(p.name for p in box.step.glob("*.safetensors"))[0]
            shutil.copy(box.step / name, box.outside / "secret.safetensors")
            box.before = tree_digest(box.outside)
            (box.step / name).unlink()
            (box.step / name).symlink_to(box.outside / "secret.safetensors")
        else:
            shutil.rmtree(box.outside / "step-00000004")
            shutil.copytree(box.step, box.outside / "step-00000004")
            box.before = tree_digest(box.outside)
            shutil.rmtree(box.step)
            box.step.symlink_to(box.outside / "step-00000004", target_is_directory=True)
        run_readers(box)
        with pytest.raises(ModelverError):
            verify_checkpoint(box.step)
        state = make_state(sampler=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mgr = CheckpointManager(box.ck, every_steps=1, keep_last=1)
            for step in (6, 8):
                mgr.save(step, state)
            mgr.close()
    finally:
        box.close()


@pytest.mark.parametrize("edit", ["a list", "a key dropped", "a key added"])
def test_a_module_state_that_does_not_fit_is_refused_before_any_read(
    tmp_path: Path, edit: str
) -> None:
    """Found by the property test above: a crafted module entry in state.json reached the
    module's own load_state_dict after the tensors were read in place."""
    state = make_state()
    train_steps(state, 2)
    mgr = CheckpointManager(tmp_path, keep_last=None)
    mgr.save(2, state)
    mgr.close()
    step = tmp_path / "step-00000002"
    doc = json.loads((step / fmt.STATE_FILE).read_text())
    model = doc["components"]["model"]
    if edit == "a list":
        model["state"] = list(model["state"].values())
    elif edit == "a key dropped":
        model["state"].pop(next(iter(model["state"])))
    else:
        model["state"]["extra.weight"] = next(iter(model["state"].values()))
    (step / fmt.STATE_FILE).write_text(json.dumps(doc))
    rehash(step, fmt.STATE_FILE)
    live = make_state(seed=1)
    before = {k: v.clone() for k, v in live["model"].state_dict().items()}
    with pytest.raises(ModelverError) as err:
        restore_checkpoint(step, live)
    assert "model" in err.value.message and not getattr(err.value, "partial", False)
    assert all(torch.equal(before[k], v) for k, v in live["model"].state_dict().items())
