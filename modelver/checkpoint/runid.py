"""Which run a checkpoint belongs to: runs side by side in one checkpoints directory.

``CheckpointManager(directory, run=...)`` names the run: a string, or a mapping of the
hyperparameters that define it (the caller leaves out what may change within one run, such as
the number of steps), fingerprinted. Each run keeps its checkpoints in its own subdirectory
``run-<id>/`` (a checkpoints root as any other: its own lock, listing, retention and start-up
recovery), records its parameters once in ``run-<id>/RUN.json``, and every manifest records
the run. ``run=None`` is the layout without runs: step directories in the directory itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelver.checkpoint.commit import fsync_dir_quietly, leftover
from modelver.checkpoint.format import RUN_ID_RE
from modelver.errors import InvalidArgumentError

RUN_PREFIX = "run-"
RUN_FILE = "RUN.json"


def run_id(run: object) -> str | None:
    """The id of ``run``: a name as given, or ``p`` and 16 hex digits of the SHA-256 of the
    mapping as canonical JSON (sorted keys; ``1`` and ``1.0`` are different runs)."""
    if run is None:
        return None
    if isinstance(run, str):
        if not RUN_ID_RE.fullmatch(run):
            raise InvalidArgumentError(
                "run", run, expected="a name of letters, digits, '.', '_', '-' (up to 64)"
            )
        return run
    if isinstance(run, Mapping) and run and all(isinstance(k, str) for k in run):
        try:
            canonical = json.dumps(dict(run), sort_keys=True, separators=(",", ":"),
                                   allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError("run", run, expected=f"JSON values ({e})") from e
        return "p" + hashlib.sha256(canonical.encode()).hexdigest()[:16]
    raise InvalidArgumentError(
        "run", run, expected="None, a name, or a non-empty mapping with string keys"
    )


def run_root(directory: Path, run: str | None) -> Path:
    """Where a run's step directories live (the directory itself without a run)."""
    return directory if run is None else directory / f"{RUN_PREFIX}{run}"


def run_dir(directory: Path, run: object) -> Path:
    """:func:`run_root` of a run as callers name it (a name, a mapping, or None)."""
    return run_root(directory, run_id(run))


def record_run(root: Path, run: str, params: Any) -> None:
    """``RUN.json`` once, atomically: the run's id and the parameters that define it."""
    dest = root / RUN_FILE
    if dest.exists():
        return
    tmp = leftover(dest, "tmp")
    doc = {"run": run, "params": dict(params) if isinstance(params, Mapping) else None}
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, dest)
    fsync_dir_quietly(root)


def list_runs(directory: Path) -> list[str]:
    """The ids of the runs with a subdirectory in ``directory``, sorted."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(
        n[len(RUN_PREFIX):] for n in names
        if n.startswith(RUN_PREFIX) and RUN_ID_RE.fullmatch(n[len(RUN_PREFIX):])
        and (directory / n).is_dir() and not (directory / n).is_symlink()
    )
