"""Hugging Face Accelerate training loops on modelver checkpoints.

The supported path is the hand-written-loop API: ``CheckpointManager`` + ``ResumableSampler``
with the objects ``accelerator.prepare`` returns. :func:`checkpoint_state` turns them into the
state mapping the manager saves and restores:

- ``model``: ``accelerator.unwrap_model(model)``, so tensor names are the same for 1 and N
  processes (no ``module.`` prefix) and ``modelver diff`` compares them;
- ``optimizer``/``scheduler``: the torch objects inside ``AcceleratedOptimizer`` /
  ``AcceleratedScheduler`` (their ``state_dict`` delegates to them; the class recorded is
  torch's, so the checkpoint restores without Accelerate). ``AcceleratedScheduler`` steps the
  inner scheduler once per process per optimizer step; its state is the inner one's, counted so;
- ``scaler``: ``accelerator.scaler`` (fp16 mixed precision), when there is one;
- ``accelerator``: ``accelerator.step``, the gradient-accumulation counter;
- ``data``: the position in the prepared DataLoader (:class:`LoaderPosition`).

Why the sampler needs a wrapper: Accelerate shards the *batches* of the prepared DataLoader
(``BatchSamplerShard``: process r takes batches r, r+N, ...), and its ``DataLoaderShard`` reads
one batch ahead. The ``ResumableSampler`` inside must therefore see the whole dataset
(``num_replicas=1``: a rank-aware one would be sharded twice), every process holds the same
sampler state (saved once, as shared state), and the position is counted in rounds of
``total_batch_size`` indices from the batches the loop has received. ``even_batches`` fills an
incomplete last round with the first indices of the pass, which a resumed pass does not start
with, so with N > 1 processes an epoch must split into whole rounds (``drop_last=True``, or a
dataset length that is a multiple of the round); anything else is refused at attach time rather
than resumed inexactly.

RNGs: the manager records every rank's RNGs. Accelerate synchronises the generators named in
``rng_types`` at the start of each pass over the loader (default ``["generator"]``: the
sampler's own, which a ``ResumableSampler`` does not have). With ``"torch"`` in it, a resumed
pass would take rank 0's RNG; the sampler puts back each rank's restored RNG right after the
resumed pass starts, so the run stays bit-identical either way.

``accelerator.save_state``/``load_state`` pickle the optimizer, scheduler and RNG states; once
attached they raise :class:`~modelver.errors.ModelverError` before anything is written (the
methods are replaced on the instance: Accelerate's ``register_save_state_pre_hook`` runs only
after it has created the output directory and rotated old checkpoints).

Limits: DataLoaders that Accelerate dispatches from rank 0 (``dispatch_batches``, iterable
datasets), a batch sampler in place of a sampler, DeepSpeed, FSDP and Megatron-LM are refused.
Tested with accelerate 1.15.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from accelerate import Accelerator, DistributedType
from accelerate.data_loader import BatchSamplerShard, DataLoaderShard
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from torch.utils.data import BatchSampler

from modelver.checkpoint.sampler import ResumableSampler
from modelver.errors import ModelverError

__all__ = ["LoaderPosition", "checkpoint_state"]

_UNSUPPORTED = {
    DistributedType.DEEPSPEED: "DeepSpeed",
    DistributedType.FSDP: "FSDP",
    DistributedType.MEGATRON_LM: "Megatron-LM",
    DistributedType.XLA: "XLA",
}
_HINT_MANAGER = (
    "save and restore through modelver: mgr = CheckpointManager(...); "
    "mgr.maybe_save(step, checkpoint_state(accelerator, ...)); mgr.restore(state)"
)


class LoaderPosition:
    """The place of a prepared DataLoader in its epoch, for exact mid-epoch resume.

    ``state_dict`` is the ``ResumableSampler``'s, with the position counted from the batches
    this process has received: ``round * total_batch_size`` indices of the epoch's order, the
    same on every process (Accelerate gives each process one batch per round).
    """

    def __init__(self, loader: DataLoaderShard, sampler: ResumableSampler) -> None:
        self.loader = loader
        self.sampler = sampler
        self._loaded: int | None = None  # the restored position, until the next pass starts

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def received(self) -> int:
        """Indices of the epoch's order that every process's loop has had its batches of."""
        s = self.sampler
        if not s._started:
            return 0
        if self.loader.end_of_dataloader:
            return s.num_samples  # the pass is over (the last batch is in the loop's hands)
        if s._loader_iter is None:  # restored, no batch drawn since
            if self._loaded is None:
                raise ModelverError(
                    "the ResumableSampler did not find the DataLoader iterator driving it, so "
                    "the data position cannot be told",
                    hint="iterate the DataLoader returned by accelerator.prepare directly",
                )
            return self._loaded
        it = s._loader_iter()
        if it is None:  # the loop dropped the pass: the next one starts a new epoch
            return s.num_samples
        # DataLoaderShard holds one batch back to see the end coming: the loop has one fewer
        rounds = max(it._num_yielded - 1, 0)
        return min(s._pass_start + rounds * self.loader.total_batch_size, s.num_samples)

    def state_dict(self) -> dict[str, Any]:
        state = self.sampler.state_dict()
        state["position"] = self.received()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._loaded = min(int(state["position"]), self.sampler.num_samples)
        finished = bool(state.get("started", True)) and self._loaded == self.sampler.num_samples
        # passed to a dataset's set_epoch by Accelerate at the next pass
        self.loader.iteration = self.sampler.epoch + int(finished)

    def modelver_after_restore(self) -> None:
        self.sampler.modelver_after_restore()


class _Progress:
    """``accelerator.step``: where gradient accumulation is between optimizer steps."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        if not self.accelerator.sync_gradients:
            # the gradients accumulated so far are in no state_dict: a resume would drop them
            raise ModelverError(
                "a checkpoint in the middle of gradient accumulation would lose the gradients "
                "accumulated since the last optimizer step "
                f"(accelerator.step={self.accelerator.step})",
                hint="save only when accelerator.sync_gradients is True (after the optimizer "
                "step of an accumulation cycle)",
            )
        return {"step": int(self.accelerator.step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accelerator.step = int(state["step"])


def checkpoint_state(
    accelerator: Accelerator,
    *,
    model: Any,
    optimizer: Any,
    scheduler: Any = None,
    dataloader: Any = None,
) -> dict[str, Any]:
    """The state to hand to ``CheckpointManager.save``/``maybe_save``/``restore``, built from
    what ``accelerator.prepare`` returned; ``accelerator.save_state``/``load_state`` refuse
    from now on. Add further components to the returned dict as needed."""
    kind = accelerator.distributed_type
    if kind in _UNSUPPORTED:
        raise ModelverError(
            "modelver's Accelerate integration supports one process and DDP, not "
            f"{_UNSUPPORTED[kind]}",
            hint=f"train with Accelerate's own checkpoints, or without {_UNSUPPORTED[kind]}",
        )
    state: dict[str, Any] = {
        "model": accelerator.unwrap_model(model),
        "optimizer": optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer)
        else optimizer,
    }
    if scheduler is not None:
        state["scheduler"] = (
            scheduler.scheduler if isinstance(scheduler, AcceleratedScheduler) else scheduler
        )
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler
    state["accelerator"] = _Progress(accelerator)
    if dataloader is not None:
        state["data"] = LoaderPosition(dataloader, _checked_sampler(dataloader))
    _refuse_own_checkpoints(accelerator)
    return state


def _checked_sampler(loader: Any) -> ResumableSampler:
    """The ResumableSampler of a prepared loader whose position modelver can resume exactly."""
    if not isinstance(loader, DataLoaderShard):
        raise ModelverError(
            f"dataloader= must be a DataLoader returned by accelerator.prepare, not "
            f"{type(loader).__name__} (Accelerate dispatches batches from rank 0 for iterable "
            "datasets and with dispatch_batches=True, which modelver cannot resume)",
            hint="prepare a map-style DataLoader with sampler=ResumableSampler(ds, "
            "num_replicas=1, rank=0); for an unprepared loader put its ResumableSampler in "
            "the state itself",
        )
    shard = loader.batch_sampler
    inner = shard.batch_sampler if isinstance(shard, BatchSamplerShard) else shard
    sampler = getattr(inner, "sampler", None)
    if not isinstance(inner, BatchSampler) or not isinstance(sampler, ResumableSampler):
        raise ModelverError(
            f"the prepared DataLoader draws from {type(sampler or inner).__name__}, whose "
            "position in the epoch a checkpoint cannot hold",
            hint="build it as DataLoader(ds, batch_size=B, sampler=ResumableSampler(ds, "
            "num_replicas=1, rank=0)) before accelerator.prepare",
        )
    if sampler.num_replicas != 1:
        raise ModelverError(
            f"the DataLoader's ResumableSampler is rank {sampler.rank} of "
            f"{sampler.num_replicas}, and Accelerate shards its batches again (each process "
            "would see 1/N² of the data)",
            hint="build it as ResumableSampler(ds, num_replicas=1, rank=0): Accelerate gives "
            "each process its share of the batches",
        )
    if isinstance(shard, BatchSamplerShard) and not inner.drop_last:
        size = inner.batch_size
        rnd = size if shard.split_batches else size * shard.num_processes
        if sampler.num_samples % rnd:
            raise ModelverError(
                f"{sampler.num_samples} samples do not split into whole rounds of {rnd} "
                f"({shard.num_processes} processes): Accelerate pads the last round with the "
                "first samples of the pass, which a resumed pass does not start with (or, "
                "with even_batches=False, gives the processes different numbers of batches)",
                hint=f"pass drop_last=True to the DataLoader, or use a dataset whose length "
                f"is a multiple of {rnd}",
            )
    return sampler


def _refuse_own_checkpoints(accelerator: Accelerator) -> None:
    def refuse(name: str) -> Callable[..., NoReturn]:
        def refused(*args: object, **kwargs: object) -> NoReturn:
            raise ModelverError(
                f"accelerator.{name} is disabled: this Accelerator's state is checkpointed by "
                "modelver (Accelerate's own checkpoints pickle the optimizer, scheduler and RNG "
                "states and are written without a commit)",
                hint=_HINT_MANAGER,
            )

        return refused

    accelerator.save_state = refuse("save_state")
    accelerator.load_state = refuse("load_state")
