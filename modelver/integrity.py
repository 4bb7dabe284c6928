"""Byte-level checks of checkpoint directories against their manifests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelver.errors import CheckpointCorruptedError, CheckpointNotFoundError


@dataclass(frozen=True)
class VerifiedCheckpoint:
    path: Path
    step: int | None
    problems: list[str]


@dataclass(frozen=True)
class VerifyResult:
    checked: list[VerifiedCheckpoint]

    @property
    def ok(self) -> bool:
        return all(not c.problems for c in self.checked)


def verify_one(path: Path) -> VerifiedCheckpoint:
    """Every file of one checkpoint against its manifest; problems are returned, not raised."""
    from modelver.checkpoint import format as fmt
    from modelver.checkpoint import verify_checkpoint

    m = fmt.STEP_DIR_RE.match(path.name)
    step = int(m.group(1)) if m else None
    try:
        step = verify_checkpoint(path).step
    except CheckpointCorruptedError as e:
        return VerifiedCheckpoint(path, step, e.problems)
    except CheckpointNotFoundError as e:
        return VerifiedCheckpoint(path, step, [e.message])
    return VerifiedCheckpoint(path, step, [])


def verify_dir(path: Path) -> VerifyResult:
    """One checkpoint directory, or every complete step directory under a checkpoints root."""
    from modelver.checkpoint import format as fmt

    if not path.is_dir():
        raise CheckpointNotFoundError(path, reason="no such directory")
    if (path / fmt.MANIFEST).is_file():
        return VerifyResult([verify_one(path)])
    dirs = sorted(p for p in path.iterdir() if fmt.STEP_DIR_RE.match(p.name) and p.is_dir())
    complete = [p for p in dirs if (p / fmt.MANIFEST).is_file()]
    if not complete:
        raise CheckpointNotFoundError(path)
    return VerifyResult([verify_one(p) for p in complete])
