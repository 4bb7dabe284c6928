"""Where versions' checkpoint data lives: DVC (the default) or Git LFS.

The backend is chosen by ``modelver.yaml`` at the repository root (``backend: lfs``, written by
``modelver init --backend lfs``); without that file it is DVC. Artifacts are declared under
``artifacts:`` in ``dvc.yaml`` when it declares any, else in ``modelver.yaml`` (same schema:
``artifacts: {NAME: {path: PATH}}``).

:class:`Storage` is what the version commands need from a backend: list a checkpoint's files by
content hash, fetch them from the remote, write (materialise) a tree, and say whether the
workspace path is saved. ``DvcRepo`` satisfies it as it is; ``LfsRepo`` is the Git LFS one.
Publishing differs (DVC objects to a DVC remote, LFS objects with ``git lfs push``) and is
routed in ``modelver.api.data.push``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from modelver.errors import ModelverError

if TYPE_CHECKING:
    from modelver.dvcrepo import TreeFile

Progress = Callable[[int, int], None]
CONFIG = "modelver.yaml"
BACKENDS = ("dvc", "lfs")


class Storage(Protocol):
    root: Path

    def close(self) -> None: ...

    def tree(self, md5_dir: str) -> list[TreeFile]: ...

    def object_path(self, md5: str) -> Path: ...

    def missing_in_cache(self, md5s: Iterable[str]) -> list[str]: ...

    def fetch(self, md5s: Iterable[str], *, progress: Progress | None = None) -> None: ...

    def materialize(
        self, md5_dir: str, dest: Path, *, prefix: str | None = None,
        progress: Progress | None = None,
    ) -> None: ...

    def workspace_saved(self, path: str) -> bool: ...


def read_config(text: str | None) -> dict[str, Any]:
    """``modelver.yaml`` as a dict ({} when absent); a bad backend is an error."""
    data = yaml.safe_load(text) if text else None
    if not isinstance(data, dict):
        return {}
    backend = data.get("backend", "dvc")
    if backend not in BACKENDS:
        raise ModelverError(
            f"{CONFIG}: unknown backend '{backend}'", hint=f"use one of {', '.join(BACKENDS)}"
        )
    return data


def backend_of(root: Path) -> str:
    f = root / CONFIG
    return str(read_config(f.read_text() if f.is_file() else None).get("backend", "dvc"))


def write_config(root: Path, *, backend: str, artifacts: dict[str, str]) -> bool:
    """Write ``modelver.yaml`` unless it exists; True when written."""
    f = root / CONFIG
    if f.is_file():
        return False
    data: dict[str, Any] = {"backend": backend}
    if artifacts:
        data["artifacts"] = {name: {"path": path} for name, path in artifacts.items()}
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    return True


def open_storage(root: Path) -> Storage:
    if backend_of(root) == "lfs":
        from modelver.lfsrepo import LfsRepo

        return LfsRepo(root)
    from modelver.dvcrepo import DvcRepo

    return DvcRepo(root)


def is_lfs(st: Storage) -> bool:
    from modelver.lfsrepo import LfsRepo

    return isinstance(st, LfsRepo)


def scratch_dir(st: Storage) -> Path:
    """Where read-only copies of versions' step directories are kept (diff, verify)."""
    from modelver.lfsrepo import LfsRepo

    if isinstance(st, LfsRepo):
        return st.scratch
    return st.root / ".dvc" / "tmp" / "modelver"


def hash_file_for(st: Storage) -> Callable[[Path], str] | None:
    """The file hash the backend's listings use: sha256 for Git LFS; None: md5, as DVC."""
    from modelver.lfsrepo import LfsRepo

    return st.hash_file if isinstance(st, LfsRepo) else None
