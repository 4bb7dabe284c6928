"""A training loop under ``accelerate launch`` (CPU; gloo with 2 processes), run by
tests/test_accelerate.py.

    accelerate launch ... accelerate_train_script.py CKPT OUT TOTAL [--every K] [--keep K]
                          [--step-sleep S]

Dropout, torch.randn, random, numpy.random (seeded differently on every process), AdamW, a
OneCycleLR schedule (stepped once per process by AcceleratedScheduler), a shuffled
ResumableSampler whose batches Accelerate shards, and ``rng_types=["torch"]``, so Accelerate
also synchronises torch's RNG at the start of every pass. The main process writes the final
weights to OUT.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelver import CheckpointManager, ResumableSampler
from modelver.integrations.accelerate import checkpoint_state


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("total", type=int)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--step-sleep", type=float, default=0.0)
    a = p.parse_args()
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True, rng_types=["torch"])
    g = torch.Generator().manual_seed(123)
    x = torch.randn(100, 16, generator=g)
    ds = TensorDataset(x, (x.sum(1) > 0).long())
    sampler = ResumableSampler(ds, shuffle=True, seed=7, num_replicas=1, rank=0)
    loader = DataLoader(ds, batch_size=8, sampler=sampler, drop_last=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=2e-2, total_steps=a.total * accelerator.num_processes
    )
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    rank = accelerator.process_index
    random.seed(rank)
    np.random.seed(rank)
    torch.manual_seed(100 + rank)  # dropout masks and noise differ per process
    state = checkpoint_state(
        accelerator, model=model, optimizer=opt, scheduler=sched, dataloader=loader
    )
    mgr = CheckpointManager(a.ckpt, every_steps=a.every, keep_last=a.keep)
    start = mgr.restore(state)
    print(f"START {start} rank {rank}", flush=True)
    it = iter(loader)
    metrics: dict[str, float] = {}
    for step in range(start, a.total):
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            xb, yb = next(it)
        noise = torch.randn_like(xb) * 0.01 * random.random() * float(np.random.rand())
        loss = nn.functional.cross_entropy(model(xb + noise), yb)
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        sched.step()
        metrics = {"loss": loss.item()}
        mgr.maybe_save(step + 1, state, metrics=metrics)
        if a.step_sleep:
            time.sleep(a.step_sleep)
    mgr.save(a.total, state, metrics=metrics)
    mgr.close()
    if accelerator.is_main_process:
        weights = accelerator.unwrap_model(model).state_dict()
        save_file({k: v.contiguous() for k, v in weights.items()}, a.out)
    print(f"DONE rank {rank}", flush=True)


if __name__ == "__main__":
    main()
