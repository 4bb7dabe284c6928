"""Lightning checkpoints written and read by modelver (``lightning`` 2.x).

``ModelverCheckpoint`` is used in place of ``ModelCheckpoint``. It subclasses it so Lightning
adds no default ``ModelCheckpoint`` of its own, asks it for ``ckpt_path="last"`` and
``"best"``, and treats it as the checkpoint callback; every save of the base class is replaced:

- Saves happen at the end of a training batch (every ``every_n_train_steps`` optimizer steps,
  or at each epoch's last batch without it, and at the last step of ``fit``), the point from
  which Lightning's loops know how to restart. Every rank builds Lightning's checkpoint dict
  (``dump_checkpoint``, what ``trainer.save_checkpoint`` builds) and the ranks write one
  modelver checkpoint together (:class:`~modelver.CheckpointManager`): the model's
  ``state_dict`` as component ``model``, the optimizers' and schedulers' states, the rest of
  the dict (loops' progress, callbacks' states, hyper-parameters, what ``on_save_checkpoint``
  hooks add) as component ``lightning``, the ``ResumableSampler`` position (per rank under
  DDP) and every RNG, per rank. Nothing is pickled.
- ``ModelverCheckpointIO`` is the strategy's ``CheckpointIO`` (installed by the callback at
  setup): Lightning's ``load_checkpoint`` gets the dict back from a verified modelver
  checkpoint, and a direct ``trainer.save_checkpoint(path)`` writes ``path/step-N`` in modelver's
  format instead of a pickle. A Lightning ``.ckpt`` (pickle) is refused: no ``torch.load``.
- ``trainer.fit(..., ckpt_path="last")`` resumes from the newest checkpoint of this run that
  verifies (corrupted ones skipped with a warning), or starts afresh when there is none.

Exact resume in the middle of an epoch needs the data position: a :class:`~modelver
.ResumableSampler` in the one training DataLoader (with ``strategy="ddp"`` pass
``Trainer(use_distributed_sampler=False)``: the sampler shards by rank itself), or a DataLoader
that follows Lightning's stateful-loader protocol (``state_dict``/``load_state_dict``). Anything
else is refused unless ``strict_data=False``. The RNGs: validation and a new epoch's DataLoader
iterator draw from the global RNG between a save and the next training batch, and a resumed run
draws differently there; so in every run, resumed or not, the RNG state recorded at a save is
put back at the start of the next training batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from modelver.checkpoint import commit, distributed
from modelver.checkpoint import format as fmt
from modelver.checkpoint.fallback import newest_valid
from modelver.checkpoint.io import BufferPool, take_snapshot, write_checkpoint
from modelver.checkpoint.manager import CheckpointManager
from modelver.checkpoint.restore import load_checkpoint, restore_checkpoint
from modelver.checkpoint.retention import check_count, check_policy
from modelver.checkpoint.runid import run_id, run_root
from modelver.checkpoint.sampler import ResumableSampler
from modelver.checkpoint.state import capture_rng, restore_rng
from modelver.checkpoint.verify import verify_checkpoint
from modelver.errors import CheckpointCorruptedError, CheckpointNotFoundError, ModelverError

__all__ = ["ModelverCheckpoint", "ModelverCheckpointIO"]

EXTRAS_KEY = "lightning"
DATA = "data"  # the training sampler's position
_SPLIT = {"state_dict": "model", "optimizer_states": "optimizers", "lr_schedulers": "schedulers"}
_REST = "lightning"
_PATH_KEY = "modelver_path"  # the step directory a loaded dict came from (never saved)
_NOT_RESUMABLE = "You're resuming from a checkpoint that ended before the epoch ended"


def to_components(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Lightning's checkpoint dict as modelver components (the model apart, so ``modelver
    diff`` lists its tensors by their module names)."""
    rest = dict(checkpoint)
    parts = {comp: rest.pop(key) for key, comp in _SPLIT.items() if key in rest}
    return {**parts, _REST: rest}


def from_components(state: Mapping[str, Any]) -> dict[str, Any]:
    rest = state.get(_REST)
    if not isinstance(rest, Mapping) or not all(isinstance(k, str) for k in rest):
        raise ModelverError(
            "this modelver checkpoint was not written by the Lightning integration "
            "(no 'lightning' component)",
            hint="resume a Lightning run from a ModelverCheckpoint directory",
        )
    checkpoint = dict(rest)
    checkpoint.update({key: state[comp] for key, comp in _SPLIT.items() if comp in state})
    return checkpoint


def _step_dir(path: Path, *, verified: Path | None = None) -> Path:
    """A verified step directory: ``path`` itself, or the newest valid one under it."""
    if path.is_file():
        raise ModelverError(
            f"{path} is a Lightning checkpoint file (a pickle); modelver loads only its own "
            "checkpoints",
            hint="resume once with Lightning's ModelCheckpoint, then continue with "
            "ModelverCheckpoint",
        )
    if fmt.manifest_token(path) is not None:
        if path != verified:
            verify_checkpoint(path)
        return path
    found = newest_valid(path, verify_checkpoint, stacklevel=3)
    if found is None:
        raise CheckpointNotFoundError(path)
    return found[0].path


class ModelverCheckpointIO(CheckpointIO):
    """Where Lightning would ``torch.save``/``torch.load`` a checkpoint dict."""

    def __init__(self) -> None:
        self.verified: Path | None = None  # checked a moment ago by ckpt_path="last"

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """``trainer.save_checkpoint(path)``: ``path`` becomes a checkpoints directory holding
        ``step-N`` (written by one process: Lightning calls this on rank 0 only)."""
        if storage_options is not None:
            raise TypeError("ModelverCheckpointIO takes no storage_options")
        step = int(checkpoint.get("global_step", 0))
        snap = take_snapshot(
            to_components(checkpoint), step=step, epoch=checkpoint.get("epoch"), metrics=None,
            extras={EXTRAS_KEY: {"version": pl.__version__, "data": []}}, pool=BufferPool(),
            copy_cpu=False,
        )
        write_checkpoint(Path(path), snap)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The dict Lightning saved, from a step directory or the newest valid one of a
        checkpoints directory; tensors come back on the CPU (Lightning moves them)."""
        step_dir = _step_dir(Path(path), verified=self.verified)
        checkpoint = from_components(load_checkpoint(step_dir).state)
        checkpoint[_PATH_KEY] = str(step_dir)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        path = Path(path)
        if fmt.manifest_token(path) is None:
            raise CheckpointNotFoundError(path)
        commit.remove(path)


class _Position:
    """A ResumableSampler whose saved position is what the training loop has trained on:
    Lightning's fetcher pulls a batch ahead, so the sampler's own count is one batch early."""

    def __init__(self, sampler: ResumableSampler, loader: DataLoader[Any]) -> None:
        self.sampler = sampler
        size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
        self.batch_size = size if isinstance(size, int) else 1
        self.position: int | None = None

    @property
    def modelver_per_rank(self) -> bool:
        return self.sampler.modelver_per_rank

    def at(self, batches: int, *, epoch_done: bool) -> None:
        n = self.sampler.num_samples
        self.position = n if epoch_done else min(batches * self.batch_size, n)

    def state_dict(self) -> dict[str, Any]:
        state = self.sampler.state_dict()
        if self.position is not None:
            state["position"] = self.position
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class ModelverCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` replaced by modelver checkpoints (see the module docstring).

    ``dirpath`` defaults to ``<default_root_dir>/checkpoints``; ``run`` names the run as
    ``CheckpointManager(run=...)`` does (checkpoints in ``dirpath/run-<id>/``). ``keep_best``
    ranks by ``monitor`` read from ``trainer.callback_metrics`` at the save. ``async_save``
    writes in a background thread (one process only).
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        *,
        every_n_train_steps: int | None = None,
        keep_last: int | None = 3,
        keep_best: int = 0,
        monitor: str | None = None,
        mode: str = "min",
        run: str | Mapping[str, Any] | None = None,
        async_save: bool = False,
        strict_data: bool = True,
    ) -> None:
        every = check_count("every_n_train_steps", every_n_train_steps, minimum=1)
        keep_last, keep_best, monitor, mode = check_policy(
            keep_last=keep_last, keep_best=keep_best, monitor=monitor, mode=mode
        )
        super().__init__(dirpath=dirpath, monitor=monitor, mode=mode, every_n_train_steps=every,
                         save_top_k=-1 if monitor is None else 1)
        self.keep_last, self.keep_best = keep_last, keep_best
        self.every = every
        self.run = run
        self.run_id = run_id(run)
        self.async_save = async_save
        self.strict_data = strict_data
        self._manager: CheckpointManager | None = None
        self._io: ModelverCheckpointIO | None = None
        self._positions: list[_Position] = []
        self._loaded_data: tuple[Path, Any] | None = None  # a sampler state read at the
        # resume (and its checkpoint), set into the sampler when training starts
        self._rng: dict[str, Any] | None = None  # put back at the next training batch
        self._verified: Path | None = None

    # --- where ---------------------------------------------------------------------------------

    def root(self, trainer: pl.Trainer) -> Path:
        """The directory holding this run's ``step-*`` checkpoints."""
        base = Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        return run_root(base, self.run_id)

    def _verify(self, path: Path) -> None:
        """A checkpoint of this run only: another run's is skipped like a corrupted one."""
        saved, mine = fmt.read_manifest(path).run, self.run_id
        if saved != mine:
            raise CheckpointCorruptedError(
                path, [f"it belongs to run {saved or '(none)'}, not to run {mine or '(none)'}"]
            )
        verify_checkpoint(path)

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """``ckpt_path="last"``: the newest verified checkpoint of this run (none: start)."""
        found = newest_valid(self.root(trainer), self._verify, stacklevel=3)
        self._verified = None if found is None else found[0].path
        if self._io is not None:
            self._io.verified = self._verified
        return set() if found is None else {str(found[0].path)}

    # --- setup ---------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        io = strategy.checkpoint_io
        if not isinstance(io, ModelverCheckpointIO):
            if type(io) is not TorchCheckpointIO:
                raise ModelverError(
                    f"the strategy uses {type(io).__name__}; ModelverCheckpoint reads and writes "
                    "through ModelverCheckpointIO",
                    hint="remove the checkpoint_io plugin (use async_save=True for async saves)",
                )
            io = ModelverCheckpointIO()
            strategy.checkpoint_io = io
        io.verified = self._verified
        self._io = io
        if stage == "fit" and self._manager is None:
            self._manager = CheckpointManager(
                self.root(trainer), keep_last=self.keep_last, keep_best=self.keep_best,
                monitor=self.monitor, mode=self.mode, run=self.run, async_save=self.async_save,
            )
            self.dirpath = str(self._manager.directory)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._manager is not None:
            manager, self._manager = self._manager, None
            manager.close()  # an async save is committed first

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """This rank's own RNGs and sampler position, from the checkpoint Lightning loaded."""
        where = checkpoint.pop(_PATH_KEY, None)
        if where is None or trainer.state.fn != "fit":
            return
        path = Path(where)
        meta = fmt.read_manifest(path).extras.get(EXTRAS_KEY)  # data from a file: checked
        names = meta.get("data") if isinstance(meta, dict) else None
        holder: dict[str, Any] = {DATA: None} if isinstance(names, list) and DATA in names else {}
        if distributed.active():  # the ranks check it again, each a share, then read their own
            distributed.restore(path.parent, holder, step=fmt.read_manifest(path).step)
        else:
            restore_checkpoint(path, holder)
        self._rng = capture_rng()
        self._loaded_data = (path, holder[DATA]) if DATA in holder else None

    # --- training ------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._positions = self._find_positions(trainer)
        if self._positions:  # Lightning cannot tell that the sampler resumes exactly
            warnings.filterwarnings("ignore", message=_NOT_RESUMABLE)
        if self._loaded_data is not None and self._positions:
            path, saved = self._loaded_data
            try:
                self._positions[0].load_state_dict(saved)
            except (KeyError, TypeError, ValueError) as e:  # a position this sampler refuses
                raise CheckpointCorruptedError(path, [f"component data: {e}"]) from e
            # the loader's iterator was created before this hook: a new one starts where the
            # sampler now stands. The loop counts the epoch's batches from its start, so the
            # fetcher keeps the whole epoch's length, not the shorter one the sampler reports
            fetcher = trainer.fit_loop._data_fetcher
            assert fetcher is not None  # set up before on_train_start
            length = fetcher.length
            iter(fetcher)
            fetcher.length = length
        self._loaded_data = None

    def _find_positions(self, trainer: pl.Trainer) -> list[_Position]:
        loaders = trainer.fit_loop._combined_loader
        flat = [] if loaders is None else list(loaders.flattened)
        samplers = [(dl, getattr(dl, "sampler", None)) for dl in flat]
        mine = [_Position(s, dl) for dl, s in samplers if isinstance(s, ResumableSampler)]
        stateful = all(isinstance(dl, _Stateful) for dl in flat)
        if (len(mine) == 1 and len(flat) == 1) or stateful or not self.strict_data:
            return mine
        why = (
            "one training DataLoader with a ResumableSampler"
            if len(flat) != 1
            else "a ResumableSampler in the training DataLoader"
        )
        hint = "or pass strict_data=False to accept an inexact resume in the middle of an epoch"
        if distributed.active() and not mine:
            hint = "with strategy='ddp' pass Trainer(use_distributed_sampler=False): " + hint
        raise ModelverError(
            f"an exact resume needs {why} (or DataLoaders with state_dict/load_state_dict)",
            hint=hint,
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._rng is not None:
            rng, self._rng = self._rng, None
            restore_rng(rng)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.sanity_checking or self._manager is None:
            return
        accumulate = trainer.accumulate_grad_batches
        last = trainer.is_last_batch
        if not last and (batch_idx + 1) % accumulate:
            return  # gradients are still accumulating: no optimizer step to save
        step = trainer.global_step
        final = (trainer.max_steps > 0 and step >= trainer.max_steps) or (
            last and trainer.max_epochs not in (None, -1)
            and trainer.current_epoch + 1 >= trainer.max_epochs
        )
        due = self.every is not None and step % self.every == 0
        if not (due or final or (self.every is None and last)):
            return
        self._save(trainer, step, batches=batch_idx + 1, epoch_done=last)

    def _save(self, trainer: pl.Trainer, step: int, *, batches: int, epoch_done: bool) -> None:
        assert self._manager is not None
        for p in self._positions:
            p.at(batches, epoch_done=epoch_done)
        state = to_components(trainer._checkpoint_connector.dump_checkpoint(weights_only=False))
        data = {DATA: self._positions[0]} if self._positions else {}
        self._manager.save(
            step,
            {**state, **data},
            metrics=_numbers(trainer.callback_metrics),
            epoch=trainer.current_epoch,
            extras={EXTRAS_KEY: {"version": pl.__version__, "data": sorted(data)}},
        )
        self._rng = capture_rng()  # what this step ends with, put back at the next batch
        self.last_model_path = str(self._manager.root / fmt.step_dirname(step))
        self._track_best()

    def _track_best(self) -> None:
        """``best_model_path`` for ``ckpt_path="best"``: the best kept checkpoint by monitor."""
        if self.monitor is None or self._manager is None:
            return
        sign = 1.0 if self.mode == "min" else -1.0
        ranked = [
            (sign * v, c.path)
            for c in self._manager.checkpoints()
            if isinstance(v := c.metrics.get(self.monitor), float) and math.isfinite(v)
        ]
        if ranked:
            self.best_model_path = str(min(ranked, key=lambda r: r[0])[1])

    # ModelCheckpoint's own saves (at epoch end, after validation, on exceptions, at the end of
    # training) are all replaced by the saves at the end of a training batch
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        return

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return

    def state_dict(self) -> dict[str, Any]:
        """Nothing to carry: the checkpoints directory is the state."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Scalar logged values (tensors or numbers) as manifest metrics."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if hasattr(value, "numel") and value.numel() == 1:
            value = value.item()
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out
