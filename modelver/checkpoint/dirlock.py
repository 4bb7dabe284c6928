"""The checkpoints directory a manager writes into: checked at construction, locked for it.

Checked: it exists as a directory (created if missing) and takes a file, by writing and removing
a probe, since root ignores permission bits and only a write tells EROFS or ENOSPC. The error's
hint fits the errno.

Locked: one exclusive flock per directory and process, shared by the managers of this process
(a notebook cell run again, a resume in the same process) and released with the last of them.
The lock is on the directory itself, so no file appears among the checkpoints (a DVC output: a
stray lock file would change its hash); where directories cannot be locked (NFS emulates flock
with byte-range locks, which need a writable file) a ``.lock`` file is locked instead, naming
its owner, and removed when released. The kernel drops a dead process's lock, so a stale lock
is taken over by the next manager without anyone deleting anything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

from modelver.checkpoint.commit import probe_path
from modelver.errors import CheckpointLockedError, CheckpointWriteError, ModelverWarning


def prepare_directory(root: Path) -> None:
    """Raise :class:`CheckpointWriteError` unless ``root`` is (or can be made) a directory
    that takes a file."""
    try:
        if os.path.lexists(root) and not root.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(root))
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(root))
        probe = probe_path(root)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"modelver write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise CheckpointWriteError(root, e, what="to checkpoints directory") from e


_LOCKS: dict[tuple[int, int], list[Any]] = {}  # (st_dev, st_ino) -> [fd, users, lock file]
_LOCKS_GUARD = threading.Lock()
LOCK_FILE = ".lock"


def _forget_locks_in_child() -> None:
    """A forked child (a DataLoader worker) must not keep its parent's lock alive after the
    parent dies: close the inherited descriptors (no LOCK_UN, which would unlock the parent)."""
    global _LOCKS_GUARD
    for fd, _, _ in _LOCKS.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCKS.clear()
    _LOCKS_GUARD = threading.Lock()


os.register_at_fork(after_in_child=_forget_locks_in_child)


class DirLock:
    """This process's share of the exclusive lock on a checkpoints directory."""

    def __init__(self, root: Path) -> None:
        self.key: tuple[int, int] | None = None
        with _LOCKS_GUARD:
            st = os.stat(root)
            key = (st.st_dev, st.st_ino)
            held = _LOCKS.get(key)
            if held is not None:
                held[1] += 1
            else:
                fd, lock_file = _lock_directory(root)
                if fd is None:
                    return
                _LOCKS[key] = [fd, 1, lock_file]
            self.key = key
        self._finalizer = weakref.finalize(self, _release, key)

    def release(self) -> None:
        if self.key is not None:
            self._finalizer()


def _release(key: tuple[int, int]) -> None:
    with _LOCKS_GUARD:
        held = _LOCKS.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _LOCKS[key]
        fd, _, lock_file = held
        if lock_file is not None:  # unlinked while still locked: see _lock_file
            with contextlib.suppress(OSError):
                os.unlink(lock_file)
        os.close(fd)


def _lock_directory(root: Path) -> tuple[int | None, Path | None]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, None
    except BlockingIOError:
        owner = _flock_owner(os.fstat(fd))
        os.close(fd)
        raise CheckpointLockedError(root, owner=owner) from None
    except OSError:
        os.close(fd)
    try:
        return _lock_file(root / LOCK_FILE), root / LOCK_FILE
    except OSError as e:
        warnings.warn(
            f"cannot lock {root} ({e}): a second process writing into it would not be refused",
            ModelverWarning,
            stacklevel=5,
        )
        return None, None


def _lock_file(path: Path) -> int:
    """flock on ``.lock``, which names the owner; retried when the file was unlinked by its
    previous owner between our open and our lock (we would hold a lock on a dead inode)."""
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
                text = f"pid {int(owner['pid'])} on host {str(owner['host'])[:64]}"
            except (ValueError, KeyError, TypeError, OSError):
                text = "another process (its lock file names none yet)"
            os.close(fd)
            raise CheckpointLockedError(path.parent, owner=text) from None
        except OSError:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            doc = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(doc).encode(), 0)
            return fd
        os.close(fd)
    raise OSError(errno.EAGAIN, "lock file keeps changing", str(path))


def _flock_owner(st: os.stat_result) -> str:
    """Who holds the flock on this inode, from /proc/locks (pids as this namespace sees them)."""
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    host = socket.gethostname()
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "->" in fields or ident not in fields or "FLOCK" not in fields:
                    continue
                pid = int(fields[fields.index(ident) - 1])
                if pid <= 0:
                    break
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        cmd = c.read(200).replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    cmd = ""
                return f"pid {pid} on host {host}" + (f" ({cmd[:80]})" if cmd else "")
    except (OSError, ValueError):
        pass
    return f"another process (on host {host} or one sharing the file system)"
