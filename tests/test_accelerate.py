"""Hugging Face Accelerate: the hand-written-loop API on the objects ``accelerator.prepare``
returns (modelver.integrations.accelerate).

In-process tests use a one-process Accelerator, and ``prepare_data_loader`` with an explicit
``num_processes=2`` to get the loaders both processes of a 2-process job would; the
``accelerate launch`` tests (about 10 s a start on 2 cores) are marked slow.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import psutil
import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.state import AcceleratorState
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelver import ResumableSampler, verify_checkpoint
from modelver.checkpoint import format as fmt
from modelver.cli.main import cli
from modelver.errors import ModelverError
from modelver.integrations.accelerate import LoaderPosition, checkpoint_state
from tests.helpers import TESTS, free_port, repo_env, saving, weights_equal

SCRIPT = TESTS / "accelerate_train_script.py"
TOTAL = 40  # 100 samples in batches of 8 (drop_last): 12 steps an epoch, 6 with 2 processes


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps its process state in singletons; other tests build their own."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def prepared(n: int = 2, batch: int = 4, **loader: object) -> list[LoaderPosition]:
    """The loaders of every process of an ``n``-process job, with their positions."""
    out = []
    for rank in range(n):
        ds = TensorDataset(torch.arange(48))
        sampler = ResumableSampler(ds, seed=5, num_replicas=1, rank=0)
        base = DataLoader(ds, batch_size=batch, sampler=sampler, **loader)  # type: ignore[arg-type]
        shard = prepare_data_loader(base, num_processes=n, process_index=rank)
        out.append(LoaderPosition(shard, sampler))
    return out


def batches(it: Iterator[list[torch.Tensor]], k: int) -> list[list[int]]:
    return [next(it)[0].tolist() for _ in range(k)]


def rest_of(loader: Iterable[list[torch.Tensor]]) -> list[list[int]]:
    return [b[0].tolist() for b in loader]


def test_position_counts_rounds_and_resumes_every_process_exactly() -> None:
    """3 of 6 batches per process (the loader reads one ahead): 3 rounds of 2 x 4 indices."""
    positions = prepared()
    iters = [iter(p.loader) for p in positions]
    seen = [batches(it, 3) for it in iters]
    states = [p.state_dict() for p in positions]
    assert [s["position"] for s in states] == [24, 24] and states[0] == states[1]
    rest = [rest_of(it) for it in iters]
    assert all(len(r) == 3 for r in rest)
    order = positions[0].sampler.order(0)
    assert sorted(i for s, r in zip(seen, rest, strict=True) for b in s + r for i in b) == sorted(
        order
    )
    assert positions[0].state_dict()["position"] == 48  # the pass is over: the whole epoch
    again = prepared()
    for p, r in zip(again, rest, strict=True):
        p.load_state_dict(states[0])
        p.modelver_after_restore()
        assert p.state_dict()["position"] == 24  # restored, nothing drawn yet
        assert rest_of(p.loader) == r
    nxt = prepared()
    for p in nxt:
        p.load_state_dict(positions[0].state_dict())
    assert nxt[0].loader.iteration == 1
    assert rest_of(nxt[0].loader)[0] == [
        positions[0].sampler.order(1)[i] for i in range(4)
    ]  # the next epoch's first batch


def test_setups_that_would_resume_inexactly_are_refused() -> None:
    acc = Accelerator(cpu=True)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def attach(loader: object) -> None:
        checkpoint_state(acc, model=model, optimizer=opt, dataloader=loader)

    data = TensorDataset(torch.arange(30))
    with pytest.raises(ModelverError, match="Accelerate shards its batches again"):
        sampler = ResumableSampler(data, num_replicas=2, rank=0)
        attach(prepare_data_loader(DataLoader(data, batch_size=4, sampler=sampler),
                                   num_processes=2, process_index=0))
    with pytest.raises(ModelverError, match="whole rounds of 8"):
        sampler = ResumableSampler(data, num_replicas=1, rank=0)
        attach(prepare_data_loader(DataLoader(data, batch_size=4, sampler=sampler),
                                   num_processes=2, process_index=1))
    with pytest.raises(ModelverError, match="RandomSampler"):
        attach(acc.prepare(DataLoader(data, batch_size=4, shuffle=True)))
    with pytest.raises(ModelverError, match=r"returned by accelerator\.prepare"):
        attach(DataLoader(data, batch_size=4, sampler=ResumableSampler(data)))
    for ok in ({"drop_last": True}, {}):  # whole rounds, or a single process
        sampler = ResumableSampler(data, num_replicas=1, rank=0)
        loader: DataLoader[tuple[torch.Tensor, ...]] = DataLoader(
            data, batch_size=4, sampler=sampler, **ok  # type: ignore[arg-type]
        )
        attach(prepare_data_loader(loader, num_processes=2 if ok else 1, process_index=0))


def test_save_state_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    model, opt, sched = acc.prepare(model, opt, sched)
    state = checkpoint_state(acc, model=model, optimizer=opt, scheduler=sched)
    assert state["model"] is acc.unwrap_model(model)
    assert type(state["optimizer"]) is torch.optim.AdamW  # torch's classes are recorded
    assert type(state["scheduler"]) is torch.optim.lr_scheduler.StepLR
    target = tmp_path / "accelerate-ckpt"
    with pytest.raises(ModelverError, match="save_state is disabled") as err:
        acc.save_state(str(target))
    assert "CheckpointManager" in (err.value.hint or "")
    with pytest.raises(ModelverError, match="load_state is disabled"):
        acc.load_state(str(target))
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with acc.accumulate(model):  # the first of 2 micro-batches: gradients not applied yet
        acc.backward(model(torch.randn(3, 4)).sum())
    with pytest.raises(ModelverError, match="accumulat"):
        state["accelerator"].state_dict()


# --- accelerate launch ----------------------------------------------------------------------------


def launch_cmd(nproc: int, *args: object) -> list[str]:
    mode = ["--cpu"] if nproc == 1 else ["--multi_gpu", "--main_process_port", str(free_port())]
    return [
        sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(nproc),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", "1", str(SCRIPT), *map(str, args),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """Per process count, the directory of one uninterrupted run: ``out.safetensors`` (final
    weights) and ``ck/`` (every checkpoint, every 10 steps)."""
    done: dict[int, Path] = {}

    def get(nproc: int) -> Path:
        if nproc not in done:
            tmp = tmp_path_factory.mktemp(f"accelerate-{nproc}")
            cmd = launch_cmd(nproc, tmp / "ck", tmp / "out.safetensors", TOTAL, "--every", "10",
                             "--keep", "0")
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=repo_env())
            assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
            done[nproc] = tmp
        return done[nproc]

    return get


def job_of(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    """The launcher and every process under it (torchrun starts workers in their own session,
    so a process group would miss them)."""
    try:
        return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkilled_job_resumes_bit_identical(
    tmp_path: Path, uninterrupted: Callable[[int], Path], nproc: int
) -> None:
    """3 or more SIGKILLs of the whole job (from the second on aimed inside a save until one
    lands there), restarted with the same command until it finishes: the weights of the
    uninterrupted run, to the bit."""
    ck, out = tmp_path / "ck", tmp_path / "out.safetensors"
    cmd = launch_cmd(nproc, ck, out, TOTAL, "--every", "1", "--step-sleep", "0.05")
    rng = random.Random(1400 + nproc)
    kills = inside_save = 0
    starts = []
    while True:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=repo_env())
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("START"), first
        starts.append(int(first.split()[1]))
        if kills >= 3 and inside_save:
            assert proc.wait(timeout=300) == 0
            break
        assert kills < 10, "no kill landed inside a save"
        job = job_of(proc)  # before aiming: listing the job takes longer than a save
        if kills >= 1 and not inside_save:  # aim at saves until a kill lands inside one
            deadline = time.monotonic() + 10
            while not saving(ck) and time.monotonic() < deadline:
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.1, 0.8))
        assert proc.poll() is None, f"training ended before the kill ({proc.returncode})"
        for p in job:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        psutil.wait_procs(job, timeout=60)
        kills += 1
        inside_save += saving(ck)
    assert inside_save >= 1 and starts == sorted(starts) and starts[-1] < TOTAL, starts
    assert weights_equal(uninterrupted(nproc) / "out.safetensors", out)


@pytest.mark.slow
def test_checkpoints_verify_and_diff_across_process_counts(
    uninterrupted: Callable[[int], Path],
) -> None:
    one, two = (uninterrupted(n) / "ck" for n in (1, 2))
    runner = CliRunner()
    for ck in (one, two):
        ok = runner.invoke(cli, ["verify", str(ck / "step-00000040")])
        assert ok.exit_code == 0, ok.output
    manifest = verify_checkpoint(two / "step-00000040")
    assert manifest.world_size == 2 and "rank-00001.json" in manifest.files
    ranks = [json.loads((two / "step-00000040" / f"rank-{r:05d}.json").read_text())
             for r in (0, 1)]  # fmt: skip
    assert ranks[0]["rng"]["numpy"] != ranks[1]["rng"]["numpy"]  # each process's own RNGs
    assert fmt.read_manifest(one / "step-00000040").world_size == 1
    model = {"model/0.weight", "model/0.bias", "model/3.weight", "model/3.bias"}
    for a, b in ((one / "step-00000020", one / "step-00000040"),
                 (one / "step-00000040", two / "step-00000040")):  # fmt: skip
        d = runner.invoke(cli, ["diff", str(a), str(b), "--json"])
        assert d.exit_code == 0, d.output
        status = {t["name"]: t["status"] for t in json.loads(d.output)["tensors"]}
        assert {n for n, s in status.items() if s == "changed"} >= model, status
