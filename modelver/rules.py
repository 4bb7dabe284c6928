"""The ``--fail-if`` rule language of ``modelver check``: arithmetic comparisons of metrics.

A rule is parsed with :mod:`ast` and interpreted node by node; nothing is ever ``eval``'d. It
allows numbers, metric names (the candidate's; dotted keys like ``checkpoint.loss``),
``baseline.NAME`` (and ``candidate.NAME``), ``+ - * /``, unary ``-``, comparisons (chained
too), ``and``/``or``/``not`` and the functions ``abs``, ``min`` and ``max``. A rule *fails*
when it evaluates to true, so ``accuracy < baseline.accuracy - 0.01`` reads as a condition
for refusing the candidate.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from modelver.errors import InvalidRuleError

SIDES = ("candidate", "baseline")
_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}
_COMPARE: dict[type[ast.cmpop], Callable[[float, float], bool]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}
_FUNCTIONS: dict[str, Callable[..., float]] = {"abs": abs, "min": min, "max": max}


class RuleEvaluationError(Exception):
    """A valid rule that cannot be decided on these metrics (missing name, division by 0)."""


@dataclass(frozen=True)
class Rule:
    """A parsed rule: its text, its tree, and the metrics it reads as (side, name) pairs."""

    text: str
    tree: ast.expr
    operands: tuple[tuple[str, str], ...]

    def metric_names(self) -> set[str]:
        return {name for _, name in self.operands}

    def evaluate(self, candidate: Mapping[str, float], baseline: Mapping[str, float]) -> bool:
        """True when the rule fires (the candidate fails); RuleEvaluationError if undecidable."""
        metrics = {"candidate": candidate, "baseline": baseline}
        result = _Evaluator(metrics).visit(self.tree)
        return bool(result)


def parse_rule(text: str) -> Rule:
    """Check the whole expression against the grammar before anything reads a metric."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise InvalidRuleError(text, f"syntax error ({e.msg})") from None
    if not _is_condition(tree):
        raise InvalidRuleError(text, "a rule must be a comparison (or and/or/not of them)")
    operands: list[tuple[str, str]] = []
    _validate(tree, text, operands)
    return Rule(text, tree, tuple(dict.fromkeys(operands)))


def operand_label(side: str, name: str) -> str:
    return name if side == "candidate" else f"{side}.{name}"


def _is_condition(node: ast.expr) -> bool:
    if isinstance(node, ast.Compare):
        return True
    if isinstance(node, ast.BoolOp):
        return all(_is_condition(v) for v in node.values)
    return isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not) and _is_condition(
        node.operand
    )


def dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None for anything that is not a plain dotted name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def split_operand(parts: list[str]) -> tuple[str, str]:
    """(side, metric name) of a dotted name: ``baseline.acc`` -> ("baseline", "acc")."""
    if parts[0] in SIDES and len(parts) > 1:
        return parts[0], ".".join(parts[1:])
    return "candidate", ".".join(parts)


def _validate(node: ast.expr, text: str, operands: list[tuple[str, str]]) -> None:
    """Allow-list of node types; collects the metric operands on the way."""
    if isinstance(node, (ast.Name, ast.Attribute)):
        parts = dotted(node)
        if parts is None:
            raise InvalidRuleError(text, "attributes are only allowed on metric names")
        if any(p.startswith("__") for p in parts):
            raise InvalidRuleError(text, "names starting with '__' are not metrics")
        if parts[0] in _FUNCTIONS and len(parts) == 1:
            raise InvalidRuleError(text, f"'{parts[0]}' is a function: call it")
        if parts[0] in SIDES and len(parts) == 1:
            raise InvalidRuleError(text, f"'{parts[0]}' needs a metric: {parts[0]}.NAME")
        operands.append(split_operand(parts))
    elif isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise InvalidRuleError(text, f"only numbers are allowed, not {node.value!r}")
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise InvalidRuleError(text, "operators are + - * / only")
        _validate(node.left, text, operands)
        _validate(node.right, text, operands)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
            raise InvalidRuleError(text, "unary operators are - + not only")
        _validate(node.operand, text, operands)
    elif isinstance(node, ast.BoolOp):
        for value in node.values:
            if not _is_condition(value):
                raise InvalidRuleError(text, "and/or combine comparisons only")
            _validate(value, text, operands)
    elif isinstance(node, ast.Compare):
        if any(type(op) not in _COMPARE for op in node.ops):
            raise InvalidRuleError(text, "comparisons are < <= > >= == != only")
        for value in (node.left, *node.comparators):
            if _is_condition(value):
                raise InvalidRuleError(text, "compare numbers, not conditions")
            _validate(value, text, operands)
    elif isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in _FUNCTIONS or node.keywords or not node.args:
            raise InvalidRuleError(text, "the only functions are abs(x), min(x, ...), max(x, ...)")
        if name == "abs" and len(node.args) != 1:
            raise InvalidRuleError(text, "abs takes one argument")
        for arg in node.args:
            _validate(arg, text, operands)
    else:
        raise InvalidRuleError(text, f"'{ast.unparse(node)}' is not allowed in a rule")


class _Evaluator:
    """Interprets a tree that :func:`_validate` accepted."""

    def __init__(self, metrics: Mapping[str, Mapping[str, float]]) -> None:
        self.metrics = metrics

    def visit(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Name, ast.Attribute)):
            parts = dotted(node)
            assert parts is not None
            side, name = split_operand(parts)
            values = self.metrics[side]
            if name not in values:
                known = ", ".join(sorted(values)) or "none"
                raise RuleEvaluationError(f"{side} has no metric '{name}' (known: {known})")
            return values[name]
        if isinstance(node, ast.BinOp):
            left, right = self.visit(node.left), self.visit(node.right)
            try:
                return _BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise RuleEvaluationError(f"division by zero in '{ast.unparse(node)}'") from None
        if isinstance(node, ast.UnaryOp):
            value = self.visit(node.operand)
            if isinstance(node.op, ast.Not):
                return not value
            return -value if isinstance(node.op, ast.USub) else +value
        if isinstance(node, ast.BoolOp):
            results = (self.visit(v) for v in node.values)
            return all(results) if isinstance(node.op, ast.And) else any(results)
        if isinstance(node, ast.Compare):
            left = self.visit(node.left)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self.visit(comparator)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            return _FUNCTIONS[node.func.id](*(self.visit(a) for a in node.args))
        raise AssertionError(f"unvalidated node {ast.dump(node)}")
