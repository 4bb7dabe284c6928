"""Checkpoint readers under hostile and unlucky input (issue 11, classes 1, 5, 6, 7, 9).

Every test crafts files in tmp_path: a manifest, state.json, safetensors header or delta footer
that a hostile or damaged writer left. Every reader must either succeed or raise one
ModelverError; nothing outside the step directory is read; a failed restore leaves the live
objects exactly as they were; the manager skips such a checkpoint for the previous one.
"""

from __future__ import annotations

import copy
import json
import os
import random
import struct
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from modelver.checkpoint import format as fmt
from modelver.checkpoint import tensorfile as tf
from modelver.checkpoint.catalog import latest_checkpoint, list_checkpoints, resolve_checkpoint_dir
from modelver.checkpoint.manager import CheckpointManager
from modelver.checkpoint.restore import load_checkpoint, restore_checkpoint
from modelver.checkpoint.verify import verify_checkpoint
from modelver.errors import (
    CheckpointCorruptedError,
    ModelverError,
    ModelverWarning,
    StateMismatchError,
    UnsafeCheckpointError,
    UnsafePathError,
)
from modelver.hashing import xxh3_bytes
from modelver.integrity import verify_dir


def make_state(seed: int = 0, *, opt: str = "adam", sched: str = "step") -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    if opt == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler: Any = (
        torch.optim.lr_scheduler.StepLR(optimizer, 2)
        if sched == "step"
        else torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.9)
    )
    scheduler.step()
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "note": {"a": 1}}


def save(root: Path, step: int, state: dict[str, Any], **kw: Any) -> Path:
    with CheckpointManager(root, keep_last=None, **kw) as mgr:
        info = mgr.save(step, state)
    assert info is not None
    return info.path


def live_snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """Everything restore may touch: module tensors, optimizer and scheduler state, RNGs."""
    return {
        "model": {k: v.clone() for k, v in state["model"].state_dict().items()},
        "optimizer": copy.deepcopy(state["optimizer"].state_dict()),
        "scheduler": copy.deepcopy(state["scheduler"].state_dict()),
        "note": copy.deepcopy(state["note"]),
        "rng": (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()),
    }


def assert_unchanged(state: dict[str, Any], before: dict[str, Any]) -> None:
    after = live_snapshot(state)
    for k, v in before["model"].items():
        assert torch.equal(after["model"][k], v), k
    assert _same(after["optimizer"], before["optimizer"])
    assert _same(after["scheduler"], before["scheduler"])
    assert after["note"] == before["note"]
    assert after["rng"][0] == before["rng"][0]
    assert np.array_equal(after["rng"][1], before["rng"][1])
    assert torch.equal(after["rng"][2], before["rng"][2])


def assert_restore_refused(
    step: Path, live: dict[str, Any], error: type[Exception], match: str | None = None
) -> pytest.ExceptionInfo[Exception]:
    """restore_checkpoint raises ``error`` and leaves every live object exactly as it was."""
    before = live_snapshot(live)
    with pytest.raises(error, match=match) as err:
        restore_checkpoint(step, live)
    assert_unchanged(live, before)
    return err


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def edit_manifest(step_dir: Path, fn: Callable[[dict[str, Any]], Any]) -> None:
    path = step_dir / fmt.MANIFEST
    data = json.loads(path.read_text())
    out = fn(data)
    path.write_text(json.dumps(data if out is None else out))


def rewrite_file(step_dir: Path, name: str, content: bytes) -> None:
    """Replace a listed file and record its new size and hash, as a careful attacker would."""
    (step_dir / name).write_bytes(content)
    digest = fmt.hash_member(step_dir, name) if name.endswith(".safetensors") else (
        xxh3_bytes(content)
    )

    def fix(m: dict[str, Any]) -> None:
        m["files"][name]["size"] = len(content)
        m["files"][name]["hash"] = digest

    edit_manifest(step_dir, fix)


def edit_state_json(step_dir: Path, fn: Callable[[dict[str, Any]], Any]) -> None:
    data = json.loads((step_dir / fmt.STATE_FILE).read_text())
    out = fn(data)
    raw = out if isinstance(out, bytes) else json.dumps(data).encode()
    rewrite_file(step_dir, fmt.STATE_FILE, raw)


def first_file(step_dir: Path, prefix: str = "model") -> str:
    return sorted(p.name for p in step_dir.glob(f"{prefix}*.safetensors"))[0]


def every_reader_refuses(step_dir: Path, match: str | None = None) -> None:
    """read, verify, load, restore and verify_dir each raise (or report) a ModelverError."""
    for read in (fmt.read_manifest, verify_checkpoint, load_checkpoint):
        with pytest.raises(ModelverError, match=match):
            read(step_dir)
    live = make_state(seed=7)
    assert_restore_refused(step_dir, live, ModelverError, match=match)
    result = verify_dir(step_dir)
    assert not result.ok


# --- class 1: paths in a manifest -------------------------------------------------------------


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    return outside


@pytest.mark.parametrize(
    "bad", ["../../outside/secret.txt", "/etc/passwd", "./state.json", "a/../../b", "", "a\\b"]
)
def test_manifest_file_keys_outside_the_step_dir_are_refused(
    tmp_path: Path, sentinel: Path, bad: str
) -> None:
    step = save(tmp_path / "ck", 1, make_state())

    def add(m: dict[str, Any]) -> None:
        m["files"][bad] = {"size": 6, "hash": xxh3_bytes(b"secret")}

    edit_manifest(step, add)
    with pytest.raises(UnsafeCheckpointError, match="files key") as err:
        fmt.read_manifest(step)
    assert isinstance(err.value, UnsafePathError)
    assert isinstance(err.value, CheckpointCorruptedError)
    assert len(str(err.value).splitlines()) == 1
    every_reader_refuses(step, "files key")


def test_tensor_file_and_delta_entries_outside_are_refused(tmp_path: Path) -> None:
    step = save(tmp_path / "ck", 1, make_state())
    name = first_file(step)

    def tensor_out(m: dict[str, Any]) -> None:
        next(iter(m["tensors"].values()))["file"] = "../../outside/x.safetensors"

    edit_manifest(step, tensor_out)
    every_reader_refuses(step, "tensors.*file")

    for field, value in [("stored", "../x.delta"), ("stored", "/abs.delta"),
                         ("base", "../step-00000001"), ("base", "step-1"),
                         ("base", "step-00000001/../..")]:
        step = save(tmp_path / f"ck-{field}-{abs(hash(value))}", 2, make_state())

        def delta(m: dict[str, Any], field: str = field, value: str = value) -> None:
            entry = {"stored": name + ".delta", "base": "step-00000001", "base_hash": "0",
                     "size": 1, "hash": "0"}
            entry[field] = value
            m["deltas"] = {name: entry}

        edit_manifest(step, delta)
        with pytest.raises(ModelverError, match=f"deltas.*{field}"):
            fmt.read_manifest(step)


def test_symlinked_files_are_not_followed(tmp_path: Path, sentinel: Path) -> None:
    for target in (fmt.STATE_FILE, "safetensors", fmt.MANIFEST):
        step = save(tmp_path / f"ck-{target}", 1, make_state())
        name = first_file(step) if target == "safetensors" else target
        copy_out = sentinel / name
        copy_out.write_bytes((step / name).read_bytes())  # same bytes: the hash would match
        (step / name).unlink()
        (step / name).symlink_to(copy_out)
        with pytest.raises(ModelverError, match="symlink"):
            if target == fmt.MANIFEST:
                fmt.read_manifest(step)
            else:
                verify_checkpoint(step)
        with pytest.raises(ModelverError, match="symlink"):
            restore_checkpoint(step, make_state(seed=3))


def test_symlinked_subdirectory_of_a_listed_file_is_refused(tmp_path: Path, sentinel: Path) -> None:
    step = save(tmp_path / "ck", 1, make_state())
    (sentinel / "x.bin").write_bytes(b"abc")
    (step / "dcp-model").symlink_to(sentinel)

    def add(m: dict[str, Any]) -> None:
        m["files"]["dcp-model/x.bin"] = {"size": 3, "hash": xxh3_bytes(b"abc")}

    edit_manifest(step, add)
    with pytest.raises(CheckpointCorruptedError, match="symlink"):
        verify_checkpoint(step)


def test_symlinked_step_directory_is_not_listed_or_restored(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    save(root, 1, make_state(seed=1))
    elsewhere = save(tmp_path / "other", 5, make_state(seed=5))
    (root / "step-00000009").symlink_to(elsewhere)
    assert [i.step for i in list_checkpoints(root)] == [1]
    assert latest_checkpoint(root).step == 1  # type: ignore[union-attr]
    with pytest.raises(UnsafeCheckpointError, match="symlink"):
        fmt.read_manifest(root / "step-00000009")
    result = verify_dir(root)
    assert [c.path.name for c in result.checked if c.problems] == ["step-00000009"]
    live = make_state(seed=3)
    assert CheckpointManager(root, keep_last=None).restore(live) == 1


# --- class 7: malformed manifests, headers, delta footers --------------------------------------


MANIFEST_MUTATIONS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "a JSON list": lambda m: [m],
    "files is a list": lambda m: m.update(files=[1]),
    "files entry not an object": lambda m: m["files"].update({fmt.STATE_FILE: 1}),
    "size a string": lambda m: m["files"][fmt.STATE_FILE].update(size="12"),
    "size negative": lambda m: m["files"][fmt.STATE_FILE].update(size=-1),
    "step not an int": lambda m: m.update(step="notanint"),
    "step a bool": lambda m: m.update(step=True),
    "huge int": lambda m: m.update(step=int("9" * 4000)),
    "unknown dtype": lambda m: next(iter(m["tensors"].values())).update(dtype="nosuchdtype"),
    "4 TiB shape": lambda m: next(iter(m["tensors"].values())).update(shape=[1 << 40, 1]),
    "4 TiB consistent range": lambda m: next(iter(m["tensors"].values())).update(
        shape=[1 << 40], dtype="float32", offsets=[8, 8 + (4 << 40)]),
    "offsets past the file": lambda m: _shift(next(iter(m["tensors"].values())), 1 << 20),
    "offsets reversed": lambda m: next(iter(m["tensors"].values())).update(offsets=[100, 0]),
    "tensors a string": lambda m: m.update(tensors="x"),
    "alias to nothing": lambda m: m.update(aliases={"model/x": "nope"}),
    "alias to a list": lambda m: m.update(aliases={"model/x": ["model/0.bias"]}),
    "format version from the future": lambda m: m.update(format_version=99),
    "metric a string": lambda m: m.update(metrics={"loss": "low"}),
    "world size zero": lambda m: m.update(world_size=0),
}


def _shift(entry: dict[str, Any], by: int) -> None:
    entry["offsets"] = [entry["offsets"][0] + by, entry["offsets"][1] + by]


@pytest.mark.parametrize("case", sorted(MANIFEST_MUTATIONS))
def test_malformed_manifest_is_one_corrupted_error(tmp_path: Path, case: str) -> None:
    step = save(tmp_path / "ck", 1, make_state())
    edit_manifest(step, MANIFEST_MUTATIONS[case])
    with pytest.raises(CheckpointCorruptedError) as err:
        fmt.read_manifest(step)
    assert len(str(err.value).splitlines()) == 1 and len(str(err.value)) < 600
    every_reader_refuses(step)
    with pytest.warns(ModelverWarning):  # listing skips it, never raises
        assert list_checkpoints(tmp_path / "ck") == []


def test_deeply_nested_manifest_is_refused_without_recursion_error(tmp_path: Path) -> None:
    step = save(tmp_path / "ck", 1, make_state())
    (step / fmt.MANIFEST).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointCorruptedError):
        fmt.read_manifest(step)
    with pytest.warns(ModelverWarning):
        assert list_checkpoints(tmp_path / "ck") == []


def _header_of(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _with_header(header: object, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize(
    "case", ["list", "dtype", "dtype a list", "offsets past EOF", "length", "shape"]
)
def test_malformed_safetensors_header_is_corrupted(tmp_path: Path, case: str) -> None:
    root = tmp_path / "ck"
    save(root, 1, make_state(seed=1))
    step = save(root, 2, make_state(seed=2))
    name = first_file(step)
    header, data = _header_of(step / name)
    first = next(k for k in header if k != "__metadata__")
    if case == "list":
        content = _with_header([header], data)
    elif case.startswith("dtype"):
        header[first]["dtype"] = "F33" if case == "dtype" else ["F32"]
        content = _with_header(header, data)
    elif case == "offsets past EOF":
        header[first]["data_offsets"] = [0, 1 << 40]
        content = _with_header(header, data)
    elif case == "shape":
        header[first]["shape"] = [1 << 40]
        content = _with_header(header, data)
    else:
        content = struct.pack("<Q", 1 << 62) + b"{}"
    (step / name).write_bytes(content)
    if case != "length":  # the new size recorded too: the header itself is what gets parsed
        edit_manifest(step, lambda m: m["files"][name].update(size=len(content)))
    with pytest.raises(CheckpointCorruptedError) as err:
        verify_checkpoint(step)
    assert len(str(err.value).splitlines()) == 1
    live = make_state(seed=3)
    assert_restore_refused(step, live, CheckpointCorruptedError)
    with pytest.warns(ModelverWarning, match="skipping corrupted"):
        assert CheckpointManager(root, keep_last=None).restore(make_state(seed=3)) == 1


def _delta_step(tmp_path: Path) -> tuple[Path, Path, str]:
    root = tmp_path / "ck"
    state = make_state(seed=1)
    with CheckpointManager(root, keep_last=None, delta_full_every=4) as mgr:
        mgr.save(1, state)
        with torch.no_grad():
            for p in state["model"].parameters():
                p.mul_(1.0001)
        info = mgr.save(2, state)
    assert info is not None
    stored = next(info.path.glob("*.delta"), None)
    if stored is None:
        pytest.skip("the encoder stored no delta for this tiny state")
    return root, info.path, stored.name


@pytest.mark.parametrize("case", ["chunk length", "footer length", "overlapping frames",
                                  "footer type", "itemsize"])
def test_crazy_delta_footer_is_corrupted(tmp_path: Path, case: str) -> None:
    root, step, stored = _delta_step(tmp_path)
    raw = (step / stored).read_bytes()
    flen, magic = struct.unpack("<Q8s", raw[-16:])
    body, footer = raw[: -16 - flen], json.loads(raw[-16 - flen : -16])
    if case == "footer length":
        content = body + json.dumps(footer).encode() + struct.pack("<Q8s", 1 << 60, magic)
    else:
        if case == "chunk length":
            footer["chunks"][-1][1] = 1 << 40
        elif case == "overlapping frames":
            footer["chunks"][-1][3] = footer["chunks"][0][3]
        elif case == "itemsize":
            footer["chunks"][-1][2] = 0
        else:
            footer = [footer]
        f = json.dumps(footer).encode()
        content = body + f + struct.pack("<Q8s", len(f), magic)
    rewrite_file(step, stored, content)  # the stored file's hash matches: the decoder must check
    with pytest.raises(CheckpointCorruptedError) as err:
        verify_checkpoint(step)
    assert len(str(err.value).splitlines()) == 1
    with pytest.warns(ModelverWarning, match="skipping corrupted"):
        assert CheckpointManager(root, keep_last=None).restore(make_state(seed=3)) == 1


# --- class 6: nothing live changes before everything is checked ------------------------------


def test_sgd_checkpoint_into_adam_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    save(root, 1, make_state(opt="sgd"))
    live = make_state(seed=4)
    before = live_snapshot(live)
    with pytest.raises(StateMismatchError, match="SGD"):
        CheckpointManager(root, keep_last=None).restore(live)  # no fallback: the model changed
    assert_unchanged(live, before)
    assert set(live["optimizer"].param_groups[0]) >= {"betas", "eps"}


def test_old_checkpoint_without_recorded_class_compares_keys(tmp_path: Path) -> None:
    step = save(tmp_path / "ck", 1, make_state(opt="sgd", sched="exp"))

    def drop_classes(s: dict[str, Any]) -> None:
        for c in s["components"].values():
            c.pop("class", None)

    edit_state_json(step, drop_classes)
    live = make_state(seed=4)
    assert_restore_refused(step, live, StateMismatchError, match="optimizer")
    same = make_state(seed=4, opt="sgd", sched="exp")
    assert restore_checkpoint(step, same) == 1  # same classes still restore


def test_scheduler_class_is_compared(tmp_path: Path) -> None:
    step = save(tmp_path / "ck", 1, make_state(sched="exp"))
    live = make_state(seed=4)
    assert_restore_refused(step, live, StateMismatchError, match="ExponentialLR")


STATE_MUTATIONS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "unknown marker": lambda s: s["components"]["note"].update(state={"__evil__": 1}),
    "tensor marker to nothing": lambda s: s["components"]["note"].update(
        state={"__tensor__": "model/nope"}),
    "bad dtype marker": lambda s: s["components"]["note"].update(state={"__dtype__": "os"}),
    "bad dict marker": lambda s: s["components"]["note"].update(state={"__dict__": 5}),
    "deep nesting": lambda s: (json.dumps(s)[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000
                               + "}").encode(),
    "100k-digit int": lambda s: (json.dumps(s)[:-1] + ', "x": ' + "9" * 100_000 + "}").encode(),
    "rng python state": lambda s: s["rng"].update(python=[3, [1, 2], None]),
    "rng torch state": lambda s: s["rng"].update(torch="!!notbase64"),
    "components a list": lambda s: s.update(components=[1]),
    "aliases a list": lambda s: s.update(aliases=[]),
    "alias to a list": lambda s: s.update(aliases={"model/x": ["model/0.bias"]}),
    "sharded dtype a list": lambda s: s.update(sharded={
        "model/w": {"dtype": ["float32"], "shape": [2]}}),
    "sharded shape a string": lambda s: s.update(sharded={
        "model/w": {"dtype": "float32", "shape": "2"}}),
    "sharded null": lambda s: s.update(sharded=None),
    "per_rank not names": lambda s: s.update(per_rank=[1]),
    "not an object": lambda s: b"[1, 2]",
}


@pytest.mark.parametrize("case", sorted(STATE_MUTATIONS))
def test_bad_state_json_changes_nothing_and_restore_falls_back(tmp_path: Path, case: str) -> None:
    root = tmp_path / "ck"
    save(root, 1, make_state(seed=1))
    step = save(root, 2, make_state(seed=2))
    edit_state_json(step, STATE_MUTATIONS[case])
    live = make_state(seed=3)
    err = assert_restore_refused(step, live, CheckpointCorruptedError)
    assert len(str(err.value).splitlines()) == 1 and len(str(err.value)) < 800
    with pytest.raises(CheckpointCorruptedError):
        load_checkpoint(step)
    with pytest.warns(ModelverWarning, match="skipping corrupted"):
        assert CheckpointManager(root, keep_last=None).restore(live) == 1
    expected = make_state(seed=1)["model"].state_dict()
    for k, v in live["model"].state_dict().items():
        assert torch.equal(v, expected[k])


def test_hash_mismatch_in_a_later_file_leaves_the_model_untouched(tmp_path: Path) -> None:
    """Files are read in name order: model-* comes before optimizer-*. Before the fix the
    model was already overwritten when the optimizer file's hash failed."""
    step = save(tmp_path / "ck", 1, make_state(seed=1))
    name = first_file(step, "optimizer")
    raw = bytearray((step / name).read_bytes())
    raw[-1] ^= 0x40
    (step / name).write_bytes(bytes(raw))
    live = make_state(seed=3)
    assert_restore_refused(step, live, CheckpointCorruptedError, match="hash")


def test_file_truncated_while_it_is_hashed_is_corruption_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file is truncated in place after restore opened it, as its hash pass starts. The
    reads come back short: one CheckpointCorruptedError, the live model untouched. Hashed
    through a mapping (before the fix) the pages past the new end killed the process (SIGBUS)."""
    state = {"model": nn.Linear(64, 64)}  # 16 KiB of weights: pages beyond a cut at 4 KiB
    step = save(tmp_path / "ck", 1, state)
    live = {"model": nn.Linear(64, 64)}
    before = {k: v.clone() for k, v in live["model"].state_dict().items()}
    real = tf.read_safetensors_header
    cut: list[str] = []

    def truncate_then_read(f: Any) -> tuple[int, dict[str, Any]]:
        for p in sorted(step.glob("*.safetensors")):
            if p.name not in cut and p.stat().st_size > 8192:
                (n,) = struct.unpack("<Q", p.read_bytes()[:8])
                os.truncate(p, 8 + n + 4)  # the header stays whole, the data is cut
                cut.append(p.name)
        return real(f)

    monkeypatch.setattr(tf, "read_safetensors_header", truncate_then_read)
    with pytest.raises(CheckpointCorruptedError, match="truncated"):
        restore_checkpoint(step, live)
    assert cut
    for k, v in live["model"].state_dict().items():
        assert torch.equal(v, before[k])


def _opt_state(s: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = s["components"]["optimizer"]["state"]
    return state


OPTIMIZER_STATE_MUTATIONS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "state a list": lambda s: _opt_state(s).update(state=[]),
    "state a tuple": lambda s: _opt_state(s).update(state={"__tuple__": []}),
    "per-parameter state a list": lambda s: _opt_state(s)["state"]["__dict__"][0].__setitem__(
        1, [1]),
}


@pytest.mark.parametrize("case", sorted(OPTIMIZER_STATE_MUTATIONS))
def test_optimizer_state_torch_would_refuse_is_refused_first(tmp_path: Path, case: str) -> None:
    """torch's own load_state_dict failed on these after the model weights were already
    read into live memory: refused now while nothing has changed."""
    step = save(tmp_path / "ck", 1, make_state(seed=1))
    edit_state_json(step, OPTIMIZER_STATE_MUTATIONS[case])
    live = make_state(seed=3)
    assert_restore_refused(step, live, StateMismatchError,
                           match="per-parameter state is not a mapping")


class Refuses:
    """A user object whose own load_state_dict rejects the saved state (a changed dataset)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        if s["n"] != self.n:
            raise ValueError(f"saved for {s['n']} items, this one has {self.n}")


def test_an_objects_own_refusal_rolls_everything_back(tmp_path: Path) -> None:
    state = make_state(seed=1)
    state["data"] = Refuses(10)
    step = save(tmp_path / "ck", 1, state)
    live = make_state(seed=3)
    live["data"] = Refuses(11)
    assert_restore_refused(step, live, StateMismatchError, match="11")


# --- class 9: unreadable files -----------------------------------------------------------------


def test_unreadable_file_is_skipped_like_a_corrupt_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests run as root, where chmod 000 does not stop a read: os.open is made to fail with
    EACCES for one file instead, as it does for an ordinary user."""
    root = tmp_path / "ck"
    save(root, 1, make_state(seed=1))
    step = save(root, 2, make_state(seed=2))
    real_open = os.open
    blocked = {str(step / fmt.STATE_FILE), str(step / first_file(step))}

    def fake_open(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        if str(path) in blocked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(CheckpointCorruptedError, match=r"cannot be read \(Permission denied"):
        restore_checkpoint(step, make_state(seed=3))
    result = verify_dir(root)
    bad = [c for c in result.checked if c.problems]
    assert [c.path.name for c in bad] == ["step-00000002"]
    assert "cannot be read" in bad[0].problems[0]
    live = make_state(seed=3)
    with pytest.warns(ModelverWarning, match="cannot be read"):
        assert CheckpointManager(root, keep_last=None).restore(live) == 1


# --- class 5: readers racing a writer that retires checkpoints --------------------------------


def test_readers_racing_keep_last_1_never_fail(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    state = make_state(seed=1)
    mgr = CheckpointManager(root, keep_last=1)
    mgr.save(1, state)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for step in range(2, 120):
                mgr.save(step, state)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            stop.set()

    def reader(fn: Callable[[], Any]) -> None:
        try:
            while not stop.is_set():
                fn()
        except BaseException as e:
            errors.append(e)

    def verify_root() -> None:
        result = verify_dir(root)
        assert result.ok, [c.problems for c in result.checked]

    readers = [
        lambda: load_checkpoint(root),
        lambda: list_checkpoints(root),
        lambda: latest_checkpoint(root),
        lambda: resolve_checkpoint_dir(root),
        verify_root,
    ]
    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(fn,)) for fn in readers
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelverWarning)  # no "skipping" for a retired one
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    mgr.close()
    assert not errors, repr(errors[0])


@pytest.mark.parametrize("which", ["every", "last"])
def test_state_only_the_optimizer_class_refuses_is_caught_before_any_weight_changes(
    tmp_path: Path, which: str
) -> None:
    """Adam state without ``step`` is well-formed JSON that only Adam's own load_state_dict
    refuses; it used to refuse after the model's weights were overwritten in place. The check
    judges one parameter's entry per distinct set of keys: one odd entry is judged too."""
    root = tmp_path / "ck"
    save(root, 1, make_state(seed=1))
    step = save(root, 2, make_state(seed=2))

    def drop_step(s: dict[str, Any]) -> None:
        entries = s["components"]["optimizer"]["state"]["state"]["__dict__"]
        for _, per_param in entries if which == "every" else entries[-1:]:
            per_param.pop("step")

    edit_state_json(step, drop_step)
    live = make_state(seed=3)
    assert_restore_refused(step, live, CheckpointCorruptedError, match=r"components\.optimizer")
    with pytest.warns(ModelverWarning, match="skipping corrupted"):
        assert CheckpointManager(root, keep_last=None).restore(live) == 1
    expected = make_state(seed=1)["model"].state_dict()
    for k, v in live["model"].state_dict().items():
        assert torch.equal(v, expected[k])
