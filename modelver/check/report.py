"""What ``modelver check`` found: frozen results, and the verdict they add up to.

Plain data, so the API can return it, ``--json`` can dump it and ``modelver.cli.check`` can
render it; nothing here reads a checkpoint or a repository.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from modelver.errors import clip


@dataclass(frozen=True)
class Side:
    """One side of the comparison and the metrics found for it."""

    ref: str
    kind: str  # "version" | "commit" | "workspace" | "path"
    label: str
    name: str | None = None
    tag: str | None = None
    commit: str | None = None
    step: int | None = None
    path: str | None = None  # the local checkpoint directory (the candidate's)
    metrics: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # metric -> file it came from
    non_numeric: dict[str, str] = field(default_factory=dict)  # shown, never compared


@dataclass(frozen=True)
class RuleResult:
    rule: str
    status: str  # "pass" | "fail" | "error"
    detail: str  # the operands' values, or why the rule could not be decided
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class MetricRow:
    name: str
    baseline: float | None
    candidate: float | None
    delta: float | None
    rules: tuple[str, ...]
    result: str  # the worst status of its rules, "" when no rule reads it


@dataclass(frozen=True)
class Integrity:
    ok: bool
    problems: list[str]
    files: int
    against_lock: bool  # also compared with the md5s that dvc.lock pins


@dataclass(frozen=True)
class Resumability:
    status: str  # "ok" | "failed" | "skipped"
    mode: str  # "factory" | "shapes" | "none"
    factory: str | None
    restored: list[str]
    not_restored: list[str]
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class CheckReport:
    candidate: Side
    baseline: Side
    rules: list[RuleResult]
    metrics: list[MetricRow]
    integrity: Integrity
    resume: Resumability
    allow_nan: bool = False  # --allow-nan: NaN/inf operands are evaluated, not refused

    @property
    def reason(self) -> str | None:
        """Why the check fails, in one line; None when it passes."""
        if not self.integrity.ok:
            return "candidate checkpoint is corrupted: " + "; ".join(self.integrity.problems[:3])
        if not self.resume.ok:
            return f"candidate cannot be resumed: {self.resume.problem}"
        for r in self.rules:
            if r.status == "fail":
                return f"rule {clip(r.rule)} failed ({_cut(r.detail)})"
        for r in self.rules:
            if r.status == "error":
                return f"rule {clip(r.rule)} cannot be decided: {_cut(r.detail)}"
        return None

    @property
    def passed(self) -> bool:
        return self.reason is None

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``--json``; NaN and infinities become null (JSON has neither), the
        rules' details and the reason still name them."""
        return _json_safe({
            "passed": self.passed, "reason": self.reason,
            "candidate": asdict(self.candidate), "baseline": asdict(self.baseline),
            "rules": [asdict(r) for r in self.rules], "metrics": [asdict(m) for m in self.metrics],
            "integrity": asdict(self.integrity),
            "resume": {**asdict(self.resume), "ok": self.resume.ok},
            "allow_nan": self.allow_nan,
        })


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _cut(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
