"""Distributed training scripts run under torchrun by tests/test_distributed.py (gloo, CPU).

    torchrun ... ddp_train_script.py train CKPT OUT TOTAL [--every K] [--graceful] [--die-at S]
        [--fsdp] [--async-save] [--node-local REMOTE --job NAME]
    torchrun ... ddp_train_script.py shard-save CKPT FULL_OUT
    torchrun ... ddp_train_script.py shard-load CKPT FULL_OUT

``train``: DDP with dropout, torch.randn, random, numpy.random, AdamW, a scheduler and a
rank-aware ResumableSampler; every rank's RNGs are seeded differently. Rank 0 writes the final
weights. ``shard-save``/``shard-load``: an FSDP2 (``fully_shard``) model and AdamW saved with one
world size and restored with another; rank 0 writes the full (gathered) state as safetensors.
``--fsdp``: the model is ``fully_shard``-ed instead of DDP-wrapped. ``--node-local REMOTE``:
each rank's CKPT is its own (``{rank}`` in CKPT is replaced), shared only through the DVC
remote REMOTE of the working directory's repository.
``--cuda``: NCCL and one GPU per rank (for the device checks); gloo on the CPU otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from modelver import CheckpointManager, ResumableSampler


def train(a: argparse.Namespace) -> None:
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(123)
    x = torch.randn(203, 16, generator=g)
    y = (x.sum(1) > 0).long()
    ds = TensorDataset(x, y)
    sampler = ResumableSampler(ds, shuffle=True, seed=7)  # shards by rank on its own
    loader = DataLoader(ds, batch_size=8, sampler=sampler)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, a.hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(a.hidden, 2)
    ).to(a.device)
    if a.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        ddp = fully_shard(model, mesh=init_device_mesh(a.device, (dist.get_world_size(),)))
    else:
        ddp = DistributedDataParallel(model)
    random.seed(rank)
    np.random.seed(rank)
    torch.manual_seed(100 + rank)  # dropout masks and noise differ per rank
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=a.total)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "data": sampler}
    node = {"node_local": True, "push": a.node_local, "run": a.job} if a.node_local else {}
    mgr = CheckpointManager(
        a.ckpt.replace("{rank}", str(rank)), every_steps=a.every, keep_last=a.keep,
        handle_signals=a.graceful, delta_full_every=a.delta or None, async_save=a.async_save,
        **node,
    )
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
        xb, yb = xb.to(a.device), yb.to(a.device)
        noise = torch.randn_like(xb) * 0.01 * random.random() * float(np.random.rand())
        loss = nn.functional.cross_entropy(ddp(xb + noise), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        metrics = {"loss": loss.item()}
        mgr.maybe_save(step + 1, state, metrics=metrics)
        if step + 1 == a.die_at and rank == a.die_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if a.step_sleep:
            time.sleep(a.step_sleep)
    mgr.save(a.total, state, metrics=metrics)
    mgr.close()
    full = full_state(state)  # a collective under FSDP
    if rank == 0:
        save_file({k: v for k, v in full.items() if k.startswith("model/")}, a.out)
    print(f"DONE rank {rank}", flush=True)


def sharded_state(hidden: int, device: str) -> dict[str, object]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (dist.get_world_size(),))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 5)).to(device)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return {"model": model, "optimizer": opt}


def full_state(state: dict[str, object]) -> dict[str, torch.Tensor]:
    """Every tensor of the state gathered to its full shape (a collective)."""
    from torch.distributed.tensor import DTensor

    out = {}
    model, opt = state["model"], state["optimizer"]
    assert isinstance(model, nn.Module) and isinstance(opt, torch.optim.Optimizer)
    for k, v in model.state_dict().items():
        out[f"model/{k}"] = v.full_tensor() if isinstance(v, DTensor) else v
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"optimizer/{pid}/{k}"] = v.full_tensor() if isinstance(v, DTensor) else v
    return {k: v.detach().cpu().clone().contiguous() for k, v in out.items()}


def shard_save(a: argparse.Namespace) -> None:
    state = sharded_state(a.hidden, a.device)
    model, opt = state["model"], state["optimizer"]
    assert isinstance(model, nn.Module) and isinstance(opt, torch.optim.Optimizer)
    torch.manual_seed(1)
    for _ in range(3):
        loss = model(torch.randn(4, 16).to(a.device)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    CheckpointManager(a.ckpt, keep_last=None).save(3, state, metrics={"loss": loss.item()})
    full = full_state(state)
    if dist.get_rank() == 0:
        save_file(full, a.out)


def shard_load(a: argparse.Namespace) -> None:
    state = sharded_state(a.hidden, a.device)
    start = CheckpointManager(a.ckpt, keep_last=None).restore(state)
    full = full_state(state)
    if dist.get_rank() == 0:
        print(f"RESTORED {start}", flush=True)
        save_file(full, a.out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "shard-save", "shard-load"])
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("total", type=int, nargs="?", default=0)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--graceful", action="store_true", help="handle SIGTERM")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--die-at", type=int, default=-1, help="SIGKILL one rank after this step")
    p.add_argument("--die-rank", type=int, default=1)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--delta", type=int, default=0, help="delta_full_every (0: plain)")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--node-local", default="", help="a DVC remote: per-rank CKPT directories")
    p.add_argument("--job", default="job", help="the run name")
    a = p.parse_args()
    torch.set_num_threads(1)
    a.device = "cpu"
    if a.cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        a.device = "cuda"
    dist.init_process_group("nccl" if a.cuda else "gloo")
    {"train": train, "shard-save": shard_save, "shard-load": shard_load}[a.mode](a)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
