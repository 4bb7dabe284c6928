"""Run identity: runs side by side in one checkpoints directory (CheckpointManager(run=...))."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from modelver import CheckpointManager, latest_checkpoint, list_checkpoints, load_checkpoint
from modelver.checkpoint.format import read_manifest
from modelver.checkpoint.runid import list_runs, run_id
from modelver.errors import InvalidArgumentError, ModelverError, ModelverWarning


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
