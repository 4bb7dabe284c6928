"""Lightning (current PyPI release) with ModelverCheckpoint: exact resume, no pickle, the CLI.

The kill tests start tests/lightning_train_script.py (one process, or ``strategy="ddp"`` with 2
CPU processes started by Lightning's own launcher), SIGKILL the whole job at random moments and
once inside a save, and restart the same command until it finishes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelver import ResumableSampler, load_checkpoint, verify_checkpoint
from modelver.checkpoint import format as fmt
from modelver.cli.main import cli
from modelver.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    ModelverError,
    ModelverWarning,
    NotSerializableError,
)
from modelver.integrations.lightning import ModelverCheckpoint, ModelverCheckpointIO
from tests.helpers import TESTS, free_port, repo_env, weights_equal
from tests.test_untrusted_checkpoint import edit_state_json

SCRIPT = TESTS / "lightning_train_script.py"
STEPS = 40  # 26 batches an epoch: the runs cross an epoch end and its validation


def script_cmd(ck: Path, out: Path, devices: int, *extra: str | Path) -> list[str]:
    return [sys.executable, str(SCRIPT), str(ck), str(out), "--devices", str(devices),
            "--steps", str(STEPS), *map(str, extra)]  # fmt: skip


def job_env() -> dict[str, str]:
    return {**repo_env(), "MASTER_PORT": str(free_port())}


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_sigkills_at_random_moments_and_inside_a_save_end_bit_identical(
    tmp_path: Path, devices: int
) -> None:
    ref = tmp_path / "reference.safetensors"
    done = subprocess.run(script_cmd(tmp_path / "ref-ck", ref, devices), env=job_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ck, out, armed = tmp_path / "ck", tmp_path / "out.safetensors", tmp_path / "armed"
    cmd = script_cmd(ck, out, devices, "--sleep", "0.1", "--every", "3", "--kill-in-save", armed)
    rng = random.Random(devices)
    starts: list[int] = []
    plan = ["random", "in-save", "random", "random"]
    while True:
        if plan and plan[0] == "in-save":
            armed.touch()  # the job kills itself inside its next save
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=job_env(), start_new_session=True)  # fmt: skip
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not plan:
            assert proc.wait(timeout=600) == 0
            starts.append(int(line.split()[1]) if line.startswith("START") else STEPS)
            break
        assert line.startswith("START"), line
        starts.append(int(line.split()[1]))
        how = plan.pop(0)
        if how == "random":
            time.sleep(rng.uniform(0.2, 2.5))
            assert proc.poll() is None, "training ended before the kill"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=120)
        assert proc.returncode == -signal.SIGKILL
        if how == "in-save":
            assert not armed.exists()
            assert any(p.name.startswith(".tmp-") for p in ck.iterdir())  # cut mid-save
    assert starts == sorted(starts) and starts[-1] > 0, starts
    assert weights_equal(ref, out)
    newest = sorted(p for p in ck.iterdir() if p.name.startswith("step-"))[-1]
    manifest = verify_checkpoint(newest)
    assert manifest.step == STEPS and manifest.world_size == devices


@pytest.mark.slow
def test_ddp_with_lightnings_distributed_sampler_is_refused(tmp_path: Path) -> None:
    cmd = script_cmd(tmp_path / "ck", tmp_path / "out", 2, "--distributed-sampler")
    done = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "use_distributed_sampler=False" in done.stderr
    assert not (tmp_path / "out").exists()


# --- in this process: one device --------------------------------------------------------------


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1)]


def loader(*, resumable: bool = True) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(48, 4, generator=g), torch.randint(0, 2, (48,), generator=g))
    if resumable:
        return DataLoader(ds, batch_size=8, sampler=ResumableSampler(ds, seed=1))
    return DataLoader(ds, batch_size=8, shuffle=True)


def trainer(ck: Path, steps: int, **options: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelverCheckpoint(ck, every_n_train_steps=2, keep_last=None, **options)],
    )  # fmt: skip


def fit(ck: Path, steps: int, *, ckpt_path: str | Path | None = "last", **options: Any) -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    trainer(ck, steps, **options).fit(model, loader(), ckpt_path=ckpt_path)
    return model


def step_dirs(ck: Path) -> list[Path]:
    return sorted(p for p in ck.iterdir() if p.name.startswith("step-"))


def test_no_pickle_is_written_or_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.save/torch.load called")

    monkeypatch.setattr(torch, "save", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    ck = tmp_path / "ck"
    fit(ck, 5)
    fit(ck, 8)  # resumes from step 5
    names = {p.suffix for d in step_dirs(ck) for p in d.iterdir()}
    assert names == {".json", ".safetensors"}
    assert [d.name for d in step_dirs(ck)] == [fmt.step_dirname(s) for s in (2, 4, 5, 6, 8)]


def test_resume_in_process_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = fit(tmp_path / "a", 9)
    fit(tmp_path / "b", 5)  # stops mid-epoch (6 batches an epoch) and saves its last step
    resumed = fit(tmp_path / "b", 9)
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    saved = [(d.name, fmt.read_manifest(d).created) for d in step_dirs(tmp_path / "b")]
    again = fit(tmp_path / "b", 9)  # a finished job run again: the final state, nothing trained
    assert [(d.name, fmt.read_manifest(d).created) for d in step_dirs(tmp_path / "b")] == saved
    for (k, a), b in zip(whole.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_checkpoint_verifies_and_diff_lists_changed_tensors(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    fit(ck, 4)
    first, second = (str(p) for p in step_dirs(ck))
    state = load_checkpoint(second).state
    assert set(state) == {"model", "optimizers", "schedulers", "lightning", "data"}
    assert set(state["model"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert state["lightning"]["global_step"] == 4
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", second])
    assert ok.exit_code == 0, ok.output
    diff = runner.invoke(cli, ["diff", "--json", first, second])
    assert diff.exit_code == 0, diff.output
    changed = {t["name"] for t in json.loads(diff.output)["tensors"] if t["status"] == "changed"}
    assert {"model/net.0.weight", "model/net.2.bias", "optimizers/0/state/0/momentum_buffer"} <= (
        changed
    )


def test_last_skips_a_corrupted_checkpoint_and_starts_afresh_without_one(
    tmp_path: Path,
) -> None:
    ck = tmp_path / "ck"
    with pytest.warns(UserWarning, match="no last checkpoint"):
        fit(ck, 4)
    newest = step_dirs(ck)[-1]
    model_file = next(newest.glob("model-*.safetensors"))
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0xFF
    model_file.write_bytes(bytes(data))
    t = trainer(ck, 6)
    with pytest.warns(ModelverWarning, match="skipping corrupted checkpoint"):
        t.fit(Tiny(), loader(), ckpt_path="last")
    assert t.ckpt_path == str(step_dirs(ck)[0])  # step 2


def test_pickle_files_and_foreign_plugins_are_refused(tmp_path: Path) -> None:
    pickle_ckpt = tmp_path / "epoch=0-step=4.ckpt"
    pickle_ckpt.write_bytes(b"\x80\x04not-read")
    with pytest.raises(ModelverError, match="is a Lightning checkpoint file"):
        trainer(tmp_path / "ck", 4).fit(Tiny(), loader(), ckpt_path=pickle_ckpt)
    with pytest.raises(CheckpointNotFoundError):
        trainer(tmp_path / "ck", 4).fit(Tiny(), loader(), ckpt_path=tmp_path / "nothing")
    plugin = pl.plugins.AsyncCheckpointIO()
    t = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, plugins=[plugin],
                   callbacks=[ModelverCheckpoint(tmp_path / "ck")])  # fmt: skip
    with pytest.raises(ModelverError, match="AsyncCheckpointIO"):
        t.fit(Tiny(), loader())


def test_an_inexact_data_position_is_refused(tmp_path: Path) -> None:
    t = trainer(tmp_path / "ck", 3)
    with pytest.raises(ModelverError, match="ResumableSampler"):
        t.fit(Tiny(), loader(resumable=False))
    assert not (tmp_path / "ck").exists() or not step_dirs(tmp_path / "ck")
    t = trainer(tmp_path / "ck2", 3, strict_data=False)
    t.fit(Tiny(), loader(resumable=False))
    assert [d.name for d in step_dirs(tmp_path / "ck2")] == ["step-00000002", "step-00000003"]


def test_a_value_that_is_neither_tensor_nor_json_is_named(tmp_path: Path) -> None:
    class WithClass(Tiny):
        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            checkpoint["factory"] = nn.Linear

    with pytest.raises(NotSerializableError, match="lightning/factory"):
        trainer(tmp_path / "ck", 2).fit(WithClass(), loader())
    assert not step_dirs(tmp_path / "ck")


def test_a_crafted_data_position_is_a_corrupted_checkpoint(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    fit(ck, 4)
    newest = step_dirs(ck)[-1]

    def bad_position(state: dict[str, Any]) -> None:
        state["components"]["data"]["state"]["position"] = "seven"  # hash rewritten to match

    edit_state_json(newest, bad_position)
    with pytest.raises(CheckpointCorruptedError, match="component data"):
        trainer(ck, 6).fit(Tiny(), loader(), ckpt_path=newest)


def test_save_checkpoint_writes_modelver_and_fit_resumes_from_it(tmp_path: Path) -> None:
    t = trainer(tmp_path / "ck", 3)
    model = Tiny()
    t.fit(model, loader())
    assert isinstance(t.strategy.checkpoint_io, ModelverCheckpointIO)
    t.save_checkpoint(tmp_path / "export.ckpt")
    (saved,) = step_dirs(tmp_path / "export.ckpt")
    assert saved.name == "step-00000003" and verify_checkpoint(saved).step == 3
    again = trainer(tmp_path / "other", 5)
    again.fit(Tiny(), loader(), ckpt_path=tmp_path / "export.ckpt")
    assert again.global_step == 5


def test_runs_keep_apart_and_keep_best_names_the_best(tmp_path: Path) -> None:
    fit(tmp_path / "ck", 4, run={"lr": 0.1})
    t = trainer(tmp_path / "ck", 4, run={"lr": 0.2}, keep_best=1, monitor="train_loss")
    t.fit(Tiny(), loader(), ckpt_path="last")
    assert t.ckpt_path is None  # the other run's checkpoints are not this run's "last"
    runs = sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith("run-"))
    assert len(runs) == 2
    best = Path(t.checkpoint_callback.best_model_path)  # type: ignore[union-attr]
    scores = {d: fmt.read_manifest(d).metrics["train_loss"] for d in step_dirs(best.parent)}
    assert best == min(scores, key=lambda d: scores[d])
