"""DVCLive beside modelver checkpoints: after a kill the history has every step exactly once.

The cut-back on its own (hand-written histories, malformed ones), then a real Git + DVC repository
whose `train` stage logs with DVCLive and checkpoints with modelver, `dvc exp run` killed
mid-run and run again, against an uninterrupted run of the same stage.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelver import load_checkpoint
from modelver.errors import (
    InvalidArgumentError,
    MalformedDataError,
    ModelverError,
    ModelverWarning,
)
from modelver.integrations.dvclive import (
    LiveHistoryError,
    LiveStep,
    resume_live,
    truncate_history,
)
from tests.helpers import commit_all, dvc, git, repo_env

LIVE = {"dvcyaml": False, "save_dvc_exp": False}  # no Git repository in the unit tests


def tsv(rows: list[tuple[int, object]], name: str = "loss", *, timestamp: bool = False) -> str:
    head = ["timestamp"] * timestamp + ["step", name]
    lines = ["\t".join(head)] + [
        "\t".join([str(1000 + s)] * timestamp + [str(s), str(v)]) for s, v in rows
    ]
    return "".join(line + os.linesep for line in lines)


def history(root: Path, files: dict[str, str], summary: object | None = None) -> Path:
    for name, text in files.items():
        path = root / "plots" / "metrics" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, newline="")
    if summary is not None:
        (root / "metrics.json").write_text(json.dumps(summary, indent=4) + "\n")
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def losses(n: int) -> list[tuple[int, object]]:
    return [(s, 1.0 / (s + 3)) for s in range(n)]


# --- the cut-back on its own ---------------------------------------------------------------------


def test_truncate_keeps_rows_before_the_step_and_rewrites_the_summary(tmp_path: Path) -> None:
    accs = [(s, s * 10) for s in range(10)]
    root = history(tmp_path / "dvclive", {
        "loss.tsv": tsv(losses(10)),
        "train/acc.tsv": tsv(accs, "acc", timestamp=True),
        "eval/f1.tsv": tsv([(8, 0.5), (9, 0.6)], "f1"),  # first logged after the checkpoint
    }, {"loss": 1 / 12, "train": {"acc": 90}, "eval": {"f1": 0.6}, "note": "kept", "step": 9})
    (root / "plots" / "images").mkdir(parents=True)
    (root / "plots" / "images" / "7.png").write_bytes(b"png")

    done = truncate_history(root, step=6)

    metrics = root / "plots" / "metrics"
    assert (metrics / "loss.tsv").read_text() == tsv(losses(6))
    assert (metrics / "train" / "acc.tsv").read_text() == tsv(accs[:6], "acc", timestamp=True)
    assert not (metrics / "eval" / "f1.tsv").exists()
    assert json.loads((root / "metrics.json").read_text()) == {
        "loss": 1 / 8, "train": {"acc": 50}, "eval": {}, "note": "kept", "step": 5,
    }
    assert (done.kept, done.dropped) == (12, 10)
    assert done.removed == (metrics / "eval" / "f1.tsv",) and done.summary == root / "metrics.json"
    assert (root / "plots" / "images" / "7.png").read_bytes() == b"png"  # not a history
    assert not list(root.rglob("*.modelver-tmp"))
    before = snapshot(root)
    again = truncate_history(root, step=6)  # idempotent: a kill during a cut-back is harmless
    assert snapshot(root) == before and again.dropped == 0
    assert again.rewritten == () and again.summary is None  # nothing rewritten


def test_torn_last_line_is_dropped_and_a_half_written_summary_rebuilt(tmp_path: Path) -> None:
    root = history(tmp_path / "dvclive", {"loss.tsv": tsv(losses(5)) + "5\t0.12"})
    (root / "metrics.json").write_text('{"loss": 0.1')  # DVCLive writes it in place
    with pytest.warns(ModelverWarning, match="rebuilt from the metric histories"):
        done = truncate_history(root, step=8)
    assert (root / "plots" / "metrics" / "loss.tsv").read_text() == tsv(losses(5))
    assert json.loads((root / "metrics.json").read_text()) == {"loss": 1 / 7, "step": 7}
    assert done.dropped == 1


@pytest.mark.parametrize("bad", [
    "step\tloss\n0\t0.5\nx\t0.4\n",  # a step that is not an integer
    "loss\n0.5\n",  # no step column
    "step\tloss\n0\t0.5\n1\t0.4\textra\n",  # a row of another width
    "step\tloss\n0\t0.5\n\n1\t0.4\n",  # a blank line
    b"step\tloss\n0\t\xff\n",  # not UTF-8
])
def test_malformed_history_is_one_error_and_changes_nothing(
    tmp_path: Path, bad: str | bytes
) -> None:
    root = history(tmp_path / "dvclive", {"a.tsv": tsv(losses(9))}, {"loss": 1, "step": 8})
    target = root / "plots" / "metrics" / "z" / "b.tsv"
    target.parent.mkdir()
    target.write_bytes(bad if isinstance(bad, bytes) else bad.encode())
    before = snapshot(root)
    with pytest.raises(MalformedDataError, match=r"DVCLive history plots/metrics/z/b\.tsv"):
        truncate_history(root, step=3)
    assert snapshot(root) == before


def test_summary_written_bad_step_and_symlink_refused(tmp_path: Path) -> None:
    root = history(tmp_path / "dvclive", {"loss.tsv": tsv(losses(4))})
    with pytest.raises(InvalidArgumentError, match="step"):
        truncate_history(root, step=-1)
    truncate_history(root, step=2)  # no summary yet: written from the histories
    assert json.loads((root / "metrics.json").read_text()) == {"loss": 1 / 4, "step": 1}
    (tmp_path / "elsewhere.tsv").write_text(tsv(losses(4)))
    (root / "plots" / "metrics" / "link.tsv").symlink_to(tmp_path / "elsewhere.tsv")
    before = snapshot(root)
    with pytest.raises(ModelverError, match="symlink"):
        truncate_history(root, step=2)
    assert snapshot(root) == before



# --- Live resumed at the checkpoint's step ------------------------------------------------------


def test_resume_live_continues_at_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no Git or DVC repository around: Live stays local
    root = history(tmp_path / "dvclive", {"loss.tsv": tsv(losses(9))}, {"loss": 1, "step": 8})
    for step in (4, 1):  # 1: Live's own resume would restart at 0 after a summary step of 0
        live = resume_live(step, dir=root, **LIVE)
        assert live.step == step
        live.log_metric("loss", 1.0 / (step + 3))
        live.next_step()
        assert (root / "plots" / "metrics" / "loss.tsv").read_text() == tsv(losses(step + 1))
    fresh = resume_live(None, dir=root, **LIVE)  # no checkpoint: DVCLive clears its directory
    assert fresh.step == 0 and not (root / "plots" / "metrics").exists()
    with pytest.raises(InvalidArgumentError, match="resume"):
        resume_live(3, dir=root, resume=True)


def test_live_step_refuses_a_save_before_next_step_and_another_runs_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    tracker = LiveStep(tmp_path / "dvclive")
    with tracker.open(**LIVE) as live:
        for s in range(3):
            live.log_metric("loss", 1.0 / (s + 3))
            live.next_step()
        saved = tracker.state_dict()
        live.log_metric("loss", 0.0)
        with pytest.raises(LiveHistoryError, match=r"after live\.next_step"):
            tracker.state_dict()
    assert saved == {"step": 3, "last_rows": {"loss.tsv": ["2", str(1 / 5)]}}

    resumed = LiveStep(tmp_path / "dvclive")
    resumed.load_state_dict(saved)
    with resumed.open(**LIVE) as live:
        assert live.step == 3
    assert (tmp_path / "dvclive" / "plots" / "metrics" / "loss.tsv").read_text() == tsv(losses(3))

    other = tmp_path / "dvclive" / "plots" / "metrics" / "loss.tsv"
    other.write_text(tsv([(0, 9), (1, 9), (2, 9)]))  # another run's rows before step 3
    before = snapshot(tmp_path / "dvclive")
    again = LiveStep(tmp_path / "dvclive")
    again.load_state_dict(saved)
    with pytest.raises(LiveHistoryError, match="another run's history"), again.open(**LIVE):
        pass
    assert snapshot(tmp_path / "dvclive") == before
    with pytest.raises(MalformedDataError, match="step"):
        again.load_state_dict({"step": "3"})


def test_live_step_opened_twice_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tracker = LiveStep(tmp_path / "dvclive")
    for _ in range(2):
        with tracker.open(**LIVE) as live:
            for _ in range(2):
                live.log_metric("loss", 1.0 / (live.step + 3))
                live.next_step()
        assert tracker.step == live.step + 1  # Live.end() rewinds its own step; ours stays
    assert (tmp_path / "dvclive/plots/metrics/loss.tsv").read_text() == tsv(losses(4))
    assert tracker.state_dict() == {"step": 4, "last_rows": {"loss.tsv": ["3", str(1 / 6)]}}


# --- under `dvc exp run`, killed and run again ---------------------------------------------------

STEPS, EVERY = 30, 5

TRAIN = '''\
import time, yaml, torch
from torch import nn
from modelver import CheckpointManager
from modelver.integrations.dvclive import LiveStep

p = yaml.safe_load(open("params.yaml"))["train"]
torch.set_num_threads(1)
torch.manual_seed(p["seed"])
g = torch.Generator().manual_seed(123)
x = torch.randn(64, 8, generator=g)
y = (x.sum(1) > 0).long()
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
opt = torch.optim.Adam(model.parameters(), lr=p["lr"])
live_step = LiveStep()
state = {"model": model, "optimizer": opt, "dvclive": live_step}
mgr = CheckpointManager("checkpoints", every_steps=p["every"], keep_last=2, run={"lr": p["lr"]})
start = mgr.restore(state)
print("START", start, flush=True)
with live_step.open(dvcyaml=False) as live:
    for step in range(start, p["steps"]):
        idx = torch.randint(0, 64, (16,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        live.log_metric("train/loss", loss.item())
        live.log_metric("lr", p["lr"])
        live.next_step()
        mgr.maybe_save(step + 1, state, metrics={"loss": loss.item()})
        time.sleep(p["sleep"])
mgr.close()
'''

STAGE = """\
stages:
  train:
    cmd: {python} train.py
    deps: [train.py]
    params: [train]
    outs:
      - checkpoints:
          persist: true
    metrics:
      - dvclive/metrics.json:
          cache: false
          persist: true
    plots:
      - dvclive/plots:
          cache: false
          persist: true
"""


def dvclive_repo(root: Path) -> Path:
    root.mkdir()
    git(root, "init", "-q")
    (root / "train.py").write_text(TRAIN)
    (root / "dvc.yaml").write_text(STAGE.format(python=sys.executable))
    (root / "params.yaml").write_text(
        f"train:\n  seed: 0\n  steps: {STEPS}\n  every: {EVERY}\n  lr: 0.05\n  sleep: 0.1\n"
    )
    dvc(root, "init", "-q")
    commit_all(root, "dvclive stage")
    return root


def newest_step(root: Path) -> int:
    steps = [int(p.name[5:]) for p in root.glob("checkpoints/run-*/step-*")]
    return max(steps, default=0)


def last_logged(root: Path) -> int:
    try:
        lines = (root / "dvclive/plots/metrics/train/loss.tsv").read_text().splitlines()
    except FileNotFoundError:
        return -1
    return int(lines[-1].split("\t")[0]) if len(lines) > 1 else -1


def killed(root: Path, *args: str, after: int) -> tuple[int, int]:
    """``dvc ARGS``, SIGKILLed (the whole process group) once a checkpoint at ``after`` or later
    exists and DVCLive has logged 2 steps past it; (that checkpoint's step, last logged step)."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=repo_env(),
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ck = newest_step(root)
            if ck >= after and last_logged(root) >= ck + 2:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        seen = newest_step(root), last_logged(root)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert seen[1] >= seen[0] + 2  # rows past the checkpoint: logged twice without the cut-back
    return seen


def set_steps(root: Path, steps: int) -> None:
    path = root / "params.yaml"
    path.write_text(path.read_text().replace(f"steps: {STEPS}", f"steps: {steps}"))


@pytest.mark.slow
def test_killed_dvc_runs_log_every_step_once(tmp_path: Path) -> None:
    """A `dvc repro` killed and resumed from its newest checkpoint; then `dvc exp run -S` to more
    steps, killed and re-run: DVC first puts the outputs of dvc.lock back (the checkpoints of
    the finished 15 steps), modelver's kept copies bring the killed run's newer ones back, and
    the history is cut back to the newest of those."""
    base = dvclive_repo(tmp_path / "base")
    ref = tmp_path / "ref"
    shutil.copytree(base, ref, symlinks=True)
    dvc(ref, "exp", "run", env=repo_env())

    set_steps(base, 15)
    ck, _ = killed(base, "repro", after=5)
    resumed = dvc(base, "repro", env=repo_env())
    assert f"START {ck}" in resumed.stdout, resumed.stdout
    more = ("exp", "run", "-S", f"train.steps={STEPS}")
    ck, _ = killed(base, *more, after=20)
    done = dvc(base, *more, env=repo_env())
    started = [int(n) for n in re.findall(r"^START (\d+)$", done.stdout, re.M)]
    assert started and started[0] >= ck > 15, done.stdout  # the kept copies came back

    metrics = base / "dvclive" / "plots" / "metrics"
    for name in ("train/loss.tsv", "lr.tsv"):
        text = (metrics / name).read_text()
        steps = [int(line.split("\t")[0]) for line in text.splitlines()[1:]]
        assert steps == list(range(STEPS)), name
        assert text == (ref / "dvclive" / "plots" / "metrics" / name).read_text(), name
    summary = json.loads((base / "dvclive" / "metrics.json").read_text())
    assert summary == json.loads((ref / "dvclive" / "metrics.json").read_text())

    final = load_checkpoint(base / "checkpoints", run={"lr": 0.05})
    assert final.step == STEPS == final.state["dvclive"]["step"]  # DVCLive's next step
    assert summary["step"] == STEPS - 1  # the step of DVCLive's last rows

    out = tmp_path / "plots"
    shown = dvc(base, "plots", "show", "-o", str(out), env=repo_env(), check=False)
    assert shown.returncode == 0, shown.stderr
    html = (out / "index.html").read_text()
    assert "train/loss.tsv" in html and "lr.tsv" in html
