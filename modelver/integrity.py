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
    return _verify(path)[0]


def _verify(path: Path) -> tuple[VerifiedCheckpoint, bool]:
    """(the result, whether the checkpoint was retired or replaced while it was checked)."""
    from modelver.checkpoint import format as fmt
    from modelver.checkpoint import verify_checkpoint

    m = fmt.STEP_DIR_RE.match(path.name)
    step = int(m.group(1)) if m else None
    token = fmt.manifest_token(path)
    try:
        step = verify_checkpoint(path).step
    except CheckpointCorruptedError as e:
        return VerifiedCheckpoint(path, step, e.problems), fmt.retired(path, token)
    except CheckpointNotFoundError as e:
        return VerifiedCheckpoint(path, step, [e.message]), fmt.retired(path, token)
    return VerifiedCheckpoint(path, step, []), False


def verify_dir(path: Path) -> VerifyResult:
    """One checkpoint directory, or every complete step directory under a checkpoints root,
    its runs' (``run-<id>/``, :mod:`modelver.checkpoint.runid`) included.

    Under a root, a checkpoint that a writer retires (or replaces) while it is checked is not
    damage: it is dropped, and the directory is listed again for what took its place. A
    symlinked step directory is reported, not followed."""
    from modelver.checkpoint import format as fmt
    from modelver.checkpoint.runid import list_runs, run_root

    if not path.is_dir():
        raise CheckpointNotFoundError(path, reason="no such directory")
    if fmt.manifest_token(path) is not None:
        return VerifyResult([verify_one(path)])
    checked = _verify_root(path)
    for run in list_runs(path):
        checked += _verify_root(run_root(path, run))
    if not checked:
        raise CheckpointNotFoundError(path)
    return VerifyResult(checked)


def _verify_root(path: Path) -> list[VerifiedCheckpoint]:
    from modelver.checkpoint import format as fmt

    checked: dict[str, VerifiedCheckpoint] = {}
    for child in _symlinked_steps(path):
        checked[child.name] = VerifiedCheckpoint(
            child, None, ["is a symlink (not followed: a step directory must be a directory)"]
        )
    empty = 0
    for _ in fmt.while_retiring():
        todo = [p for _, p in fmt.iter_checkpoint_dirs(path) if p.name not in checked]
        retired = False
        for p in sorted(todo):
            result, gone = _verify(p)
            if gone:
                retired = True
            else:
                checked[p.name] = result
        if not retired:  # readdir may miss both the step retired and the one committed
            if checked or empty >= fmt.EMPTY_RELISTS:
                break
            empty += 1
    return [checked[k] for k in sorted(checked)]


def _symlinked_steps(path: Path) -> list[Path]:
    from modelver.checkpoint import format as fmt

    try:
        return sorted(p for p in path.iterdir() if fmt.STEP_DIR_RE.match(p.name) and p.is_symlink())
    except OSError:
        return []
