"""Deciding the ``--fail-if`` rules on both sides' metrics, and the metric table they fill.

A rule that cannot be decided (a missing, non-numeric, NaN or infinite operand) is a result
with status ``error``, not an exception: the report is still written and the check fails.
"""

from __future__ import annotations

from collections.abc import Sequence

from modelver.check.report import MetricRow, RuleResult, Side
from modelver.check.rules import NonNumeric, Rule, RuleEvaluationError, operand_label
from modelver.metrics import CHECKPOINT_PREFIX


def decide(rule: Rule, cand: Side, base: Side, *, allow_nan: bool) -> RuleResult:
    """A rule on both sides' values: numbers, and the non-numeric ones (refused by name)."""
    names = tuple(sorted(rule.metric_names()))
    sides: dict[str, dict[str, object]] = {
        word: {**{k: NonNumeric(v) for k, v in side.non_numeric.items()}, **side.metrics}
        for word, side in (("candidate", cand), ("baseline", base))
    }
    detail = ", ".join(
        f"{operand_label(s, n)}={_value(sides[s][n])}" for s, n in rule.operands if n in sides[s]
    )
    try:
        fired = rule.evaluate(sides["candidate"], sides["baseline"], allow_nan=allow_nan)
    except RuleEvaluationError as e:
        return RuleResult(rule.text, "error", str(e), names)
    return RuleResult(rule.text, "fail" if fired else "pass", detail, names)


def _value(x: object) -> str:
    return format(x, ".6g") if isinstance(x, float) else str(x)


def metric_rows(cand: Side, base: Side, rules: Sequence[RuleResult]) -> list[MetricRow]:
    """Every bare metric of either side; ``checkpoint.X`` only where a file shadows X, or a
    rule reads it."""
    ruled = {n for r in rules for n in r.metrics}
    shadowed = {k for s in (cand, base) for k, src in s.sources.items()
                if src != "checkpoint" and CHECKPOINT_PREFIX + k in s.metrics}
    names = [
        n for n in dict.fromkeys([*cand.metrics, *base.metrics, *sorted(ruled)])
        if not n.startswith(CHECKPOINT_PREFIX) or n[len(CHECKPOINT_PREFIX):] in shadowed
        or n in ruled
    ]
    order = {"error": 3, "fail": 2, "pass": 1}
    rows = []
    for n in names:
        c, b = cand.metrics.get(n), base.metrics.get(n)
        mine = [r for r in rules if n in r.metrics]
        worst = max((r.status for r in mine), key=order.__getitem__, default="")
        rows.append(MetricRow(n, b, c, c - b if c is not None and b is not None else None,
                              tuple(r.rule for r in mine), worst))
    return rows
