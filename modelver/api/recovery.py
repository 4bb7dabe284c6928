"""Checkpoints pushed while training, back on any clone (modelver recover)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelver.errors import DirtyWorkspaceError
from modelver.refs import open_dvc, open_git

Progress = Callable[[int, int], None]


# --- recover -------------------------------------------------------------------------------
# A run's checkpoints pushed in the background (CheckpointManager(push=...)), back on any clone.

if TYPE_CHECKING:
    from modelver.dvcrepo import DvcRepo
    from modelver.publish import RunRecord


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


def list_runs(*, remote: str | None = None, repo_root: str | Path = ".") -> list[RunRecord]:
    """Runs of this repository that pushed checkpoints to the remote, newest first."""
    from modelver.publish import read_runs, runs_of_repo

    git = open_git(repo_root)
    dvc = open_dvc(git.root)
    try:
        runs = read_runs(dvc.remote_store(remote))
    finally:
        dvc.close()
    return runs_of_repo(runs, known=lambda c: git.try_resolve_commit(c) is not None)


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
    checkpoints directory, verified, so ``dvc repro`` continues from it; ``repro`` runs it."""
    from modelver.checkpoint import verify_checkpoint
    from modelver.dvcrepo import repro as run_repro
    from modelver.publish import pick_run, read_runs

    git = open_git(repo_root)
    dvc = open_dvc(git.root)
    try:
        store = dvc.remote_store(remote)
        branch = dvc.git_head()[1]
        rec = pick_run(
            read_runs(store),
            run=run,
            branch=branch,
            remote=store.name,
            known=lambda c: git.try_resolve_commit(c) is not None,
        )
        wanted = [rec.dir_md5, *rec.files.values()]
        wanted += [m for b in rec.bases for m in (b.dir_md5, *b.files.values())]
        missing = dvc.missing_in_cache(wanted)
        dvc.fetch(missing, remote=remote, progress=progress)
        root = git.root / rec.path
        # delta bases first (farthest first), so each directory verifies once it is placed
        for step_dir, dir_md5 in [*((b.step_dir, b.dir_md5) for b in reversed(rec.bases)),
                                  (rec.step_dir, rec.dir_md5)]:
            _place(dvc, dir_md5, root / step_dir, progress=progress)
    finally:
        dvc.close()
    dest = git.root / rec.path / rec.step_dir
    verify_checkpoint(dest)
    if repro:
        run_repro(git.root, quiet=quiet)
    return RecoverResult(rec, dest, store.name, len(missing), repro)


def _place(dvc: DvcRepo, dir_md5: str, dest: Path, *, progress: Progress | None) -> None:
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
