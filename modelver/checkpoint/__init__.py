"""Exact, atomic, verified training checkpoints (safetensors + JSON, no pickle)."""

from modelver.checkpoint.catalog import (
    CheckpointInfo,
    LoadedCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_checkpoint,
    verify_checkpoint,
)
from modelver.checkpoint.manager import CheckpointManager
from modelver.checkpoint.retention import RetentionPlan, plan_retention
from modelver.checkpoint.sampler import ResumableSampler

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
