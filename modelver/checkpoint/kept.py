"""Hard-linked copies of committed checkpoints that ``dvc exp run`` cannot delete.

Before it runs the pipeline, ``dvc exp run`` checks out every output ``dvc.lock`` pins, with
force: in a persisted checkpoints directory that deletes each checkpoint a killed run committed
after the last ``dvc.lock``, and the re-run would start over. In a DVC repository the manager
therefore hard-links every checkpoint it commits into ``.dvc/tmp/modelver/kept/<key>/``
(the same inodes: no byte is copied, and no space is used while the workspace keeps them), and
prunes there what retention removed. Under ``dvc exp run`` (``DVC_EXP_NAME`` is set) its
restore first links back the kept checkpoints newer than the run's newest, so the re-run
continues from where the killed one stopped. Elsewhere the workspace is the truth: a
checkpoint a user deleted is never brought back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import warnings
from pathlib import Path

from modelver.checkpoint import format as fmt
from modelver.checkpoint.commit import fsync_dir_quietly, leftover, recover_leftovers
from modelver.errors import ModelverWarning
from modelver.untrusted import STEP_DIR_RE

UNDER_DVC_EXP = "DVC_EXP_NAME"  # set by `dvc exp run` for the stage commands it runs


def kept_dir(root: Path) -> Path | None:
    """Where the kept copies of a checkpoints root go: in the DVC repository that holds it
    (``.dvc/tmp`` is Git-ignored and no output), keyed by the root's path; None outside one."""
    here = Path(os.path.realpath(root))
    for repo in (here, *here.parents):
        dot = repo / ".dvc"
        if dot.is_dir() and not dot.is_symlink():
            rel = here.relative_to(repo).as_posix()
            key = hashlib.sha256(rel.encode()).hexdigest()[:16]
            return dot / "tmp" / "modelver" / "kept" / key
    return None


class KeptCopies:
    """A :class:`~modelver.checkpoint.hooks.CommitHook`: links each committed checkpoint aside."""

    def __init__(self, root: Path, where: Path) -> None:
        self.root = root
        self.where = where
        self._broken: str | None = None  # the first failure: linking stops, one warning
        if where.is_dir():  # what a killed link left: finished or removed, as in a root
            with contextlib.suppress(OSError):
                recover_leftovers(where)

    def committed(self, path: Path, manifest: fmt.Manifest) -> None:
        if self._broken is not None:
            return
        try:  # links only: a save's cost must not grow with the checkpoints kept
            self.where.mkdir(parents=True, exist_ok=True)
            _link_tree(path, self.where / path.name)
        except OSError as e:  # another file system, no hard links: the run goes on without
            self._broken = f"{type(e).__name__}: {e}"

    def retired(self, names: list[str]) -> None:
        """Retention removed these step directories: their kept copies go too."""
        for name in names:
            shutil.rmtree(self.where / name, ignore_errors=True)

    def check(self) -> None:
        if self._broken is not None:
            msg, self._broken = self._broken, "reported"
            if msg != "reported":
                warnings.warn(
                    f"checkpoints of {self.root} are not kept aside in {self.where} ({msg}): a "
                    "killed `dvc exp run` re-run will continue from what dvc.lock pins",
                    ModelverWarning,
                    stacklevel=4,
                )

    def close(self) -> None:
        self.check()

    def bring_back(self) -> list[str]:
        """At a restore. Under ``dvc exp run``: link back the kept checkpoints newer than the
        newest one in the workspace (DVC's checkout deleted them); returns their names. Each
        one is verified by the restore that follows, like any other. Then the kept copies of
        what the workspace no longer has are removed."""
        present = {p.name: s for s, p in fmt.iter_checkpoint_dirs(self.root)}
        if os.environ.get(UNDER_DVC_EXP):
            back = self._link_back(max(present.values(), default=-1))
            present.update(dict.fromkeys(back, 0))
        else:
            back = []
        for old in _step_dirs(self.where):  # the rest the workspace lost (a user deleted it)
            if old.name not in present:
                shutil.rmtree(old, ignore_errors=True)
        return back

    def _link_back(self, newest: int) -> list[str]:
        back = []
        for kept in _step_dirs(self.where):
            m = STEP_DIR_RE.match(kept.name)
            if m is None or int(m.group(1)) <= newest or (self.root / kept.name).exists():
                continue
            try:
                tmp = leftover(self.root / kept.name, "tmp")  # cleaned like any killed write
                _link_tree(kept, tmp, atomic=False)
                os.rename(tmp, self.root / kept.name)
            except OSError:
                continue  # the restore takes what the workspace has
            back.append(kept.name)
        if back:
            fsync_dir_quietly(self.root)
        return back


def _step_dirs(where: Path) -> list[Path]:
    try:
        return sorted(p for p in where.iterdir()
                      if STEP_DIR_RE.match(p.name) and p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def _link_tree(src: Path, dest: Path, *, atomic: bool = True) -> None:
    """Hard-link every file of a step directory (its manifest last) into ``dest``: written
    beside it and renamed, so a kill leaves no half-linked copy under the real name."""
    tmp = leftover(dest, "tmp") if atomic else dest
    tmp.mkdir()
    names = sorted(os.listdir(src), key=lambda n: n == fmt.MANIFEST)
    for name in names:
        if (src / name).is_file() and not (src / name).is_symlink():
            os.link(src / name, tmp / name)
    if atomic:
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
