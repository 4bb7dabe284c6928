"""Run identity: runs side by side in one checkpoints directory (CheckpointManager(run=...))."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from modelver import (
    CheckpointManager,
    ResumableSampler,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from modelver.checkpoint.format import read_manifest
from modelver.checkpoint.kept import kept_dir
from modelver.checkpoint.runid import list_runs, run_dir, run_id
from modelver.errors import InvalidArgumentError, ModelverError, ModelverWarning
from tests.helpers import dvc, init_repo


def _train(root: Path, params: dict[str, float], steps: int, *, keep_last: int | None = None
           ) -> dict[str, torch.Tensor]:
    """A loop that resumes its own run: lr shapes the run, steps may grow."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=params["lr"])
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(root, every_steps=2, keep_last=keep_last, run=params) as mgr:
        start = mgr.restore(state)
        for step in range(start, steps):
            opt.zero_grad()
            model(torch.ones(3, 4)).square().mean().backward()
            opt.step()
            mgr.maybe_save(step + 1, state, metrics={"lr": params["lr"]})
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_new_run_starts_afresh_and_an_old_one_continues(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    a, b = {"lr": 0.1}, {"lr": 0.01}
    _train(root, a, 6)
    b_weights = _train(root, b, 4)  # another run: from step 0, run a's checkpoints untouched
    assert list_runs(root) == sorted([run_id(a), run_id(b)])
    assert [c.step for c in list_checkpoints(root, run=a)] == [2, 4, 6]
    assert [c.step for c in list_checkpoints(root, run=b)] == [2, 4]
    assert _same(b_weights, _train(tmp_path / "fresh", b, 4))  # b never saw a's state
    a_more = _train(root, a, 10)  # back to run a, with more steps: it continues from step 6
    assert _same(a_more, _train(tmp_path / "straight", a, 10))
    assert [c.step for c in list_checkpoints(root, run=a)] == [2, 4, 6, 8, 10]
    assert latest_checkpoint(root, run=b).step == 4  # type: ignore[union-attr]
    assert load_checkpoint(root, run=a).step == 10
    assert list_checkpoints(root) == []  # nothing of any run at the top level


def test_every_manifest_records_its_run(tmp_path: Path) -> None:
    params = {"lr": 0.1, "hidden": 8}
    _train(tmp_path, params, 2)
    rid = run_id(params)
    step = tmp_path / f"run-{rid}" / "step-00000002"
    assert read_manifest(step).run == rid
    recorded = json.loads((tmp_path / f"run-{rid}" / "RUN.json").read_text())
    assert recorded == {"run": rid, "params": params}
    assert run_id({"hidden": 8, "lr": 0.1}) == rid  # key order is not identity
    assert run_id({"lr": 0.1, "hidden": 8.0}) != rid  # 8 and 8.0 are different runs
    assert run_id("baseline") == "baseline"


def test_retention_counts_per_run(tmp_path: Path) -> None:
    a, b = {"lr": 0.1}, {"lr": 0.2}
    _train(tmp_path, a, 8, keep_last=2)
    _train(tmp_path, b, 8, keep_last=2)
    assert [c.step for c in list_checkpoints(tmp_path, run=a)] == [6, 8]
    assert [c.step for c in list_checkpoints(tmp_path, run=b)] == [6, 8]


def test_a_checkpoint_of_another_run_is_never_restored(tmp_path: Path) -> None:
    """A step directory copied into the wrong run's directory is skipped, not restored."""
    a, b = {"lr": 0.1}, {"lr": 0.2}
    _train(tmp_path, a, 4)
    _train(tmp_path, b, 2)
    shutil.copytree(tmp_path / f"run-{run_id(a)}" / "step-00000004",
                    tmp_path / f"run-{run_id(b)}" / "step-00000004")
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(tmp_path, run=b) as mgr:
            restored = mgr.restore({"model": model})
    assert restored == 2
    assert any(issubclass(w.category, ModelverWarning) and f"belongs to run {run_id(a)}"
               in str(w.message) for w in caught)


def test_run_none_keeps_the_layout_without_runs(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"model": nn.Linear(2, 2)})
    assert (tmp_path / "step-00000001" / "MANIFEST.json").is_file()
    assert "run" not in json.loads((tmp_path / "step-00000001" / "MANIFEST.json").read_text())
    assert list_runs(tmp_path) == []


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "-lead", "x" * 65, {}, {1: 2},
                                 {"lr": float("nan")}, {"f": object()}, 3, ["lr"]])
def test_a_bad_run_is_refused_before_anything_is_written(tmp_path: Path, bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match="run"):
        CheckpointManager(tmp_path / "ck", run=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("bad", ["../x", "", 7, "a/b"])
def test_a_manifest_naming_a_malformed_run_is_refused(tmp_path: Path, bad: object) -> None:
    """The run in a manifest is data: anything but a run id makes the checkpoint unreadable
    (one error naming the field), and restore skips it instead of trusting it."""
    _train(tmp_path, {"lr": 0.1}, 2)
    step = next(tmp_path.glob("run-*/step-00000002"))
    manifest = json.loads((step / "MANIFEST.json").read_text())
    manifest["run"] = bad
    (step / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelverError, match="run"):
        read_manifest(step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(tmp_path, run={"lr": 0.1}) as mgr:
            assert mgr.restore({"model": nn.Linear(4, 4)}) == 0
    assert any("run" in str(w.message) for w in caught)


# --- re-running a finished job ------------------------------------------------------------------


def _job(root: Path, run: dict[str, float] | None, total: int = 10) -> dict[str, torch.Tensor]:
    """A hand-written job as users write it (train_script.py's loop): restore, train with
    dropout, a shuffled resumable sampler and a schedule, save every 3 steps and the last."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, (x.sum(1) > 0).long())
    sampler = ResumableSampler(data, shuffle=True, seed=7)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=total)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "data": sampler}
    with CheckpointManager(root, every_steps=3, keep_last=2, run=run) as mgr:
        start = mgr.restore(state)
        it = iter(loader)
        for step in range(start, total):
            try:
                xb, yb = next(it)
            except StopIteration:
                it = iter(loader)
                xb, yb = next(it)
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            mgr.maybe_save(step + 1, state, metrics={"loss": loss.item()})
        mgr.save(total, state)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every entry of the checkpoints tree; each file's inode and mtime, a manifest's bytes
    (a directory's mtime changes with every start: the manager's write probe)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.stat()
        data = path.read_bytes() if path.name == "MANIFEST.json" else b""
        out[str(path.relative_to(root))] = (data, st.st_ino, 0 if path.is_dir() else st.st_mtime_ns)
    return out


@pytest.mark.parametrize("run", [None, {"lr": 0.01}], ids=["no-run", "run"])
def test_rerunning_a_finished_job_twice_changes_nothing(
    tmp_path: Path, run: dict[str, float] | None
) -> None:
    """A scheduler restarting a job that had finished: it restores the final step, trains
    nothing, and its final save is the checkpoint already there, not a new one."""
    root = tmp_path / "checkpoints"
    final = _job(root, run)
    before = _snapshot(root)
    assert [c.step for c in list_checkpoints(root, run=run)] == [9, 10]
    for _ in range(2):
        assert _same(_job(root, run), final)
        assert _snapshot(root) == before  # same step dirs, manifests untouched, no leftovers
    assert _same(_job(tmp_path / "other", run), final)  # and the job itself is deterministic


# --- keep_runs: how many runs a checkpoints directory keeps --------------------------------------


def _start(root: Path, params: dict[str, float], *, steps: int = 0,
           keep_runs: int | None = None) -> list[str]:
    """Build a manager of run ``params`` (saving ``steps`` checkpoints); the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(root, keep_last=None, run=params, keep_runs=keep_runs) as mgr:
            for step in range(1, steps + 1):
                mgr.save(step, {"model": nn.Linear(2, 2), "lr": params["lr"]})
    return [str(w.message) for w in caught if issubclass(w.category, ModelverWarning)]


A, B, C = {"lr": 0.1}, {"lr": 0.2}, {"lr": 0.3}


def test_keep_runs_drops_the_oldest_runs_only_once_dvc_has_them(tmp_path: Path) -> None:
    repo = init_repo(tmp_path)
    root = repo / "checkpoints"
    _start(root, A, steps=2)
    _start(root, B, steps=2)
    said = _start(root, C, steps=1, keep_runs=2)  # A is beyond the bound, in no cache yet
    assert list_runs(root) == sorted(run_id(r) for r in (A, B, C))
    assert any("exist nowhere else" in m and run_id(A) in m for m in said), said
    assert not any(run_id(B) in m for m in said)

    kept_a = kept_dir(run_dir(root, A))  # A's hard-linked copies (checkpoint.kept)
    assert kept_a is not None and kept_a.is_dir()
    dvc(repo, "add", "-q", "checkpoints")  # every run's files now in the DVC cache
    assert _start(root, C, keep_runs=2) == []
    assert list_runs(root) == sorted(run_id(r) for r in (B, C))
    assert not kept_a.exists()  # went with the run
    assert not [n for n in os.listdir(root) if n.startswith(".")]  # no leftover of the removal
    assert [c.step for c in list_checkpoints(root, run=B)] == [1, 2]  # the others untouched

    _start(root, C, steps=3)  # C is the newest run; B is back, but the current one stays
    dvc(repo, "add", "-q", "checkpoints")
    dvc(repo, "push", "-q")
    shutil.rmtree(repo / ".dvc" / "cache")  # C's files now only in the remote: enough
    assert _start(root, B, keep_runs=1) == []
    assert list_runs(root) == [run_id(B)]


def test_keep_runs_outside_dvc_removes_nothing(tmp_path: Path) -> None:
    for params in (A, B):
        _start(tmp_path, params, steps=1)
    said = _start(tmp_path, C, keep_runs=1)
    assert list_runs(tmp_path) == sorted(run_id(r) for r in (A, B, C))
    assert any(run_id(A) in m and run_id(B) in m for m in said), said
    assert _start(tmp_path, A, keep_runs=None) == []  # the default keeps every run, silently


@pytest.mark.parametrize("bad", [0, -1, True, "2", 1.5])
def test_a_bad_keep_runs_is_refused_before_anything_is_written(tmp_path: Path, bad: object
                                                               ) -> None:
    with pytest.raises(InvalidArgumentError, match="keep_runs"):
        CheckpointManager(tmp_path / "ck", run="a", keep_runs=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="keep_runs=2: expected None without run="):
        CheckpointManager(tmp_path / "ck", keep_runs=2)
    assert not (tmp_path / "ck").exists()
