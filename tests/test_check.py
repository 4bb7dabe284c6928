"""`modelver check`: the CI gate, on real Git + DVC projects (the `project` fixture)."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import Result

from modelver.check import CheckReport
from modelver.check.rules import parse_rule
from modelver.errors import InvalidRuleError
from modelver.metrics import metrics_paths, parse_metrics
from tests.helpers import (
    REPO,
    git,
    one_error_line,
    run,
    set_params,
    train_and_commit,
    write_metrics,
)

RULE = "accuracy < baseline.accuracy - 0.01"

FACTORY = """\
import torch
from torch import nn

def build_state(hidden=16):
    model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 2))
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=0.05)}

def wider():
    return build_state(hidden=32)

class Picky:
    def state_dict(self):
        return {}

    def load_state_dict(self, value):
        raise ValueError("saved with another learning rate")

def picky():
    return {"model": build_state()["model"], "optimizer": Picky()}
"""


def check(root: Path, *args: str) -> Result:
    return run(root, "check", *args)


def report_of(res: Result) -> dict:
    data = json.loads(res.stdout)
    assert isinstance(data, dict)
    return data


# --- the rule language -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "fires"),
    [
        (RULE, True),
        ("accuracy >= baseline.accuracy - 0.1 and not eval.f1 < 0.5", True),
        ("abs(accuracy - baseline.accuracy) > 0.06 or checkpoint.loss > 10", False),
        ("0 < accuracy <= 0.8", False),
        ("max(accuracy, eval.f1) * 2 / 4 == 0.425", True),
        ("-accuracy > -0.5", False),
    ],
)
def test_rules_evaluate(rule: str, fires: bool) -> None:
    cand = {"accuracy": 0.85, "eval.f1": 0.7, "checkpoint.loss": 0.3}
    base = {"accuracy": 0.9}
    assert parse_rule(rule).evaluate(cand, base) is fires


@pytest.mark.parametrize(
    "rule",
    [
        "__import__('os').system('touch pwned') == 0",
        "accuracy",
        "accuracy < baseline",
        "accuracy ** 2 > 1",
        "accuracy < 'x'",
        "open('f').read() == 1",
        "accuracy < baseline.accuracy - ",
        "(lambda: 1)() < 2",
        "accuracy.__class__ < 1",
        "[1][0] < accuracy",
        "accuracy < True",
        "(accuracy < 1) < 2",
    ],
)
def test_rules_outside_the_language_are_refused(rule: str) -> None:
    with pytest.raises(InvalidRuleError) as e:
        parse_rule(rule)
    assert e.value.exit_code == 2


def test_metrics_files_as_dvc_reads_them() -> None:
    assert metrics_paths((REPO / "dvc.yaml").read_text()) == ["metrics.json"]
    assert metrics_paths("stages:\n  a:\n    metrics:\n      - m.yaml:\n          cache: false\n"
                         "metrics: [top.json]\n") == ["top.json", "m.yaml"]
    assert parse_metrics("m.yaml", "a: 1\nb:\n  c: 0.5\n  d: text\n  e: true\n") == {
        "a": 1.0, "b.c": 0.5}


# --- the command ---------------------------------------------------------------------------


def test_passing_check_writes_report(gated: Path, tmp_path: Path) -> None:
    write_metrics(gated, accuracy=0.95, eval={"f1": 0.85})
    md = tmp_path / "report.md"
    res = check(gated, "workspace", "--baseline", "tiny#production", "--fail-if", RULE,
                "--fail-if", "eval.f1 < baseline.eval.f1", "--md", str(md))
    assert res.exit_code == 0, res.stderr
    assert "check passed" in res.stdout
    text = md.read_text()
    assert text.startswith("### modelver check: ✅ passed")
    assert "| metric | baseline | candidate | delta | rule | result |" in text
    assert f"| accuracy | 0.9 | 0.95 | +0.05 | `{RULE}` | ✅ pass |" in text
    assert "| eval.f1 | 0.8 | 0.85 | +0.05 |" in text
    assert "buffers rebuilt from the checkpoint's own shapes" in text
    # the manifest's training loss is a metric too, and not shadowed by a file here
    data = report_of(check(gated, "workspace", "-b", "tiny@v0.1.0", "--json"))
    rows = {m["name"]: m for m in data["metrics"]}
    assert set(rows) == {"accuracy", "eval.f1", "loss"}
    assert data["candidate"]["sources"]["loss"] == "checkpoint"
    assert data["passed"] and data["resume"]["restored"] == ["model", "optimizer"]


def test_failing_rule_exit_1_reason_and_report(gated: Path, tmp_path: Path) -> None:
    write_metrics(gated, accuracy=0.80, eval={"f1": 0.85})
    md = tmp_path / "report.md"
    res = check(gated, "workspace", "--baseline", "tiny#production", "--fail-if", RULE,
                "--md", str(md))
    assert res.exit_code == 1
    line = one_error_line(res)
    assert line.startswith(f"error: check failed: rule '{RULE}' failed")
    assert "accuracy=0.8, baseline.accuracy=0.9" in line and str(md) in line
    text = md.read_text()
    assert text.startswith("### modelver check: ❌ failed")
    assert f"| accuracy | 0.9 | 0.8 | -0.1 | `{RULE}` | ❌ fail |" in text
    res = check(gated, "workspace", "-b", "tiny#production", "--fail-if", RULE, "--json")
    assert res.exit_code == 1 and report_of(res)["passed"] is False  # stdout stays pure JSON


def test_undecidable_rule_fails(gated: Path) -> None:
    res = check(gated, "workspace", "-b", "tiny#production", "--fail-if", "acc < 0.5")
    assert res.exit_code == 1
    assert "cannot be decided: candidate has no metric 'acc'" in one_error_line(res)


def test_corrupted_candidate(gated: Path, tmp_path: Path) -> None:
    state = gated / "checkpoints" / "step-00000020" / "state.json"
    state.write_text(state.read_text().replace("1", "2", 1))
    md = tmp_path / "r.md"
    res = check(gated, "workspace", "-b", "tiny#production", "--fail-if", RULE, "--md", str(md))
    assert res.exit_code == 1
    assert "check failed: candidate checkpoint is corrupted" in one_error_line(res)
    text = md.read_text()
    assert "**Integrity:** ❌" in text and "not tried: the checkpoint is corrupted" in text


def test_bad_expression_exit_2_runs_nothing(gated: Path, tmp_path: Path) -> None:
    md = tmp_path / "r.md"
    res = check(gated, "workspace", "-b", "tiny#nope", "--md", str(md),
                "--fail-if", RULE, "--fail-if", "__import__('os').system('touch pwned') == 0")
    assert res.exit_code == 2
    assert "invalid rule" in one_error_line(res)  # not the unknown baseline: nothing was read
    assert not md.exists() and not (gated / "pwned").exists()
    res = check(gated, "workspace", "-b", "tiny#production", "--model", "no_colon")
    assert res.exit_code == 2 and "invalid --model" in one_error_line(res)


def test_unknown_baseline(gated: Path) -> None:
    res = check(gated, "workspace", "--baseline", "tiny#staging", "--fail-if", RULE)
    assert res.exit_code == 1
    assert "unknown reference 'tiny#staging'" in one_error_line(res)
    assert "no version of tiny is in stage 'staging'" in res.stderr
    res = check(gated, "workspace", "--baseline", "tiny@v9.9.9")
    assert res.exit_code == 1 and "modelver list tiny" in one_error_line(res)


def test_version_candidate_against_lock_and_commit_baseline(gated: Path) -> None:
    first = git(gated, "rev-parse", "HEAD")
    set_params(gated, steps=30)
    write_metrics(gated, accuracy=0.91, eval={"f1": 0.81})
    train_and_commit(gated, "train to 30")
    assert run(gated, "tag", "tiny@v0.2.0", "-q").exit_code == 0
    res = check(gated, "tiny@v0.2.0", "--baseline", first, "--fail-if", RULE, "--json")
    assert res.exit_code == 0, res.stderr
    data = report_of(res)
    assert data["candidate"]["tag"] == "tiny@v0.2.0" and data["candidate"]["step"] == 30
    assert data["baseline"]["kind"] == "commit" and data["baseline"]["step"] == 20
    assert data["integrity"] == {"ok": True, "problems": [], "files": 3, "against_lock": True}
    rows = {m["name"]: m for m in data["metrics"]}
    assert rows["accuracy"]["delta"] == pytest.approx(0.01)
    assert rows["loss"]["baseline"] is not None  # the commit's manifest was read


def test_cached_metrics_file_is_read_from_dvc_cache(gated: Path) -> None:
    with open(gated / "dvc.yaml") as f:
        spec = yaml.safe_load(f)
    spec["stages"]["score"] = {
        "cmd": f"{sys.executable} -c \"open('score.yaml', 'w').write('f1: 0.7\\n')\"",
        "metrics": ["score.yaml"],  # cached by DVC, not in Git
    }
    (gated / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    train_and_commit(gated, "score stage")
    assert "score.yaml" in (gated / ".gitignore").read_text()
    commit = git(gated, "rev-parse", "HEAD")
    (gated / "score.yaml").unlink()  # the commit's value comes from the DVC cache
    res = check(gated, "workspace", "-b", commit, "--fail-if", "f1 < 0.5 or baseline.f1 < 0.5",
                "--json")
    assert res.exit_code == 1  # the workspace lost its metrics file
    data = report_of(res)
    assert data["baseline"]["metrics"]["f1"] == 0.7 and data["baseline"]["sources"]["f1"] == (
        "score.yaml")
    assert "candidate has no metric 'f1'" in data["reason"]


def test_model_factory_restores_or_explains(gated: Path) -> None:
    (gated / "factory.py").write_text(FACTORY)
    res = check(gated, "workspace", "-b", "tiny#production", "--model", "factory.py:build_state",
                "--json")
    assert res.exit_code == 0, res.stderr
    resume = report_of(res)["resume"]
    assert (resume["mode"], resume["restored"], resume["ok"]) == (
        "factory", ["model", "optimizer"], True)
    res = check(gated, "workspace", "-b", "tiny#production", "--model", "factory:wider")
    assert res.exit_code == 1
    line = one_error_line(res)
    assert "candidate cannot be resumed: cannot restore 'model'" in line and "0.weight" in line
    res = check(gated, "workspace", "-b", "tiny#production", "--model", "factory:picky")
    assert res.exit_code == 1
    line = one_error_line(res)  # the object's own refusal, named with its component
    assert ("resumed: cannot restore 'optimizer': its load_state_dict refused the state: "
            "saved with another learning rate") in line
    res = check(gated, "workspace", "-b", "tiny#production", "--model", "factory:nothing")
    assert res.exit_code == 2 and "no callable 'nothing'" in one_error_line(res)


def test_check_outside_git_compares_directories(gated: Path, tmp_path: Path) -> None:
    import shutil

    outside = tmp_path / "plain"
    shutil.copytree(gated / "checkpoints", outside / "cand")
    res = check(outside, "cand", "-b", "cand/step-00000010", "--fail-if", "loss > 100")
    assert res.exit_code == 0, res.stderr
    res = check(outside, "cand", "-b", "tiny#production")
    assert res.exit_code == 1 and "not inside a Git repository" in one_error_line(res)


def test_report_api_is_plain_data(gated: Path) -> None:
    from modelver import api
    from modelver.cli.check import to_markdown

    report = api.check("workspace", baseline="tiny", rules=[RULE], repo_root=gated)
    assert isinstance(report, CheckReport) and report.passed
    assert json.loads(json.dumps(report.to_json()))["reason"] is None
    assert to_markdown(report).count("\n| ") >= 3


# --- the GitHub Actions example ------------------------------------------------------------


def _modelver_calls(workflow: dict) -> list[list[str]]:
    calls = []
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            script = step.get("run", "")
            for line in script.replace("\\\n", " ").splitlines():
                words = shlex.split(re.sub(r"(^|\s)#.*$", "", line))  # bash comments
                if words[:1] == ["modelver"]:
                    calls.append(words[1:])
    return calls


def test_github_actions_workflow_uses_real_commands(tmp_path: Path) -> None:
    workflow = yaml.safe_load((REPO / "examples" / "ci" / "github-actions.yml").read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1: on == true
    assert "pull_request" in triggers
    steps = [s for job in workflow["jobs"].values() for s in job["steps"]]
    checkout = next(s for s in steps if str(s.get("uses", "")).startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0
    scripts = "\n".join(s.get("run", "") for s in steps)
    assert "dvc pull" in scripts and "dvc repro" in scripts
    assert any("github-script" in str(s.get("uses", "")) or "gh pr comment" in s.get("run", "")
               for s in steps)
    calls = _modelver_calls(workflow)
    assert any(c[:1] == ["check"] for c in calls)
    for call in calls:
        path = [w for w in call if not w.startswith("-")][:2]
        res = run(tmp_path, *(path if path[:1] == ["mlflow"] else path[:1]), "--help")
        assert res.exit_code == 0, (call, res.output)
        for word in call:
            if word.startswith("--"):
                assert word.split("=")[0] in res.stdout, f"modelver {call[0]}: no {word}"
    model = next(c[c.index("--model") + 1] for c in calls if "--model" in c)
    assert (REPO / model.split(":")[0]).is_file()


def test_help_lists_check_and_mlflow(tmp_path: Path) -> None:
    res = run(tmp_path, "--help")
    assert "check" in res.stdout and "mlflow" in res.stdout
    assert run(tmp_path, "mlflow", "sync", "--help").exit_code == 0


# --- the demo pipeline, as the GitHub Actions example runs it ---------------------------------


@pytest.mark.slow
def test_demo_pipeline_gate_with_training_state(tmp_path: Path) -> None:
    import shutil
    import subprocess

    from tests.helpers import make_pipeline_repo, repro, set_train_params

    repo, env = make_pipeline_repo(tmp_path)
    (repo / "examples" / "ci").mkdir()
    shutil.copy(REPO / "examples" / "ci" / "digits_state.py", repo / "examples" / "ci")

    def sh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True,
                              timeout=300, check=False)

    def modelver(*args: str) -> subprocess.CompletedProcess[str]:
        return sh(sys.executable, "-m", "modelver.cli.main", *args)

    set_train_params(repo, steps=300)
    repro(repo, env)
    assert sh("git", "add", "-A").returncode == 0
    assert sh("git", "commit", "-qm", "300 steps").returncode == 0
    for args in (("tag", "digits-mlp@v1.0.0", "-q"), ("promote", "digits-mlp@v1.0.0",
                                                       "production", "-q")):
        done = modelver(*args)
        assert done.returncode == 0, done.stderr
    set_train_params(repo, steps=400)
    repro(repo, env)
    gate = ["check", "workspace", "--baseline", "digits-mlp#production",
            "--model", "examples/ci/digits_state.py:build_state", "--md", "report.md"]
    res = modelver(*gate, "--fail-if", "accuracy < baseline.accuracy - 0.05")
    assert res.returncode == 0, res.stdout + res.stderr
    text = (repo / "report.md").read_text()
    assert ("✅ restored data, model, optimizer, scheduler into what "
            "examples/ci/digits_state.py:build_state builds") in text
    assert "| step | 300 | 400 | +100 |" in text
    res = modelver(*gate, "--fail-if", "accuracy < baseline.accuracy + 0.5")
    assert res.returncode == 1 and res.stderr.startswith("error: check failed: rule ")
    set_train_params(repo, hidden=64)  # the factory now builds another architecture
    res = modelver(*gate)
    assert res.returncode == 1 and "candidate cannot be resumed" in res.stderr
