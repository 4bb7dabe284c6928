"""A second experiment of the demo: `dvc exp run -S train.lr=...` beside earlier runs, against a
`dvc repro` of the same params in a clean workspace.

    python benchmarks/exp_vs_repro.py [--rounds 3]

One repository trains the demo once (`dvc repro`, committed), then runs `dvc exp run -S
train.lr=LR` once per round, each with a new learning rate: a new run, started at step 0 beside
the runs before it in `checkpoints/` (round k has k runs there already). Paired with each, a
fresh repository with the same `train.lr` in params.yaml and its `prepare` stage already run
times one `dvc repro`: the same stages (train 1,500 steps, evaluate), no other run on disk.
A third side separates DVC's own experiment bookkeeping (a forced checkout, a Git commit under
refs/exps) from the cost of the other runs: `dvc exp run -S train.lr=LR` in a second fresh
repository, `prepare` run, no checkpoint on disk. The sides rotate from round to round, so
drift on this shared machine falls on all of them; printed: each round, the medians and the
median ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import yaml
from demo_repro import make_repo

DVC = [sys.executable, "-m", "dvc"]


def run(repo: Path, env: dict[str, str], *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([*DVC, *args], cwd=repo, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def clean_repro(base: Path, lr: float) -> float:
    repo, env = make_repo(base)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = lr
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(repo, env, "repro", "prepare")
    return run(repo, env, "repro")


def clean_exp(base: Path, lr: float) -> float:
    repo, env = make_repo(base)
    run(repo, env, "repro", "prepare")
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "data"], cwd=repo, env=env, check=True)
    return run(repo, env, "exp", "run", "-S", f"train.lr={lr}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="modelver-exp-") as tmp:
        repo, env = make_repo(Path(tmp) / "exp")
        run(repo, env, "repro")
        subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
        subprocess.run(["git", "commit", "-q", "-m", "run 1"], cwd=repo, env=env, check=True)
        for i in range(a.rounds):
            lr = round(0.0011 + 0.0003 * i, 6)  # never the demo's own 0.003: a new run each
            with tempfile.TemporaryDirectory(prefix="modelver-clean-") as clean:
                sides: dict[str, Callable[[], float]] = {
                    "exp": partial(run, repo, env, "exp", "run", "-S", f"train.lr={lr}"),
                    "repro": partial(clean_repro, Path(clean) / "r", lr),
                    "clean_exp": partial(clean_exp, Path(clean) / "e", lr),
                }
                names = list(sides)
                order = names[i % 3:] + names[: i % 3]
                t = {name: sides[name]() for name in order}
            runs = len(list((repo / "checkpoints").glob("run-*")))
            rows.append(t)
            print(f"round {i + 1}: lr {lr}: dvc exp run {t['exp']:.2f} s ({runs} runs in "
                  f"checkpoints/ after it); clean workspace: dvc repro {t['repro']:.2f} s, "
                  f"dvc exp run {t['clean_exp']:.2f} s", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    vs_repro = statistics.median(r["exp"] / r["repro"] for r in rows)
    vs_exp = statistics.median(r["exp"] / r["clean_exp"] for r in rows)
    print(f"medians over {a.rounds} rounds: dvc exp run beside other runs {med['exp']:.2f} s; "
          f"clean dvc repro {med['repro']:.2f} s (ratio {vs_repro:.2f}); clean dvc exp run "
          f"{med['clean_exp']:.2f} s (ratio {vs_exp:.2f})")


if __name__ == "__main__":
    main()
