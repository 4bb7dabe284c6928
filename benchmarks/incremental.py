"""Storage growth of 10 checkpoints of a fine-tune with 90% of the parameters frozen, in DVC.

    python benchmarks/incremental.py [--blocks 10] [--width 1024] [--optimizer adamw|sgd]

A model of ``blocks`` equal linear layers, all but one frozen (90% of parameters with 10 blocks).
After each of 10 checkpoints (a few training steps apart, ``keep_last=1`` as in a pipeline), the
checkpoints directory is committed to DVC (``dvc add``) and pushed to a local remote. Printed:
checkpoint size, DVC cache and remote growth in checkpoint sizes, and the bytes each push sent
(the remote's growth), against the issue's bound 1.1 x (1 + 10 x 0.1) checkpoint sizes and the
ideal for this optimizer (every changed tensor byte stored once: first checkpoint + 9 deltas).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn

from modelver import CheckpointManager


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    ap.add_argument("--checkpoints", type=int, default=10)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mv-incr-"))
    repo, remote = work / "repo", work / "remote"
    repo.mkdir()
    env_dvc = shutil.which("dvc") or "dvc"
    try:
        run(["git", "init", "-q"], repo)
        run([env_dvc, "init", "-q"], repo)
        run([env_dvc, "remote", "add", "-d", "local", str(remote)], repo)
        run([env_dvc, "config", "cache.type", "hardlink"], repo)
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(a.width, a.width) for _ in range(a.blocks)])
        for block in list(model)[:-1]:
            block.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        frozen = 1 - sum(p.numel() for p in params) / sum(p.numel() for p in model.parameters())
        opt: torch.optim.Optimizer = (
            torch.optim.AdamW(params, lr=1e-3) if a.optimizer == "adamw"
            else torch.optim.SGD(params, lr=1e-3)
        )
        mgr = CheckpointManager(repo / "checkpoints", keep_last=1)
        cache = repo / ".dvc" / "cache"
        rows = []
        size = 0
        for i in range(1, a.checkpoints + 1):
            for _ in range(3):
                loss = model(torch.randn(8, a.width)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            info = mgr.save(i, {"model": model, "optimizer": opt})
            assert info is not None
            size = size or info.size
            before = tree_bytes(remote)
            run([env_dvc, "add", "-q", "checkpoints"], repo)
            run([env_dvc, "push", "-q"], repo)
            pushed = tree_bytes(remote) - before
            rows.append((i, info.size, tree_bytes(cache), tree_bytes(remote), pushed))
        mgr.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    changed = rows[1][4] / size  # bytes the second push sent, as a fraction of a checkpoint
    ideal = 1 + (a.checkpoints - 1) * changed
    n = a.checkpoints
    print(f"model: {a.blocks} x Linear({a.width}, {a.width}), {frozen:.0%} of parameters frozen, "
          f"{a.optimizer}; checkpoint {size / 2**20:.1f} MiB; {os.cpu_count()} cores")
    print(f"{'ckpt':>4} {'cache MiB':>10} {'remote MiB':>11} {'pushed MiB':>11}")
    for i, _, c, r, pushed in rows:
        print(f"{i:4} {c / 2**20:10.1f} {r / 2**20:11.1f} {pushed / 2**20:11.2f}")
    growth_cache, growth_remote = rows[-1][2] / size, rows[-1][3] / size
    print(f"after {n}: cache {growth_cache:.2f} and remote {growth_remote:.2f} checkpoint sizes; "
          f"issue bound 1.1 x (1 + {n} x 0.1) = {1.1 * (1 + n * 0.1):.2f}; "
          f"ideal for this optimizer 1 + {n - 1} x {changed:.3f} = {ideal:.2f}")


if __name__ == "__main__":
    main()
