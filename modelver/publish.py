"""Background push of committed checkpoints to the DVC remote, recorded for ``modelver recover``
(the records: :mod:`modelver.runs`).

Each checkpoint is uploaded as DVC objects (one per file, keyed by its md5, plus the ``.dir``
listing of the step directory), so ``dvc push`` later skips them and ``dvc fetch`` can read
them. Only after every object is in the remote is the run's record
``<remote>/modelver/runs/<run id>.json`` (re)written to name it: a record never points at a
checkpoint the remote does not hold whole.

The training thread only enqueues (:meth:`Publisher.committed`, a commit hook); one thread
uploads, newest checkpoint first: a checkpoint still waiting when a newer one commits is
skipped. Imports of DVC happen in that thread, so the checkpoint core never needs DVC.
"""

from __future__ import annotations

import json
import socket
import threading
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from modelver.checkpoint import format as fmt
from modelver.errors import (
    CheckpointNotFoundError,
    ModelverError,
    ModelverWarning,
    RemoteError,
)
from modelver.hashing import md5_file
from modelver.runs import RUNS, PushedDir, RunRecord, new_run_id

if TYPE_CHECKING:
    from modelver.remote import RemoteStore

def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class CheckpointGone(Exception):
    """The step directory was removed (retention) before it was uploaded."""


@dataclass(frozen=True)
class Session:
    store: RemoteStore
    path: str  # the checkpoints root relative to the repository root
    commit: str | None
    branch: str | None


class Publisher:
    """Uploads committed checkpoints from one background thread; at most one upload runs and
    the newest waiting checkpoint replaces an older waiting one.

    A failed upload is retried with exponential backoff (``backoff`` seconds, doubling up to
    ``max_backoff``) up to ``attempts`` times, or until a newer checkpoint arrives; then a
    :class:`ModelverWarning` is issued and training goes on. A configuration error (no DVC
    repository, unknown remote) stops pushing; :meth:`check` raises it in the training thread.
    """

    def __init__(
        self,
        root: Path,
        target: bool | str = True,
        *,
        attempts: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self.root = Path(root)
        self.remote = None if target is True else str(target)
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.run_id = new_run_id()
        self.published: list[int] = []  # steps whose record was written, in order
        self.failures = 0  # failed attempts (retried or given up)
        self._cond = threading.Condition()
        self._pending: tuple[Path, fmt.Manifest] | None = None
        self._busy = False
        self._closing = False
        self._fatal: ModelverError | None = None
        self._session: Session | None = None
        self._thread: threading.Thread | None = None

    # --- training thread ---------------------------------------------------------------

    def committed(self, path: Path, manifest: fmt.Manifest) -> None:
        """Queue a committed checkpoint for upload; returns at once."""
        with self._cond:
            if self._closing or self._fatal is not None:
                return
            self._pending = (Path(path), manifest)
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="modelver-push", daemon=True
                )
                self._thread.start()

    def check(self) -> None:
        """Raise a configuration error the background thread hit (once)."""
        if self._fatal is None:  # the common case, on every step: no lock
            return
        with self._cond:
            fatal, self._fatal = self._fatal, None
        if fatal is not None:
            raise fatal

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or uploading; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._pending is None and not self._busy, timeout=timeout
            )

    def close(self) -> None:
        """Upload what is queued (with its retries), then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self.check()

    # --- background thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closing)
                if self._pending is None:
                    return
                job, self._pending = self._pending, None
                self._busy = True
            try:
                self._publish_with_retries(*job)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _publish_with_retries(self, path: Path, manifest: fmt.Manifest) -> None:
        if self._session is None:
            try:
                self._session = open_session(self.root, self.remote)
            except ModelverError as e:  # no repository or no such remote: retrying won't help
                with self._cond:
                    self._fatal = e
                    self._closing = True
                return
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                self.publish(path, manifest)
                return
            except CheckpointGone:
                return  # retention removed it: a newer checkpoint exists
            except Exception as e:  # remote down, a file system's own error: retry, then warn
                error = e
            self.failures += 1
            if attempt == self.attempts:
                warnings.warn(
                    f"could not push checkpoint step {manifest.step} after {attempt} attempts: "
                    f"{error}; training goes on, the next checkpoint will be pushed",
                    ModelverWarning, stacklevel=1,
                )
                return
            with self._cond:  # a newer checkpoint makes this retry pointless
                if self._cond.wait_for(lambda: self._pending is not None, timeout=delay):
                    return
            delay = min(delay * 2, self.max_backoff)

    def publish(self, path: Path, manifest: fmt.Manifest) -> RunRecord:
        """Upload one checkpoint's objects (and its delta bases'), then write the run record
        naming it."""
        assert self._session is not None
        s = self._session
        try:
            dir_md5, files = self._upload(path, manifest)
            bases = []
            for base_path, base_manifest in fmt.delta_chain(path, manifest):
                bmd5, bfiles = self._upload(base_path, base_manifest)
                named = {k: m for k, (m, _) in bfiles.items()}
                bases.append(PushedDir(base_path.name, bmd5, named))
        except (FileNotFoundError, RemoteError, CheckpointNotFoundError) as e:
            if not (path / fmt.MANIFEST).is_file():
                raise CheckpointGone(str(path)) from e
            raise
        wanted = [dir_md5, *(m for m, _ in files.values())]
        wanted += [m for b in bases for m in (b.dir_md5, *b.files.values())]
        missing = s.store.missing(wanted)
        if missing:  # never name a checkpoint the remote does not hold whole
            raise OSError(f"{len(missing)} object(s) absent from the remote after upload")
        record = RunRecord(
            run=self.run_id, commit=s.commit, branch=s.branch,
            path=s.path, step=manifest.step, step_dir=path.name,
            dir_md5=dir_md5, files={k: m for k, (m, _) in files.items()},
            created=manifest.created, pushed=utcnow(), metrics=dict(manifest.metrics),
            host=socket.gethostname(), bases=tuple(bases),
        )
        data = json.dumps(record.to_json(), indent=1, sort_keys=True).encode()
        s.store.write_record(f"{RUNS}/{self.run_id}.json", data)
        self.published.append(manifest.step)
        return record

    def _upload(self, path: Path, manifest: fmt.Manifest) -> tuple[str, dict[str, tuple[str, int]]]:
        """Put a step directory's files and its ``.dir`` listing (objects already there are
        skipped); return the listing's md5 and name -> (md5, size)."""
        assert self._session is not None
        store = self._session.store
        files: dict[str, tuple[str, int]] = {}
        for name, entry in sorted(manifest.files.items()):
            files[name] = (entry.md5 or md5_file(path / name), entry.size)
        mpath = path / fmt.MANIFEST
        files[fmt.MANIFEST] = (md5_file(mpath), mpath.stat().st_size)
        from modelver.storage.dvc import dir_object

        dir_md5, listing = dir_object(files)
        for name, (md5, _) in files.items():
            store.put_file(path / name, md5)
        store.put_bytes(dir_md5, listing)
        return dir_md5, files


def _in_repo(path: Path) -> bool:
    here = path.resolve()
    return any((d / ".dvc").is_dir() for d in (here, *here.parents))


def _relpath(path: Path, root: Path, *, outside_ok: bool = False) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError as e:
        if outside_ok:  # a node-local disk: `modelver recover` places it under checkpoints/
            return f"checkpoints/{path.resolve().name}"
        raise ModelverError(
            f"checkpoints directory {path} is outside the DVC repository {root}",
            hint="keep checkpoints inside the repository to push them",
        ) from e


def open_session(root: Path, remote: str | None, *, outside_ok: bool = False) -> Session:
    """The remote, and where the run stands in Git. ``outside_ok``: ``root`` may lie outside
    the repository (a node-local disk); the repository is then the working directory's."""
    from modelver.storage.dvc import DvcStorage, find_root

    try:
        inside = not outside_ok or _in_repo(root)
        repo_root = find_root(root.resolve() if inside else Path.cwd())
        path = _relpath(root, repo_root, outside_ok=outside_ok)
        repo = DvcStorage(repo_root)
        try:
            store = repo.remote_store(remote)
            commit, branch = repo.git_head()
        finally:
            repo.close()
    except ModelverError:
        raise
    except Exception as e:  # a broken DVC configuration: say so once, in the training thread
        raise ModelverError(f"cannot push checkpoints: {e}") from e
    return Session(store, path, commit, branch)
