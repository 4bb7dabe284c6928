"""The CI gate: ``modelver check`` as a function."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the gate imports Git, DVC and torch: only when it runs
    from modelver.check import CheckReport

Progress = Callable[[int, int], None]


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
    from modelver.check import load_factory, parse_rule, run_check

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
