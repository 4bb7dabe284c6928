"""The CI gate (modelver check) and the MLflow mirror."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

Progress = Callable[[int, int], None]


# --- check ---------------------------------------------------------------------------------
# Self-contained: imports what it needs inside the functions.

if TYPE_CHECKING:
    from modelver.check import CheckReport
    from modelver.integrations.mlflow import SyncResult


def check(
    candidate: str,
    *,
    baseline: str,
    rules: Sequence[str] = (),
    model: str | None = None,
    repo_root: str | Path = ".",
    progress: Progress | None = None,
    allow_nan: bool = False,
) -> CheckReport:
    """Gate CANDIDATE against BASELINE: ``--fail-if`` rules over both sides' metrics, the
    candidate's integrity, and a restore of it (into ``model``, MODULE:FACTORY, when given).

    Rules and the factory are checked before any data is read; a failing rule is a result
    (``report.passed``), not an exception, so the report can still be written. A NaN,
    infinite, missing or non-numeric operand makes its rule undecidable (the check fails);
    ``allow_nan`` evaluates NaN and infinities with IEEE semantics instead.
    """
    from modelver.check import load_factory, run_check
    from modelver.rules import parse_rule

    parsed = [parse_rule(text) for text in rules]
    root = Path(repo_root).resolve()
    factory = load_factory(model, root=root) if model else None
    return run_check(
        candidate,
        baseline,
        rules=parsed,
        factory=factory,
        model=model,
        repo_root=repo_root,
        progress=progress,
        allow_nan=allow_nan,
    )


def mlflow_sync(
    name: str | None = None,
    *,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    repo_root: str | Path = ".",
) -> SyncResult:
    """Register every version (of ``name``) in an MLflow model registry, stages as aliases."""
    from modelver.integrations.mlflow import sync

    return sync(name, tracking_uri=tracking_uri, registry_uri=registry_uri, repo_root=repo_root)
