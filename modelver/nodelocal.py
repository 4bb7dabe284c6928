"""Node-local checkpoints: each rank's own disk, and the DVC remote as the only shared store.

``CheckpointManager(local_dir, push=..., run=..., node_local=True)`` under torch.distributed.
Every rank commits its own files of a checkpoint in its own directory (a local cache), then
uploads them in the background (``PUTS`` files at once) as content-addressed DVC objects. The
ranks report their uploads to rank 0 over a gloo group of their own (never the training
group); rank 0 then uploads the manifest and the ``.dir`` listing of the whole step directory,
and only then rewrites the run record ``<remote>/modelver/runs/<run>.json`` to name the
checkpoint. That record is the commit: a checkpoint is complete when the remote says so,
whatever a local disk holds. It is the record :mod:`modelver.publish` writes, so
``modelver runs`` and ``modelver recover`` read node-local checkpoints unchanged.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from modelver import untrusted
from modelver.checkpoint import format as fmt
from modelver.errors import MalformedDataError, ModelverError, RemoteError
from modelver.hashing import md5_file
from modelver.publish import open_session, utcnow
from modelver.runs import MAX_RECORD_BYTES, RUNS, RunRecord

if TYPE_CHECKING:
    from modelver.publish import Session

T = TypeVar("T")
ATTEMPTS = 5  # per object: a remote that fails this often in ~15 s is down, not flaky
PUTS = 4  # files hashed and uploaded at once by each rank


class RemoteTier:
    """This rank's half of node-local checkpoints: one upload in flight, its outcome kept."""

    def __init__(self, root: Path, target: bool | str, run: str, *, backoff: float = 0.5) -> None:
        import torch.distributed as dist

        self.root = Path(root)
        self.run = run
        self.backoff = backoff
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # the reports travel off the training group: its collectives stay the caller's own
        self.group = dist.new_group(backend="gloo")
        self.session: Session = open_session(
            self.root, None if target is True else str(target), outside_ok=True
        )
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="modelver-upload")
        self._puts = ThreadPoolExecutor(PUTS, thread_name_prefix="modelver-put")
        self._inflight: Future[None] | None = None

    # --- save -------------------------------------------------------------------------------

    def upload(self, path: Path, names: list[str], manifest: fmt.Manifest) -> None:
        self._inflight = self._pool.submit(self._upload, Path(path), list(names), manifest)

    def outcome(self) -> str | None:
        fut, self._inflight = self._inflight, None
        if fut is None:
            return None
        try:
            fut.result()
        except Exception as e:  # reported to every rank at its next save
            return f"rank {self.rank}: {_line(e)}"
        return None

    def _upload(self, path: Path, names: list[str], manifest: fmt.Manifest) -> None:
        import torch.distributed as dist

        store = self.session.store

        def send(name: str) -> tuple[str, int]:
            entry = manifest.files.get(name)
            md5 = entry.md5 if entry is not None and entry.md5 else md5_file(path / name)
            self._retry(lambda: store.put_file(path / name, md5))
            return md5, (path / name).stat().st_size

        sent: dict[str, tuple[str, int]] = {}
        error: str | None = None
        try:  # a few files at once: one PUT leaves the link (and the remote) mostly idle
            sent = dict(zip(names, self._puts.map(send, names), strict=True))
        except Exception as e:  # still reported: rank 0 must not wait for a part that never comes
            error = f"rank {self.rank}: {_line(e)}"
        reports: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object((error, sent), reports, dst=0, group=self.group)
        if self.rank != 0:
            if error is not None:
                raise OSError(error)
            return
        assert reports is not None
        problems = [r[0] for r in reports if r[0]]
        if problems:
            raise OSError("; ".join(problems))
        files = {name: entry for _, part in reports for name, entry in part.items()}
        self._commit(path, manifest, files)

    def _commit(
        self, path: Path, manifest: fmt.Manifest, files: dict[str, tuple[str, int]]
    ) -> None:
        """Rank 0: the listing, a check that the remote holds every object, then the record."""
        from modelver.storage.dvc import dir_object

        listed = set(manifest.files) | {fmt.MANIFEST}
        if set(files) != listed:
            absent = sorted(listed - set(files))
            raise OSError(f"no rank uploaded {', '.join(absent[:3])}")
        store, s = self.session.store, self.session
        dir_md5, listing = dir_object(dict(sorted(files.items())))
        self._retry(lambda: store.put_bytes(dir_md5, listing))
        missing = self._retry(lambda: store.missing([dir_md5, *(m for m, _ in files.values())]))
        if missing:  # never name a checkpoint the remote does not hold whole
            raise OSError(f"{len(missing)} object(s) absent from the remote after upload")
        record = RunRecord(
            run=self.run, commit=s.commit, branch=s.branch, path=s.path,
            step=manifest.step, step_dir=path.name, dir_md5=dir_md5,
            files={k: m for k, (m, _) in files.items()}, created=manifest.created,
            pushed=utcnow(), metrics=dict(manifest.metrics), host=socket.gethostname(),
        )  # fmt: skip
        data = json.dumps(record.to_json(), indent=1, sort_keys=True).encode()
        self._retry(lambda: store.write_record(f"{RUNS}/{self.run}.json", data))

    # --- restore ----------------------------------------------------------------------------

    def latest(self) -> tuple[str, dict[str, str]] | None:
        data = self._retry(lambda: self.session.store.read_record(f"{RUNS}/{self.run}.json"))
        if data is None:
            return None
        what = f"run record {self.run}"
        record = RunRecord.from_json(
            untrusted.load_json(data, what=what, max_bytes=MAX_RECORD_BYTES), what=what
        )
        if record.run != self.run:
            raise MalformedDataError(what, "run", record.run, expected=self.run)
        return record.step_dir, dict(record.files)

    def fetch(self, md5: str, dest: Path) -> None:
        self._retry(lambda: self.session.store.get_file(md5, dest))

    def close(self) -> None:
        outcome = self.outcome()
        self._pool.shutdown(wait=True)
        self._puts.shutdown(wait=True)
        if outcome is not None:
            raise RemoteError(self.session.store.name, f"the last checkpoint's upload failed: "
                              f"{outcome}")

    def _retry(self, what: Callable[[], T]) -> T:
        delay = self.backoff
        for _ in range(ATTEMPTS - 1):
            try:
                return what()
            except RemoteError:
                time.sleep(delay)
                delay *= 2
        return what()


def _line(e: BaseException) -> str:
    if isinstance(e, ModelverError):
        return e.message
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
