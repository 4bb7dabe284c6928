"""Issue 11, classes 3 and 7 (gate/diff part): the CI gate and metric handling under hostile
and unlucky input. A NaN, infinite, missing or non-numeric operand fails a rule (unless
``--allow-nan`` for NaN/inf); every malformed rule is exit 2 with one short line; metrics
files, manifests' metrics and params.yaml are data: non-numeric values are shown, never
compared, and a file that cannot be read is one line, never a traceback."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modelver.check.rules import MAX_RULE_CHARS, RuleEvaluationError, parse_rule
from modelver.diff import diff_metrics
from modelver.errors import InvalidRuleError, MalformedDataError
from modelver.metrics import (
    MAX_METRICS_BYTES,
    MetricSet,
    merge,
    parse_metrics,
    read_metrics,
    split_values,
)
from tests.helpers import git, one_error_line, run, write_metrics

NAN, INF = float("nan"), float("inf")
ISSUE_RULE = "loss > baseline.loss + 0.1"


def no_constants(text: str) -> object:
    """json.loads that refuses NaN/Infinity: the JSON output must be strict."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


# --- the rule language: values ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cand", "base", "words"),
    [
        ({"loss": NAN}, {"loss": 0.3}, ["candidate", "'loss'", "nan"]),
        ({"loss": 0.3}, {"loss": NAN}, ["baseline", "'loss'", "nan"]),
        ({"loss": INF}, {"loss": 0.3}, ["candidate", "'loss'", "inf"]),
        ({"loss": 0.3}, {"loss": -INF}, ["baseline", "'loss'", "-inf"]),
        ({}, {"loss": 0.3}, ["candidate has no metric 'loss'"]),
        ({"loss": 0.3}, {}, ["baseline has no metric 'loss'"]),
        ({"loss": "0.3"}, {"loss": 0.3}, ["candidate", "'loss'", "not a number"]),
        ({"loss": True}, {"loss": 0.3}, ["candidate", "'loss'", "not a number"]),
        ({"loss": [1.0]}, {"loss": 0.3}, ["candidate", "'loss'", "not a number"]),
        ({"loss": None}, {"loss": 0.3}, ["candidate", "'loss'", "not a number"]),
    ],
)
def test_bad_operand_makes_the_rule_undecidable(cand: dict, base: dict, words: list[str]) -> None:
    rule = parse_rule(ISSUE_RULE)
    with pytest.raises(RuleEvaluationError) as e:
        rule.evaluate(cand, base)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_allow_nan_evaluates_ieee_but_not_missing_or_text() -> None:
    rule = parse_rule(ISSUE_RULE)
    assert rule.evaluate({"loss": NAN}, {"loss": 0.3}, allow_nan=True) is False
    assert rule.evaluate({"loss": INF}, {"loss": 0.3}, allow_nan=True) is True
    with pytest.raises(RuleEvaluationError, match="no metric"):
        rule.evaluate({}, {"loss": 0.3}, allow_nan=True)
    with pytest.raises(RuleEvaluationError, match="not a number"):
        rule.evaluate({"loss": "x"}, {"loss": 0.3}, allow_nan=True)


@pytest.mark.parametrize(
    "text",
    [
        "accuracy > 2 and loss > 1",  # and short-circuits on accuracy
        "accuracy < 2 or loss > 1",  # or short-circuits on accuracy
        "accuracy > 2 > loss",  # a chained comparison stops early
        "not accuracy < 2 and loss > 1",
    ],
)
def test_short_circuit_never_skips_a_nan(text: str) -> None:
    with pytest.raises(RuleEvaluationError, match="candidate metric 'loss' is nan"):
        parse_rule(text).evaluate({"accuracy": 0.9, "loss": NAN}, {})


def test_nan_made_by_the_arithmetic_is_undecidable() -> None:
    big = "loss * 1e100 * 1e100 * 1e100 * 1e100"
    rule = parse_rule(f"{big} - baseline.{big} > 0.1")  # inf - inf
    with pytest.raises(RuleEvaluationError, match="is nan"):
        rule.evaluate({"loss": 1.0}, {"loss": 1.0})
    assert rule.evaluate({"loss": 1.0}, {"loss": 1.0}, allow_nan=True) is False
    rule = parse_rule("loss * 1e100 * 1e100 * 1e100 * 1e100 > 1")  # overflows to inf: decided
    assert rule.evaluate({"loss": 1.0}, {}) is True
    with pytest.raises(RuleEvaluationError, match="division by zero"):
        parse_rule("loss / (baseline.loss - 1) > 1").evaluate({"loss": 1.0}, {"loss": 1.0})


# --- the rule language: malformed rules -----------------------------------------------------------


MALFORMED = [
    "max(accuracy) < 1",
    "min(accuracy) < 1",
    "max() < 1",
    "abs(accuracy, 1) < 1",
    "abs(x=accuracy) < 1",
    "max(*accuracy) < 1",
    "round(accuracy) < 1",
    "accuracy.real() < 1",
    "abs(accuracy).real < 1",
    "accuracy.__class__.__mro__ < 1",
    "baseline < 1",
    "accuracy[0] < 1",
    "accuracy[0:1] < 1",
    "(lambda: 1)() < 2",
    "(x := 1) < 2",
    "accuracy < 'a'",
    "accuracy < b'a'",
    "accuracy < f'{accuracy}'",
    "accuracy < 1j",
    "accuracy < ...",
    "accuracy < None",
    "accuracy < 1e999",
    "accuracy < -1e999",
    "accuracy < 1e101",
    "accuracy < " + "9" * 200,
    "accuracy < " + "9" * 5000,
    "accuracy < 1 if loss else 2",
    "accuracy < [1][0]",
    "accuracy < {1: 2}[1]",
    "accuracy in (1, 2)",
    "accuracy is 1",
    "accuracy ** 2 > 1",
    "accuracy // 2 > 1",
    "accuracy % 2 > 1",
    "accuracy << 2 > 1",
    "~accuracy > 1",
    "(not accuracy) < 1",
    "-(accuracy < 1) < 0",
    "max(accuracy < 1, 2) < 3",
    "accuracy",
    "1",
    "",
    "   ",
    "accuracy < 1\x00",
    "accuracy <",
    "accuracy < 1; import os",
    "\n".join(["accuracy < 1"] * 3),
    "a < 1 or " * 200 + "a < 1",  # too long
    "(" * 100 + "a" + ")" * 100 + " < 1",  # brackets too deep
    "(" * 100_000 + "a" + ")" * 100_000 + " < 1",  # the 85 KB (and more) rule of the issue
    "[" * 50_000,
    "-" * 900 + "a < 1",  # unary chains nest without brackets
    "not " * 240 + "a < 1",
    "a" + " + a" * 200 + " < 1",  # left-deep BinOp chains
    "max(" * 45 + "a, 1" + ")" * 45 + " < 1",
]


@pytest.mark.parametrize("text", MALFORMED, ids=lambda t: repr(t[:30]) + f"..{len(t)}")
def test_malformed_rule_is_one_short_usage_error(text: str) -> None:
    with pytest.raises(InvalidRuleError) as e:
        parse_rule(text)
    assert e.value.exit_code == 2
    assert len(str(e.value)) < 400 and "\n" not in e.value.message  # the rule is cut


def test_rule_limits() -> None:
    assert parse_rule("a < 1" + " " * (MAX_RULE_CHARS - 5))  # exactly at the limit
    with pytest.raises(InvalidRuleError, match="longer than"):
        parse_rule("a < 1" + " " * (MAX_RULE_CHARS - 4))
    assert parse_rule("((((a)))) < max(1, 2, abs(-3)) and not b > 1e100").evaluate(
        {"a": 2.0, "b": 2.0}, {}) is True
    with pytest.raises(InvalidRuleError, match="a rule is a string"):
        parse_rule(1.0)


# --- metrics files and manifests' metrics ---------------------------------------------------------


def test_metrics_file_keeps_non_numeric_apart() -> None:
    text = json.dumps({"acc": 0.9, "n": 3, "name": "resnet", "ok": True, "hist": [1, 2],
                       "none": None, "eval": {"f1": 0.5, "tag": "x", "empty": {}},
                       "big": 10**400})
    got = read_metrics("m.json", text)
    assert got.numbers == {"acc": 0.9, "n": 3.0, "eval.f1": 0.5}
    assert got.other == {"name": "'resnet'", "ok": "True", "hist": "[2 items]", "none": "null",
                         "eval.tag": "'x'", "big": got.other["big"]}
    assert parse_metrics("m.json", text) == got.numbers
    nan = read_metrics("m.json", '{"loss": NaN, "x": Infinity}')
    assert math.isnan(nan.numbers["loss"]) and nan.numbers["x"] == INF  # kept, for the gate
    assert read_metrics("m.json", "[1, 2]") == MetricSet()
    dated = read_metrics("m.yaml", "a: 2024-01-01\nb: .nan\n")
    assert dated.other == {"a": "datetime.date(2024, 1, 1)"} and math.isnan(dated.numbers["b"])


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("m.json", "{not json"),
        ("m.json", "[" * 100_000 + "]" * 100_000),
        ("m.json", '{"a": ' * 200 + "1" + "}" * 200),
        ("m.json", '{"a": 1' + "0" * 5000 + "}"),
        ("m.json", " " * (MAX_METRICS_BYTES + 1)),
        ("m.yaml", "a: [1, 2\n"),
        ("m.yaml", "a: !!python/object/apply:os.system ['echo pwned']\n"),
        ("m.yaml", "[" * 100_000 + "]" * 100_000),
        ("m.yaml", "a: &a [*a]\n"),  # a cycle
        ("m.yaml", "a: &a {x: 1, y: 2}\n"
         + "".join(f"{c}: &{c} {{p: *{p}, q: *{p}, r: *{p}, s: *{p}}}\n"
                   for p, c in zip("abcdefghijk", "bcdefghijkl", strict=True))),  # aliases
    ],
)
def test_unreadable_metrics_file_is_one_error(path: str, text: str) -> None:
    with pytest.raises(MalformedDataError) as e:
        read_metrics(path, text)
    assert len(str(e.value)) < 400


def test_manifest_metrics_values() -> None:
    got = split_values({"loss": 0.5, "step": 7, "note": "diverged", "flag": False,
                        "huge": 10**400}, what="tag x")
    assert got.numbers == {"loss": 0.5, "step": 7.0}
    assert set(got.other) == {"note", "flag", "huge"}
    with pytest.raises(MalformedDataError, match="tag x: metrics is"):
        split_values([1, 2], what="tag x")
    # a non-numeric value in a metrics file shadows the manifest's number: a rule on it must
    # say "not a number", not read the training loss silently
    numbers, sources, other = merge(MetricSet({"loss": 0.3}), {"m.json": MetricSet(
        {"acc": 0.9}, {"loss": "'high'"})})
    assert numbers == {"acc": 0.9, "checkpoint.loss": 0.3}
    assert other == {"loss": "'high'"} and sources["loss"] == "m.json"


def test_diff_metrics_shows_non_numeric_and_stays_strict_json() -> None:
    a = {"loss": 0.5, "note": "ok", "nan": NAN, "same_nan": NAN, "flag": True, "gone": 1.0}
    b = {"loss": "diverged", "note": "ok", "nan": 1.0, "same_nan": NAN, "flag": [1], "new": 2}
    m = {d.name: d for d in diff_metrics(a, b)}
    assert m["loss"].a == 0.5 and m["loss"].b is None and m["loss"].b_text == "'diverged'"
    assert m["loss"].delta is None and m["loss"].changed
    assert not m["note"].changed and not m["same_nan"].changed and m["nan"].changed
    assert m["flag"].a_text == "True" and m["flag"].b_text == "[1 items]"
    data = no_constants(json.dumps({k: d.to_json() for k, d in m.items()}))
    assert isinstance(data, dict)
    assert data["loss"] == {"a": 0.5, "b": None, "delta": None, "rel_delta": None,
                            "b_text": "'diverged'"}
    assert data["nan"]["a"] is None and data["nan"]["a_text"] == "nan"
    assert data["new"] == {"a": None, "b": 2.0, "delta": None, "rel_delta": None}


# --- the command, end to end -------------------------------------------------------------------


def test_nan_candidate_fails_the_gate_unless_allowed(gated: Path) -> None:
    write_metrics(gated, accuracy=0.95, eval={"f1": 0.85}, loss=NAN)  # the issue's instance
    res = run(gated, "check", "workspace", "-b", "tiny#production", "--fail-if", ISSUE_RULE)
    assert res.exit_code == 1
    line = one_error_line(res)
    assert "cannot be decided: candidate metric 'loss' is nan" in line and "--allow-nan" in line
    res = run(gated, "check", "workspace", "-b", "tiny#production", "--fail-if", ISSUE_RULE,
              "--json")
    assert res.exit_code == 1
    data = no_constants(res.stdout)
    assert isinstance(data, dict) and data["passed"] is False
    assert data["candidate"]["metrics"]["loss"] is None  # NaN is null in strict JSON
    res = run(gated, "check", "workspace", "-b", "tiny#production", "--fail-if", ISSUE_RULE,
              "--allow-nan", "--json")
    assert res.exit_code == 0, res.stderr
    assert no_constants(res.stdout)["allow_nan"] is True  # type: ignore[index]
    # a rule that does not read the NaN metric is not affected by it
    res = run(gated, "check", "workspace", "-b", "tiny#production", "--fail-if",
              "accuracy < baseline.accuracy - 0.01")
    assert res.exit_code == 0, res.stderr
    # infinity, and a missing metric with --allow-nan, fail too
    write_metrics(gated, accuracy=INF, eval={"f1": 0.85})
    res = run(gated, "check", "workspace", "-b", "tiny#production", "--fail-if",
              "accuracy < baseline.accuracy")
    assert res.exit_code == 1 and "candidate metric 'accuracy' is inf" in one_error_line(res)
    res = run(gated, "check", "workspace", "-b", "tiny#production", "--allow-nan",
              "--fail-if", "eval.nope < 1")
    assert res.exit_code == 1 and "candidate has no metric 'eval.nope'" in one_error_line(res)


def test_nan_baseline_fails_the_gate(gated: Path) -> None:
    write_metrics(gated, accuracy=NAN, eval={"f1": 0.8})
    git(gated, "commit", "-qam", "a diverged evaluation")
    base = git(gated, "rev-parse", "HEAD")
    write_metrics(gated, accuracy=0.9, eval={"f1": 0.8})
    res = run(gated, "check", "workspace", "-b", base, "--fail-if",
              "accuracy < baseline.accuracy - 0.01")
    assert res.exit_code == 1
    assert "baseline metric 'accuracy' is nan" in one_error_line(res)


@pytest.mark.parametrize("value", ["high", True, [0.9], None, {"nested": "x"}])
def test_non_numeric_metric_is_shown_and_refused_by_rules(
    gated: Path, value: object, tmp_path: Path,
) -> None:
    write_metrics(gated, accuracy=value, eval={"f1": 0.85})
    md = tmp_path / "r.md"
    res = run(gated, "check", "workspace", "-b", "tiny#production", "--fail-if",
              "eval.f1 < baseline.eval.f1", "--md", str(md), "--json")
    assert res.exit_code == 0, res.stderr  # rules on other metrics still decide
    data = no_constants(res.stdout)
    assert isinstance(data, dict)
    assert "accuracy" not in data["candidate"]["metrics"]
    if isinstance(value, dict):  # nested keys are flattened: eval-like
        assert "accuracy.nested" in data["candidate"]["non_numeric"]
        return
    assert "accuracy" in data["candidate"]["non_numeric"]
    assert "Non-numeric metrics (not compared):** candidate: accuracy=" in md.read_text()
    res = run(gated, "check", "workspace", "-b", "tiny#production", "--fail-if",
              "accuracy < baseline.accuracy - 0.01")
    assert res.exit_code == 1
    assert "candidate metric 'accuracy' is not a number" in one_error_line(res)
    res = run(gated, "check", "workspace", "-b", "tiny#production")
    assert res.exit_code == 0 and "non-numeric metrics (not compared)" in res.stdout


@pytest.mark.parametrize(
    "content",
    ["{broken", "[" * 50_000 + "]" * 50_000, '{"a": ' * 150 + "1" + "}" * 150,
     b"\xff\xfe{}"],
)
def test_unreadable_metrics_file_fails_check_in_one_line(
    gated: Path, content: str | bytes,
) -> None:
    p = gated / "metrics.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    res = run(gated, "check", "workspace", "-b", "tiny#production", "--fail-if", "loss > 1")
    assert res.exit_code == 1
    line = one_error_line(res)
    assert "metrics file 'metrics.json' (the workspace)" in line and len(line) < 500


@pytest.mark.parametrize("path", ["../outside.json", "/etc/hostname", "sub/../../x.json",
                                  "link/m.json"])
def test_metrics_path_outside_the_repository_is_refused(
    gated: Path, path: str, tmp_path: Path,
) -> None:
    (gated.parent / "outside.json").write_text('{"accuracy": 1.0}')
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "m.json").write_text('{"accuracy": 1.0}')
    (gated / "link").symlink_to(tmp_path / "elsewhere")
    spec = yaml.safe_load((gated / "dvc.yaml").read_text())
    spec["metrics"] = [path]
    (gated / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    res = run(gated, "check", "workspace", "-b", "tiny#production", "--fail-if", "loss > 1")
    assert res.exit_code == 1
    line = one_error_line(res)
    assert "refusing dvc.yaml metrics path" in line


def test_bad_rules_through_the_cli(gated: Path, tmp_path: Path) -> None:
    md = tmp_path / "r.md"
    for text in ["max(accuracy) < 1", "(" * 100_000 + "a" + ")" * 100_000 + " < 1",
                 "-" * 900 + "a < 1", "accuracy < 1e999", "foo(a) < 1", "a < 'x'",
                 "a[0] < 1", "(x := 1) < 2", "a < 1 or " * 200 + "a < 1"]:
        res = run(gated, "check", "workspace", "-b", "tiny#production", "--md", str(md),
                  "--fail-if", "loss > 1", "--fail-if", text)
        assert res.exit_code == 2, (text[:40], res.output[-500:])
        line = one_error_line(res)
        assert "invalid rule" in line and len(line) < 500 and "Traceback" not in res.output
        assert not md.exists()


def _modelver() -> list[str]:
    exe = shutil.which("modelver") or str(Path(sys.executable).with_name("modelver"))
    return [exe] if Path(exe).is_file() else [sys.executable, "-m", "modelver.cli.main"]


def test_real_subprocess_one_line_no_traceback(gated: Path) -> None:
    write_metrics(gated, accuracy=0.95, eval={"f1": 0.85}, loss=NAN)
    cases = [
        (["--fail-if", "(" * 42_000 + "a" + ")" * 42_000 + " < 1"], 2, "invalid rule"),  # 85 KB
        (["--fail-if", "max(accuracy) < 1"], 2, "invalid rule"),
        (["--fail-if", "not " * 240 + "a < 1"], 2, "invalid rule"),
        (["--fail-if", ISSUE_RULE], 1, "candidate metric 'loss' is nan"),
        (["--fail-if", ISSUE_RULE, "--allow-nan"], 0, None),
    ]
    for extra, code, words in cases:
        done = subprocess.run([*_modelver(), "check", "workspace", "-b", "tiny#production",
                               *extra], cwd=gated, capture_output=True, text=True, timeout=300,
                              check=False)
        assert done.returncode == code, (extra[1][:40], done.stderr[-800:])
        assert "Traceback" not in done.stderr
        if words is not None:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1, done.stderr[-800:]
            assert lines[0].startswith("error: ") and words in lines[0] and len(lines[0]) < 500


def test_diff_with_non_numeric_manifest_metric_is_never_a_traceback(tmp_path: Path) -> None:
    """The manifest reader may refuse the manifest (one line) or diff may show the value as
    text: either is fine, a traceback is not."""
    import torch

    from modelver.checkpoint import CheckpointManager

    dirs = []
    for name, loss in (("a", 0.5), ("b", 0.4)):
        mgr = CheckpointManager(tmp_path / name, keep_last=None)
        try:
            mgr.save(1, {"w": {"x": torch.ones(3) * loss}}, metrics={"loss": loss})
        finally:
            mgr.close()
        dirs.append(tmp_path / name / "step-00000001")
    manifest = dirs[1] / "MANIFEST.json"
    data = json.loads(manifest.read_text())
    data["metrics"] = {"loss": "diverged", "flag": True}
    manifest.write_text(json.dumps(data))
    for extra in ([], ["--json"], ["--stat"]):
        res = run(tmp_path, "diff", str(dirs[0]), str(dirs[1]), *extra)
        assert res.exit_code in (0, 1), res.output
        if res.exit_code == 1:
            assert "metrics" in one_error_line(res)
        else:
            assert "diverged" in res.stdout


@pytest.mark.parametrize("params", ["train: [1, 2\n", "a: &a [*a]\n", "x: 1\n" * 1 + "\t- bad"])
def test_diff_with_unreadable_params_yaml_is_one_line(
    gated: Path, params: str,
) -> None:
    (gated / "params.yaml").write_text(params)
    res = run(gated, "diff", "tiny@v0.1.0", "--stat")
    assert res.exit_code == 1, res.output
    assert "params.yaml in the workspace" in one_error_line(res)
