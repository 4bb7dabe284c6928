"""Which checkpoints to keep: planned first (so a dry run is free), executed second; the checked
options that say so; and, at start-up, which leftovers of an interrupted save or delete to keep.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
import secrets
import shutil
import stat
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from modelver import untrusted
from modelver.checkpoint import format as fmt
from modelver.checkpoint.catalog import CheckpointInfo
from modelver.errors import InvalidArgumentError, ModelverError, ModelverWarning

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
        name = f".retired-{info.path.name}-{os.getpid()}-{secrets.token_hex(3)}"
        trash = info.path.with_name(name)
        try:
            os.rename(info.path, trash)
        except FileNotFoundError:  # retired meanwhile (another manager of this process)
            continue
        remove(trash)


# --- start-up recovery ----------------------------------------------------------------------

# .tmp-step-N-<pid>-<hex>: a save being written; .trash-step-N-<pid>-<hex> (<pid>- missing in
# older versions): a checkpoint displaced by a newer save of its step; .retired-…: retention;
# .probe-<pid>-<hex>: the writability probe of a manager's construction
LEFTOVER_RE = re.compile(
    r"^\.(?P<kind>tmp|trash|retired)-(?P<target>step-\d+)-(?:(?P<pid>\d+)-)?[0-9a-f]+$"
    r"|^\.(?P<probe>probe)-(?P<ppid>\d+)-[0-9a-f]+$"
)


def recover_leftovers(root: Path, *, live: Callable[[int], bool]) -> list[str]:
    """Finish or undo what dead writers left; returns the step directories brought back.

    Replacing step N takes two renames (old -> ``.trash-``, new ``.tmp-`` -> ``step-N``). For a
    step without a committed directory, the newest *complete* temporary directory (valid
    manifest of that step, every file with its size) is promoted, else the newest complete
    trash is put back; only then is the rest removed, so a kill never costs both. Leftovers of
    live processes (``live(pid)``) are left alone.
    """
    groups: dict[str, list[tuple[str, Path]]] = {}
    for child in root.iterdir():
        m = LEFTOVER_RE.match(child.name)
        if not m:
            continue
        pid = m.group("pid") or m.group("ppid")
        if pid is not None and live(int(pid)):
            continue
        if m.group("probe"):
            _remove(child)
            continue
        groups.setdefault(m.group("target"), []).append((m.group("kind"), child))
    recovered = []
    for target, leftovers in sorted(groups.items()):
        final = root / target
        committed = _is_dir(final) and (final / fmt.MANIFEST).is_file()
        if untrusted.STEP_DIR_RE.match(target) and not committed:
            order = {"tmp": 0, "trash": 1}
            candidates = sorted(
                (p for kind, p in leftovers if kind in order and _complete(p, target)),
                key=lambda p: (order[p.name[1:].split("-", 1)[0]], -_mtime(p)),
            )
            if candidates and _promote(candidates[0], final):
                recovered.append(target)
                leftovers = [(k, p) for k, p in leftovers if p != candidates[0]]
        for _, path in leftovers:
            _remove(path)
    return recovered


def _complete(path: Path, target: str) -> bool:
    """A real directory whose manifest is valid, names this step, and whose files are all there
    with their sizes (the data was flushed before the manifest was written)."""
    if not _is_dir(path):
        return False
    try:
        manifest = fmt.read_manifest(path)
        return fmt.step_dirname(manifest.step) == target and not fmt.check_sizes(path, manifest)
    except (ModelverError, OSError, ValueError, TypeError, KeyError):
        return False


def _promote(path: Path, final: Path) -> bool:
    try:
        if os.path.lexists(final):  # a step directory without a manifest: never committed
            aside = final.with_name(f".trash-{final.name}-{os.getpid()}-{secrets.token_hex(3)}")
            os.rename(final, aside)
            _remove(aside)
        os.rename(path, final)
        fmt.fsync_path(final.parent)
    except OSError as e:
        warnings.warn(f"could not recover {final.name} from {path.name}: {e}", ModelverWarning,
                      stacklevel=4)
        return False
    warnings.warn(
        f"recovered {final} from {path.name}, left by a process killed while saving",
        ModelverWarning,
        stacklevel=4,
    )
    return True


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _mtime(path: Path) -> float:
    try:
        return (path / fmt.MANIFEST).stat().st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    """Never through a symlink: a planted link is unlinked, its target untouched."""
    if _is_dir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)
