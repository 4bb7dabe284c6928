"""The Hugging Face Trainer integration under DDP: real torchrun / accelerate launch, 2 CPU ranks.

tests/trainer_ddp_script.py is the job (a GPT-2 with dropout, shuffled data, a schedule, per-rank
seeds). Each start of it costs about 15 s on a 2-core machine, so the starts are few.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("transformers")

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from modelver import list_checkpoints, load_checkpoint, verify_checkpoint
from modelver.cli.main import cli
from tests.helpers import TESTS, free_port, repo_env, weights_equal
from tests.test_distributed import sigkill, workers_of

SCRIPT = TESTS / "trainer_ddp_script.py"
JOB = ["--max-steps", "24", "--save-steps", "2", "--step-sleep", "0.1"]  # 5 steps an epoch


def torchrun_cmd(out: Path, weights: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        str(SCRIPT), str(out), str(weights), *JOB, *args,
    ]  # fmt: skip


def temp_dirs(ck: Path) -> set[str]:
    """The temp directories of saves under way or cut short."""
    return {p.name for p in ck.glob(".tmp-*")}


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=repo_env())
    if proc.returncode != 0:
        pytest.fail(f"job failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-process run; its output directory (checkpoints, final weights)."""
    out = tmp_path_factory.mktemp("trainer-ddp-ref")
    run(torchrun_cmd(out, out / "final.safetensors", "--keep", "0"))
    return out


def test_ddp_checkpoints_are_coordinated_and_pass_verify_and_diff(reference: Path) -> None:
    steps = [c.step for c in list_checkpoints(reference / "checkpoints")]
    assert steps == list(range(2, 25, 2))  # one checkpoint per save, nothing else
    assert not list(reference.glob("checkpoint-*"))
    path = reference / "checkpoints" / "step-00000024"
    manifest = verify_checkpoint(path)
    assert manifest.world_size == 2 and {"rank-00000.json", "rank-00001.json"} <= set(
        manifest.files
    )
    ranks = [json.loads((path / f"rank-{r:05d}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["rng"]["torch"] != ranks[1]["rng"]["torch"]  # each rank's own RNG
    loaded = load_checkpoint(path)
    assert loaded.state["trainer_state"]["global_step"] == 24
    final = load_file(reference / "final.safetensors")
    assert all(torch.equal(loaded.state["model"][k], v) for k, v in final.items())
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", str(path)])
    assert ok.exit_code == 0, ok.output
    d = runner.invoke(cli, ["diff", str(reference / "checkpoints" / "step-00000022"), str(path),
                            "--json"])  # fmt: skip
    assert d.exit_code == 0, d.output
    changed = {t["name"] for t in json.loads(d.output)["tensors"] if t["status"] == "changed"}
    assert "model/transformer.h.0.attn.c_attn.weight" in changed
    assert any(name.startswith("optimizer/") for name in changed)


@pytest.mark.slow
def test_whole_job_sigkilled_at_random_moments_ends_bit_identical(
    tmp_path: Path, reference: Path
) -> None:
    """3 SIGKILLs of torchrun and both ranks (the last one inside a save), then the same
    command until it finishes: the weights of the uninterrupted run, bit for bit."""
    out, weights = tmp_path / "run", tmp_path / "final.safetensors"
    cmd = torchrun_cmd(out, weights)
    ck = out / "checkpoints"
    rng = random.Random(14)
    kills = inside_save = 0
    starts = []
    while True:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=repo_env())
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("START"), first
        starts.append(int(first.split()[1]))
        workers = workers_of(proc)
        if kills >= 3:
            assert proc.wait(timeout=300) == 0
            break
        left = temp_dirs(ck)  # a killed start's leftover is no save of this one
        if kills == 2:  # aim at a save: its temp dir exists from mkdir to commit
            deadline = time.monotonic() + 10
            while not temp_dirs(ck) - left and time.monotonic() < deadline:
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.2, 1.5))
        assert proc.poll() is None, f"training ended before the kill ({proc.returncode})"
        sigkill(psutil.Process(proc.pid), *workers)
        proc.wait(timeout=120)
        psutil.wait_procs(workers, timeout=60)
        kills += 1
        inside_save += bool(temp_dirs(ck) - left)
    assert inside_save >= 1, (kills, inside_save)
    assert starts == sorted(starts) and 0 < starts[-1] < 24, starts
    assert weights_equal(reference / "final.safetensors", weights)
    assert [c.step for c in list_checkpoints(ck)] == [22, 24]  # rank 0's retention (keep 2)
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["one-rank", "torchrun"])
def test_sigterm_gives_one_coordinated_checkpoint_and_a_clean_exit(
    tmp_path: Path, reference: Path, target: str
) -> None:
    """SIGTERM to one rank, or to torchrun (which passes it to every rank, as on preemption):
    both ranks save the same step once and leave through TrainingInterrupted. The restart
    resumes from it; after the one-rank stop it is corrupted first, so rank 0 skips it and
    both ranks start afresh, ending with the same weights either way."""
    out, weights = tmp_path / "run", tmp_path / "final.safetensors"
    cmd = torchrun_cmd(out, weights, "--graceful", "--save-steps", "50")  # no periodic save
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=repo_env())
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("START 0")
    time.sleep(1.0)
    if target == "one-rank":
        workers_of(proc)[1].send_signal(signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and not weights.exists()
    infos = list_checkpoints(out / "checkpoints")
    assert len(infos) == 1 and 0 < infos[0].step < 24, infos
    step = infos[0].step
    assert f"STOPPED {step} rank 0" in rest and f"STOPPED {step} rank 1" in rest, rest
    manifest = verify_checkpoint(infos[0].path)
    assert manifest.world_size == 2 and "rank-00001.json" in manifest.files
    start = step
    if target == "one-rank":
        victim = infos[0].path / "model-00000.safetensors"
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
        start = 0
    resumed = run(cmd)
    assert f"START {start} rank 0" in resumed.stdout and f"START {start} rank 1" in resumed.stdout
    assert ("skipping corrupted checkpoint" in resumed.stderr) == (target == "one-rank")
    assert weights_equal(reference / "final.safetensors", weights)


@pytest.mark.slow
def test_accelerate_launch_with_patch_trainer_and_load_best_model_at_end(
    tmp_path: Path,
) -> None:
    """``accelerate launch`` (DDP on 2 CPU processes), ``patch_trainer`` on a plain Trainer,
    evaluation every save and ``load_best_model_at_end``: the best checkpoint is kept past
    retention and every rank ends with its weights; re-running the finished job changes
    nothing and ends with them again."""
    out, weights = tmp_path / "run", tmp_path / "final.safetensors"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(SCRIPT), str(out), str(weights),
        "--max-steps", "24", "--save-steps", "3", "--patch", "--best", "--lr", "5e-2",
    ]  # fmt: skip
    done = run(cmd).stdout
    ck = out / "checkpoints"
    best = [line.split()[-1] for line in done.splitlines() if line.startswith("DONE")]
    assert len(best) == 2 and best[0] == best[1], done
    best_path = Path(best[0])
    kept = list_checkpoints(ck)
    assert best_path in [c.path for c in kept] and len(kept) == 3  # keep_last=2 + the best
    assert best_path.name != "step-00000024"
    manifest = verify_checkpoint(best_path)
    assert manifest.world_size == 2 and "eval_loss" in manifest.metrics
    assert min(kept, key=lambda c: c.metrics["eval_loss"]).path == best_path
    model = load_checkpoint(best_path).state["model"]
    final = load_file(weights)
    assert all(torch.equal(model[k], v) for k, v in final.items())
    listed = [(c.path, (c.path / "MANIFEST.json").read_bytes()) for c in kept]
    weights.unlink()
    again = run(cmd).stdout  # the job re-run once finished: trains and saves nothing
    assert "START" not in again and "DONE rank 1" in again
    assert [(c.path, (c.path / "MANIFEST.json").read_bytes()) for c in list_checkpoints(ck)
            ] == listed
    assert all(torch.equal(model[k], v) for k, v in load_file(weights).items())
