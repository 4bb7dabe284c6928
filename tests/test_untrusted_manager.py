"""The checkpoint writer under hostile and unlucky input (issue 11, classes 2, 5, 8, 9).

Checked options, NaN-proof retention, post-commit failures as warnings, the directory lock,
start-up recovery of a save killed between its two renames, and construction-time checks of
the checkpoints directory with the hint that fits the errno.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import modelver.checkpoint.dirlock as dirlock
import modelver.checkpoint.manager as ckmanager
from modelver import CheckpointManager, list_checkpoints, load_checkpoint, verify_checkpoint
from modelver.checkpoint.catalog import CheckpointInfo
from modelver.checkpoint.commit import pid_alive, recover_leftovers
from modelver.checkpoint.retention import plan_retention
from modelver.errors import (
    CheckpointLockedError,
    CheckpointWriteError,
    InvalidArgumentError,
    ModelverError,
    ModelverWarning,
)
from tests.helpers import REPO


def small_state(value: float = 0.0) -> dict:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.fill_(value)
    return {"model": model, "cfg": {"value": value}}


def steps(root: Path) -> list[int]:
    return [c.step for c in list_checkpoints(root)]


def run_child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=os.environ.copy(),
    )


# --- class 2: options and retention ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"keep_last": -1}, "keep_last"),
        ({"keep_last": 1.5}, "keep_last"),
        ({"keep_last": "3"}, "keep_last"),
        ({"keep_last": True}, "keep_last"),
        ({"keep_best": -1, "monitor": "loss"}, "keep_best"),
        ({"keep_best": 1.0, "monitor": "loss"}, "keep_best"),
        ({"keep_best": True, "monitor": "loss"}, "keep_best"),
        ({"keep_best": 1}, "monitor"),
        ({"keep_best": 1, "monitor": ""}, "monitor"),
        ({"monitor": 3}, "monitor"),
        ({"mode": "mean"}, "mode"),
        ({"mode": None}, "mode"),
        ({"every_steps": 0}, "every_steps"),
        ({"every_steps": -5}, "every_steps"),
        ({"every_steps": 2.0}, "every_steps"),
        ({"every_steps": True}, "every_steps"),
        ({"every_seconds": 0}, "every_seconds"),
        ({"every_seconds": -1.0}, "every_seconds"),
        ({"every_seconds": math.nan}, "every_seconds"),
        ({"every_seconds": math.inf}, "every_seconds"),
        ({"every_seconds": "60"}, "every_seconds"),
        ({"every_seconds": True}, "every_seconds"),
        ({"async_save": 1}, "async_save"),
        ({"async_save": "no"}, "async_save"),
        ({"handle_signals": "false"}, "handle_signals"),
        ({"handle_signals": 0}, "handle_signals"),
        ({"dvc_hashes": 1}, "dvc_hashes"),
        ({"push": ""}, "push"),
        ({"push": 1}, "push"),
        ({"delta_full_every": 1}, "delta_full_every"),
        ({"delta_full_every": -2}, "delta_full_every"),
        ({"delta_full_every": 2.5}, "delta_full_every"),
        ({"delta_full_every": True}, "delta_full_every"),
    ],
)
def test_every_option_is_checked_before_anything_is_written(
    tmp_path: Path, kwargs: dict, name: str
) -> None:
    root = tmp_path / "ck"
    with pytest.raises(InvalidArgumentError) as e:
        CheckpointManager(root, **kwargs)
    assert e.value.name == name
    assert name in str(e.value) and "expected" in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, ModelverError)
    assert not root.exists()  # refused before the directory was even created


@pytest.mark.parametrize("directory", [None, 3, b"ck", ""])
def test_directory_argument_is_checked(directory: object) -> None:
    with pytest.raises(InvalidArgumentError, match="directory"):
        CheckpointManager(directory)  # type: ignore[arg-type]


def test_accepted_values_of_each_kind(tmp_path: Path) -> None:
    mgr = CheckpointManager(
        tmp_path / "a", every_steps=np.int64(3), every_seconds=30, keep_last=np.int32(2),
        keep_best=1, monitor="loss", mode="max", async_save=False, push=False,
        dvc_hashes=None, delta_full_every=0, handle_signals=False,
    )
    assert mgr.every_steps == 3 and type(mgr.every_steps) is int
    assert mgr.every_seconds == 30.0 and mgr.keep_last == 2
    mgr.close()


@pytest.mark.parametrize("keep_last", [None, 0])
def test_keep_last_none_or_zero_keeps_every_checkpoint(tmp_path: Path, keep_last) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=keep_last)
    for step in range(1, 5):
        mgr.save(step, small_state())
    mgr.wait()
    assert steps(tmp_path) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("mode", "bad"),
    [("min", math.nan), ("min", -math.inf), ("max", math.nan), ("max", math.inf)],
)
def test_nan_and_infinite_scores_never_displace_the_finite_best(
    tmp_path: Path, mode: str, bad: float
) -> None:
    good = [0.3, 0.5, 0.7] if mode == "min" else [0.9, 0.5, 0.4]
    mgr = CheckpointManager(tmp_path, keep_last=1, keep_best=1, monitor="loss", mode=mode)
    for step, value in enumerate([bad, *good, bad], start=1):
        mgr.save(step, small_state(), metrics={"loss": value})
    mgr.wait()
    assert steps(tmp_path) == [2, 5]  # the real best and the newest; never the NaN/inf one


def test_plan_retention_ranks_only_finite_numbers(tmp_path: Path) -> None:
    def info(step: int, value: object) -> CheckpointInfo:
        return CheckpointInfo(tmp_path / f"step-{step:08d}", step, None, {"loss": value}, "", 0, 0)

    infos = [info(1, math.nan), info(2, "0.1"), info(3, 0.4), info(4, True), info(5, -math.inf),
             info(6, 0.2), info(7, math.nan)]
    plan = plan_retention(infos, keep_last=1, keep_best=2, monitor="loss", mode="min")
    assert [c.step for c in plan.keep] == [3, 6, 7]
    none_finite = [info(1, math.nan), info(2, math.inf), info(3, math.nan)]
    plan = plan_retention(none_finite, keep_last=1, keep_best=1, monitor="loss")
    assert [c.step for c in plan.keep] == [3]
    with pytest.raises(InvalidArgumentError, match="keep_last"):
        plan_retention(infos, keep_last=-1)


def test_save_arguments_are_checked_before_anything_is_written(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=None)
    state = small_state()
    bad_calls = [
        ({"step": "5"}, "step"),
        ({"step": -1}, "step"),
        ({"step": True}, "step"),
        ({"step": 2.0}, "step"),
        ({"step": 1, "metrics": {"loss": "0.5"}}, "metrics['loss']"),
        ({"step": 1, "metrics": {"loss": True}}, "metrics['loss']"),
        ({"step": 1, "metrics": {"loss": None}}, "metrics['loss']"),
        ({"step": 1, "metrics": [("loss", 1.0)]}, "metrics"),
        ({"step": 1, "metrics": {3: 1.0}}, "metrics key"),
        ({"step": 1, "epoch": 1.5}, "epoch"),
        ({"step": 1, "epoch": -1}, "epoch"),
        ({"step": 1, "extras": {"fn": object()}}, "extras"),
        ({"step": 1, "extras": {1: "x"}}, "extras"),
    ]
    for kwargs, name in bad_calls:
        with pytest.raises(InvalidArgumentError) as e:
            mgr.save(state=state, **kwargs)
        assert e.value.name == name, kwargs
    with pytest.raises(InvalidArgumentError, match="step"):
        mgr.maybe_save("3", state)  # type: ignore[arg-type]
    assert sorted(os.listdir(tmp_path)) == []
    # NaN is a legitimate record of a diverged run; tensors and NumPy scalars are numbers
    info = mgr.save(
        1, state, metrics={"loss": math.nan, "acc": torch.tensor(0.5), "lr": np.float32(0.25)}
    )
    assert info is not None and math.isnan(info.metrics["loss"])
    assert info.metrics["acc"] == 0.5 and info.metrics["lr"] == 0.25
    verify_checkpoint(info.path)


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("where", ["plan", "execute", "listing"])
def test_failure_after_the_commit_is_a_warning_not_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, async_save: bool
) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1, async_save=async_save)
    mgr.save(1, small_state(1.0))
    mgr.wait()

    def boom(*a: object, **k: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    if where == "listing":  # what retention plans over: the manager's listing of the directory
        monkeypatch.setattr(ckmanager.Listing, "committed", boom)
    else:
        monkeypatch.setattr(ckmanager, f"{where}_retention", boom)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = mgr.save(2, small_state(2.0))
        waited = mgr.wait()
    info = info or waited
    assert info is not None and info.step == 2
    assert any(issubclass(w.category, ModelverWarning) and "step 2 is saved" in str(w.message)
               for w in caught)
    monkeypatch.undo()
    assert steps(tmp_path) == [1, 2]  # nothing deleted, nothing lost
    assert load_checkpoint(tmp_path / "step-00000002").state["cfg"] == {"value": 2.0}
    mgr.close()


# --- class 5: one writer per directory -------------------------------------------------------

HOLDER = """
import sys, time
from modelver import CheckpointManager
mgr = CheckpointManager(sys.argv[1], keep_last=1)
print("READY", flush=True)
time.sleep(120)
"""


def start_holder(root: Path, code: str = HOLDER) -> tuple[subprocess.Popen[str], str]:
    """A process holding a manager on ``root``, and the line it printed once ready."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "READY" not in line:
        proc.kill()
        pytest.fail(f"holder did not start: {line} {proc.stderr.read() if proc.stderr else ''}")
    return proc, line


def test_a_second_process_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    proc, _ = start_holder(root)
    try:
        with pytest.raises(CheckpointLockedError) as e:
            CheckpointManager(root)
        assert f"pid {proc.pid}" in str(e.value) and socket.gethostname() in str(e.value)
        assert e.value.path == root
    finally:
        proc.kill()  # SIGKILL: no close(), no cleanup; the kernel drops the lock
        proc.wait()
    mgr = CheckpointManager(root, keep_last=1)
    mgr.save(1, small_state())
    mgr.close()
    assert sorted(os.listdir(root)) == ["step-00000001"]


def test_lock_leaves_no_file_in_the_directory_and_is_released_at_close(tmp_path: Path) -> None:
    """The checkpoints directory is a DVC output: a lock file would change its hash."""
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        mgr.save(step, small_state())
    mgr.wait()
    assert sorted(os.listdir(tmp_path)) == ["step-00000002", "step-00000003"]
    refused = run_child(
        "import sys; from modelver import CheckpointManager; CheckpointManager(sys.argv[1])",
        str(tmp_path),
    )
    assert refused.returncode != 0 and "CheckpointLockedError" in refused.stderr
    mgr.close()
    taken = run_child(
        "import sys; from modelver import CheckpointManager; "
        "CheckpointManager(sys.argv[1]).close(); print('OK')",
        str(tmp_path),
    )
    assert taken.returncode == 0 and "OK" in taken.stdout, taken.stderr


def test_a_manager_that_is_never_closed_releases_at_garbage_collection(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    del mgr
    import gc

    gc.collect()
    ok = run_child("import sys; from modelver import CheckpointManager; "
                   "CheckpointManager(sys.argv[1]); print('OK')", str(tmp_path))
    assert "OK" in ok.stdout, ok.stderr


def test_a_forked_worker_does_not_keep_a_dead_parents_lock(tmp_path: Path) -> None:
    """DataLoader workers are forked after the manager is built; when the trainer is killed
    they may outlive it for a while: the next run must not be refused because of them."""
    code = """
    import os, signal, sys, time
    from modelver import CheckpointManager
    mgr = CheckpointManager(sys.argv[1])
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print("READY", child, flush=True)
    time.sleep(120)
    """
    proc, line = start_holder(tmp_path, code)
    worker = int(line.split()[1])
    try:
        proc.kill()
        proc.wait()
        mgr = CheckpointManager(tmp_path)  # the orphaned worker is still alive
        assert pid_alive(worker)
        mgr.close()
    finally:
        proc.kill()
        os.kill(worker, signal.SIGKILL)


def test_managers_of_one_process_share_the_lock_and_stay_safe(tmp_path: Path) -> None:
    a = CheckpointManager(tmp_path, keep_last=1)
    b = CheckpointManager(tmp_path, keep_last=1)  # e.g. a notebook cell run again
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning: interleaving is handled
        for step in range(1, 7):
            (a if step % 2 else b).save(step, small_state(float(step)))
        a.save(6, small_state(60.0))  # the same step from the other manager: replaced
        a.wait()
        b.wait()
    assert steps(tmp_path) == [6]
    assert load_checkpoint(tmp_path).state["cfg"] == {"value": 60.0}
    a.close()
    assert run_child("import sys; from modelver import CheckpointManager; "
                     "CheckpointManager(sys.argv[1])", str(tmp_path)).returncode != 0
    b.close()  # the last one releases
    assert run_child("import sys; from modelver import CheckpointManager; "
                     "CheckpointManager(sys.argv[1])", str(tmp_path)).returncode == 0


def test_lock_file_fallback_names_its_owner_and_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where directories cannot be flocked (NFS), a ``.lock`` file is locked instead."""
    real = dirlock.fcntl.flock

    def no_dir_locks(fd: int, op: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EBADF, "Bad file descriptor")
        real(fd, op)

    monkeypatch.setattr(dirlock.fcntl, "flock", no_dir_locks)
    mgr = CheckpointManager(tmp_path)
    doc = json.loads((tmp_path / ".lock").read_text())
    assert doc["pid"] == os.getpid() and doc["host"] == socket.gethostname()
    with pytest.raises(CheckpointLockedError, match=f"pid {os.getpid()} on host"):
        dirlock._lock_file(tmp_path / ".lock")  # another open file description: refused
    mgr.close()
    assert not (tmp_path / ".lock").exists()


# --- class 8: a kill between the two renames of a replace ------------------------------------

KILLER = """
import os, shutil, signal, sys
import torch
from torch import nn
from modelver import CheckpointManager

root, where = sys.argv[1], sys.argv[2]
def state(v):
    m = nn.Linear(4, 3)
    with torch.no_grad():
        m.weight.fill_(v)
    return {"model": m, "cfg": {"value": v}}
CheckpointManager(root, keep_last=None).save(1, state(1.0))
real_rename, real_rmtree = os.rename, shutil.rmtree
def rename(src, dst, *a, **k):
    src, dst = os.fspath(src), os.fspath(dst)
    first = os.path.basename(dst).startswith(".trash-")
    second = os.path.basename(src).startswith(".tmp-")
    if (where == "before" and first) or (where == "between" and second):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(src, dst, *a, **k)
def rmtree(path, *a, **k):
    if where == "after" and os.path.basename(os.fspath(path)).startswith(".trash-"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *a, **k)
os.rename, shutil.rmtree = rename, rmtree
CheckpointManager(root, keep_last=None).save(1, state(2.0))  # replaces step 1
print("NOT KILLED")
"""


@pytest.mark.parametrize(
    ("where", "leftovers", "value"),
    [("between", {".tmp-", ".trash-"}, 2.0), ("before", {".tmp-"}, 1.0),
     ("after", {".trash-"}, 2.0)],
)
def test_sigkill_while_replacing_a_step_loses_nothing(
    tmp_path: Path, where: str, leftovers: set[str], value: float
) -> None:
    root = tmp_path / "ck"
    done = run_child(KILLER, str(root), where)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    left = {name.split("step")[0] for name in os.listdir(root) if name.startswith(".")}
    assert left == leftovers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr = CheckpointManager(root, keep_last=None)
    if where == "between":
        assert any("recovered" in str(w.message) for w in caught)
    assert sorted(os.listdir(root)) == ["step-00000001"]
    verify_checkpoint(root / "step-00000001")
    restored = small_state(-1.0)
    assert mgr.restore(restored) == 1
    assert restored["cfg"] == {"value": value}
    assert torch.all(restored["model"].weight == value)
    mgr.close()


def make_checkpoint(tmp_path: Path, value: float, step: int = 5) -> Path:
    """A real, complete checkpoint directory, built elsewhere and moved into place by tests."""
    src = tmp_path / f"src-{value}"
    CheckpointManager(src, keep_last=None).save(step, small_state(value), metrics={"v": value})
    return src / f"step-{step:08d}"


DEAD = 999_999_999  # no such pid


def leftover(tmp_path: Path, root: Path, name: str, value: float, *, damage: str = "") -> Path:
    path = root / name
    shutil.copytree(make_checkpoint(tmp_path, value), path)
    if damage == "no-manifest":
        (path / "MANIFEST.json").unlink()
    elif damage == "truncated":
        f = next(p for p in path.iterdir() if p.suffix == ".safetensors")
        f.write_bytes(f.read_bytes()[:-8])
    elif damage == "missing":
        next(p for p in path.iterdir() if p.suffix == ".safetensors").unlink()
    elif damage == "garbage-manifest":
        (path / "MANIFEST.json").write_text("[1, 2")
    return path


def value_of(path: Path) -> float:
    return float(load_checkpoint(path).state["cfg"]["value"])


TMP = f".tmp-step-00000005-{DEAD}-abc123"
TMP_OLDER = f".tmp-step-00000005-{DEAD}-0ff1ce"
TRASH = f".trash-step-00000005-{DEAD}-def456"
TRASH_LEGACY = ".trash-step-00000005-a1b2c3"  # written without a pid before this fix


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        ({TMP: (2.0, ""), TRASH: (1.0, "")}, 2.0),  # killed between the renames
        ({TMP: (2.0, "")}, 2.0),  # killed just before the rename of a first commit
        ({TMP: (2.0, "no-manifest"), TRASH: (1.0, "")}, 1.0),  # the trash goes back
        ({TMP: (2.0, "truncated"), TRASH: (1.0, "")}, 1.0),
        ({TMP: (2.0, "missing"), TRASH_LEGACY: (1.0, "")}, 1.0),
        ({TMP: (2.0, "garbage-manifest"), TRASH: (1.0, "")}, 1.0),
        ({TRASH_LEGACY: (1.0, "")}, 1.0),
        ({TMP: (2.0, ""), TRASH: (1.0, "truncated")}, 2.0),
        ({TMP: (3.0, ""), TMP_OLDER: (2.0, ""), TRASH: (1.0, "")}, 3.0),  # newest temp wins
        ({TMP: (2.0, "no-manifest"), TRASH: (1.0, "missing")}, None),  # nothing complete
    ],
)
def test_recovery_of_each_leftover_combination(
    tmp_path: Path, present: dict[str, tuple[float, str]], expected: float | None
) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    for name, (value, damage) in present.items():
        leftover(tmp_path, root, name, value, damage=damage)
        time.sleep(0.01)  # mtimes order the temp dirs
    if TMP in present and TMP_OLDER in present:
        os.utime(root / TMP_OLDER / "MANIFEST.json", (1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ModelverWarning)
        CheckpointManager(root).close()
    names = sorted(os.listdir(root))
    if expected is None:
        assert names == []
    else:
        assert names == ["step-00000005"]
        assert value_of(root / "step-00000005") == expected
        verify_checkpoint(root / "step-00000005")


def test_recovery_never_touches_a_committed_step(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    shutil.copytree(make_checkpoint(tmp_path, 7.0), root / "step-00000005")
    leftover(tmp_path, root, TMP, 2.0)
    leftover(tmp_path, root, TRASH, 1.0)
    CheckpointManager(root).close()
    assert sorted(os.listdir(root)) == ["step-00000005"]
    assert value_of(root / "step-00000005") == 7.0


def test_recovery_replaces_a_step_directory_without_manifest(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    (root / "step-00000005").mkdir(parents=True)
    (root / "step-00000005" / "junk").write_text("x")
    leftover(tmp_path, root, TMP, 2.0)
    with pytest.warns(ModelverWarning, match="recovered"):
        CheckpointManager(root).close()
    assert sorted(os.listdir(root)) == ["step-00000005"]
    assert value_of(root / "step-00000005") == 2.0


def test_retired_checkpoints_are_not_resurrected(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    leftover(tmp_path, root, f".retired-step-00000005-{DEAD}-abc123", 1.0)
    CheckpointManager(root).close()
    assert os.listdir(root) == []


def test_recovery_leaves_live_writers_alone_and_checks_what_it_promotes(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    mine = leftover(tmp_path, root, f".tmp-step-00000005-{os.getpid()}-abc123", 1.0)
    other_step = leftover(tmp_path, root, f".tmp-step-00000006-{DEAD}-abc123", 1.0)  # says 5
    probe = root / f".probe-{DEAD}-abc123"
    probe.write_text("x")
    live_probe = root / f".probe-{os.getpid()}-abc124"
    live_probe.write_text("x")
    assert recover_leftovers(root, live=pid_alive) == []
    assert mine.exists() and live_probe.exists()  # another manager of this process may write
    assert not other_step.exists() and not probe.exists()
    assert steps(root) == []


def test_recovery_never_follows_a_symlinked_leftover(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    root.mkdir()
    outside = make_checkpoint(tmp_path, 9.0)
    (root / TRASH).symlink_to(outside, target_is_directory=True)
    (root / TMP).symlink_to(outside, target_is_directory=True)
    CheckpointManager(root).close()
    assert os.listdir(root) == []  # links removed, never promoted
    assert value_of(outside) == 9.0  # the target is untouched


# --- class 9: the checkpoints directory, checked at construction -----------------------------


def test_a_file_where_the_directory_should_be(tmp_path: Path) -> None:
    (tmp_path / "ck").write_text("not a directory")
    for path in (tmp_path / "ck", tmp_path / "ck" / "sub"):
        with pytest.raises(CheckpointWriteError, match="not a directory") as e:
            CheckpointManager(path)
        assert "free disk space" not in str(e.value)
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(CheckpointWriteError, match="not a directory"):
        CheckpointManager(dangling)


def fail_for(monkeypatch: pytest.MonkeyPatch, module: object, name: str, err: int,
             when: str = "") -> None:
    real = getattr(module, name)

    def failing(path: object, *a: object, **k: object) -> object:
        if when in os.fspath(path):  # type: ignore[arg-type]
            raise OSError(err, os.strerror(err), os.fspath(path))  # type: ignore[arg-type]
        return real(path, *a, **k)

    monkeypatch.setattr(module, name, failing)


@pytest.mark.parametrize(
    ("patch", "err", "hint"),
    [
        (("mkdir", ""), errno.EROFS, "read-only file system"),
        (("open", ".probe-"), errno.EROFS, "read-only file system"),
        (("open", ".probe-"), errno.EACCES, "permission"),
        (("open", ".probe-"), errno.EPERM, "permission"),
        (("open", ".probe-"), errno.ENOSPC, "free disk space"),
        (("open", ".probe-"), errno.EDQUOT, "free disk space"),
        (("mkdir", ""), errno.EACCES, "permission"),
    ],
)
def test_directory_problems_get_the_hint_of_their_errno(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, patch: tuple[str, str], err: int, hint: str
) -> None:
    name, when = patch
    root = tmp_path / "new" / "ck" if name == "mkdir" else tmp_path / "ck"
    if name == "open":
        root.mkdir()
    fail_for(monkeypatch, os, name, err, when)
    with pytest.raises(CheckpointWriteError) as e:
        CheckpointManager(root)
    monkeypatch.undo()
    assert hint in str(e.value) and e.value.cause.errno == err
    if err not in (errno.ENOSPC, errno.EDQUOT):
        assert "free disk space" not in str(e.value)
    if root.exists():
        assert os.listdir(root) == []  # no probe left behind


def test_no_write_permission_is_found_even_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: False if p == tmp_path else real(p, m))
    with pytest.raises(CheckpointWriteError, match="permission"):
        CheckpointManager(tmp_path)


def test_a_probe_write_that_fails_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(CheckpointWriteError, match="free disk space"):
        CheckpointManager(tmp_path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("err", "hint"),
    [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission"),
     (errno.ENOSPC, "free disk space"), (errno.EIO, "check the directory")],
)
def test_a_failing_save_has_the_hint_of_its_errno(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, hint: str
) -> None:
    import modelver.checkpoint.io as ckio

    mgr = CheckpointManager(tmp_path)
    mgr.save(1, small_state())

    def failing(*a: object, **k: object) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(ckio.fmt, "write_all", failing)
    with pytest.raises(CheckpointWriteError) as e:
        mgr.save(2, small_state())
    assert hint in str(e.value)
    monkeypatch.undo()
    assert steps(tmp_path) == [1]
    mgr.close()
