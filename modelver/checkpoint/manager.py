"""CheckpointManager: when to save, where, how many to keep, and how to come back."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import numbers
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from modelver.checkpoint import distributed
from modelver.checkpoint import format as fmt
from modelver.checkpoint.catalog import (
    CheckpointInfo,
    latest_checkpoint,
    list_checkpoints,
    restore_checkpoint,
)
from modelver.checkpoint.delta import DeltaEncoder
from modelver.checkpoint.dirlock import DirLock, pid_alive, prepare_directory
from modelver.checkpoint.io import BufferPool, Snapshot, take_snapshot, write_checkpoint
from modelver.checkpoint.retention import (
    check_count,
    check_flag,
    check_policy,
    check_seconds,
    execute_retention,
    plan_retention,
    recover_leftovers,
)
from modelver.errors import (
    AsyncSaveError,
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    MalformedDataError,
    ModelverWarning,
    TrainingInterrupted,
    UnsafePathError,
)

if TYPE_CHECKING:
    from modelver.publish import Publisher


class CheckpointManager:
    """Periodic, atomic, verified checkpoints of a training loop's state.

    ``state`` maps names to objects with ``state_dict``/``load_state_dict`` (model, optimizer,
    scheduler, :class:`ResumableSampler`), tensors, or JSON values.

    Inside an initialised ``torch.distributed`` process group (torchrun, DDP, FSDP2) every rank
    builds the manager and calls ``restore``/``maybe_save``/``save`` with the same steps; the
    ranks then write one checkpoint together (see :mod:`modelver.checkpoint.distributed`).

    Every option is checked at construction (:class:`~modelver.errors.InvalidArgumentError`), and
    so is the directory: created if missing, then a probe file written and removed
    (:class:`~modelver.errors.CheckpointWriteError` with the hint for its errno). One process
    writes into a directory at a time: the manager holds an exclusive ``flock`` on it (on
    rank 0 under ``torch.distributed``) and refuses a second process with
    :class:`~modelver.errors.CheckpointLockedError`; managers of one process share the lock.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        keep_last: int | None = 3,
        keep_best: int = 0,
        monitor: str | None = None,
        mode: str = "min",
        handle_signals: bool = False,
        async_save: bool = False,
        push: bool | str = False,
        dvc_hashes: bool | None = None,
        delta_full_every: int | None = None,
    ) -> None:
        if not isinstance(directory, str | os.PathLike) or not isinstance(
            os.fspath(directory), str
        ) or not os.fspath(directory):
            raise InvalidArgumentError("directory", directory, expected="a non-empty path")
        every_steps = check_count("every_steps", every_steps, minimum=1)
        every_seconds = check_seconds("every_seconds", every_seconds)
        keep_last, keep_best, monitor, mode = check_policy(
            keep_last=keep_last, keep_best=keep_best, monitor=monitor, mode=mode
        )
        handle_signals = bool(check_flag("handle_signals", handle_signals))
        async_save = bool(check_flag("async_save", async_save))
        dvc_hashes = check_flag("dvc_hashes", dvc_hashes, none=True)
        if not isinstance(push, bool) and (not isinstance(push, str) or not push):
            raise InvalidArgumentError("push", push, expected="True, False or a remote name/URL")
        full_every = check_count("delta_full_every", delta_full_every, minimum=0)
        if full_every == 1:  # 0 and None: no deltas
            raise InvalidArgumentError(
                "delta_full_every", delta_full_every, expected="None (no deltas) or an integer >= 2"
            )
        self._distributed = distributed.active()
        if self._distributed and async_save:
            raise InvalidArgumentError(
                "async_save", async_save, expected="False under torch.distributed (not supported)"
            )
        if handle_signals and threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "handle_signals=True needs the manager to be built in the main thread"
            )
        self.root = Path(directory)
        # the directory is checked now, not at the first save after an interval of training;
        # every rank writes into it, rank 0 alone commits, cleans and holds the lock
        prepare_directory(self.root)
        self._lock: DirLock | None = None
        if not self._distributed or distributed.rank() == 0:
            self._lock = DirLock(self.root)
        # XOR deltas against the previous checkpoint, a full one every K (modelver.checkpoint
        # .delta); costs one host copy of the state, kept between saves (under torch.distributed
        # on rank 0, which writes the replicated tensors)
        self._delta = DeltaEncoder(full_every=full_every) if full_every else None
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor = monitor
        self.mode = mode
        self.async_save = async_save
        self._last_step: int | None = None
        self._last_time = time.monotonic()
        self._pool = BufferPool()
        self._executor: ThreadPoolExecutor | None = None
        self._janitor: ThreadPoolExecutor | None = None
        self._inflight: Future[CheckpointInfo] | None = None
        self._signal: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self._closed = False
        self.last_blocking_seconds = 0.0  # time the caller was blocked by the last save
        # push=True (the default DVC remote), a remote name or URL: upload each committed
        # checkpoint from a background thread (modelver.publish; DVC is imported there)
        self._publisher: Publisher | None = None
        if push:
            from modelver.publish import Publisher

            self._publisher = Publisher(self.root, push)
        # MD5 of each file, hashed from memory beside the writes, in the manifest and in DVC's
        # hash state, so DVC does not read every checkpoint byte again to hash it. Default: on
        # with push (uploads need it), and with async saves inside a DVC repository, where it
        # runs off the training thread; off for synchronous saves, which would pay it at every
        # save while DVC hashes only the checkpoints left at the end of the stage
        self.dvc_hashes = (
            (bool(push) or (async_save and _in_dvc_repo(self.root)))
            if dvc_hashes is None
            else dvc_hashes
        )
        self._dvc_warm: threading.Thread | None = None
        if self.dvc_hashes and not self._distributed and importlib.util.find_spec("dvc"):
            # importing DVC and opening the repository once takes seconds: not in the first save
            self._dvc_warm = threading.Thread(
                target=_warm_dvc, args=(self.root,), name="modelver-dvc-warm", daemon=True
            )
            self._dvc_warm.start()
        self._recover()
        if handle_signals:
            self._install_signals()

    # --- discovery ---------------------------------------------------------------------------

    def checkpoints(self) -> list[CheckpointInfo]:
        return list_checkpoints(self.root)

    def latest(self) -> CheckpointInfo | None:
        return latest_checkpoint(self.root)

    @property
    def stop_requested(self) -> bool:
        """True once SIGTERM/SIGINT arrived (with ``handle_signals=True``)."""
        return self._signal is not None

    # --- restore -----------------------------------------------------------------------------

    def restore(self, state: MutableMapping[str, Any], *, step: int | None = None) -> int:
        """Load the newest complete, verified checkpoint (or ``step``); return its step, 0 if none.

        Corrupted checkpoints are skipped with a warning and the previous one is taken.
        """
        # an async save still being written is committed first: it is a candidate, and the
        # delta encoder it uses is re-seeded below
        self._wait_inflight()
        if self._distributed:
            restored = distributed.restore(self.root, state, step=step)
            if restored:
                self._last_step = restored
                self._last_time = time.monotonic()
                if self._delta is not None and distributed.rank() == 0:
                    self._delta.seed(self.root / fmt.step_dirname(restored))
            return restored
        candidates = list(reversed(self.checkpoints()))
        if step is not None:
            candidates = [c for c in candidates if c.step == step]
            if not candidates:
                raise CheckpointCorruptedError(
                    self.root / fmt.step_dirname(step), ["no committed checkpoint at this step"]
                )
        overwritten = False
        for info in candidates:
            # a bad checkpoint (corrupted, malformed, unsafe, unreadable) is skipped for the
            # previous one; StateMismatchError (the live objects changed) is not: it propagates
            try:
                restored = restore_checkpoint(info.path, state)
            except CheckpointNotFoundError:  # retired by a writer since it was listed
                continue
            except (CheckpointCorruptedError, MalformedDataError, UnsafePathError) as e:
                overwritten = overwritten or bool(getattr(e, "partial", False))
                why = "; ".join(getattr(e, "problems", [e.message])[:3])
                warnings.warn(
                    f"skipping corrupted checkpoint {info.path}: {why}",
                    ModelverWarning,
                    stacklevel=2,
                )
                continue
            self._last_step = restored
            self._last_time = time.monotonic()
            if self._delta is not None:
                self._delta.seed(info.path)
            return restored
        if overwritten:
            raise CheckpointCorruptedError(
                self.root,
                [
                    "no valid checkpoint is left and the state was partly overwritten by a "
                    "corrupted one; rebuild the model (or move the directory away) and start again"
                ],
            )
        return 0

    # --- save --------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        if self._signal is not None:
            return True
        if step == self._last_step:
            return False
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_seconds and time.monotonic() - self._last_time >= self.every_seconds)

    def maybe_save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, float] | None = None,
        epoch: int | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> bool:
        """Save when due by steps or seconds; after a stop signal, save and exit cleanly."""
        step = int(check_count("step", step, minimum=0, none=False) or 0)
        self._raise_background_error()
        due = self.due(step)
        if self._distributed and (self._old_handlers or self.every_seconds):
            # one small all-reduce: every rank saves at the step any rank was stopped or due at
            agreed, due = distributed.agree(self._signal or 0, due)
            if agreed and self._signal is None:
                self._signal = agreed
        if not due:
            return False
        signum = self._signal
        if step != self._last_step:
            self.save(step, state, metrics=metrics, epoch=epoch, extras=extras)
        if signum is not None:
            self.close()
            raise TrainingInterrupted(signum, step)
        return True

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, float] | None = None,
        epoch: int | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo | None:
        """Save now. Returns the committed checkpoint, or None while an async save runs.

        ``step``, ``metrics`` (numbers; NaN allowed: a diverged run is recorded, never ranked
        best), ``epoch`` and ``extras`` (JSON) are checked before anything is written, so a
        manifest never holds what its readers would refuse.
        """
        if self._closed:
            raise RuntimeError("this CheckpointManager is closed")
        step, metrics, epoch, extras = _check_save(step, metrics, epoch, extras)
        t0 = time.perf_counter()
        self._wait_inflight()  # not the deletions of old checkpoints: they never block a save
        existing = self.root / fmt.step_dirname(step)
        if step == self._last_step and (existing / fmt.MANIFEST).is_file():
            return next((c for c in self.checkpoints() if c.step == step), None)
        if epoch is None:
            epoch = _epoch_of(state)
        if self._distributed:
            manifest = distributed.save(
                self.root, state, step=step, epoch=epoch, metrics=metrics, extras=extras,
                delta=self._delta,
            )
            self._last_step = step
            self._last_time = time.monotonic()
            info = self._after_commit(manifest, retain=distributed.rank() == 0)
            self.last_blocking_seconds = time.perf_counter() - t0
            return info
        snap = take_snapshot(
            state,
            step=step,
            epoch=epoch,
            metrics=metrics,
            extras=extras,
            pool=self._pool,
            copy_cpu=self.async_save,
        )
        self._last_step = step
        self._last_time = time.monotonic()
        if not self.async_save:
            info = self._commit(snap)
            self.last_blocking_seconds = time.perf_counter() - t0
            return info
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="modelver-save")
        self._inflight = self._executor.submit(self._commit, snap)
        self.last_blocking_seconds = time.perf_counter() - t0
        return None

    def _commit(self, snap: Snapshot) -> CheckpointInfo:
        delta = None
        if self._delta is not None:
            delta = (self._delta, self._delta.begin(self.root, snap.step))
        manifest = write_checkpoint(self.root, snap, md5=self.dvc_hashes, delta=delta)
        if self._delta is not None:
            self._delta.finish(fmt.step_dirname(snap.step), used_delta=bool(manifest.deltas))
        if self.dvc_hashes:
            if self._dvc_warm is not None:
                self._dvc_warm.join()
            try:
                _record_dvc_hashes(self.root / fmt.step_dirname(manifest.step), manifest)
            except OSError as e:  # committed already; e.g. retired at once by another manager
                warnings.warn(
                    f"could not record checkpoint hashes for DVC ({e}); DVC will hash the files",
                    ModelverWarning,
                    stacklevel=3,
                )
        return self._after_commit(manifest)

    def _after_commit(self, manifest: fmt.Manifest, *, retain: bool = True) -> CheckpointInfo:
        path = self.root / fmt.step_dirname(manifest.step)
        if retain:
            try:
                plan = plan_retention(
                    self.checkpoints(),
                    keep_last=self.keep_last,
                    keep_best=self.keep_best,
                    monitor=self.monitor,
                    mode=self.mode,
                )
                execute_retention(plan, remove=self._remove_later)
            except Exception as e:  # the save is committed: never an exception for it now
                warnings.warn(
                    f"step {manifest.step} is saved, but deleting older checkpoints in "
                    f"{self.root} failed ({type(e).__name__}: {e}); they are kept",
                    ModelverWarning,
                    stacklevel=4,
                )
            if self._publisher is not None:
                self._publisher.submit(path, manifest)
        return CheckpointInfo(
            path,
            manifest.step,
            manifest.epoch,
            manifest.metrics,
            manifest.created,
            manifest.total_bytes,
            len(manifest.tensors),
            manifest.bases,
        )

    def _remove_later(self, trash: Path) -> None:
        """Deleting a large checkpoint takes a while (freeing its blocks): not on the caller."""
        if self._janitor is None:
            self._janitor = ThreadPoolExecutor(1, thread_name_prefix="modelver-retention")
        self._janitor.submit(shutil.rmtree, trash, ignore_errors=True)

    def wait(self) -> CheckpointInfo | None:
        """Block until the in-flight async save (if any) is committed and old checkpoints are
        deleted; raise the save's error."""
        info = self._wait_inflight()
        if self._janitor is not None:
            self._janitor.submit(lambda: None).result()  # one thread: everything before is done
        return info

    def _wait_inflight(self) -> CheckpointInfo | None:
        fut, self._inflight = self._inflight, None
        if fut is None:
            return None
        try:
            return fut.result()
        except Exception as e:  # surfaced in the training thread, with the step
            step = self._last_step if self._last_step is not None else -1
            raise AsyncSaveError(step, e) from e

    def _raise_background_error(self) -> None:
        if self._publisher is not None:
            self._publisher.check()
        fut = self._inflight
        if fut is not None and fut.done() and fut.exception() is not None:
            self._wait_inflight()

    def close(self) -> None:
        """Wait for pending work and restore signal handlers; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            for pool in (self._executor, self._janitor):
                if pool is not None:
                    pool.shutdown(wait=True)
            if self._delta is not None:
                self._delta.join()
            if self._publisher is not None:
                self._publisher.close()  # uploads the last checkpoint before returning
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
            self._old_handlers.clear()
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- housekeeping ------------------------------------------------------------------------

    def _recover(self) -> None:
        """Leftovers of dead writers: a save killed between its two renames is completed (or
        the displaced checkpoint put back), the rest removed (see ``recover_leftovers``)."""
        if self._lock is None:
            return  # under torch.distributed rank 0 alone cleans (temp dirs carry its pid)
        try:
            recover_leftovers(self.root, live=pid_alive)
        except OSError as e:  # never fatal: the leftovers are invisible to readers
            warnings.warn(
                f"could not clean up {self.root} ({e})", ModelverWarning, stacklevel=3
            )

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "handle_signals=True needs the manager to be built in the main thread"
            )

        def handler(signum: int, frame: FrameType | None) -> None:
            if self._signal is not None:  # second signal: behave as if we were not there
                signal.signal(signum, self._old_handlers.get(signum, signal.SIG_DFL))
                signal.raise_signal(signum)
                return
            self._signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[sig] = signal.signal(sig, handler)


def _in_dvc_repo(directory: Path) -> bool:
    """Whether ``directory`` lies in a DVC repository and DVC is installed (no DVC import)."""
    if importlib.util.find_spec("dvc") is None:
        return False
    here = Path(os.path.realpath(directory))
    return any((d / ".dvc").is_dir() for d in (here, *here.parents))


def _warm_dvc(directory: Path) -> None:
    here = Path(os.path.realpath(directory))
    existing = next((d for d in (here, *here.parents) if d.is_dir()), here)
    try:
        from modelver.dvcrepo import record_hashes

        record_hashes(existing, {})
    except Exception:  # the first real record reports any problem
        pass


def _record_dvc_hashes(path: Path, manifest: fmt.Manifest) -> None:
    """Pre-fill DVC's hash state with the checkpoint's MD5s; a no-op without DVC."""
    md5s = {name: e.md5 for name, e in manifest.files.items() if e.md5}
    if not md5s or importlib.util.find_spec("dvc") is None:
        return
    md5s[fmt.MANIFEST] = hashlib.md5(
        (path / fmt.MANIFEST).read_bytes(), usedforsecurity=False
    ).hexdigest()
    from modelver.dvcrepo import record_hashes  # imports DVC: only here, only when present

    try:
        record_hashes(path, md5s)
    except Exception as e:  # an optimisation only: DVC then hashes the files itself
        warnings.warn(
            f"could not record checkpoint hashes for DVC ({e}); DVC will hash the files",
            ModelverWarning,
            stacklevel=3,
        )


def _check_save(
    step: object, metrics: object, epoch: object, extras: object
) -> tuple[int, dict[str, float] | None, int | None, dict[str, Any] | None]:
    checked_step = int(check_count("step", step, minimum=0, none=False) or 0)
    checked_epoch = check_count("epoch", epoch, minimum=0)
    values: dict[str, float] | None = None
    if metrics is not None:
        if not isinstance(metrics, Mapping):
            raise InvalidArgumentError("metrics", metrics, expected="a mapping of name to number")
        values = {}
        for k, v in metrics.items():
            if not isinstance(k, str) or not k:
                raise InvalidArgumentError("metrics key", k, expected="a non-empty string")
            values[k] = _number(f"metrics[{k!r}]", v)
    if extras is not None:
        if not isinstance(extras, Mapping) or not all(isinstance(k, str) for k in extras):
            raise InvalidArgumentError("extras", extras, expected="a mapping with string keys")
        try:
            json.dumps(dict(extras), allow_nan=True)
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError("extras", extras, expected=f"JSON values ({e})") from e
        extras = dict(extras)
    return checked_step, values, checked_epoch, extras


def _number(name: str, value: object) -> float:
    """A metric: a real number (a 0-d tensor or NumPy scalar too), not a bool or a string."""
    if isinstance(value, bool | str | bytes) or value is None:
        raise InvalidArgumentError(name, value, expected="a number")
    if isinstance(value, numbers.Real):
        return float(value)
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError) as e:
        raise InvalidArgumentError(name, value, expected="a number") from e


def _epoch_of(state: Mapping[str, Any]) -> int | None:
    for obj in state.values():
        epoch = getattr(obj, "epoch", None)
        if isinstance(epoch, int) and hasattr(obj, "_modelver_after_restore"):
            return epoch
    return None
