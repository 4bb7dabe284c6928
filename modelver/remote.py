"""A DVC remote as modelver uses it beside ``dvc push``: objects, run records, janitor work.

:class:`RemoteStore` wraps the file system and object database that
:class:`~modelver.storage.dvc.DvcStorage` opens (this module imports no ``dvc``: that one stays
the only one), so every remote error
becomes one :class:`~modelver.errors.RemoteError` line naming the remote.
"""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from modelver.errors import RemoteError

# dvc_objects writes an upload as ``.<token_urlsafe(16)>.tmp`` beside its object, then renames
_TMP_RE = re.compile(r"^\.[A-Za-z0-9_-]{22}\.tmp$")
STALE_TMP_S = 15 * 60  # an upload in progress touches its temp file far more often than this


class RemoteStore:
    """A DVC remote as a content-addressed object store (``files/md5/xx/…``, as ``dvc push``
    lays it out) plus small JSON records under ``modelver/`` beside it."""

    def __init__(self, name: str, fs: Any, root: str, odb: Any, *, local_fs: Any) -> None:
        self.name = name
        self.fs = fs
        self.root = root
        self.odb = odb
        self._local_fs = local_fs  # DVC's local file system, the source of ``put_file``

    def _call(self, what: Callable[[], Any]) -> Any:
        try:
            return what()
        except Exception as e:  # each file system raises its own errors (botocore, …)
            raise RemoteError(self.name, first_line(e)) from e

    def clean_tmp(self, *, older_than: float = STALE_TMP_S) -> list[str]:
        """Remove temporary uploads a killed push left in the remote (``files/``,
        ``modelver/``): DVC's temp names, untouched for ``older_than`` seconds."""
        removed = []
        now = time.time()
        for folder in ("files", "modelver"):
            base = self.fs.join(self.root, folder)
            try:
                paths: list[str] = self._call(partial(_find, self.fs, base))
            except RemoteError as e:
                if isinstance(e.__cause__, FileNotFoundError):
                    continue
                raise
            for path in paths:
                if not _TMP_RE.match(str(path).rstrip("/").rsplit("/", 1)[-1]):
                    continue
                mtime = _mtime(self._call(partial(self.fs.info, path)))
                if mtime is not None and now - mtime >= older_than:
                    self._call(partial(self.fs.rm_file, path))
                    removed.append(str(path))
        return removed

    def missing(self, md5s: Iterable[str]) -> list[str]:
        wanted = list(md5s)
        return list(self._call(lambda: [m for m in wanted if not self.odb.exists(m)]))

    def put_file(self, path: Path, md5: str) -> bool:
        """Upload one file as object ``md5`` unless the remote has it; True when sent.

        Objects appear whole (a temporary name, then a rename; one PUT on object stores)."""
        if self._call(lambda: self.odb.exists(md5)):
            return False
        local = self._local_fs
        self._call(lambda: self.odb.add(os.fspath(path), local, md5, check_exists=False))
        return True

    def put_bytes(self, md5: str, data: bytes) -> None:
        if not self._call(lambda: self.odb.exists(md5)):
            self._call(lambda: self.odb.add_bytes(md5, data))

    def get_file(self, md5: str, dest: Path) -> None:
        """Download object ``md5`` to ``dest``: a temporary sibling, fsync'd, then renamed, so
        ``dest`` is never half-written. The caller checks the bytes against its own hashes."""
        tmp = dest.with_name(f".{dest.name}.fetch-{os.getpid()}")
        source = self.odb.oid_to_path(md5)
        try:
            self._call(lambda: self.fs.get_file(source, os.fspath(tmp)))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def read_record(self, relpath: str) -> bytes | None:
        """``modelver/<relpath>``, or None when the remote has no such record."""
        path = self.fs.join(self.root, "modelver", *relpath.split("/"))
        try:
            return bytes(self._call(lambda: self.fs.cat_file(path)))
        except RemoteError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return None
            raise

    def write_record(self, relpath: str, data: bytes) -> None:
        """Write ``modelver/<relpath>`` in one piece (readers never see part of it)."""
        path = self.fs.join(self.root, "modelver", *relpath.split("/"))
        self._call(lambda: self.fs.put_file(io.BytesIO(data), path, size=len(data)))

    def read_records(self, folder: str) -> dict[str, bytes]:
        """Every record in ``modelver/<folder>``: file name -> content ({} when none)."""
        base = self.fs.join(self.root, "modelver", *folder.split("/"))
        try:
            names = self._call(lambda: self.fs.ls(base, detail=False))
        except RemoteError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return {}
            raise
        found: dict[str, bytes] = {}
        for path in names:
            name = str(path).rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith(".") and name.endswith(".json"):
                found[name] = bytes(self._call(partial(self.fs.cat_file, path)))
        return found


def _find(fs: Any, base: str) -> list[str]:
    return [str(p) for p in fs.find(base)]


def _mtime(info: Mapping[str, Any]) -> float | None:
    """Modification time from an fsspec ``info`` (local: ``mtime``; S3: ``LastModified``)."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(key)
        if isinstance(v, int | float):
            return float(v)
        stamp = getattr(v, "timestamp", None)
        if callable(stamp):
            return float(stamp())
    return None


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
