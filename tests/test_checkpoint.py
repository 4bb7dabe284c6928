"""Checkpoint core: round trips, corruption, retention, shape checks, async and signals."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import modelver.checkpoint.io as ckio
import modelver.checkpoint.manager as ckmanager
from modelver import (
    CheckpointManager,
    list_checkpoints,
    load_checkpoint,
    restore_checkpoint,
    verify_checkpoint,
)
from modelver.checkpoint.retention import plan_retention
from modelver.errors import (
    AsyncSaveError,
    CheckpointCorruptedError,
    CheckpointWriteError,
    ModelverWarning,
    NotSerializableError,
    StateMismatchError,
    TrainingInterrupted,
)
from tests.helpers import make_state, train_steps


def assert_same_state(a: dict, b: dict) -> None:
    for (k1, v1), (k2, v2) in zip(
        a["model"].state_dict().items(), b["model"].state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)
    sa, sb = a["optimizer"].state_dict(), b["optimizer"].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for pid, st in sa["state"].items():
        for key, val in st.items():
            assert torch.equal(val, sb["state"][pid][key]), (pid, key)
    assert a["scheduler"].state_dict() == b["scheduler"].state_dict()


def test_round_trip_restores_objects_rngs_and_types(tmp_path: Path) -> None:
    state = make_state()
    train_steps(state, 3)
    mgr = CheckpointManager(tmp_path / "ck", every_steps=1)
    mgr.save(3, state, metrics={"loss": 0.5}, extras={"note": "hello"})
    expected = (random.random(), float(np.random.rand()), torch.rand(3))

    fresh = make_state(seed=1)
    assert CheckpointManager(tmp_path / "ck").restore(fresh) == 3
    assert_same_state(state, fresh)
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    # exact Python types come back: AdamW's betas is a tuple, optimizer state keys are ints
    restored = fresh["optimizer"].state_dict()
    assert isinstance(restored["param_groups"][0]["betas"], tuple)
    assert all(isinstance(k, int) for k in restored["state"])

    ck = load_checkpoint(tmp_path / "ck")
    assert ck.step == 3 and ck.metrics == {"loss": 0.5} and ck.extras == {"note": "hello"}
    assert torch.equal(ck.state["model"]["0.weight"], state["model"][0].weight)


def test_files_are_plain_safetensors_and_no_pickle_on_load(tmp_path: Path, monkeypatch) -> None:
    state = make_state()
    train_steps(state, 1)
    info = CheckpointManager(tmp_path).save(1, state)
    assert info is not None
    for f in info.path.glob("*.safetensors"):
        load_file(f)  # the reference reader accepts every file

    def forbidden(*a, **k):
        raise AssertionError("pickle used on the load path")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    fresh = make_state(seed=2)
    restore_checkpoint(info.path, fresh)
    load_checkpoint(info.path)
    assert_same_state(state, fresh)


def test_special_tensors_and_tied_weights(tmp_path: Path) -> None:
    emb = nn.Embedding(5, 4)
    head = nn.Linear(4, 5, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "head": head}).to(torch.bfloat16)
    extra = {
        "scalar": torch.tensor(3.5),
        "mask": torch.tensor([True, False]),
        "view": torch.arange(12).reshape(3, 4).t(),
        "empty": torch.zeros(0, 3),
        "arr": np.arange(3, dtype=np.int16),
        "nested": {"tuple": (1, 2.5, "x"), 7: [None, True]},
    }
    info = CheckpointManager(tmp_path).save(1, {"model": model, "extra": extra})
    assert info is not None
    manifest = verify_checkpoint(info.path)
    assert manifest.aliases == {"model/head.weight": "model/emb.weight"}
    ck = load_checkpoint(info.path)
    got = ck.state["extra"]
    assert torch.equal(got["view"], extra["view"]) and got["scalar"].shape == ()
    assert got["mask"].dtype == torch.bool and got["empty"].shape == (0, 3)
    assert np.array_equal(got["arr"], extra["arr"]) and got["arr"].dtype == np.int16
    assert got["nested"] == {"tuple": (1, 2.5, "x"), 7: [None, True]}
    assert ck.state["model"]["emb.weight"].dtype == torch.bfloat16
    fresh = nn.ModuleDict({"emb": nn.Embedding(5, 4), "head": nn.Linear(4, 5, bias=False)})
    fresh = fresh.to(torch.bfloat16)
    holder = {"model": fresh, "extra": {}}
    restore_checkpoint(info.path, holder)
    assert torch.equal(fresh["head"].weight, model["head"].weight)
    assert holder["extra"]["nested"][7] == [None, True]


def test_unserialisable_value_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NotSerializableError, match="object at 'cfg/fn'"):
        CheckpointManager(tmp_path).save(1, {"cfg": {"fn": object()}})
    assert list_checkpoints(tmp_path) == []


def corrupt(path: Path, how: str) -> None:
    target = sorted(path.glob("model-*.safetensors"))[0]
    if how == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0x01
        target.write_bytes(bytes(data))
    elif how == "manifest":
        (path / "MANIFEST.json").unlink()


@pytest.mark.parametrize("how", ["truncate", "flip", "manifest"])
def test_corrupted_newest_is_skipped_and_reported(tmp_path: Path, how: str) -> None:
    state = make_state()
    mgr = CheckpointManager(tmp_path, keep_last=None)
    train_steps(state, 1)
    mgr.save(1, state)
    good = {k: v.clone() for k, v in state["model"].state_dict().items()}
    train_steps(state, 1)
    info = mgr.save(2, state)
    assert info is not None
    corrupt(info.path, how)
    if how != "manifest":
        with pytest.raises(CheckpointCorruptedError):
            verify_checkpoint(info.path)
    fresh = make_state(seed=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert CheckpointManager(tmp_path).restore(fresh) == 1
    if how != "manifest":
        assert any(issubclass(w.category, ModelverWarning) for w in caught)
    for k, v in fresh["model"].state_dict().items():
        assert torch.equal(v, good[k])


def test_flipped_byte_anywhere_is_detected(tmp_path: Path) -> None:
    state = make_state()
    info = CheckpointManager(tmp_path).save(1, state)
    assert info is not None
    files = sorted(p for p in info.path.iterdir() if p.name != "MANIFEST.json")
    rng = random.Random(0)
    for f in files:
        original = f.read_bytes()
        pos = rng.randrange(len(original))
        flipped = bytearray(original)
        flipped[pos] ^= 0x40
        f.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointCorruptedError):
            verify_checkpoint(info.path)
        f.write_bytes(original)
    verify_checkpoint(info.path)


def test_only_checkpoint_corrupted_raises_instead_of_silent_restart(tmp_path: Path) -> None:
    state = make_state()
    info = CheckpointManager(tmp_path).save(1, state)
    assert info is not None
    corrupt(info.path, "flip")
    live = make_state(seed=3)
    before = {k: v.clone() for k, v in live["model"].state_dict().items()}
    # every file is hash-checked before live memory is written: nothing was overwritten
    with pytest.warns(ModelverWarning, match="skipping corrupted"):
        assert CheckpointManager(tmp_path).restore(live) == 0
    for k, v in live["model"].state_dict().items():
        assert torch.equal(v, before[k])


def test_shape_mismatch_names_tensors_and_changes_nothing(tmp_path: Path) -> None:
    CheckpointManager(tmp_path).save(1, make_state(hidden=8))
    other = make_state(hidden=16, seed=9)
    before = {k: v.clone() for k, v in other["model"].state_dict().items()}
    with pytest.raises(StateMismatchError) as err:
        CheckpointManager(tmp_path).restore(other)
    assert "0.weight saved [8, 4] float32 now [16, 4] float32" in str(err.value)
    for k, v in other["model"].state_dict().items():
        assert torch.equal(v, before[k])


def test_optimizer_of_other_shape_is_refused(tmp_path: Path) -> None:
    state = make_state(hidden=8)
    train_steps(state, 1)
    CheckpointManager(tmp_path).save(1, {"optimizer": state["optimizer"]})
    other = make_state(hidden=16)
    with pytest.raises(StateMismatchError, match="optimizer/state/0/exp_avg"):
        restore_checkpoint(tmp_path, {"optimizer": other["optimizer"]})


def test_retention_keeps_last_and_best_and_never_the_newest(tmp_path: Path) -> None:
    state = make_state()
    losses = [5.0, 1.0, 4.0, 3.0, 6.0, 7.0]
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="loss", mode="min")
    for step, loss in enumerate(losses, start=1):
        mgr.save(step, state, metrics={"loss": loss})
        steps = [c.step for c in mgr.checkpoints()]
        assert step in steps  # the newest survives every retention pass
    assert [c.step for c in mgr.checkpoints()] == [2, 5, 6]


def test_plan_retention_is_pure_and_handles_no_limit(tmp_path: Path) -> None:
    state = make_state()
    mgr = CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2, 3):
        mgr.save(step, state, metrics={"acc": float(step % 2)})
    infos = mgr.checkpoints()
    plan = plan_retention(infos, keep_last=1, keep_best=1, monitor="acc", mode="max")
    assert [c.step for c in plan.keep] == [3]
    assert [c.step for c in plan.delete] == [1, 2]
    plan = plan_retention(infos, keep_last=1, keep_best=2, monitor="acc", mode="min")
    assert [c.step for c in plan.keep] == [2, 3]
    assert len(mgr.checkpoints()) == 3  # planning deleted nothing
    assert plan_retention(infos, keep_last=None).delete == ()


def test_disk_full_leaves_previous_checkpoint_and_no_debris(tmp_path: Path, monkeypatch) -> None:
    state = make_state()
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, state)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckio.fmt, "write_all", full)
    with pytest.raises(CheckpointWriteError, match="No space left"):
        mgr.save(2, state)
    assert [c.step for c in mgr.checkpoints()] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_stale_temp_dirs_are_invisible_and_cleaned(tmp_path: Path) -> None:
    state = make_state()
    CheckpointManager(tmp_path).save(1, state)
    stale = tmp_path / ".tmp-step-00000002-999999999-abcdef"
    stale.mkdir()
    (stale / "model-00000.safetensors").write_bytes(b"junk")
    nomanifest = tmp_path / "step-00000003"
    nomanifest.mkdir()
    assert [c.step for c in list_checkpoints(tmp_path)] == [1]
    CheckpointManager(tmp_path)
    assert not stale.exists()


def test_every_steps_and_every_seconds(tmp_path: Path, monkeypatch) -> None:
    state = make_state()
    mgr = CheckpointManager(tmp_path / "a", every_steps=3, keep_last=None)
    saved = [s for s in range(1, 10) if mgr.maybe_save(s, state)]
    assert saved == [3, 6, 9]
    clock = [100.0]
    monkeypatch.setattr(ckmanager.time, "monotonic", lambda: clock[0])
    mgr = CheckpointManager(tmp_path / "b", every_seconds=10, keep_last=None)
    results = []
    for step in range(1, 6):
        clock[0] += 4
        results.append(mgr.maybe_save(step, state))
    assert results == [False, False, True, False, False]


def test_same_step_saved_twice_is_replaced_atomically(tmp_path: Path) -> None:
    state = make_state()
    CheckpointManager(tmp_path).save(4, state, metrics={"loss": 1.0})
    CheckpointManager(tmp_path).save(4, state, metrics={"loss": 2.0})
    infos = list_checkpoints(tmp_path)
    assert [(c.step, c.metrics["loss"]) for c in infos] == [(4, 2.0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]


def test_async_save_is_isolated_from_later_updates(tmp_path: Path) -> None:
    state = make_state()
    mgr = CheckpointManager(tmp_path, async_save=True, every_steps=1)
    expected = {k: v.clone() for k, v in state["model"].state_dict().items()}
    assert mgr.maybe_save(1, state)
    with torch.no_grad():
        for p in state["model"].parameters():
            p.add_(1.0)  # the training thread moves on while the save runs
    mgr.close()
    ck = load_checkpoint(tmp_path)
    for k, v in expected.items():
        assert torch.equal(ck.state["model"][k], v)


def test_async_failure_surfaces_at_next_call(tmp_path: Path, monkeypatch) -> None:
    state = make_state()
    mgr = CheckpointManager(tmp_path, async_save=True, every_steps=1)

    def boom(root, snap):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(ckmanager, "write_checkpoint", boom)
    mgr.maybe_save(1, state)
    with pytest.raises(AsyncSaveError, match="step 1"):
        mgr.wait()
        mgr.maybe_save(2, state)


def test_sigterm_saves_once_and_exits_cleanly(tmp_path: Path) -> None:
    state = make_state()
    mgr = CheckpointManager(tmp_path, every_steps=100, handle_signals=True)
    try:
        assert not mgr.maybe_save(1, state)
        os.kill(os.getpid(), signal.SIGTERM)
        assert mgr.stop_requested
        with pytest.raises(TrainingInterrupted) as exc:
            mgr.maybe_save(2, state)
        assert exc.value.code == 128 + signal.SIGTERM
    finally:
        mgr.close()
    assert [c.step for c in list_checkpoints(tmp_path)] == [2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_manifest_records_files_and_tensor_index(tmp_path: Path) -> None:
    state = make_state()
    info = CheckpointManager(tmp_path).save(1, state, metrics={"loss": 0.25})
    assert info is not None
    doc = json.loads((info.path / "MANIFEST.json").read_text())
    assert doc["format"] == "modelver-checkpoint" and doc["step"] == 1
    assert set(doc["files"]) == {p.name for p in info.path.iterdir()} - {"MANIFEST.json"}
    entry = doc["tensors"]["model/0.weight"]
    assert entry["shape"] == [8, 4] and entry["dtype"] == "float32"
    assert info.size == sum(f["size"] for f in doc["files"].values())


def test_rerunning_a_finished_loop_changes_nothing(tmp_path: Path) -> None:
    """The hand-written loop of the README, run again after it finished (twice): it restores the
    final step, trains nothing and writes nothing."""
    def job() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(4, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        state = {"model": model, "optimizer": opt}
        with CheckpointManager(tmp_path / "ck", every_steps=3, keep_last=2) as mgr:
            start = mgr.restore(state)
            for step in range(start, 10):
                opt.zero_grad()
                model(torch.ones(2, 4)).square().mean().backward()
                opt.step()
                mgr.maybe_save(step + 1, state)
            mgr.save(10, state)
        return {k: v.clone() for k, v in model.state_dict().items()}

    def on_disk() -> list[tuple[str, bytes]]:
        return sorted((p.name, (p / "MANIFEST.json").read_bytes())
                      for p in (tmp_path / "ck").glob("step-*"))

    final = job()
    listed = on_disk()
    assert [n for n, _ in listed] == ["step-00000009", "step-00000010"]
    for _ in range(2):
        again = job()
        assert all(torch.equal(final[k], again[k]) for k in final)
        assert on_disk() == listed


def test_many_small_components_share_files_and_come_back(tmp_path: Path) -> None:
    state = {f"t{i}": torch.randn(64) for i in range(100)}
    saved = {k: v.clone() for k, v in state.items()}
    mgr = CheckpointManager(tmp_path, keep_last=None)
    first = mgr.save(1, state)
    second = mgr.save(2, state)
    assert first is not None and second is not None
    files = sorted(f for f in json.loads((first.path / "MANIFEST.json").read_text())["files"])
    assert files == ["+packed-00000.safetensors", "state.json"]
    assert sorted(verify_checkpoint(second.path).files) == files  # the same layout again
    for t in state.values():
        t.zero_()
    assert restore_checkpoint(first.path, state) == 1
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    few = {f"t{i}": torch.randn(4) for i in range(3)}  # a handful keep files of their own
    info = CheckpointManager(tmp_path / "few").save(1, few)
    assert info is not None
    assert sorted(verify_checkpoint(info.path).files) == [
        "state.json", "t0-00000.safetensors", "t1-00000.safetensors", "t2-00000.safetensors"
    ]


def test_a_module_read_in_place_skips_load_state_dict_unless_something_needs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def build() -> nn.Module:
        model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        model.register_buffer("scale", torch.zeros(3))
        return model

    torch.manual_seed(0)
    model = build()
    model.scale += 2.0
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    info = CheckpointManager(tmp_path).save(1, {"model": model})
    assert info is not None

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_state_dict called")

    fresh = build()
    with monkeypatch.context() as m:
        m.setattr(nn.Module, "load_state_dict", refuse)
        restore_checkpoint(info.path, {"model": fresh}, restore_rngs=False)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    calls: list[object] = []
    hooked = build()
    hooked[0].register_load_state_dict_post_hook(lambda module, keys: calls.append(module))
    restore_checkpoint(info.path, {"model": hooked}, restore_rngs=False)
    assert calls == [hooked[0]]  # a hook runs: the ordinary load_state_dict was taken
    assert all(torch.equal(hooked.state_dict()[k], v) for k, v in saved.items())
    norm = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))  # overrides _load_from_state_dict
    norm(torch.randn(8, 4))
    expected = {k: v.clone() for k, v in norm.state_dict().items()}
    info = CheckpointManager(tmp_path / "bn").save(1, {"model": norm})
    assert info is not None
    other = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with monkeypatch.context() as m:
        m.setattr(nn.Module, "load_state_dict", refuse)
        with pytest.raises(StateMismatchError):
            restore_checkpoint(info.path, {"model": other}, restore_rngs=False)
    restore_checkpoint(info.path, {"model": other}, restore_rngs=False)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in expected.items())
