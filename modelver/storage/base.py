"""The whole contract of a storage backend: what a commit pins, and the objects behind it.

A backend answers two kinds of question. Class-level ones need no repository opened and import
nothing heavy (``list`` and ``show`` ask them): what a commit pins for an artifact
(:meth:`Storage.pin`), whether the workspace matches it, how to set a repository up. Instance
ones move data: list a pinned tree by content id, fetch and heal objects, write (materialise) a
tree, push. Content ids are the backend's own: DVC's md5 (``….dir`` for a directory), Git LFS's
sha256 of each file and the Git tree id of the directory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from modelver.gitrepo import GitRepo
    from modelver.storage.dvcfile import Artifact

Progress = Callable[[int, int], None]  # (done, total) in files


@dataclass(frozen=True)
class TreeFile:
    relpath: str  # "step-00000030/model.safetensors"
    oid: str  # the backend's content id of the file
    size: int | None


@dataclass(frozen=True)
class Pin:
    """What a commit pins for an artifact's path."""

    tree: str  # content id of the whole output: DVC ".dir" md5, Git tree id (LFS)
    stage: str | None  # the DVC stage that wrote it (None: no pipeline)
    params: dict[str, Any]  # params file -> the params the run used


@dataclass(frozen=True)
class Setup:
    """What :meth:`Storage.setup` did to a repository."""

    created: bool  # the backend's own repository was initialised (``dvc init``)
    remote: str  # where data goes: a DVC remote's URL, or the Git remote name
    remote_is_new: bool
    link_types: str  # how the workspace is linked to the cache
    lfs_patterns: list[str] = field(default_factory=list)  # .gitattributes lines added
    config_written: bool = False  # modelver.yaml
    notes: tuple[str, ...] = ()  # what was done and what to do next, one line each


class Storage(ABC):
    kind: ClassVar[str]  # the name in modelver.yaml and in the registry
    saved_in: ClassVar[str]  # where a saved workspace is: "in the DVC cache"
    runs_pipeline: ClassVar[bool]  # resume runs ``dvc repro`` even without a dvc.yaml
    tag_meta: ClassVar[dict[str, str]]  # what a version tag records of the backend

    root: Path
    scratch: Path  # read-only copies of versions' step directories (diff, verify, check)

    # --- class level: what a commit pins ---------------------------------------------------

    @classmethod
    @abstractmethod
    def setup(
        cls, root: Path, *, remote: str | None, artifact: tuple[str, str],
        declared: Callable[[], Mapping[str, Artifact]],
    ) -> Setup:
        """Make a Git repository ready (``declared`` reads the artifacts as they are now)."""

    @classmethod
    @abstractmethod
    def pin(cls, git: GitRepo, art: Artifact, commit: str, *, action: str) -> Pin:
        """What ``commit`` pins for ``art``; :class:`~modelver.errors.NotPinnedError` if none."""

    @classmethod
    @abstractmethod
    def check_tag_workspace(cls, git: GitRepo, art: Artifact) -> None:
        """Refuse (DirtyWorkspaceError) to tag HEAD while the workspace differs from it."""

    # --- instance level: objects ------------------------------------------------------------

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def tree(self, tree_id: str) -> list[TreeFile]:
        """Files of a pinned tree, fetching its listing if needed."""

    @abstractmethod
    def object_path(self, oid: str) -> Path: ...

    @abstractmethod
    def missing_in_cache(self, oids: Iterable[str]) -> list[str]: ...

    @abstractmethod
    def corrupt_in_cache(self, oids: Iterable[str]) -> list[str]:
        """Objects present whose content no longer has their id (read in full)."""

    @abstractmethod
    def fetch(self, oids: Iterable[str], *, progress: Progress | None = None) -> None:
        """Get missing objects from the remote; DataMissingError if it lacks them."""

    @abstractmethod
    def heal(self, oids: Iterable[str], *, progress: Progress | None = None) -> list[str]:
        """Move objects that fail their id aside (never deleted) and fetch them again."""

    @abstractmethod
    def materialize(
        self, tree_id: str, dest: Path, *, prefix: str | None = None,
        progress: Progress | None = None, check: Callable[[Path], None] | None = None,
    ) -> None:
        """Write a tree (or its ``prefix`` subdirectory) to ``dest``, built beside it and
        swapped in after ``check`` (given the new tree) returns: ``dest`` is old or new."""

    @abstractmethod
    def workspace_saved(self, path: str) -> bool:
        """Whether replacing the workspace ``path`` loses nothing."""

    @abstractmethod
    def hash_file(self, path: Path) -> str:
        """A file's content id, as :meth:`tree` lists it."""

    @abstractmethod
    def in_remote(self, oids: Sequence[str]) -> bool | None:
        """Whether the remote holds all of these; None when not asked cheaply or no remote."""

    @abstractmethod
    def push(
        self, trees: Sequence[tuple[str, str, str | None]], *, what: str,
        progress: Progress | None = None,
    ) -> int:
        """Upload pinned trees ``(tree id, label, tag)`` and their files; returns how many
        objects were sent. DataMissingError (naming ``what``) when one is nowhere."""

    @abstractmethod
    def share_with(self, worktree: Path) -> None:
        """Let a linked Git worktree use this repository's objects and remote settings."""
