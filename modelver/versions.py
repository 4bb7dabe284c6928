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
_VERSION_TAG = re.compile(rf"^(?P<name>{NAME_RE})@v(?P<ver>{_SEMVER})(?P<cancel>!?)(?:#\d+)?$")
_STAGE_TAG = re.compile(
    rf"^(?P<name>{NAME_RE})#(?P<stage>{NAME_RE})(?P<cancel>!?)#(?P<counter>\d+)$"
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
        summary = "\n".join(
            line for line in message.splitlines() if not line.startswith(META_PREFIX)
        ).strip()
        return summary, {}, e


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
    stages: tuple[str, ...] = ()
    problem: ModelverError | None = field(default=None, compare=False)  # why it is invalid

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


def build_registry(records: Iterable[TagRecord], *, root: str | Path = ".") -> Registry:
    """Interpret tags the way GTO does: registrations, cancellations, latest stage assignment.

    A version tag whose metadata fails :func:`parse_meta` stays listed, with ``problem`` set
    and no metadata; a stage tag with bad metadata assigns by its commit alone."""
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
            summary, meta, problem = read_tag_meta(rec.message, tag=rec.name, root=root)
            found[key] = VersionTag(
                key[0], key[1], rec.name, rec.commit, rec.date, summary, meta, problem=problem
            )
            continue
        sm = _STAGE_TAG.match(rec.name)
        if sm:
            skey = (sm.group("name"), sm.group("stage"))
            counter = int(sm.group("counter"))
            _, meta, _ = read_tag_meta(rec.message, tag=rec.name, root=root)
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
            tuple(sorted(stages.get(k, []))), v.problem,
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
