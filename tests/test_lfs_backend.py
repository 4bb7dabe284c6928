"""The Git LFS backend end to end: init, tag, list, show, diff, verify, push, clone, pull,
checkout and resume, with a local bare remote (git-lfs's standalone file transfer)."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelver import api
from modelver.errors import DirtyWorkspaceError
from tests.helpers import (
    commit_all,
    git,
    make_lfs_project,
    run,
    run_train_py,
    same_tree,
    skip_without_git_lfs,
)

skip_without_git_lfs()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A Git LFS project (no DVC) with two trained commits: v0.1.0 (step 20), HEAD (step 40)."""
    root = make_lfs_project(tmp_path / "proj")
    run_train_py(root, 40)
    commit_all(root, "train 40")
    return root


def test_init_tracks_tensor_files_in_lfs(project: Path) -> None:
    attrs = (project / ".gitattributes").read_text()
    assert "checkpoints/**/*.safetensors filter=lfs diff=lfs merge=lfs -text" in attrs
    cfg = (project / "modelver.yaml").read_text()
    assert "backend: lfs" in cfg and "path: checkpoints" in cfg
    assert not (project / ".dvc").exists()
    blob = git(project, "show", "HEAD:checkpoints/step-00000040/model-00000.safetensors")
    assert blob.startswith("version https://git-lfs.github.com/spec/v1")
    manifest = json.loads(git(project, "show", "HEAD:checkpoints/step-00000040/MANIFEST.json"))
    assert manifest["step"] == 40  # manifests stay plain Git blobs
    again = run(project, "init", "--backend", "lfs", "-q")
    assert again.exit_code == 0 and (project / ".gitattributes").read_text() == attrs
    both = run(project, "init", "--backend", "lfs", "--remote", str(project.parent / "r"))
    assert both.exit_code == 2 and not (project.parent / "r").exists()


def test_tag_list_show_verify_diff(project: Path) -> None:
    res = run(project, "tag", "tiny", "--bump", "minor", "--json")
    assert res.exit_code == 0, res.stderr
    tagged = json.loads(res.stdout)
    tree = git(project, "rev-parse", "HEAD:checkpoints")
    assert tagged["tag"] == "tiny@v0.2.0" and tagged["step"] == 40
    assert tagged["checkpoint_hash"] == tree and tagged["parent"] == "v0.1.0"
    assert '"backend": "lfs"' in git(project, "tag", "-l", "--format=%(contents)", "tiny@v0.2.0")
    rows = json.loads(run(project, "list", "--json").stdout)
    assert [(r["version"], r["step"]) for r in rows] == [("v0.1.0", 20), ("v0.2.0", 40)]
    shown = json.loads(run(project, "show", "tiny@v0.1.0", "--json").stdout)
    assert shown["step_dir"] == "step-00000020" and shown["in_cache"] is True
    assert shown["params"]["params.yaml"]["train"]["steps"] == 20
    sizes = {f["path"]: f["size"] for f in shown["files"]}
    assert sizes["model-00000.safetensors"] > 200 and "MANIFEST.json" in sizes
    ok = run(project, "verify", "tiny@v0.1.0", "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["ok"] is True
    d = run(project, "diff", "tiny@v0.1.0", "tiny@v0.2.0", "--json")
    assert d.exit_code == 0, d.stderr
    assert "model/0.weight" in d.stdout
    stat = run(project, "diff", "tiny@v0.1.0", "tiny@v0.2.0", "--stat")
    assert stat.exit_code == 0, stat.stderr


def test_tag_refuses_uncommitted_checkpoints(project: Path) -> None:
    run_train_py(project, 50)
    res = run(project, "tag", "tiny@v0.2.0")
    assert res.exit_code == 1 and "uncommitted changes" in res.stderr
    assert "tiny@v0.2.0" not in git(project, "tag", "-l")


def test_verify_catches_a_corrupted_lfs_object(project: Path) -> None:
    shown = api.show("tiny@v0.1.0", repo_root=project)
    oid = next(f.md5 for f in shown.files if f.path == "model-00000.safetensors")
    obj = project / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
    os.chmod(obj, 0o644)
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xFF
    obj.write_bytes(bytes(data))
    res = run(project, "verify", "tiny@v0.1.0", "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["ok"] is False


def test_push_clone_pull_checkout_identical(project: Path, tmp_path: Path) -> None:
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(project, "remote", "add", "origin", bare.as_uri())
    git(project, "push", "-q", "--no-verify", "origin", "main")  # commits only, no LFS data
    assert run(project, "tag", "tiny@v0.2.0", "-q").exit_code == 0
    pushed = run(project, "push", "--json")
    assert pushed.exit_code == 0, pushed.stderr
    out = json.loads(pushed.stdout)
    assert out["objects"] >= 2 and set(out["tags"]) == {"tiny@v0.1.0", "tiny@v0.2.0"}
    assert any((bare / "lfs" / "objects").rglob("*"))

    clone = tmp_path / "clone"
    env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"}
    subprocess.run(["git", "clone", "-q", bare.as_uri(), str(clone)], check=True, env=env)
    ptr = (clone / "checkpoints" / "step-00000040" / "model-00000.safetensors").read_text()
    assert ptr.startswith("version https://git-lfs")  # pointers only so far
    pulled = run(clone, "pull", "tiny@v0.1.0", "--json")
    assert pulled.exit_code == 0, pulled.stderr
    assert json.loads(pulled.stdout)["objects"] >= 1
    # v0.2.0's objects are not in this clone, but origin has its tag (so its data): push works
    again = run(clone, "push", "--json")
    assert again.exit_code == 0, again.stderr
    git(clone, "tag", "-a", "-m", "x", "tiny@v0.3.0", "tiny@v0.2.0^{commit}")
    missing = run(clone, "push", "tiny@v0.3.0")  # a new tag whose data is not here
    assert missing.exit_code == 1 and "neither" in missing.stderr
    assert "tiny@v0.3.0" not in git(clone, "ls-remote", "--tags", "origin")
    res = run(clone, "checkout", "tiny@v0.1.0", "--to", str(tmp_path / "out"))
    assert res.exit_code == 0, res.stderr
    git(project, "checkout", "-q", "tiny@v0.1.0", "--", "checkpoints")
    step = "step-00000020"
    assert same_tree(tmp_path / "out" / step, project / "checkpoints" / step)
    # a checkout into the workspace needs no separate pull
    res = run(clone, "checkout", "tiny@v0.2.0", "--force")
    assert res.exit_code == 0, res.stderr
    git(project, "checkout", "-q", "HEAD", "--", "checkpoints")
    assert filecmp.cmp(
        clone / "checkpoints" / "step-00000040" / "model-00000.safetensors",
        project / "checkpoints" / "step-00000040" / "model-00000.safetensors", shallow=False,
    )
    assert run(clone, "verify", "tiny@v0.2.0").exit_code == 0


def test_checkout_protects_uncommitted_checkpoints(project: Path) -> None:
    run_train_py(project, 50)
    with pytest.raises(DirtyWorkspaceError):
        api.checkout("tiny@v0.1.0", repo_root=project)
    assert (project / "checkpoints" / "step-00000050").is_dir()


def test_resume_restores_the_version_and_training_continues(project: Path) -> None:
    res = api.resume("tiny@v0.1.0", overrides={"train.steps": 30}, repo_root=project)
    assert res.step == 20 and not res.reproduced  # no DVC pipeline: the user runs training
    assert git(project, "branch", "--show-current") == res.branch
    assert (project / "checkpoints" / "step-00000020" / "MANIFEST.json").is_file()
    proc = subprocess.run([sys.executable, "train.py"], cwd=project, check=True,
                          capture_output=True, text=True)
    assert "START 20" in proc.stdout
    assert (project / "checkpoints" / "step-00000030").is_dir()


def test_delta_files_go_to_lfs_too(project: Path) -> None:
    from modelver.checkpoint import CheckpointManager

    torch.manual_seed(0)
    state = {"w": torch.randn(1000, 100)}
    mgr = CheckpointManager(project / "checkpoints", keep_last=None, delta_full_every=5)
    mgr.save(100, state)
    state["w"].add_(torch.randn(1000, 100) * 1e-4)
    mgr.save(101, state)
    mgr.close()
    assert (project / "checkpoints" / "step-00000101" / "w-00000.safetensors.delta").is_file()
    commit_all(project, "a delta checkpoint")
    blob = git(project, "show", "HEAD:checkpoints/step-00000101/w-00000.safetensors.delta")
    assert blob.startswith("version https://git-lfs.github.com/spec/v1")
