"""Stage `train`: a resumable training loop with modelver checkpoints.

Killed at any moment and started again (directly or by `dvc repro`, which keeps `checkpoints/`
because it is a `persist: true` output), it continues from the newest complete checkpoint of
its run and ends with the same weights, bit for bit, as a run that was never interrupted.
`dvc exp run -S train.lr=...` trains another run beside it in the same `checkpoints/`.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from common import load_params, load_split, make_model, run_params
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelver import CheckpointManager, ResumableSampler
from modelver.errors import TrainingInterrupted


def make_scheduler(opt: torch.optim.Optimizer, p: dict) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup, then exponential decay: no dependence on the total number of steps, so
    a run extended later ends exactly where a run planned that long from the start ends."""
    sched = torch.optim.lr_scheduler
    warmup = sched.LinearLR(opt, start_factor=0.1, total_iters=p["warmup_steps"])
    decay = sched.ExponentialLR(opt, gamma=p["lr_decay"])
    return sched.SequentialLR(opt, [warmup, decay], milestones=[p["warmup_steps"]])


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    xb: torch.Tensor,
    yb: torch.Tensor,
) -> float:
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(xb), yb)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def main() -> None:
    p = load_params("train")
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and keeps results reproducible
    random.seed(p["seed"])
    np.random.seed(p["seed"])
    torch.manual_seed(p["seed"])

    x, y = load_split("train")
    ds = TensorDataset(x, y)
    sampler = ResumableSampler(ds, shuffle=True, seed=p["seed"])
    loader = DataLoader(ds, batch_size=p["batch_size"], sampler=sampler)
    model = make_model(hidden=p["hidden"], dropout=p["dropout"])
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    total = int(p["steps"])
    sched = make_scheduler(opt, p)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "data": sampler}

    # One run per set of trajectory params, each in checkpoints/run-<id>/: another -S value
    # starts a run beside the others, the same values again continue theirs.
    mgr = CheckpointManager(
        "checkpoints",
        every_steps=p["checkpoint_every"],
        keep_last=p["keep_last"],
        handle_signals=True,
        run=run_params(p),
    )
    start = mgr.restore(state)
    if start:
        print(f"resumed from step {start}", flush=True)
    if start >= total:
        print(f"already at step {start} of {total}; nothing to train", flush=True)
        mgr.close()
        return

    model.train()
    batches = iter(loader)
    loss = float("nan")
    try:
        for step in range(start, total):
            try:
                xb, yb = next(batches)
            except StopIteration:  # end of an epoch: the sampler starts the next one
                batches = iter(loader)
                xb, yb = next(batches)
            loss = train_step(model, opt, sched, xb, yb)
            if (step + 1) % p["log_every"] == 0:
                print(f"step {step + 1}/{total} loss {loss:.4f}", flush=True)
            mgr.maybe_save(step + 1, state, metrics={"loss": loss})
    except TrainingInterrupted as e:  # SIGTERM/SIGINT: the manager saved this step, then stopped
        print(
            f"interrupted by signal {e.signum}: saved step {e.step}; run again to resume",
            flush=True,
        )
        raise
    mgr.save(total, state, metrics={"loss": loss})
    mgr.close()
    print(f"done: step {total}, checkpoints in {mgr.root}/", flush=True)


if __name__ == "__main__":
    main()
