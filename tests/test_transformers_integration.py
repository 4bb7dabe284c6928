"""Hugging Face Trainer with modelver checkpoints: exact resume, no pickle, modelver retention.

A 2-layer GPT-2 with dropout built from a config (nothing downloaded) trains on synthetic tokens.
"""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch
import transformers

from modelver import list_checkpoints, load_checkpoint, verify_checkpoint
from modelver.checkpoint.runid import run_id
from modelver.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    ModelverError,
    ModelverWarning,
    TrainingInterrupted,
)
from modelver.integrations.transformers import (
    ModelverTrainer,
    ModelverTrainerMixin,
    patch_trainer,
)
from tests.helpers import TokenData

N_ITEMS, BATCH = 40, 4  # 10 optimizer steps per epoch


@pytest.fixture(autouse=True)
def _offline_single_thread(monkeypatch: pytest.MonkeyPatch) -> Any:
    """No network; one thread keeps the tiny model fast on a busy machine."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CrashAt(transformers.TrainerCallback):
    """Kills the run (an exception out of train()) right after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated crash")


def tiny_model() -> Any:
    transformers.set_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=100,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.2,
        embd_pdrop=0.2,
        attn_pdrop=0.2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def training_args(out: Path, **over: Any) -> Any:
    kw: dict[str, Any] = {
        "output_dir": str(out),
        "per_device_train_batch_size": BATCH,
        "num_train_epochs": 3,
        "save_steps": 4,
        "logging_steps": 2,
        "learning_rate": 1e-3,
        "warmup_steps": 3,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    kw.update(over)
    return transformers.TrainingArguments(**kw)


def make_trainer(
    out: Path, *, crash: int | None = None, args: dict[str, Any] | None = None, **opts: Any
) -> Any:
    return ModelverTrainer(
        model=tiny_model(),
        args=training_args(out, **(args or {})),
        train_dataset=TokenData(N_ITEMS),
        eval_dataset=TokenData(8, seed=7),
        callbacks=[CrashAt(crash)] if crash else [],
        **opts,
    )


def weights(trainer: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def crash_then_resume(out: Path, crash: int, args: dict[str, Any] | None = None) -> Any:
    with pytest.raises(KeyboardInterrupt):
        make_trainer(out, crash=crash, args=args).train()
    resumed = make_trainer(out, args=args)
    resumed.train(resume_from_checkpoint=True)
    return resumed


_REFERENCE: dict[str, dict[str, Any]] = {}


def reference(tmp_path_factory: pytest.TempPathFactory, **args: Any) -> dict[str, Any]:
    key = repr(sorted(args.items()))
    if key not in _REFERENCE:
        t = make_trainer(tmp_path_factory.mktemp("reference"), args=args)
        t.train()
        _REFERENCE[key] = weights(t)
    return _REFERENCE[key]


@pytest.mark.parametrize(
    ("crash", "args", "resumed_from"),
    [
        (14, {}, 12),  # mid-epoch: Trainer skips the consumed batches, RNG restored after
        (11, {"save_steps": 5}, 10),  # epoch boundary: RNG restored before the new epoch
        (9, {"gradient_accumulation_steps": 2, "save_steps": 3}, 6),
    ],
)
def test_resume_after_crash_is_bit_identical(
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    crash: int,
    args: dict[str, Any],
    resumed_from: int,
) -> None:
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        make_trainer(out, crash=crash, args=args).train()
    assert list_checkpoints(out / "checkpoints")[-1].step == resumed_from
    resumed = make_trainer(out, args=args)
    resumed.train(resume_from_checkpoint=True)
    assert_same(weights(resumed), reference(tmp_path_factory, **args))


def test_resume_without_rng_restore_differs(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: dropout makes the comparison above sensitive to the RNG hand-over."""
    monkeypatch.setattr(ModelverTrainerMixin, "_load_rng_state", lambda self, checkpoint: None)
    resumed = crash_then_resume(tmp_path / "run", 14)
    ref = reference(tmp_path_factory)
    assert any(not torch.equal(v, ref[k]) for k, v in weights(resumed).items())


def test_no_pickle_written_or_loaded(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        make_trainer(out, crash=14).train()

    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("unpickling on the resume path")

    resumed = make_trainer(out)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    resumed.train(resume_from_checkpoint=True)
    monkeypatch.undo()
    assert_same(weights(resumed), reference(tmp_path_factory))
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert files and not [f for f in files if f.suffix in (".pt", ".pth", ".bin", ".pkl")]
    assert not list(out.glob("checkpoint-*"))


def test_checkpoint_contents_and_retention(tmp_path: Path) -> None:
    out = tmp_path / "run"
    t = make_trainer(out, keep_last=2)
    t.train()
    infos = list_checkpoints(out / "checkpoints")
    assert [i.step for i in infos] == [28, 30]
    newest = infos[-1].path
    manifest = verify_checkpoint(newest)
    assert manifest.extras["transformers"]["components"] == [
        "model",
        "optimizer",
        "scheduler",
        "trainer_state",
    ]
    assert infos[0].metrics["loss"] > 0 and "learning_rate" in infos[0].metrics
    loaded = load_checkpoint(newest)
    assert loaded.state["trainer_state"]["global_step"] == 30
    assert loaded.state["scheduler"]["last_epoch"] == 30
    assert_same(dict(loaded.state["model"]), weights(t))


def test_keep_last_defaults_to_save_total_limit(tmp_path: Path) -> None:
    t = make_trainer(tmp_path / "run", args={"save_total_limit": 1, "num_train_epochs": 1})
    t.train()
    steps = [i.step for i in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert steps == [10]  # Trainer saves at the last step too


def test_resume_skips_a_corrupted_newest_checkpoint(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        make_trainer(out, crash=14).train()
    newest = list_checkpoints(out / "checkpoints")[-1].path
    victim = next(newest.glob("optimizer*.safetensors"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    resumed = make_trainer(out)
    with pytest.warns(ModelverWarning, match="skipping corrupted checkpoint"):
        resumed.train(resume_from_checkpoint=True)
    assert_same(weights(resumed), reference(tmp_path_factory))


def test_resume_from_explicit_step_directory(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = tmp_path / "run"
    make_trainer(out, keep_last=None).train()
    resumed = make_trainer(tmp_path / "other")
    resumed.train(resume_from_checkpoint=str(out / "checkpoints" / "step-00000016"))
    assert resumed.state.global_step == 30
    assert_same(weights(resumed), reference(tmp_path_factory))


def test_refuses_trainer_native_and_missing_checkpoints(tmp_path: Path) -> None:
    native = tmp_path / "checkpoint-4"
    native.mkdir()
    (native / "trainer_state.json").write_text("{}")
    (native / "optimizer.pt").write_bytes(b"pickle")
    t = make_trainer(tmp_path / "run")
    with pytest.raises(ModelverError, match="Trainer checkpoint"):
        t.train(resume_from_checkpoint=str(native))
    with pytest.raises(CheckpointNotFoundError):
        t.train(resume_from_checkpoint=True)
    assert t.state.global_step == 0


def test_patch_trainer_keeps_the_subclass(tmp_path: Path) -> None:
    calls: list[int] = []

    class CountingTrainer(transformers.Trainer):
        def compute_loss(self, model: Any, inputs: Any, *a: Any, **k: Any) -> Any:
            calls.append(1)
            return super().compute_loss(model, inputs, *a, **k)

    out = tmp_path / "run"
    t = CountingTrainer(
        model=tiny_model(),
        args=training_args(out, num_train_epochs=1),
        train_dataset=TokenData(N_ITEMS),
    )
    ckpts = tmp_path / "ckpts"
    assert patch_trainer(t, checkpoint_dir=ckpts, keep_last=1) is t
    assert isinstance(t, CountingTrainer) and isinstance(t, ModelverTrainerMixin)
    t.train()
    assert len(calls) == 10
    assert [i.step for i in list_checkpoints(ckpts)] == [10]
    assert not (out / "checkpoints").exists()


def test_save_only_model_and_save_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    t = make_trainer(out, args={"save_only_model": True, "num_train_epochs": 1})
    t.train()
    newest = list_checkpoints(out / "checkpoints")[-1].path
    assert verify_checkpoint(newest).extras["transformers"]["components"] == [
        "model",
        "trainer_state",
    ]
    export = tmp_path / "export"
    t.save_model(str(export))
    assert (export / "model.safetensors").is_file()
    back = transformers.GPT2LMHeadModel.from_pretrained(str(export))
    assert_same(
        {k: v for k, v in back.state_dict().items()},
        {k: v for k, v in weights(t).items()},
    )
    again = make_trainer(out, args={"save_only_model": True, "num_train_epochs": 2})
    with pytest.warns(ModelverWarning, match="no optimizer state"):
        again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 20


def test_load_best_model_at_end_keeps_and_loads_the_best(tmp_path: Path) -> None:
    out = tmp_path / "run"
    t = make_trainer(
        out,
        args={
            "eval_strategy": "steps",
            "eval_steps": 4,
            "load_best_model_at_end": True,
            "metric_for_best_model": "loss",
            "save_total_limit": 1,
            "learning_rate": 5e-2,  # large enough that the eval loss is not monotonic
        },
    )
    t.train()
    best = Path(t.state.best_model_checkpoint)
    kept = list_checkpoints(out / "checkpoints")
    assert best in [i.path for i in kept] and len(kept) <= 2
    evals = [e for e in t.state.log_history if "eval_loss" in e]
    best_step = min(evals, key=lambda e: e["eval_loss"])["step"]
    assert best.name == f"step-{best_step:08d}" and best_step != t.state.global_step
    assert_same(dict(load_checkpoint(best).state["model"]), weights(t))


def test_unsupported_setups_are_refused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DDP works (tests/test_transformers_ddp.py); FSDP, DeepSpeed and several processes
    without a torch.distributed group are refused, each with why, before anything trains."""
    t = transformers.Trainer(
        model=tiny_model(), args=training_args(tmp_path / "run"),
        train_dataset=TokenData(N_ITEMS),
    )
    t.is_fsdp_enabled = True  # what Trainer sets from Accelerate's FSDP plugin
    with pytest.raises(ModelverError, match=r"FSDP \(Accelerate shards the parameters"):
        patch_trainer(t)
    t.is_fsdp_enabled = False
    t.is_deepspeed_enabled = True
    with pytest.raises(ModelverError, match=r"DeepSpeed \(its engine partitions"):
        patch_trainer(t)
    t.is_deepspeed_enabled = False
    monkeypatch.setattr(type(t.args), "world_size", property(lambda self: 2))
    with pytest.raises(ModelverError, match=r"2 processes without a torch\.distributed process"):
        patch_trainer(t)
    monkeypatch.undo()
    patched = patch_trainer(t)
    patched.is_fsdp_enabled = True  # a Trainer changed after patching is refused at train()
    with pytest.raises(ModelverError, match="FSDP"):
        patched.train()
    assert patched.state.global_step == 0
    with pytest.raises(TypeError):
        patch_trainer(object())  # type: ignore[arg-type]


class SignalAt(transformers.TrainerCallback):
    """Delivers a real SIGTERM to this process while optimizer step ``step`` runs."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step + 1 == self.step:
            signal.raise_signal(signal.SIGTERM)


def test_sigterm_saves_the_current_step_and_exits_cleanly(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    t = make_trainer(out, handle_signals=True)
    t.add_callback(SignalAt(7))
    with pytest.raises(TrainingInterrupted) as info:
        t.train()
    assert (info.value.signum, info.value.step, info.value.code) == (signal.SIGTERM, 7, 143)
    assert signal.getsignal(signal.SIGTERM) is before
    assert [i.step for i in list_checkpoints(out / "checkpoints")] == [4, 7]
    resumed = make_trainer(out, handle_signals=True)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 30
    assert_same(weights(resumed), reference(tmp_path_factory))


KILL_ARGS: dict[str, Any] = {"num_train_epochs": 12, "logging_steps": 50}


def _worker(out: str) -> None:
    """Child process for the kill test: train, resuming from whatever checkpoint exists."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)

    class Ready(transformers.TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            print("training", flush=True)

    t = make_trainer(Path(out), args=KILL_ARGS, keep_last=2)
    t.add_callback(Ready())
    resume = bool(list_checkpoints(Path(out) / "checkpoints"))
    t.train(resume_from_checkpoint=True if resume else None)
    print("done", flush=True)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out = tmp_path / "run"
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import {Path(__file__).stem} as m; m._worker({str(out)!r})"
    )
    rnd = random.Random(5)
    kills = 0
    with open(tmp_path / "worker.log", "w") as log:
        for _ in range(12):
            proc = subprocess.Popen(
                [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=log, text=True
            )
            assert proc.stdout is not None
            line = proc.stdout.readline()
            while line and line.strip() != "training":
                line = proc.stdout.readline()
            if kills < 3 and line:
                time.sleep(rnd.uniform(0.05, 0.8))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
            rest = proc.communicate(timeout=300)[0]
            if proc.returncode == 0 and "done" in rest:
                break
        else:
            pytest.fail(f"training never completed, see {tmp_path / 'worker.log'}")
    assert kills >= 1
    final = list_checkpoints(out / "checkpoints")[-1]
    assert final.step == 120
    assert_same(
        dict(load_checkpoint(final.path).state["model"]), reference(tmp_path_factory, **KILL_ARGS)
    )
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def _step_dirs(root: Path) -> list[tuple[str, bytes, int]]:
    """Every step directory under ``root`` (any run): name, manifest bytes, manifest mtime."""
    return [
        (str(m.parent.relative_to(root)), m.read_bytes(), m.stat().st_mtime_ns)
        for m in sorted(root.glob("**/step-*/MANIFEST.json"))
    ]


@pytest.mark.parametrize("run", [None, {"lr": 1e-3, "layers": 2}], ids=["no-run", "run"])
@pytest.mark.parametrize("how", ["train", "train_or_resume"])
def test_rerunning_a_finished_job_changes_nothing(
    tmp_path: Path, run: dict[str, Any] | None, how: str
) -> None:
    """A scheduler restarting a job that had just finished: the re-run resumes from the final
    checkpoint, trains nothing, saves nothing new; twice over, the same checkpoints and weights."""
    args = {"max_steps": 8, "save_steps": 4, "save_total_limit": 2}
    first = make_trainer(tmp_path / "run", args=args, run=run)
    first.train()
    final = weights(first)
    root = tmp_path / "run" / "checkpoints"
    listed = _step_dirs(root)
    prefix = "" if run is None else f"run-{run_id(run)}/"
    assert [name for name, _, _ in listed] == [f"{prefix}step-00000004", f"{prefix}step-00000008"]
    for _ in range(2):
        again = make_trainer(tmp_path / "run", args=args, run=run)
        if how == "train":
            again.train(resume_from_checkpoint=True)
        else:
            again.train_or_resume()
        assert int(again.state.global_step) == 8
        assert_same(weights(again), final)
        assert _step_dirs(root) == listed  # no step-00000009, the final step-00000008 untouched


def test_runs_in_one_output_dir_never_resume_each_other(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two runs of other hyperparameters in one output_dir: each starts from step 0 and
    continues only its own checkpoints; another run's checkpoint is refused."""
    a_args = {"max_steps": 8}
    b_args = {"max_steps": 8, "learning_rate": 5e-4}
    a, b = {"lr": 1e-3}, {"lr": 5e-4}
    out = tmp_path / "out"
    first = make_trainer(out, args=a_args, run=a)
    first.train_or_resume()
    a_dirs = _step_dirs(out / "checkpoints")
    second = make_trainer(out, args=b_args, run=b)
    second.train_or_resume()  # run b: a fresh start, not a's finished step 8
    assert_same(weights(second), reference(tmp_path_factory, **b_args))
    assert [c.step for c in list_checkpoints(out / "checkpoints", run=b)] == [4, 8]
    assert [d for d in _step_dirs(out / "checkpoints") if d[0].startswith(f"run-{run_id(a)}")
            ] == a_dirs  # a's checkpoints untouched
    again = make_trainer(out, args=a_args, run=a)
    again.train_or_resume()  # back to a: finished, nothing changes
    assert_same(weights(again), weights(first))
    assert int(again.state.global_step) == 8
    other = make_trainer(out, args=b_args, run=b)
    with pytest.raises(CheckpointCorruptedError, match=f"belongs to run {run_id(a)}"):
        other.train(resume_from_checkpoint=str(out / "checkpoints" / f"run-{run_id(a)}"
                                               / "step-00000004"))


def test_train_or_resume_is_one_call_for_preemptible_jobs(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """No checkpoint yet: it trains from the start; after a crash: it resumes bit-identically;
    finished: it changes nothing. One line for the job script, whatever happened before."""
    args = {"max_steps": 12}
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "run", crash=6, args=args).train_or_resume()
    assert [c.step for c in list_checkpoints(tmp_path / "run" / "checkpoints")] == [4]
    resumed = make_trainer(tmp_path / "run", args=args)
    resumed.train_or_resume()
    assert int(resumed.state.global_step) == 12
    assert_same(weights(resumed), reference(tmp_path_factory, **args))
    listed = [c.step for c in list_checkpoints(tmp_path / "run" / "checkpoints")]
    again = make_trainer(tmp_path / "run", args=args)
    again.train_or_resume()
    assert [c.step for c in list_checkpoints(tmp_path / "run" / "checkpoints")] == listed
    assert_same(weights(again), weights(resumed))
