"""CheckpointManager: when to save, where, how many to keep, and how to come back."""

from __future__ import annotations

import importlib.util
import json
import numbers
import os
import shutil
import time
import warnings
from collections.abc import Mapping, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from modelver.checkpoint import commit, distributed, distsave, hooks
from modelver.checkpoint import format as fmt
from modelver.checkpoint.catalog import (
    CheckpointInfo,
    Listing,
    info_of,
    latest_checkpoint,
    list_checkpoints,
)
from modelver.checkpoint.delta import DeltaEncoder
from modelver.checkpoint.dirlock import DirLock, prepare_directory
from modelver.checkpoint.fallback import newest_valid
from modelver.checkpoint.hooks import CommitHook, RestoreAware
from modelver.checkpoint.io import (
    BufferPool,
    Snapshot,
    paused_gc,
    take_snapshot,
    write_checkpoint,
)
from modelver.checkpoint.kept import KeptCopies, kept_dir
from modelver.checkpoint.restore import restore_checkpoint, restore_partial
from modelver.checkpoint.retention import (
    check_count,
    check_flag,
    check_policy,
    check_seconds,
    execute_retention,
    plan_retention,
)
from modelver.checkpoint.runid import mark_current, record_run, run_id, run_root
from modelver.checkpoint.runretention import bound_runs, check_keep_runs
from modelver.checkpoint.signals import StopSignals
from modelver.errors import (
    AsyncSaveError,
    CheckpointCorruptedError,
    InvalidArgumentError,
    ModelverWarning,
    TrainingInterrupted,
)


class CheckpointManager:
    """Periodic, atomic, verified checkpoints of a training loop's state.

    ``state`` maps names to objects with ``state_dict``/``load_state_dict`` (model, optimizer,
    scheduler, :class:`ResumableSampler`), tensors, or JSON values.

    Inside an initialised ``torch.distributed`` process group (torchrun, DDP, FSDP2) every rank
    builds the manager and calls ``restore``/``maybe_save``/``save`` with the same steps; the
    ranks then write one checkpoint together (see :mod:`modelver.checkpoint.distributed`).
    ``node_local=True`` (with ``push`` and ``run``): ``directory`` is each rank's own disk and
    the DVC remote the only shared store (see :mod:`modelver.nodelocal`).

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
        on_commit: Sequence[CommitHook] = (),
        run: str | Mapping[str, Any] | None = None,
        keep_runs: int | None = None,
        node_local: bool = False,
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
        hooks_given = list(on_commit) if isinstance(on_commit, list | tuple) else None
        if hooks_given is None or not all(isinstance(h, CommitHook) for h in hooks_given):
            raise InvalidArgumentError(
                "on_commit", on_commit, expected="a list of objects with committed/check/close"
            )
        full_every = check_count("delta_full_every", delta_full_every, minimum=0)
        if full_every == 1:  # 0 and None: no deltas
            raise InvalidArgumentError(
                "delta_full_every", delta_full_every, expected="None (no deltas) or an integer >= 2"
            )
        keep_runs = check_keep_runs(keep_runs, run=run)  # None: every run stays
        self._distributed = distributed.active()
        node_local = bool(check_flag("node_local", node_local))
        if node_local:
            _check_node_local(self._distributed, push=push, run=run, delta=full_every)
        self._stop = StopSignals(needs="the manager to be built")
        if handle_signals:
            self._stop.check_thread()
        # run= names the run: its checkpoints live in their own subdirectory (checkpoint.runid),
        # so another run's are never restored, retained against, or deleted
        self.run = run_id(run)
        self.directory = Path(directory)
        self.root = run_root(self.directory, self.run)
        # the directory is checked now, not at the first save after an interval of training;
        # every rank writes into it, rank 0 alone commits, cleans and holds the lock
        prepare_directory(self.root)
        # node-local: each rank's directory is its own disk, which it alone writes and cleans
        owner = not self._distributed or distributed.rank() == 0 or node_local
        self._owner = owner
        if self.run is not None and owner:
            record_run(self.root, self.run, run)
        self._lock: DirLock | None = None
        if owner:
            self._lock = DirLock(self.root)
            if self.run is not None:  # the run the directory's commit stands for (runid)
                mark_current(self.directory, self.run)
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
        self._listing = Listing(self.root)  # what retention plans over, kept current cheaply
        self._executor: ThreadPoolExecutor | None = None
        self._janitor: ThreadPoolExecutor | None = None
        self._inflight: Future[CheckpointInfo] | None = None
        self._closed = False
        self.last_blocking_seconds = 0.0  # time the caller was blocked by the last save
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
        # after each commit: DVC's hash state (single process), then push=True (the default
        # DVC remote), a remote name or URL: an upload from a background thread, then the
        # caller's own hooks; the modelver package provides the first two (checkpoint.hooks)
        self._hooks: list[CommitHook] = []
        # in a DVC repository each checkpoint is hard-linked aside, where the forced checkout
        # `dvc exp run` starts with cannot delete it (checkpoint.kept)
        where = kept_dir(self.root) if not self._distributed and _in_dvc_repo(self.root) else None
        self._kept = KeptCopies(self.root, where) if where is not None else None
        if self._kept is not None:
            self._hooks.append(self._kept)
        if self.dvc_hashes and not self._distributed:
            self._hooks.append(hooks.hook_for("dvc_hashes", self.root, True))
        # node-local: the remote is the shared store, written by every rank (checkpoint.hooks)
        self._tier = (
            distributed.make_tier(self.root, push, self.run) if node_local and self.run else None
        )
        if push and self._tier is None:
            self._hooks.append(hooks.hook_for("push", self.root, push))
        # async under torch.distributed: the background write's collectives go over a gloo
        # group of its own, never the training group the caller's thread uses meanwhile
        self._side = distributed.side_group() if self._distributed and async_save else None
        self._hooks += hooks_given
        self._recover()
        if keep_runs is not None and self._lock is not None and self.run is not None:
            # the oldest runs beyond the bound, only those stored elsewhere (runretention)
            bound_runs(self.directory, current=self.run, keep_runs=keep_runs,
                       remove=self._remove_later)
        if handle_signals:
            self._stop.install()

    # --- discovery ---------------------------------------------------------------------------

    def checkpoints(self) -> list[CheckpointInfo]:
        return list_checkpoints(self.root)

    def latest(self) -> CheckpointInfo | None:
        return latest_checkpoint(self.root)

    @property
    def stop_requested(self) -> bool:
        """True once SIGTERM/SIGINT arrived (with ``handle_signals=True``)."""
        return self._stop.signum is not None

    # --- restore -----------------------------------------------------------------------------

    def restore(
        self,
        state: MutableMapping[str, Any],
        *,
        step: int | None = None,
        only: Sequence[str] | None = None,
        strict: bool = True,
    ) -> int:
        """Load the newest complete, verified checkpoint (or ``step``); return its step, 0 if none.

        Corrupted checkpoints are skipped with a warning and the previous one is taken.
        ``only``/``strict=False``: a partial restore (:func:`~modelver.checkpoint.restore.
        restore_partial`; the RNGs are not restored), what it left out named in a warning.
        """
        if (only is not None or not strict) and self._distributed:
            raise InvalidArgumentError(
                "only/strict", (only, strict), expected="a full restore under torch.distributed"
            )
        # an async save still being written is committed first: it is a candidate, and the
        # delta encoder it uses is re-seeded below
        self._wait_inflight()
        if self._distributed:
            restored = distributed.restore(self.root, state, step=step, tier=self._tier)
            if restored:
                self._last_step = restored
                self._last_time = time.monotonic()
                if self._delta is not None and distributed.rank() == 0:
                    self._delta.seed(self.root / fmt.step_dirname(restored))
            return restored
        if self._kept is not None:  # what `dvc exp run`'s checkout deleted comes back first
            self._kept.bring_back()
        # a bad checkpoint (corrupted, malformed, unsafe, unreadable) is skipped for the
        # previous one; StateMismatchError (the live objects changed) is not: it propagates
        found = newest_valid(
            self.root, lambda path: self._restore_own(path, state, only=only, strict=strict),
            step=step, stacklevel=2,
        )
        if found is None:
            return 0
        info, restored = found
        self._last_step = restored
        self._last_time = time.monotonic()
        if self._delta is not None:
            self._delta.seed(info.path)
        return restored

    def _restore_own(
        self, path: Path, state: MutableMapping[str, Any], *, only: Sequence[str] | None,
        strict: bool,
    ) -> int:
        """Restore ``path`` if it is this run's (a directory copied into the wrong run's is
        skipped as a bad checkpoint, before anything live changes)."""
        saved = fmt.read_manifest(path).run
        if saved != self.run:
            mine = self.run or "(none)"
            raise CheckpointCorruptedError(
                path, [f"it belongs to run {saved or '(none)'}, not to run {mine}"]
            )
        if only is None and strict:
            return restore_checkpoint(path, state)
        report = restore_partial(path, state, only=only, strict=strict)
        if report.missing or report.unexpected:
            warnings.warn(report.summary(), ModelverWarning, stacklevel=5)
        return report.step

    # --- save --------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        if self._stop.signum is not None:
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
        if self._distributed and (self._stop.installed or self.every_seconds):
            # one small all-reduce: every rank saves at the step any rank was stopped or due at
            agreed, due = distributed.agree(self._stop.signum or 0, due)
            if agreed and self._stop.signum is None:
                self._stop.signum = agreed
        if not due:
            return False
        signum = self._stop.signum
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
        self._listing.begin()  # one stat: has anyone else changed the directory since?
        if self._distributed:
            part = distsave.snapshot(
                state, step=step, epoch=epoch, metrics=metrics, extras=extras, run=self.run,
                pool=self._pool if self.async_save else None,
            )
            self._last_step = step
            self._last_time = time.monotonic()
            if not self.async_save:
                info = self._write_part(part)
                self.last_blocking_seconds = time.perf_counter() - t0
                return info
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="modelver-save")
            self._inflight = self._executor.submit(self._write_part, part)
            self.last_blocking_seconds = time.perf_counter() - t0
            return None
        with paused_gc():  # the training thread's part (not a background write)
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

    def _write_part(self, part: distsave.Snapshot) -> CheckpointInfo:
        """Every rank, together (on the side group when in the background)."""
        manifest = distsave.write(
            self.root, part, group=self._side, delta=self._delta, tier=self._tier
        )
        return self._after_commit(manifest, retain=self._owner)

    def _commit(self, snap: Snapshot) -> CheckpointInfo:
        delta = None
        if self._delta is not None:
            delta = (self._delta, self._delta.begin(self.root, snap.step))
        manifest = write_checkpoint(
            self.root, snap, md5=self.dvc_hashes, delta=delta, run=self.run
        )
        if self._delta is not None:
            self._delta.finish(fmt.step_dirname(snap.step), used_delta=bool(manifest.deltas))
        return self._after_commit(manifest)

    def _after_commit(self, manifest: fmt.Manifest, *, retain: bool = True) -> CheckpointInfo:
        path = self.root / fmt.step_dirname(manifest.step)
        info = info_of(path, manifest)
        if retain:
            try:
                kept = self._listing.committed(info)
                if self.keep_last:  # None or 0 keeps everything: nothing to plan or delete
                    plan = plan_retention(
                        kept,
                        keep_last=self.keep_last,
                        keep_best=self.keep_best,
                        monitor=self.monitor,
                        mode=self.mode,
                    )
                    execute_retention(plan, remove=self._remove_later)
                    self._listing.retired(plan.delete)
                    if self._kept is not None:
                        self._kept.retired([i.path.name for i in plan.delete])
            except Exception as e:  # the save is committed: never an exception for it now
                warnings.warn(
                    f"step {manifest.step} is saved, but deleting older checkpoints in "
                    f"{self.root} failed ({type(e).__name__}: {e}); they are kept",
                    ModelverWarning,
                    stacklevel=4,
                )
            for hook in self._hooks:
                try:
                    hook.committed(path, manifest)
                except Exception as e:  # the save is committed: a hook's failure is a warning
                    warnings.warn(
                        f"step {manifest.step} is saved, but {type(hook).__name__} failed after "
                        f"the commit ({type(e).__name__}: {e})", ModelverWarning, stacklevel=4,
                    )
        return info

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
        for hook in self._hooks:
            hook.check()
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
            for hook in self._hooks:
                hook.close()  # a push uploads the last checkpoint before returning
            self._stop.uninstall()
            if self._lock is not None:
                self._lock.release()
            if self._tier is not None:
                self._tier.close()  # the last upload and its commit in the remote

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
            commit.recover_leftovers(self.root)
        except OSError as e:  # never fatal: the leftovers are invisible to readers
            warnings.warn(
                f"could not clean up {self.root} ({e})", ModelverWarning, stacklevel=3
            )


def _check_node_local(
    active: bool, *, push: bool | str, run: object, delta: int | None
) -> None:
    """What node-local checkpoints need: ranks, a remote to share, a run to find again."""
    if not active:
        raise InvalidArgumentError(
            "node_local", True, expected="False outside torch.distributed (one process: push=)"
        )
    if not push:
        raise InvalidArgumentError(
            "push", push, expected="the remote node-local ranks share (True or its name)"
        )
    if run is None:
        raise InvalidArgumentError(
            "run", run, expected="a name or mapping: it finds this job's checkpoints in the "
            "remote after a restart"
        )
    if delta:
        raise InvalidArgumentError(
            "delta_full_every", delta, expected="None with node_local=True (not supported)"
        )


def _in_dvc_repo(directory: Path) -> bool:
    """Whether ``directory`` lies in a DVC repository and DVC is installed (no DVC import)."""
    if importlib.util.find_spec("dvc") is None:
        return False
    here = Path(os.path.realpath(directory))
    return any((d / ".dvc").is_dir() for d in (here, *here.parents))


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
        if isinstance(epoch, int) and isinstance(obj, RestoreAware):
            return epoch
    return None
