"""The demo pipeline (dvc.yaml + examples/digits) run by `dvc repro` in a fresh Git + DVC repo.

The slow tests interrupt `dvc repro` during `train` (SIGKILL of the whole process tree, SIGTERM
of the training script) and check that the next `dvc repro` resumes from a checkpoint and ends
with the same bits as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from modelver.checkpoint.catalog import CheckpointInfo
from tests.helpers import (
    PIPELINE_FILES,
    REPO,
    REPRO_TIMEOUT,
    dvc_cmd,
    make_pipeline_repo,
    pipeline_env,
    repro,
    run_cmd,
    set_train_params,
)

STEP_RE = re.compile(r"^step (\d+)/\d+ loss ")
RESUMED_RE = re.compile(r"resumed from step (\d+)")


def interrupt_repro(
    repo: Path, env: dict[str, str], *, after_step: int, sig: signal.Signals, whole_tree: bool,
    args: tuple[str, ...] = ("repro",),
) -> tuple[int, str]:
    """Start `dvc repro` (or `dvc ARGS`); once training logs `after_step`, send `sig` (to
    everything, or to the training script only). Returns dvc's exit code and its output."""
    import psutil

    proc = subprocess.Popen(
        dvc_cmd(*args),
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    sent = False
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = STEP_RE.match(line)
            if sent or not m or int(m.group(1)) < after_step:
                continue
            if whole_tree:
                os.killpg(proc.pid, sig)
            else:
                (trainer,) = [
                    c
                    for c in psutil.Process(proc.pid).children(recursive=True)
                    if "examples/digits/train.py" in c.cmdline()  # not a `sh -c` around it
                ]
                trainer.send_signal(sig)
            sent = True
        rc = proc.wait(timeout=REPRO_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = "".join(lines)
    assert sent, f"training finished before step {after_step} was logged:\n{out}"
    return rc, out


def newest(repo: Path) -> CheckpointInfo | None:
    """The newest checkpoint of the run the demo trained last (checkpoints/CURRENT_RUN.json)."""
    from modelver import latest_checkpoint
    from modelver.checkpoint.runid import current_run

    ck = repo / "checkpoints"
    return latest_checkpoint(ck, run=current_run(ck))


def model_tensors(repo: Path) -> dict:
    from modelver import load_checkpoint

    info = newest(repo)
    assert info is not None
    return load_checkpoint(info.path).state["model"]


def assert_same_final_state(repo: Path, reference: Path) -> None:
    """Bit-identical model tensors, and the same tensor hashes for everything saved (optimizer)."""
    import torch

    from modelver import verify_checkpoint

    got, want = newest(repo), newest(reference)
    assert got is not None and want is not None
    assert got.step == want.step
    got_model, want_model = model_tensors(repo), model_tensors(reference)
    assert sorted(got_model) == sorted(want_model)
    for name, tensor in want_model.items():
        assert torch.equal(got_model[name], tensor), f"model tensor {name} differs"
    got_manifest, want_manifest = verify_checkpoint(got.path), verify_checkpoint(want.path)
    assert {n: t.hash for n, t in got_manifest.tensors.items()} == {
        n: t.hash for n, t in want_manifest.tensors.items()
    }
    assert json.loads((repo / "metrics.json").read_text()) == json.loads(
        (reference / "metrics.json").read_text()
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One uninterrupted `dvc repro`: the repo and its output (timed: benchmarks/demo_repro.py)."""
    repo, env = make_pipeline_repo(tmp_path_factory.mktemp("reference"))
    r = repro(repo, env)
    return repo, r.stdout + r.stderr


def test_pipeline_declares_resumable_model() -> None:
    """dvc.yaml wiring the rest relies on: persist checkpoints, uncached metrics, the artifact."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = spec["stages"]
    assert list(stages) == ["prepare", "train", "evaluate"]
    assert stages["train"]["outs"] == [{"checkpoints": {"persist": True}}]
    assert {"data", "examples/digits/train.py"} <= set(stages["train"]["deps"])
    assert "checkpoints" in stages["evaluate"]["deps"]
    assert stages["evaluate"]["metrics"] == [{"metrics.json": {"cache": False}}]
    assert spec["artifacts"]["digits-mlp"]["path"] == "checkpoints"
    assert spec["artifacts"]["digits-mlp"]["type"] == "model"
    for stage in stages.values():
        for key in stage.get("params", []):
            section, _, field = key.partition(".")
            assert section in params and (not field or field in params[section]), key
    for rel in PIPELINE_FILES:  # arrays and checkpoints only: nothing that unpickles
        text = (REPO / rel).read_text()
        for banned in ("import pickle", "torch.load(", "torch.save(", "allow_pickle=True"):
            assert banned not in text, f"{rel}: {banned}"


@pytest.mark.slow
def test_repro_trains_accurate_model(reference_run: tuple[Path, str]) -> None:
    repo, out = reference_run
    assert "resumed from step" not in out
    metrics = json.loads((repo / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.95, metrics
    assert metrics["step"] == yaml.safe_load((repo / "params.yaml").read_text())["train"]["steps"]

    from modelver import list_checkpoints, verify_checkpoint
    from modelver.checkpoint.runid import current_run, list_runs

    ck = repo / "checkpoints"
    assert list_runs(ck) == [current_run(ck)]  # one run, named by its trajectory params
    infos = list_checkpoints(ck, run=current_run(ck))
    assert 1 <= len(infos) <= 3  # keep_last: 3
    for info in infos:
        verify_checkpoint(info.path)

    env = pipeline_env(repo.parent / "home")
    shown = run_cmd(dvc_cmd("metrics", "show", "--json"), repo, env)
    assert shown.returncode == 0, shown.stderr
    assert '"accuracy"' in shown.stdout
    status = run_cmd(dvc_cmd("status", "--json"), repo, env)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout
    # dvc.lock pins the checkpoints directory; the second repro has nothing to do.
    assert "checkpoints" in (repo / "dvc.lock").read_text()
    assert "resumed from step" not in repro(repo, env).stdout


@pytest.mark.slow
def test_sigkill_during_train_then_repro_resumes_bit_identical(
    tmp_path: Path, reference_run: tuple[Path, str]
) -> None:
    repo, env = make_pipeline_repo(tmp_path)
    rc, out = interrupt_repro(repo, env, after_step=650, sig=signal.SIGKILL, whole_tree=True)
    assert rc == -signal.SIGKILL, out
    assert not (repo / "metrics.json").exists()

    second = repro(repo, env)
    m = RESUMED_RE.search(second.stdout)
    assert m, second.stdout
    assert 0 < int(m.group(1)) <= 650 + 100
    assert_same_final_state(repo, reference_run[0])


@pytest.mark.slow
def test_killed_exp_run_rerun_resumes_bit_identical(tmp_path: Path) -> None:
    """`dvc exp run` checks out what dvc.lock pins before it runs, deleting the killed run's
    newer checkpoints from the workspace; modelver's kept copies bring them back."""
    lr = 0.002
    reference, env = make_pipeline_repo(tmp_path / "reference")
    set_train_params(reference, lr=lr)
    repro(reference, env)

    repo, env = make_pipeline_repo(tmp_path / "killed")
    args = ("exp", "run", "-S", f"train.lr={lr}")
    rc, out = interrupt_repro(repo, env, after_step=650, sig=signal.SIGKILL, whole_tree=True,
                              args=args)
    assert rc == -signal.SIGKILL, out
    again = run_cmd(dvc_cmd(*args), repo, env)
    assert again.returncode == 0, again.stdout + again.stderr
    m = RESUMED_RE.search(again.stdout)
    assert m, again.stdout
    assert 600 <= int(m.group(1)) <= 650 + 100  # not step 0: the kept checkpoints came back
    assert_same_final_state(repo, reference)


@pytest.mark.slow
def test_sigterm_saves_final_checkpoint_and_repro_resumes(
    tmp_path: Path, reference_run: tuple[Path, str]
) -> None:
    from modelver import verify_checkpoint

    repo, env = make_pipeline_repo(tmp_path)
    # Logged at step 450: the periodic checkpoint is step 400, so a newer one was made on SIGTERM.
    rc, out = interrupt_repro(repo, env, after_step=450, sig=signal.SIGTERM, whole_tree=False)
    assert rc != 0, out
    assert f"exited with {128 + signal.SIGTERM}" in out, out
    info = newest(repo)
    assert info is not None and info.step >= 450, out
    assert f"interrupted by signal {int(signal.SIGTERM)}: saved step {info.step};" in out
    verify_checkpoint(info.path)

    second = repro(repo, env)
    assert f"resumed from step {info.step}\n" in second.stdout, second.stdout
    assert_same_final_state(repo, reference_run[0])


@pytest.mark.slow
def test_raising_steps_continues_finished_run_bit_identical(
    tmp_path: Path, reference_run: tuple[Path, str]
) -> None:
    """What `modelver resume -S train.steps=N` relies on: the schedule ignores the total.
    Then `dvc exp run -S train.lr=...`: a run of its own, and back."""
    from modelver import list_checkpoints
    from modelver.checkpoint.runid import current_run, list_runs

    reference = reference_run[0]
    params = yaml.safe_load((reference / "params.yaml").read_text())["train"]
    total, lr = params["steps"], params["lr"]
    repo, env = make_pipeline_repo(tmp_path)
    set_train_params(repo, steps=total - 500)
    repro(repo, env)
    assert json.loads((repo / "metrics.json").read_text())["step"] == total - 500
    for args in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "shorter run"]):
        assert run_cmd(args, repo, env).returncode == 0

    set_train_params(repo, steps=total)
    second = repro(repo, env)
    assert f"resumed from step {total - 500}\n" in second.stdout, second.stdout
    assert "Stage 'prepare' didn't change, skipping" in second.stdout
    assert_same_final_state(repo, reference)
    diff = run_cmd(dvc_cmd("metrics", "diff", "--json"), repo, env)
    assert diff.returncode == 0, diff.stderr
    assert json.loads(diff.stdout)["metrics.json"]["step"] == {
        "old": total - 500,
        "new": total,
        "diff": 500,
    }

    # Another learning rate is another run: it starts at step 0 beside the first, whose
    # checkpoints stay as they were; the first learning rate again has nothing left to train.
    ck = repo / "checkpoints"
    first = current_run(ck)
    before = [(i.step, i.created) for i in list_checkpoints(ck, run=first)]
    other = run_cmd(dvc_cmd("exp", "run", "-S", f"train.lr={lr * 2}"), repo, env)
    assert other.returncode == 0, other.stdout + other.stderr
    assert "resumed from step" not in other.stdout
    assert current_run(ck) != first and len(list_runs(ck)) == 2
    assert [i.step for i in list_checkpoints(ck, run=current_run(ck))][-1] == total
    assert [(i.step, i.created) for i in list_checkpoints(ck, run=first)] == before
    back = run_cmd(dvc_cmd("exp", "run", "-S", f"train.lr={lr}"), repo, env)
    assert back.returncode == 0, back.stdout + back.stderr
    assert f"already at step {total} of {total}; nothing to train" in back.stdout
    assert current_run(ck) == first
    assert_same_final_state(repo, reference)
