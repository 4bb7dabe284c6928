"""A second experiment of the demo: `dvc exp run -S train.lr=...` beside earlier runs, against a
`dvc repro` of the same params in a clean workspace.

    python benchmarks/exp_vs_repro.py [--rounds 3]

One repository trains the demo once (`dvc repro`, committed), then runs `dvc exp run -S
train.lr=LR` once per round, each with a new learning rate: a new run, started at step 0 beside
the runs before it in `checkpoints/` (round k has k runs there already). Paired with each, a
fresh repository with the same `train.lr` in params.yaml and its `prepare` stage already run
times one `dvc repro`: the same stages (train 1,500 steps, evaluate), no other run on disk.
The two alternate, the experiment first in odd rounds, so drift on this shared machine falls on
both sides; printed: each pair, the medians and the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelver-exp-") as tmp:
        repo, env = make_repo(Path(tmp) / "exp")
        run(repo, env, "repro")
        subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
        subprocess.run(["git", "commit", "-q", "-m", "run 1"], cwd=repo, env=env, check=True)
        pairs = []
        for i in range(a.rounds):
            lr = round(0.001 + 0.0005 * i, 6)
            with tempfile.TemporaryDirectory(prefix="modelver-clean-") as clean:
                if i % 2 == 0:
                    exp_s = run(repo, env, "exp", "run", "-S", f"train.lr={lr}")
                    repro_s = clean_repro(Path(clean), lr)
                else:
                    repro_s = clean_repro(Path(clean), lr)
                    exp_s = run(repo, env, "exp", "run", "-S", f"train.lr={lr}")
            runs = len(list((repo / "checkpoints").glob("run-*")))
            pairs.append((exp_s, repro_s))
            print(f"round {i + 1}: lr {lr}: dvc exp run {exp_s:.2f} s ({runs} runs in "
                  f"checkpoints/ after it), clean dvc repro {repro_s:.2f} s, "
                  f"ratio {exp_s / repro_s:.2f}", flush=True)
    exp_m = statistics.median(e for e, _ in pairs)
    repro_m = statistics.median(r for _, r in pairs)
    ratio = statistics.median(e / r for e, r in pairs)
    print(f"second and later experiments: dvc exp run median {exp_m:.2f} s, clean dvc repro "
          f"median {repro_m:.2f} s, median ratio {ratio:.2f} over {a.rounds} rounds")


if __name__ == "__main__":
    main()
