"""Time the training loop is blocked per save, and bytes on disk: modelver against
``accelerator.save_state``, one process, the same model, AdamW and scheduler state.

    python benchmarks/accelerate_save.py [--mib 48] [--saves 5] [--dir DIR]

One Accelerator prepares the model, optimizer and scheduler. ``accelerator.save_state`` (sync;
Accelerate has no async save) writes into a new ``checkpoint_N`` folder each time
(``model.safetensors`` + pickled ``optimizer.bin``, ``scheduler.bin``, ``random_states_0.pkl``),
without fsync; ``save_state + fsync`` adds an fsync of its files and folder (the durability
modelver's commit has). Then :func:`~modelver.integrations.accelerate.checkpoint_state` attaches
modelver to the same objects and ``CheckpointManager`` saves them (atomic, fdatasync'd,
verified-on-read), synchronously and with ``async_save=True`` (blocked = the time ``save``
takes to return; the write goes on beside the next training steps). Every save follows one
training step and an ``os.sync()`` + 1 s pause; the previous checkpoint is deleted, untimed.
Medians over --saves; one line per method.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import accelerate
import torch
from accelerate import Accelerator
from save_table import dir_bytes, print_saves
from torch import nn

from modelver import CheckpointManager
from modelver.integrations.accelerate import checkpoint_state


def fsync_tree(path: Path) -> None:
    """What modelver's commit does and save_state does not: the bytes on disk before return."""
    for f in [p for p in path.rglob("*") if p.is_file()] + [path]:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mib", type=float, default=48.0, help="model + AdamW moments, MiB")
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    width = 1024
    layers = max(1, round(a.mib * (1 << 20) / 12 / (width * width)))  # 4 B param + 8 B moments
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width),
                                                                nn.Dropout(0.1))])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    accelerator = Accelerator(cpu=True)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    work = Path(tempfile.mkdtemp(prefix="mv-bench-acc-", dir=a.dir))

    def train_step() -> None:
        loss = model(torch.randn(4, width)).square().mean()
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        sched.step()

    def measure(save: Callable[[int], Path], after: Callable[[], object]) -> tuple[float, int]:
        """Median blocked seconds and the bytes of the last checkpoint."""
        blocked, last = [], None
        for i in range(a.saves + 1):  # the first one warms up (buffers, page faults)
            train_step()
            os.sync()
            time.sleep(1.0)
            t0 = time.perf_counter()
            path = save(i + 1)
            blocked.append(time.perf_counter() - t0)
            after()
            if last is not None and last != path:  # modelver's keep_last=1 removed it already
                shutil.rmtree(last, ignore_errors=True)
            last = path
        assert last is not None
        return statistics.median(blocked[1:]), dir_bytes(last)

    results: dict[str, tuple[float, int]] = {}
    try:
        own = work / "accelerate"
        results["accelerator.save_state"] = measure(
            lambda i: Path(accelerator.save_state(str(own / f"checkpoint_{i}"))), lambda: None
        )
        durable = work / "accelerate-fsync"

        def save_state_fsynced(i: int) -> Path:
            path = Path(accelerator.save_state(str(durable / f"checkpoint_{i}")))
            fsync_tree(path)
            return path

        results["save_state + fsync"] = measure(save_state_fsynced, lambda: None)
        state = checkpoint_state(accelerator, model=model, optimizer=opt, scheduler=sched)
        for name, async_save in (("modelver", False), ("modelver async_save", True)):
            mgr = CheckpointManager(work / name.replace(" ", "-"), keep_last=1,
                                    async_save=async_save)

            def save(i: int, mgr: CheckpointManager = mgr) -> Path:
                mgr.save(i, state)
                return mgr.root / f"step-{i:08d}"

            results[name] = measure(save, mgr.wait)
            mgr.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    total = sum(t.numel() * t.element_size() for t in model.parameters()) * 3
    print(f"state: {total / (1 << 20):.1f} MiB (model + AdamW moments), median of {a.saves} "
          f"saves, torch {torch.__version__}, accelerate {accelerate.__version__}, "
          f"{os.cpu_count()} cores")
    print_saves(results, base="accelerator.save_state")


if __name__ == "__main__":
    main()
