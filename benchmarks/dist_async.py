"""Training-thread blocking time of an async save under torch.distributed (2 ranks, gloo, CPU).

    torchrun --standalone --nproc-per-node 2 benchmarks/dist_async.py [--gib 0.25] [--saves 5]
        [--dir DIR]

Each rank holds the same DDP model and AdamW moments (``save_load.build_state``); every save
follows one training step, ``os.sync()``, a 1 s pause and a barrier, and is waited for (and
fsync'd) before the next, so each one is timed on its own; the methods take turns, rotated.
Per rank, medians of --saves after one warm-up round:
  plain copy        ``clone()`` of every tensor of the model's and the optimizer's state dicts,
                    on every rank at once (they share the memory bandwidth)
  copy, rank 0 only the same on rank 0 alone, as modelver copies (rank 1 copies nothing)
  reused, rank 0     the same bytes copied into buffers allocated once (no page faults), as
                    modelver's snapshot copies into reused host buffers
  modelver async    ``CheckpointManager(async_save=True).save`` (``last_blocking_seconds``);
                    total = until ``wait()`` returns (committed)
  dcp.async_save    ``torch.distributed.checkpoint.async_save`` of the same state dicts: until
                    it returns; total = until its future is done and its files fsync'd
  modelver sync     ``CheckpointManager().save`` (for context)
Rank 0 writes the replicated files, so it is the rank that copies; the ratio is rank 0's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from save_load import build_state, fsync_tree, tensors_of
from torch.nn.parallel import DistributedDataParallel

from modelver import CheckpointManager


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gib", type=float, default=0.25, help="model + AdamW moments per rank")
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)  # 2 ranks on the cores of one machine
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt = build_state(a.gib)
    ddp = DistributedDataParallel(model)
    width = next(model.parameters()).shape[1]
    shared: list[object] = [str(tempfile.mkdtemp(prefix="mv-bench-dist-", dir=a.dir))
                            if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    work = Path(str(shared[0]))
    state = {"model": model, "optimizer": opt}

    def train_step() -> None:
        loss = ddp(torch.randn(2, width)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def plain_copy(_: int, *, ranks: int = dist.get_world_size()) -> float:
        t0 = time.perf_counter()
        copies = [t.clone() for t in tensors_of(model, opt)] if rank < ranks else []
        blocked = time.perf_counter() - t0  # the state dicts included: every save reads them
        del copies
        return blocked

    buffers = [torch.empty_like(t) for t in tensors_of(model, opt)] if rank == 0 else []

    def reused_copy(_: int) -> float:
        t0 = time.perf_counter()
        for buf, t in zip(buffers, tensors_of(model, opt) if rank == 0 else [], strict=True):
            buf.copy_(t)
        return time.perf_counter() - t0

    amgr = CheckpointManager(work / "mv-async", keep_last=1, async_save=True)
    mgr = CheckpointManager(work / "mv-sync", keep_last=1)

    def mv_async(i: int) -> float:
        amgr.save(i, state)
        return amgr.last_blocking_seconds

    def mv_sync(i: int) -> float:
        mgr.save(i, state)
        return mgr.last_blocking_seconds

    futures: dict[int, Future[None]] = {}

    def dcp_async(i: int) -> float:
        t0 = time.perf_counter()
        futures[i] = dcp.async_save(  # type: ignore[assignment]
            {"model": model.state_dict(), "optimizer": opt.state_dict()},
            checkpoint_id=str(work / f"dcp-{i}"),
        )
        return time.perf_counter() - t0

    def dcp_done(i: int) -> None:
        futures.pop(i).result()
        if rank == 0:
            fsync_tree(work / f"dcp-{i}")
            shutil.rmtree(work / f"dcp-{i - 1}", ignore_errors=True)

    methods: dict[str, tuple[Callable[[int], float], Callable[[int], object]]] = {
        "plain copy": (plain_copy, lambda _: None),
        "copy, rank 0 only": (partial(plain_copy, ranks=1), lambda _: None),
        "reused, rank 0": (reused_copy, lambda _: None),
        "modelver async": (mv_async, lambda _: amgr.wait()),
        "dcp.async_save": (dcp_async, dcp_done),
        "modelver sync": (mv_sync, lambda _: None),
    }
    blocked: dict[str, list[float]] = {k: [] for k in methods}
    total: dict[str, list[float]] = {k: [] for k in methods}
    names = list(methods)
    try:
        for i in range(a.saves + 1):  # the first round warms up (allocations, page faults)
            turn = i % len(names)  # rotated: no method always goes first
            for name in names[turn:] + names[:turn]:
                save, done = methods[name]
                train_step()
                os.sync()  # the previous method's writeback is not the next one's cost
                time.sleep(1.0)
                dist.barrier()
                t0 = time.perf_counter()
                blocked[name].append(save(i + 1))
                done(i + 1)
                total[name].append(time.perf_counter() - t0)
                dist.barrier()
    finally:
        amgr.close()
        mgr.close()
        dist.barrier()
        if rank == 0:
            shutil.rmtree(work, ignore_errors=True)
    results = {k: (statistics.median(blocked[k][1:]), statistics.median(total[k][1:]))
               for k in methods}
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    dist.destroy_process_group()
    if rank != 0:
        return
    per_rank: list[dict[str, tuple[float, float]]] = everyone  # type: ignore[assignment]
    nbytes = sum(t.numel() * t.element_size() for t in tensors_of(model, opt))
    floor = per_rank[0]["plain copy"][0]
    print(f"state: {nbytes / (1 << 20):.0f} MiB per rank (DDP model + AdamW moments), "
          f"{len(per_rank)} ranks (gloo), median of {a.saves} saves after one warm-up, "
          f"torch {torch.__version__}, {os.cpu_count()} cores")
    print(f"{'':17} {'rank 0 blocked s':>17} {'x copy':>7} {'rank 1 blocked s':>17} "
          f"{'rank 0 total s':>15}")
    for name, (b, t) in per_rank[0].items():
        print(f"{name:17} {b:17.3f} {b / floor:7.2f} {per_rank[1][name][0]:17.3f} {t:15.3f}")


if __name__ == "__main__":
    main()
