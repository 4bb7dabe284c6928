"""How long the training thread is blocked per checkpoint with background push, against no push.

    python benchmarks/push_blocking.py [--mib 256] [--saves 6] [--step-ms 50]

A Git + DVC repository in a temporary directory with a local-directory DVC remote. A fake
training loop (sleeps --step-ms per step, training work that holds no lock) saves every 5 steps
with CheckpointManager(push=False) and then push=True, sync and async saves. Reported per
mode: median/max time ``maybe_save`` blocked the caller, the wall time of the loop, and (push)
how long the last checkpoint took to reach the remote after ``maybe_save`` returned, and the
longest time spent in the push hook itself (enqueueing).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from modelver import CheckpointManager, api
from modelver.publish import Publisher

SUBMIT: list[float] = []  # time the training thread spent in Publisher.committed (the hook)
_submit = Publisher.committed


def timed_submit(self: Publisher, *args: object) -> None:
    t0 = time.perf_counter()
    _submit(self, *args)  # type: ignore[arg-type]
    SUBMIT.append(time.perf_counter() - t0)


Publisher.committed = timed_submit  # type: ignore[method-assign,assignment]


def build_state(mib: float) -> dict[str, object]:
    width = 1024
    layers = max(1, round(mib * (1 << 20) / 12 / (width * width)))  # params + 2 AdamW moments
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).square().mean().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def run(root: Path, state: dict[str, object], *, push: bool, async_save: bool, saves: int,
        step_s: float) -> dict[str, float]:
    tag = f"{'push' if push else 'nopush'}-{'async' if async_save else 'sync'}"
    mgr = CheckpointManager(root / f"ck-{tag}", every_steps=5, keep_last=2, push=push,
                            async_save=async_save)
    blocked = []
    started = time.perf_counter()
    for step in range(1, saves * 5 + 1):
        time.sleep(step_s)
        with torch.no_grad():
            for p in state["model"].parameters():  # type: ignore[attr-defined]
                p.add_(1e-3)  # every byte changes: each push uploads a full checkpoint
        if mgr.maybe_save(step, state):
            blocked.append(mgr.last_blocking_seconds)
    loop = time.perf_counter() - started
    t0 = time.perf_counter()
    mgr.wait()
    if mgr._publisher is not None:
        mgr._publisher.flush()
    drain = time.perf_counter() - t0
    published = len(mgr._publisher.published) if mgr._publisher is not None else 0
    mgr.close()
    hook = max(SUBMIT) if push else 0.0
    SUBMIT.clear()
    return {"median": statistics.median(blocked), "max": max(blocked), "loop": loop,
            "drain": drain, "published": published, "hook": hook}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=float, default=256)
    ap.add_argument("--saves", type=int, default=6)
    ap.add_argument("--step-ms", type=float, default=50)
    a = ap.parse_args()
    state = build_state(a.mib)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        root.mkdir()
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        api.init(root, remote=str(Path(tmp) / "remote"))
        print(f"state {a.mib:.0f} MiB, {a.saves} saves, {a.step_ms:.0f} ms per step, "
              f"torch {torch.__version__}")
        print(f"{'mode':<14} {'blocked median':>15} {'blocked max':>12} {'loop s':>8} "
              f"{'drain s':>8} {'pushed':>7} {'hook max':>9}")
        for async_save in (False, True):
            for push in (False, True):
                r = run(root, state, push=push, async_save=async_save, saves=a.saves,
                        step_s=a.step_ms / 1000)
                mode = f"{'async' if async_save else 'sync'} {'push' if push else 'no push'}"
                print(f"{mode:<14} {r['median'] * 1000:>12.1f} ms {r['max'] * 1000:>9.1f} ms "
                      f"{r['loop']:>8.2f} {r['drain']:>8.2f} {int(r['published']):>7} "
                      f"{r['hook'] * 1e6:>6.0f} us")


if __name__ == "__main__":
    main()
