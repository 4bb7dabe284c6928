"""Cold restore of one saved state, for paired A/B runs of two checkouts of modelver.

    python benchmarks/restore_cold.py DIR save            # once: a 1.1 GiB model + AdamW state
    python benchmarks/restore_cold.py DIR load            # prints the restore's seconds
    PYTHONPATH=OTHER_CHECKOUT python benchmarks/restore_cold.py DIR load   # the same, other code

Before each timed restore the checkpoint's pages are dropped from the page cache
(``posix_fadvise(DONTNEED)`` after an fsync), so every run reads from disk. Alternate the two
``load`` commands several times and compare pair by pair: the disk's speed drifts between runs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from modelver import CheckpointManager, restore_checkpoint

WIDTH, LAYERS = 4096, 6  # 6 x 16.8 M parameters, x 12 bytes with AdamW's moments: 1.13 GiB


def main() -> None:
    root, what = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, WIDTH)).sum().backward()
    opt.step()
    state = {"model": model, "optimizer": opt}
    if what == "save":
        with CheckpointManager(root, keep_last=1) as mgr:
            mgr.save(1, state)
        return
    step = root / "step-00000001"
    for f in step.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    t0 = time.perf_counter()
    restore_checkpoint(step, state)
    print(f"{time.perf_counter() - t0:.3f}")


if __name__ == "__main__":
    main()
