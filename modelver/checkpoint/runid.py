"""Which run a checkpoint belongs to: runs side by side in one checkpoints directory.

``CheckpointManager(directory, run=...)`` names the run: a string, or a mapping of the
hyperparameters that define it (the caller leaves out what may change within one run, such as
the number of steps), fingerprinted. Each run keeps its checkpoints in its own subdirectory
``run-<id>/`` (a checkpoints root as any other: its own lock, listing, retention and start-up
recovery), records its parameters once in ``run-<id>/RUN.json``, and every manifest records
the run. ``run=None`` is the layout without runs: step directories in the directory itself.

The directory's ``CURRENT_RUN.json`` names the run a manager last opened there. A pipeline's
checkpoints output holds every run it has trained, and this says which one the commit that
pins it stands for: ``modelver tag``, ``show``, ``diff`` and ``checkout`` of that commit take
that run's newest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelver import untrusted
from modelver.checkpoint.commit import fsync_dir_quietly, leftover
from modelver.errors import InvalidArgumentError, MalformedDataError
from modelver.untrusted import RUN_ID_RE

RUN_PREFIX = "run-"
RUN_FILE = "RUN.json"
CURRENT_FILE = "CURRENT_RUN.json"  # in the directory: the run its newest training used


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


def mark_current(directory: Path, run: str) -> None:
    """Name ``run`` in ``CURRENT_RUN.json``, atomically; unchanged when it already does, so a
    re-run of a finished job leaves the directory as it was."""
    dest = directory / CURRENT_FILE
    doc = json.dumps({"run": run}) + "\n"
    try:
        if dest.read_text() == doc:
            return
    except (OSError, UnicodeDecodeError):
        pass
    tmp = leftover(dest, "tmp")
    tmp.write_text(doc)
    os.replace(tmp, dest)
    fsync_dir_quietly(directory)


def parse_current(data: bytes | str, *, where: str) -> str:
    """The run a ``CURRENT_RUN.json`` names (data others may have written)."""
    doc = untrusted.load_json(data, what=where, max_bytes=4096)
    run = doc.get("run") if isinstance(doc, dict) else None
    if not (isinstance(run, str) and RUN_ID_RE.fullmatch(run)):
        raise MalformedDataError(where, "run", run, expected="a run id")
    return run


def current_run(directory: Path) -> str | None:
    """The run ``CURRENT_RUN.json`` names in ``directory``; None without one."""
    path = directory / CURRENT_FILE
    try:
        if path.is_symlink():
            raise OSError("a symlink (not followed)")
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MalformedDataError(str(path), "file", str(e), expected="a readable file") from e
    return parse_current(data, where=str(path))
