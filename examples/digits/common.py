"""Shared pieces of the digits demo: the model and the data files written by prepare.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

DATA_DIR = Path("data")
N_FEATURES = 64  # 8x8 images
N_CLASSES = 10


# Params that shape the trajectory: together they name the run (CheckpointManager(run=...)), so
# `dvc exp run -S train.lr=...` starts a run of its own beside the others in checkpoints/ and a
# run with these values again continues where it stopped. `steps` may change within one run.
TRAJECTORY = (
    "seed",
    "batch_size",
    "hidden",
    "dropout",
    "lr",
    "warmup_steps",
    "lr_decay",
    "weight_decay",
)


def run_params(p: dict) -> dict:
    """The run's identity: the train params that shape its trajectory."""
    return {k: p[k] for k in TRAJECTORY}


def load_params(section: str) -> dict:
    """One section of params.yaml (DVC passes params through the file, not the command line)."""
    with open("params.yaml", encoding="utf-8") as f:
        return dict(yaml.safe_load(f)[section])


def load_split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of ``data/<name>.npz`` (plain arrays, loaded without pickle)."""
    with np.load(DATA_DIR / f"{name}.npz", allow_pickle=False) as z:
        x = torch.from_numpy(z["x"].astype(np.float32))
        y = torch.from_numpy(z["y"].astype(np.int64))
    return x, y


def make_model(*, hidden: int, dropout: float) -> nn.Module:
    """A small MLP with dropout: enough for ~97% test accuracy on digits in a few seconds."""
    return nn.Sequential(
        nn.Linear(N_FEATURES, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, N_CLASSES),
    )
