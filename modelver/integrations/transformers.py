"""Hugging Face ``Trainer`` checkpoints written and read by modelver.

Why a Trainer hook and not a ``TrainerCallback``: by the time ``on_save`` runs, Trainer has already
written ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` (``torch.save`` pickles) and
``training_args.bin`` into a ``checkpoint-N`` folder and rotated those folders itself. So the
integration replaces the few Trainer methods that save and resume:

- ``_save_checkpoint``: one modelver checkpoint per Trainer save, ``<dir>/step-NNNNNNNN/`` written
  atomically by :class:`~modelver.CheckpointManager`: the model, optimizer, LR scheduler and
  gradient scaler as safetensors, ``TrainerState`` as JSON (component ``trainer_state``), every RNG
  captured by modelver, the logged numbers of that step as manifest metrics. Retention is
  modelver's (``keep_last`` / ``keep_best``). No ``checkpoint-N`` folder is ever written.
- ``train(resume_from_checkpoint=True | path)``: ``True`` takes the newest checkpoint that
  verifies (a corrupted one is skipped with a warning); a path may be a step directory or a
  checkpoints directory. The checkpoint is verified first (so a resume reads it twice), then
  Trainer runs its own resume logic (epochs and batches to skip, callbacks' state) on a temporary
  directory holding only ``trainer_state.json``, while the loaders it calls are replaced:
  ``_load_from_checkpoint``, ``_load_optimizer_and_scheduler``, ``_load_scaler`` restore in place
  through modelver, and ``_load_rng_state`` puts modelver's RNG states back at the moment Trainer
  would (after skipping the consumed batches), so the resumed run ends with bit-identical
  weights. A Trainer-native (pickle) checkpoint is refused: no ``torch.load`` on the load path.
- ``_load_best_model``: ``load_best_model_at_end`` reads the best modelver checkpoint.

``trainer.save_model()`` is untouched: it exports ``model.safetensors`` + config for
``from_pretrained`` (and Trainer's ``training_args.bin``, which nothing here reads).

Use either ``ModelverTrainer(model=..., args=..., modelver_dir=..., keep_last=3)`` or
``patch_trainer(trainer, checkpoint_dir=..., keep_last=3)`` on an existing Trainer (any subclass:
its class is swapped for a subclass of it with the hooks). Defaults follow ``TrainingArguments``:
``checkpoint_dir`` = ``<output_dir>/checkpoints``, ``keep_last`` = ``save_total_limit`` (None keeps
all), and with ``load_best_model_at_end`` the best checkpoint by ``metric_for_best_model`` is kept.
``run=`` names the run as ``CheckpointManager(run=...)`` does (a name, or a mapping of the
hyperparameters that define it, fingerprinted): its checkpoints live in
``<checkpoint_dir>/run-<id>/``, retention counts in it, and a resume takes only its own
checkpoints, so runs of different hyperparameters share one ``output_dir`` without resuming
each other. ``train_or_resume()`` is the one call of a preemptible job.
Tested with transformers 4.46 and 5.24.

Under DDP (``torchrun``, ``accelerate launch --multi_gpu``; gloo on CPU or NCCL) every rank saves
(Trainer's ``should_save`` is rank 0's alone) and the manager writes one coordinated checkpoint:
rank 0 the shared state, every rank its RNGs in ``rank-NNNNN.json``; rank 0 chooses the
checkpoint to resume from, and stop signals are agreed across ranks (:mod:`.trainer_ddp`).

Limits: DeepSpeed, FSDP and TPU/XLA are refused (:func:`.trainer_ddp.unsupported` says why);
checkpoints are not pushed to the Hub (``save_model``/``push_to_hub`` still are); a data collator
that draws from the global RNG in the main process makes the first resumed batch differ, exactly
as with Trainer's own checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerState
from transformers.trainer_utils import TrainOutput

from modelver import untrusted
from modelver.checkpoint import format as fmt
from modelver.checkpoint.export import HF_CONFIG
from modelver.checkpoint.fallback import newest_valid
from modelver.checkpoint.manager import CheckpointManager
from modelver.checkpoint.restore import restore_checkpoint
from modelver.checkpoint.runid import run_id, run_root
from modelver.checkpoint.verify import verify_checkpoint
from modelver.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    ModelverError,
    ModelverWarning,
    TrainingInterrupted,
)
from modelver.integrations.trainer_ddp import (
    SignalStop,
    check_supported,
    on_rank0,
    restore_rngs,
)

TRAINER_STATE_NAME = "trainer_state.json"  # what Trainer.train reads from the resume directory
EXTRAS_KEY = "transformers"
_UNSET: Any = object()

__all__ = ["ModelverTrainer", "ModelverTrainerMixin", "TrainerCheckpointing", "patch_trainer"]


def _hf_config(model: Any) -> dict[str, Any]:
    """The model's ``config.json`` content, recorded in every manifest so that ``modelver
    export --format hf`` writes a directory ``from_pretrained`` loads."""
    config = getattr(model, "config", None)
    if not callable(getattr(config, "to_json_string", None)):
        return {}
    return {HF_CONFIG: json.loads(config.to_json_string(use_diff=False))}  # type: ignore[union-attr]


@dataclass(frozen=True)
class TrainerCheckpointing:
    """Where and how many modelver checkpoints a Trainer keeps."""

    checkpoint_dir: Path | None  # None: <output_dir>/checkpoints (per trial in a search)
    keep_last: int | None
    keep_best: int
    monitor: str | None
    mode: str
    handle_signals: bool
    run: str | Mapping[str, Any] | None  # as given: the manager records a mapping in RUN.json
    run_id: str | None


def _settings(
    args: Any,
    *,
    checkpoint_dir: str | Path | None,
    keep_last: int | None,
    keep_best: int,
    monitor: str | None,
    mode: str,
    handle_signals: bool,
    run: str | Mapping[str, Any] | None,
) -> TrainerCheckpointing:
    """Fill what was left unset from ``TrainingArguments``; ``run`` checked now."""
    metric = args.metric_for_best_model
    if metric is not None and not metric.startswith("eval_"):
        metric = f"eval_{metric}"
    if keep_last is _UNSET:
        keep_last = args.save_total_limit
    if monitor is _UNSET:
        wants_best = args.load_best_model_at_end or keep_best not in (_UNSET, 0)
        monitor = metric if wants_best else None
    if keep_best is _UNSET:
        keep_best = 1 if monitor else 0
    if mode is _UNSET:
        mode = "max" if args.greater_is_better else "min"
    if keep_best and not monitor:
        raise ValueError("keep_best needs monitor= naming a metric (e.g. 'eval_loss')")
    if mode not in ("min", "max"):
        raise ValueError("mode must be 'min' or 'max'")
    return TrainerCheckpointing(
        Path(checkpoint_dir) if checkpoint_dir is not None else None,
        keep_last,
        keep_best,
        monitor,
        mode,
        handle_signals,
        run,
        run_id(run),
    )


class ModelverTrainerMixin:
    """The Trainer methods that save and resume, routed through modelver (see module docstring).

    Put it before ``Trainer`` (or a Trainer subclass) in the bases and call
    :meth:`configure_modelver` once.
    """

    _modelver: TrainerCheckpointing
    _modelver_managers: dict[Path, CheckpointManager]
    _modelver_resume: Path | None
    _modelver_stop: SignalStop | None = None
    _modelver_verified: Path | None = None

    def configure_modelver(
        self,
        *,
        checkpoint_dir: str | Path | None = None,
        keep_last: int | None = _UNSET,
        keep_best: int = _UNSET,
        monitor: str | None = _UNSET,
        mode: str = _UNSET,
        handle_signals: bool = False,
        run: str | Mapping[str, Any] | None = None,
    ) -> None:
        trainer: Any = self
        self._modelver = _settings(
            trainer.args,
            checkpoint_dir=checkpoint_dir,
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
            handle_signals=handle_signals,
            run=run,
        )
        self._modelver_managers = {}
        self._modelver_resume = None
        check_supported(self)
        if handle_signals and self._modelver_stop is None:
            self._modelver_stop = SignalStop()
            trainer.add_callback(self._modelver_stop)
        elif not handle_signals and self._modelver_stop is not None:
            trainer.remove_callback(self._modelver_stop)
            self._modelver_stop = None

    # --- where ---------------------------------------------------------------------------------

    def _modelver_directory(self, trial: Any) -> Path:
        """The checkpoints directory, shared by every run of this output directory."""
        trainer: Any = self
        if self._modelver.checkpoint_dir is not None:
            return self._modelver.checkpoint_dir
        return Path(trainer._get_output_dir(trial=trial)) / "checkpoints"

    def modelver_checkpoint_dir(self, trial: Any = None) -> Path:
        """The directory holding this run's ``step-*`` checkpoints (``run-<id>/`` with run=)."""
        return run_root(self._modelver_directory(trial), self._modelver.run_id)

    def _modelver_manager(self, trial: Any) -> CheckpointManager:
        directory = self._modelver_directory(trial)
        mgr = self._modelver_managers.get(directory)
        if mgr is None:
            s = self._modelver
            mgr = CheckpointManager(
                directory, keep_last=s.keep_last, keep_best=s.keep_best, monitor=s.monitor,
                mode=s.mode, run=s.run,
            )
            self._modelver_managers[directory] = mgr
        return mgr

    # --- saving --------------------------------------------------------------------------------

    def _save_checkpoint(
        self, model: Any, trial: Any, metrics: dict[str, float] | None = None
    ) -> None:
        """Replaces Trainer's pickle-writing checkpoint with one modelver checkpoint.

        Under torch.distributed every rank saves (Trainer's ``should_save`` is rank 0's alone):
        the manager's save is collective, rank 0 writes the shared state and commits.
        ``metrics``: the evaluation results Trainer < 4.47 passes; newer ones log them only.
        """
        trainer: Any = self
        args = trainer.args
        if trainer.hp_search_backend is None and trial is None:
            trainer.store_flos()  # a collective under DDP, as in Trainer's own save
        root = self.modelver_checkpoint_dir(trial)
        step = int(trainer.state.global_step)
        self._modelver_track_best(root, step, metrics)
        self._modelver_update_callback_state()
        state = self._modelver_components(include_training=not args.save_only_model)
        state["trainer_state"] = json.loads(json.dumps(dataclasses.asdict(trainer.state)))
        epoch = trainer.state.epoch
        self._modelver_manager(trial).save(
            step,
            state,
            metrics={**self._modelver_metrics(step), **(metrics or {})},
            epoch=int(epoch) if epoch is not None else None,
            extras={EXTRAS_KEY: {"components": sorted(state)}, **_hf_config(trainer.model)},
        )

    def _modelver_track_best(self, root: Path, step: int, metrics: dict[str, float] | None) -> None:
        """Point ``best_model_checkpoint`` at the modelver directory of the best step."""
        trainer: Any = self
        state, args = trainer.state, trainer.args
        if hasattr(
            state, "best_global_step"
        ):  # Trainer >= 4.50 picks the best step when evaluating
            best = state.best_global_step
            best_dir = root / fmt.step_dirname(int(best or 0))
            if best and (best == step or best_dir.is_dir()):
                state.best_model_checkpoint = str(best_dir)
            return
        monitor = args.metric_for_best_model
        if metrics is None or monitor is None:
            return
        value = metrics[monitor if monitor.startswith("eval_") else f"eval_{monitor}"]
        prev = state.best_metric
        if (
            prev is None
            or state.best_model_checkpoint is None
            or (value > prev if args.greater_is_better else value < prev)
        ):
            state.best_metric = value
            state.best_model_checkpoint = str(root / fmt.step_dirname(step))

    def _modelver_components(self, *, include_training: bool) -> dict[str, Any]:
        trainer: Any = self
        state: dict[str, Any] = {"model": trainer.model}
        if include_training:
            if trainer.optimizer is not None:
                state["optimizer"] = trainer.optimizer
            if trainer.lr_scheduler is not None:
                state["scheduler"] = trainer.lr_scheduler
            scaler = getattr(trainer.accelerator, "scaler", None)
            if scaler is not None:
                state["scaler"] = scaler
        return state

    def _modelver_update_callback_state(self) -> None:
        """Same bookkeeping as Trainer's own save: stateful callbacks go into ``TrainerState``."""
        from transformers.trainer_callback import ExportableState

        trainer: Any = self
        for cb in [*trainer.callback_handler.callbacks, trainer.control]:
            if not isinstance(cb, ExportableState):
                continue
            name = cb.__class__.__name__
            if isinstance(trainer.state.stateful_callbacks.get(name), list):
                trainer.state.stateful_callbacks[name].append(cb.state())
            else:
                trainer.state.stateful_callbacks[name] = cb.state()

    def _modelver_metrics(self, step: int) -> dict[str, float]:
        """Numbers logged at this step (loss, eval metrics), shown by modelver and keep_best."""
        trainer: Any = self
        metrics: dict[str, float] = {}
        for entry in trainer.state.log_history:
            if entry.get("step") != step:
                continue
            for k, v in entry.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    metrics[k] = float(v)
        return metrics

    # --- resuming ------------------------------------------------------------------------------

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``Trainer.train``, resuming from a modelver checkpoint (``True``: newest valid one).

        With ``handle_signals``, SIGTERM/SIGINT end training after one more step and its
        checkpoint, then raise :class:`~modelver.errors.TrainingInterrupted` (a clean exit).
        """
        trainer: Any = self
        kwargs["ignore_keys_for_eval"] = ignore_keys_for_eval
        check_supported(self)
        staging: Path | None = None
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            root = self.modelver_checkpoint_dir(trial)
            path = on_rank0(  # every rank resumes from the checkpoint rank 0 verified
                self._modelver_pick,
                root if resume_from_checkpoint is True else Path(resume_from_checkpoint),
            )
            saved = self._modelver_trainer_state(path)
            finished = self._modelver_finished(path, saved)
            if finished is not None:
                return finished
            staging = self._modelver_stage(saved)
            self._modelver_resume = path
        signals = self._modelver_stop.signals if self._modelver_stop is not None else None
        try:
            with signals if signals is not None else nullcontext():
                result = super().train(  # type: ignore[misc]
                    resume_from_checkpoint=None if staging is None else str(staging),
                    trial=trial,
                    **kwargs,
                )
        finally:
            self._modelver_resume = None
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        stop = self._modelver_stop
        if stop is not None and stop.signals.signum is not None:
            signum, stop.signals.signum = stop.signals.signum, None
            raise TrainingInterrupted(signum, int(trainer.state.global_step))
        return result

    @staticmethod
    def _modelver_trainer_state(path: Path) -> dict[str, Any]:
        """The ``TrainerState`` a checkpoint holds, read once per resume (its global step is data
        from a file: an int, or the checkpoint is refused)."""
        holder: dict[str, Any] = {"trainer_state": None}
        restore_checkpoint(path, holder, restore_rngs=False)
        saved = holder["trainer_state"]
        what = f"trainer_state of {path}"
        saved = dict(untrusted.mapping(saved, what=what, field="trainer_state"))
        untrusted.integer(saved.get("global_step"), what=what, field="global_step")
        return saved

    def _modelver_finished(self, path: Path, saved: dict[str, Any]) -> Any:
        """Re-running a job that had finished (a scheduler restarting it, a second ``train``):
        its checkpoint is at ``max_steps``, and Trainer, which checks the stop only after a
        step, would train one step more and save it (then retention drops the real final
        one). Load the final state instead, train and save nothing; None if not finished."""
        trainer: Any = self
        max_steps = trainer.args.max_steps
        if not isinstance(max_steps, int) or max_steps <= 0 or saved["global_step"] < max_steps:
            return None
        restore_checkpoint(path, {"model": trainer.model}, restore_rngs=False)
        trainer.state = TrainerState(**saved)
        if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint:
            self._load_best_model()
        return TrainOutput(trainer.state.global_step, 0.0, {"train_loss": 0.0})

    def train_or_resume(self, trial: Any = None, **kwargs: Any) -> Any:
        """Continue from the newest verified modelver checkpoint of this run, or start when there
        is none: the one call a preemptible job needs (Trainer's ``resume_from_checkpoint=True``
        raises when there is none, so job scripts carry an if/else). A finished job re-run
        trains and saves nothing. Corrupted checkpoints are skipped with a warning, as the
        manager's restore skips them; when none is left, training starts afresh."""
        found = on_rank0(self._modelver_newest, trial)
        if found is None:
            return self.train(trial=trial, **kwargs)
        self._modelver_verified = found
        try:
            return self.train(resume_from_checkpoint=str(found), trial=trial, **kwargs)
        finally:
            self._modelver_verified = None

    def _modelver_newest(self, trial: Any) -> Path | None:
        found = newest_valid(self.modelver_checkpoint_dir(trial), self._modelver_verify,
                             stacklevel=4)
        return None if found is None else found[0].path

    @staticmethod
    def _modelver_stage(saved: dict[str, Any]) -> Path:
        """Trainer.train reads TrainerState from the resume directory: a temp one with just that."""
        staging = Path(tempfile.mkdtemp(prefix="modelver-resume-"))
        text = json.dumps(saved, indent=2, sort_keys=True) + "\n"
        (staging / TRAINER_STATE_NAME).write_text(text, encoding="utf-8")
        return staging

    def _modelver_pick(self, path: Path) -> Path:
        """A verified step directory: ``path`` itself, or the newest valid one under it."""
        if (path / fmt.MANIFEST).is_file():
            if path != self._modelver_verified:  # train_or_resume verified it a moment ago
                self._modelver_verify(path)
            return path
        if (path / TRAINER_STATE_NAME).is_file():
            raise ModelverError(
                f"{path} is a Trainer checkpoint (pickled optimizer, scheduler and RNG files); "
                "modelver resumes only from its own checkpoints",
                hint="resume once with a plain Trainer, then continue with modelver",
            )
        found = newest_valid(path, self._modelver_verify, stacklevel=4)  # as the manager skips
        if found is None:
            raise CheckpointNotFoundError(path)
        return found[0].path

    def _modelver_verify(self, path: Path) -> None:
        """Verify a checkpoint of this run (of no run without ``run=``): another run's is
        refused as the manager's restore refuses it, so runs never resume each other."""
        saved, mine = fmt.read_manifest(path).run, self._modelver.run_id
        if saved != mine:
            raise CheckpointCorruptedError(
                path, [f"it belongs to run {saved or '(none)'}, not to run {mine or '(none)'}"]
            )
        verify_checkpoint(path)

    def _modelver_saved_components(self, path: Path) -> list[str]:
        extras = fmt.read_manifest(path).extras.get(EXTRAS_KEY, {})
        return list(extras.get("components", []))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        trainer: Any = self
        if self._modelver_resume is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
            return
        restore_checkpoint(
            self._modelver_resume,
            {"model": trainer.model if model is None else model},
            restore_rngs=False,
        )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if self._modelver_resume is None:
            super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
            return
        path = self._modelver_resume
        saved = self._modelver_saved_components(path)
        live = self._modelver_components(include_training=True)
        wanted = {k: v for k, v in live.items() if k in ("optimizer", "scheduler") and k in saved}
        if "optimizer" not in saved:
            warnings.warn(
                f"{path} holds no optimizer state (saved with save_only_model=True): "
                "the optimizer and scheduler start afresh",
                ModelverWarning,
                stacklevel=2,
            )
        if wanted:
            restore_checkpoint(path, wanted, restore_rngs=False)

    def _load_scaler(self, checkpoint: str | None) -> None:
        if self._modelver_resume is None:
            super()._load_scaler(checkpoint)  # type: ignore[misc]
            return
        live = self._modelver_components(include_training=True)
        if "scaler" in live and "scaler" in self._modelver_saved_components(self._modelver_resume):
            restore_checkpoint(
                self._modelver_resume, {"scaler": live["scaler"]}, restore_rngs=False
            )

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """Trainer calls this after skipping the consumed batches: the RNGs come back here,
        each rank's own under DDP."""
        if self._modelver_resume is None:
            super()._load_rng_state(checkpoint)  # type: ignore[misc]
            return
        restore_rngs(self._modelver_resume)

    def _load_best_model(self) -> None:
        trainer: Any = self
        best = trainer.state.best_model_checkpoint
        if best is None or not (Path(best) / fmt.MANIFEST).is_file():
            super()._load_best_model()  # type: ignore[misc]
            return
        restore_checkpoint(Path(best), {"model": trainer.model}, restore_rngs=False)


class ModelverTrainer(ModelverTrainerMixin, Trainer):
    """``Trainer`` whose checkpoints are modelver checkpoints.

    Takes Trainer's arguments plus the keyword-only ``modelver_dir``, ``keep_last``,
    ``keep_best``, ``monitor``, ``mode``, ``handle_signals`` and ``run`` (see
    :func:`patch_trainer`).
    """

    def __init__(
        self,
        *args: Any,
        modelver_dir: str | Path | None = None,
        keep_last: int | None = _UNSET,
        keep_best: int = _UNSET,
        monitor: str | None = _UNSET,
        mode: str = _UNSET,
        handle_signals: bool = False,
        run: str | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.configure_modelver(
            checkpoint_dir=modelver_dir,
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
            handle_signals=handle_signals,
            run=run,
        )


_PATCHED: dict[type, type] = {}


def patch_trainer(
    trainer: Trainer,
    *,
    checkpoint_dir: str | Path | None = None,
    keep_last: int | None = _UNSET,
    keep_best: int = _UNSET,
    monitor: str | None = _UNSET,
    mode: str = _UNSET,
    handle_signals: bool = False,
    run: str | Mapping[str, Any] | None = None,
) -> Trainer:
    """Make an existing Trainer (or subclass) save and resume with modelver; returns it.

    Unset options follow ``TrainingArguments``: ``checkpoint_dir`` = ``<output_dir>/checkpoints``,
    ``keep_last`` = ``save_total_limit``, and with ``load_best_model_at_end`` ``keep_best=1``
    on ``metric_for_best_model`` (``mode`` from ``greater_is_better``). ``handle_signals``: on
    SIGTERM/SIGINT, save after the current step and raise ``TrainingInterrupted``. ``run``:
    the run, as ``CheckpointManager(run=...)`` takes it (checkpoints in ``run-<id>/``).
    """
    if not isinstance(trainer, Trainer):
        raise TypeError("patch_trainer needs a transformers.Trainer")
    cls = type(trainer)
    if not issubclass(cls, ModelverTrainerMixin):
        patched = _PATCHED.get(cls)
        if patched is None:
            patched = type(f"Modelver{cls.__name__}", (ModelverTrainerMixin, cls), {})
            _PATCHED[cls] = patched
        trainer.__class__ = patched
    hooked: Any = trainer
    hooked.configure_modelver(
        checkpoint_dir=checkpoint_dir,
        keep_last=keep_last,
        keep_best=keep_best,
        monitor=monitor,
        mode=mode,
        handle_signals=handle_signals,
        run=run,
    )
    return trainer
