"""The Hugging Face Trainer integration across processes (DDP under torchrun or accelerate launch).

Every rank runs the same Trainer code; what the ranks must agree on goes through here:

- which checkpoint to resume from: rank 0 chooses (verifying it, skipping corrupted ones) and
  sends its choice to every rank, so no rank resumes from another step than the others;
- each rank's RNG states, which come from its own ``rank-NNNNN.json`` (the collective restore
  of :mod:`modelver.checkpoint.distributed`), not from rank 0's;
- a stop signal on any rank, which stops every rank after the same step (one small all-reduce
  per optimizer step, only with ``handle_signals``).

Saving needs nothing here: every rank calls :meth:`CheckpointManager.save` with the same step
and the manager's distributed commit writes one checkpoint. One process uses the same calls and
no collective.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from transformers import TrainerCallback

from modelver.checkpoint import distributed
from modelver.checkpoint import format as fmt
from modelver.checkpoint.restore import restore_checkpoint
from modelver.checkpoint.signals import StopSignals
from modelver.errors import ModelverError

T = TypeVar("T")

active = distributed.active


def unsupported(trainer: Any) -> list[str]:
    """What this Trainer uses that the integration refuses, each with the reason."""
    reasons = []
    if getattr(trainer, "is_deepspeed_enabled", False):
        reasons.append(
            "DeepSpeed (its engine partitions the optimizer state across ranks and saves and "
            "loads it only through its own pickled checkpoint files)"
        )
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_fsdp_xla_enabled", False):
        reasons.append(
            "FSDP (Accelerate shards the parameters and optimizer state and Trainer restores "
            "them after wrapping; these sharded state dicts do not go through modelver yet)"
        )
    if trainer.args.world_size > 1 and not active():
        reasons.append(
            f"{trainer.args.world_size} processes without a torch.distributed process group "
            "(TPU/XLA or SageMaker parallelism; modelver coordinates ranks through "
            "torch.distributed)"
        )
    return reasons


def check_supported(trainer: Any) -> None:
    reasons = unsupported(trainer)
    if reasons:
        raise ModelverError(
            "modelver's Trainer integration supports one process and DDP (torchrun, accelerate "
            f"launch); this Trainer uses {'; '.join(reasons)}",
            hint="train without the modelver hooks (Trainer's own checkpoints), or with DDP",
        )


def on_rank0(choose: Callable[..., T], *args: Any) -> T:
    """``choose(*args)`` run on rank 0 alone (all of it in one process), its result on every
    rank; its error raised on every rank, so none waits for a choice that never comes."""
    if not active():
        return choose(*args)
    import torch.distributed as dist

    error: Exception | None = None
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (None, choose(*args))
        except Exception as e:
            error = e
            box[0] = (str(e), None)
    dist.broadcast_object_list(box, src=0)  # small objects between our own ranks
    problem, result = box[0]
    if error is not None:
        raise error
    if problem is not None:
        raise ModelverError(
            f"rank 0 could not choose a checkpoint to resume from: {problem}",
            hint="see rank 0's error",
        )
    return result


def restore_rngs(path: Path) -> None:
    """Every RNG as it was when ``path`` was saved: each rank its own (collective)."""
    if not active():
        restore_checkpoint(path, {}, restore_rngs=True)
        return
    # the ranks check the checkpoint again, each a share of its files, then read their rank file
    distributed.restore(path.parent, {}, step=fmt.read_manifest(path).step)


class SignalStop(TrainerCallback):
    """After SIGTERM/SIGINT on any rank: every rank finishes the optimizer step, saves it,
    and stops training."""

    def __init__(self) -> None:
        self.signals = StopSignals(needs="train() to run")  # installed for train()'s length

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        signum = self.signals.signum
        if active():  # every rank calls this after every optimizer step: one all-reduce
            signum = distributed.agree(signum or 0, False)[0] or None
            if signum is not None and self.signals.signum is None:
                self.signals.signum = signum
        if signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control
