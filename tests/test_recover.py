"""Background push (CheckpointManager(push=...)) and `modelver recover` on a fresh clone."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from modelver import api
from modelver.api.recovery import RecoverResult
from modelver.checkpoint import CheckpointManager
from modelver.checkpoint.format import read_manifest
from modelver.cli.main import cli
from modelver.errors import ModelverError, RemoteError
from modelver.publish import Publisher
from modelver.remote import RemoteStore
from modelver.runs import read_runs
from modelver.storage.dvc import DvcStorage
from tests.helpers import DVC_STAGE, S3_BUCKET, dvc, free_port, git, init_repo, train_py

TRAIN = train_py(
    rows=256, features=32, hidden=64, batch=32, optimizer="AdamW", imports="os, time, ",
    setup='push = os.environ.get("TEST_PUSH") == "1"\n'
          'delta = int(os.environ.get("TEST_DELTA", "0")) or None\n'
          'sleep = float(os.environ.get("TEST_STEP_SLEEP", "0"))\n',
    options=", push=push, delta_full_every=delta",
    step_end="    time.sleep(sleep)\n",
    final_save=False,
)

STEPS = 60


def _origin(tmp: Path, remote: str, endpoint: str | None = None) -> Path:
    """A project pushed to a bare Git repository; its DVC remote is in .dvc/config."""
    src = tmp / "src"
    src.mkdir()
    git(src, "init", "-q")
    (src / "train.py").write_text(TRAIN)
    (src / "dvc.yaml").write_text(DVC_STAGE.format(python=sys.executable))
    (src / "params.yaml").write_text(f"train:\n  seed: 0\n  steps: {STEPS}\n  every: 5\n"
                                     "  lr: 0.01\n")
    api.init(src, remote=remote)
    if endpoint:
        dvc(src, "remote", "modify", "modelver", "endpointurl", endpoint)
    git(src, "add", "-A")
    git(src, "commit", "-q", "-m", "project")
    origin = tmp / "origin.git"
    git(tmp, "init", "-q", "--bare", str(origin))
    git(src, "push", "-q", str(origin), "main")
    shutil.rmtree(src)
    return origin


def _clone(origin: Path, dest: Path) -> Path:
    git(origin.parent, "clone", "-q", str(origin), str(dest))
    return dest


def _tensor_hashes(step_dir: Path) -> dict[str, str]:
    """Every saved tensor (model and optimizer state) by content hash."""
    return {k: t.hash for k, t in read_manifest(step_dir).tensors.items()}


def _wait_for_record(work: Path, min_step: int, proc: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "training ended before a checkpoint was pushed"
        steps = [r.step for r in api.list_runs(repo_root=work)]
        if steps and max(steps) >= min_step:
            return max(steps)
        time.sleep(0.2)
    raise AssertionError("no pushed checkpoint appeared")


def _records_complete(work: Path) -> None:
    """Every record visible in the remote names objects that are all there."""
    backend = DvcStorage(work)
    try:
        store = backend.remote_store()
        for rec in read_runs(store):
            assert store.missing([rec.dir_md5, *rec.files.values()]) == []
            for base in rec.bases:
                assert store.missing([base.dir_md5, *base.files.values()]) == []
    finally:
        backend.close()


def _kill_recover_finish(
    tmp_path: Path, origin: Path, *, capfd: pytest.CaptureFixture[str] | None
) -> RecoverResult | None:
    """With ``capfd``: `modelver recover --repro` (the CLI); else api.recover, then dvc repro."""
    # an uninterrupted run, for reference (not pushing, so it leaves no record)
    ref = _clone(origin, tmp_path / "reference")
    dvc(ref, "repro", "-q", env={"TEST_PUSH": "0"})
    expected = _tensor_hashes(ref / "checkpoints" / f"step-{STEPS:08d}")

    work = _clone(origin, tmp_path / "machine1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"], cwd=work, text=True, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TEST_PUSH": "1", "TEST_STEP_SLEEP": "0.15"},
    )
    try:
        _wait_for_record(work, 15, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the machine dies, mid-training, maybe mid-push
        proc.wait(timeout=30)
    _records_complete(work)
    shutil.rmtree(work)  # workspace and DVC cache are gone
    shutil.rmtree(Path(os.environ["DVC_SITE_CACHE_DIR"]), ignore_errors=True)

    fresh = _clone(origin, tmp_path / "machine2")
    if capfd is not None:  # the caller set TEST_PUSH=0 for the finishing run
        cwd = os.getcwd()
        os.chdir(fresh)
        try:
            res = CliRunner().invoke(cli, ["recover", "--repro"], catch_exceptions=False)
        finally:
            os.chdir(cwd)
        assert res.exit_code == 0, res.output
        step = int(res.output.split(": step ")[1].split()[0])
        started = capfd.readouterr().out  # dvc repro writes to the terminal itself
        recovered = None
    else:
        recovered = api.recover(repo_root=fresh)
        step = recovered.run.step
        started = dvc(fresh, "repro", env={"TEST_PUSH": "0"}).stdout
    assert 15 <= step < STEPS
    assert f"START {step}" in started  # training continued from the recovered checkpoint
    assert _tensor_hashes(fresh / "checkpoints" / f"step-{STEPS:08d}") == expected
    return recovered


@pytest.mark.slow
def test_kill_clone_recover_finish_local_remote(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_PUSH", "0")
    origin = _origin(tmp_path, str(tmp_path / "dvc-remote"))
    _kill_recover_finish(tmp_path, origin, capfd=capfd)


@pytest.mark.slow
def test_kill_clone_recover_finish_with_delta_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delta checkpoints (no full one after the first): the recovered checkpoint arrives with
    its whole base chain and the run still ends bit-identical."""
    monkeypatch.setenv("TEST_DELTA", "1000")
    origin = _origin(tmp_path, str(tmp_path / "dvc-remote"))
    recovered = _kill_recover_finish(tmp_path, origin, capfd=None)
    assert recovered is not None
    chain = [b.step_dir for b in recovered.run.bases]
    assert chain == [f"step-{s:08d}" for s in range(recovered.run.step - 5, 0, -5)]
    assert any(name.endswith(".safetensors.delta") for name in recovered.run.files)


# --- S3 (moto_server: the fixtures in tests/conftest.py) -------------------------------------

@pytest.mark.slow
@pytest.mark.s3
def test_kill_clone_recover_finish_s3(tmp_path: Path, s3_endpoint: str) -> None:
    origin = _origin(tmp_path, f"s3://{S3_BUCKET}/{uuid.uuid4().hex}", endpoint=s3_endpoint)
    _kill_recover_finish(tmp_path, origin, capfd=None)


@pytest.mark.s3
def test_recover_unreachable_s3(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    origin = _origin(tmp_path, f"s3://{S3_BUCKET}/x", endpoint=f"http://127.0.0.1:{free_port()}")
    fresh = _clone(origin, tmp_path / "fresh")
    started = time.monotonic()
    with pytest.raises(RemoteError):
        api.recover(repo_root=fresh)
    assert time.monotonic() - started < 60
    assert not (fresh / "checkpoints").exists()


# --- the publisher in-process ------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A committed Git + DVC repository with a local-directory default remote."""
    root = init_repo(tmp_path)
    return root


def _state() -> dict[str, object]:
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters())}


def _write(root: Path, steps: list[int]) -> list[Path]:
    state = _state()
    mgr = CheckpointManager(root / "checkpoints", keep_last=None)
    for step in steps:
        state["model"].weight.data += 1  # type: ignore[attr-defined]
        mgr.save(step, state)
    mgr.close()
    return [root / "checkpoints" / f"step-{s:08d}" for s in steps]


def _store(root: Path) -> RemoteStore:
    backend = DvcStorage(root)
    try:
        return backend.remote_store()
    finally:
        backend.close()


def _hold_uploads(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Every file upload waits for ``release``; ``entered`` is set once one has begun."""
    entered, release = threading.Event(), threading.Event()
    real = RemoteStore.put_file

    def held(self: RemoteStore, p: Path, md5: str) -> bool:
        entered.set()
        assert release.wait(30)
        return real(self, p, md5)

    monkeypatch.setattr(RemoteStore, "put_file", held)
    return entered, release


def test_interrupted_upload_never_shows_a_record_and_retry_completes(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (path,) = _write(repo, [10])
    store = _store(repo)
    real = RemoteStore.put_file
    calls = {"n": 0}
    seen_at_failure: list[list[int]] = []

    def flaky(self: RemoteStore, p: Path, md5: str) -> bool:
        calls["n"] += 1
        if calls["n"] == 2:  # the remote dies after one file of the first attempt
            seen_at_failure.append([r.step for r in read_runs(store)])
            raise RemoteError(self.name, "connection reset")
        return real(self, p, md5)

    monkeypatch.setattr(RemoteStore, "put_file", flaky)
    pub = Publisher(path.parent, True, backoff=0.01)
    pub.committed(path, read_manifest(path))
    pub.close()
    assert seen_at_failure == [[]]  # nothing named the half-uploaded checkpoint
    assert pub.failures == 1 and pub.published == [10]
    (rec,) = read_runs(store)
    assert rec.step == 10 and rec.path == "checkpoints" and rec.branch == "main"
    assert store.missing([rec.dir_md5, *rec.files.values()]) == []


def test_upload_that_keeps_failing_leaves_no_record(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (path,) = _write(repo, [10])

    def dead(self: RemoteStore, p: Path, md5: str) -> bool:
        raise RemoteError(self.name, "unreachable")

    monkeypatch.setattr(RemoteStore, "put_file", dead)
    pub = Publisher(path.parent, True, attempts=3, backoff=0.01)
    with pytest.warns(UserWarning, match="could not push checkpoint step 10 after 3 attempts"):
        pub.committed(path, read_manifest(path))
        pub.close()
    assert pub.failures == 3 and pub.published == []
    assert read_runs(_store(repo)) == []
    with pytest.raises(ModelverError, match="no checkpoint of this repository"):
        api.recover(repo_root=repo)


def test_newer_checkpoint_supersedes_a_queued_one(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _write(repo, [1, 2, 3])
    entered, release = _hold_uploads(monkeypatch)
    pub = Publisher(paths[0].parent, True)
    pub.committed(paths[0], read_manifest(paths[0]))
    assert entered.wait(60)  # step 1 is uploading
    pub.committed(paths[1], read_manifest(paths[1]))
    pub.committed(paths[2], read_manifest(paths[2]))
    release.set()
    pub.close()
    assert pub.published == [1, 3]
    assert [r.step for r in read_runs(_store(repo))] == [3]


def test_push_does_not_block_training(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saves go on while an upload hangs, and close waits for the last checkpoint's upload.
    How long a save blocks with and without push: benchmarks/push_blocking.py."""
    entered, release = _hold_uploads(monkeypatch)
    state = _state()
    mgr = CheckpointManager(repo / "checkpoints", every_steps=1, keep_last=2, push=True)
    for step in range(1, 9):
        mgr.maybe_save(step, state)
    assert entered.wait(60)
    assert _publisher(mgr).published == []  # all 8 saved meanwhile
    release.set()
    mgr.close()
    assert _publisher(mgr).published[-1] == 8


def _publisher(mgr: CheckpointManager) -> Publisher:
    """The upload hook that push= gave the manager (one of its commit hooks)."""
    (pub,) = [h for h in mgr._hooks if isinstance(h, Publisher)]
    return pub


def test_push_to_unknown_remote_is_raised_in_the_training_thread(repo: Path) -> None:
    state = _state()
    mgr = CheckpointManager(repo / "checkpoints", every_steps=1, push="no-such-remote")
    mgr.maybe_save(1, state)
    _publisher(mgr).flush(timeout=60)
    with pytest.raises(RemoteError, match="no-such-remote"):
        mgr.maybe_save(2, state)
    mgr.close()


def test_push_to_a_url_then_recover_from_it(repo: Path, tmp_path: Path) -> None:
    url = str(tmp_path / "other-remote")
    (path,) = _write(repo, [7])
    pub = Publisher(path.parent, url)
    pub.committed(path, read_manifest(path))
    pub.close()
    assert pub.published == [7]
    shutil.rmtree(repo / "checkpoints")
    with pytest.raises(ModelverError, match="no checkpoint of this repository"):
        api.recover(repo_root=repo)  # the default remote has nothing
    res = api.recover(remote=url, repo_root=repo)
    assert res.run.step == 7 and res.objects == len(res.run.files) + 1
    assert read_manifest(res.path).step == 7
    again = api.recover(remote=url, repo_root=repo)  # already there: nothing changes
    assert again.path == res.path and again.objects == 0


def test_checkpoint_removed_by_retention_mid_upload_is_skipped(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (path,) = _write(repo, [4])
    manifest = read_manifest(path)
    entered, release = _hold_uploads(monkeypatch)
    pub = Publisher(path.parent, True, backoff=0.01)
    pub.committed(path, manifest)
    assert entered.wait(60)
    shutil.rmtree(path)  # keep_last deleted it: a newer checkpoint is on its way
    release.set()
    pub.close()
    assert pub.published == [] and pub.failures == 0  # skipped, not retried
    assert read_runs(_store(repo)) == []


def test_a_named_runs_checkpoint_is_recovered_into_its_run_directory(repo: Path) -> None:
    """push= from a manager with run=: the record names the run's root, and recover writes
    there, so the same run's manager resumes it."""
    state = _state()
    with CheckpointManager(repo / "checkpoints", keep_last=None, run={"lr": 0.1},
                           push=True) as mgr:
        state["model"].weight.data += 1  # type: ignore[attr-defined]
        mgr.save(5, state)
        run_root = mgr.root
    shutil.rmtree(repo / "checkpoints")
    res = api.recover(repo_root=repo)
    assert res.path == run_root / "step-00000005"
    assert read_manifest(res.path).run == run_root.name.removeprefix("run-")
    with CheckpointManager(repo / "checkpoints", run={"lr": 0.1}) as again:
        assert again.restore(_state()) == 5
