"""Git access for modelver: the only module that imports GitPython.

Everything here is a thin, typed wrapper so the rest of the code never sees GitPython objects
and so tag listing stays one ``git for-each-ref`` call however many versions exist.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import git
from git.exc import GitCommandError, InvalidGitRepositoryError, NoSuchPathError

from modelver.errors import (
    AmbiguousRefError,
    InvalidArgumentError,
    NotARepositoryError,
    RemoteError,
    UnknownRefError,
)

_FIELD = "\x1f"
_RECORD = "\x00"  # a tag message (which anyone who pushes a tag writes) cannot hold a NUL
# %(*objectname) is the peeled commit of an annotated tag; empty for lightweight tags.
_TAG_FORMAT = _FIELD.join(
    [
        "%(refname:strip=2)",
        "%(objecttype)",
        "%(objectname)",
        "%(*objectname)",
        "%(taggerdate:iso-strict)",
        "%(taggername)",
        "%(taggeremail:trim)",
        "%(contents)",
    ]
).replace(_FIELD, "%1f") + "%00"

EXP_REFS = "refs/exps"
# `dvc exp run` keeps an experiment as refs/exps/<baseline[:2]>/<baseline[2:]>/<name>; DVC's own
# bookkeeping refs (refs/exps/exec/..., refs/exps/celery/...) have another shape and are skipped.
_EXP_REF = re.compile(r"^refs/exps/[0-9a-f]{2}/(?:[0-9a-f]{38}|[0-9a-f]{62})/(?P<name>[^/]+)$")
# an experiment name as Git allows it in a ref, minus '@' (NAME@vX.Y.Z is a version) and '/'
_EXP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=,-]{0,199}$")
EXP_HINT = "'dvc exp show' lists experiments, 'dvc exp pull origin EXP' fetches a pushed one"


def exp_name_ok(name: str) -> bool:
    """An experiment name git would accept as a ref component (and never a range or option)."""
    return bool(_EXP_NAME.match(name)) and ".." not in name and not name.endswith((".", ".lock"))


@dataclass(frozen=True)
class ExpRef:
    """One DVC experiment: its ref, its name (as ``dvc exp show`` lists it) and its commit."""

    ref: str
    name: str
    commit: str


@dataclass(frozen=True)
class TagRecord:
    """One tag as ``git for-each-ref`` reports it."""

    name: str
    annotated: bool
    commit: str
    date: str  # ISO 8601 tagger date ("" for lightweight tags)
    message: str
    tagger: str = ""  # the tagger's name and email ("" for lightweight tags)
    tagger_email: str = ""


class GitRepo:
    """A Git working tree (the main one or a linked worktree)."""

    def __init__(self, path: str | Path = ".") -> None:
        try:
            self._repo = git.Repo(Path(path), search_parent_directories=True)
        except (InvalidGitRepositoryError, NoSuchPathError) as e:
            raise NotARepositoryError(Path(path).resolve(), "Git") from e
        if self._repo.bare or self._repo.working_tree_dir is None:
            raise NotARepositoryError(Path(path).resolve(), "Git")
        self.root = Path(self._repo.working_tree_dir)

    def _git(self, *args: str) -> str:
        return str(self._repo.git.execute(["git", *args], strip_newline_in_stdout=False))

    # --- revisions -----------------------------------------------------------------------

    def resolve_commit(self, rev: str) -> str:
        """Full commit SHA of ``rev`` (a branch, tag, or SHA prefix)."""
        try:
            return self._git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").strip()
        except GitCommandError as e:
            raise UnknownRefError(rev) from e

    def try_resolve_commit(self, rev: str) -> str | None:
        try:
            return self.resolve_commit(rev)
        except UnknownRefError:
            return None

    def resolve_commit_or_exp(self, rev: str) -> str:
        """Commit of ``rev`` as git resolves it (branch, tag, SHA first), else of the DVC
        experiment it names: a full ``refs/exps/...`` ref or the experiment's name."""
        if not rev.startswith(EXP_REFS + "/"):
            commit = self.try_resolve_commit(rev)
            if commit is not None:
                return commit
        return self.experiment(rev).commit

    def experiment(self, rev: str) -> ExpRef:
        """The one experiment ``rev`` names (ref or name), from one ``git for-each-ref``.
        A ref of another shape is refused before git sees it; a name two baselines share is
        ambiguous (the error names both refs)."""
        if rev.startswith(EXP_REFS + "/"):
            m = _EXP_REF.match(rev)
            if m is None or not exp_name_ok(m["name"]):
                raise InvalidArgumentError(
                    "experiment ref", rev, expected=f"{EXP_REFS}/<aa>/<rest of the baseline "
                    "SHA>/<name>, as 'dvc exp show --sha' and 'git for-each-ref refs/exps' list it",
                )
            found = [e for e in self.experiments() if e.ref == rev]
        elif exp_name_ok(rev):
            found = [e for e in self.experiments() if e.name == rev]
        else:
            raise UnknownRefError(rev)
        if not found:
            hint = f"not a version, path, branch, commit or experiment: {EXP_HINT}"
            raise UnknownRefError(rev, hint=hint)
        if len(found) > 1:
            raise AmbiguousRefError(rev, [e.ref for e in found])
        return found[0]

    def experiments(self) -> list[ExpRef]:
        """Every local DVC experiment, in one ``git for-each-ref`` call."""
        out = self._git("for-each-ref", "--format=%(refname)%1f%(objectname)", EXP_REFS)
        found = []
        for line in out.splitlines():
            ref, _, oid = line.partition(_FIELD)
            m = _EXP_REF.match(ref)
            if m is not None and exp_name_ok(m["name"]):
                found.append(ExpRef(ref, m["name"], oid))
        return found

    def head_commit(self) -> str | None:
        return self.try_resolve_commit("HEAD")

    def read_file(self, rev: str, path: str) -> str | None:
        """Text of ``path`` (relative to the repo root) at ``rev``; None when absent."""
        try:
            return self._git("show", f"{rev}:{path}")
        except GitCommandError:
            return None

    def read_blobs(self, specs: Sequence[str], *, max_bytes: int) -> list[bytes | None]:
        """Contents of many ``REV:PATH`` blobs in one ``git cat-file --batch`` process, in
        order; None for a missing one (or a tree). A blob over ``max_bytes`` comes back cut to
        ``max_bytes + 1`` bytes (so the caller sees it is too large) and is never held whole."""
        ok = [bool(s) and "\n" not in s and "\r" not in s for s in specs]
        asked = [s for s, good in zip(specs, ok, strict=True) if good]
        if not asked:
            return [None] * len(specs)
        proc = subprocess.Popen(
            ["git", "cat-file", "--batch"], cwd=self.root,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        assert proc.stdin is not None and proc.stdout is not None
        feed = "".join(f"{s}\n" for s in asked).encode()

        def write() -> None:  # a thread, so a full stdout pipe never blocks our writes
            assert proc.stdin is not None
            try:
                proc.stdin.write(feed)
            except BrokenPipeError:
                pass
            finally:
                proc.stdin.close()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        got: list[bytes | None] = []
        try:
            for _ in asked:
                header = proc.stdout.readline().split(b" ")
                if len(header) != 3 or not header[2].strip().isdigit():  # "<spec> missing"
                    got.append(None)
                    continue
                size = int(header[2])
                data = proc.stdout.read(min(size, max_bytes + 1))
                left = size - len(data)
                while left > 0 and (chunk := proc.stdout.read(min(left, 1 << 20))):
                    left -= len(chunk)
                proc.stdout.read(1)  # the newline after each object
                got.append(data if header[1] == b"blob" else None)
        finally:
            writer.join()
            proc.stdout.close()
            proc.wait()
        it = iter(got)
        return [next(it) if good else None for good in ok]

    def is_modified(self, *paths: str) -> bool:
        """Whether any of ``paths`` differ from HEAD (staged, unstaged or untracked)."""
        out = self._git("status", "--porcelain", "--untracked-files=all", "--", *paths)
        return bool(out.strip())

    def is_dirty(self) -> bool:
        return self._repo.is_dirty(untracked_files=False)

    def commit_date(self, rev: str) -> str:
        return self._git("show", "-s", "--format=%cI", rev).strip()

    # --- tags ----------------------------------------------------------------------------

    def list_tags(self, pattern: str = "refs/tags") -> list[TagRecord]:
        """Every tag with its peeled commit and message, in one subprocess call."""
        out = self._git("for-each-ref", f"--format={_TAG_FORMAT}", pattern)
        records = []
        for raw in out.split(_RECORD):
            raw = raw.lstrip("\n")
            if not raw:
                continue
            fields = raw.split(_FIELD, 7)
            if len(fields) != 8:  # not a record git wrote: never one of ours to believe
                continue
            name, otype, oid, peeled, date, tagger, email, message = fields
            annotated = otype == "tag"
            records.append(TagRecord(
                name, annotated, peeled if annotated else oid, date, message, tagger, email
            ))
        return records

    def tag_exists(self, name: str) -> bool:
        return self.try_resolve_commit(f"refs/tags/{name}") is not None

    def create_tag(self, name: str, commit: str, message: str) -> None:
        """An annotated tag (GTO ignores lightweight ones)."""
        self._git("tag", "-a", name, "-m", message, commit)

    # --- branches and worktrees ----------------------------------------------------------

    def branch_exists(self, name: str) -> bool:
        return self.try_resolve_commit(f"refs/heads/{name}") is not None

    def create_branch_checkout(self, name: str, commit: str) -> None:
        """Switch this worktree to a new branch at ``commit`` (the caller checked cleanliness)."""
        self._git("switch", "--quiet", "-c", name, commit)

    def add_worktree(self, path: Path, branch: str, commit: str) -> None:
        self._git("worktree", "add", "--quiet", "-b", branch, str(path), commit)

    def commit_paths(self, message: str, *paths: str) -> str:
        """Stage ``paths`` and commit them; returns the new commit SHA."""
        self._git("add", "--", *paths)
        self._git("commit", "--quiet", "-m", message, "--", *paths)
        return self.resolve_commit("HEAD")

    # --- remotes -------------------------------------------------------------------------

    def has_remote(self, name: str = "origin") -> bool:
        return name in [r.name for r in self._repo.remotes]

    def push_tags(self, tags: list[str], remote: str = "origin") -> None:
        if not tags:
            return
        try:
            self._git("push", "--quiet", remote, *[f"refs/tags/{t}:refs/tags/{t}" for t in tags])
        except GitCommandError as e:
            raise RemoteError(remote, _stderr_line(e)) from e

    def fetch_tags(self, remote: str = "origin") -> None:
        try:
            self._git("fetch", "--quiet", remote, "+refs/tags/*:refs/tags/*")
        except GitCommandError as e:
            raise RemoteError(remote, _stderr_line(e)) from e


def _stderr_line(e: GitCommandError) -> str:
    text = str(e.stderr or e).strip().splitlines()
    return text[-1].strip() if text else str(e)
