"""How many runs a checkpoints directory keeps (``CheckpointManager(run=..., keep_runs=N)``):
planned first, executed second, as checkpoint retention is.

Runs rank by when they last saved: their newest checkpoint's ``created`` time (to the
microsecond), then its manifest's mtime; ``RUN.json``'s mtime for a run without one. The
current run always counts first, whatever its age. A run beyond the bound leaves the workspace
only when every file of it is stored elsewhere (the DVC cache or remote: the core asks
:func:`modelver.checkpoint.hooks.saved_elsewhere`, False outside DVC); the others stay, named in
a warning, until they are. A run is removed under its lock (never one a live process writes),
renamed to ``.retired-run-…`` first, then deleted; a dead writer's leftover goes at the next
start.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from modelver.checkpoint import commit, hooks
from modelver.checkpoint import format as fmt
from modelver.checkpoint.dirlock import DirLock
from modelver.checkpoint.kept import kept_dir
from modelver.checkpoint.retention import check_count
from modelver.checkpoint.runid import RUN_FILE, list_runs, run_root
from modelver.errors import (
    CheckpointLockedError,
    InvalidArgumentError,
    ModelverError,
    ModelverWarning,
)

# commit.retire's name for a run directory: .retired-run-<id>-<pid>-<hex>
RETIRED_RUN_RE = re.compile(r"^\.retired-run-.+-(?P<pid>\d+)-[0-9a-f]+$")


def check_keep_runs(keep_runs: object, *, run: str | Mapping[str, Any] | None) -> int | None:
    """None (keep every run), or at least 1 (the current run); a bound needs a run."""
    checked = check_count("keep_runs", keep_runs, minimum=1)
    if checked is not None and run is None:
        raise InvalidArgumentError(
            "keep_runs", keep_runs, expected="None without run= (it bounds the runs kept)"
        )
    return checked


@dataclass(frozen=True)
class RunsPlan:
    keep: tuple[str, ...]  # the current run, then the newest others up to the bound
    remove: tuple[str, ...]  # beyond the bound, every file stored elsewhere
    only_here: tuple[str, ...]  # beyond the bound but stored nowhere else: kept


def last_saved(root: Path) -> tuple[float, int]:
    """When the run in ``root`` last saved (a sort key: seconds, then nanoseconds)."""
    newest = max(fmt.iter_checkpoint_dirs(root), default=None)
    if newest is not None:
        manifest = newest[1] / fmt.MANIFEST
        try:
            created = datetime.fromisoformat(fmt.read_manifest(newest[1]).created)
            return created.timestamp(), manifest.stat().st_mtime_ns
        except (ModelverError, ValueError, OSError):  # unreadable: its files' times instead
            pass
    for path in (root / RUN_FILE, root):
        try:
            st = path.stat()
        except OSError:
            continue
        return st.st_mtime, st.st_mtime_ns
    return 0.0, 0


def plan_runs(
    directory: Path,
    *,
    current: str,
    keep_runs: int,
    saved: Callable[[Path], bool] = hooks.saved_elsewhere,
) -> RunsPlan:
    """Which runs of ``directory`` to keep and remove; ``saved`` is asked only about the runs
    beyond the bound (it opens DVC)."""
    others = sorted(
        (r for r in list_runs(directory) if r != current),
        key=lambda r: last_saved(run_root(directory, r)),
        reverse=True,
    )
    beyond = others[keep_runs - 1:]
    stored = {r: saved(run_root(directory, r)) for r in beyond}
    return RunsPlan(
        (current, *others[: keep_runs - 1]),
        tuple(r for r in beyond if stored[r]),
        tuple(r for r in beyond if not stored[r]),
    )


def execute_runs(
    directory: Path, plan: RunsPlan, *, remove: Callable[[Path], object] = commit.remove
) -> list[str]:
    """Remove the planned runs no live process writes into; returns those removed."""
    removed = []
    for r in plan.remove:
        root = run_root(directory, r)
        try:
            lock = DirLock(root)
        except (CheckpointLockedError, OSError):  # being written by another process, or gone
            continue
        kept = kept_dir(root)  # its hard-linked copies (checkpoint.kept) go with it
        try:
            trash = commit.retire(root)
        finally:
            lock.release()
        if trash is not None:
            remove(trash)
            if kept is not None and kept.is_dir():
                shutil.rmtree(kept, ignore_errors=True)
            removed.append(r)
    return removed


def bound_runs(
    directory: Path,
    *,
    current: str,
    keep_runs: int,
    remove: Callable[[Path], object] = commit.remove,
) -> RunsPlan | None:
    """At a manager's start (rank 0): plan, warn of runs kept because they exist nowhere else,
    execute. Never fatal: a failure is a warning and keeps every run (None)."""
    try:
        for name in os.listdir(directory):
            m = RETIRED_RUN_RE.match(name)
            if m and not commit.pid_alive(int(m["pid"])):
                remove(directory / name)
        plan = plan_runs(directory, current=current, keep_runs=keep_runs)
        if plan.only_here:
            warnings.warn(
                f"keep_runs={keep_runs}: {directory} keeps {len(plan.only_here)} run(s) beyond "
                f"the bound because they exist nowhere else (not in the DVC cache or remote): "
                f"{', '.join(plan.only_here)}; `dvc commit` or `dvc push` them (a `dvc repro` "
                "commits), and the next start removes them",
                ModelverWarning,
                stacklevel=3,
            )
        execute_runs(directory, plan, remove=remove)
    except OSError as e:
        warnings.warn(
            f"could not bound the runs of {directory} ({e}); every run is kept",
            ModelverWarning,
            stacklevel=3,
        )
        return None
    return plan
