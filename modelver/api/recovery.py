"""Checkpoints pushed while training, back on any clone (modelver recover)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelver.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    DataMissingError,
    DirtyWorkspaceError,
    MalformedDataError,
    ModelverError,
    ModelverWarning,
    RemoteError,
    UnsafePathError,
)
from modelver.refs import open_git
from modelver.storage.dvc import DvcStorage

Progress = Callable[[int, int], None]


# --- recover -------------------------------------------------------------------------------
# A run's checkpoints pushed in the background (CheckpointManager(push=...)), back on any clone.

if TYPE_CHECKING:
    from modelver.gitrepo import GitRepo
    from modelver.remote import RemoteStore
    from modelver.runs import RunRecord


@dataclass(frozen=True)
class RecoverResult:
    run: RunRecord
    path: Path  # the restored step directory in the workspace
    remote: str
    objects: int  # objects fetched from the remote
    reproduced: bool

    def to_json(self) -> dict[str, Any]:
        return {
            **self.run.to_json(),
            "restored": str(self.path),
            "remote": self.remote,
            "objects": self.objects,
            "reproduced": self.reproduced,
        }


CHECKED, UNCHECKED, REFUSED = "checked", "unchecked", "refused"
MAX_LIST_MANIFEST = 16 << 20  # a larger manifest is not read just to list runs


@dataclass(frozen=True)
class ListedRun:
    """A run record as ``recover --list`` shows it: what it claims, and how far that holds.

    ``checked``: the step directory listing and the ``MANIFEST.json`` the record names were
    read from the remote, their md5 matched, the listing is the record's files, and ``step``
    and ``metrics`` are the manifest's. ``unchecked``: the manifest was too large to read for a
    listing (``recover`` checks it). ``refused``: the record is malformed or not borne out.
    Delta bases and file contents are checked by ``recover`` alone.
    """

    run: str
    record: RunRecord | None  # None: the record itself was refused
    status: str  # CHECKED, UNCHECKED or REFUSED
    step: int | None  # the step its manifest names (checked records only)
    metrics: dict[str, float]  # the manifest's (checked records only)
    reason: str | None = None  # why unchecked or refused

    @property
    def claimed_step(self) -> int | None:
        return None if self.record is None else self.record.step

    def to_json(self) -> dict[str, Any]:
        claimed = {} if self.record is None else self.record.to_json()
        return {
            **claimed,
            "run": self.run,
            "status": self.status,
            "step": self.step,
            "metrics": self.metrics,
            "claimed_step": self.claimed_step,
            "claimed_metrics": None if self.record is None else self.record.metrics,
            "reason": self.reason,
        }


def list_runs(*, remote: str | None = None, repo_root: str | Path = ".") -> list[ListedRun]:
    """Runs of this repository that pushed checkpoints to the remote, each checked cheaply
    against its step directory listing and manifest in the remote (two small reads, nothing
    written): checked runs first, newest (by the manifest's step) first, then unchecked ones,
    then refused ones. A crafted record cannot list itself as the newest run."""
    from modelver.runs import read_run_records, runs_of_repo

    git = open_git(repo_root)
    dvc = DvcStorage(git.root)
    try:
        store = dvc.remote_store(remote)
        runs, bad = read_run_records(store)
        mine = runs_of_repo(runs, known=lambda c: git.try_resolve_commit(c) is not None)
        listed = [_check_listed(store, rec) for rec in mine]
    finally:
        dvc.close()
    listed += [ListedRun(run, None, REFUSED, None, {}, e.message) for run, e in sorted(bad.items())]
    rank = {CHECKED: 2, UNCHECKED: 1, REFUSED: 0}
    return sorted(
        listed,
        key=lambda r: (rank[r.status], r.step if r.step is not None else -1,
                       r.claimed_step if r.claimed_step is not None else -1,
                       r.record.pushed if r.record else ""),
        reverse=True,
    )


def _check_listed(store: RemoteStore, rec: RunRecord) -> ListedRun:
    """``rec`` as listed: its listing and manifest read from the remote and compared."""
    from modelver import untrusted
    from modelver.checkpoint import format as ckfmt
    from modelver.runs import read_object

    what = f"run record {rec.run}"
    try:
        raw = read_object(store, rec.dir_md5, what=f"{what} dir_md5", max_bytes=MAX_LIST_MANIFEST)
        if raw is None:
            return ListedRun(rec.run, rec, UNCHECKED, None, {}, "its listing is too large")
        entries = untrusted.load_json(raw, what=f"{what} listing")
        if not isinstance(entries, list) or not all(isinstance(x, dict) for x in entries):
            raise MalformedDataError(what, "listing", rec.dir_md5, expected="a DVC listing")
        listing = {x.get("relpath"): x.get("md5") for x in entries}
        if listing != rec.files:
            raise MalformedDataError(what, "files", sorted(rec.files),
                                     expected="the files of the step directory it names")
        mmd5 = rec.files.get(ckfmt.MANIFEST)
        if mmd5 is None:
            raise MalformedDataError(what, "files", sorted(rec.files),
                                     expected=f"a step directory with {ckfmt.MANIFEST}")
        data = read_object(store, mmd5, what=f"{what} manifest", max_bytes=MAX_LIST_MANIFEST)
        if data is None:
            return ListedRun(rec.run, rec, UNCHECKED, None, {}, "its manifest is too large")
        m = ckfmt.Manifest.from_json(untrusted.load_json(data, what=f"{what} manifest"),
                                     where=rec.step_dir)
        if ckfmt.step_dirname(m.step) != rec.step_dir:
            raise MalformedDataError(what, "step", rec.step,
                                     expected=f"{m.step}, the step its MANIFEST.json names")
    except RemoteError as e:  # the remote failed, the record may be fine: say so, go on
        return ListedRun(rec.run, rec, UNCHECKED, None, {}, e.message)
    except ModelverError as e:
        return ListedRun(rec.run, rec, REFUSED, None, {}, e.message)
    return ListedRun(rec.run, rec, CHECKED, m.step, dict(m.metrics))


# a record the checkpoint it names does not bear out: skipped when picking the newest run
_BAD_RECORD = (MalformedDataError, UnsafePathError, DataMissingError, CheckpointCorruptedError,
               CheckpointNotFoundError)


def recover(
    *,
    remote: str | None = None,
    run: str | None = None,
    repro: bool = False,
    quiet: bool = False,
    repo_root: str | Path = ".",
    progress: Progress | None = None,
) -> RecoverResult:
    """Bring back the newest checkpoint a run of this branch pushed (or run ``run``) into its
    checkpoints directory, verified, so ``dvc repro`` continues from it; ``repro`` runs it.

    Run records are data anyone who can write to the remote can forge. A record is believed
    only as far as its checkpoint verifies: its step directory's listing must be the files it
    names, its ``MANIFEST.json`` must name its step, its path must stay inside this clone.
    A record that fails is skipped with a warning (the next newest is tried); ``run`` naming
    it is an error. Nothing is written in the workspace before the checkpoint is chosen."""
    from modelver.checkpoint import verify_checkpoint
    from modelver.runs import candidate_runs, read_run_records
    from modelver.storage.dvcfile import repro as run_repro

    git = open_git(repo_root)
    dvc = DvcStorage(git.root)
    try:
        store = dvc.remote_store(remote)
        branch = dvc.git_head()[1]
        runs, bad = read_run_records(store)
        if run is not None and run in bad:
            raise bad[run]
        for e in bad.values():
            warnings.warn(f"recover: skipped {e.message}", ModelverWarning, stacklevel=2)
        candidates = candidate_runs(
            runs, run=run, branch=branch, remote=store.name,
            known=lambda c: git.try_resolve_commit(c) is not None,
        )
        chosen = None
        for rec in candidates:
            try:
                chosen = _believe(git, dvc, rec, remote=remote, progress=progress)
                break
            except _BAD_RECORD as e:
                if run is not None:
                    raise
                warnings.warn(f"recover: skipped run {rec.run} (step {rec.step}): {e.message}",
                              ModelverWarning, stacklevel=2)
        if chosen is None:
            raise ModelverError(
                f"no run record in remote '{store.name}' names a checkpoint that verifies",
                hint="see the warnings above; 'modelver recover --list' shows the runs",
            )
        rec, root, missing = chosen
        # delta bases first (farthest first), so each directory verifies once it is placed
        for step_dir, dir_md5 in [*((b.step_dir, b.dir_md5) for b in reversed(rec.bases)),
                                  (rec.step_dir, rec.dir_md5)]:
            _place(dvc, dir_md5, root / step_dir, progress=progress)
    finally:
        dvc.close()
    dest = root / rec.step_dir
    verify_checkpoint(dest)
    if repro:
        run_repro(git.root, quiet=quiet)
    return RecoverResult(rec, dest, store.name, missing, repro)


def _believe(
    git: GitRepo, dvc: DvcStorage, rec: RunRecord, *, remote: str | None,
    progress: Progress | None,
) -> tuple[RunRecord, Path, int]:
    """Check a record against what it names, fetching its objects: (the record with its step
    from the manifest, the checkpoints root in this clone, objects fetched). Raises one of
    ``_BAD_RECORD`` when the record is not borne out; writes nothing in the workspace."""
    from modelver import untrusted
    from modelver.checkpoint import format as ckfmt
    from modelver.materialize import tree

    what = f"run record {rec.run}"
    root = untrusted.inside(git.root, rec.path, field=f"{what} path")
    wanted = [rec.dir_md5, *rec.files.values()]
    wanted += [m for b in rec.bases for m in (b.dir_md5, *b.files.values())]
    missing = dvc.missing_in_cache(dict.fromkeys(wanted))
    manifests = {}
    for step_dir, dir_md5, files in [(rec.step_dir, rec.dir_md5, rec.files),
                                     *((b.step_dir, b.dir_md5, b.files) for b in rec.bases)]:
        _fetch(dvc, [dir_md5], what=what, field=f"{step_dir} dir_md5", remote=remote)
        listing = {f.relpath: f.oid for f in tree(dvc, dir_md5, what=f"{what} {step_dir}")}
        if listing != files:
            raise MalformedDataError(what, f"{step_dir} files", sorted(files),
                                     expected="the files of the step directory it names")
        mmd5 = listing.get(ckfmt.MANIFEST)
        if mmd5 is None:
            raise CheckpointNotFoundError(f"{step_dir} of run {rec.run}")
        _fetch(dvc, [mmd5], what=what, field=f"{step_dir} manifest", remote=remote)
        raw = untrusted.load_json(dvc.object_path(mmd5).read_bytes(),
                                  what=f"{what} {step_dir} manifest")
        m = manifests[step_dir] = ckfmt.Manifest.from_json(raw, where=step_dir)
        if ckfmt.step_dirname(m.step) != step_dir:  # the step is the manifest's, not the record's
            field, claimed = ("step", rec.step) if step_dir == rec.step_dir else ("bases", step_dir)
            raise MalformedDataError(
                what, field, claimed, expected=f"{m.step}, the step its MANIFEST.json names"
            )
    chain = {b.step_dir for b in rec.bases}
    for step_dir, m in manifests.items():
        if not set(m.bases) <= chain:
            raise MalformedDataError(what, "bases", sorted(chain),
                                     expected=f"the delta bases of {step_dir}: {list(m.bases)}")
    _fetch(dvc, missing, what=what, field="files", remote=remote, progress=progress)
    believed = dataclasses.replace(rec, step=manifests[rec.step_dir].step)
    return believed, root, len(missing)


def _fetch(
    dvc: DvcStorage, md5s: list[str], *, what: str, field: str, remote: str | None,
    progress: Progress | None = None,
) -> None:
    """Fetch what a record names; an object the remote lacks makes the record a bad one
    (a record is written only after every object it names is in the remote)."""
    try:
        dvc.fetch(md5s, remote=remote, progress=progress)
    except DataMissingError as e:
        raise MalformedDataError(
            what, field, (e.missing or md5s)[0], expected="an object the remote holds"
        ) from e


def _place(dvc: DvcStorage, dir_md5: str, dest: Path, *, progress: Progress | None) -> None:
    """Write a pushed step directory to ``dest``: staged under a name the CheckpointManager
    ignores (and cleans), verified, renamed. An identical one already there is kept."""
    import secrets
    import shutil

    from modelver.checkpoint import format as ckfmt
    from modelver.checkpoint import verify_checkpoint

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        dvc.materialize(dir_md5, tmp, progress=progress)
        verify_checkpoint(tmp)
        if dest.exists():
            same = (dest / ckfmt.MANIFEST).is_file() and (
                (dest / ckfmt.MANIFEST).read_bytes() == (tmp / ckfmt.MANIFEST).read_bytes()
            )
            if not same:
                raise DirtyWorkspaceError(
                    f"{dest} exists and differs from the pushed checkpoint",
                    hint="move it away, then run 'modelver recover' again",
                )
        else:
            os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
