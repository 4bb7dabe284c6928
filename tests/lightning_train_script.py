"""A Lightning run with ModelverCheckpoint, started (and killed) by tests/test_lightning.py.

    python lightning_train_script.py CKPT OUT [--devices N] [--steps S] [--every K]
                                     [--sleep SECONDS] [--kill-in-save ARMED]
                                     [--distributed-sampler]

Dropout, AdamW with a OneCycle schedule stepped per batch, shuffled data through a
ResumableSampler, validation every epoch (its DataLoader draws from the global RNG). With
``--devices 2``: ``strategy="ddp"`` on the CPU (gloo), Lightning's own launcher starting the
second process. ``fit(ckpt_path="last")`` every time: the first start finds no checkpoint.
Rank 0 prints ``START <global step>`` when training starts and writes the final weights to OUT
(safetensors). ``--kill-in-save ARMED``: when the file ARMED exists, it is removed and the
whole job (its process group) is SIGKILLed inside the next save, its files written, its manifest
not (the same command then runs on unharmed: tests arm it between starts).
``--distributed-sampler``: Lightning's default ``use_distributed_sampler=True``, refused.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import modelver.checkpoint.commit as commit
from modelver import ResumableSampler
from modelver.integrations.lightning import ModelverCheckpoint


class Net(pl.LightningModule):
    def __init__(self, total: int, sleep: float, hidden: int = 32) -> None:
        super().__init__()
        self.total, self.sleep = total, sleep
        self.net = nn.Sequential(
            nn.Linear(16, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, 2)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.sleep:
            time.sleep(self.sleep)
        loss = nn.functional.cross_entropy(self.net(x + 0.01 * torch.randn_like(x)), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=self.total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Started(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            print(f"START {trainer.global_step}", flush=True)


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return TensorDataset(x, (x.sum(1) > 0).long())


def kill_in_next_save(armed: Path) -> None:
    """Instrument the commit from outside (production code has no test hooks)."""
    real = commit.seal

    def seal(tmp: Path, final: Path, manifest: Any) -> None:
        if armed.exists():
            armed.unlink()
            os.killpg(os.getpgid(0), signal.SIGKILL)
        real(tmp, final, manifest)

    commit.seal = seal  # type: ignore[assignment]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--kill-in-save", type=Path)
    p.add_argument("--distributed-sampler", action="store_true")  # Lightning's default
    a = p.parse_args()
    if a.kill_in_save is not None:
        kill_in_next_save(a.kill_in_save)
    pl.seed_everything(0, verbose=False)
    train = data(203, 1)
    loader = DataLoader(train, batch_size=8, sampler=ResumableSampler(train, seed=7))
    val = DataLoader(data(40, 2), batch_size=10)
    ckpt = ModelverCheckpoint(a.ckpt, every_n_train_steps=a.every, keep_last=a.keep)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=a.devices,
        strategy="ddp" if a.devices > 1 else "auto",
        use_distributed_sampler=a.distributed_sampler,
        max_steps=a.steps,
        callbacks=[ckpt, Started()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = Net(a.steps, a.sleep)
    trainer.fit(model, loader, val, ckpt_path="last")
    if trainer.is_global_zero:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.out)


if __name__ == "__main__":
    main()
