"""CUDA-resident state: async snapshots through pinned buffers, exact restore of GPU RNGs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from modelver import CheckpointManager, load_checkpoint
from modelver.checkpoint import format as fmt

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


def test_async_delta_checkpoints_of_cuda_state_are_bit_exact(tmp_path: Path) -> None:
    """Delta encoding reads the pinned snapshot, not the live CUDA tensors: every checkpoint of a
    chain (and a resume from the middle of it) equals a plain checkpoint of the same state."""
    state = cuda_state(0)
    delta = CheckpointManager(tmp_path / "delta", keep_last=None, async_save=True,
                              delta_full_every=3)
    plain = CheckpointManager(tmp_path / "plain", keep_last=None)
    for i in range(1, 6):
        for _ in range(4):
            step(state)
        delta.save(i, state)
        plain.save(i, state)
        step(state)  # changes every weight while the async save may still be encoding
    delta.close()
    plain.close()
    stored = sorted(p.name for p in (tmp_path / "delta").rglob("*.safetensors.delta"))
    assert stored, "no checkpoint was delta-encoded"
    for i in range(1, 6):
        d = load_checkpoint(tmp_path / "delta" / fmt.step_dirname(i)).state
        p = load_checkpoint(tmp_path / "plain" / fmt.step_dirname(i)).state
        for k, v in p["model"].items():
            assert v.view(-1).view(torch.uint8).equal(d["model"][k].view(-1).view(torch.uint8)), k
    resumed = cuda_state(1)
    mid = CheckpointManager(tmp_path / "delta", keep_last=None)
    assert mid.restore(resumed, step=5) == 5
    want = load_checkpoint(tmp_path / "plain" / fmt.step_dirname(5)).state["model"]
    for k, v in resumed["model"].state_dict().items():
        assert v.is_cuda and torch.equal(v.cpu(), want[k]), k
