"""Blocking time of saving a >= 4 GiB CUDA-resident model + AdamW state (needs a GPU).

    python benchmarks/gpu_async_save.py [--gib 4.2] [--runs 3] [--dir DIR] [--json OUT]

Measured in one run on the same state and disk:
  pinned copy      device-to-host copy of the same bytes into reused pinned buffers (the floor)
  modelver async   CheckpointManager(async_save=True).save(): blocked time and time to commit
  modelver sync    CheckpointManager().save()
  torch.save       torch.save(state_dict) + fsync
  dcp.async_save   torch.distributed.checkpoint.async_save: blocked time and time to finish
The first save of each method (allocations, pinned pools) is reported apart from the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from modelver import CheckpointManager


def build(gib: float) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    width = 4096
    layers = max(1, round(gib * (1 << 30) / 12 / (width * width)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(8, width, device="cuda")).square().mean().backward()
    opt.step()
    torch.cuda.synchronize()
    n = sum(p.numel() for p in model.parameters()) * 12
    return model, opt, n


def fsync_tree(path: Path) -> None:
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    model, opt, nbytes = build(a.gib)
    state = {"model": model, "optimizer": opt}
    work = Path(tempfile.mkdtemp(prefix="mv-gpu-", dir=a.dir))
    results: dict[str, dict[str, float | list[float]]] = {}

    def record(name: str, first: tuple[float, float], rest: list[tuple[float, float]]) -> None:
        results[name] = {
            "first_blocking_s": first[0],
            "first_total_s": first[1],
            "blocking_s": statistics.median(b for b, _ in rest),
            "total_s": statistics.median(t for _, t in rest),
            "runs_blocking_s": [b for b, _ in rest],
        }

    def measure(name: str, fn: Callable[[int], tuple[float, float]]) -> None:
        first = fn(0)
        record(name, first, [fn(i + 1) for i in range(a.runs)])
        print(name, results[name], flush=True)

    # floor: pinned device-to-host copy into reused buffers
    tensors = list(model.state_dict().values()) + [
        v for st in opt.state.values() for v in st.values() if v.dim() > 0
    ]
    t0 = time.perf_counter()
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    pin_alloc = time.perf_counter() - t0

    def pinned_copy(_: int) -> tuple[float, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for dst, src in zip(pinned, tensors, strict=True):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return dt, dt

    measure("pinned copy", pinned_copy)
    pinned.clear()

    mgr = CheckpointManager(work / "mv-async", async_save=True, keep_last=1)

    def mv_async(i: int) -> tuple[float, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        mgr.save(i + 1, state)
        blocked = time.perf_counter() - t0
        mgr.wait()
        return blocked, time.perf_counter() - t0

    measure("modelver async", mv_async)
    mgr.close()
    shutil.rmtree(work / "mv-async")

    sync_mgr = CheckpointManager(work / "mv-sync", keep_last=1)

    def mv_sync(i: int) -> tuple[float, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sync_mgr.save(i + 1, state)
        dt = time.perf_counter() - t0
        return dt, dt

    measure("modelver sync", mv_sync)
    sync_mgr.close()
    shutil.rmtree(work / "mv-sync")

    def torch_save(i: int) -> tuple[float, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        path = work / "torch.pt"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        fsync_tree(path)
        dt = time.perf_counter() - t0
        return dt, dt

    measure("torch.save", torch_save)
    (work / "torch.pt").unlink()

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)

    def dcp_async(i: int) -> tuple[float, float]:
        torch.cuda.synchronize()
        target = work / f"dcp-{i}"
        t0 = time.perf_counter()
        fut = dcp.async_save({"model": model.state_dict(), "optimizer": opt.state_dict()},
                             checkpoint_id=str(target))
        blocked = time.perf_counter() - t0
        fut.result()
        fsync_tree(target)
        total = time.perf_counter() - t0
        shutil.rmtree(target)
        return blocked, total

    measure("dcp.async_save", dcp_async)
    dist.destroy_process_group()
    shutil.rmtree(work, ignore_errors=True)

    gib = nbytes / (1 << 30)
    floor = float(results["pinned copy"]["blocking_s"])  # type: ignore[arg-type]
    print(f"\ndevice: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"state {gib:.2f} GiB, median of {a.runs} runs after one warm-up; "
          f"pinned allocation {pin_alloc:.2f} s")
    print(f"{'method':16} {'blocked s':>10} {'x pinned':>9} {'total s':>9} {'GB/s':>6} "
          f"{'1st blocked s':>14}")
    for name, r in results.items():
        b, t = float(r["blocking_s"]), float(r["total_s"])  # type: ignore[arg-type]
        print(f"{name:16} {b:10.3f} {b / floor:9.1f} {t:9.2f} {nbytes / t / 1e9:6.2f} "
              f"{float(r['first_blocking_s']):14.3f}")  # type: ignore[arg-type]
    if a.json:
        a.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "bytes": nbytes,
                                      "pin_alloc_s": pin_alloc, "results": results}, indent=1))


if __name__ == "__main__":
    main()
