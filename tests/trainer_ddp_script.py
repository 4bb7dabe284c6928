"""A Hugging Face Trainer job under torchrun / accelerate launch (tests/test_transformers_ddp.py).

    torchrun --nproc_per_node=2 trainer_ddp_script.py OUT WEIGHTS [--max-steps N] [--save-steps K]
        [--keep K] [--graceful] [--step-sleep S] [--patch] [--best] [--lr LR]

DDP with gloo on the CPU: a 2-layer GPT-2 with dropout built from a config (nothing downloaded),
shuffled data (Trainer's sampler, sharded by Accelerate), a linear warm-up/decay schedule, and
every rank's RNG seeded differently at the start of training, so the final weights depend on
each rank getting its own RNG states back. ``ModelverTrainer.train_or_resume()`` is the one call
(``--patch``: ``patch_trainer`` on a plain Trainer; ``--best``: evaluation and
``load_best_model_at_end``); rank 0 writes the final weights. A stop signal prints ``STOPPED``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch
import transformers
from safetensors.torch import save_file

from modelver.errors import TrainingInterrupted
from modelver.integrations.transformers import ModelverTrainer, patch_trainer
from tests.helpers import TokenData


def tiny_model() -> Any:
    transformers.set_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.2,
        embd_pdrop=0.2, attn_pdrop=0.2, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


class Job(transformers.TrainerCallback):
    """Per-rank seeds at the start (a resume then puts the saved states back), the step the
    run starts from on stdout, and an optional pause per step (time for the test to kill)."""

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        torch.manual_seed(1000 + args.process_index)
        print(f"START {state.global_step} rank {args.process_index}", flush=True)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.sleep:
            time.sleep(self.sleep)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("weights")
    p.add_argument("--max-steps", type=int, default=24)
    p.add_argument("--save-steps", type=int, default=3)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--graceful", action="store_true", help="handle_signals=True")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--patch", action="store_true", help="patch_trainer on a plain Trainer")
    p.add_argument("--best", action="store_true", help="evaluate, load_best_model_at_end")
    p.add_argument("--lr", type=float, default=1e-3)
    a = p.parse_args()
    torch.set_num_threads(1)
    args = transformers.TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=4, max_steps=a.max_steps,
        save_steps=a.save_steps, logging_steps=2, learning_rate=a.lr, warmup_steps=3,
        report_to=[], use_cpu=True, ddp_backend="gloo", seed=0, disable_tqdm=True,
        **({"eval_strategy": "steps", "eval_steps": a.save_steps, "load_best_model_at_end": True,
            "metric_for_best_model": "loss"} if a.best else {}),
    )  # fmt: skip
    kw: dict[str, Any] = {
        "model": tiny_model(), "args": args, "train_dataset": TokenData(40),
        "callbacks": [Job(a.step_sleep)], "eval_dataset": TokenData(8, seed=7) if a.best else None,
    }  # fmt: skip
    if a.patch:
        trainer: Any = patch_trainer(
            transformers.Trainer(**kw), keep_last=a.keep, handle_signals=a.graceful
        )
    else:
        trainer = ModelverTrainer(**kw, keep_last=a.keep, handle_signals=a.graceful)
    try:
        trainer.train_or_resume()
    except TrainingInterrupted as e:  # a clean exit after the checkpoint a stop signal asked for
        print(f"STOPPED {e.step} rank {args.process_index}", flush=True)
        raise
    if args.process_index == 0:
        state = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
        Path(a.weights).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, a.weights)
    print(f"DONE rank {args.process_index} best {trainer.state.best_model_checkpoint}", flush=True)


if __name__ == "__main__":
    main()
