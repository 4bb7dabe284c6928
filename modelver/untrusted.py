"""The one validation layer for data modelver did not write in this process.

Tag messages, manifests, ``state.json``, run records, ``dvc.yaml``/``modelver.yaml`` and remote
listings are written by anyone with push access or by a dying process. Every reader turns such
data into paths and values only through these functions, which either return something safe to
use or raise a :class:`~modelver.errors.ModelverError` naming the field and the value.

Imports nothing but the standard library and ``modelver.errors``: the checkpoint core uses it.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from modelver.errors import MalformedDataError, UnsafePathError

STEP_DIR_RE = re.compile(r"^step-(\d{8,})$")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a run's id (checkpoint.runid)
# a checkpoint inside a checkpoints root: step-N, or run-<id>/step-N for a named run
CHECKPOINT_SUBDIR_RE = re.compile(r"^(?:run-([A-Za-z0-9][A-Za-z0-9._-]{0,63})/)?step-(\d{8,})$")
MAX_JSON_BYTES = 256 << 20  # a manifest of a huge sharded model is far smaller
MAX_JSON_DEPTH = 100  # far deeper than anything modelver writes (optimizer state: < 10)


def relative_path(value: object, *, field: str, root: str | Path) -> PurePosixPath:
    """A relative, normalised POSIX path with no ``..``, no absolute start, no odd characters."""
    if not isinstance(value, str) or not value:
        raise UnsafePathError(field, value, root=root, reason="not a non-empty string")
    if "\x00" in value or "\\" in value or len(value) > 4096:
        raise UnsafePathError(field, value, root=root, reason="not a plain relative path")
    p = PurePosixPath(value)
    if p.is_absolute() or value.startswith("~"):
        raise UnsafePathError(field, value, root=root, reason="an absolute path")
    parts = [x for x in p.parts if x != "."]
    if not parts or any(x == ".." for x in parts):
        raise UnsafePathError(field, value, root=root, reason="leaves its root")
    return PurePosixPath(*parts)


def inside(root: str | Path, value: object, *, field: str) -> Path:
    """``root / value``, refused unless it stays inside ``root`` without following a symlink.

    The path need not exist (callers write there). Every existing component below ``root`` must
    be a real directory or, for the last one, a real file or directory: a symlink planted in a
    checkpoint or a repository could otherwise redirect a read or a delete outside.
    """
    root = Path(root)
    rel = relative_path(value, field=field, root=root)
    path = root
    for part in rel.parts:
        path = path / part
        try:
            st = os.lstat(path)
        except OSError:  # missing (to be written) or unreachable: nothing to follow
            break
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(field, value, root=root, reason="goes through a symlink")
    full = root / rel
    real_root = os.path.realpath(root)
    real = os.path.realpath(full)
    if os.path.commonpath([real_root, real]) != real_root:
        raise UnsafePathError(field, value, root=root, reason="resolves outside its root")
    return full


def step_dirname(value: object, *, field: str, root: str | Path) -> str:
    """A step directory name (``step-NNNNNNNN``), nothing else: no separators, no ``..``."""
    if not isinstance(value, str) or not STEP_DIR_RE.match(value):
        raise UnsafePathError(field, value, root=root, reason="not a step-NNNNNNNN directory name")
    return value


def checkpoint_subdir(
    value: object, *, field: str, root: str | Path
) -> tuple[str, str | None, int]:
    """A checkpoint's place in a checkpoints root, ``step-N`` or ``run-<id>/step-N``, and
    nothing else (no other separator, no ``..``): (the value, its run or None, its step)."""
    m = CHECKPOINT_SUBDIR_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise UnsafePathError(
            field, value, root=root, reason="not a step-NNNNNNNN or run-<id>/step-NNNNNNNN path"
        )
    return str(value), m.group(1), int(m.group(2))


def load_json(data: str | bytes, *, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse JSON that may be hostile: bounded size and nesting, any parse error one line.

    ``NaN``/``Infinity`` stay accepted: modelver writes them for diverged metrics, and the
    readers of metrics rank them last.
    """
    if len(data) > max_bytes:
        raise MalformedDataError(what, "size", len(data), expected=f"at most {max_bytes} bytes")
    try:
        loaded = json.loads(data)
    except (ValueError, RecursionError) as e:  # int digits over the limit are ValueError too
        raise MalformedDataError(what, "content", str(e), expected="valid JSON") from e
    if _too_deep(loaded, MAX_JSON_DEPTH):
        raise MalformedDataError(
            what, "nesting", "too deep", expected=f"at most {MAX_JSON_DEPTH} levels"
        )
    return loaded


def _too_deep(value: Any, limit: int) -> bool:
    """Nesting depth of parsed JSON, without recursion (decoders after this one recurse).

    One level at a time, each in one comprehension: the scalars (most of a tensor index) are
    looked at once and never queued, and ``json.loads`` makes plain dicts and lists only."""
    level = [value] if type(value) in _CONTAINERS else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        level = [c for v in level for c in (v.values() if type(v) is dict else v)
                 if type(c) in _CONTAINERS]
    return False


_CONTAINERS = frozenset({dict, list})


# --- typed fields -----------------------------------------------------------------------------


def mapping(value: object, *, what: str, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise MalformedDataError(what, field, value, expected="an object")
    return value


def integer(
    value: object, *, what: str, field: str, minimum: int | None = 0, maximum: int | None = None
) -> int:
    """An int (not a bool, not a float, not a numeric string) within bounds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedDataError(what, field, value, expected="an integer")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise MalformedDataError(
            what, field, value, expected=f"an integer in [{minimum}, {maximum}]"
        )
    return value


def string(value: object, *, what: str, field: str, max_len: int = 4096) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise MalformedDataError(what, field, value, expected=f"a string of ≤ {max_len} chars")
    return value


def metrics(value: object, *, what: str, field: str = "metrics") -> dict[str, float]:
    """A flat ``{name: number}``; NaN and infinities are kept (callers must rank them last)."""
    if value is None:
        return {}
    out = {}
    for k, v in mapping(value, what=what, field=field).items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise MalformedDataError(what, f"{field}.{k}", v, expected="a number")
        out[k] = float(v)
    return out


def finite(x: float | None) -> bool:
    """A score that may rank: not None, not NaN, not infinite."""
    return x is not None and math.isfinite(x)
