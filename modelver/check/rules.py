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
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from modelver.errors import InvalidRuleError, clip

SIDES = ("candidate", "baseline")
MAX_RULE_CHARS = 1000  # a real gate rule is one line; this bounds parse time and node count
MAX_RULE_DEPTH = 40  # brackets, and AST depth (a+b+c... nests too); far beyond real rules
MAX_NUMBER = 1e100  # literals beyond this are typos or probes, and overflow arithmetic
_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}
_COMPARE: dict[type[ast.cmpop], Callable[[float, float], bool]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}
_FUNCTIONS: dict[str, Callable[..., float]] = {"abs": abs, "min": min, "max": max}


_NON_FINITE = " (not finite)"
NAN_HINT = "; a diverged run? --allow-nan evaluates NaN and inf as IEEE arithmetic does"


class NonNumeric(str):
    """A metric value that is not a number, already described for display (``'high'``)."""


class RuleEvaluationError(Exception):
    """A valid rule that cannot be decided on these metrics (missing, NaN, division by 0)."""


@dataclass(frozen=True)
class Rule:
    """A parsed rule: its text, its tree, and the metrics it reads as (side, name) pairs."""

    text: str
    tree: ast.expr
    operands: tuple[tuple[str, str], ...]

    def metric_names(self) -> set[str]:
        return {name for _, name in self.operands}

    def evaluate(
        self, candidate: Mapping[str, object], baseline: Mapping[str, object], *,
        allow_nan: bool = False,
    ) -> bool:
        """True when the rule fires (the candidate fails); RuleEvaluationError if undecidable.

        Every operand is checked before anything is evaluated, so ``and``/``or`` cannot skip
        a NaN or missing metric: a diverged run must never pass because of short-circuiting.
        """
        metrics = {"candidate": candidate, "baseline": baseline}
        problems = [p for side, name in self.operands
                    if (p := operand_problem(side, name, metrics[side], allow_nan=allow_nan))]
        if problems:
            tail = NAN_HINT if any(p.endswith(_NON_FINITE) for p in problems) else ""
            raise RuleEvaluationError("; ".join(problems) + tail)
        result = _Evaluator(metrics, allow_nan=allow_nan).visit(self.tree)
        return bool(result)


def operand_problem(
    side: str, name: str, values: Mapping[str, object], *, allow_nan: bool
) -> str | None:
    """Why one operand cannot be used (missing, not a number, NaN/inf), or None."""
    if name not in values:
        known = ", ".join(sorted(values)[:20]) or "none"
        return f"{side} has no metric {clip(name, 60)} (known: {clip(known, 200)[1:-1]})"
    value = values[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        shown = value[:60] if isinstance(value, NonNumeric) else clip(value, 60)
        return f"{side} metric {clip(name, 60)} is not a number: {shown}"
    if not allow_nan and not math.isfinite(value):
        return f"{side} metric {clip(name, 60)} is {value}{_NON_FINITE}"
    return None


def parse_rule(text: object) -> Rule:
    """Check the whole expression against the grammar before anything reads a metric.

    Length and bracket depth are bounded before :func:`ast.parse` (which recurses in C and
    can exhaust the stack on deep input), the tree's depth before :func:`_validate` recurses.
    """
    if not isinstance(text, str):
        raise InvalidRuleError(str(text), f"a rule is a string, not {type(text).__name__}")
    if len(text) > MAX_RULE_CHARS:
        raise InvalidRuleError(text, f"longer than {MAX_RULE_CHARS} characters")
    if _bracket_depth(text) > MAX_RULE_DEPTH:
        raise InvalidRuleError(text, f"brackets nested deeper than {MAX_RULE_DEPTH}")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise InvalidRuleError(text, f"syntax error ({e.msg})") from None
    except (RecursionError, MemoryError, ValueError) as e:
        raise InvalidRuleError(text, f"cannot be parsed ({type(e).__name__})") from None
    if _tree_depth(tree) > MAX_RULE_DEPTH:
        raise InvalidRuleError(text, f"nested deeper than {MAX_RULE_DEPTH} levels")
    if not _is_condition(tree):
        raise InvalidRuleError(text, "a rule must be a comparison (or and/or/not of them)")
    operands: list[tuple[str, str]] = []
    _validate(tree, text, operands)
    return Rule(text, tree, tuple(dict.fromkeys(operands)))


def _bracket_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth = max(0, depth - 1)
    return deepest


def _tree_depth(tree: ast.AST) -> int:
    """Depth of an AST without recursion (unary chains like ``- - - x`` need no brackets)."""
    deepest = 0
    todo = [(tree, 1)]
    while todo:
        node, depth = todo.pop()
        deepest = max(deepest, depth)
        if depth > MAX_RULE_DEPTH:
            break
        todo.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


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
        literal = node.value
        if isinstance(literal, bool) or not isinstance(literal, (int, float)):
            raise InvalidRuleError(text, f"only numbers are allowed, not {clip(literal, 40)}")
        if not (abs(literal) <= MAX_NUMBER):  # also NaN, inf (1e999) and ints past float range
            raise InvalidRuleError(text, f"number {clip(literal, 40)} is beyond ±{MAX_NUMBER:g}")
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise InvalidRuleError(text, "operators are + - * / only")
        _validate(node.left, text, operands)
        _validate(node.right, text, operands)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
            raise InvalidRuleError(text, "unary operators are - + not only")
        if isinstance(node.op, ast.Not) and not _is_condition(node.operand):
            raise InvalidRuleError(text, "'not' negates a comparison, not a number")
        if not isinstance(node.op, ast.Not) and _is_condition(node.operand):
            raise InvalidRuleError(text, "- and + apply to numbers, not to conditions")
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
            raise InvalidRuleError(text, "the only functions are abs(x), min(x, y, ...), "
                                   "max(x, y, ...)")
        if name == "abs" and len(node.args) != 1:
            raise InvalidRuleError(text, "abs takes one argument")
        if name != "abs" and len(node.args) < 2:
            raise InvalidRuleError(text, f"{name} takes two or more numbers: {name}(x, y, ...)")
        for arg in node.args:
            if _is_condition(arg):
                raise InvalidRuleError(text, f"{name} takes numbers, not conditions")
            _validate(arg, text, operands)
    else:
        what = _NODE_WORDS.get(type(node), type(node).__name__)
        raise InvalidRuleError(text, f"{what} {clip(ast.unparse(node), 40)} is not allowed")


_NODE_WORDS: dict[type[ast.AST], str] = {
    ast.Subscript: "subscript", ast.Lambda: "lambda", ast.NamedExpr: "assignment (:=)",
    ast.Starred: "unpacking", ast.IfExp: "conditional expression", ast.List: "list",
    ast.Tuple: "tuple", ast.Dict: "dict", ast.Set: "set", ast.JoinedStr: "f-string",
    ast.ListComp: "comprehension", ast.GeneratorExp: "generator", ast.Await: "await",
    ast.Yield: "yield", ast.YieldFrom: "yield", ast.Slice: "slice",
}


class _Evaluator:
    """Interprets a tree that :func:`_validate` accepted, on operands that were checked.

    Arithmetic is in floats (literals are bounded, so no OverflowError); an intermediate NaN
    (``inf - inf``) is undecidable like a NaN operand unless NaN is allowed.
    """

    def __init__(self, metrics: Mapping[str, Mapping[str, object]], *, allow_nan: bool) -> None:
        self.metrics = metrics
        self.allow_nan = allow_nan

    def visit(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            assert isinstance(node.value, int | float)
            return float(node.value)
        if isinstance(node, (ast.Name, ast.Attribute)):
            parts = dotted(node)
            assert parts is not None
            side, name = split_operand(parts)
            value = self.metrics[side][name]
            assert isinstance(value, int | float)  # checked by operand_problem
            return float(value)
        if isinstance(node, ast.BinOp):
            left, right = self.visit(node.left), self.visit(node.right)
            try:
                result = _BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise RuleEvaluationError(
                    f"division by zero in {clip(ast.unparse(node), 80)}") from None
            except OverflowError:
                raise RuleEvaluationError(
                    f"overflow in {clip(ast.unparse(node), 80)}") from None
            if math.isnan(result) and not self.allow_nan:
                raise RuleEvaluationError(f"{clip(ast.unparse(node), 80)} is nan")
            return result
        if isinstance(node, ast.UnaryOp):
            value = self.visit(node.operand)
            if isinstance(node.op, ast.Not):
                return not value
            return -value if isinstance(node.op, ast.USub) else +value
        if isinstance(node, ast.BoolOp):
            results = [self.visit(v) for v in node.values]  # no short-circuit: same checks
            return all(results) if isinstance(node.op, ast.And) else any(results)
        if isinstance(node, ast.Compare):
            left = self.visit(node.left)
            fired = True
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self.visit(comparator)
                fired = fired and _COMPARE[type(op)](left, right)
                left = right
            return fired
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            return _FUNCTIONS[node.func.id](*(self.visit(a) for a in node.args))
        raise AssertionError(f"unvalidated node {type(node).__name__}")
