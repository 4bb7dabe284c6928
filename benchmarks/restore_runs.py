"""Does a run-aware restore cost more when the directory holds other runs too? (issue 13)

    python benchmarks/restore_runs.py [--runs 20] [--checkpoints 10] [--reps 31] [--json PATH]

Directory A holds ``--runs`` runs (``CheckpointManager(A, run={"lr": ...}, keep_last=None)``),
``--checkpoints`` checkpoints each of a real training state: an MLP of about ``--model-mib``
MiB, AdamW, a ResumableSampler whose DataLoader is mid-epoch. Directory B holds one of those
runs only (its run directory copied from A: the same bytes). Each timed restore is what a
resumed job does: a fresh ``CheckpointManager(dir, run=that_run)`` (directory check, lock,
leftover recovery), ``restore`` (listing, hash check, load into the live objects), ``close``.
A and B alternate pair by pair (AB, BA, AB, ...) after one warm-up each, page cache warm;
then the same for a tiny state (one 8x8 linear layer, SGD, a sampler), where the fixed costs
dominate. One line per state: medians of A and B, the ratio of the medians, the median of the
pair ratios (the robust one: both move together when the shared disk's fsync slows down), and
the Python function calls of one restore from each under cProfile (the work, without the
noise). ``--json PATH`` also writes them, every time included; ``--profile N`` prints a
restore's hot spots.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelver import CheckpointManager, ResumableSampler
from modelver.checkpoint.runid import run_dir

SAMPLES, BATCH = 4096, 32


def build_state(width: int, layers: int, lr: float, *, adamw: bool) -> dict[str, Any]:
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt: torch.optim.Optimizer = (
        torch.optim.AdamW(model.parameters(), lr=lr) if adamw
        else torch.optim.SGD(model.parameters(), lr=lr)
    )
    data = TensorDataset(torch.randn(SAMPLES, width), torch.randn(SAMPLES, width))
    sampler = ResumableSampler(data, seed=0)
    return {"model": model, "optimizer": opt, "sampler": sampler,
            "loader": DataLoader(data, batch_size=BATCH, sampler=sampler)}


def fill(directory: Path, runs: list[dict[str, float]], *, width: int, layers: int,
         checkpoints: int, adamw: bool) -> None:
    """``checkpoints`` saves per run, a few training steps apart, the sampler mid-epoch."""
    for run in runs:
        torch.manual_seed(0)
        s = build_state(width, layers, run["lr"], adamw=adamw)
        batches = iter(s.pop("loader"))
        with CheckpointManager(directory, run=run, keep_last=None) as mgr:
            for step in range(1, checkpoints + 1):
                for _ in range(3):
                    x, y = next(batches)
                    s["optimizer"].zero_grad()
                    nn.functional.mse_loss(s["model"](x), y).backward()
                    s["optimizer"].step()
                mgr.save(step * 3, s)


def restore_once(
    directory: Path, run: dict[str, float], state: dict[str, Any]
) -> tuple[float, int]:
    t0 = time.perf_counter()
    with CheckpointManager(directory, run=run) as mgr:
        step = mgr.restore(state)
    return time.perf_counter() - t0, step


def profiled(directory: Path, run: dict[str, float], state: dict[str, Any]) -> pstats.Stats:
    """One restore under cProfile: its Python calls, counted (work, not time)."""
    prof = cProfile.Profile()
    prof.runcall(restore_once, directory, run, state)
    return pstats.Stats(prof)


def measure(name: str, a: argparse.Namespace, tmp: Path, *, width: int, layers: int,
            adamw: bool) -> dict[str, Any]:
    runs = [{"lr": round(1e-4 * (i + 1), 6)} for i in range(a.runs)]
    run = runs[len(runs) // 2]
    dir_a, dir_b = tmp / f"{name}-A", tmp / f"{name}-B"
    t0 = time.perf_counter()
    fill(dir_a, runs, width=width, layers=layers, checkpoints=a.checkpoints, adamw=adamw)
    built = time.perf_counter() - t0
    shutil.copytree(run_dir(dir_a, run), run_dir(dir_b, run), symlinks=True)
    ckpt = sorted(run_dir(dir_a, run).glob("step-*"))[-1]
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    torch.manual_seed(1)
    state = build_state(width, layers, run["lr"], adamw=adamw)
    del state["loader"]
    want = a.checkpoints * 3
    for d in (dir_a, dir_b):  # warm-up: the page cache, and a check that both restore the same
        _, step = restore_once(d, run, state)
        if step != want:
            raise SystemExit(f"{d}: restored step {step}, expected {want}")
    times: dict[str, list[float]] = {"A": [], "B": []}
    for i in range(a.reps):
        for which in ("AB" if i % 2 == 0 else "BA"):
            t, _ = restore_once(dir_a if which == "A" else dir_b, run, state)
            times[which].append(t)
    med_a, med_b = statistics.median(times["A"]), statistics.median(times["B"])
    pairs = [ta / tb for ta, tb in zip(times["A"], times["B"], strict=True)]
    prof_a, prof_b = profiled(dir_a, run, state), profiled(dir_b, run, state)
    if a.profile:
        print(f"--- {name} state, one restore from A ({a.runs} runs), by own time:")
        prof_a.sort_stats("tottime").print_stats(a.profile)
    return {
        "state": name, "checkpoint_bytes": size, "runs_in_A": a.runs,
        "checkpoints_per_run": a.checkpoints, "reps": a.reps, "build_A_s": round(built, 2),
        "median_A_s": med_a, "median_B_s": med_b, "ratio": med_a / med_b,
        "median_pair_ratio": statistics.median(pairs),
        "python_calls_A": prof_a.total_calls, "python_calls_B": prof_b.total_calls,  # type: ignore[attr-defined]
        "times_A_s": times["A"], "times_B_s": times["B"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--checkpoints", type=int, default=10)
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--model-mib", type=float, default=2.0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="print the N functions with the most own time in a restore from A")
    a = ap.parse_args()
    width = 512
    layers = max(1, round(a.model_mib * 2**20 / (width * width * 4)))
    with tempfile.TemporaryDirectory(prefix="modelver-runs-") as tmp:
        rows = [
            measure("model", a, Path(tmp), width=width, layers=layers, adamw=True),
            measure("tiny", a, Path(tmp), width=8, layers=1, adamw=False),
        ]
    print(f"{a.runs} runs x {a.checkpoints} checkpoints in A, one run in B; "
          f"{a.reps} pairs, medians")
    for r in rows:
        print(f"{r['state']:>5} ({r['checkpoint_bytes'] / 2**20:7.3f} MiB/ckpt): "
              f"A {r['median_A_s'] * 1e3:8.2f} ms  B {r['median_B_s'] * 1e3:8.2f} ms  "
              f"A/B {r['ratio']:.3f}  median pair A/B {r['median_pair_ratio']:.3f}  "
              f"Python calls A {r['python_calls_A']} B {r['python_calls_B']}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
