"""The hooks of the checkpoint core: what it tells the objects it saves and the code above it.

Objects in a saved state may say they are per-rank (:class:`PerRank`) or want to know when a
restore is complete (:class:`RestoreAware`); :class:`ResumableSampler` is both.

Work that follows a commit (an upload, DVC's hash state) is supplied from above the core.

The checkpoint core knows no Git, DVC or remote: a :class:`CommitHook` is told of each committed
checkpoint. ``CheckpointManager(on_commit=[...])`` takes the caller's own; the options ``push``
and ``dvc_hashes`` name hooks that the ``modelver`` package provides at import
(:func:`provide`), so the core imports nothing above it. The one question the core asks above
it, :func:`saved_elsewhere` (may ``keep_runs`` remove a run from the workspace?), is answered
the same way (:func:`provide_answer`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from modelver.checkpoint.format import Manifest


@runtime_checkable
class CommitHook(Protocol):
    """Told of every checkpoint this manager commits, on the thread that committed it (the
    save thread with ``async_save``): it must return quickly and report its own failures
    through :meth:`check`, which the training thread calls at each ``maybe_save``."""

    def committed(self, path: Path, manifest: Manifest) -> None: ...

    def check(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class RestoreAware(Protocol):
    """Called once a restore has set every component and the global RNGs (a sampler re-derives
    its epoch's order from the restored generator)."""

    def modelver_after_restore(self) -> None: ...


@runtime_checkable
class PerRank(Protocol):
    """Under ``torch.distributed`` an object whose ``modelver_per_rank`` is true is saved by
    every rank into its own rank file (a sampler's position in its shard), not once by rank 0."""

    @property
    def modelver_per_rank(self) -> bool: ...


@runtime_checkable
class NodeTier(Protocol):
    """The remote half of node-local checkpoints (``CheckpointManager(node_local=True)``):
    every rank uploads its own files in the background and rank 0 commits the checkpoint in
    the remote once all have reported. Provided above the core (:mod:`modelver.nodelocal`)."""

    run: str  # the run whose checkpoints it stores (the record's name in the remote)

    def upload(self, path: Path, names: list[str], manifest: Manifest) -> None:
        """Start uploading this rank's files of a locally committed checkpoint; returns at once."""
        ...

    def outcome(self) -> str | None:
        """Wait for the previous upload (and, on rank 0, its commit); its error, or None."""
        ...

    def latest(self) -> tuple[str, dict[str, str]] | None:
        """Rank 0: the step directory and ``name -> md5`` of the run's newest checkpoint that
        the remote holds whole; None when it holds none."""
        ...

    def fetch(self, md5: str, dest: Path) -> None:
        """Download object ``md5`` to ``dest`` (a temporary name, then a rename)."""
        ...

    def close(self) -> None: ...


Factory = Callable[[Path, Any], CommitHook]  # (checkpoints root, the option's value)
_PROVIDERS: dict[str, Factory] = {}


def provide(option: str, factory: Factory) -> None:
    _PROVIDERS[option] = factory


def hook_for(option: str, root: Path, value: Any) -> CommitHook:
    return _PROVIDERS[option](root, value)  # every option is provided by modelver/__init__.py


TierFactory = Callable[[Path, Any, str], NodeTier]  # (local root, push target, run id)
_TIERS: dict[str, TierFactory] = {}


def provide_tier(factory: TierFactory) -> None:
    _TIERS["node_local"] = factory


def tier_for(root: Path, target: Any, run: str) -> NodeTier:
    return _TIERS["node_local"](root, target, run)  # provided by modelver/__init__.py


SavedElsewhere = Callable[[Path], bool]
_ANSWERS: dict[str, SavedElsewhere] = {}


def provide_answer(question: str, answer: SavedElsewhere) -> None:
    _ANSWERS[question] = answer


def saved_elsewhere(path: Path) -> bool:
    """Whether every file under ``path`` is stored outside the workspace (the DVC cache or
    remote), so removing it loses nothing; False whenever that cannot be told."""
    return _ANSWERS["saved_elsewhere"](path)  # provided by modelver/__init__.py
