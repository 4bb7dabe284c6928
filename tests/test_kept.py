"""Kept copies (checkpoint.kept): in a DVC repository every committed checkpoint is hard-linked
aside, and under `dvc exp run` a restore links back what a forced checkout deleted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from modelver import CheckpointManager
from modelver.checkpoint.kept import UNDER_DVC_EXP, kept_dir
from tests.helpers import make_state, train_steps


def saved(root: Path, steps: range, *, keep_last: int = 2, run: str | None = "r") -> Path:
    state = make_state()
    with CheckpointManager(root, keep_last=keep_last, run=run) as mgr:
        for step in steps:
            train_steps(state, 1)
            mgr.save(step, state)
        return mgr.root


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / ".dvc").mkdir()  # what `dvc init` leaves that the manager looks for
    return tmp_path


def test_committed_checkpoints_are_linked_aside_and_pruned_with_retention(repo: Path) -> None:
    root = saved(repo / "checkpoints", range(1, 5))
    where = kept_dir(root)
    assert where is not None and where.is_relative_to(repo / ".dvc" / "tmp")
    assert sorted(p.name for p in where.iterdir()) == ["step-00000003", "step-00000004"]
    for f in (root / "step-00000004").iterdir():  # the same inode: no byte copied
        assert (where / "step-00000004" / f.name).stat().st_ino == f.stat().st_ino


def test_outside_a_dvc_repository_nothing_is_kept(tmp_path: Path) -> None:
    root = saved(tmp_path / "checkpoints", range(1, 3))
    assert kept_dir(root) is None


def test_under_dvc_exp_a_deleted_newer_checkpoint_comes_back(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = saved(repo / "checkpoints", range(1, 5))
    want = (root / "step-00000004" / "MANIFEST.json").read_bytes()
    shutil.rmtree(root / "step-00000004")  # what `dvc exp run`'s forced checkout does
    shutil.rmtree(root / "step-00000003")
    monkeypatch.setenv(UNDER_DVC_EXP, "an-exp")
    state = make_state()
    with CheckpointManager(repo / "checkpoints", keep_last=2, run="r") as mgr:
        assert mgr.restore(state) == 4
    assert (root / "step-00000004" / "MANIFEST.json").read_bytes() == want


def test_a_user_deletion_outside_dvc_exp_is_respected(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(UNDER_DVC_EXP, raising=False)
    root = saved(repo / "checkpoints", range(1, 5))
    shutil.rmtree(root / "step-00000004")
    state = make_state()
    with CheckpointManager(repo / "checkpoints", keep_last=2, run="r") as mgr:
        assert mgr.restore(state) == 3
        train_steps(state, 1)
        mgr.save(5, state)
    where = kept_dir(root)
    assert where is not None
    assert sorted(p.name for p in where.iterdir()) == ["step-00000003", "step-00000005"]


def test_only_checkpoints_newer_than_the_workspace_come_back(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = saved(repo / "checkpoints", range(1, 5))
    shutil.rmtree(root / "step-00000003")  # older than the newest the workspace has
    monkeypatch.setenv(UNDER_DVC_EXP, "an-exp")
    with CheckpointManager(repo / "checkpoints", keep_last=2, run="r") as mgr:
        assert mgr.restore(make_state()) == 4
    assert not (root / "step-00000003").exists()


def test_a_damaged_kept_copy_is_skipped_by_the_restore(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = saved(repo / "checkpoints", range(1, 5))
    where = kept_dir(root)
    assert where is not None
    shutil.rmtree(root / "step-00000004")
    tensors = sorted((where / "step-00000004").glob("*.safetensors"))
    tensors[0].unlink()  # a copy that lost a file: linked back, refused by verification
    monkeypatch.setenv(UNDER_DVC_EXP, "an-exp")
    with pytest.warns(UserWarning), CheckpointManager(
        repo / "checkpoints", keep_last=2, run="r"
    ) as mgr:
        assert mgr.restore(make_state()) == 3
