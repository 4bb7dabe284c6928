"""The registry's journal: every registration, stage assignment, unassignment and
deprecation, oldest first, as ``gto history`` reads the same tags (docs/registry.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from modelver import versions as v
from modelver.errors import ArtifactNotFoundError
from modelver.refs import artifacts_at, open_git

# GTO's event name -> modelver's kind ("deprecate a version" is GTO's deregistration)
KINDS = {"registration": "registration", "deregistration": "deprecation",
         "assignment": "assignment", "unassignment": "unassignment",
         "deprecation": "deprecation"}


@dataclass(frozen=True)
class HistoryEvent:
    """One event. ``version`` is None for an artifact's deprecation (and for a stage tag at a
    commit where no version is registered); ``stage`` is set for (un)assignments only."""

    artifact: str
    version: str | None
    stage: str | None
    kind: str  # "registration" | "assignment" | "unassignment" | "deprecation"
    commit: str
    tag: str
    created: str  # the tagger time, ISO 8601 UTC ("2026-01-01T12:00:00Z")
    author: str
    author_email: str
    message: str  # the tag message without modelver's metadata line
    gto_event: str  # what `gto history` calls it: "deregistration" is a version's deprecation

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def history(name: str | None = None, *, repo_root: str | Path = ".") -> list[HistoryEvent]:
    """Events of every artifact (or of ``name``) in time order, from one ``git for-each-ref``:
    tag names, tagger and message only, no tag metadata parsed."""
    git = open_git(repo_root)
    events, _ = v.read_events(git.list_tags())
    if name is not None:
        v.check_name(name, "artifact name")
        events = [e for e in events if e.name == name]
        if not events and name not in artifacts_at(git, None):
            raise ArtifactNotFoundError(name, known=sorted(artifacts_at(git, None)))
    return [_event(e) for e in events]


def _event(e: v.TagEvent) -> HistoryEvent:
    return HistoryEvent(
        artifact=e.name,
        version=None if e.version is None else str(e.version),
        stage=e.stage,
        kind=KINDS[e.kind],
        commit=e.commit,
        tag=e.tag,
        created=_utc(e.time),
        author=e.record.tagger,
        author_email=e.record.tagger_email,
        message=v.summary_of(e.record.message),
        gto_event=e.kind,
    )


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
