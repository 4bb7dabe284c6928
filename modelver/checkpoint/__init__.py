"""Exact, atomic, verified training checkpoints (safetensors + JSON, no pickle).

Names load lazily so ``modelver.checkpoint.format`` (manifests only) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelver.checkpoint.catalog import CheckpointInfo, latest_checkpoint, list_checkpoints
    from modelver.checkpoint.manager import CheckpointManager
    from modelver.checkpoint.restore import LoadedCheckpoint, load_checkpoint, restore_checkpoint
    from modelver.checkpoint.retention import RetentionPlan, plan_retention
    from modelver.checkpoint.sampler import ResumableSampler
    from modelver.checkpoint.verify import verify_checkpoint

_WHERE = {
    "CheckpointInfo": "catalog",
    "LoadedCheckpoint": "restore",
    "latest_checkpoint": "catalog",
    "list_checkpoints": "catalog",
    "load_checkpoint": "restore",
    "restore_checkpoint": "restore",
    "verify_checkpoint": "verify",
    "CheckpointManager": "manager",
    "RetentionPlan": "retention",
    "plan_retention": "retention",
    "ResumableSampler": "sampler",
}
__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "LoadedCheckpoint",
    "ResumableSampler",
    "RetentionPlan",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "plan_retention",
    "restore_checkpoint",
    "verify_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        module = importlib.import_module(f"modelver.checkpoint.{_WHERE[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'modelver.checkpoint' has no attribute {name!r}")
