"""Which checkpoints to keep: planned first (so a dry run is free), executed second."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from modelver.checkpoint.catalog import CheckpointInfo


@dataclass(frozen=True)
class RetentionPlan:
    keep: tuple[CheckpointInfo, ...]
    delete: tuple[CheckpointInfo, ...]


def plan_retention(
    checkpoints: Sequence[CheckpointInfo],
    *,
    keep_last: int | None,
    keep_best: int = 0,
    monitor: str | None = None,
    mode: str = "min",
) -> RetentionPlan:
    """The newest checkpoint is always kept; ``keep_last`` None or 0 keeps everything; the
    bases of every kept delta checkpoint are kept with it."""
    ordered = sorted(checkpoints, key=lambda c: c.step)
    if not ordered or not keep_last:
        return RetentionPlan(tuple(ordered), ())
    keep = {c.step for c in ordered[-keep_last:]}
    keep.add(ordered[-1].step)
    if keep_best and monitor:
        scored = [c for c in ordered if monitor in c.metrics]
        sign = 1.0 if mode == "min" else -1.0
        scored.sort(key=lambda c: (sign * c.metrics[monitor], -c.step))
        keep.update(c.step for c in scored[:keep_best])
    # a kept delta checkpoint keeps its whole base chain
    by_dir = {c.path.name: c for c in ordered}
    todo = [c for c in ordered if c.step in keep]
    while todo:
        for base in todo.pop().bases:
            b = by_dir.get(base)
            if b is not None and b.step not in keep:
                keep.add(b.step)
                todo.append(b)
    return RetentionPlan(
        tuple(c for c in ordered if c.step in keep),
        tuple(c for c in ordered if c.step not in keep),
    )


def execute_retention(
    plan: RetentionPlan, *, remove: Callable[[Path], object] = shutil.rmtree
) -> None:
    """Rename out of sight first, so a crash mid-delete never leaves a half checkpoint visible;
    ``remove`` then deletes the renamed directory (the manager does it off the training thread).
    """
    for info in plan.delete:
        trash = info.path.with_name(f".trash-{info.path.name}-{secrets.token_hex(3)}")
        try:
            os.rename(info.path, trash)
        except FileNotFoundError:
            continue
        remove(trash)
