"""Which checkpoints a directory holds: listed, newest first, safe against a concurrent writer.

Verifying is :mod:`modelver.checkpoint.verify`; reading back, :mod:`modelver.checkpoint.restore`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from modelver.checkpoint import format as fmt
from modelver.errors import CheckpointCorruptedError, CheckpointNotFoundError, ModelverWarning


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as listed from its manifest (data not read)."""

    path: Path
    step: int
    epoch: int | None
    metrics: dict[str, float]
    created: str
    size: int
    n_tensors: int
    bases: tuple[str, ...] = ()  # step dirs its delta files decode against


def _info(path: Path, m: fmt.Manifest) -> CheckpointInfo:
    return CheckpointInfo(
        path, m.step, m.epoch, m.metrics, m.created, m.total_bytes, len(m.tensors), m.bases
    )


def list_checkpoints(root: str | Path) -> list[CheckpointInfo]:
    """Committed checkpoints under ``root`` in step order; unreadable manifests are skipped."""
    return _committed(Path(root))[0]


def _committed(root: Path) -> tuple[list[CheckpointInfo], bool]:
    """The listing, and whether an entry vanished while it was read (a writer retiring)."""
    out = []
    vanished = False
    for _, path in fmt.iter_checkpoint_dirs(root):
        try:
            out.append(_info(path, fmt.read_manifest(path)))
        except CheckpointNotFoundError:  # retired (renamed away) since the directory listing
            vanished = True
        except CheckpointCorruptedError as e:
            warnings.warn(f"skipping {path}: {e.problems[0]}", ModelverWarning, stacklevel=2)
    return sorted(out, key=lambda i: i.step), vanished


def newest_first(root: Path) -> Iterator[list[CheckpointInfo]]:
    """Listings of ``root``, newest first, for as long as a writer keeps retiring what they
    found. An empty listing ends it unless an entry vanished meanwhile (readdir can miss both
    the step a writer retires and the one it commits in its place): then list again."""
    empty = 0
    for _ in fmt.while_retiring():
        found, vanished = _committed(root)
        if found:
            yield list(reversed(found))
        elif vanished or empty < fmt.EMPTY_RELISTS:
            empty += not vanished
        else:
            return



def latest_checkpoint(root: str | Path) -> CheckpointInfo | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A step directory, or a checkpoints root (its newest committed checkpoint)."""
    path = Path(path)
    if fmt.manifest_token(path) is not None:
        return path
    for found in newest_first(path):  # a writer may retire the newest between listing and use
        if fmt.manifest_token(found[0].path) is not None:
            return found[0].path
    raise CheckpointNotFoundError(path)
