"""DVC experiments as modelver refs, and the DVC metrics files of a version's commit.

One real pipeline, trained by `dvc repro` and then by two `dvc exp run -S ...` experiments
(exp-a continues to step 30, exp-b to step 40); every test gets a copy. `tag`, `show`,
`diff` and `checkout` take an experiment's name or its `refs/exps/...` ref; `list --json` and
`show` carry the DVC metrics files of the commit (one in Git, one cached by DVC).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    DVC_STAGE,
    commit_all,
    copy_project,
    dvc,
    git,
    isolated_env_vars,
    one_error_line,
    run,
    set_params,
    train_py,
    write_gitconfig,
)

TRAIN = train_py(imports="json, ") + (
    'json.dump({"loss": loss.item(), "steps": p["steps"]}, open("metrics.json", "w"))\n'
    'json.dump({"lr": p["lr"], "eval": {"tag": "ok"}}, open("eval.json", "w"))\n'
)
# metrics.json is kept in Git, eval.json in the DVC cache (dvc.lock pins its md5)
DVC_YAML = DVC_STAGE + """\
    metrics:
      - metrics.json:
          cache: false
      - eval.json
artifacts:
  tiny:
    path: checkpoints
    type: model
"""


@pytest.fixture(scope="module")
def exp_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from modelver import api

    home = tmp_path_factory.mktemp("exp-home")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in isolated_env_vars(home).items():
            mp.setenv(key, value)
        write_gitconfig(home)
        root = tmp_path_factory.mktemp("exp-template") / "proj"
        root.mkdir()
        git(root, "init", "-q")
        (root / "train.py").write_text(TRAIN)
        (root / "dvc.yaml").write_text(DVC_YAML.format(python=sys.executable))
        set_params(root, steps=20)
        api.init(root)
        dvc(root, "repro", "-q")
        commit_all(root, "train 20")
        dvc(root, "exp", "run", "-q", "-n", "exp-a", "-S", "train.steps=30")
        dvc(root, "exp", "run", "-q", "-n", "exp-b", "-S", "train.steps=40")
        yield root


@pytest.fixture
def exps(exp_template: Path, tmp_path: Path) -> Path:
    """A private copy of the experiments' repository with its own default remote."""
    return copy_project(exp_template, tmp_path / "proj")


def exp_refs(root: Path) -> dict[str, str]:
    """Experiment name -> its refs/exps/... ref, as Git lists them."""
    refs = git(root, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    return {r.rsplit("/", 1)[1]: r for r in refs if r.count("/") == 4}


def as_json(root: Path, *args: str) -> object:
    res = run(root, *args, "--json")
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def tags(root: Path) -> list[str]:
    return git(root, "tag", "-l").split()


@pytest.mark.slow
def test_tag_an_experiment_by_name_or_ref(exps: Path) -> None:
    refs = exp_refs(exps)
    assert sorted(refs) == ["exp-a", "exp-b"]
    res = run(exps, "tag", "tiny@v1.0.0", "exp-a")
    assert res.exit_code == 0, res.stderr
    assert git(exps, "rev-parse", "tiny@v1.0.0^{commit}") == git(exps, "rev-parse", refs["exp-a"])
    made = as_json(exps, "tag", "tiny@v1.1.0", refs["exp-b"])
    assert isinstance(made, dict) and made["step"] == 40
    assert made["commit"] == git(exps, "rev-parse", refs["exp-b"])

    listed = as_json(exps, "list")
    assert isinstance(listed, list)
    by_tag = {row["tag"]: row for row in listed}
    assert by_tag["tiny@v1.0.0"]["dvc_metrics"]["metrics.json"]["steps"] == 30
    v11 = by_tag["tiny@v1.1.0"]
    assert v11["dvc_metrics"]["metrics.json"]["steps"] == 40
    assert v11["dvc_metrics"]["eval.json"] == {"lr": 0.05, "eval.tag": "'ok'"}
    assert v11["dvc_metrics_error"] is None
    assert "loss" in v11["metrics"]  # the manifest's, beside DVC's

    shown = as_json(exps, "show", "exp-a")  # the version tagged at the experiment's commit
    assert isinstance(shown, dict) and shown["tag"] == "tiny@v1.0.0"
    assert shown["dvc_metrics"]["metrics.json"]["steps"] == 30
    text = run(exps, "show", "tiny@v1.1.0")
    assert text.exit_code == 0, text.stderr
    assert "dvc metrics" in text.stdout and "steps=40" in text.stdout
    assert "eval.json: eval.tag='ok', lr=0.05" in text.stdout


@pytest.mark.slow
def test_show_diff_checkout_take_experiments(exps: Path, tmp_path: Path) -> None:
    refs = exp_refs(exps)
    for ref in ("exp-b", refs["exp-b"]):
        shown = as_json(exps, "show", ref)  # untagged: the experiment's own checkpoint
        assert isinstance(shown, dict)
        assert shown["tag"] is None and shown["version"] is None and shown["step"] == 40
        assert shown["commit"] == git(exps, "rev-parse", refs["exp-b"])
        assert shown["dvc_metrics"]["metrics.json"]["steps"] == 40
        assert "loss" in shown["metrics"]
    text = run(exps, "show", "exp-b")
    assert text.exit_code == 0, text.stderr
    assert "no version tagged" in text.stdout and "steps=40" in text.stdout

    d = as_json(exps, "diff", "exp-a", refs["exp-b"])
    assert isinstance(d, dict) and (d["a"]["step"], d["b"]["step"]) == (30, 40)
    steps = d["metrics"]["metrics.json:steps"]
    assert (steps["a"], steps["b"], steps["delta"]) == (30, 40, 10)
    assert "loss" in d["metrics"] and "metrics.json:loss" in d["metrics"]
    assert d["params"]["train.steps"] == {"status": "changed", "a": 30, "b": 40}
    assert d["summary"]["changed"] > 0
    text = run(exps, "diff", "--stat", refs["exp-a"], "exp-b")
    assert text.exit_code == 0, text.stderr
    assert "metrics.json:steps" in text.stdout

    for ref, step in (("exp-a", 30), (refs["exp-b"], 40)):
        out = tmp_path / f"out-{step}"
        res = run(exps, "checkout", ref, "--to", str(out), "-q")
        assert res.exit_code == 0, res.stderr
        manifest = json.loads((out / f"step-{step:08d}" / "MANIFEST.json").read_text())
        assert manifest["step"] == step


@pytest.mark.slow
def test_unknown_ambiguous_and_crafted_refs_are_refused(exps: Path) -> None:
    refs = exp_refs(exps)
    line = one_error_line(run(exps, "tag", "tiny@v1.0.0", "exp-nope"), exit_code=1)
    assert "exp-nope" in line and "dvc exp show" in line
    one_error_line(run(exps, "diff", "exp-a", "exp-nope"), exit_code=1)

    # the same name under another baseline: ambiguous, and the error names both refs
    other = "refs/exps/ff/" + "f" * 38 + "/exp-a"
    git(exps, "update-ref", other, refs["exp-b"])
    for args in (("tag", "tiny@v1.0.0", "exp-a"), ("show", "exp-a"), ("checkout", "exp-a")):
        line = one_error_line(run(exps, *args), exit_code=1)
        assert refs["exp-a"] in line and other in line
    assert as_json(exps, "show", refs["exp-a"])["step"] == 30  # type: ignore[index]

    crafted = [
        refs["exp-a"].rsplit("/", 1)[0] + "/../../../heads/main",
        "refs/exps/exec/EXEC_BRANCH",
        "refs/exps/ab/cd/exp-a",
        "refs/exps/" + refs["exp-a"][10:] + ".lock",
    ]
    for rev in crafted:
        line = one_error_line(run(exps, "tag", "tiny@v1.0.0", rev), exit_code=2)
        assert "experiment ref" in line
        one_error_line(run(exps, "show", rev), exit_code=2)
    one_error_line(run(exps, "tag", "tiny@v1.0.0", "exp-a..exp-b"), exit_code=1)
    assert tags(exps) == []


@pytest.mark.slow
def test_a_branch_of_the_same_name_wins(exps: Path) -> None:
    """Git resolves branches, tags and SHAs first: an experiment never shadows them."""
    refs = exp_refs(exps)
    git(exps, "branch", "exp-a", refs["exp-b"])
    assert as_json(exps, "show", "exp-a")["step"] == 40  # type: ignore[index]
    assert as_json(exps, "show", refs["exp-a"])["step"] == 30  # type: ignore[index]
    res = run(exps, "tag", "tiny@v0.1.0", "exp-a", "-q")
    assert res.exit_code == 0, res.stderr
    tagged = git(exps, "rev-parse", "tiny@v0.1.0^{commit}")
    assert tagged == git(exps, "rev-parse", refs["exp-b"])
