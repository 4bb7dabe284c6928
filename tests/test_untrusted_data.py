"""Issue 11, data commands: corrupt cache objects are healed, checkouts swap whole versions,
killed pushes leave nothing behind for long, and paths from data never leave their root.

Real Git + DVC projects (the `project` fixture), real subprocesses for the kill tests:
``tests/kill_swap.py`` instruments ``modelver.storage`` from outside (before the exchange, after
it, between the two fallback renames; ``--no-exchange`` forces the fallback), then runs the real
CLI entry point. Production code has no test hooks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelver.errors import MalformedDataError, UnsafePathError
from modelver.storage import TreeFile
from modelver.storage.dvc import DvcStorage
from tests.helpers import (
    TESTS,
    git,
    one_error_line,
    repo_env,
    run,
    set_params,
    train_and_commit,
)


def pinned(project: Path) -> str:
    import yaml

    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return str(lock["stages"]["train"]["outs"][0]["md5"])


def files_of(project: Path, md5_dir: str) -> list[TreeFile]:
    dvc = DvcStorage(project)
    try:
        return dvc.tree(md5_dir)
    finally:
        dvc.close()


def an_object(project: Path, step_dir: str) -> tuple[TreeFile, Path]:
    """A safetensors file of ``step_dir`` in the pinned output, and its cache object."""
    f = next(f for f in files_of(project, pinned(project))
             if f.relpath.startswith(step_dir + "/") and f.relpath.endswith(".safetensors"))
    return f, cache_path(project, f.oid)


def cache_path(project: Path, md5: str) -> Path:
    return project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def remote_path(project: Path, md5: str) -> Path:
    dvc = DvcStorage(project)
    try:
        found = dvc.default_remote()
    finally:
        dvc.close()
    assert found is not None
    return Path(found[1]) / "files" / "md5" / md5[:2] / md5[2:]


def flip(path: Path) -> None:
    """One flipped byte, written in place (the same inode, as an editor or bit rot would)."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 0xFF]))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def quarantined(project: Path) -> list[Path]:
    q = project / ".dvc" / "cache" / "modelver-quarantine"
    return sorted(q.iterdir()) if q.is_dir() else []


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): md5(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def pushed(project: Path) -> Path:
    assert run(project, "tag", "tiny@v0.1.0", "-q").exit_code == 0
    res = run(project, "push", "-q")
    assert res.exit_code == 0, res.stderr
    return project


# --- class 4: corruption is healed --------------------------------------------------------


def test_checkout_heals_a_flipped_cache_byte_behind_a_linked_scratch_copy(pushed: Path) -> None:
    assert run(pushed, "verify", "tiny@v0.1.0").exit_code == 0  # scratch copies now exist
    f, obj = an_object(pushed, "step-00000020")
    flip(obj)
    res = run(pushed, "verify", "tiny@v0.1.0")
    assert res.exit_code == 1 and "fails its hash in the local cache" in res.stdout
    assert "modelver verify" in res.stderr
    out = pushed.parent / "out"
    res = run(pushed, "checkout", "tiny@v0.1.0", "--to", str(out))
    assert res.exit_code == 0, res.stderr
    assert "(verified: step-00000020)" in res.stdout
    assert md5(obj) == f.oid  # fetched again
    assert len(quarantined(pushed)) == 1  # the bad copy is kept aside, not deleted
    assert md5(out / f.relpath) == f.oid
    assert run(pushed, "verify", "tiny@v0.1.0").exit_code == 0


def test_pull_heals_what_it_has_and_reports_it(pushed: Path) -> None:
    f, obj = an_object(pushed, "step-00000020")
    flip(obj)
    res = run(pushed, "pull", "tiny@v0.1.0", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["objects"] == 1
    assert md5(obj) == f.oid and len(quarantined(pushed)) == 1
    assert run(pushed, "verify", "tiny@v0.1.0").exit_code == 0
    res = run(pushed, "pull", "tiny@v0.1.0", "--json")
    assert json.loads(res.stdout)["objects"] == 0


def test_bad_in_cache_and_remote_is_one_line_naming_both(pushed: Path) -> None:
    f, obj = an_object(pushed, "step-00000020")
    flip(obj)
    flip(remote_path(pushed, f.oid))
    res = run(pushed, "pull", "tiny@v0.1.0")
    line = one_error_line(res)
    assert res.exit_code == 1
    assert f.oid in line and f.relpath in line and "remote 'modelver'" in line
    assert "modelver pull" in line and "has no good copy" in line
    assert not obj.exists()  # never left where DVC would use it
    assert [p.name.split(".corrupt-")[0] for p in quarantined(pushed)] == [f.oid]
    before = snapshot(pushed / "checkpoints")
    res = run(pushed, "checkout", "tiny@v0.1.0", "--force")
    assert res.exit_code == 1 and f.oid in one_error_line(res)
    assert snapshot(pushed / "checkpoints") == before


def test_missing_from_remote_after_quarantine_names_the_object(pushed: Path) -> None:
    f, obj = an_object(pushed, "step-00000020")
    flip(obj)
    remote_path(pushed, f.oid).unlink()
    res = run(pushed, "pull", "tiny@v0.1.0")
    line = one_error_line(res)
    assert f.oid in line and "has no good copy" in line and "modelver-quarantine" in line


def test_verify_covers_every_step_dir_and_checkout_verifies_all(pushed: Path) -> None:
    f, obj = an_object(pushed, "step-00000010")  # the older one
    flip(obj)
    res = run(pushed, "verify", "tiny@v0.1.0", "--json")
    assert res.exit_code == 1
    by_step = {c["step"]: c["ok"] for c in json.loads(res.stdout)["checkpoints"]}
    assert by_step == {10: False, 20: True}
    res = run(pushed, "checkout", "tiny@v0.1.0", "--force")
    assert res.exit_code == 0, res.stderr
    assert "(verified: step-00000010, step-00000020)" in res.stdout
    assert md5(pushed / "checkpoints" / f.relpath) == f.oid
    assert run(pushed, "verify", "tiny@v0.1.0").exit_code == 0


def test_corrupt_older_step_unfetchable_stops_checkout_before_any_change(pushed: Path) -> None:
    f, obj = an_object(pushed, "step-00000010")
    flip(obj)
    flip(remote_path(pushed, f.oid))
    before = snapshot(pushed / "checkpoints")
    res = run(pushed, "checkout", "tiny@v0.1.0", "--force")
    assert res.exit_code == 1 and f.relpath in one_error_line(res)
    assert snapshot(pushed / "checkpoints") == before
    assert not [p for p in pushed.iterdir() if "modelver-" in p.name]


def test_fetch_refuses_a_bad_remote_copy(pushed: Path, tmp_path: Path) -> None:
    f, obj = an_object(pushed, "step-00000020")
    obj.unlink()  # not here at all: the first copy comes from the remote, and is bad
    flip(remote_path(pushed, f.oid))
    res = run(pushed, "checkout", "tiny@v0.1.0", "--to", str(tmp_path / "x"))
    line = one_error_line(res)
    # a local remote: DVC's status check drops the bad copy (S3: our own check refuses it)
    assert f.oid in line and f.relpath in line and "modelver checkout" in line
    assert not obj.exists() and not (tmp_path / "x").exists()


def test_recover_path_materialize_heals(pushed: Path, tmp_path: Path) -> None:
    """``recover`` writes through DvcStorage.materialize: it heals before linking."""
    f, obj = an_object(pushed, "step-00000020")
    flip(obj)
    dvc = DvcStorage(pushed)
    try:
        dvc.materialize(pinned(pushed), tmp_path / "s", prefix="step-00000020")
    finally:
        dvc.close()
    assert md5(tmp_path / "s" / f.relpath.split("/", 1)[1]) == f.oid


# --- class 8: checkout swaps whole versions; pushes leave no tmp objects -------------------


def two_versions(project: Path) -> tuple[dict[str, str], dict[str, str]]:
    assert run(project, "tag", "tiny@v0.1.0", "-q").exit_code == 0
    v1 = snapshot(project / "checkpoints")
    set_params(project, steps=30)
    train_and_commit(project, "train to 30")
    assert run(project, "tag", "tiny@v0.2.0", "-q").exit_code == 0
    v2 = snapshot(project / "checkpoints")
    assert v1 != v2
    for ref in ("tiny@v0.1.0", "tiny@v0.2.0"):  # scratch copies, so the first swap is ours
        assert run(project, "verify", ref).exit_code == 0
    return v1, v2


KILL_SWAP = TESTS / "kill_swap.py"


def cli_proc(
    project: Path, *args: str, kill_at: str | None = None, no_exchange: bool = False
) -> subprocess.Popen[str]:
    """The real CLI in a child process; with ``kill_at`` it SIGKILLs itself at that point."""
    if kill_at is None and not no_exchange:
        cmd = [sys.executable, "-m", "modelver.cli.main", *args]
    else:
        opts = ["--no-exchange"] if no_exchange else []
        cmd = [sys.executable, str(KILL_SWAP), kill_at or "none", *opts, "--", *args]
    return subprocess.Popen(
        cmd, cwd=project, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=repo_env(),
    )


def leftovers(project: Path) -> list[str]:
    return [p.name for p in project.iterdir() if ".modelver-" in p.name]


@pytest.mark.parametrize("point,expect", [("swap", "v2"), ("swapped", "v1")])
def test_checkout_killed_at_the_swap_leaves_one_whole_version(
    project: Path, point: str, expect: str
) -> None:
    v1, v2 = two_versions(project)
    proc = cli_proc(project, "checkout", "tiny@v0.1.0", "-q", kill_at=point)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(project / "checkpoints") == {"v1": v1, "v2": v2}[expect]
    assert leftovers(project)  # the killed process left its side directory
    assert run(project, "checkout", "tiny@v0.1.0", "-q").exit_code == 0
    assert snapshot(project / "checkpoints") == v1 and not leftovers(project)


def test_checkout_killed_between_fallback_renames_is_rolled_back(project: Path) -> None:
    v1, v2 = two_versions(project)
    proc = cli_proc(project, "checkout", "tiny@v0.1.0", "-q", kill_at="between",
                    no_exchange=True)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    old = [p for p in project.iterdir() if ".modelver-old-" in p.name]
    assert len(old) == 1 and snapshot(old[0]) == v2  # the whole old version, aside
    # the next checkout puts it back first, so it is judged (and kept) as the workspace
    extra = old[0] / "step-00000099"
    extra.mkdir()
    (extra / "MANIFEST.json").write_text("{}")
    res = run(project, "checkout", "tiny@v0.1.0")
    assert res.exit_code == 1 and "not in the DVC cache" in one_error_line(res)
    assert (project / "checkpoints" / "step-00000099").is_dir() and not leftovers(project)
    proc = cli_proc(project, "checkout", "tiny@v0.1.0", "-q", "--force", no_exchange=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err  # the two-rename path, unkilled, completes
    assert snapshot(project / "checkpoints") == v1 and not leftovers(project)


def test_checkout_killed_at_random_points(project: Path) -> None:
    v1, v2 = two_versions(project)
    rng = random.Random(11)
    for i in range(4):
        ref = "tiny@v0.1.0" if i % 2 == 0 else "tiny@v0.2.0"
        proc = cli_proc(project, "checkout", ref, "-q", "--force")
        time.sleep(rng.uniform(1.0, 6.0))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=300)
        assert snapshot(project / "checkpoints") in (v1, v2), f"round {i}"
    assert run(project, "checkout", "tiny@v0.2.0", "-q").exit_code == 0
    assert snapshot(project / "checkpoints") == v2 and not leftovers(project)


def test_push_cleans_stale_tmp_uploads_in_the_remote(pushed: Path) -> None:
    f, _ = an_object(pushed, "step-00000020")
    folder = remote_path(pushed, f.oid).parent
    stale = folder / ".AAAAAAAAAAAAAAAAAAAAAA.tmp"
    fresh = folder / ".BBBBBBBBBBBBBBBBBBBBBB.tmp"
    other = folder / "notes.tmp"  # not DVC's temp name: never touched
    for p in (stale, fresh, other):
        p.write_bytes(b"partial upload")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    assert run(pushed, "push", "-q").exit_code == 0
    assert not stale.exists() and fresh.exists() and other.exists()


def test_push_killed_mid_upload_leftover_is_cleaned_next_time(project: Path) -> None:
    """A real push killed while it writes: whatever .tmp it left goes with the next push."""
    assert run(project, "tag", "tiny@v0.1.0", "-q").exit_code == 0
    f, _ = an_object(project, "step-00000020")
    folder = remote_path(project, f.oid).parent
    folder.mkdir(parents=True, exist_ok=True)
    planted = folder / ".CCCCCCCCCCCCCCCCCCCCCC.tmp"  # what a SIGKILL mid-copy leaves
    planted.write_bytes(b"x" * 10)
    os.utime(planted, (time.time() - 7200,) * 2)
    proc = cli_proc(project, "push", "-q")
    proc.communicate(timeout=300)
    assert proc.returncode == 0 and not planted.exists()


# --- class 1: defence in depth where data is written or deleted ---------------------------


def test_replace_output_refuses_paths_outside_the_workspace(pushed: Path, tmp_path: Path) -> None:
    from modelver.api.data import _replace_output
    from modelver.refs import ResolvedRef

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    md5_dir = pinned(pushed)
    files = files_of(pushed, md5_dir)
    dvc = DvcStorage(pushed)
    try:
        for path in ("../victim", str(victim), ".git", ".dvc/cache", "", "a/../../victim"):
            r = ResolvedRef(kind="version", ref="x", path_in_repo=path, checkpoint_hash=md5_dir,
                            step_dir="step-00000020", step=20)
            with pytest.raises(UnsafePathError):
                _replace_output(dvc, r, files, force=True, progress=None)
    finally:
        dvc.close()
    assert (victim / "keep.txt").read_text() == "mine"
    assert (pushed / ".git" / "HEAD").is_file()


def test_checkout_refuses_symlinked_targets(pushed: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / "step-00000020").symlink_to(outside)
    res = run(pushed, "checkout", "tiny@v0.1.0", "--to", str(out), "--force")
    assert res.exit_code == 1 and "symlink" in one_error_line(res)
    ws = pushed / "checkpoints"
    ws.rename(tmp_path / "moved")
    ws.symlink_to(outside)
    res = run(pushed, "checkout", "tiny@v0.1.0", "--force")
    assert res.exit_code == 1 and "symlink" in one_error_line(res)
    assert [p.name for p in outside.iterdir()] == ["keep.txt"]


def test_crafted_tag_path_deletes_nothing(pushed: Path, tmp_path: Path) -> None:
    victim = pushed.parent / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    meta = {"path": "../victim", "checkpoint": pinned(pushed), "step": 20,
            "step_dir": "step-00000020", "metrics": {}}
    msg = f"tiny@v6.6.6\n\nmodelver: {json.dumps(meta)}\n"
    git(pushed, "tag", "-a", "tiny@v6.6.6", "-m", msg)
    for args in (["checkout", "tiny@v6.6.6", "--force"],
                 ["resume", "tiny@v6.6.6", "--worktree", str(tmp_path / "wt"), "--no-repro"]):
        res = run(pushed, *args)
        assert res.exit_code == 1, res.stdout
        one_error_line(res)
        assert (victim / "keep.txt").read_text() == "mine"


def test_crafted_dir_object_cannot_write_outside(pushed: Path, tmp_path: Path) -> None:
    f, _ = an_object(pushed, "step-00000020")
    for rel in ("../../escape.txt", "/abs/escape.txt", "a/./b"):
        listing = json.dumps([{"md5": f.oid, "relpath": rel, "size": f.size}]).encode()
        oid = hashlib.md5(listing).hexdigest() + ".dir"
        p = cache_path(pushed, oid)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(listing)
        dvc = DvcStorage(pushed)
        try:
            with pytest.raises((UnsafePathError, MalformedDataError)):
                dvc.materialize(oid, tmp_path / "d" / "x")
        finally:
            dvc.close()
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "d").exists()
    dvc = DvcStorage(pushed)
    try:
        for bad in ("../../etc/passwd", "zz" * 16, 5):
            with pytest.raises(MalformedDataError):
                dvc.object_path(bad)  # type: ignore[arg-type]
    finally:
        dvc.close()


def test_error_lines_name_the_command(pushed: Path) -> None:
    for cmd in ("checkout", "pull", "verify", "push"):
        res = run(pushed, cmd, "nope@v1.0.0")
        assert res.exit_code == 1 and f"(modelver {cmd}; hint:" in one_error_line(res)


# --- push of all versions: a bad tag is skipped, not fatal ---------------------------------


def test_push_all_skips_invalid_tags_and_a_named_one_is_one_error(pushed: Path) -> None:
    from modelver.errors import ModelverWarning

    good = {"checkpoint": pinned(pushed), "step": 20, "step_dir": "step-00000020",
            "path": "checkpoints", "metrics": {}}
    crafted = {
        "tiny@v0.8.0": {**good, "step": "notanint"},  # invalid metadata (VersionTag.problem)
        "tiny@v0.9.0": {**good, "path": "../victim"},  # valid shape, its commit contradicts it
        "tiny@v0.9.1": {**good, "step_dir": "../../x"},
    }
    for tag, meta in crafted.items():
        git(pushed, "tag", "-a", tag, "-m", f"{tag}\n\nmodelver: {json.dumps(meta)}\n")
    with pytest.warns(ModelverWarning) as caught:
        res = run(pushed, "push", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["refs"] == ["tiny@v0.1.0"]
    skipped = sorted(str(w.message) for w in caught if "push: skipped" in str(w.message))
    assert [s.split(":")[1].split()[-1] for s in skipped] == sorted(crafted)
    for tag in crafted:
        res = run(pushed, "push", tag)
        assert res.exit_code == 1 and "(modelver push; hint:" in one_error_line(res)
    assert (pushed.parent / "victim").exists() is False



# --- an S3 remote: our own md5 check of what is fetched; janitor by LastModified -------------


@pytest.mark.s3
def test_s3_bad_remote_copy_is_refused_and_tmp_cleaned(project: Path, s3_endpoint: str) -> None:
    """DVC's own check is off for fetches (it would delete a local remote's copy unseen), so
    ours must refuse a bad S3 copy: one line naming object, file and remote; nothing cached."""
    import boto3

    from modelver import api
    from tests.helpers import S3_BUCKET

    api.init(project, remote=f"s3://{S3_BUCKET}/untrusted")
    dvc_cmd = [sys.executable, "-m", "dvc", "remote", "modify", "modelver", "endpointurl"]
    subprocess.run([*dvc_cmd, s3_endpoint], cwd=project, check=True, capture_output=True)
    assert run(project, "tag", "tiny@v0.1.0", "-q").exit_code == 0
    assert run(project, "push", "-q").exit_code == 0
    f, obj = an_object(project, "step-00000020")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    key = f"untrusted/files/md5/{f.oid[:2]}/{f.oid[2:]}"
    data = bytearray(s3.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read())
    data[200] ^= 0xFF
    s3.put_object(Bucket=S3_BUCKET, Key=key, Body=bytes(data))
    flip(obj)  # bad here and there: healing moves ours aside, the fetched copy fails too
    res = run(project, "pull", "tiny@v0.1.0")
    line = one_error_line(res)
    assert f.oid in line and f.relpath in line and "remote 'modelver'" in line
    assert "fails it too" in line and not obj.exists()
    assert len(quarantined(project)) == 2  # ours and the fetched copy, both kept aside

    tmp_key = "untrusted/files/md5/00/.AAAAAAAAAAAAAAAAAAAAAA.tmp"
    other = "untrusted/files/md5/00/notes.tmp"
    for k in (tmp_key, other):
        s3.put_object(Bucket=S3_BUCKET, Key=k, Body=b"partial")
    dvc = DvcStorage(project)
    try:
        store = dvc.remote_store()
        assert store.clean_tmp() == []  # just written: an upload may still be running
        assert [p.rsplit("/", 1)[-1] for p in store.clean_tmp(older_than=0)] == [
            tmp_key.rsplit("/", 1)[-1]]
    finally:
        dvc.close()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=S3_BUCKET)["Contents"]}
    assert tmp_key not in keys and other in keys
