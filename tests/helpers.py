"""Helpers shared by the test files (fixtures are in conftest.py).

Processes and isolation, a tiny Git + DVC project whose `dvc repro` trains with modelver
checkpoints, the CLI in-process, small training states, and checks on killed runs. The API
and the CLI are imported inside the helpers that use them: the checkpoint-core tests then load
no Git or DVC code, as the core itself does not.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import Result
from safetensors.torch import load_file
from torch import nn

from modelver import ResumableSampler

TESTS = Path(__file__).parent
REPO = TESTS.parent
S3_BUCKET = "models"

# --- processes and isolation ------------------------------------------------------------------


def isolated_env_vars(home: Path) -> dict[str, str]:
    """The variables that keep Git, DVC and modelver away from the user's own configuration."""
    return {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"),
        "GIT_AUTHOR_NAME": "modelver tests",
        "GIT_AUTHOR_EMAIL": "tests@modelver.invalid",
        "GIT_COMMITTER_NAME": "modelver tests",
        "GIT_COMMITTER_EMAIL": "tests@modelver.invalid",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(home / ".dvc-site"),
    }


def write_gitconfig(home: Path) -> None:
    """Branch `main` whatever the machine's Git defaults to."""
    (home / ".gitconfig").write_text("[init]\n\tdefaultBranch = main\n")


def run_py(*args: str | Path, cwd: Path | None = None, check: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a Python script of the test suite with the interpreter running the tests."""
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
        check=check, timeout=timeout, env=os.environ.copy(),
    )


def repo_env() -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH (subprocesses import modelver and
    tests from it, whatever their working directory)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- a Git + DVC project ----------------------------------------------------------------------


def train_py(*, rows: int = 64, features: int = 8, hidden: int = 16, batch: int = 16,
             optimizer: str = "Adam", imports: str = "", setup: str = "", options: str = "",
             step_end: str = "", final_save: bool = True) -> str:
    """The text of a `train.py` stage: reads params.yaml's `train` section, restores, trains a
    small classifier on fixed random data, offers a checkpoint every step (`maybe_save`) and,
    with ``final_save``, saves the last step if the schedule did not."""
    final = (
        'if mgr.latest() is None or mgr.latest().step != p["steps"]:\n'
        '    mgr.save(p["steps"], state, metrics={"loss": loss.item()})\n'
    )
    return f'''\
import {imports}random, yaml, torch
from torch import nn
from modelver import CheckpointManager

p = yaml.safe_load(open("params.yaml"))["train"]
torch.set_num_threads(1)
random.seed(0)
torch.manual_seed(p["seed"])
g = torch.Generator().manual_seed(123)
x = torch.randn({rows}, {features}, generator=g)
y = (x.sum(1) > 0).long()
model = nn.Sequential(nn.Linear({features}, {hidden}), nn.ReLU(), nn.Dropout(0.2), \
nn.Linear({hidden}, 2))
opt = torch.optim.{optimizer}(model.parameters(), lr=p["lr"])
state = {{"model": model, "optimizer": opt}}
{setup}mgr = CheckpointManager("checkpoints", every_steps=p["every"], keep_last=2{options})
start = mgr.restore(state)
print("START", start, flush=True)
loss = torch.tensor(0.0)
for step in range(start, p["steps"]):
    idx = torch.randint(0, {rows}, ({batch},))
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    mgr.maybe_save(step + 1, state, metrics={{"loss": loss.item()}})
{step_end}{final if final_save else ""}mgr.close()
'''


TRAIN = train_py()

DVC_STAGE = """\
stages:
  train:
    cmd: {python} train.py
    deps: [train.py]
    params: [train]
    outs:
      - checkpoints:
          persist: true
"""

DVC_YAML = DVC_STAGE + """\
artifacts:
  tiny:
    path: checkpoints
    type: model
"""


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def dvc(cwd: Path, *args: str, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """The DVC command line with this interpreter; ``env`` is added to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, check=check, capture_output=True,
        text=True, env={**os.environ, **(env or {})},
    )


def set_params(root: Path, *, steps: int, every: int = 10, lr: float = 0.05) -> None:
    (root / "params.yaml").write_text(
        f"train:\n  seed: 0\n  steps: {steps}  # total\n  every: {every}\n  lr: {lr}\n"
    )


def commit_all(root: Path, message: str) -> str:
    """`git add -A` and commit; the new HEAD."""
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)
    return git(root, "rev-parse", "HEAD")


def make_project(root: Path, *, steps: int = 20, remote: str | None = None) -> Path:
    """git init, modelver init, one `dvc repro`, everything committed."""
    from modelver import api

    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q")
    (root / "train.py").write_text(TRAIN)
    (root / "dvc.yaml").write_text(DVC_YAML.format(python=sys.executable))
    set_params(root, steps=steps)
    api.init(root, remote=remote)
    train_and_commit(root, "train")
    return root


def copy_project(template: Path, root: Path) -> Path:
    """A private copy of a template project, with its own default remote (under this HOME)."""
    from modelver import api

    shutil.copytree(template, root, symlinks=True)
    (root / ".dvc" / "config.local").unlink()
    shutil.rmtree(root / ".dvc" / "tmp", ignore_errors=True)
    api.init(root)
    return root


def train_and_commit(root: Path, message: str) -> str:
    dvc(root, "repro", "-q")
    return commit_all(root, message)


def init_repo(tmp_path: Path) -> Path:
    """A committed Git + DVC repository with a local-directory default remote."""
    from modelver import api

    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    api.init(root, remote=str(tmp_path / "remote"))
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    return root


def model_hashes(step_dir: Path) -> dict[str, str]:
    """Tensor name -> content hash of the model tensors, from the manifest."""
    from modelver.checkpoint.format import read_manifest

    m = read_manifest(step_dir)
    return {k: t.hash for k, t in m.tensors.items() if k.startswith("model/")}


def write_metrics(root: Path, **values: object) -> None:
    (root / "metrics.json").write_text(json.dumps(values) + "\n")


def same_tree(a: Path, b: Path) -> bool:
    """Two directory trees hold the same names and the same bytes."""
    cmp = filecmp.dircmp(a, b)
    names = cmp.common_files
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not (cmp.left_only or cmp.right_only or mismatch or errors) and all(
        same_tree(a / d, b / d) for d in cmp.common_dirs
    )


# --- Git LFS projects ---------------------------------------------------------------------------


def skip_without_git_lfs() -> None:
    """Skip the calling module where git-lfs is missing, except in CI, where that must fail."""
    if os.environ.get("CI"):
        return
    if shutil.which("git") is None or subprocess.run(
        ["git", "lfs", "version"], capture_output=True
    ).returncode != 0:
        pytest.skip("git-lfs is not installed (Debian: apt-get install git-lfs)",
                    allow_module_level=True)


def run_train_py(root: Path, steps: int) -> None:
    """Set ``steps`` and run the project's train.py directly (no `dvc repro`)."""
    set_params(root, steps=steps)
    subprocess.run([sys.executable, "train.py"], cwd=root, check=True, capture_output=True)


def make_lfs_project(root: Path) -> Path:
    """A Git LFS project (no DVC) trained to step 20, committed and tagged tiny@v0.1.0."""
    root.mkdir()
    git(root, "init", "-q")
    (root / "train.py").write_text(TRAIN)
    res = run(root, "init", "--backend", "lfs", "--artifact", "tiny=checkpoints")
    assert res.exit_code == 0, res.stderr
    run_train_py(root, 20)
    commit_all(root, "train 20")
    tagged = run(root, "tag", "tiny@v0.1.0", "-q")
    assert tagged.exit_code == 0, tagged.stderr
    return root


# --- the CLI in-process -----------------------------------------------------------------------


def run(cwd: Path, *args: str) -> Result:
    """The CLI in-process, from ``cwd`` (CliRunner keeps stdout and stderr apart)."""
    from click.testing import CliRunner

    from modelver.cli.main import cli

    old = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)


def one_error_line(res: Result, *, exit_code: int | None = None) -> str:
    """The single ``error: ... hint: ...`` line a user error must print, and nothing else."""
    if exit_code is not None:
        assert res.exit_code == exit_code, (res.exit_code, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "hint:" in lines[0]
    return lines[0]


# --- training state -----------------------------------------------------------------------------


def make_state(hidden: int = 8, seed: int = 0, *, sampler: bool = True) -> dict:
    """A small model, AdamW, a StepLR schedule and (``sampler``) a ResumableSampler."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.Dropout(0.2), nn.Linear(hidden, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    state: dict = {"model": model, "optimizer": opt, "scheduler": sched}
    if sampler:
        state["data"] = ResumableSampler(range(10), shuffle=True, seed=3)
    return state


def train_steps(state: dict, n: int) -> None:
    """``n`` optimizer and scheduler steps of a `make_state` state."""
    model, opt, sched = state["model"], state["optimizer"], state["scheduler"]
    for _ in range(n):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


# --- killed runs --------------------------------------------------------------------------------


def weights_equal(a: Path, b: Path) -> bool:
    """Two safetensors files hold the same tensor names and the same values."""
    wa, wb = load_file(a), load_file(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def saving(ck: Path) -> bool:
    """A save is under way (or was cut short): its temp directory exists."""
    try:
        return any(name.startswith(".tmp-") for name in os.listdir(ck))
    except FileNotFoundError:
        return False


# --- the demo pipeline (dvc.yaml + examples/digits) in a fresh repository -----------------------

PIPELINE_FILES = [
    "dvc.yaml",
    "params.yaml",
    "examples/digits/common.py",
    "examples/digits/prepare.py",
    "examples/digits/train.py",
    "examples/digits/evaluate.py",
]
REPRO_TIMEOUT = 300


def pipeline_env(home: Path) -> dict[str, str]:
    """The environment of the pipeline's subprocesses: isolated, this interpreter's tools first,
    this checkout importable."""
    return {
        **repo_env(),
        **isolated_env_vars(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }


def run_cmd(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=REPRO_TIMEOUT, check=False
    )


def dvc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def make_pipeline_repo(base: Path) -> tuple[Path, dict[str, str]]:
    """A fresh Git + DVC repository holding a copy of the demo pipeline, committed."""
    repo = base / "repo"
    home = base / "home"
    home.mkdir(parents=True)
    for rel in PIPELINE_FILES:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, repo / rel)
    (repo / ".gitignore").write_text("__pycache__/\n")
    env = pipeline_env(home)
    for args in (
        ["git", "init", "-q", "-b", "main"],
        dvc_cmd("init", "-q"),
        ["git", "add", "-A"],
        ["git", "commit", "-q", "-m", "demo pipeline"],
    ):
        r = run_cmd(args, repo, env)
        assert r.returncode == 0, f"{args}: {r.stdout}{r.stderr}"
    return repo, env


def repro(repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    r = run_cmd(dvc_cmd("repro"), repo, env)
    assert r.returncode == 0, f"dvc repro failed:\n{r.stdout}{r.stderr}"
    return r


def set_train_params(repo: Path, **values: float) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["train"].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


# --- Hugging Face Trainer ------------------------------------------------------------------------


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int = 12, seed: int = 123) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 100, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.x[i], "labels": self.x[i]}
