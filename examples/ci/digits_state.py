"""`modelver check --model examples/ci/digits_state.py:build_state`: the digits demo's state.

Builds what examples/digits/train.py restores into (model, optimizer, scheduler, sampler)
from params.yaml and data/, so the CI gate proves a candidate checkpoint resumes in the
real training code, not just that its bytes are intact. Run from the repository root.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "digits"))

import torch
from common import load_params, load_split, make_model
from torch.utils.data import TensorDataset
from train import make_scheduler

from modelver import ResumableSampler


def build_state() -> dict[str, Any]:
    p = load_params("train")
    x, y = load_split("train")
    model = make_model(hidden=p["hidden"], dropout=p["dropout"])
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    return {
        "model": model,
        "optimizer": opt,
        "scheduler": make_scheduler(opt, p),
        "data": ResumableSampler(TensorDataset(x, y), shuffle=True, seed=p["seed"]),
    }
