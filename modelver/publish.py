"""Background push of committed checkpoints to the DVC remote, and the run records
``modelver recover`` reads on a fresh machine.

Each checkpoint is uploaded as DVC objects (one per file, keyed by its md5, plus the ``.dir``
listing of the step directory), so ``dvc push`` later skips them and ``dvc fetch`` can read
them. Only after every object is in the remote is the run's record
``<remote>/modelver/runs/<run id>.json`` (re)written to name it: a record never points at a
checkpoint the remote does not hold whole.

The training thread only enqueues (:meth:`Publisher.submit`); one thread uploads, newest
checkpoint first: a checkpoint still waiting when a newer one commits is skipped. Imports of
DVC happen in that thread, so the checkpoint core never needs DVC.

A record in the remote is data anyone with write access to the remote can forge:
:meth:`RunRecord.from_json` checks every field (paths relative and inside, step directory
names, hex object ids), and ``recover`` believes a record only as far as the checkpoint it
names verifies (its step is the manifest's).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import threading
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelver import untrusted
from modelver.checkpoint import format as fmt
from modelver.errors import (
    CheckpointNotFoundError,
    MalformedDataError,
    ModelverError,
    ModelverWarning,
    RemoteError,
    UnsafePathError,
    clip,
)

if TYPE_CHECKING:
    from modelver.dvcrepo import RemoteStore

RUNS = "runs"
RECORD_VERSION = 1
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
MAX_RECORD_BYTES = 16 << 20


def _md5(value: object, *, what: str, field: str, dir_object: bool = False) -> str:
    """A DVC object id (``.dir`` for a listing): hex only, it becomes a cache path."""
    text = untrusted.string(value, what=what, field=field, max_len=40)
    if not _MD5.match(text.removesuffix(".dir")) or text.endswith(".dir") != dir_object:
        kind = "a hex md5" + (" ending in .dir" if dir_object else "")
        raise MalformedDataError(what, field, value, expected=kind)
    return text


def _files(value: object, *, what: str, field: str) -> dict[str, str]:
    """File name (relative, inside its step directory) -> md5."""
    out = {}
    for name, md5 in untrusted.mapping(value, what=what, field=field).items():
        rel = str(untrusted.relative_path(name, field=f"{what} {field} name", root="<step dir>"))
        out[rel] = _md5(md5, what=what, field=f"{field}.{rel}")
    return out


def _opt_str(value: object, *, what: str, field: str) -> str | None:
    return None if value is None else untrusted.string(value, what=what, field=field, max_len=256)


@dataclass(frozen=True)
class PushedDir:
    """A base step directory a delta checkpoint decodes against, uploaded with it."""

    step_dir: str
    dir_md5: str
    files: dict[str, str]

    @classmethod
    def from_json(cls, d: object, *, what: str = "run record base") -> PushedDir:
        d = untrusted.mapping(d, what=what, field="bases[]")
        return cls(
            untrusted.step_dirname(d.get("step_dir"), field=f"{what} step_dir", root="<path>"),
            _md5(d.get("dir_md5"), what=what, field="dir_md5", dir_object=True),
            _files(d.get("files"), what=what, field="files"),
        )


@dataclass(frozen=True)
class RunRecord:
    """What a run's record in the remote says: its newest fully uploaded checkpoint."""

    run: str
    commit: str | None  # Git HEAD when the run pushed its first checkpoint
    branch: str | None
    path: str  # the checkpoints root, relative to the repository root ("checkpoints")
    step: int
    step_dir: str
    dir_md5: str  # DVC ".dir" object of the step directory
    files: dict[str, str]  # file name -> md5 (DVC object id)
    created: str  # when the checkpoint was written (its manifest)
    pushed: str  # when this record was written
    metrics: dict[str, float]
    host: str
    bases: tuple[PushedDir, ...] = ()  # its delta base chain, nearest first

    def to_json(self) -> dict[str, Any]:
        return {"modelver_run": RECORD_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, d: object, *, what: str = "run record") -> RunRecord:
        """Every field checked; :class:`MalformedDataError` or :class:`UnsafePathError`
        naming the field and the value otherwise."""
        d = untrusted.mapping(d, what=what, field="the record")
        if d.get("modelver_run") != RECORD_VERSION:
            raise MalformedDataError(
                what, "modelver_run", d.get("modelver_run"), expected=str(RECORD_VERSION)
            )
        commit = _opt_str(d.get("commit"), what=what, field="commit")
        if commit is not None and not _COMMIT.match(commit):
            raise MalformedDataError(what, "commit", commit, expected="a hex commit id")
        step_dir = untrusted.step_dirname(d.get("step_dir"), field=f"{what} step_dir",
                                          root="<path>")
        step = untrusted.integer(d.get("step"), what=what, field="step")
        if step_dir != fmt.step_dirname(step):
            raise MalformedDataError(what, "step", step, expected=f"the step of {step_dir}")
        bases = d.get("bases") or []
        if not isinstance(bases, list):
            raise MalformedDataError(what, "bases", bases, expected="a list")
        return cls(
            run=untrusted.string(d.get("run"), what=what, field="run", max_len=256),
            commit=commit,
            branch=_opt_str(d.get("branch"), what=what, field="branch"),
            path=str(untrusted.relative_path(d.get("path"), field=f"{what} path",
                                             root="<repository>")),
            step=step,
            step_dir=step_dir,
            dir_md5=_md5(d.get("dir_md5"), what=what, field="dir_md5", dir_object=True),
            files=_files(d.get("files"), what=what, field="files"),
            created=untrusted.string(d.get("created", ""), what=what, field="created"),
            pushed=untrusted.string(d.get("pushed"), what=what, field="pushed", max_len=64),
            metrics=untrusted.metrics(d.get("metrics"), what=what),
            host=untrusted.string(d.get("host", ""), what=what, field="host", max_len=256),
            bases=tuple(PushedDir.from_json(b, what=f"{what} base") for b in bases),
        )


def read_run_records(
    store: RemoteStore,
) -> tuple[list[RunRecord], dict[str, ModelverError]]:
    """(the valid run records in the remote, run id -> why its record was refused)."""
    found: list[RunRecord] = []
    bad: dict[str, ModelverError] = {}
    for name, data in store.read_records(RUNS).items():
        what = f"run record {untrusted.string(name, what='run record', field='name')}"
        try:
            found.append(RunRecord.from_json(
                untrusted.load_json(data, what=what, max_bytes=MAX_RECORD_BYTES), what=what
            ))
        except (MalformedDataError, UnsafePathError) as e:
            bad[name.removesuffix(".json")] = e
    return found, bad


def read_object(store: RemoteStore, md5: str, *, what: str, max_bytes: int) -> bytes | None:
    """Object ``md5`` straight from the remote (nothing written here), its md5 checked.

    None when it is larger than ``max_bytes`` (too dear to read just to list runs).
    :class:`MalformedDataError` when the remote lacks it or its bytes are not that md5: a
    record is written only after every object it names is in the remote, whole.
    """
    oid = _md5(md5, what=what, field="object", dir_object=md5.endswith(".dir"))
    path = store.odb.oid_to_path(oid)
    try:
        size = int(store.fs.info(path).get("size") or 0)
        data = None if size > max_bytes else bytes(store.fs.cat_file(path))
    except FileNotFoundError as e:
        raise MalformedDataError(what, "object", oid, expected="an object the remote holds") from e
    except Exception as e:  # each file system raises its own errors (botocore, ...)
        raise RemoteError(store.name, str(e).strip().splitlines()[0] if str(e).strip()
                          else type(e).__name__) from e
    if data is not None and hashlib.md5(data, usedforsecurity=False).hexdigest() != oid[:32]:
        raise MalformedDataError(what, "object", oid, expected="bytes with that md5")
    return data


def read_runs(store: RemoteStore) -> list[RunRecord]:
    """Every valid run record in the remote; each refused one is a warning."""
    found, bad = read_run_records(store)
    for e in bad.values():
        warnings.warn(f"skipped {e.message}", ModelverWarning, stacklevel=2)
    return found


def new_run_id() -> str:
    now = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{os.getpid()}-{secrets.token_hex(3)}"


def _utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def file_md5(path: Path) -> str:
    """md5 of a file: the id DVC stores it under."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb", buffering=0) as f:
        view = memoryview(bytearray(fmt.CHUNK))
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


class CheckpointGone(Exception):
    """The step directory was removed (retention) before it was uploaded."""


@dataclass(frozen=True)
class _Session:
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
        self._session: _Session | None = None
        self._thread: threading.Thread | None = None

    # --- training thread ---------------------------------------------------------------

    def submit(self, path: Path, manifest: fmt.Manifest) -> None:
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
                self._session = _open_session(self.root, self.remote)
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
            created=manifest.created, pushed=_utcnow(), metrics=dict(manifest.metrics),
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
            files[name] = (entry.md5 or file_md5(path / name), entry.size)
        mpath = path / fmt.MANIFEST
        files[fmt.MANIFEST] = (file_md5(mpath), mpath.stat().st_size)
        from modelver.dvcrepo import dir_object

        dir_md5, listing = dir_object(files)
        for name, (md5, _) in files.items():
            store.put_file(path / name, md5)
        store.put_bytes(dir_md5, listing)
        return dir_md5, files


def _relpath(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError as e:
        raise ModelverError(
            f"checkpoints directory {path} is outside the DVC repository {root}",
            hint="keep checkpoints inside the repository to push them",
        ) from e


def _open_session(root: Path, remote: str | None) -> _Session:
    from modelver.dvcrepo import DvcRepo, find_root

    try:
        repo_root = find_root(root.resolve())
        path = _relpath(root, repo_root)
        repo = DvcRepo(repo_root)
        try:
            store = repo.remote_store(remote)
            commit, branch = repo.git_head()
        finally:
            repo.close()
    except ModelverError:
        raise
    except Exception as e:  # a broken DVC configuration: say so once, in the training thread
        raise ModelverError(f"cannot push checkpoints: {e}") from e
    return _Session(store, path, commit, branch)


# --- recover: pick a run ---------------------------------------------------------------------


def runs_of_repo(runs: list[RunRecord], *, known: Callable[[str], bool]) -> list[RunRecord]:
    """Runs of this repository (their commit is in this clone), newest first: by step, then
    by the time they pushed."""
    mine = [r for r in runs if r.commit is not None and known(r.commit)]
    return sorted(mine, key=lambda r: (r.step, r.pushed), reverse=True)


def pick_run(
    runs: list[RunRecord],
    *,
    run: str | None,
    branch: str | None,
    known: Callable[[str], bool],
    remote: str,
) -> RunRecord:
    """The run ``run``, else the newest run of this repository on ``branch``."""
    return candidate_runs(runs, run=run, branch=branch, known=known, remote=remote)[0]


def candidate_runs(
    runs: list[RunRecord],
    *,
    run: str | None,
    branch: str | None,
    known: Callable[[str], bool],
    remote: str,
) -> list[RunRecord]:
    """The run ``run`` alone, else this repository's runs on ``branch``, newest (by the step
    the record claims) first: ``recover`` takes the first whose checkpoint verifies."""
    if run is not None:
        for r in runs:
            if r.run == run:
                return [r]
        raise ModelverError(
            f"no run {clip(run)} in remote '{remote}'",
            hint="'modelver recover --list' shows the runs pushed from this repository",
        )
    ours = runs_of_repo(runs, known=known)
    on_branch = [r for r in ours if r.branch == branch]
    if on_branch:
        return on_branch
    where = f" on branch '{branch}'" if branch else ""
    if ours:
        hint = (f"runs of other branches exist ({', '.join(sorted({str(r.branch) for r in ours}))})"
                ": check that branch out, or pick one with --run (see --list)")
    else:
        hint = ("train with CheckpointManager(..., push=True) to push checkpoints while "
                "training; --remote picks another remote")
    raise ModelverError(
        f"no checkpoint of this repository{where} was pushed to remote '{remote}'", hint=hint
    )
