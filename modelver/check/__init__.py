"""Gate a candidate model against a baseline: metric rules, integrity and resumability.

What CI needs before a model is merged or promoted: is it at least as good as production
(``--fail-if`` rules over metrics, :mod:`.rules`, :mod:`.decide`), are its bytes what the
manifest and ``dvc.lock`` say, and can training continue from it (:mod:`.resumable`). Both
sides are resolved by :mod:`.sides`; the results are :mod:`.report`'s frozen dataclasses,
rendered by ``modelver.cli.check``. Nothing here prints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modelver.check.decide import decide, metric_rows
from modelver.check.factory import load_factory
from modelver.check.report import (
    CheckReport,
    Integrity,
    MetricRow,
    Resumability,
    RuleResult,
    Side,
)
from modelver.check.resumable import check_resumable
from modelver.check.rules import Rule, parse_rule
from modelver.check.sides import WORKSPACE, Progress, resolve_side, try_git
from modelver.errors import CheckpointCorruptedError, CheckpointNotFoundError

__all__ = [
    "WORKSPACE",
    "CheckReport",
    "Integrity",
    "MetricRow",
    "Progress",
    "Resumability",
    "Rule",
    "RuleResult",
    "Side",
    "check_resumable",
    "load_factory",
    "parse_rule",
    "run_check",
]


def run_check(
    candidate: str,
    baseline: str,
    *,
    rules: Sequence[Rule],
    factory: Callable[[], Any] | None,
    model: str | None,
    repo_root: str | Path,
    progress: Progress | None,
    allow_nan: bool = False,
) -> CheckReport:
    """Resolve both sides (the baseline first: it needs no data), verify and restore the
    candidate, then decide every rule."""
    git = try_git(repo_root)
    base, _, _ = resolve_side(git, baseline, name_hint=None, candidate=False,
                              repo_root=repo_root, progress=progress)
    cand, step_dir, lock_problems = resolve_side(
        git, candidate, name_hint=base.name, candidate=True, repo_root=repo_root,
        progress=progress,
    )
    assert step_dir is not None
    integrity = _integrity(step_dir, lock_problems)
    if not integrity.ok:
        resume = Resumability("skipped", "none", model, [], [], "the checkpoint is corrupted")
    else:
        resume = check_resumable(step_dir, factory=factory, model=model)
    results = [decide(r, cand, base, allow_nan=allow_nan) for r in rules]
    return CheckReport(cand, base, results, metric_rows(cand, base, results), integrity, resume,
                       allow_nan=allow_nan)


def _integrity(step_dir: Path, lock_problems: list[str]) -> Integrity:
    """Every file against the manifest, plus what differs from the md5s ``dvc.lock`` pins."""
    from modelver.checkpoint import verify_checkpoint

    try:
        files = len(verify_checkpoint(step_dir).files)
        problems: list[str] = []
    except CheckpointCorruptedError as e:
        files, problems = 0, e.problems
    except CheckpointNotFoundError as e:
        files, problems = 0, [e.message]
    return Integrity(not (problems or lock_problems), problems + lock_problems, files,
                     against_lock=_is_cached_copy(step_dir))


def _is_cached_copy(step_dir: Path) -> bool:
    return ".dvc/tmp/modelver" in step_dir.as_posix()
