"""States of many small tensors (issue 15): batched reads and hashes, the paused collector,
no reference cycles per component, and the strict header checks on their fast path."""

from __future__ import annotations

import gc
import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from modelver.checkpoint import format as fmt
from modelver.checkpoint import tensorfile as tf
from modelver.checkpoint.io import BATCH_BYTES, SMALL_TENSOR, bytes_view, paused_gc
from modelver.checkpoint.manager import CheckpointManager
from modelver.checkpoint.restore import restore_checkpoint
from modelver.checkpoint.state import flatten, unflatten
from modelver.checkpoint.verify import verify_checkpoint
from modelver.errors import CheckpointCorruptedError, MalformedDataError


def many_state() -> dict[str, Any]:
    """Small tensors of every kind the batched paths meet: dtypes NumPy lacks, scalars, empty
    ones, runs longer than one batch, and tensors too large to batch between them."""
    g = torch.Generator().manual_seed(0)
    state: dict[str, Any] = {f"t{i}": torch.randn(64, generator=g) for i in range(300)}
    state |= {f"b{i}": torch.randn(3, 5, generator=g).to(torch.bfloat16) for i in range(40)}
    state |= {f"i{i}": torch.arange(i, i + 7) for i in range(40)}
    state["flag"] = torch.tensor([True, False, True])
    state["half"] = torch.randn(2, 2, generator=g).half()
    state["scalar"] = torch.tensor(3.5)
    state["empty"] = torch.empty(0, 4)
    state["large"] = torch.randn(SMALL_TENSOR // 4 + 3, generator=g)
    halves = BATCH_BYTES // (SMALL_TENSOR // 2) + 2  # batched, more than one batch
    state["run"] = [torch.randn(SMALL_TENSOR // 8, generator=g) for _ in range(halves)]
    return state


def zeros_like(state: dict[str, Any]) -> dict[str, Any]:
    return {k: [torch.zeros_like(x) for x in v] if isinstance(v, list) else torch.zeros_like(v)
            for k, v in state.items()}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def eq(x: Any, y: Any) -> bool:
        if isinstance(x, list):
            return len(x) == len(y) and all(eq(p, q) for p, q in zip(x, y, strict=True))
        return bool(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y))
    return a.keys() == b.keys() and all(eq(a[k], b[k]) for k in a)


def test_many_small_tensors_round_trip_in_place(tmp_path: Path) -> None:
    state = many_state()
    info = CheckpointManager(tmp_path / "ck").save(1, state)
    assert info is not None
    verify_checkpoint(info.path)
    packed = sorted(p.name for p in info.path.glob("+packed-*.safetensors"))
    assert packed and len(list(info.path.glob("*.safetensors"))) < 10  # no file per tensor
    live = zeros_like(state)
    before = {k: v.data_ptr() for k, v in live.items() if isinstance(v, torch.Tensor)}
    restore_checkpoint(info.path, live, restore_rngs=False)
    assert same(live, state)
    assert {k: v.data_ptr() for k, v in live.items() if isinstance(v, torch.Tensor)} == before
    assert load_file(info.path / packed[0])  # still a safetensors file


def test_corrupt_packed_file_refused_before_any_change(tmp_path: Path) -> None:
    state = many_state()
    info = CheckpointManager(tmp_path / "ck").save(1, state)
    assert info is not None
    target = next(info.path.glob("+packed-*.safetensors"))
    raw = bytearray(target.read_bytes())
    raw[-5] ^= 0xFF
    target.write_bytes(bytes(raw))
    live = zeros_like(state)
    with pytest.raises(CheckpointCorruptedError, match="hash"):
        restore_checkpoint(info.path, live, restore_rngs=False)
    assert same(live, zeros_like(state))


@pytest.mark.parametrize("buf", [7, 100, 4096, 1 << 20])
def test_hash_through_any_buffer(tmp_path: Path, buf: int) -> None:
    """The batched hash (tensors inside the buffer, across its end, larger than it) is the
    tree hash the writer recorded, whatever the buffer's size."""
    info = CheckpointManager(tmp_path / "ck").save(1, many_state())
    assert info is not None
    manifest = fmt.read_manifest(info.path)
    files = [n for n in manifest.files if n.endswith(".safetensors")]
    for name in files:
        with open(info.path / name, "rb") as f:
            assert tf.hash_safetensors(f, bytearray(buf)) == manifest.files[name].hash
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes((info.path / files[0]).read_bytes() + b"x")
    with open(longer, "rb") as f, pytest.raises(ValueError, match="after the last tensor"):
        tf.hash_safetensors(f, bytearray(buf))
    shorter = tmp_path / "shorter.safetensors"
    shorter.write_bytes((info.path / files[0]).read_bytes()[:-1])
    with open(shorter, "rb") as f, pytest.raises(ValueError):
        tf.hash_safetensors(f, bytearray(buf))


def header_file(entries: dict[str, Any], data: int = 16) -> io.BytesIO:
    raw = json.dumps(entries).encode()
    f = io.BytesIO(struct.pack("<Q", len(raw)) + raw + bytes(data))
    f.size = len(f.getvalue())  # type: ignore[attr-defined]
    return f


@pytest.mark.parametrize("entry", [
    [1],
    {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [1] * (tf.MAX_DIMS + 1), "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [4], "data_offsets": [0, 17]},
    {"dtype": "F32", "shape": [4], "data_offsets": [False, 16]},
    {"dtype": "F32", "shape": [4], "data_offsets": [0]},
    {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [tf.MAX_SIZE + 1], "data_offsets": [0, 16]},
])
def test_header_entries_checked_on_the_fast_path(entry: Any) -> None:
    good = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    assert tf.read_safetensors_header(header_file({"a": good}))[1] == {"a": good}
    with pytest.raises(MalformedDataError):
        tf.read_safetensors_header(header_file({"a": good, "b": entry}))


def test_paused_gc_nests_and_restores_the_collector() -> None:
    assert gc.isenabled()
    with paused_gc():
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # off before: left off
    finally:
        gc.enable()


def test_flatten_and_unflatten_leave_no_garbage_cycles() -> None:
    """Reference counting frees all they make: with 10^5 components a cycle per call cost
    more than the save itself in collections."""
    state = {"w": torch.zeros(3), "opt": {"state": {0: {"step": torch.tensor(1.0)}},
                                          "param_groups": [{"betas": (0.9, 0.99)}]}}
    gc.collect()
    with paused_gc():
        for comp, value in state.items():
            skeleton, flat = flatten(comp, value)
            unflatten(skeleton, {f.name: f.tensor for f in flat})
            unflatten(skeleton, None, names={f.name for f in flat})
        del skeleton, flat
        assert gc.collect() == 0


def test_bytes_view_is_the_tensor_memory() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.bool, torch.int8, torch.float16):
        t = torch.ones(2, 3).to(dtype)
        view = bytes_view(t)
        assert view.format == "B" and view.nbytes == 6 * t.element_size()
        view[:] = bytes(view.nbytes)
        assert not t.any()
    assert bytes_view(torch.empty(0, 3)).nbytes == 0
