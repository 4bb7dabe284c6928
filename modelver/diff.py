"""Compare two checkpoints (params, metrics, tensors) without loading either into memory.

A tensor whose content hash, dtype and shape are equal on both sides is ``unchanged``: equal
hashes in the manifests prove it, so its bytes are never read. A changed tensor is streamed in
chunks straight from its byte range in the safetensors file, so memory stays at a few chunk
buffers whatever the checkpoint size, and a few threads share the work.

Precision: tensors up to ``EXACT_ELEMENTS`` elements and float64/int32/int64 tensors are widened
to float64 before any arithmetic. Larger float32/bf16/f16 tensors are computed in float32: a-b is
exact for values within a factor of 2 of each other, and dot products over chunks of
``CHUNK_ELEMENTS`` are added up in float64, about 1e-7 relative error on the norms or better, at
about half the cost of widening every element. The cosine is derived from |a-b| and the two
norms in a form where their rounding is scaled down by the relative change, so 1 - cos stays
accurate for tiny changes.
"""

from __future__ import annotations

import contextlib
import io
import math
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelver.checkpoint import format as fmt
from modelver.checkpoint.shardindex import read_index
from modelver.errors import CheckpointCorruptedError, ModelverError
from modelver.layout import Place, by_name, read_layout
from modelver.metrics import split_values

if TYPE_CHECKING:
    import torch

ADDED, REMOVED, CHANGED, UNCHANGED = "added", "removed", "changed", "unchanged"
STATUSES = (ADDED, REMOVED, CHANGED, UNCHANGED)
CHUNK_ELEMENTS = 1 << 15  # elements per vector op (and progress update): stays in cache
JOB_ELEMENTS = 1 << 22  # a large tensor is split into ranges this long, shared by the workers
EXACT_ELEMENTS = 1 << 20  # tensors up to this size are widened to float64 before any product
# Dtypes whose values float32 cannot hold exactly are always computed in float64.
_WIDE = frozenset({"float64", "int32", "int64", "uint32", "uint64"})
WORKERS = max(1, min(4, (os.cpu_count() or 1) // 2))  # threads; half the cores, at most 4

Progress = Callable[[int, int], None]  # (bytes read so far, bytes to read in all)


@dataclass(frozen=True)
class DiffSide:
    """One side of a diff: a checkpoint step directory and what is known about its version.

    ``manifest`` alone (no ``path``) is enough for a ``--stat`` diff, so a version whose data
    is only in a remote can be compared without fetching its tensors; ``state`` (its checked
    state.json) then names the tensors' places.
    """

    path: Path | None
    label: str  # the ref as the user wrote it
    params: Mapping[str, Any] | None = None  # params.yaml content; None when not known
    manifest: fmt.Manifest | None = None  # already parsed; read from ``path`` when None
    state: Mapping[str, Any] | None = None  # state.json, checked; read from ``path`` when None
    commit: str | None = None  # the commit a version or commit ref resolved to
    version: str | None = None  # the version tag it resolved to, when not the ref itself

    def read_manifest(self) -> fmt.Manifest:
        if self.manifest is not None:
            return self.manifest
        if self.path is None:
            raise ModelverError(f"{self.label} has neither a checkpoint directory nor a "
                                "manifest", hint="give a version, a commit or a directory")
        return read_index(self.path, fmt.read_manifest(self.path))

    def read_layout(self, manifest: fmt.Manifest) -> dict[str, Place]:
        """Each tensor's place, from state.json (hash-checked and validated when read here)."""
        if self.state is not None:
            return read_layout(self.state)
        if self.path is None:
            return {}
        from modelver.checkpoint.reader import read_state_json

        return read_layout(read_state_json(self.path, manifest))


@dataclass(frozen=True)
class Endpoint:
    label: str  # the ref as the user wrote it
    path: Path | None  # None: compared from the manifest alone (not materialised)
    step: int
    commit: str | None = None
    version: str | None = None  # the version tag the ref resolved to, when not the ref itself

    def to_json(self) -> dict[str, Any]:
        path = None if self.path is None else str(self.path)
        return {"ref": self.label, "path": path, "step": self.step, "commit": self.commit,
                "version": self.version}


@dataclass(frozen=True)
class ParamChange:
    key: str  # dotted path into params.yaml, e.g. "train.lr"
    status: str  # added / removed / changed
    a: Any = None
    b: Any = None

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "a": self.a, "b": self.b}


@dataclass(frozen=True)
class MetricDiff:
    """One metric on both sides. A value that is not a number (a string, a bool, a list,
    null) is shown as text (``a_text``) and never enters a delta."""

    name: str
    a: float | None
    b: float | None
    a_text: str | None = None  # the non-numeric value of A, shown instead of a number
    b_text: str | None = None

    @property
    def changed(self) -> bool:
        return not _same(self.a, self.b) or self.a_text != self.b_text

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def rel_delta(self) -> float | None:
        d = self.delta
        return None if d is None or not self.a else d / abs(self.a)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "a": _finite(self.a),
            "b": _finite(self.b),
            "delta": _finite(self.delta),
            "rel_delta": _finite(self.rel_delta),
        }
        for key, x, text in (("a_text", self.a, self.a_text), ("b_text", self.b, self.b_text)):
            if text is not None or (x is not None and not math.isfinite(x)):
                out[key] = text if text is not None else str(x)  # "nan", "inf": JSON has none
        return out


def _same(a: float | None, b: float | None) -> bool:
    """Equal values, NaN equal to NaN (an unchanged diverged metric is not a change)."""
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


@dataclass(frozen=True)
class TensorStats:
    """How far B is from A; ``None`` where a ratio is undefined (an all-zero side)."""

    l2: float  # ||a - b||
    rel_change: float | None  # ||a - b|| / ||a||
    cosine: float | None
    max_abs: float  # max |a - b|
    norm_a: float
    norm_b: float

    def to_json(self) -> dict[str, Any]:
        return {k: _finite(getattr(self, k)) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class TensorDiff:
    name: str
    status: str
    a: fmt.TensorEntry | None
    b: fmt.TensorEntry | None
    stats: TensorStats | None = None  # changed tensors with equal shapes, full diff only
    place: Place | None = None  # where it sits in the training state (from state.json)

    @property
    def nbytes(self) -> int:
        """Bytes this tensor accounts for: B's size, or A's when removed."""
        entry = self.b or self.a
        return entry.nbytes if entry else 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "status": self.status,
                               **(self.place or by_name(self.name)).to_json()}
        for side, e in (("a", self.a), ("b", self.b)):
            out[f"dtype_{side}"] = e.dtype if e else None
            out[f"shape_{side}"] = list(e.shape) if e else None
            out[f"bytes_{side}"] = e.nbytes if e else None
        if self.stats is not None:
            out.update(self.stats.to_json())
        return out


@dataclass(frozen=True)
class DiffSummary:
    counts: Mapping[str, int]  # status -> number of tensors
    nbytes: Mapping[str, int]  # status -> tensor bytes
    bytes_read: int  # tensor bytes actually read (0 for --stat)
    params_changed: int | None
    metrics_changed: int

    def to_json(self) -> dict[str, Any]:
        return {
            **self.counts,
            "bytes": dict(self.nbytes),
            "bytes_read": self.bytes_read,
            "params_changed": self.params_changed,
            "metrics_changed": self.metrics_changed,
        }


@dataclass(frozen=True)
class CheckpointDiff:
    a: Endpoint
    b: Endpoint
    stat_only: bool
    params: tuple[ParamChange, ...] | None  # None when either side's params are unknown
    metrics: tuple[MetricDiff, ...]
    tensors: tuple[TensorDiff, ...]  # model tensors first, each component in its saved order
    summary: DiffSummary

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a.to_json(),
            "b": self.b.to_json(),
            "stat": self.stat_only,
            "params": None if self.params is None else {p.key: p.to_json() for p in self.params},
            "metrics": {m.name: m.to_json() for m in self.metrics},
            "tensors": [t.to_json() for t in self.tensors],
            "summary": self.summary.to_json(),
        }


def _finite(x: float | None) -> float | None:
    """JSON has no NaN/Infinity: report those as null."""
    return x if x is None or math.isfinite(x) else None


# --- params and metrics ---------------------------------------------------------------------


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params.yaml content as ``{"train.lr": 0.1, ...}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, dotted))
        else:
            out[dotted] = value
    return out


def diff_params(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[ParamChange, ...]:
    fa, fb = flatten_params(a), flatten_params(b)
    changes = []
    for key in sorted(fa.keys() | fb.keys()):
        if key not in fb:
            changes.append(ParamChange(key, REMOVED, a=fa[key]))
        elif key not in fa:
            changes.append(ParamChange(key, ADDED, b=fb[key]))
        elif fa[key] != fb[key] or type(fa[key]) is not type(fb[key]):
            changes.append(ParamChange(key, CHANGED, a=fa[key], b=fb[key]))
    return tuple(changes)


def diff_metrics(a: Mapping[str, object], b: Mapping[str, object]) -> tuple[MetricDiff, ...]:
    """Manifest metrics are data (anyone may write a manifest): numbers get deltas, any other
    value is shown as text and skipped from the arithmetic."""
    sa, sb = split_values(a, what="A's metrics"), split_values(b, what="B's metrics")
    names = sorted({*sa.numbers, *sa.other, *sb.numbers, *sb.other})
    return tuple(
        MetricDiff(k, sa.numbers.get(k), sb.numbers.get(k), sa.other.get(k), sb.other.get(k))
        for k in names
    )


# --- tensors --------------------------------------------------------------------------------


def _entries(manifest: fmt.Manifest) -> dict[str, fmt.TensorEntry]:
    """Stored tensors plus tied names (aliases), which share their target's bytes."""
    entries = dict(manifest.tensors)
    for alias, target in manifest.aliases.items():
        if target in manifest.tensors:
            entries[alias] = replace(manifest.tensors[target], name=alias)
    return entries


def match_tensors(
    a: fmt.Manifest, b: fmt.Manifest, layout: Mapping[str, Place] | None = None
) -> list[TensorDiff]:
    """Classify every tensor from the manifests alone (no data read), in layout order (B's
    places, then A's; tensors no state.json places come last, by name)."""
    ea, eb = _entries(a), _entries(b)
    places = {n: (layout or {}).get(n) or by_name(n) for n in ea.keys() | eb.keys()}
    out = []
    for name in sorted(places, key=lambda n: (places[n].order, n)):
        ta, tb = ea.get(name), eb.get(name)
        if ta is None:
            status = ADDED
        elif tb is None:
            status = REMOVED
        elif (ta.hash, ta.dtype, ta.shape) == (tb.hash, tb.dtype, tb.shape):
            status = UNCHANGED
        else:
            status = CHANGED
        out.append(TensorDiff(name, status, ta, tb, place=places[name]))
    return out


class _Files:
    """One checkpoint's files, opened once and shared by the workers, mapped range by range.

    A mapping lives as long as the tensors made from it (``torch.frombuffer`` holds it), so
    at most one job's range per worker is mapped at a time: memory stays bounded, and no byte
    is copied before the arithmetic reads it.
    """

    def __init__(self, root: Path, manifest: fmt.Manifest, stack: contextlib.ExitStack) -> None:
        self.root = root
        self.manifest = manifest
        self.stack = stack
        self.files: dict[str, io.BufferedReader] = {}
        self.decoded: dict[str, Any] = {}  # delta files: LogicalFile over the base chain
        self.lock = threading.Lock()

    def map(self, entry: fmt.TensorEntry, start: int, stop: int, dtype: str) -> torch.Tensor:
        """Elements ``[start, stop)`` of a stored tensor, read as ``dtype``."""
        import torch

        size = fmt.DTYPES[dtype][1]
        lo, hi = entry.offsets[0] + start * size, entry.offsets[0] + stop * size
        if entry.file in self.manifest.deltas:  # decoded into a buffer of the range's size
            from modelver.checkpoint.delta import open_logical

            with self.lock:
                lf = self.decoded.get(entry.file)
                if lf is None:
                    lf = open_logical(self.root, self.manifest, entry.file)
                    self.decoded[entry.file] = self.stack.enter_context(lf)
            out = torch.empty(stop - start, dtype=getattr(torch, dtype))
            view = memoryview(out.view(torch.uint8).numpy())  # type: ignore[arg-type]
            if lf.pread_into(lo, view) != hi - lo:
                problem = f"cannot read tensor {entry.name} from {entry.file}: truncated"
                raise CheckpointCorruptedError(self.root, [problem])
            return out
        with self.lock:
            f = self.files.get(entry.file)
            if f is None:
                raw = open(self.root / entry.file, "rb")  # noqa: SIM115 - the stack closes it
                f = self.files[entry.file] = self.stack.enter_context(raw)
        base = lo - lo % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(f.fileno(), hi - base, access=mmap.ACCESS_COPY, offset=base)
        except (ValueError, OSError) as e:  # a range past the end of the file
            problem = f"cannot read tensor {entry.name} from {entry.file}: {e}"
            raise CheckpointCorruptedError(self.root, [problem]) from e
        return torch.frombuffer(
            mapped, dtype=getattr(torch, dtype), offset=lo - base, count=stop - start
        )


@dataclass(frozen=True)
class _Job:
    """Elements ``[start, stop)`` of one changed tensor pair: the unit a worker thread reads."""

    key: tuple[Any, ...]
    a: fmt.TensorEntry
    b: fmt.TensorEntry
    read_a: str  # torch dtype each side is read as (complex64: float32 pairs)
    read_b: str
    work: str  # float32, or float64 for wide dtypes and small tensors
    start: int
    stop: int


def _read_as(root: Path, entry: fmt.TensorEntry) -> tuple[str, int]:
    """(torch dtype to read the bytes as, how many of those make one element)."""
    if entry.dtype not in fmt.DTYPES:
        problem = f"tensor {entry.name} has unknown dtype {entry.dtype}"
        raise CheckpointCorruptedError(root, [problem])
    read_as, per = ("float32", 2) if entry.dtype == "complex64" else (entry.dtype, 1)
    if math.prod(entry.shape) * per * fmt.DTYPES[read_as][1] != entry.nbytes:
        problem = f"tensor {entry.name}: byte range does not match its shape and dtype"
        raise CheckpointCorruptedError(root, [problem])
    return read_as, per


def _jobs(
    a: Path, b: Path, key: tuple[Any, ...], ea: fmt.TensorEntry, eb: fmt.TensorEntry
) -> list[_Job]:
    read_a, per = _read_as(a, ea)
    read_b, _ = _read_as(b, eb)
    total = math.prod(ea.shape) * per
    exact = total <= EXACT_ELEMENTS or ea.dtype in _WIDE or eb.dtype in _WIDE
    work = "float64" if exact else "float32"
    starts = range(0, total, JOB_ELEMENTS)
    return [
        _Job(key, ea, eb, read_a, read_b, work, i, min(i + JOB_ELEMENTS, total)) for i in starts
    ]


def _run_job(
    job: _Job, fa: _Files, fb: _Files, *, chunk_elements: int, on_read: Callable[[int], None]
) -> tuple[float, float, float, float]:
    """(sum (a-b)², sum a², sum b², max |a-b|) over the job's elements, chunk by chunk.

    Each chunk's sums land in one row of a small table (no Python floats per chunk); the
    rows are added in float64 at the end.
    """
    import torch

    work = getattr(torch, job.work)
    src_a = fa.map(job.a, job.start, job.stop, job.read_a)
    src_b = fb.map(job.b, job.start, job.stop, job.read_b)
    n = job.stop - job.start
    chunk = max(1, min(chunk_elements, n))
    diff = torch.empty(chunk, dtype=work)
    wide_a = None if src_a.dtype == work else torch.empty(chunk, dtype=work)
    wide_b = None if src_b.dtype == work else torch.empty(chunk, dtype=work)
    table = torch.zeros(-(-n // chunk), 5, dtype=work)  # sum a², b², (a-b)²; min, max of a-b
    rows = [row.unbind(0) for row in table.unbind(0)]
    nbytes = src_a.element_size() + src_b.element_size()
    for j, i in enumerate(range(0, n, chunk)):
        m = min(chunk, n - i)
        x, y = src_a[i : i + m], src_b[i : i + m]
        if wide_a is not None:
            x = wide_a[:m].copy_(x)  # widened on the copy, no temporary
        if wide_b is not None:
            y = wide_b[:m].copy_(y)
        d = torch.sub(x, y, out=diff[:m])
        row = rows[j]
        torch.dot(x, x, out=row[0])
        torch.dot(y, y, out=row[1])
        torch.dot(d, d, out=row[2])
        torch.aminmax(d, out=(row[3], row[4]))
        on_read(m * nbytes)
    saa, sbb, sdd = (math.fsum(col) for col in table[:, :3].double().T.tolist())
    return sdd, saa, sbb, _max_nan(float(table[:, 4].max()), -float(table[:, 3].min()))


def _max_nan(*values: float) -> float:
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def _finish(parts: list[tuple[float, float, float, float]]) -> TensorStats:
    sdd, saa, sbb = (math.fsum(p[i] for p in parts) for i in range(3))
    max_abs = _max_nan(0.0, *(p[3] for p in parts))
    l2, na, nb = math.sqrt(sdd), math.sqrt(saa), math.sqrt(sbb)
    rel = l2 / na if na > 0 else (0.0 if l2 == 0 else None)
    cosine = None
    if na > 0 and nb > 0:
        # 2a·b = |a|² + |b|² - |a-b|², written so the norms' rounding enters only through
        # (|a| - |b|)², which is at most |a-b|²: 1 - cos stays accurate for tiny changes
        cosine = max(-1.0, min(1.0, 1.0 - (sdd - (na - nb) ** 2) / (2 * na * nb)))
    return TensorStats(l2, rel, cosine, max_abs, na, nb)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Chunk-sized ops gain nothing from intra-op threads and stall when cores are busy;
    the workers here run in parallel instead."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _needs_stats(t: TensorDiff) -> bool:
    return t.status == CHANGED and t.a is not None and t.b is not None and t.a.shape == t.b.shape


def _stat_key(t: TensorDiff) -> tuple[Any, ...]:
    assert t.a is not None and t.b is not None
    return (t.a.hash, t.a.dtype, t.b.hash, t.b.dtype, t.a.shape)


def _compute_stats(
    a: Path,
    b: Path,
    ma: fmt.Manifest,
    mb: fmt.Manifest,
    tensors: list[TensorDiff],
    *,
    chunk_elements: int,
    workers: int,
    progress: Progress | None,
) -> tuple[list[TensorDiff], int]:
    """Fill in stats for changed same-shape tensors; each distinct pair is read once."""
    todo: dict[tuple[Any, ...], tuple[fmt.TensorEntry, fmt.TensorEntry]] = {}
    for t in tensors:
        if _needs_stats(t):
            assert t.a is not None and t.b is not None
            todo.setdefault(_stat_key(t), (t.a, t.b))
    # A's file order, so each worker reads forward through the files
    order = sorted(todo.items(), key=lambda kv: (kv[1][0].file, kv[1][0].offsets))
    jobs = [job for key, (ea, eb) in order for job in _jobs(a, b, key, ea, eb)]
    total = sum(ea.nbytes + eb.nbytes for ea, eb in todo.values())
    lock = threading.Lock()
    done = 0

    def on_read(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            if progress is not None:
                progress(done, total)

    if progress is not None:
        progress(0, total)
    parts: dict[tuple[Any, ...], list[tuple[float, float, float, float]]] = {k: [] for k in todo}
    pending = iter(jobs)

    stop = threading.Event()  # set on the first error (or Ctrl-C): the other workers quit

    def worker() -> None:
        while not stop.is_set():
            with lock:
                job = next(pending, None)
            if job is None:
                return
            try:
                part = _run_job(job, fa, fb, chunk_elements=chunk_elements, on_read=on_read)
            except BaseException:
                stop.set()
                raise
            with lock:
                parts[job.key].append(part)

    n_workers = max(1, min(workers, len(jobs)))
    with contextlib.ExitStack() as stack, _one_torch_thread():
        fa, fb = _Files(a, ma, stack), _Files(b, mb, stack)
        if n_workers == 1:
            worker()
        else:
            with ThreadPoolExecutor(n_workers, thread_name_prefix="modelver-diff") as pool:
                futures = [pool.submit(worker) for _ in range(n_workers)]
                try:
                    for future in futures:
                        future.result()
                finally:
                    stop.set()
    stats = {key: _finish(p) for key, p in parts.items()}
    filled = [replace(t, stats=stats[_stat_key(t)]) if _needs_stats(t) else t for t in tensors]
    return filled, done


def _check_structure(path: Path, manifest: fmt.Manifest) -> None:
    problems = fmt.check_sizes(path, manifest)
    if problems:
        raise CheckpointCorruptedError(path, problems)


def diff_checkpoints(
    a: DiffSide,
    b: DiffSide,
    *,
    stat: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
    workers: int = WORKERS,
    progress: Progress | None = None,
) -> CheckpointDiff:
    """Compare checkpoint B against A; with ``stat`` only the manifests are read."""
    ma, mb = a.read_manifest(), b.read_manifest()
    tensors = match_tensors(ma, mb, {**a.read_layout(ma), **b.read_layout(mb)})
    bytes_read = 0
    if not stat:
        if a.path is None or b.path is None:
            raise ModelverError("a full diff needs both checkpoint directories",
                                hint="use --stat to compare manifests alone")
        _check_structure(a.path, ma)
        _check_structure(b.path, mb)
        tensors, bytes_read = _compute_stats(
            a.path,
            b.path,
            ma,
            mb,
            tensors,
            chunk_elements=chunk_elements,
            workers=workers,
            progress=progress,
        )
    params = None
    if a.params is not None and b.params is not None:
        params = diff_params(a.params, b.params)
    metrics = diff_metrics(ma.metrics, mb.metrics)
    counts = {s: 0 for s in STATUSES}
    nbytes = {s: 0 for s in STATUSES}
    for t in tensors:
        counts[t.status] += 1
        nbytes[t.status] += t.nbytes
    summary = DiffSummary(
        counts=counts,
        nbytes=nbytes,
        bytes_read=bytes_read,
        params_changed=None if params is None else len(params),
        metrics_changed=sum(1 for m in metrics if m.changed),
    )
    return CheckpointDiff(
        a=Endpoint(a.label, a.path, ma.step, a.commit, a.version),
        b=Endpoint(b.label, b.path, mb.step, b.commit, b.version),
        stat_only=stat,
        params=params,
        metrics=metrics,
        tensors=tuple(tensors),
        summary=summary,
    )
