"""CUDA-resident state: async snapshots through pinned buffers, exact restore of GPU RNGs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from modelver import CheckpointManager, load_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cuda_state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.Dropout(0.2), nn.Linear(256, 8)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return {"model": model, "optimizer": opt}


def step(state: dict) -> None:
    x = torch.randn(32, 64, device="cuda")
    loss = state["model"](x).square().mean()
    state["optimizer"].zero_grad()
    loss.backward()
    state["optimizer"].step()


def test_async_snapshot_of_cuda_state_is_isolated_and_exact(tmp_path: Path) -> None:
    state = cuda_state(0)
    step(state)
    expected = {k: v.detach().cpu().clone() for k, v in state["model"].state_dict().items()}
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, state)
    step(state)  # GPU work continues right away and changes every weight
    mgr.close()
    ck = load_checkpoint(tmp_path)
    for k, v in expected.items():
        assert torch.equal(ck.state["model"][k], v)


def test_resume_on_gpu_is_bit_identical(tmp_path: Path) -> None:
    ref = cuda_state(0)
    for _ in range(6):
        step(ref)
    run = cuda_state(0)
    mgr = CheckpointManager(tmp_path, async_save=True)
    for _ in range(3):
        step(run)
    mgr.save(3, run)
    mgr.close()
    resumed = cuda_state(1)
    assert CheckpointManager(tmp_path).restore(resumed) == 3
    for _ in range(3):
        step(resumed)
    for (k, a), b in zip(ref["model"].state_dict().items(), resumed["model"].state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
