"""Save and restore states of many small tensors (the shapes of mixture-of-experts models), the
counterpart of save_load.py, whose state is a few large tensors.

    python benchmarks/many_tensors.py [--shape bare|modules|both] [--runs 3] [--dir DIR]

Shapes:
  bare     20,000 top-level 64-element float32 tensors (each its own component)
  modules  a ModuleList of 10,000 Linear(8, 8) with AdamW after one step (60,000 tensors)
Methods, all fsync'd before the clock stops, each save into a new directory after os.sync(),
gc.collect() and a 0.5 s pause:
  modelver      CheckpointManager.save / restore_checkpoint into the live objects
  torch         torch.save of the state dict(s) / torch.load, then load_state_dict (or copy_)
  safetensors   save_file / load_file, then copy_ (bare only: it holds no optimizer state)
Medians over --runs; printed per tensor and as ratios to torch and to safetensors (x st).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modelver import CheckpointManager, restore_checkpoint


def bare_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(64, generator=g) for i in range(20_000)}


def modules_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Linear(8, 8) for _ in range(10_000)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(layer(torch.randn(2, 8)).sum() for layer in model).backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def count(state: dict[str, Any]) -> int:
    if "model" not in state:
        return len(state)
    n = len(state["model"].state_dict())
    return n + sum(len(s) - 1 for s in state["optimizer"].state_dict()["state"].values())


def fsync_tree(path: Path) -> None:
    for f in [path] if path.is_file() else [*path.rglob("*"), path]:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def timed(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        os.sync()
        gc.collect()  # each method from a clean heap, not paying for the previous one's garbage
        time.sleep(0.5)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def methods(state: dict[str, Any], work: Path) -> dict[str, tuple[Callable[[], object],
                                                                  Callable[[], object]]]:
    """name -> (save, restore); each save writes a new directory, each restore reads the last."""
    counter = iter(range(1, 1 << 30))
    mgr = CheckpointManager(work / "modelver", keep_last=1)
    last: dict[str, Path] = {}

    def mv_save() -> None:
        info = mgr.save(next(counter), state)
        assert info is not None
        last["modelver"] = info.path

    def mv_restore() -> None:
        restore_checkpoint(last["modelver"], state, restore_rngs=False)

    def torch_save() -> None:
        path = work / f"torch-{next(counter)}.pt"
        plain = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
        torch.save(plain, path)
        fsync_tree(path)
        if "torch" in last:
            last["torch"].unlink()
        last["torch"] = path

    def torch_restore() -> None:
        loaded = torch.load(last["torch"])
        for k, v in state.items():
            if hasattr(v, "load_state_dict"):
                v.load_state_dict(loaded[k])
            else:
                v.copy_(loaded[k])

    out = {"modelver": (mv_save, mv_restore), "torch": (torch_save, torch_restore)}
    if "model" not in state:
        def st_save() -> None:
            path = work / f"st-{next(counter)}.safetensors"
            save_file(state, path)
            fsync_tree(path)
            if "safetensors" in last:
                last["safetensors"].unlink()
            last["safetensors"] = path

        def st_restore() -> None:
            for k, v in load_file(last["safetensors"]).items():
                state[k].copy_(v)

        out["safetensors"] = (st_save, st_restore)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", choices=["bare", "modules", "both"], default="both")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    shapes = ["bare", "modules"] if a.shape == "both" else [a.shape]
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, median of {a.runs}")
    for shape in shapes:
        state = bare_state() if shape == "bare" else modules_state()
        n = count(state)
        work = Path(tempfile.mkdtemp(prefix="mv-bench-many-", dir=a.dir))
        try:
            results = {}
            for name, (save, restore) in methods(state, work).items():
                save()  # warm-up, and a checkpoint to restore from
                results[name] = (timed(save, a.runs), timed(restore, a.runs))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"\n{shape}: {n:,} tensors")
        print(f"{'':12} {'save s':>8} {'µs/tensor':>10} {'x torch':>8} {'x st':>6} "
              f"{'restore s':>10} {'µs/tensor':>10} {'x torch':>8} {'x st':>6}")
        for name, (s, r) in results.items():
            print(f"{name:12} {s:8.3f} {s / n * 1e6:10.1f} {ratios(s, results, 0)} "
                  f"{r:10.3f} {r / n * 1e6:10.1f} {ratios(r, results, 1)}")


def ratios(seconds: float, results: dict[str, tuple[float, float]], which: int) -> str:
    """``x torch`` and ``x st`` columns: the goal is read off them (st: bare shape only)."""
    st = results.get("safetensors")
    x_st = f"{seconds / st[which]:6.2f}" if st else f"{'-':>6}"
    return f"{seconds / results['torch'][which]:8.2f} {x_st}"


if __name__ == "__main__":
    main()
