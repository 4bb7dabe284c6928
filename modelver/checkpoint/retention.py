"""Which checkpoints to keep: planned first (so a dry run is free), executed second; the checked
options that say so; and, at start-up, which leftovers of an interrupted save or delete to keep.
"""

from __future__ import annotations

import math
import numbers
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from modelver import untrusted
from modelver.checkpoint import commit
from modelver.checkpoint.catalog import CheckpointInfo
from modelver.errors import InvalidArgumentError

# --- checked options ------------------------------------------------------------------------
# A wrong kind or range fails at construction, not after the first commit (keep_last=-1 used to
# keep only the newest checkpoint, keep_last="3" failed in retention after a save)


def check_count(name: str, value: object, *, minimum: int, none: bool = True) -> int | None:
    """An integer (not a bool) of at least ``minimum``, or None where ``none``."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        expected = f"an integer >= {minimum}" + (" or None" if none else "")
        raise InvalidArgumentError(name, value, expected=expected)
    return int(value)


def check_seconds(name: str, value: object) -> float | None:
    """None, or a finite number of seconds above 0."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or value <= 0
    ):
        raise InvalidArgumentError(name, value, expected="a finite number of seconds > 0 or None")
    return float(value)


def check_flag(name: str, value: object, *, none: bool = False) -> bool | None:
    """``True``/``False`` only (``"false"`` is truthy), or None where ``none``."""
    if value is None and none:
        return None
    if not isinstance(value, bool):
        raise InvalidArgumentError(name, value, expected="True or False" + (" or None" * none))
    return value


def check_policy(
    *, keep_last: object, keep_best: object, monitor: object, mode: object
) -> tuple[int | None, int, str | None, str]:
    """The retention options, checked together (``keep_best`` needs ``monitor``)."""
    last = check_count("keep_last", keep_last, minimum=0)  # None or 0: keep every checkpoint
    best = check_count("keep_best", keep_best, minimum=0, none=False)
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise InvalidArgumentError("monitor", monitor, expected="a metric name or None")
    if mode not in ("min", "max") or not isinstance(mode, str):
        raise InvalidArgumentError("mode", mode, expected="'min' or 'max'")
    if best and monitor is None:
        raise InvalidArgumentError("monitor", monitor, expected="a metric name when keep_best > 0")
    return last, best or 0, monitor, mode


def score(info: CheckpointInfo, monitor: str) -> float | None:
    """The monitored metric if it can rank: NaN, infinities and non-numbers never rank."""
    value = info.metrics.get(monitor)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if untrusted.finite(float(value)) else None


# --- retention ------------------------------------------------------------------------------


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
    bases of every kept delta checkpoint are kept with it. A NaN or infinite score never ranks
    as best, so a diverged step never displaces the real best."""
    keep_last, keep_best, monitor, mode = check_policy(
        keep_last=keep_last, keep_best=keep_best, monitor=monitor, mode=mode
    )
    ordered = sorted(checkpoints, key=lambda c: c.step)
    if not ordered or not keep_last:
        return RetentionPlan(tuple(ordered), ())
    keep = {c.step for c in ordered[-keep_last:]}
    keep.add(ordered[-1].step)
    if keep_best and monitor:
        sign = 1.0 if mode == "min" else -1.0
        scored = [(sign * s, -c.step, c) for c in ordered if (s := score(c, monitor)) is not None]
        scored.sort(key=lambda t: (t[0], t[1]))
        keep.update(c.step for _, _, c in scored[:keep_best])
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

    The ``.retired-`` name tells start-up recovery that this one was meant to go (a ``.trash-``
    one was displaced by a newer save of its step and may have to come back).
    """
    for info in plan.delete:
        trash = commit.retire(info.path)
        if trash is not None:
            remove(trash)
