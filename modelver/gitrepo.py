"""Git access for modelver: the only module that imports GitPython.

Everything here is a thin, typed wrapper so the rest of the code never sees GitPython objects
and so tag listing stays one ``git for-each-ref`` call however many versions exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import git
from git.exc import GitCommandError, InvalidGitRepositoryError, NoSuchPathError

from modelver.errors import NotARepositoryError, RemoteError, UnknownRefError

_FIELD = "\x1f"
_RECORD = "\x1e"
# %(*objectname) is the peeled commit of an annotated tag; empty for lightweight tags.
_TAG_FORMAT = _FIELD.join(
    [
        "%(refname:strip=2)",
        "%(objecttype)",
        "%(objectname)",
        "%(*objectname)",
        "%(taggerdate:iso-strict)",
        "%(contents)",
    ]
).replace(_FIELD, "%1f") + "%1e"


@dataclass(frozen=True)
class TagRecord:
    """One tag as ``git for-each-ref`` reports it."""

    name: str
    annotated: bool
    commit: str
    date: str  # ISO 8601 tagger date ("" for lightweight tags)
    message: str


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

    def head_commit(self) -> str | None:
        return self.try_resolve_commit("HEAD")

    def read_file(self, rev: str, path: str) -> str | None:
        """Text of ``path`` (relative to the repo root) at ``rev``; None when absent."""
        try:
            return self._git("show", f"{rev}:{path}")
        except GitCommandError:
            return None

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
            name, otype, oid, peeled, date, message = raw.split(_FIELD, 5)
            annotated = otype == "tag"
            records.append(TagRecord(name, annotated, peeled if annotated else oid, date, message))
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
