"""Which checkpoints a directory holds: listed, newest first, safe against a concurrent writer.

Verifying is :mod:`modelver.checkpoint.verify`; reading back, :mod:`modelver.checkpoint.restore`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from modelver.checkpoint import format as fmt
from modelver.checkpoint.runid import run_dir
from modelver.errors import CheckpointCorruptedError, CheckpointNotFoundError, ModelverWarning


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as listed from its manifest (data not read)."""

    path: Path
    step: int
    epoch: int | None
    metrics: dict[str, float]
    created: str
    size: int
    n_tensors: int
    bases: tuple[str, ...] = ()  # step dirs its delta files decode against


def info_of(path: Path, m: fmt.Manifest) -> CheckpointInfo:
    return CheckpointInfo(
        path, m.step, m.epoch, m.metrics, m.created, m.total_bytes, len(m.tensors), m.bases
    )


def list_checkpoints(root: str | Path, *, run: object = None) -> list[CheckpointInfo]:
    """Committed checkpoints under ``root`` (of ``run``: a name or the mapping given to the
    manager) in step order; unreadable manifests are skipped."""
    return _committed(run_dir(Path(root), run))[0]


def _committed(root: Path) -> tuple[list[CheckpointInfo], bool]:
    """The listing, and whether an entry vanished while it was read (a writer retiring)."""
    out = []
    vanished = False
    for _, path in fmt.iter_checkpoint_dirs(root):
        try:
            out.append(info_of(path, fmt.read_manifest(path)))
        except CheckpointNotFoundError:  # retired (renamed away) since the directory listing
            vanished = True
        except CheckpointCorruptedError as e:
            warnings.warn(f"skipping {path}: {e.problems[0]}", ModelverWarning, stacklevel=2)
    return sorted(out, key=lambda i: i.step), vanished


def newest_first(root: Path) -> Iterator[list[CheckpointInfo]]:
    """Listings of ``root``, newest first, for as long as a writer keeps retiring what they
    found. An empty listing ends it unless an entry vanished meanwhile (readdir can miss both
    the step a writer retires and the one it commits in its place): then list again."""
    empty = 0
    for _ in fmt.while_retiring():
        found, vanished = _committed(root)
        if found:
            yield list(reversed(found))
        elif vanished or empty < fmt.EMPTY_RELISTS:
            empty += not vanished
        else:
            return



@dataclass
class Listing:
    """What a root holds, as its one writer (the manager holding its lock) knows it, so that a
    save's cost does not grow with the number of checkpoints kept.

    A manifest is read once, when its directory first appears. :meth:`begin` (before a write)
    notes with one ``stat`` of the root whether anything but this writer's own bookkeeping
    changed it since; only then does :meth:`committed` list the root again (names, and the
    manifests of new names only)."""

    root: Path
    known: dict[str, CheckpointInfo] = field(default_factory=dict)
    stamp: tuple[int, int, int] | None = None
    _fresh: bool = False
    _ordered: list[CheckpointInfo] = field(default_factory=list)  # ``known`` in step order

    def begin(self) -> None:
        self._fresh = self.stamp is not None and fmt.dir_stamp(self.root) == self.stamp

    def committed(self, info: CheckpointInfo) -> list[CheckpointInfo]:
        """The checkpoints kept now, ``info`` (just committed) included, in step order."""
        if not self._fresh:
            self._relist(known=info)
        replaced = self.known.get(info.path.name)
        self.known[info.path.name] = info
        if replaced is None and (not self._ordered or self._ordered[-1].step < info.step):
            self._ordered.append(info)  # the usual case: a newer step, no sort
        else:
            self._ordered = sorted(self.known.values(), key=lambda i: i.step)
        self.stamp = fmt.dir_stamp(self.root)
        return self._ordered

    def retired(self, infos: Iterable[CheckpointInfo]) -> None:
        gone = {info.path.name for info in infos}
        if gone:
            for name in gone:
                self.known.pop(name, None)
            self._ordered = [i for i in self._ordered if i.path.name not in gone]
        self.stamp = fmt.dir_stamp(self.root)

    def _relist(self, *, known: CheckpointInfo) -> None:
        """``known``: the checkpoint just committed, whose manifest is not read back."""
        before = fmt.dir_stamp(self.root)
        names = {path.name: path for _, path in fmt.iter_checkpoint_dirs(self.root)}
        self.known = {n: i for n, i in self.known.items() if n in names}
        for name, path in names.items():
            if name in self.known or name == known.path.name:
                continue
            try:
                self.known[name] = info_of(path, fmt.read_manifest(path))
            except CheckpointNotFoundError:  # retired since the listing
                continue
            except CheckpointCorruptedError as e:
                warnings.warn(f"skipping {path}: {e.problems[0]}", ModelverWarning, stacklevel=4)
        self._ordered = sorted(self.known.values(), key=lambda i: i.step)
        self.stamp = before


def latest_checkpoint(root: str | Path, *, run: object = None) -> CheckpointInfo | None:
    found = list_checkpoints(root, run=run)
    return found[-1] if found else None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A step directory, or a checkpoints root (its newest committed checkpoint)."""
    path = Path(path)
    if fmt.manifest_token(path) is not None:
        return path
    for found in newest_first(path):  # a writer may retire the newest between listing and use
        if fmt.manifest_token(found[0].path) is not None:
            return found[0].path
    raise CheckpointNotFoundError(path)
