"""Save and restore a >= 1 GiB training state (model + AdamW moments) against the baselines.

    python benchmarks/save_load.py [--gib 1.1] [--runs 3] [--dir DIR]

Baselines, all on the same state and all fsync'd before the clock stops; every method writes
new files at each save and then deletes the previous ones (modelver: keep_last=1), untimed, and
each timed save starts after os.sync() and a 1 s pause (the async save, and a plain copy of the
same bytes into reused buffers, also after one training step, as in training):
  raw       one file holding the same tensor bytes (the physical limit of the disk)
  torch     torch.save({"model": sd, "optimizer": osd})
  hf        Hugging Face Trainer layout: model.safetensors (save_file) + optimizer.pt (torch.save)
Restores are measured hot (files in the page cache) and cold (pages dropped with
posix_fadvise(DONTNEED) before each run). Medians over --runs, printed as ratios to raw.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modelver import CheckpointManager, restore_checkpoint


def build_state(gib: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    # params p, AdamW adds 2p of moments: total bytes = 12 p
    width = 4096
    layers = max(1, round(gib * (1 << 30) / 12 / (width * width)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(torch.randn(2, width)).square().mean()
    loss.backward()
    opt.step()
    return model, opt


def tensors_of(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(model.state_dict().values())
    for st in opt.state_dict()["state"].values():
        out += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return out


def fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def drop_cache(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def raw_write(tensors: list[torch.Tensor], path: Path) -> None:
    with open(path, "wb", buffering=0) as f:
        for t in tensors:
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            while view.nbytes:  # 1 MiB per call: the fastest pattern measured on this disk
                view = view[f.write(view[: 1 << 20]) :]
        os.fsync(f.fileno())


def raw_read(path: Path, total: int) -> None:
    buf = torch.empty(total, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(path, "rb", buffering=0) as f:
        while view.nbytes:
            n = f.readinto(view)
            if not n:
                break
            view = view[n:]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, opt = build_state(a.gib)
    tensors = tensors_of(model, opt)
    total = sum(t.numel() * t.element_size() for t in tensors)
    work = Path(tempfile.mkdtemp(prefix="mv-bench-", dir=a.dir))
    state = {"model": model, "optimizer": opt}
    paths = {
        "raw": work / "raw-init.bin",
        "torch": work / "torch-init.pt",
        "hf": work / "hf-init",
        "modelver": work / "mv",
    }
    counter = itertools.count()

    def rotating(name: str, write: Callable[[Path], None]) -> Callable[[], None]:
        """Each save goes to new files and then deletes the previous ones, as checkpointing
        does (and as modelver's keep_last=1 does): new files cost more than overwriting one."""

        def save() -> None:
            new = work / f"{name}-{next(counter)}{paths[name].suffix}"
            write(new)
            old, paths[name] = paths[name], new
            cleanup.append(old)

        return save

    cleanup: list[Path] = []

    def settle() -> None:
        """Start every timed save on a quiet disk: the previous method's deletes and writeback
        otherwise land on whoever comes next (this shared disk varied 1x-2x without it)."""
        os.sync()
        time.sleep(1.0)

    def tidy() -> None:
        """Delete what the last save replaced, outside the timed section (modelver deletes in
        the background, so every method is timed without its deletion)."""
        mgr.wait()
        for old in cleanup:
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        cleanup.clear()

    def write_hf(path: Path) -> None:
        path.mkdir()
        save_file(model.state_dict(), path / "model.safetensors")
        torch.save(opt.state_dict(), path / "optimizer.pt")
        fsync_tree(path)

    def write_torch(path: Path) -> None:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        fsync_tree(path)

    mgr = CheckpointManager(paths["modelver"], keep_last=1)
    amgr = CheckpointManager(work / "mv-async", keep_last=1, async_save=True)
    step = [0]

    def save_mv() -> None:
        step[0] += 1
        mgr.save(step[0], state)

    width = model[0].in_features

    def train_step() -> None:
        """What precedes a save in training: an optimizer step (the CPU busy, not idle)."""
        loss = model(torch.randn(2, width)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def save_mv_async() -> None:
        step[0] += 1
        train_step()
        t0 = time.perf_counter()
        amgr.save(step[0], state)
        blocked.append(time.perf_counter() - t0)
        amgr.wait()

    blocked: list[float] = []
    copied: list[float] = []  # after a training step
    idle_copied: list[float] = []  # right after the idle pause

    savers: dict[str, Callable[[], None]] = {
        "raw": rotating("raw", lambda p: raw_write(tensors, p)),
        "torch": rotating("torch", write_torch),
        "hf": rotating("hf", write_hf),
        "modelver": save_mv,
    }

    def load_torch() -> None:
        sd = torch.load(paths["torch"], weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])

    def load_hf() -> None:
        model.load_state_dict(load_file(paths["hf"] / "model.safetensors"))
        opt.load_state_dict(torch.load(paths["hf"] / "optimizer.pt", weights_only=True))

    loaders: dict[str, Callable[[], None]] = {
        "raw": lambda: raw_read(paths["raw"], total),
        "torch": load_torch,
        "hf": load_hf,
        "modelver": lambda: restore_checkpoint(paths["modelver"], state),
    }
    save_t: dict[str, list[float]] = {k: [] for k in savers}
    hot_t: dict[str, list[float]] = {k: [] for k in savers}
    cold_t: dict[str, list[float]] = {k: [] for k in savers}
    try:
        names = list(savers)
        for r in range(a.runs):
            for name in names[r % 4 :] + names[: r % 4]:  # rotated: no method always goes first
                settle()
                save_t[name].append(timed(savers[name]))
                tidy()
            for name, fn in loaders.items():
                fn()  # warm the page cache and allocator
                hot_t[name].append(timed(fn))
            for name, fn in loaders.items():
                drop_cache(paths[name])
                cold_t[name].append(timed(fn))
        save_mv_async()  # one warm-up of the reused host buffers, not counted
        blocked.clear()
        for _ in range(a.runs):
            settle()  # as before every synchronous save: the last save's writeback is done
            save_mv_async()  # then one training step (a 1 s idle CPU copies ~2x slower here)
        # the floor for an isolated snapshot: the same bytes copied into reused buffers, after
        # the same settle and training step
        buffers = [torch.empty_like(t) for t in tensors]
        for run in range(2 * a.runs + 1):
            settle()
            if run % 2:
                train_step()
            t0 = time.perf_counter()
            for buf, t in zip(buffers, tensors, strict=True):
                buf.copy_(t)
            (copied if run % 2 else idle_copied).append(time.perf_counter() - t0)
        del idle_copied[0], buffers  # the first copy also faults the pages in
    finally:
        mgr.close()
        amgr.close()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: {n: statistics.median(v) for n, v in d.items()}
           for k, d in (("save", save_t), ("hot", hot_t), ("cold", cold_t))}
    print(f"state: {total / (1 << 30):.2f} GiB ({len(tensors)} tensors), median of {a.runs} runs, "
          f"torch {torch.__version__}, {os.cpu_count()} cores")
    print(f"{'':10} {'save s':>8} {'x raw':>6} {'restore hot s':>14} {'x raw':>6} "
          f"{'restore cold s':>15} {'x raw':>6}")
    for name in savers:
        s, h, c = med["save"][name], med["hot"][name], med["cold"][name]
        print(f"{name:10} {s:8.2f} {s / med['save']['raw']:6.2f} {h:14.2f} "
              f"{h / med['hot']['raw']:6.2f} {c:15.2f} {c / med['cold']['raw']:6.2f}")
    b = statistics.median(blocked)
    c = statistics.median(copied)
    print(f"async save: training blocked {b:.3f} s = {b / med['save']['modelver']:.1%} of a "
          f"synchronous modelver save ({med['save']['modelver']:.2f} s); first run excluded; "
          f"{b / c:.2f}x a plain copy of the same bytes into reused buffers ({c:.3f} s; "
          f"{statistics.median(idle_copied):.3f} s with no training step after the idle pause)")


if __name__ == "__main__":
    main()
