"""Storage growth of 10 checkpoints of a fine-tune with 90% of the parameters frozen, in DVC
and in Git LFS (``--backend both`` prints them side by side).

    python benchmarks/incremental.py [--blocks 10] [--width 1024] [--optimizer adamw|sgd]
                                     [--backend dvc|lfs|both]

A model of ``blocks`` equal linear layers, all but one frozen (90% of parameters with 10 blocks).
After each of 10 checkpoints (a few training steps apart, ``keep_last=1`` as in a pipeline), the
checkpoints directory is committed to DVC (``dvc add``) and pushed to a local remote. Printed:
checkpoint size, DVC cache and remote growth in checkpoint sizes, and the bytes each push sent
(the remote's growth), against the issue's bound 1.1 x (1 + 10 x 0.1) checkpoint sizes and the
ideal for this optimizer (every changed tensor byte stored once: first checkpoint + 9 deltas).
With Git LFS each checkpoint is committed (``git add``, ``git commit``) and pushed (``git push``,
whose pre-push hook uploads the LFS objects) to a local bare repository (git-lfs's standalone
file transfer); "cache" is ``.git/lfs/objects``, "remote" the bare repository (LFS objects and
Git objects), so both backends count what their remote really holds.
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


Row = tuple[int, int, int, int, int]  # checkpoint, its size, cache, remote, pushed bytes


def setup(backend: str, repo: Path, remote: Path) -> tuple[Path, list[list[str]]]:
    """Initialise the repository; returns the local store and the commands run per checkpoint."""
    run(["git", "init", "-q"], repo)
    if backend == "lfs":
        run(["git", "init", "-q", "--bare", str(remote)], repo)
        run(["git", "lfs", "install", "--local"], repo)
        (repo / ".gitattributes").write_text(
            "checkpoints/**/*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        )
        run(["git", "remote", "add", "origin", remote.as_uri()], repo)
        commit = ["git", "-c", "user.name=bench", "-c", "user.email=bench@invalid", "commit"]
        return repo / ".git" / "lfs" / "objects", [
            ["git", "add", "-A"], [*commit, "-q", "-m", "checkpoint"],
            ["git", "push", "-q", "origin", "HEAD"],
        ]
    env_dvc = shutil.which("dvc") or "dvc"
    run([env_dvc, "init", "-q"], repo)
    run([env_dvc, "remote", "add", "-d", "local", str(remote)], repo)
    run([env_dvc, "config", "cache.type", "hardlink"], repo)
    return repo / ".dvc" / "cache", [[env_dvc, "add", "-q", "checkpoints"], [env_dvc, "push", "-q"]]


def measure(backend: str, a: argparse.Namespace) -> tuple[list[Row], float]:
    """Train, checkpoint and push ``a.checkpoints`` times; rows and the frozen fraction."""
    work = Path(tempfile.mkdtemp(prefix="mv-incr-"))
    repo, remote = work / "repo", work / "remote"
    repo.mkdir()
    try:
        cache, commands = setup(backend, repo, remote)
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
        rows: list[Row] = []
        for i in range(1, a.checkpoints + 1):
            for _ in range(3):
                loss = model(torch.randn(8, a.width)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            info = mgr.save(i, {"model": model, "optimizer": opt})
            assert info is not None
            before = tree_bytes(remote)
            for cmd in commands:
                run(cmd, repo)
            pushed = tree_bytes(remote) - before
            rows.append((i, info.size, tree_bytes(cache), tree_bytes(remote), pushed))
        mgr.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows, frozen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    ap.add_argument("--checkpoints", type=int, default=10)
    ap.add_argument("--backend", choices=["dvc", "lfs", "both"], default="dvc")
    a = ap.parse_args()
    backends = ["dvc", "lfs"] if a.backend == "both" else [a.backend]
    results = {b: measure(b, a) for b in backends}
    rows0, frozen = results[backends[0]]
    size = rows0[0][1]
    n = a.checkpoints
    print(f"model: {a.blocks} x Linear({a.width}, {a.width}), {frozen:.0%} of parameters frozen, "
          f"{a.optimizer}; checkpoint {size / 2**20:.1f} MiB; {os.cpu_count()} cores")
    head = "".join(f" | {b + ' cache':>11} {b + ' remote':>11} {b + ' pushed':>11}"
                   for b in backends)
    print(f"{'ckpt':>4}{head}   (MiB)")
    for k in range(n):
        cells = "".join(
            f" | {c / 2**20:11.1f} {r / 2**20:11.1f} {p / 2**20:11.2f}"
            for _, _, c, r, p in (results[b][0][k] for b in backends)
        )
        print(f"{k + 1:4}{cells}")
    # the first backend's second push (DVC's with "both"): the changed bytes per checkpoint
    changed = rows0[1][4] / size
    print(f"issue bound 1.1 x (1 + {n} x 0.1) = {1.1 * (1 + n * 0.1):.2f}; ideal for this "
          f"optimizer 1 + {n - 1} x {changed:.3f} = {1 + (n - 1) * changed:.2f} checkpoint sizes")
    for b in backends:
        rows = results[b][0]
        print(f"{b}: after {n}: cache {rows[-1][2] / size:.2f} and remote "
              f"{rows[-1][3] / size:.2f} checkpoint sizes; pushes 2..{n} sent "
              f"{sum(r[4] for r in rows[1:]) / (n - 1) / size:.3f} checkpoint sizes each")


if __name__ == "__main__":
    main()
