"""Issue 11 class 4 with the Git LFS backend: a corrupt local object (LFS object or kept
plain blob) is moved aside and got again; a bad copy on 'origin' too is one error line."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from modelver import api
from tests.helpers import git, make_lfs_project, run, skip_without_git_lfs

skip_without_git_lfs()


@pytest.fixture
def lfs(tmp_path: Path) -> Path:
    """A Git LFS project, v0.1.0 at step 20, pushed to a bare 'origin' (LFS data included)."""
    root = make_lfs_project(tmp_path / "proj")
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(root, "remote", "add", "origin", bare.as_uri())
    git(root, "push", "-q", "--no-verify", "origin", "main")
    res = run(root, "push", "-q")
    assert res.exit_code == 0, res.stderr
    return root


def oid_of(root: Path, name: str) -> str:
    shown = api.show("tiny@v0.1.0", repo_root=root)
    return next(f.md5 for f in shown.files if f.path == name)


def lfs_object(git_dir: Path, oid: str) -> Path:
    return git_dir / "lfs" / "objects" / oid[:2] / oid[2:4] / oid


def flip(path: Path, *, in_place: bool = False) -> None:
    """One flipped byte. git-lfs's file transfer hard-links objects into a local 'origin', so
    an in-place write damages both copies; a new inode damages only this one."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    if in_place:
        os.chmod(path, 0o644)
        path.write_bytes(bytes(data))
        return
    tmp = path.with_name(path.name + ".flip")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def quarantined(root: Path) -> list[str]:
    q = root / ".git" / "modelver" / "quarantine"
    return sorted(p.name.split(".corrupt-")[0] for p in q.iterdir()) if q.is_dir() else []


def test_lfs_checkout_and_pull_heal_a_corrupt_object(lfs: Path, tmp_path: Path) -> None:
    oid = oid_of(lfs, "model-00000.safetensors")
    obj = lfs_object(lfs / ".git", oid)
    flip(obj)
    assert run(lfs, "verify", "tiny@v0.1.0").exit_code == 1
    res = run(lfs, "checkout", "tiny@v0.1.0", "--to", str(tmp_path / "out"))
    assert res.exit_code == 0, res.stderr
    assert "(verified: step-00000020)" in res.stdout
    assert sha256(obj) == oid and quarantined(lfs) == [oid]  # got again; the bad one kept
    assert sha256(tmp_path / "out" / "step-00000020" / "model-00000.safetensors") == oid
    flip(obj)
    res = run(lfs, "pull", "tiny@v0.1.0", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["objects"] == 1 and sha256(obj) == oid
    assert run(lfs, "verify", "tiny@v0.1.0").exit_code == 0


def test_lfs_plain_blob_copy_is_rebuilt_from_git(lfs: Path, tmp_path: Path) -> None:
    oid = oid_of(lfs, "MANIFEST.json")
    kept = lfs / ".git" / "modelver" / "blobs" / oid
    flip(kept)
    res = run(lfs, "checkout", "tiny@v0.1.0", "--to", str(tmp_path / "out"))
    assert res.exit_code == 0, res.stderr
    assert sha256(kept) == oid and quarantined(lfs) == [oid]


def test_lfs_bad_here_and_on_origin_is_one_line(lfs: Path, tmp_path: Path) -> None:
    oid = oid_of(lfs, "model-00000.safetensors")
    flip(lfs_object(lfs / ".git", oid), in_place=True)  # the remote's hard link too
    assert sha256(lfs_object(tmp_path / "remote.git", oid)) != oid
    res = run(lfs, "pull", "tiny@v0.1.0")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1, res.stderr
    assert oid in lines[0] and "origin" in lines[0] and "(modelver pull; hint:" in lines[0]
    assert not lfs_object(lfs / ".git", oid).exists()  # never left where it would be used
    before = sorted(p.name for p in (lfs / "checkpoints").rglob("*"))
    res = run(lfs, "checkout", "tiny@v0.1.0", "--force")
    assert res.exit_code == 1 and oid in res.stderr
    assert sorted(p.name for p in (lfs / "checkpoints").rglob("*")) == before
