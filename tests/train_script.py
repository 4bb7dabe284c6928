"""A small but complete training loop, run as a subprocess by the crash-safety tests.

Uses dropout, torch.randn, random, numpy.random, AdamW, a scheduler and a DataLoader driven by a
ResumableSampler. Prints "START <step>" after restoring and writes final weights as safetensors.

    python train_script.py CKPT_DIR OUT_FILE TOTAL_STEPS [--workers N] [--every K] [--async]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import time

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelver import CheckpointManager, ResumableSampler


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("total", type=int)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--delta", type=int, default=0, help="delta_full_every (0: no deltas)")
    p.add_argument("--signals", action="store_true")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--die-at", type=int, default=-1, help="SIGKILL itself after this step")
    a = p.parse_args()

    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(203, 16, generator=g)
    y = (x.sum(1) > 0).long()
    ds = TensorDataset(x, y)
    sampler = ResumableSampler(ds, shuffle=True, seed=7)
    loader = DataLoader(ds, batch_size=16, sampler=sampler, num_workers=a.workers)
    h = a.hidden
    model = nn.Sequential(nn.Linear(16, h), nn.ReLU(), nn.Dropout(0.3), nn.Linear(h, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=a.total)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "data": sampler}
    mgr = CheckpointManager(
        a.ckpt,
        every_steps=a.every,
        keep_last=a.keep,
        async_save=a.async_save,
        handle_signals=a.signals,
        delta_full_every=a.delta or None,
    )
    start = mgr.restore(state)
    print(f"START {start}", flush=True)
    it = iter(loader)
    metrics = {}
    for step in range(start, a.total):
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            xb, yb = next(it)
        noise = torch.randn_like(xb) * 0.01 * random.random() * float(np.random.rand())
        loss = nn.functional.cross_entropy(model(xb + noise), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        metrics = {"loss": loss.item()}
        mgr.maybe_save(step + 1, state, metrics=metrics)
        if step + 1 == a.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if a.step_sleep:
            time.sleep(a.step_sleep)
    mgr.save(a.total, state, metrics=metrics)
    mgr.close()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.out)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
