"""Model versions as Git tags in the GTO convention.

``NAME@vX.Y.Z`` registers a version; ``NAME#STAGE#N`` assigns a stage (``NAME#STAGE!#N``
unassigns). The annotated tag message carries one line of machine-readable metadata
(``modelver: {json}``) so ``list`` needs nothing but a single ``git for-each-ref`` call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelver.errors import InvalidVersionError
from modelver.gitrepo import TagRecord

NAME_RE = r"[a-zA-Z0-9](?:[a-zA-Z0-9\-/_]*[a-zA-Z0-9])?"
_NAME_ONLY = re.compile(rf"^{NAME_RE}$")
_SEMVER = r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
_VERSION_REF = re.compile(rf"^(?P<name>{NAME_RE})@v(?P<ver>{_SEMVER})$")
_STAGE_REF = re.compile(rf"^(?P<name>{NAME_RE})#(?P<stage>{NAME_RE})$")
_VERSION_TAG = re.compile(rf"^(?P<name>{NAME_RE})@v(?P<ver>{_SEMVER})(?P<cancel>!?)(?:#\d+)?$")
_STAGE_TAG = re.compile(
    rf"^(?P<name>{NAME_RE})#(?P<stage>{NAME_RE})(?P<cancel>!?)#(?P<counter>\d+)$"
)
_COUNTER_TAG = re.compile(rf"^(?P<name>{NAME_RE})[@#].*#(?P<counter>\d+)$")
META_PREFIX = "modelver: "
BUMPS = ("major", "minor", "patch")


@dataclass(frozen=True, order=True)
class Semver:
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"v{self.major}.{self.minor}.{self.patch}"

    @classmethod
    def parse(cls, text: str) -> Semver:
        m = re.fullmatch(_SEMVER, text.removeprefix("v"))
        if not m or not text.startswith("v"):
            raise InvalidVersionError(text, reason="expected vMAJOR.MINOR.PATCH")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)))

    def bump(self, part: str) -> Semver:
        if part == "major":
            return Semver(self.major + 1, 0, 0)
        if part == "minor":
            return Semver(self.major, self.minor + 1, 0)
        if part == "patch":
            return Semver(self.major, self.minor, self.patch + 1)
        raise InvalidVersionError(part, reason=f"bump must be one of {', '.join(BUMPS)}")


def version_tag(name: str, version: Semver) -> str:
    return f"{name}@{version}"


def parse_version_ref(text: str) -> tuple[str, Semver]:
    """Split ``NAME@vX.Y.Z``; anything else with an ``@`` is a malformed version (exit 2)."""
    m = _VERSION_REF.match(text)
    if not m:
        raise InvalidVersionError(text)
    return m.group("name"), Semver.parse("v" + m.group("ver"))


def parse_stage_ref(text: str) -> tuple[str, str] | None:
    m = _STAGE_REF.match(text)
    return (m.group("name"), m.group("stage")) if m else None


def is_name(text: str) -> bool:
    return bool(_NAME_ONLY.match(text))


def check_name(text: str, what: str = "name") -> str:
    if not is_name(text):
        raise InvalidVersionError(text, reason=f"not a valid {what}")
    return text


# --- tag messages --------------------------------------------------------------------------


def format_message(summary: str, meta: Mapping[str, Any]) -> str:
    """Human summary first (what ``git show`` displays), then the metadata line."""
    return f"{summary.strip()}\n\n{META_PREFIX}{json.dumps(meta, sort_keys=True)}\n"


def parse_message(message: str) -> tuple[str, dict[str, Any]]:
    """(summary, metadata); tags made by other tools have no metadata line."""
    meta: dict[str, Any] = {}
    summary_lines = []
    for line in message.splitlines():
        if line.startswith(META_PREFIX):
            try:
                loaded = json.loads(line[len(META_PREFIX) :])
            except ValueError:
                continue
            if isinstance(loaded, dict):
                meta = loaded
        else:
            summary_lines.append(line)
    return "\n".join(summary_lines).strip(), meta


# --- the registry state --------------------------------------------------------------------


@dataclass(frozen=True)
class VersionTag:
    """A registered version, as read from its tag."""

    name: str
    version: Semver
    tag: str
    commit: str
    date: str
    message: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    stages: tuple[str, ...] = ()

    @property
    def step(self) -> int | None:
        step = self.meta.get("step")
        return int(step) if step is not None else None

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.meta.get("metrics") or {})


@dataclass(frozen=True)
class Registry:
    """All versions and stage assignments of a repository."""

    versions: tuple[VersionTag, ...]  # sorted by (name, version)
    stage_counters: dict[str, int]  # name -> highest GTO counter in use

    def of(self, name: str) -> list[VersionTag]:
        return [v for v in self.versions if v.name == name]

    def names(self) -> list[str]:
        return sorted({v.name for v in self.versions})

    def get(self, name: str, version: Semver) -> VersionTag | None:
        for v in self.versions:
            if v.name == name and v.version == version:
                return v
        return None

    def latest(self, name: str) -> VersionTag | None:
        mine = self.of(name)
        return mine[-1] if mine else None

    def in_stage(self, name: str, stage: str) -> VersionTag | None:
        for v in self.of(name):
            if stage in v.stages:
                return v
        return None


def build_registry(records: Iterable[TagRecord]) -> Registry:
    """Interpret tags the way GTO does: registrations, cancellations, latest stage assignment."""
    found: dict[tuple[str, Semver], VersionTag] = {}
    cancelled: set[tuple[str, Semver]] = set()
    counters: dict[str, int] = {}
    # stage events: (name, stage) -> (counter, cancel, version or commit)
    events: dict[tuple[str, str], tuple[int, bool, str | None, str]] = {}
    for rec in records:
        cm = _COUNTER_TAG.match(rec.name)
        if cm:
            counters[cm.group("name")] = max(counters.get(cm.group("name"), 0), int(cm["counter"]))
        if not rec.annotated:
            continue  # GTO ignores lightweight tags
        vm = _VERSION_TAG.match(rec.name)
        if vm:
            key = (vm.group("name"), Semver.parse("v" + vm.group("ver")))
            if vm.group("cancel"):
                cancelled.add(key)
                continue
            summary, meta = parse_message(rec.message)
            found[key] = VersionTag(key[0], key[1], rec.name, rec.commit, rec.date, summary, meta)
            continue
        sm = _STAGE_TAG.match(rec.name)
        if sm:
            skey = (sm.group("name"), sm.group("stage"))
            counter = int(sm.group("counter"))
            _, meta = parse_message(rec.message)
            if skey not in events or events[skey][0] < counter:
                events[skey] = (counter, bool(sm.group("cancel")), meta.get("version"), rec.commit)
    live = {k: v for k, v in found.items() if k not in cancelled}
    stages: dict[tuple[str, Semver], list[str]] = {}
    for (name, stage), (_, cancel, version, commit) in events.items():
        if cancel:
            continue
        target = _stage_target(live, name, version, commit)
        if target is not None:
            stages.setdefault(target, []).append(stage)
    versions = tuple(
        VersionTag(
            v.name, v.version, v.tag, v.commit, v.date, v.message, v.meta,
            tuple(sorted(stages.get(k, []))),
        )
        for k, v in sorted(live.items())
    )
    return Registry(versions, counters)


def _stage_target(
    live: Mapping[tuple[str, Semver], VersionTag], name: str, version: str | None, commit: str
) -> tuple[str, Semver] | None:
    """The version a stage tag assigns: named in its metadata, else the newest at its commit."""
    if version:
        try:
            key = (name, Semver.parse(version))
        except InvalidVersionError:
            key = None
        if key in live:
            return key
    at_commit = [k for k, v in live.items() if k[0] == name and v.commit == commit]
    return max(at_commit) if at_commit else None


def stage_tag(name: str, stage: str, counter: int) -> str:
    return f"{name}#{stage}#{counter}"
