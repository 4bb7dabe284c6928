"""DVC experiments on a pipeline whose training stage names its run (``run=``), with the real
``dvc exp`` commands: in the workspace, queued, in a temporary directory, applied, branched,
pushed to a bare Git remote plus the DVC remote and pulled into a fresh clone.

Each experiment's commit pins a ``checkpoints/`` output holding every run trained so far; the
run its own params name is the one it stands for (``CURRENT_RUN.json``), and modelver reads that
run's checkpoint from the experiment's name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelver import api, load_checkpoint
from modelver.checkpoint.runid import CURRENT_FILE, run_id
from tests.helpers import DVC_YAML, commit_all, git, run, set_params, train_py
from tests.helpers import dvc as _dvc

pytestmark = pytest.mark.slow

# `dvc queue start` spawns its worker as `dvc` from PATH: this interpreter's first
PATH = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _dvc(cwd, *args, env=PATH, check=check)


RUN_TRAIN = train_py(options=', run={"lr": p["lr"], "seed": p["seed"]}')


def rid(lr: float) -> str:
    found = run_id({"lr": lr, "seed": 0})
    assert found is not None
    return found


def make_repo(root: Path, remote: Path) -> Path:
    """Trained at lr 0.05 for 20 steps, everything committed."""
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    (root / "train.py").write_text(RUN_TRAIN)
    (root / "dvc.yaml").write_text(DVC_YAML.format(python=sys.executable))
    set_params(root, steps=20, lr=0.05)
    api.init(root, remote=str(remote))
    commit_all(root, "pipeline")
    dvc(root, "repro", "-q")
    commit_all(root, "trained lr 0.05")
    return root


def exp_run(root: Path, *args: str) -> str:
    """`dvc exp run ARGS`: its output (the stage's START lines included)."""
    r = dvc(root, "exp", "run", *args, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def exp_names(root: Path) -> dict[str, str]:
    """Experiment name -> its commit, from `dvc exp show --json`."""
    r = dvc(root, "exp", "show", "--json")
    names = {}
    for baseline in json.loads(r.stdout):
        for e in baseline.get("experiments") or []:
            for rev in e.get("revs") or []:
                if rev.get("name"):
                    names[rev["name"]] = rev["rev"]
    return names


def run_of(root: Path, ref: str) -> tuple[str | None, int]:
    """The run and step of the checkpoint modelver reads for REF (an experiment name)."""
    ck = load_checkpoint(api.checkpoint_dir_for(ref, repo_root=root))
    return ck.manifest.run, ck.step


def test_workspace_experiments_start_a_run_and_go_back_to_one(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "repo", tmp_path / "remote")
    first = root / "checkpoints" / f"run-{rid(0.05)}"
    manifests = {p: p.read_bytes() for p in first.glob("step-*/MANIFEST.json")}

    out = exp_run(root, "-S", "train.lr=0.01", "-n", "lr-small")
    assert "START 0" in out  # a run of its own, from step 0
    assert {p: p.read_bytes() for p in first.glob("step-*/MANIFEST.json")} == manifests
    assert run_of(root, "lr-small") == (rid(0.01), 20)

    out = exp_run(root, "-S", "train.lr=0.05", "-S", "train.steps=30", "-n", "lr-back")
    assert "START 20" in out  # the first run continues where it stopped
    assert run_of(root, "lr-back") == (rid(0.05), 30)
    assert json.loads((root / "checkpoints" / CURRENT_FILE).read_text()) == {"run": rid(0.05)}

    tagged = run(root, "tag", "tiny@v1.0.0", "lr-small")
    assert tagged.exit_code == 0, tagged.stderr
    shown = api.show("tiny@v1.0.0", repo_root=root, check_remote=False)
    assert shown.step_dir == f"run-{rid(0.01)}/step-00000020"
    assert shown.info.commit == exp_names(root)["lr-small"]


def test_queued_and_temp_experiments_each_train_their_own_run(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "repo", tmp_path / "remote")
    exp_run(root, "--queue", "-S", "train.lr=0.01", "-n", "q-small")
    exp_run(root, "--queue", "-S", "train.lr=0.02", "-n", "q-mid")
    r = dvc(root, "queue", "start", "-j", "1", check=False)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = dvc(root, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(1)
    assert status.count("Success") == 2, status

    out = exp_run(root, "--temp", "-S", "train.steps=30", "-n", "t-longer")
    assert "START 20" in out  # the temporary copy resumed the baseline's run
    assert run_of(root, "q-small") == (rid(0.01), 20)
    assert run_of(root, "q-mid") == (rid(0.02), 20)
    assert run_of(root, "t-longer") == (rid(0.05), 30)
    # the workspace did not change: still the baseline's run at step 20
    assert run_of(root, "HEAD") == (rid(0.05), 20)
    diff = api.diff("q-small", "q-mid", repo_root=root)
    assert diff.summary.counts.get("changed", 0) > 0


def test_apply_and_branch_give_the_experiments_checkpoint(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "repo", tmp_path / "remote")
    exp_run(root, "-S", "train.lr=0.01", "-n", "small")
    exp_run(root, "-S", "train.lr=0.02", "-n", "mid")
    r = dvc(root, "exp", "apply", "small", check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads((root / "checkpoints" / CURRENT_FILE).read_text()) == {"run": rid(0.01)}
    assert all(not c.problems for c in api.verify(None, repo_root=root).checked)

    r = dvc(root, "exp", "branch", "mid", "mid-branch", check=False)
    assert r.returncode == 0, r.stderr
    tagged = api.tag("tiny@v2.0.0", rev="mid-branch", repo_root=root)
    assert tagged.step == 20
    shown = api.show("tiny@v2.0.0", repo_root=root, check_remote=False)
    assert shown.step_dir == f"run-{rid(0.02)}/step-00000020"


def test_push_then_pull_into_a_fresh_clone_and_resume(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "repo", tmp_path / "remote")
    bare = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(root, "remote", "add", "origin", str(bare))
    git(root, "push", "-q", "origin", "main")
    exp_run(root, "-S", "train.lr=0.01", "-n", "shared")
    r = dvc(root, "exp", "push", "origin", "shared", check=False)
    assert r.returncode == 0, r.stdout + r.stderr

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(bare), str(clone))
    r = dvc(clone, "exp", "pull", "origin", "shared", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    out = api.checkout("shared", to=tmp_path / "out", repo_root=clone)
    assert out.path == tmp_path / "out" / f"run-{rid(0.01)}" / "step-00000020"
    want = load_checkpoint(root / "checkpoints" / f"run-{rid(0.01)}" / "step-00000020")
    got = load_checkpoint(out.path)
    for k, t in want.state["model"].items():
        assert got.state["model"][k].equal(t), k

    r = dvc(clone, "exp", "apply", "shared", check=False)
    assert r.returncode == 0, r.stderr
    r = dvc(clone, "checkout", "-q", check=False)  # the pulled checkpoints into the workspace
    assert r.returncode == 0, r.stderr
    out_text = exp_run(clone, "-S", "train.steps=30", "-n", "shared-longer")
    assert "START 20" in out_text  # the pulled run continues on the fresh machine
    assert run_of(clone, "shared-longer") == (rid(0.01), 30)
