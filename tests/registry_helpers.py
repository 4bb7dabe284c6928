"""A tiny Git + DVC project whose `dvc repro` trains with modelver checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from modelver import api
from modelver.cli.main import cli

TRAIN = '''\
import random, yaml, torch
from torch import nn
from modelver import CheckpointManager

p = yaml.safe_load(open("params.yaml"))["train"]
torch.set_num_threads(1)
random.seed(0)
torch.manual_seed(p["seed"])
g = torch.Generator().manual_seed(123)
x = torch.randn(64, 8, generator=g)
y = (x.sum(1) > 0).long()
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
opt = torch.optim.Adam(model.parameters(), lr=p["lr"])
state = {"model": model, "optimizer": opt}
mgr = CheckpointManager("checkpoints", every_steps=p["every"], keep_last=2)
start = mgr.restore(state)
print("START", start, flush=True)
loss = torch.tensor(0.0)
for step in range(start, p["steps"]):
    idx = torch.randint(0, 64, (16,))
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    mgr.maybe_save(step + 1, state, metrics={"loss": loss.item()})
if mgr.latest() is None or mgr.latest().step != p["steps"]:
    mgr.save(p["steps"], state, metrics={"loss": loss.item()})
mgr.close()
'''

DVC_YAML = """\
stages:
  train:
    cmd: {python} train.py
    deps: [train.py]
    params: [train]
    outs:
      - checkpoints:
          persist: true
artifacts:
  tiny:
    path: checkpoints
    type: model
"""


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True,
        text=True, env=os.environ.copy(),
    )


def set_params(root: Path, *, steps: int, every: int = 10, lr: float = 0.05) -> None:
    (root / "params.yaml").write_text(
        f"train:\n  seed: 0\n  steps: {steps}  # total\n  every: {every}\n  lr: {lr}\n"
    )


def make_project(root: Path, *, steps: int = 20, remote: str | None = None) -> Path:
    """git init, modelver init, one `dvc repro`, everything committed."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q")
    (root / "train.py").write_text(TRAIN)
    (root / "dvc.yaml").write_text(DVC_YAML.format(python=sys.executable))
    set_params(root, steps=steps)
    api.init(root, remote=remote)
    train_and_commit(root, "train")
    return root


def train_and_commit(root: Path, message: str) -> str:
    dvc(root, "repro", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)
    return git(root, "rev-parse", "HEAD")


def model_hashes(step_dir: Path) -> dict[str, str]:
    """Tensor name -> content hash of the model tensors, from the manifest."""
    from modelver.checkpoint.format import read_manifest

    m = read_manifest(step_dir)
    return {k: t.hash for k, t in m.tensors.items() if k.startswith("model/")}


def run(cwd: Path, *args: str) -> Result:
    """The CLI in-process, from ``cwd`` (CliRunner keeps stdout and stderr apart)."""
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


def init_repo(tmp_path: Path) -> Path:
    """A committed Git + DVC repository with a local-directory default remote."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    api.init(root, remote=str(tmp_path / "remote"))
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    return root
