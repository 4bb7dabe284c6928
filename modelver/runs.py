"""Run records: ``<remote>/modelver/runs/<run id>.json``, one per training run that pushed
checkpoints, naming its newest complete checkpoint in the remote; and which run to recover.

A record in the remote is data anyone with write access to the remote can forge:
:meth:`RunRecord.from_json` checks every field (paths relative and inside, step directory
names, hex object ids), and ``recover`` believes a record only as far as the checkpoint it
names verifies (its step is the manifest's).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from modelver import untrusted
from modelver.checkpoint import format as fmt
from modelver.errors import (
    MalformedDataError,
    ModelverError,
    ModelverWarning,
    RemoteError,
    UnsafePathError,
    clip,
)

if TYPE_CHECKING:
    from modelver.remote import RemoteStore

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
