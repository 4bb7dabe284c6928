"""modelver: training runs that cannot be lost, model versions on Git + DVC.

The checkpoint API is imported lazily so ``import modelver`` (and ``modelver --help``) does not
pay for torch until a checkpoint name is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelver._version import __version__
from modelver.checkpoint import hooks as _hooks

if TYPE_CHECKING:
    from modelver.checkpoint import (
        CheckpointInfo,
        CheckpointManager,
        LoadedCheckpoint,
        ResumableSampler,
        latest_checkpoint,
        list_checkpoints,
        load_checkpoint,
        restore_checkpoint,
        verify_checkpoint,
    )

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "LoadedCheckpoint",
    "ResumableSampler",
    "__version__",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_checkpoint",
    "verify_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name in __all__ and name != "__version__":
        from modelver import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'modelver' has no attribute {name!r}")


# What the checkpoint manager's ``push`` and ``dvc_hashes`` options do after each commit, and
# whether ``keep_runs`` may remove a run: the core names them, this package provides them
# (modelver.checkpoint.hooks), each loaded on use.
def _push_hook(root: Path, target: Any) -> _hooks.CommitHook:
    from modelver.publish import Publisher

    return Publisher(root, target)


def _dvc_hashes_hook(root: Path, value: Any) -> _hooks.CommitHook:
    from modelver.storage.dvcstate import DvcHashState

    return DvcHashState(root, value)


def _saved_elsewhere(path: Path) -> bool:
    from modelver.storage.dvcstate import saved_elsewhere

    return saved_elsewhere(path)


def _node_tier(root: Path, target: Any, run: str) -> _hooks.NodeTier:
    from modelver.nodelocal import RemoteTier

    return RemoteTier(root, target, run)


_hooks.provide("push", _push_hook)
_hooks.provide_tier(_node_tier)
_hooks.provide("dvc_hashes", _dvc_hashes_hook)
_hooks.provide_answer("saved_elsewhere", _saved_elsewhere)
