"""A sampler that checkpoints its place in the epoch and resumes there exactly.

Used as ``DataLoader(ds, batch_size=B, sampler=ResumableSampler(ds))``. Two details make a
mid-epoch resume bit-identical to a run that never stopped:

- Consumed, not yielded: a DataLoader with workers pulls indices ahead of training. The sampler
  finds the DataLoader iterator that drives it and counts the batches it has handed to the
  training loop (``_num_yielded``) instead of the indices it has produced.
- Creating a DataLoader iterator draws a base seed from torch's global RNG. A resumed epoch
  creates one iterator more than the uninterrupted run, so the sampler puts back the RNG state
  the checkpoint restored, right after that extra draw.

Worker-side randomness (random augmentations in ``__getitem__`` with ``num_workers > 0``) is
seeded from that base seed, which the resumed partial epoch cannot reproduce; keep per-sample
randomness a function of the index and epoch if it must be exact.

Under torch.distributed (or with explicit ``num_replicas``/``rank``) each rank gets every
``num_replicas``-th index of the epoch's permutation, padded like ``DistributedSampler`` so all
ranks take the same number of steps; the position is then per rank and checkpointed per rank.
Pass ``num_replicas=1, rank=0`` to give every rank the whole dataset.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Iterator, Sized
from types import FrameType
from typing import Any

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffles with ``seed + epoch``; ``state_dict`` holds the epoch and the consumed count."""

    def __init__(
        self,
        data_source: Sized,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
                rank = dist.get_rank() if rank is None else rank
        self.num_replicas = 1 if num_replicas is None else int(num_replicas)
        self.rank = 0 if rank is None else int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in [0, {self.num_replicas})")
        self.n = len(data_source)
        # indices this rank takes per epoch (the whole dataset when not distributed)
        self.num_samples = math.ceil(self.n / self.num_replicas)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self._started = False
        self._resume_at: int | None = None
        self._pass_start = 0
        self._yielded = 0
        self._loader_iter: Any = None
        self._batch_size: int | None = None
        self._rng_after_restore: torch.Tensor | None = None

    @property
    def modelver_per_rank(self) -> bool:
        """Checkpointed in each rank's own file when the data is split across ranks
        (:class:`~modelver.checkpoint.hooks.PerRank`)."""
        return self.num_replicas > 1

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``."""
        if not self.shuffle:
            indices = list(range(self.n))
        else:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            indices = torch.randperm(self.n, generator=g).tolist()
        if self.num_replicas == 1:
            return indices
        total = self.num_samples * self.num_replicas
        while len(indices) < total:
            indices += indices[: total - len(indices)]
        return indices[self.rank : total : self.num_replicas]

    def __len__(self) -> int:
        return self.num_samples - (self._resume_at or 0)

    def __iter__(self) -> Iterator[int]:
        if self._resume_at is not None:
            start, self._resume_at = self._resume_at, None
            rewind = self._rng_after_restore if start > 0 else None
        else:
            if self._started:
                self.epoch += 1
            start, rewind = 0, None
        self._started = True
        self._pass_start = start
        self._yielded = start
        self._attach_loader_iter()
        if rewind is not None:
            torch.set_rng_state(rewind)  # undo the extra iterator's base-seed draw
        self._rng_after_restore = None
        for idx in self.order(self.epoch)[start:]:
            self._yielded += 1
            yield idx

    def _attach_loader_iter(self) -> None:
        """Find the DataLoader iterator driving us (a few frames up) to count what it consumed."""
        from torch.utils.data.dataloader import _BaseDataLoaderIter

        self._loader_iter = None
        frame: FrameType | None = sys._getframe(1)
        for _ in range(6):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if isinstance(owner, _BaseDataLoaderIter):
                self._loader_iter = weakref.ref(owner)
                self._batch_size = getattr(owner._index_sampler, "batch_size", None)
                return
            frame = frame.f_back

    def consumed(self) -> int:
        """Indices of the current epoch that the training loop has received."""
        it = self._loader_iter() if self._loader_iter is not None else None
        if it is not None and self._batch_size:
            return min(self._pass_start + it._num_yielded * self._batch_size, self.num_samples)
        return self._yielded

    def state_dict(self) -> dict[str, Any]:
        state = {
            "epoch": self.epoch,
            "position": self.consumed() if self._started else 0,
            "started": self._started,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "n": self.n,
        }
        if self.num_replicas > 1:
            state.update(num_replicas=self.num_replicas, rank=self.rank)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(
                f"sampler was saved for a dataset of {state['n']} items, this one has {self.n}"
            )
        saved = (int(state.get("num_replicas", 1)), int(state.get("rank", 0)))
        if saved != (self.num_replicas, self.rank):
            raise ValueError(
                f"sampler was saved as rank {saved[1]} of {saved[0]}, "
                f"this one is rank {self.rank} of {self.num_replicas}"
            )
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.epoch = int(state["epoch"])
        position = int(state["position"])
        started = bool(state.get("started", True))
        self._loader_iter = None
        if started and position >= self.num_samples:  # epoch finished: the next pass is a new epoch
            self._started, self._resume_at = True, None
        elif started and position > 0:
            self._started, self._resume_at = True, position
        else:
            self._started, self._resume_at = False, None

    def modelver_after_restore(self) -> None:
        """Called by the checkpoint restore once the global RNGs hold the saved state
        (:class:`~modelver.checkpoint.hooks.RestoreAware`)."""
        self._rng_after_restore = torch.get_rng_state() if self._resume_at else None
