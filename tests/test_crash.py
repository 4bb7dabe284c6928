"""Kill the training process at random moments (some inside saves): the result must not change."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import TESTS, run_py, saving, weights_equal

SCRIPT = TESTS / "train_script.py"


def reference(tmp_path: Path, total: int, *extra: str) -> Path:
    out = tmp_path / "reference.safetensors"
    run_py(SCRIPT, tmp_path / "ref-ck", out, str(total), *extra)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_bit_identical(tmp_path: Path, workers: int) -> None:
    ref = reference(tmp_path, 40)
    out = tmp_path / "resumed.safetensors"
    args = [SCRIPT, tmp_path / "ck", out, "40", "--workers", str(workers)]
    first = run_py(*args, "--die-at", "20", check=False)
    assert first.returncode == -signal.SIGKILL
    second = run_py(*args)
    assert "START 18" in second.stdout  # every 3 steps: 18 is mid-epoch (13 batches per epoch)
    assert weights_equal(ref, out)


def test_sigterm_checkpoint_then_resume(tmp_path: Path) -> None:
    ref = reference(tmp_path, 60)
    out = tmp_path / "resumed.safetensors"
    args = [sys.executable, SCRIPT, tmp_path / "ck", out, "60", "--signals", "--every", "50",
            "--step-sleep", "0.05"]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("START 0")
    time.sleep(0.8)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    steps = sorted(p.name for p in (tmp_path / "ck").glob("step-*"))
    assert len(steps) == 1 and steps[0] != "step-00000050"  # saved where the signal came
    resumed = run_py(*args[1:])
    assert f"START {int(steps[0][5:])}" in resumed.stdout
    assert weights_equal(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async", "async-delta"])
def test_random_sigkills_end_bit_identical(tmp_path: Path, mode: str) -> None:
    """≥ 20 SIGKILLs at random moments; at least 3 of them land inside a save. With deltas,
    kills also land between a delta and its base being written, and in retention of chains."""
    total = 120
    extra = ["--hidden", "2048", "--every", "2", "--keep", "2", "--step-sleep", "0.004"]
    async_save = mode != "sync"
    if async_save:
        extra.append("--async-save")
    if mode == "async-delta":
        extra += ["--delta", "3"]
    ref = reference(tmp_path, total, *extra)
    out = tmp_path / "killed.safetensors"
    ck = tmp_path / "ck"
    cmd = [sys.executable, str(SCRIPT), str(ck), str(out), str(total), *extra]
    rng = random.Random(1234 + len(mode))
    kills = inside_save = 0
    for _ in range(80):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("START"), first
        if kills >= 20 and inside_save >= 3:
            assert proc.wait(timeout=120) == 0
            break
        if kills % 3 == 2:  # every third kill aims at a save: as soon as a temp dir shows up
            deadline = time.monotonic() + 5
            while proc.poll() is None and time.monotonic() < deadline:
                if saving(ck):
                    break
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            kills += 1
            inside_save += saving(ck)
        elif proc.returncode != 0:
            pytest.fail(f"training failed with exit code {proc.returncode}")
        else:
            # finished before the kill: start over so the kill count keeps growing
            out.unlink()
            shutil.rmtree(ck)
    assert kills >= 20 and inside_save >= 3, (kills, inside_save)
    assert weights_equal(ref, out)
