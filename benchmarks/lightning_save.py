"""Time the training loop is blocked per save, and bytes on disk: ModelverCheckpoint against
Lightning's own ModelCheckpoint, one process, the same model, AdamW and scheduler state.

    python benchmarks/lightning_save.py [--mib 48] [--saves 5] [--dir DIR]

Each method trains ``--saves`` + 1 steps with a save after every step (the first one, a warm-up,
is not counted). Blocked = the time the checkpoint callback's ``on_train_batch_end`` takes (where
both build Lightning's checkpoint dict and save it). Lightning's ``ModelCheckpoint`` writes a
``.ckpt`` pickle with ``torch.save`` (no fsync), with ``AsyncCheckpointIO`` from a thread;
``ModelverCheckpoint`` writes an atomic, fdatasync'd modelver checkpoint, synchronously or with
``async_save=True``. Before each save: ``os.sync()`` and a 1 s pause, so one save's writeback does
not land in the next one's time. Medians; one line per method.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import AsyncCheckpointIO
from save_table import dir_bytes, print_saves
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelver import ResumableSampler
from modelver.integrations.lightning import ModelverCheckpoint

WIDTH = 1024


class Wide(pl.LightningModule):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.net = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=10)]


class Settle(pl.Callback):
    def on_train_batch_start(self, *args: Any) -> None:
        os.sync()
        time.sleep(1.0)


def timed(cls: type[ModelCheckpoint], blocked: list[float]) -> type[ModelCheckpoint]:
    class Timed(cls):  # type: ignore[misc, valid-type]
        def on_train_batch_end(self, *args: Any) -> None:
            t0 = time.perf_counter()
            super().on_train_batch_end(*args)
            blocked.append(time.perf_counter() - t0)

    return Timed


def run(work: Path, name: str, layers: int, saves: int) -> tuple[float, int]:
    blocked: list[float] = []
    where = work / name.replace(" ", "-")
    plugins: list[Any] = []
    if name.startswith("ModelCheckpoint"):
        cb: pl.Callback = timed(ModelCheckpoint, blocked)(
            dirpath=where, every_n_train_steps=1, save_top_k=1
        )
        if "async" in name:
            plugins = [AsyncCheckpointIO()]
    else:
        cb = timed(ModelverCheckpoint, blocked)(
            where, every_n_train_steps=1, keep_last=1, async_save="async" in name
        )
    ds = TensorDataset(torch.randn(64, WIDTH))
    loader = DataLoader(ds, batch_size=4, sampler=ResumableSampler(ds))
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=saves + 1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Settle(), cb], plugins=plugins,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer.fit(Wide(layers), loader)
    size = dir_bytes(where)  # the one checkpoint kept (save_top_k=1 / keep_last=1)
    shutil.rmtree(where, ignore_errors=True)
    return statistics.median(blocked[1:]), size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mib", type=float, default=48.0, help="model + AdamW moments, MiB")
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    layers = max(1, round(a.mib * (1 << 20) / 12 / (WIDTH * WIDTH)))  # 4 B param + 8 B moments
    work = Path(tempfile.mkdtemp(prefix="mv-bench-pl-", dir=a.dir))
    methods = ["ModelCheckpoint", "ModelCheckpoint async", "ModelverCheckpoint",
               "ModelverCheckpoint async"]  # fmt: skip
    try:
        results = {name: run(work, name, layers, a.saves) for name in methods}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mib = layers * (WIDTH * WIDTH + WIDTH) * 12 / (1 << 20)
    print(f"state: {mib:.1f} MiB (model + AdamW moments), median of {a.saves} saves, "
          f"torch {torch.__version__}, lightning {pl.__version__}, {os.cpu_count()} cores")
    print_saves(results, base="ModelCheckpoint")


if __name__ == "__main__":
    main()
