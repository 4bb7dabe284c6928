"""Metrics of a model version as DVC sees them: the metrics files ``dvc.yaml`` declares.

Read from Git at a commit (or from the DVC cache when the file is a cached output) without
importing ``dvc``, in the shape ``dvc metrics show`` gives: nested keys joined with '.'.

Metrics files, manifests and tag messages are written by anyone with push access, so every
value goes through :func:`split_values`: numbers (NaN and infinities kept, for the gate to
refuse) are compared; anything else (a string, a bool, a list, null) is kept apart as
*non-numeric*, shown as such and never compared. A file that cannot be read at all (too
large, not JSON/YAML, not UTF-8, a path out of the repository) is one error line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from modelver.errors import MalformedDataError, ModelverError, clip
from modelver.untrusted import MAX_JSON_DEPTH, inside, load_json, relative_path

if TYPE_CHECKING:  # Git and DVC only where files are read: diff imports the value checks
    from modelver.gitrepo import GitRepo
    from modelver.storage.dvc import DvcStorage

CHECKPOINT_PREFIX = "checkpoint."  # manifest metrics are always reachable under this prefix
MAX_METRICS_BYTES = 16 << 20  # a metrics file is a few KiB; a bigger one is not a metrics file
MAX_METRIC_VALUES = 100_000  # leaves of one file (YAML aliases can multiply a small file)
_MD5_RE = re.compile(r"^[0-9a-f]{32,128}$")  # md5 (DVC), sha1 (Git), sha256 (LFS)


@dataclass(frozen=True)
class MetricSet:
    """One source's metrics: the numbers, and the values that are not numbers (shown as text,
    never compared)."""

    numbers: dict[str, float] = field(default_factory=dict)
    other: dict[str, str] = field(default_factory=dict)  # name -> a short repr of the value


def describe(value: object) -> str:
    """A non-numeric metric value as a short text: ``'high'``, ``True``, ``null``, ``[...]``."""
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return f"[{len(value)} items]"
    if isinstance(value, Mapping):
        return f"{{{len(value)} keys}}"
    return clip(value, 40)


def number(value: object) -> float | None:
    """``value`` as a float when it is a real number (not a bool, not past float range)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an int of hundreds of digits
        return None


def split_values(raw: object, *, what: str) -> MetricSet:
    """A flat ``{name: value}`` (a manifest's or a tag's metrics) as numbers and the rest."""
    if raw is None:
        return MetricSet()
    if not isinstance(raw, Mapping):
        raise MalformedDataError(what, "metrics", raw, expected="an object of name: number")
    numbers: dict[str, float] = {}
    other: dict[str, str] = {}
    for key, value in list(raw.items())[:MAX_METRIC_VALUES]:
        name = str(key)
        x = number(value)
        if x is None:
            other[name] = describe(value)
        else:
            numbers[name] = x
    return MetricSet(numbers, other)


def metrics_paths(dvc_yaml: str | None) -> list[str]:
    """Metrics files that ``dvc.yaml`` declares: stages' ``metrics:`` and the top-level list."""
    data = _safe_yaml(dvc_yaml) if dvc_yaml else None
    if not isinstance(data, dict):
        return []
    top = data.get("metrics")
    entries: list[Any] = list(top) if isinstance(top, list) else []
    stages = data.get("stages")
    for stage in (stages.values() if isinstance(stages, dict) else ()):
        if isinstance(stage, dict) and isinstance(stage.get("metrics"), list):
            entries += list(stage["metrics"])
    paths = []
    for e in entries:
        if isinstance(e, str):
            paths.append(e)
        elif isinstance(e, dict):
            paths += [str(k) for k in e]
    return list(dict.fromkeys(paths))


def _safe_yaml(text: str) -> Any:
    """``yaml.safe_load`` that never raises: None for anything it cannot parse."""
    if len(text) > MAX_METRICS_BYTES:
        return None
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, MemoryError, ValueError):
        return None


def metrics_files(git: GitRepo, commit: str | None) -> dict[str, MetricSet]:
    """path -> flattened metrics, as ``dvc metrics show`` reads them at ``commit`` (None: the
    workspace). A file DVC caches instead of Git is read from the DVC cache (fetched if
    needed). Paths come from ``dvc.yaml`` and must stay inside the repository."""
    if commit is not None:
        found = metrics_at(git, [commit])[commit]
        if found.problem is not None:
            raise found.problem
        return found.files
    dvc_yaml = read_text_file(git.root / "dvc.yaml", what="dvc.yaml in the workspace")
    files: dict[str, MetricSet] = {}
    for rel in metrics_paths(dvc_yaml):
        what = f"metrics file {clip(rel, 60)} (the workspace)"
        text = read_text_file(inside(git.root, rel, field="dvc.yaml metrics path"), what=what)
        if text is not None:
            files[rel] = read_metrics(rel, text, what=what)
    return files


@dataclass(frozen=True)
class CommitMetrics:
    """The DVC metrics files of one commit; ``problem`` is the first file that could not be
    read (the others are kept), so one crafted commit does not hide every other version's."""

    files: dict[str, MetricSet] = field(default_factory=dict)
    problem: ModelverError | None = None


def metrics_at(
    git: GitRepo, commits: Sequence[str], *, fetch: bool = True
) -> dict[str, CommitMetrics]:
    """:func:`metrics_files` of many commits in at most three ``git cat-file --batch`` calls
    (``dvc.yaml``s, metrics files, and ``dvc.lock``s where DVC caches a file). A cached file
    is read from the DVC cache, fetched from the remote only with ``fetch``."""
    from modelver.storage.dvcfile import find_locked_out

    commits = list(dict.fromkeys(commits))
    yamls = git.read_blobs([f"{c}:dvc.yaml" for c in commits], max_bytes=MAX_METRICS_BYTES)
    problems: dict[str, ModelverError] = {}
    wanted: list[tuple[str, str]] = []  # (commit, metrics path)
    declared: dict[bytes | None, list[str]] = {}  # most commits share one dvc.yaml: parse once
    for c, raw in zip(commits, yamls, strict=True):
        if raw not in declared:
            declared[raw] = metrics_paths(None if raw is None else raw.decode(errors="replace"))
        for rel in declared[raw]:
            try:
                relative_path(rel, field="dvc.yaml metrics path", root=git.root)
            except ModelverError as e:
                problems.setdefault(c, e)
                continue
            wanted.append((c, rel))
    texts = git.read_blobs([f"{c}:{rel}" for c, rel in wanted], max_bytes=MAX_METRICS_BYTES)
    cached = sorted({c for (c, _), raw in zip(wanted, texts, strict=True) if raw is None})
    locks = dict(zip(cached, git.read_blobs([f"{c}:dvc.lock" for c in cached],
                                            max_bytes=MAX_METRICS_BYTES), strict=True))
    files: dict[str, dict[str, MetricSet]] = {c: {} for c in commits}
    cache = _Cache(git, fetch=fetch)
    try:
        for (c, rel), raw in zip(wanted, texts, strict=True):
            what = f"metrics file {clip(rel, 60)} ({c[:10]})"
            try:
                if raw is not None:
                    text: str | None = _decode(raw, what=what)
                else:
                    lock = locks[c]
                    out = find_locked_out(None if lock is None else
                                          lock.decode(errors="replace"), rel)
                    text = None if out is None else cache.text(out.md5, what=what)
                if text is not None:
                    files[c][rel] = read_metrics(rel, text, what=what)
            except ModelverError as e:
                problems.setdefault(c, e)
    finally:
        cache.close()
    return {c: CommitMetrics(files[c], problems.get(c)) for c in commits}


def read_text_file(path: Path, *, what: str) -> str | None:
    """A small text file (metrics, params), None when absent; bounded before it is read."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_METRICS_BYTES + 1)
    except OSError as e:
        raise ModelverError(f"cannot read {what}: {e.strerror or e}",
                            hint="check the file's permissions") from e
    return _decode(data, what=what)


def _decode(data: bytes, *, what: str) -> str:
    if len(data) > MAX_METRICS_BYTES:
        raise MalformedDataError(what, "size", f"over {MAX_METRICS_BYTES} bytes",
                                 expected="a metrics file of JSON or YAML")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedDataError(what, "content", f"byte {e.start} is not UTF-8",
                                 expected="UTF-8 text") from None


class _Cache:
    """Metrics files DVC caches (``cache: true``, the default), read from the DVC cache; the
    DVC repository is opened once, and only when a commit has such a file."""

    def __init__(self, git: GitRepo, *, fetch: bool) -> None:
        self._git, self._fetch = git, fetch
        self._dvc: DvcStorage | None = None

    def text(self, md5: object, *, what: str) -> str | None:
        """The md5 comes from ``dvc.lock`` and names a cache path, so it must be an md5."""
        if not isinstance(md5, str) or not _MD5_RE.match(md5):
            raise MalformedDataError(f"dvc.lock entry of {what}", "md5", md5,
                                     expected="a hex object hash")
        if self._dvc is None:
            from modelver.storage.dvc import DvcStorage  # DVC caches it: dvc.lock names it

            self._dvc = DvcStorage(self._git.root)
        try:
            if self._fetch:
                self._dvc.fetch([md5])
            elif self._dvc.missing_in_cache([md5]):
                return None
            path = self._dvc.object_path(md5)
        except (ModelverError, OSError):
            return None
        return read_text_file(path, what=what)

    def close(self) -> None:
        if self._dvc is not None:
            self._dvc.close()


def read_metrics(path: str, text: str, *, what: str | None = None) -> MetricSet:
    """A JSON or YAML metrics file, nested keys joined with '.' (as DVC does); non-numeric
    leaves are kept apart. A file that does not parse is a :class:`MalformedDataError`."""
    what = what or f"metrics file {clip(path, 60)}"
    if path.endswith(".json"):
        data = load_json(text, what=what, max_bytes=MAX_METRICS_BYTES)
    else:
        data = load_yaml(text, what=what)
    return _flatten(data, what=what)


def load_yaml(text: str, *, what: str) -> Any:
    """``yaml.safe_load`` of untrusted text: bounded size, and nesting and node count checked
    (aliases can build cycles and exponential trees that recursive readers would follow)."""
    if len(text) > MAX_METRICS_BYTES:
        raise MalformedDataError(what, "size", len(text),
                                 expected=f"at most {MAX_METRICS_BYTES} bytes")
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, MemoryError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MalformedDataError(what, "content", reason, expected="valid YAML") from None
    todo: list[tuple[Any, int]] = [(data, 1)]
    seen = 0
    while todo:
        value, depth = todo.pop()
        seen += 1
        if seen > MAX_METRIC_VALUES or depth > MAX_JSON_DEPTH:
            raise MalformedDataError(what, "content", "too many or too deeply nested values",
                                     expected=f"at most {MAX_METRIC_VALUES} values, "
                                     f"{MAX_JSON_DEPTH} levels")
        if isinstance(value, Mapping):
            todo.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            todo.extend((v, depth + 1) for v in value)
    return data


def _flatten(data: Any, *, what: str) -> MetricSet:
    """Leaves of nested mappings, without recursion and with a bound on depth and count."""
    numbers: dict[str, float] = {}
    other: dict[str, str] = {}
    if not isinstance(data, Mapping):
        return MetricSet()  # a bare number or list names no metric (DVC shows none either)
    todo: list[tuple[str, Any, int]] = [("", data, 0)]
    seen = 0
    while todo:
        prefix, value, depth = todo.pop()
        seen += 1
        if seen > MAX_METRIC_VALUES or depth > MAX_JSON_DEPTH:
            raise MalformedDataError(what, "content", "too many or too deeply nested values",
                                     expected=f"at most {MAX_METRIC_VALUES} values")
        if isinstance(value, Mapping):
            items = list(value.items())
            todo.extend((f"{prefix}.{k}" if prefix else str(k), v, depth + 1)
                        for k, v in reversed(items))
            continue
        x = number(value)
        if x is None:
            other[prefix] = describe(value)
        else:
            numbers[prefix] = x
    return MetricSet(numbers, other)


def parse_metrics(path: str, text: str) -> dict[str, float]:
    """The numbers of a metrics file (non-numeric values left out); see :func:`read_metrics`."""
    return read_metrics(path, text).numbers


def merge(
    manifest: MetricSet, files: Mapping[str, MetricSet]
) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    """(numbers, source of each name, non-numeric values). Metrics files win a bare name
    (evaluation beats the training loss of the same name); the manifest's metrics are also
    ``checkpoint.NAME``. A non-numeric value shadows like a number does, so a rule on it says
    "not a number" instead of silently reading another source's value."""
    metrics: dict[str, float] = {}
    other: dict[str, str] = {}
    sources: dict[str, str] = {}

    def put(name: str, source: str, values: MetricSet, key: str) -> None:
        if key in values.numbers:
            metrics[name] = values.numbers[key]
        else:
            other[name] = values.other[key]
        sources[name] = source

    for rel, values in files.items():
        for k in [*values.numbers, *values.other]:
            if k not in sources:
                put(k, rel, values, k)
    for k in [*manifest.numbers, *manifest.other]:
        put(CHECKPOINT_PREFIX + k, "checkpoint", manifest, k)
        if k not in sources:
            put(k, "checkpoint", manifest, k)
    return metrics, sources, other


MAX_OBJECT_JSON_BYTES = 64 << 20  # a manifest read for its metrics or a --stat diff


def read_json_object(dvc: Any, md5: object, *, what: str) -> Any:
    """A JSON object of the DVC cache (a manifest), fetched if needed; size, nesting and
    parse errors are one :class:`MalformedDataError` line, a bad md5 never names a path."""
    if not isinstance(md5, str) or not _MD5_RE.match(md5):
        raise MalformedDataError(what, "md5", md5, expected="a hex object hash")
    dvc.fetch([md5])
    path = dvc.object_path(md5)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_OBJECT_JSON_BYTES + 1)
    except OSError as e:
        raise ModelverError(f"cannot read {what}: {e.strerror or e}",
                            hint="fetch it again ('modelver pull')") from e
    return load_json(data, what=what, max_bytes=MAX_OBJECT_JSON_BYTES)
