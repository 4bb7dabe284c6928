"""Model versions as Git tags in the GTO convention.

``NAME@vX.Y.Z`` registers a version (``NAME@vX.Y.Z!`` deregisters it: modelver's "deprecate
a version"); ``NAME#STAGE#N`` assigns a stage (``NAME#STAGE!#N`` unassigns);
``NAME@deprecated`` deprecates the artifact. The annotated tag message carries one line of
machine-readable metadata (``modelver: {json}``) so ``list`` and ``history`` need nothing but
a single ``git for-each-ref`` call. The state is what GTO 1.10 computes (docs/registry.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from modelver import untrusted
from modelver.errors import (
    InvalidVersionError,
    MalformedDataError,
    ModelverError,
    UnsafePathError,
)
from modelver.gitrepo import TagRecord

NAME_RE = r"[a-zA-Z0-9](?:[a-zA-Z0-9\-/_]*[a-zA-Z0-9])?"
_NAME_ONLY = re.compile(rf"^{NAME_RE}$")
_SEMVER = r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
_VERSION_REF = re.compile(rf"^(?P<name>{NAME_RE})@v(?P<ver>{_SEMVER})$")
_STAGE_REF = re.compile(rf"^(?P<name>{NAME_RE})#(?P<stage>{NAME_RE})$")
# GTO's tag grammar (gto/constants.py tag_re) without its ``dir:name`` artifacts and semver
# pre-releases, which modelver never writes: a registration ``NAME@vX.Y.Z`` (``!``: its
# deregistration), an assignment ``NAME#STAGE`` (``!``: unassignment), an artifact's deprecation
# ``NAME@deprecated``; each with an optional ``#N`` counter
_EVENT_TAG = re.compile(
    rf"^(?P<name>{NAME_RE})(?:@v(?P<ver>{_SEMVER})(?P<vcancel>!?)"
    rf"|#(?P<stage>{NAME_RE})(?P<scancel>!?)|@(?P<deprecated>deprecated))(?:#(?P<counter>\d+))?$"
)
_COUNTER_TAG = re.compile(rf"^(?P<name>{NAME_RE})[@#].*#(?P<counter>\d+)$")
META_PREFIX = "modelver: "
BUMPS = ("major", "minor", "patch")
# a DVC md5 (".dir" for a directory), a Git tree hash (SHA-1 or SHA-256) or an LFS oid: hex only,
# because it names a directory under the scratch area and an object in the cache
HASH_RE = re.compile(r"^[0-9a-f]{32,64}(\.dir)?$")
_VERSION_TEXT = re.compile(rf"^v{_SEMVER}$")


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
    """(summary, raw metadata); tags made by other tools have no metadata line.

    The metadata is untrusted (anyone who can push a tag wrote it): :func:`parse_meta` is the
    one place that turns it into values. A ``modelver:`` line that is not JSON is summary text
    (a user may write one); JSON that is too big or too deep is refused there too.
    """
    meta: dict[str, Any] = {}
    problem: MalformedDataError | None = None
    summary_lines = []
    for line in message.splitlines():
        if line.startswith(META_PREFIX):
            try:
                loaded = untrusted.load_json(line[len(META_PREFIX) :], what="tag metadata")
            except MalformedDataError as e:
                if e.field != "content":  # too big or too deep: crafted, refused below
                    problem = problem or e
                else:
                    summary_lines.append(line)
                continue
            if isinstance(loaded, dict):
                meta = loaded
        else:
            summary_lines.append(line)
    if problem is not None:
        raise problem
    return "\n".join(summary_lines).strip(), meta


def parse_meta(
    meta: Mapping[str, Any], *, tag: str, root: str | Path = "."
) -> dict[str, Any]:
    """The metadata of tag ``tag``, every known field checked; unknown fields are dropped.

    Raises :class:`~modelver.errors.MalformedDataError` or
    :class:`~modelver.errors.UnsafePathError` naming the field and the value: a tag whose
    metadata fails is listed as invalid and refused by every command that would use it.
    ``path`` is checked as text here (relative, no ``..``); :mod:`modelver.refs` checks it
    against the repository (symlinks) and against what the tag's commit declares.
    """
    what = f"tag {tag}"
    out: dict[str, Any] = {}

    def fld(key: str) -> str:
        return f"{what} {key}"

    if meta.get("modelver") is not None:
        out["modelver"] = untrusted.integer(meta["modelver"], what=what, field="modelver")
    if meta.get("step") is not None:
        out["step"] = untrusted.integer(meta["step"], what=what, field="step")
    if meta.get("step_dir") is not None:
        out["step_dir"], _, step = untrusted.checkpoint_subdir(
            meta["step_dir"], field=fld("step_dir"), root=root
        )
        if "step" in out and step != out["step"]:
            raise MalformedDataError(
                what, "step", out["step"], expected=f"the step of step_dir {out['step_dir']}"
            )
        out.setdefault("step", step)
    if "metrics" in meta:
        out["metrics"] = untrusted.metrics(meta["metrics"], what=what)
    if meta.get("checkpoint") is not None:
        md5 = untrusted.string(meta["checkpoint"], what=what, field="checkpoint", max_len=80)
        if not HASH_RE.match(md5):
            raise MalformedDataError(what, "checkpoint", md5, expected="a hex content hash")
        out["checkpoint"] = md5
    if meta.get("path") is not None:
        out["path"] = str(untrusted.relative_path(meta["path"], field=fld("path"), root=root))
    for key in ("stage", "backend"):
        if meta.get(key) is not None:
            out[key] = untrusted.string(meta[key], what=what, field=key, max_len=256)
    for key in ("parent", "version"):  # a version of the same artifact: "vX.Y.Z"
        if meta.get(key) is not None:
            text = untrusted.string(meta[key], what=what, field=key, max_len=64)
            if not _VERSION_TEXT.match(text):
                raise MalformedDataError(what, key, text, expected="a version vX.Y.Z")
            out[key] = text
    return out


def read_tag_meta(
    message: str, *, tag: str, root: str | Path = "."
) -> tuple[str, dict[str, Any], ModelverError | None]:
    """(summary, checked metadata, problem): a bad tag gives ``{}`` and the error to raise."""
    try:
        summary, raw = parse_message(message)
        return summary, parse_meta(raw, tag=tag, root=root), None
    except (MalformedDataError, UnsafePathError) as e:
        return summary_of(message), {}, e


def summary_of(message: str) -> str:
    """A tag message without its metadata line: what a person wrote."""
    return "\n".join(
        line for line in message.splitlines() if not line.startswith(META_PREFIX)
    ).strip()


# --- events: what each tag does, in GTO's order --------------------------------------------

# GTO's event priorities (gto/base.py). Its clock is the tagger time (whole seconds); events of
# one second sort by priority and the later one decides: a deregistration beats the registration
# of its second, an unassignment the assignment, and any event of the artifact a deprecation.
PRIORITY = {"deprecation": 2, "registration": 3, "deregistration": 4, "assignment": 5,
            "unassignment": 6}


@dataclass(frozen=True)
class TagEvent:
    """One registry event: an annotated tag read with GTO's grammar. The ``version`` of a
    stage event is the registered version at the tag's commit, as GTO finds it (None: none)."""

    kind: str  # GTO's names: registration, deregistration, assignment, unassignment, deprecation
    name: str
    tag: str
    commit: str
    time: float  # tagger time, seconds since the epoch
    counter: int | None
    version: Semver | None
    stage: str | None
    record: TagRecord = field(compare=False, repr=False)  # author, date and message

    @property
    def order(self) -> tuple[float, int, int, str]:
        return (self.time, PRIORITY[self.kind], self.counter or 0, self.tag)


def event_tag(
    kind: str, name: str, *, version: Semver | None = None, stage: str | None = None,
    counter: int | None = None,
) -> str:
    """The tag GTO writes for an event; ``counter`` None gives its simple form (no ``#N``)."""
    base = {
        "registration": f"{name}@{version}", "deregistration": f"{name}@{version}!",
        "assignment": f"{name}#{stage}", "unassignment": f"{name}#{stage}!",
        "deprecation": f"{name}@deprecated",
    }[kind]
    return base if counter is None else f"{base}#{counter}"


def event_of(tag: str) -> tuple[str, str] | None:
    """(artifact name, GTO event kind) of a tag in GTO's grammar; None for any other tag."""
    m = _EVENT_TAG.match(tag)
    if m is None:
        return None
    if m["ver"] is not None:
        return m["name"], "deregistration" if m["vcancel"] else "registration"
    if m["stage"] is not None:
        return m["name"], "unassignment" if m["scancel"] else "assignment"
    return m["name"], "deprecation"


def stage_tag(name: str, stage: str, counter: int) -> str:
    return event_tag("assignment", name, stage=stage, counter=counter)


def _seconds(date: str) -> float:
    try:
        return datetime.fromisoformat(date).timestamp()
    except ValueError:  # a tag without a tagger line (git mktag allows one): the epoch
        return 0.0


def read_events(records: Iterable[TagRecord]) -> tuple[list[TagEvent], dict[str, int]]:
    """Every registry event in GTO's order, and each artifact's highest ``#N`` counter (of any
    tag, lightweight ones too: GTO counts them all, and ignores lightweight tags otherwise).

    Names only, no tag metadata: ``history`` over a thousand versions reads nothing else."""
    counters: dict[str, int] = {}
    found: list[tuple[re.Match[str], TagRecord]] = []
    registered: dict[tuple[str, str], list[Semver]] = {}  # (name, commit) -> versions there
    for rec in records:
        cm = _COUNTER_TAG.match(rec.name)
        if cm:
            counters[cm["name"]] = max(counters.get(cm["name"], 0), int(cm["counter"]))
        m = _EVENT_TAG.match(rec.name) if rec.annotated else None
        if m is None:
            continue
        found.append((m, rec))
        if m["ver"] is not None and not m["vcancel"]:
            registered.setdefault((m["name"], rec.commit), []).append(Semver.parse("v" + m["ver"]))
    events = []
    for m, rec in found:
        counter = int(m["counter"]) if m["counter"] else None
        version: Semver | None = None
        if m["ver"] is not None:
            kind = "deregistration" if m["vcancel"] else "registration"
            version = Semver.parse("v" + m["ver"])
        elif m["stage"] is not None:
            kind = "unassignment" if m["scancel"] else "assignment"
            version = _at_commit(registered.get((m["name"], rec.commit), []), rec.message)
        else:
            kind = "deprecation"
        events.append(TagEvent(kind, m["name"], rec.name, rec.commit, _seconds(rec.date),
                               counter, version, m["stage"], rec))
    events.sort(key=lambda e: e.order)
    return events, counters


def _at_commit(versions: list[Semver], message: str) -> Semver | None:
    """The version a stage tag means: the one registered at its commit. Several there (GTO
    refuses that, modelver never tags so): the one its metadata names, else the highest."""
    if len(versions) < 2:
        return versions[0] if versions else None
    try:
        named = parse_message(message)[1].get("version")
        wanted = Semver.parse(named) if isinstance(named, str) else None
    except (MalformedDataError, InvalidVersionError):
        wanted = None
    return wanted if wanted in versions else max(versions)


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
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # checked (parse_meta)
    stages: tuple[str, ...] = ()  # the stages whose current version this is
    problem: ModelverError | None = field(default=None, compare=False)  # why it is invalid
    deprecated: str | None = None  # the tag that deprecated it or its artifact (None: live)
    assigned: tuple[str, ...] = ()  # stages with an assignment in effect (current or not)

    @property
    def step(self) -> int | None:
        step = self.meta.get("step")
        return int(step) if step is not None else None

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.meta.get("metrics") or {})

    @property
    def invalid(self) -> str | None:
        """Why the tag's metadata was refused (None: it is valid)."""
        return None if self.problem is None else self.problem.message

    def check(self) -> None:
        """Raise the problem of an invalid tag: nothing may use its metadata."""
        if self.problem is not None:
            raise self.problem


@dataclass(frozen=True)
class Registry:
    """All versions, stage assignments and deprecations of a repository."""

    versions: tuple[VersionTag, ...]  # live versions, sorted by (name, version)
    stage_counters: dict[str, int]  # name -> highest GTO counter in use
    deprecated: tuple[VersionTag, ...]  # deregistered, or of a deprecated artifact
    events: tuple[TagEvent, ...]  # in GTO's order
    deprecated_artifacts: dict[str, str]  # name -> the tag that deprecated it

    def of(self, name: str, *, deprecated: bool = False) -> list[VersionTag]:
        """``name``'s versions, oldest first; the deprecated ones too if asked."""
        mine = [v for v in self.versions if v.name == name]
        if deprecated:
            mine = sorted(mine + [v for v in self.deprecated if v.name == name],
                          key=lambda v: v.version)
        return mine

    def names(self) -> list[str]:
        return sorted({v.name for v in self.versions + self.deprecated})

    def get(self, name: str, version: Semver) -> VersionTag | None:
        """The version, deprecated or not (its ``deprecated`` says)."""
        for v in self.versions + self.deprecated:
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

    def last_event(self, name: str) -> TagEvent | None:
        return next((e for e in reversed(self.events) if e.name == name), None)


def build_registry(records: Iterable[TagRecord], *, root: str | Path = ".") -> Registry:
    """Replay the events in GTO's order: the newest event decides whether a version is
    registered, a version holds a stage, an artifact is deprecated. A stage's current version
    is the live one assigned most recently (``gto show``'s default, one version per stage).

    A version tag whose metadata fails :func:`parse_meta` stays listed, with ``problem`` set
    and no metadata."""
    events, counters = read_events(records)
    registration: dict[tuple[str, Semver], TagEvent] = {}
    dropped: dict[tuple[str, Semver], TagEvent] = {}  # deregistrations in effect
    held: dict[tuple[str, Semver, str], TagEvent] = {}  # assignments in effect
    gone: dict[str, TagEvent] = {}  # deprecations in effect
    for e in events:
        if e.kind == "deprecation":
            gone[e.name] = e
            continue
        gone.pop(e.name, None)  # any newer event of the artifact revives it
        if e.version is None:
            continue
        key = (e.name, e.version)
        if e.kind == "registration":
            registration[key] = e
            dropped.pop(key, None)
        elif e.kind == "deregistration":
            dropped[key] = e
        elif e.stage is not None and e.kind == "assignment":
            held[(e.name, e.version, e.stage)] = e
        elif e.stage is not None:
            held.pop((e.name, e.version, e.stage), None)
    current: dict[tuple[str, str], TagEvent] = {}  # (name, stage) -> the assignment in effect
    assigned: dict[tuple[str, Semver], list[str]] = {}
    for (name, ver, stage), e in held.items():
        if (name, ver) in registration and (name, ver) not in dropped:
            assigned.setdefault((name, ver), []).append(stage)
            best = current.get((name, stage))
            if best is None or e.order > best.order:
                current[(name, stage)] = e
    stages: dict[tuple[str, Semver], list[str]] = {}
    for (name, stage), e in current.items():
        assert e.version is not None
        stages.setdefault((name, e.version), []).append(stage)
    live: list[VersionTag] = []
    deprecated: list[VersionTag] = []
    for key, e in sorted(registration.items()):
        rec = e.record
        summary, meta, problem = read_tag_meta(rec.message, tag=rec.name, root=root)
        cancel = dropped.get(key) or gone.get(key[0])
        found = VersionTag(
            key[0], key[1], rec.name, rec.commit, rec.date, summary, meta,
            tuple(sorted(stages.get(key, ()))), problem, cancel.tag if cancel else None,
            tuple(sorted(assigned.get(key, ()))),
        )
        (deprecated if cancel else live).append(found)
    return Registry(tuple(live), counters, tuple(deprecated), tuple(events),
                    {name: e.tag for name, e in gone.items()})
