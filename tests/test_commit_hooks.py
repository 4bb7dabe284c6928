"""Commit hooks: the caller's own (``on_commit``) and the documented hook Protocols."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from modelver import CheckpointManager, ResumableSampler
from modelver.checkpoint.format import Manifest, read_manifest
from modelver.checkpoint.hooks import CommitHook, PerRank, RestoreAware
from modelver.errors import InvalidArgumentError, ModelverWarning


class Recorder:
    def __init__(self, fail_in: str | None = None) -> None:
        self.seen: list[tuple[Path, int]] = []
        self.checks = 0
        self.closed = False
        self.fail_in = fail_in

    def committed(self, path: Path, manifest: Manifest) -> None:
        if self.fail_in == "committed":
            raise RuntimeError("upload service down")
        assert (path / "MANIFEST.json").is_file()  # told after the commit, never before
        self.seen.append((path, manifest.step))

    def check(self) -> None:
        self.checks += 1
        if self.fail_in == "check" and self.seen:
            raise RuntimeError("background failure")

    def close(self) -> None:
        self.closed = True


def _state() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"model": nn.Linear(4, 4)}


@pytest.mark.parametrize("async_save", [False, True])
def test_hook_told_of_every_commit(tmp_path: Path, async_save: bool) -> None:
    rec = Recorder()
    mgr = CheckpointManager(tmp_path, every_steps=1, keep_last=2, async_save=async_save,
                            on_commit=[rec])
    for step in (1, 2, 3):
        mgr.maybe_save(step, _state())
    mgr.close()
    assert [s for _, s in rec.seen] == [1, 2, 3]
    assert [p.name for p, _ in rec.seen] == ["step-00000001", "step-00000002", "step-00000003"]
    assert read_manifest(rec.seen[-1][0]).step == 3
    assert rec.checks >= 3 and rec.closed


def test_failing_hook_is_a_warning_and_the_save_stands(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, on_commit=[Recorder(fail_in="committed")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = mgr.save(5, _state())
    mgr.close()
    assert info is not None and (info.path / "MANIFEST.json").is_file()
    assert any(issubclass(w.category, ModelverWarning) and "upload service down" in str(w.message)
               for w in caught)


def test_hook_check_raises_in_the_training_thread(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, every_steps=1, on_commit=[Recorder(fail_in="check")])
    mgr.maybe_save(1, _state())
    with pytest.raises(RuntimeError, match="background failure"):
        mgr.maybe_save(2, _state())
    mgr.close()
    assert [c.step for c in mgr.checkpoints()] == [1]  # nothing saved after the failure


@pytest.mark.parametrize("bad", [Recorder(), [object()], "hook", [Recorder, None]])
def test_on_commit_is_checked_at_construction(tmp_path: Path, bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match="on_commit"):
        CheckpointManager(tmp_path, on_commit=bad)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())  # refused before the directory was touched


def test_the_sampler_is_restore_aware_and_per_rank() -> None:
    sampler = ResumableSampler(list(range(10)), shuffle=True, seed=0)
    assert isinstance(sampler, RestoreAware) and isinstance(sampler, PerRank)
    assert not sampler.modelver_per_rank  # one process: saved once, by rank 0
    assert isinstance(Recorder(), CommitHook)
    assert not isinstance(object(), CommitHook)
