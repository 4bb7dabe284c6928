"""Node-local checkpoints: each rank's own directory, the DVC remote (moto S3) the only shared
store. In-process tests use a one-rank gloo group; the kill tests run 2 processes under torchrun,
each with its own directory, which share nothing but the S3 remote."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn

from modelver import CheckpointManager
from modelver.checkpoint import format as fmt
from modelver.errors import (
    CheckpointCorruptedError,
    InvalidArgumentError,
    RemoteError,
    UploadError,
)
from tests.helpers import (
    S3_BUCKET,
    dvc,
    free_port,
    git,
    init_repo,
    repo_env,
    saving,
    weights_equal,
)
from tests.test_distributed import SCRIPT, sigkill, torchrun, torchrun_cmd, workers_of

pytestmark = pytest.mark.s3
TOTAL = 36
FLAGS = {"ddp": [], "fsdp": ["--fsdp"], "ddp-async": ["--async-save"],
         "fsdp-async": ["--fsdp", "--async-save"]}


def s3_repo(tmp_path: Path, endpoint: str, prefix: str) -> Path:
    """A Git + DVC repository whose remote ``s3`` is a bucket prefix on moto_server."""
    root = init_repo(tmp_path)
    dvc(root, "remote", "add", "s3", f"s3://{S3_BUCKET}/{prefix}")
    dvc(root, "remote", "modify", "s3", "endpointurl", endpoint)
    git(root, "commit", "-qam", "s3 remote")
    return root


def record(endpoint: str, prefix: str, run: str) -> dict:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    body = client.get_object(Bucket=S3_BUCKET, Key=f"{prefix}/modelver/runs/{run}.json")["Body"]
    return json.loads(body.read())


def remote_step(endpoint: str, run: str) -> int:
    """The step the remote's record of ``run`` names (prefix ``run``), 0 before the first."""
    try:
        return int(record(endpoint, run, run)["step"])
    except Exception:  # no record yet
        return 0


def state_of(seed: int) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def same_weights(a: dict, b: dict) -> bool:
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.usefixtures("one_rank_group")
def test_save_uploads_then_restore_fetches_what_the_local_disk_lost(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = s3_repo(tmp_path, s3_endpoint, "one")
    monkeypatch.chdir(repo)
    local = tmp_path / "nvme" / "ck"
    saved = state_of(0)
    with CheckpointManager(local, push="s3", run="job", node_local=True, keep_last=2) as mgr:
        mgr.save(5, saved, metrics={"loss": 0.5})
        mgr.save(10, saved, metrics={"loss": 0.25})
    rec = record(s3_endpoint, "one", "job")
    assert (rec["step"], rec["run"], rec["path"]) == (10, "job", "checkpoints/run-job")
    assert fmt.MANIFEST in rec["files"] and "state.json" in rec["files"]
    # the local disk is gone (a fresh node): everything comes back from the remote, verified
    shutil.rmtree(local.parent)
    fresh = state_of(1)
    assert not same_weights(saved, fresh)
    with CheckpointManager(local, push="s3", run="job", node_local=True) as mgr:
        assert mgr.restore(fresh) == 10
    assert same_weights(saved, fresh)
    assert (local / "run-job" / "step-00000010" / fmt.MANIFEST).is_file()
    # a local file that no longer verifies is fetched again, not trusted
    st = next((local / "run-job" / "step-00000010").glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:-8] + b"\0" * 8)
    again = state_of(2)
    with CheckpointManager(local, push="s3", run="job", node_local=True) as mgr:
        assert mgr.restore(again) == 10
    assert same_weights(saved, again)


@pytest.mark.usefixtures("one_rank_group")
def test_remote_is_the_truth_and_a_bad_remote_object_is_one_clear_error(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    repo = s3_repo(tmp_path, s3_endpoint, "two")
    monkeypatch.chdir(repo)
    local = tmp_path / "nvme"
    saved = state_of(0)
    with CheckpointManager(local, push="s3", run="r", node_local=True) as mgr:
        assert mgr.restore(state_of(3)) == 0  # the remote names nothing yet
        mgr.save(4, saved)
    # a local checkpoint the remote never named (its upload did not finish) is not restored
    newer = local / "run-r" / "step-00000009"
    shutil.copytree(local / "run-r" / "step-00000004", newer)
    probe = state_of(4)
    with CheckpointManager(local, push="s3", run="r", node_local=True) as mgr:
        assert mgr.restore(probe) == 4
    assert same_weights(saved, probe) and not newer.exists()
    # the remote's object of a file is damaged and the local copy is gone: refused, no change
    rec = record(s3_endpoint, "two", "r")
    name = next(n for n in rec["files"] if n.endswith(".safetensors"))
    md5 = rec["files"][name]
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    key = f"two/files/md5/{md5[:2]}/{md5[2:]}"
    client.put_object(Bucket=S3_BUCKET, Key=key, Body=b"not the tensors")
    (local / "run-r" / "step-00000004" / name).unlink()
    victim = state_of(5)
    before = {k: v.clone() for k, v in victim["model"].state_dict().items()}
    with (CheckpointManager(local, push="s3", run="r", node_local=True) as mgr,
          pytest.raises(CheckpointCorruptedError, match="fetched from the remote")):
        mgr.restore(victim)
    assert all(torch.equal(before[k], v) for k, v in victim["model"].state_dict().items())


@pytest.mark.usefixtures("one_rank_group")
def test_a_crafted_run_record_is_one_clear_error_and_changes_nothing(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    repo = s3_repo(tmp_path, s3_endpoint, "crafted")
    monkeypatch.chdir(repo)
    local = tmp_path / "nvme"
    with CheckpointManager(local, push="s3", run="c", node_local=True) as mgr:
        mgr.save(3, state_of(0))
        mgr.save(6, state_of(1))
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    key = "crafted/modelver/runs/c.json"
    good = record(s3_endpoint, "crafted", "c")
    victim = state_of(2)
    before = {k: v.clone() for k, v in victim["model"].state_dict().items()}
    manifest3 = (local / "run-c" / "step-00000003" / fmt.MANIFEST).read_bytes()
    crafted = [
        b"{not json",
        json.dumps({**good, "step_dir": "../../etc"}).encode(),
        json.dumps({**good, "run": "another"}).encode(),
        # a valid record of step 6 whose manifest is step 3's
        json.dumps({**good, "files": {**good["files"], fmt.MANIFEST:
                                      hashlib.md5(manifest3).hexdigest()}}).encode(),
    ]
    for body in crafted:
        client.put_object(Bucket=S3_BUCKET, Key=key, Body=body)
        with (CheckpointManager(local, push="s3", run="c", node_local=True) as mgr,
              pytest.raises((UploadError, CheckpointCorruptedError)) as err):
            mgr.restore(victim)
        assert len(str(err.value).splitlines()) == 1
        assert all(torch.equal(before[k], v) for k, v in victim["model"].state_dict().items())
    assert not (tmp_path / "etc").exists()


@pytest.mark.usefixtures("one_rank_group")
def test_modelver_recover_brings_a_node_local_checkpoint_to_a_fresh_clone(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelver import api, restore_checkpoint

    repo = s3_repo(tmp_path, s3_endpoint, "recover")
    monkeypatch.chdir(repo)
    saved = state_of(0)
    with CheckpointManager(tmp_path / "nvme", push="s3", run="rec", node_local=True) as mgr:
        mgr.save(7, saved)
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    dvc(clone, "remote", "modify", "--local", "s3", "endpointurl", s3_endpoint)
    got = api.recover(remote="s3", run="rec", repo_root=clone)
    assert (got.run.run, got.run.step, got.run.path) == ("rec", 7, "checkpoints/run-rec")
    fresh = state_of(1)
    assert restore_checkpoint(clone / "checkpoints" / "run-rec" / "step-00000007", fresh) == 7
    assert same_weights(saved, fresh)


@pytest.mark.usefixtures("one_rank_group")
def test_a_failed_upload_is_raised_at_the_next_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The remote breaks after the first checkpoint (its object folder becomes a file): the
    upload's retries run out in the background, and the next save says so."""
    repo = init_repo(tmp_path)
    monkeypatch.chdir(repo)
    with CheckpointManager(tmp_path / "nvme", push=True, run="f", node_local=True) as mgr:
        mgr.save(1, state_of(0))
        deadline = time.monotonic() + 60  # its upload ends with the run record
        while not (tmp_path / "remote" / "modelver" / "runs" / "f.json").is_file():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        objects = tmp_path / "remote" / "files"
        shutil.rmtree(objects)
        objects.write_text("not a directory")
        mgr.save(2, state_of(1))  # committed locally; its upload fails in the background
        with pytest.raises(UploadError, match="did not reach the remote"):
            mgr.save(3, state_of(2))
        objects.unlink()  # the remote is back: the next save goes through
        mgr.save(4, state_of(3))
    rec = json.loads((tmp_path / "remote" / "modelver" / "runs" / "f.json").read_text())
    assert rec["step"] == 4


def test_node_local_needs_ranks_a_remote_and_a_run(
    tmp_path: Path, one_rank_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(init_repo(tmp_path))
    with pytest.raises(InvalidArgumentError, match="push"):
        CheckpointManager(tmp_path / "a", run="x", node_local=True)
    with pytest.raises(InvalidArgumentError, match="run"):
        CheckpointManager(tmp_path / "b", push=True, node_local=True)
    with pytest.raises(InvalidArgumentError, match="delta_full_every"):
        CheckpointManager(tmp_path / "c", push=True, run="x", node_local=True, delta_full_every=3)
    with pytest.raises(RemoteError, match="no-such-remote"):
        CheckpointManager(tmp_path / "d", push="no-such-remote", run="x", node_local=True)


def test_node_local_outside_a_process_group_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="node_local"):
        CheckpointManager(tmp_path / "a", push=True, run="x", node_local=True)


# --- two "nodes" under torchrun ---------------------------------------------------------------


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Final weights of uninterrupted 2-process runs, plain checkpoints (saving changes nothing)."""
    tmp = tmp_path_factory.mktemp("nodelocal-ref")
    out = {}
    for kind in ("ddp", "fsdp"):
        out[kind] = out[f"{kind}-async"] = tmp / f"{kind}.safetensors"
        torchrun(2, "train", tmp / f"ck-{kind}", out[kind], TOTAL, *FLAGS[kind])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "fsdp", "ddp-async", "fsdp-async"])
def test_random_sigkills_and_a_lost_node_disk_end_bit_identical(
    tmp_path: Path, s3_endpoint: str, references: dict[str, Path], kind: str
) -> None:
    """4 SIGKILLs of the whole job (one inside a save); before the last restart rank 1's
    directory is deleted (a replaced node): its share comes back from S3."""
    repo = s3_repo(tmp_path, s3_endpoint, kind)
    out = tmp_path / "killed.safetensors"
    nodes = [tmp_path / f"node{r}" for r in range(2)]
    args = ["train", tmp_path / "node{rank}", out, TOTAL, "--every", "2", "--step-sleep",
            "0.1", "--node-local", "s3", "--job", kind, *FLAGS[kind]]
    rng = random.Random(99)
    kills = 0
    starts = []
    while True:
        if kills == 4:
            shutil.rmtree(nodes[1])
        proc = subprocess.Popen(torchrun_cmd(2, *args), stdout=subprocess.PIPE, text=True,
                                cwd=repo, env=repo_env())
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("START"), first
        starts.append(int(first.split()[1]))
        workers = workers_of(proc)
        if kills == 4:
            assert proc.wait(timeout=300) == 0
            break
        deadline = time.monotonic() + 60  # progress first: the remote names a newer step
        while remote_step(s3_endpoint, kind) <= starts[-1]:
            assert proc.poll() is None and time.monotonic() < deadline, "no upload completed"
            time.sleep(0.05)
        if kills == 1:  # aim at a save: its temp dir exists from mkdir to commit
            deadline = time.monotonic() + 10
            while not any(saving(n / f"run-{kind}") for n in nodes):
                assert time.monotonic() < deadline, "no save was seen"
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.0, 0.8))
        assert proc.poll() is None, f"training ended before the kill ({proc.returncode})"
        sigkill(psutil.Process(proc.pid), *workers)
        proc.wait(timeout=120)
        psutil.wait_procs(workers, timeout=60)
        kills += 1
    assert starts == sorted(starts) and starts[-1] < TOTAL and starts[-1] > 0, starts
    assert weights_equal(references[kind], out)
    rec = record(s3_endpoint, kind, kind)
    assert rec["step"] == TOTAL
    files = rec["files"]
    assert "rank-00000.json" in files and "rank-00001.json" in files
    # each node holds its own share, not the other's
    step = nodes[1] / f"run-{kind}" / fmt.step_dirname(TOTAL)
    assert (step / "rank-00001.json").is_file() and not (step / "rank-00000.json").exists()


@pytest.mark.slow
def test_two_torchrun_agents_share_only_the_remote(
    tmp_path: Path, s3_endpoint: str, references: dict[str, Path]
) -> None:
    """Two "nodes": one torchrun agent each (--nnodes=2 --node_rank=0/1 on 127.0.0.1), each
    with its own directory; both killed once, restarted, finished: bit-identical."""
    repo = s3_repo(tmp_path, s3_endpoint, "agents")
    out = tmp_path / "agents.safetensors"
    args = ["train", tmp_path / "node{rank}", out, TOTAL, "--every", "2", "--step-sleep",
            "0.1", "--node-local", "s3", "--job", "agents"]

    def start() -> list[subprocess.Popen[str]]:
        port = str(free_port())
        return [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={n}",
             "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
             str(SCRIPT), *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=repo,
            env=repo_env()) for n in range(2)]

    agents = start()
    deadline = time.monotonic() + 120
    while remote_step(s3_endpoint, "agents") < 4:
        assert all(a.poll() is None for a in agents) and time.monotonic() < deadline
        time.sleep(0.05)
    procs = [psutil.Process(a.pid) for a in agents]
    sigkill(*procs, *(c for p in procs for c in p.children(recursive=True)))
    for a in agents:
        a.wait(timeout=60)
    agents = start()
    for a in agents:
        assert a.wait(timeout=300) == 0
        assert a.stdout is not None
        started = a.stdout.read().split("START ", 1)[1].split()[0]
        assert 4 <= int(started) < TOTAL, started  # resumed from the remote, not from 0
    assert weights_equal(references["ddp"], out)
    assert remote_step(s3_endpoint, "agents") == TOTAL
