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

import errno
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from modelver.checkpoint.dirlock import pid_alive
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

    def corrupt_in_cache(self, md5s: Iterable[str]) -> list[str]: ...

    def heal(self, md5s: Iterable[str], *, progress: Progress | None = None) -> list[str]: ...

    def materialize(
        self, md5_dir: str, dest: Path, *, prefix: str | None = None,
        progress: Progress | None = None, check: Callable[[Path], None] | None = None,
    ) -> None: ...

    def workspace_saved(self, path: str) -> bool: ...


def read_config(text: str | None) -> dict[str, Any]:
    """``modelver.yaml`` as a dict ({} when absent or not a mapping).

    The file is committed data: YAML that does not parse, an unknown backend, or an artifact
    path that leaves the repository is one error line, never a traceback nor a path outside."""
    from modelver.errors import MalformedDataError, clip
    from modelver.untrusted import relative_path

    try:
        data = yaml.safe_load(text) if text else None
    except yaml.YAMLError as e:
        raise MalformedDataError(CONFIG, "content", str(e).splitlines()[0], expected="YAML") from e
    if not isinstance(data, dict):
        return {}
    backend = data.get("backend", "dvc")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ModelverError(
            f"{CONFIG}: unknown backend {clip(backend)}", hint=f"use one of {', '.join(BACKENDS)}"
        )
    arts = data.get("artifacts")
    if isinstance(arts, dict):
        for name, spec in arts.items():
            if isinstance(spec, dict) and spec.get("path"):
                relative_path(
                    spec["path"], field=f"{CONFIG} artifacts.{name}.path", root="<repository>"
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


# --- writing a directory beside its target, then swapping it in ----------------------------
# A kill at any point leaves ``dest`` whole: the old tree, the new one, or (between the two
# renames) the old one aside under a name the next call puts back. Names carry the writer's pid,
# so a call cleans only what dead writers left and never a concurrent writer's directory.

_SIDE_RE = re.compile(r"^\.(?P<name>.+)\.modelver-(?P<kind>new|old)-(?P<pid>\d+)-[0-9a-f]+$")


def side_path(dest: Path, kind: str) -> Path:
    """A sibling of ``dest`` for a new tree being written (``new``) or the old one (``old``)."""
    return dest.with_name(f".{dest.name}.modelver-{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def clean_side_dirs(dest: Path) -> list[Path]:
    """Finish what a killed swap of ``dest`` left: put the old tree back when ``dest`` is gone,
    remove half-written new trees and old trees already replaced. Returns what was removed."""
    parent = dest.parent
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    olds: list[Path] = []
    removed: list[Path] = []
    for n in names:
        m = _SIDE_RE.match(n)
        if not m or m["name"] != dest.name or pid_alive(int(m["pid"])):
            continue
        if m["kind"] == "old":
            olds.append(parent / n)
        else:
            _rmtree(parent / n)
            removed.append(parent / n)
    if olds and not os.path.lexists(dest):  # killed between the renames: roll back
        olds.sort(key=lambda p: p.stat().st_mtime)
        os.rename(olds.pop(), dest)
        _fsync_dir(parent)
    for p in olds:
        _rmtree(p)
        removed.append(p)
    return removed


def swap_in(tmp: Path, dest: Path) -> None:
    """Replace ``dest`` by the complete tree ``tmp`` (a sibling): one atomic exchange where the
    kernel has it (Linux ``renameat2``), else two renames that :func:`clean_side_dirs` undoes."""
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
    elif _exchange(tmp, dest):  # ``tmp`` now holds the old tree; a kill here leaves it to clean
        _rmtree(tmp)
    else:
        old = side_path(dest, "old")
        os.rename(dest, old)
        os.rename(tmp, dest)
        _rmtree(old)
    _fsync_dir(dest.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths; False where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

