"""Healing a local object store (the DVC cache, Git LFS objects): find what fails its hash,
move it aside, and let the backend fetch it again.

A corrupt object is never deleted (it is evidence: bit rot, an editor writing through a hard
link) and never left where the backend would serve it. Stdlib only: the backends own fetching
and their error messages; this module owns the file system side, the same for both.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def corrupt(
    oids: Iterable[str], *, path_of: Callable[[str], Path], digest: Callable[[Path], str],
    expected: Callable[[str], str] = str,
) -> list[str]:
    """Ids whose object is present but whose content no longer hashes to ``expected(oid)``.

    Read in full: bit rot and in-place edits keep the size, and often the mtime that the
    backends' own state trusts. Absent objects are the fetch's business, not corruption."""
    bad = []
    for oid in dict.fromkeys(oids):
        try:
            got = digest(path_of(oid))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue
        if got != expected(oid):
            bad.append(oid)
    return bad


def set_aside(
    oids: Iterable[str], *, path_of: Callable[[str], Path], folder: Path,
    links_under: Path | None = None,
) -> dict[str, Path]:
    """Quarantine each object into ``folder`` (id -> where it went). Files under
    ``links_under`` hard-linked to one of them (read-only scratch checkouts) are removed, or
    they would keep serving the corrupt bytes after the store was healed."""
    inodes: set[tuple[int, int]] = set()
    moved = {}
    for oid in oids:
        path = path_of(oid)
        st = os.stat(path)
        inodes.add((st.st_dev, st.st_ino))
        moved[oid] = quarantine(path, folder, name=oid)
    if links_under is not None:
        unlink_copies(links_under, inodes)
    return moved


def quarantine(path: Path, folder: Path, *, name: str | None = None) -> Path:
    """Move a corrupt object out of the store's way, keeping it for inspection (never deleted)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
    dest = folder / f"{name or path.name}.corrupt-{stamp}"
    os.replace(path, dest)
    return dest


def unlink_copies(root: Path, inodes: set[tuple[int, int]]) -> None:
    """Remove files under ``root`` that are hard links to these (device, inode) pairs."""
    if not inodes or not root.is_dir():
        return
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in inodes:
                os.unlink(p)
