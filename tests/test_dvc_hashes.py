"""Checkpoint MD5s recorded for DVC: equal to DVC's own hashes, and DVC does not hash again."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dvc.repo import Repo
from dvc_data.hashfile import hash as dvc_hash

from modelver import CheckpointManager
from modelver.checkpoint import format as fmt
from modelver.storage.dvc import dir_object

TRAIN = """\
import sys
import torch, yaml
from modelver import CheckpointManager

p = yaml.safe_load(open("params.yaml"))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
opt = torch.optim.AdamW(model.parameters(), lr=p["lr"])
state = {"model": model, "optimizer": opt}
mgr = CheckpointManager("checkpoints", keep_last=1, dvc_hashes=p["dvc_hashes"],
                        async_save=p["async"])
step = mgr.restore(state)
model(torch.randn(4, 64)).square().mean().backward()
opt.step()
mgr.save(step + 1, state)
mgr.close()
"""


def _git_dvc_repo(root: Path) -> Path:
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    Repo.init(os.fspath(root)).close()
    with Repo(os.fspath(root)) as repo, repo.config.edit("repo") as conf:
        conf["cache"]["type"] = "reflink,hardlink,copy"
    return root.resolve()


@pytest.fixture
def stage_repo(tmp_path: Path) -> Path:
    root = _git_dvc_repo(tmp_path / "repo")
    (root / "train.py").write_text(TRAIN)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": f"{sys.executable} train.py",
        "deps": ["train.py"],
        "params": ["lr", "dvc_hashes", "async"],
        "outs": [{"checkpoints": {"persist": True}}],
    }}}))
    return root


def _params(root: Path, **params: Any) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump({"lr": 1e-3, "async": False, **params}))


def _files(folder: Path) -> Iterator[Path]:
    return (p for p in sorted(folder.rglob("*")) if p.is_file())


def _dvc_dir_md5(folder: Path) -> str:
    """The ``.dir`` md5 DVC computes for ``folder``, from DVC's own file hashing."""
    files = {
        p.relative_to(folder).as_posix(): (dvc_hash.file_md5(os.fspath(p)), p.stat().st_size)
        for p in _files(folder)
    }
    return dir_object(files)[0]


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths DVC reads to hash (it calls ``_hash_file`` only when its state has no entry)."""
    calls: list[str] = []
    real = dvc_hash._hash_file

    def counting(path: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dvc_hash, "_hash_file", counting)
    return calls


def _state(model_width: int = 32) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(model_width, model_width)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, model_width)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


@pytest.mark.parametrize("async_save", [False, True])
def test_manifest_md5_is_dvc_md5_and_in_dvc_state(tmp_path: Path, async_save: bool) -> None:
    root = _git_dvc_repo(tmp_path / "repo")
    default = CheckpointManager(root / "checkpoints", async_save=async_save)
    assert default.dvc_hashes == async_save  # default: on for async saves in a DVC repository
    default.close()
    mgr = CheckpointManager(root / "checkpoints", async_save=async_save, dvc_hashes=True)
    mgr.save(1, _state())
    mgr.close()
    path = root / "checkpoints" / fmt.step_dirname(1)
    manifest = fmt.read_manifest(path)
    assert set(manifest.files) == {p.name for p in path.iterdir()} - {fmt.MANIFEST}
    for name, entry in manifest.files.items():
        assert entry.md5 == dvc_hash.file_md5(os.fspath(path / name)), name
    with Repo(os.fspath(root)) as repo:
        for p in path.iterdir():
            _, hi = repo.state.get(os.fspath(p), repo.fs)
            assert hi is not None and hi.name == "md5", p.name
            assert hi.value == dvc_hash.file_md5(os.fspath(p)), p.name


def test_off_outside_dvc_and_without_dvc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path / "plain")
    assert not mgr.dvc_hashes
    mgr.save(1, _state())
    assert all(e.md5 is None for e in fmt.read_manifest(mgr.root / "step-00000001").files.values())
    root = _git_dvc_repo(tmp_path / "repo")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "dvc" else real(name, *a)
    )
    assert not CheckpointManager(root / "checkpoints").dvc_hashes  # no DVC installed: off
    forced = CheckpointManager(root / "forced", dvc_hashes=True)
    forced.save(1, _state())  # md5s still in the manifest; nothing recorded, no error
    manifest = fmt.read_manifest(forced.root / "step-00000001")
    assert all(e.md5 for e in manifest.files.values())


@pytest.mark.parametrize("async_save", [False, True])
def test_repro_does_not_rehash_checkpoints(
    stage_repo: Path, hash_calls: list[str], monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    monkeypatch.chdir(stage_repo)
    ckpts = stage_repo / "checkpoints"
    for lr in (1e-3, 2e-3):  # the first run, then a re-run onto the persisted output
        _params(stage_repo, lr=lr, dvc_hashes=True, **{"async": async_save})
        with Repo(os.fspath(stage_repo)) as repo:  # in-process: holds the lock during the run
            repo.reproduce()
        assert not [p for p in hash_calls if p.startswith(os.fspath(ckpts))]
    assert [p.name for p in ckpts.iterdir()] == ["step-00000002"]
    lock = yaml.safe_load((stage_repo / "dvc.lock").read_text())
    (out,) = lock["stages"]["train"]["outs"]
    assert out["md5"] == _dvc_dir_md5(ckpts)
    with Repo(os.fspath(stage_repo)) as repo:
        assert repo.status() == {}


def test_repro_hashes_without_recorded_md5s(
    stage_repo: Path, hash_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: with dvc_hashes off DVC reads every checkpoint file to hash it."""
    monkeypatch.chdir(stage_repo)
    _params(stage_repo, dvc_hashes=False)
    with Repo(os.fspath(stage_repo)) as repo:
        repo.reproduce()
    step = stage_repo / "checkpoints" / "step-00000001"
    assert {Path(p).name for p in hash_calls if p.startswith(os.fspath(step))} == {
        p.name for p in step.iterdir()
    }
    lock = yaml.safe_load((stage_repo / "dvc.lock").read_text())
    assert lock["stages"]["train"]["outs"][0]["md5"] == _dvc_dir_md5(stage_repo / "checkpoints")
