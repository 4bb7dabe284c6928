"""Every error modelver raises on purpose.

Each class takes structured fields and builds a message that says what happened and what to do
next (``hint``). The CLI prints ``message`` and ``hint`` on one line each and exits with
``exit_code``; nothing here prints.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from pathlib import Path


class ModelverError(Exception):
    """Base class: a user-facing problem with a hint on how to fix it."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ModelverWarning(UserWarning):
    """Something was skipped or degraded but the operation went on (a corrupted checkpoint)."""


# --- checkpoints ---------------------------------------------------------------------------


class CheckpointNotFoundError(ModelverError, FileNotFoundError):
    def __init__(self, path: str | Path, *, reason: str = "no complete checkpoint") -> None:
        self.path = Path(path)
        super().__init__(
            f"{reason} at {self.path}",
            hint="check the path; a directory counts only once its MANIFEST.json is written",
        )


class CheckpointCorruptedError(ModelverError, ValueError):
    def __init__(self, path: str | Path, problems: Sequence[str]) -> None:
        self.path = Path(path)
        self.problems = list(problems)
        shown = "; ".join(self.problems[:5])
        more = f" (+{len(self.problems) - 5} more)" if len(self.problems) > 5 else ""
        super().__init__(
            f"checkpoint {self.path} is corrupted: {shown}{more}",
            hint="restore an earlier checkpoint, or fetch this one again from the remote",
        )


class StateMismatchError(ModelverError, ValueError):
    """The saved state does not fit the object it is restored into (architecture changed)."""

    def __init__(
        self,
        component: str,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, str, str]] = (),
        detail: str | None = None,
    ) -> None:
        self.component = component
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        parts = []
        if self.mismatched:
            items = ", ".join(f"{n} saved {s} now {c}" for n, s, c in self.mismatched[:6])
            parts.append(f"shape/dtype differs for {items}")
        if self.missing:
            parts.append("not in checkpoint: " + ", ".join(self.missing[:6]))
        if self.unexpected:
            parts.append("not in current object: " + ", ".join(self.unexpected[:6]))
        if detail:
            parts.append(detail)
        super().__init__(
            f"cannot restore '{component}': " + "; ".join(parts),
            hint="build the model/optimizer with the configuration the checkpoint was saved with, "
            "or start a new checkpoint directory",
        )


class NotSerializableError(ModelverError, TypeError):
    def __init__(self, where: str, value: object) -> None:
        self.where = where
        super().__init__(
            f"cannot store {type(value).__name__} at '{where}' in a checkpoint",
            hint="checkpoints hold tensors and JSON values (numbers, strings, lists, dicts) only",
        )


class CheckpointWriteError(ModelverError, OSError):
    """A checkpoint (or the checkpoints directory) could not be written; the hint fits the errno."""

    def __init__(self, path: str | Path, cause: BaseException, *, what: str = "checkpoint") -> None:
        self.path = Path(path)
        self.cause = cause
        errno_ = getattr(cause, "errno", None)
        hint = _WRITE_HINTS.get(errno_) if isinstance(errno_, int) else None
        super().__init__(
            f"could not write {what} {self.path}: {cause}",
            hint=hint or "check the directory and its file system, then run again: earlier "
            "checkpoints are untouched",
        )


_NO_SPACE = "free disk space, then run again: earlier checkpoints are untouched"
_NO_PERMISSION = "permission denied: fix the directory's permissions or owner, or give another"
_NOT_A_DIR = "not a directory: a file is in the way; move it or give another directory"
_WRITE_HINTS = {
    errno.ENOSPC: _NO_SPACE,
    errno.EDQUOT: _NO_SPACE,
    errno.EROFS: "read-only file system: give a directory on a writable one (or remount it)",
    errno.EACCES: _NO_PERMISSION,
    errno.EPERM: _NO_PERMISSION,
    errno.ENOTDIR: _NOT_A_DIR,
    errno.EEXIST: _NOT_A_DIR,
}


class AsyncSaveError(ModelverError, RuntimeError):
    def __init__(self, step: int, cause: BaseException) -> None:
        self.step = step
        self.cause = cause
        super().__init__(
            f"background save of step {step} failed: {cause}",
            hint="the previous committed checkpoint is intact; fix the cause and save again",
        )


class TrainingInterrupted(SystemExit):
    """Raised after the final checkpoint that a SIGTERM/SIGINT asked for: a clean, non-zero exit.

    Non-zero on purpose, so `dvc repro` does not record an unfinished stage as done.
    """

    def __init__(self, signum: int, step: int) -> None:
        self.signum = signum
        self.step = step
        super().__init__(128 + signum)


# --- repositories, versions, storage -------------------------------------------------------


class NotARepositoryError(ModelverError):
    def __init__(self, path: str | Path, kind: str = "Git") -> None:
        self.path = Path(path)
        self.kind = kind
        hint = "run 'git init' first" if kind == "Git" else "run 'modelver init' first"
        super().__init__(f"{self.path} is not inside a {kind} repository", hint=hint)


class InvalidVersionError(ModelverError, ValueError):
    exit_code = 2

    def __init__(self, text: str, *, reason: str = "") -> None:
        self.text = text
        why = f": {reason}" if reason else ""
        super().__init__(
            f"invalid version '{text}'{why}",
            hint="use NAME@vMAJOR.MINOR.PATCH, for example model@v1.2.0",
        )


class UnknownRefError(ModelverError, LookupError):
    def __init__(self, ref: str, *, hint: str | None = None) -> None:
        self.ref = ref
        super().__init__(
            f"unknown reference '{ref}'",
            hint=hint or "run 'modelver list' to see versions, or give a commit or a path",
        )


class LiveHistoryError(ModelverError):
    """DVCLive's history and the checkpoint disagree on what was logged before its step
    (:mod:`modelver.integrations.dvclive`)."""


class AmbiguousRefError(ModelverError, LookupError):
    """A name that several refs carry (a DVC experiment name under two baselines)."""

    def __init__(self, ref: str, matches: Sequence[str]) -> None:
        self.ref = ref
        self.matches = list(matches)
        super().__init__(
            f"'{ref}' names {len(self.matches)} experiments: {', '.join(self.matches)}",
            hint="give the full refs/exps/... ref of the one you mean",
        )


class ArtifactNotFoundError(ModelverError, LookupError):
    def __init__(self, name: str, *, known: Sequence[str] = ()) -> None:
        self.name = name
        self.known = list(known)
        where = ", ".join(self.known) if self.known else "none declared"
        super().__init__(
            f"'{name}' is not an artifact in dvc.yaml or modelver.yaml (known: {where})",
            hint="declare it under 'artifacts:' in dvc.yaml (or modelver.yaml) with its path",
        )


class VersionExistsError(ModelverError):
    def __init__(self, tag: str, *, reason: str = "exists already") -> None:
        self.tag = tag
        super().__init__(f"version {tag} {reason}", hint="pick a higher version or use --bump")


class RegistryStateError(ModelverError):
    """A registry change that the current state refuses (deprecating twice, unassigning a stage
    the version does not hold, promoting a deprecated version)."""

    def __init__(self, what: str, *, hint: str) -> None:
        super().__init__(what, hint=hint)


class DirtyWorkspaceError(ModelverError):
    def __init__(self, what: str, *, hint: str | None = None) -> None:
        self.what = what
        super().__init__(what, hint=hint or "commit or stash your changes first")


class NotPinnedError(ModelverError):
    """A commit pins no checkpoint for the artifact; ``action`` names the command that was run
    ("cannot tag", "cannot show", "cannot check out", ...)."""

    def __init__(self, name: str, rev: str, *, reason: str, action: str = "cannot tag") -> None:
        self.name = name
        self.rev = rev
        self.action = action
        super().__init__(
            f"{action} {name} at {rev}: {reason}",
            hint="run 'dvc repro' (or 'dvc commit') and commit dvc.lock first",
        )


class RemoteError(ModelverError):
    def __init__(self, remote: str, cause: str) -> None:
        self.remote = remote
        super().__init__(
            f"remote '{remote}' failed: {cause}",
            hint="check the remote URL and credentials ('dvc remote list'), then retry",
        )


class UploadError(ModelverError, OSError):
    """A node-local checkpoint did not reach the remote (reported on every rank)."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(
            f"a checkpoint did not reach the remote: {detail}",
            hint="it is on the local disks only: check the remote ('dvc remote list') and save "
            "again, or restart the job to resume from the remote's newest checkpoint",
        )


class DataMissingError(ModelverError, FileNotFoundError):
    def __init__(self, what: str, *, missing: Sequence[str] = ()) -> None:
        self.what = what
        self.missing = list(missing)
        super().__init__(
            f"data for {what} is in neither the local cache nor the remote",
            hint="push it from the machine that produced it ('modelver push')",
        )


# --- CI gate ---------------------------------------------------------------------------


class InvalidRuleError(ModelverError, ValueError):
    """A ``--fail-if`` expression outside the rule language (a usage error: exit 2)."""

    exit_code = 2

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        super().__init__(
            f"invalid rule {clip(text)}: {reason}",
            hint='write a comparison of metrics, e.g. "accuracy < baseline.accuracy - 0.01"; '
            "see --fail-if in 'modelver check --help'",
        )


class InvalidModelSpecError(ModelverError, ValueError):
    exit_code = 2

    def __init__(self, spec: str, reason: str) -> None:
        self.spec = spec
        super().__init__(
            f"invalid --model '{spec}': {reason}",
            hint="give MODULE:FACTORY or path/to/file.py:FACTORY, a callable returning "
            "{'model': ..., 'optimizer': ...}",
        )


class CheckFailedError(ModelverError):
    """Raised by the CLI once the report is out: the one-line reason, exit 1."""

    def __init__(self, reason: str, *, report: str | None = None) -> None:
        super().__init__(
            f"check failed: {reason}",
            hint=f"see {report}" if report else "run with --md FILE for a report",
        )


# --- untrusted input (tags, manifests, run records, remotes) --------------------------------


def clip(value: object, limit: int = 80) -> str:
    """``repr`` of untrusted text, cut so an error line never echoes a whole crafted file."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class UnsafePathError(ModelverError, ValueError):
    """A path taken from data (a tag, a manifest, a run record) that leaves its root."""

    def __init__(self, field: str, value: object, *, root: str | Path, reason: str) -> None:
        self.field = field
        self.value = value
        self.root = Path(root)
        super().__init__(
            f"refusing {field} {clip(value)}: {reason} (root {self.root})",
            hint="the data was crafted or damaged; nothing was read, written or deleted",
        )


class MalformedDataError(ModelverError, ValueError):
    """A field of untrusted JSON (a tag message, a run record, state.json) of the wrong kind."""

    def __init__(self, what: str, field: str, value: object, *, expected: str) -> None:
        self.what = what
        self.field = field
        self.value = value
        super().__init__(
            f"{what}: {field} is {clip(value)}, expected {expected}",
            hint="the data was crafted or damaged; fix or delete it and retry",
        )


class UnsafeCheckpointError(CheckpointCorruptedError, UnsafePathError):
    """A checkpoint whose manifest names a path outside its step directory, or a symlink.

    Both a corrupted checkpoint (restore skips it, verify reports it) and an unsafe path."""

    def __init__(self, path: str | Path, field: str, value: object, *, reason: str) -> None:
        self.path = self.root = Path(path)
        self.field = field
        self.value = value
        self.problems = [f"refusing {field} {clip(value)}: {reason}"]
        ModelverError.__init__(
            self,
            f"checkpoint {self.path} is unsafe: {self.problems[0]}",
            hint="the checkpoint was crafted or damaged; nothing outside it was read",
        )


class CheckpointUnreadableError(CheckpointCorruptedError):
    """A checkpoint file that exists but cannot be read (permissions, I/O error)."""

    def __init__(self, path: str | Path, name: str, cause: OSError) -> None:
        self.path = Path(path)
        self.cause = cause
        self.problems = [f"{name} cannot be read ({cause.strerror or cause})"]
        ModelverError.__init__(
            self,
            f"checkpoint {self.path}: {self.problems[0]}",
            hint="check the files' permissions and the disk; restore falls back to an earlier one",
        )


class CorruptObjectError(DataMissingError):
    """A storage object that fails its content hash where no good copy could be fetched
    (a kind of missing data: no usable copy exists here or in the remote)."""

    def __init__(self, oid: str, *, name: str | None, remote: str, reason: str) -> None:
        self.oid = oid
        self.name = name
        self.remote = remote
        self.what = f"object {oid}" + (f" ({clip(name)})" if name else "")
        self.missing = [oid]
        ModelverError.__init__(
            self,
            f"{self.what} {reason}",
            hint=f"push a good copy to remote '{remote}' from a machine that has one, then retry",
        )


class InvalidArgumentError(ModelverError, ValueError):
    """An option outside its accepted kind or range, refused before anything is written."""

    exit_code = 2

    def __init__(self, name: str, value: object, *, expected: str) -> None:
        self.name = name
        self.value = value
        super().__init__(
            f"invalid {name}={clip(value)}: expected {expected}",
            hint="checked before anything was written; fix the argument and run again",
        )


class CheckpointLockedError(ModelverError):
    """Another process writes checkpoints into this directory (two writers would mix runs)."""

    def __init__(self, path: str | Path, *, owner: str) -> None:
        self.path = Path(path)
        self.owner = owner
        super().__init__(
            f"checkpoints directory {self.path} is in use by another writer: {owner}",
            hint="stop that run or give this one another directory; the lock goes away with "
            "its process",
        )
