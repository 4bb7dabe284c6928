"""Hugging Face Trainer: time the training loop is blocked per save, and bytes on disk.

    python benchmarks/trainer_save.py [--saves 9] [--layers 2] [--dir DIR]

The same GPT-2 (built from a config, tens of MB of weights + AdamW moments), the same data and
the same steps, in one process, saved every 3 steps by:
  modelver        ModelverTrainer (synchronous: safetensors + JSON, fdatasync'd, committed by
                  rename; retention deletes off the training thread)
  trainer         a plain Trainer's own _save_checkpoint: checkpoint-N with model.safetensors,
                  optimizer.pt, scheduler.pt, rng_state.pth (torch.save pickles), JSON; no fsync
  trainer+fsync   the same, then every file of checkpoint-N fsync'd (what a save that survives
                  a power cut costs; Trainer does not do it)
Each timed save starts after os.sync() (untimed), so one save's dirty pages do not land on the
next. Both keep 2 checkpoints. Prints the median (and every) blocked time and the bytes of one
checkpoint, and the ratios modelver / trainer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch
import transformers

from modelver.integrations.transformers import ModelverTrainer

SAVE_EVERY = 3


class Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int, n: int = 64, length: int = 32) -> None:
        self.x = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def model(layers: int) -> Any:
    transformers.set_seed(0)
    cfg = transformers.GPT2Config(vocab_size=4096, n_positions=64, n_embd=512, n_layer=layers,
                                  n_head=8, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def timed(cls: type, *, fsync: bool) -> type:
    """``cls`` whose ``_save_checkpoint`` records how long it blocked training."""

    class Timed(cls):  # type: ignore[misc, valid-type]
        blocked: list[float]

        def _save_checkpoint(self, *a: Any, **k: Any) -> None:
            os.sync()
            t0 = time.perf_counter()
            super()._save_checkpoint(*a, **k)
            if fsync:
                folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                for f in [folder, *folder.iterdir()]:
                    fd = os.open(f, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
            self.blocked.append(time.perf_counter() - t0)

    return Timed


def bytes_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run(kind: str, out: Path, a: argparse.Namespace) -> tuple[list[float], int]:
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, max_steps=SAVE_EVERY * a.saves,
        save_steps=SAVE_EVERY, save_total_limit=2, logging_steps=SAVE_EVERY, report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    cls = timed(ModelverTrainer if kind == "modelver" else transformers.Trainer,
                fsync=kind == "trainer+fsync")  # fmt: skip
    trainer = cls(model=model(a.layers), args=args, train_dataset=Tokens(4096))
    trainer.blocked = []
    trainer.train()
    last = SAVE_EVERY * a.saves
    folder = out / ("checkpoints" / Path(f"step-{last:08d}") if kind == "modelver"
                    else Path(f"checkpoint-{last}"))  # fmt: skip
    return trainer.blocked, bytes_of(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--saves", type=int, default=9)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    work = Path(tempfile.mkdtemp(prefix="trainer-save-", dir=a.dir))
    try:
        results = {}
        for kind in ("modelver", "trainer", "trainer+fsync"):
            results[kind] = run(kind, work / kind.replace("+", "-"), a)
        params = sum(p.numel() for p in model(a.layers).parameters())
        print(f"GPT-2, {a.layers} layers, {params / 1e6:.1f} M parameters (+ AdamW moments); "
              f"{a.saves} saves each, one process, {work}")  # fmt: skip
        print(f"{'':14} {'blocked median':>15} {'bytes':>12}  each save (s)")
        for kind, (blocked, size) in results.items():
            each = " ".join(f"{b:.3f}" for b in blocked)
            print(f"{kind:14} {statistics.median(blocked):14.3f}s {size:12,}  {each}")
        mv = statistics.median(results["modelver"][0])
        for base in ("trainer", "trainer+fsync"):
            ratio = mv / statistics.median(results[base][0])
            size = results["modelver"][1] / results[base][1]
            print(f"modelver / {base}: blocked {ratio:.2f}x, bytes {size:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
