"""Which checkpoint to resume from: the newest one that passes, skipping bad ones.

Shared by :meth:`CheckpointManager.restore` (the attempt is the restore itself) and the Hugging
Face Trainer integration (the attempt is a verify; Trainer then restores piece by piece). A
checkpoint a writer retired since the listing is skipped silently; a corrupted, malformed,
unsafe or unreadable one with a warning; anything else (a ``StateMismatchError``: the live
objects changed) propagates. A single process; ``distributed`` chooses collectively.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from modelver.checkpoint import format as fmt
from modelver.checkpoint.catalog import CheckpointInfo, info_of
from modelver.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    MalformedDataError,
    ModelverWarning,
    UnsafePathError,
)

T = TypeVar("T")


def newest_valid(
    root: Path,
    attempt: Callable[[Path], T],
    *,
    step: int | None = None,
    stacklevel: int,
) -> tuple[CheckpointInfo, T] | None:
    """The newest committed checkpoint under ``root`` (or the one at ``step``) on which
    ``attempt`` succeeds, with its result; None when none does.

    ``stacklevel`` is the caller's own, as it would pass it to :func:`warnings.warn`. When a
    failed attempt had already overwritten live state (the error's ``partial``) and no earlier
    checkpoint succeeds, this raises instead of letting training start afresh half-loaded.
    """
    # newest first by directory name; a manifest is read only when its checkpoint is tried,
    # so a restore costs the same however many checkpoints the run keeps
    candidates = sorted(fmt.iter_checkpoint_dirs(root), key=lambda c: c[0], reverse=True)
    if step is not None:
        candidates = [c for c in candidates if c[0] == step]
        if not candidates:
            raise CheckpointCorruptedError(
                root / fmt.step_dirname(step), ["no committed checkpoint at this step"]
            )
    overwritten = False
    for _, path in candidates:
        try:
            info = info_of(path, fmt.read_manifest(path))
            result = attempt(path)
        except CheckpointNotFoundError:  # retired by a writer since it was listed
            continue
        except (CheckpointCorruptedError, MalformedDataError, UnsafePathError) as e:
            overwritten = overwritten or bool(getattr(e, "partial", False))
            why = "; ".join(getattr(e, "problems", [e.message])[:3])
            warnings.warn(
                f"skipping corrupted checkpoint {path}: {why}",
                ModelverWarning,
                stacklevel=stacklevel + 1,
            )
            continue
        return info, result
    if overwritten:
        raise CheckpointCorruptedError(
            root,
            [
                "no valid checkpoint is left and the state was partly overwritten by a "
                "corrupted one; rebuild the model (or move the directory away) and start again"
            ],
        )
    return None
