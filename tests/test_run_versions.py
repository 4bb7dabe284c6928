"""Versions of a pipeline whose checkpoints output holds several runs (``run=``): a commit
stands for the run its training used (``CURRENT_RUN.json``), and tag, show, diff, checkout and
verify take that run's checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from modelver import api, load_checkpoint
from modelver.checkpoint.runid import CURRENT_FILE, run_id
from modelver.errors import CheckpointNotFoundError, MalformedDataError
from tests.helpers import (
    DVC_YAML,
    commit_all,
    dvc,
    git,
    one_error_line,
    run,
    set_params,
    train_and_commit,
    train_py,
)

RUN_TRAIN = train_py(options=', run={"lr": p["lr"], "seed": p["seed"]}')


def _id(lr: float) -> str:
    rid = run_id({"lr": lr, "seed": 0})
    assert rid is not None
    return rid


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A repo trained at lr 0.05 (commit A), then at lr 0.01 (commit B) in the same output."""
    root = tmp_path_factory.mktemp("runs") / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "train.py").write_text(RUN_TRAIN)
    (root / "dvc.yaml").write_text(DVC_YAML.format(python=sys.executable))
    set_params(root, steps=20, lr=0.05)
    api.init(root, remote=str(root.parent / "remote"))
    a = train_and_commit(root, "lr 0.05")
    set_params(root, steps=20, lr=0.01)
    b = train_and_commit(root, "lr 0.01")
    return root, a, b


def test_the_output_holds_both_runs_and_names_the_current(two_runs: tuple[Path, str, str]) -> None:
    root, _, _ = two_runs
    ck = root / "checkpoints"
    assert sorted(p.name for p in ck.glob("run-*")) == sorted(
        [f"run-{_id(0.05)}", f"run-{_id(0.01)}"]
    )
    assert json.loads((ck / CURRENT_FILE).read_text()) == {"run": _id(0.01)}


def test_tag_show_diff_checkout_verify_take_the_commits_run(
    two_runs: tuple[Path, str, str], tmp_path: Path
) -> None:
    root, a, b = two_runs
    ta = api.tag("tiny@v1.0.0", rev=a, repo_root=root)
    tb = api.tag("tiny@v1.1.0", rev=b, repo_root=root)
    assert (ta.step, tb.step) == (20, 20)
    shown_a = api.show("tiny@v1.0.0", repo_root=root, check_remote=False)
    shown_b = api.show("tiny@v1.1.0", repo_root=root, check_remote=False)
    assert shown_a.step_dir == f"run-{_id(0.05)}/step-00000020"
    assert shown_b.step_dir == f"run-{_id(0.01)}/step-00000020"
    assert "MANIFEST.json" in {f.path for f in shown_a.files}
    res_show = run(root, "show", "tiny@v1.0.0", "--json")
    assert res_show.exit_code == 0, res_show.stderr
    assert json.loads(res_show.stdout)["run"] == _id(0.05)  # show says which run

    res = api.diff("tiny@v1.0.0", "tiny@v1.1.0", repo_root=root)
    assert res.summary.counts.get("changed", 0) > 0  # other lr, other weights

    out = api.checkout("tiny@v1.0.0", to=tmp_path / "out", repo_root=root)
    assert out.path == tmp_path / "out" / f"run-{_id(0.05)}" / "step-00000020"
    mine = load_checkpoint(root / "checkpoints" / f"run-{_id(0.05)}" / "step-00000020")
    got = load_checkpoint(out.path)
    assert got.manifest.run == _id(0.05)
    for k, t in mine.state["model"].items():
        assert got.state["model"][k].equal(t), k

    checked = api.verify("tiny@v1.1.0", repo_root=root).checked
    assert len(checked) == 4  # two kept checkpoints of each run, all pinned by commit B
    assert all(not c.problems for c in checked)
    assert len(api.verify(None, repo_root=root).checked) == 4  # the workspace, both runs


def test_back_to_an_earlier_run_continues_it_and_the_commit_stands_for_it(
    two_runs: tuple[Path, str, str],
) -> None:
    root, _, _ = two_runs
    set_params(root, steps=30, lr=0.05)  # the first run again, ten more steps
    c = train_and_commit(root, "lr 0.05 to 30")
    ck = root / "checkpoints"
    assert json.loads((ck / CURRENT_FILE).read_text()) == {"run": _id(0.05)}
    assert (ck / f"run-{_id(0.05)}" / "step-00000030").is_dir()
    assert sorted(p.name for p in (ck / f"run-{_id(0.01)}").glob("step-*")) == [
        "step-00000010", "step-00000020"  # the other run untouched
    ]
    t = api.tag("tiny@v2.0.0", rev=c, repo_root=root)
    assert t.step == 30
    shown = api.show("tiny@v2.0.0", repo_root=root, check_remote=False)
    assert shown.step_dir == f"run-{_id(0.05)}/step-00000030"


def trained(tmp_path: Path, *lrs: float) -> Path:
    """A repo whose train stage ran (uncommitted) at each learning rate in turn."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "train.py").write_text(RUN_TRAIN)
    (root / "dvc.yaml").write_text(DVC_YAML.format(python=sys.executable))
    api.init(root, remote=str(tmp_path / "remote"))
    for lr in lrs:
        set_params(root, steps=10, lr=lr)
        dvc(root, "repro", "-q")
    return root


def test_a_crafted_pointer_is_refused_and_no_tag_is_made(tmp_path: Path) -> None:
    root = trained(tmp_path, 0.05)
    (root / "checkpoints" / CURRENT_FILE).write_text('{"run": "../../etc"}\n')
    dvc(root, "commit", "-q", "-f")
    commit_all(root, "crafted pointer")
    with pytest.raises(MalformedDataError, match="run"):
        api.tag("tiny@v1.0.0", repo_root=root)
    res = run(root, "tag", "tiny@v1.0.1")
    assert "CURRENT_RUN.json" in one_error_line(res, exit_code=1)
    assert git(root, "tag", "--list") == ""


def test_several_runs_and_no_pointer_is_one_clear_error(tmp_path: Path) -> None:
    root = trained(tmp_path, 0.05, 0.01)
    (root / "checkpoints" / CURRENT_FILE).unlink()
    dvc(root, "commit", "-q", "-f")
    commit_all(root, "no pointer")
    with pytest.raises(CheckpointNotFoundError, match=r"no CURRENT_RUN\.json"):
        api.tag("tiny@v1.0.0", repo_root=root)
