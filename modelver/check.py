"""Gate a candidate model against a baseline: metric rules, integrity and resumability.

What CI needs before a model is merged or promoted: is it at least as good as production
(``--fail-if`` rules over metrics), are its bytes what the manifest and ``dvc.lock`` say, and
can training continue from it (a restore into the real model, or into buffers rebuilt from the
checkpoint's own shapes). Metrics are the checkpoint manifest's plus those of the DVC metrics
files (``metrics:`` in ``dvc.yaml``) at the same revision. Nothing here prints.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelver.errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    InvalidModelSpecError,
    MalformedDataError,
    ModelverError,
    NotARepositoryError,
    UnknownRefError,
    clip,
)
from modelver.gitrepo import GitRepo
from modelver.metrics import (
    CHECKPOINT_PREFIX,
    MetricSet,
    merge,
    metrics_files,
    read_json_object,
    split_values,
)
from modelver.refs import (
    ResolvedRef,
    artifact_at,
    artifacts_at,
    local_step_dir,
    materialize_step,
    open_dvc,
    open_git,
    pin_problems,
    resolve_ref,
    with_step,
)
from modelver.rules import NonNumeric, Rule, RuleEvaluationError, operand_label

Progress = Callable[[int, int], None]
WORKSPACE = "workspace"  # the CANDIDATE/BASELINE word for the working tree's newest checkpoint


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """One side of the comparison and the metrics found for it."""

    ref: str
    kind: str  # "version" | "commit" | "workspace" | "path"
    label: str
    name: str | None = None
    tag: str | None = None
    commit: str | None = None
    step: int | None = None
    path: str | None = None  # the local checkpoint directory (the candidate's)
    metrics: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # metric -> file it came from
    non_numeric: dict[str, str] = field(default_factory=dict)  # shown, never compared


@dataclass(frozen=True)
class RuleResult:
    rule: str
    status: str  # "pass" | "fail" | "error"
    detail: str  # the operands' values, or why the rule could not be decided
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class MetricRow:
    name: str
    baseline: float | None
    candidate: float | None
    delta: float | None
    rules: tuple[str, ...]
    result: str  # the worst status of its rules, "" when no rule reads it


@dataclass(frozen=True)
class Integrity:
    ok: bool
    problems: list[str]
    files: int
    against_lock: bool  # also compared with the md5s that dvc.lock pins


@dataclass(frozen=True)
class Resumability:
    status: str  # "ok" | "failed" | "skipped"
    mode: str  # "factory" | "shapes" | "none"
    factory: str | None
    restored: list[str]
    not_restored: list[str]
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class CheckReport:
    candidate: Side
    baseline: Side
    rules: list[RuleResult]
    metrics: list[MetricRow]
    integrity: Integrity
    resume: Resumability
    allow_nan: bool = False  # --allow-nan: NaN/inf operands are evaluated, not refused

    @property
    def reason(self) -> str | None:
        """Why the check fails, in one line; None when it passes."""
        if not self.integrity.ok:
            return "candidate checkpoint is corrupted: " + "; ".join(self.integrity.problems[:3])
        if not self.resume.ok:
            return f"candidate cannot be resumed: {self.resume.problem}"
        for r in self.rules:
            if r.status == "fail":
                return f"rule {clip(r.rule)} failed ({_cut(r.detail)})"
        for r in self.rules:
            if r.status == "error":
                return f"rule {clip(r.rule)} cannot be decided: {_cut(r.detail)}"
        return None

    @property
    def passed(self) -> bool:
        return self.reason is None

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``--json``; NaN and infinities become null (JSON has neither), the
        rules' details and the reason still name them."""
        return _json_safe({
            "passed": self.passed, "reason": self.reason,
            "candidate": asdict(self.candidate), "baseline": asdict(self.baseline),
            "rules": [asdict(r) for r in self.rules], "metrics": [asdict(m) for m in self.metrics],
            "integrity": asdict(self.integrity),
            "resume": {**asdict(self.resume), "ok": self.resume.ok},
            "allow_nan": self.allow_nan,
        })


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _cut(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- the check ------------------------------------------------------------------------------


def run_check(
    candidate: str,
    baseline: str,
    *,
    rules: Sequence[Rule],
    factory: Callable[[], Any] | None,
    model: str | None,
    repo_root: str | Path,
    progress: Progress | None,
    allow_nan: bool = False,
) -> CheckReport:
    """Resolve both sides (the baseline first: it needs no data), verify and restore the
    candidate, then decide every rule."""
    git = _try_git(repo_root)
    base, _, _ = _resolve(git, baseline, name_hint=None, candidate=False, repo_root=repo_root,
                       progress=progress)
    cand, step_dir, lock_problems = _resolve(
        git, candidate, name_hint=base.name, candidate=True, repo_root=repo_root,
        progress=progress,
    )
    assert step_dir is not None
    integrity = _integrity(step_dir, lock_problems)
    if not integrity.ok:
        resume = Resumability("skipped", "none", model, [], [], "the checkpoint is corrupted")
    else:
        resume = check_resumable(step_dir, factory=factory, model=model)
    results = [_decide(r, cand, base, allow_nan=allow_nan) for r in rules]
    return CheckReport(cand, base, results, _rows(cand, base, results), integrity, resume,
                       allow_nan=allow_nan)


def _try_git(repo_root: str | Path) -> GitRepo | None:
    try:
        return open_git(repo_root)
    except NotARepositoryError:
        return None


def _resolve(
    git: GitRepo | None,
    ref: str,
    *,
    name_hint: str | None,
    candidate: bool,
    repo_root: str | Path,
    progress: Progress | None,
) -> tuple[Side, Path | None, list[str]]:
    """A side with its metrics; for the candidate also its local step directory and what
    differs from the md5s ``dvc.lock`` pins (versions and commits)."""
    from modelver.checkpoint import format as fmt

    if git is None:  # outside Git only directories make sense
        path = Path(repo_root, ref)
        if "@" in ref or "#" in ref or not path.is_dir():
            raise NotARepositoryError(Path(repo_root).resolve(), "Git")
        return _local_side(ref, "path", path, files={}, label=ref)
    if ref == WORKSPACE:
        art = _workspace_artifact(git, name_hint)
        files = metrics_files(git, None)
        return _local_side(ref, "workspace", git.root / art.path, files=files, label=WORKSPACE,
                           name=art.name)
    r = resolve_ref(git.root, ref, action="cannot check")
    if r.kind == "path":
        assert r.path is not None
        return _local_side(ref, "path", r.path, files={}, label=ref)
    assert r.commit is not None
    files = metrics_files(git, r.commit)
    dvc = open_dvc(git.root)
    try:
        if candidate:
            step_dir, r, tree = materialize_step(dvc, r, progress=progress)
            assert r.step_dir is not None
            mine = [f for f in tree if f.relpath.startswith(r.step_dir + "/")]
            lock = pin_problems(step_dir, r.step_dir, mine, full=True)
            manifest = _manifest_metrics(step_dir)
        else:
            step_dir, lock = None, []
            manifest, r = _baseline_manifest_metrics(git, dvc, r, fmt.MANIFEST)
    finally:
        dvc.close()
    side = _side(r, ref, manifest, files, path=step_dir)
    return side, step_dir, lock


def _local_side(
    ref: str, kind: str, root: Path, *, files: Mapping[str, MetricSet], label: str,
    name: str | None = None,
) -> tuple[Side, Path, list[str]]:
    step_dir = local_step_dir(root)
    manifest = _manifest_metrics(step_dir)
    metrics, sources, other = merge(manifest, files)
    step = _step_of(step_dir)
    side = Side(ref, kind, label, name=name, step=step, path=str(step_dir), metrics=metrics,
                sources=sources, non_numeric=other)
    return side, step_dir, []


def _side(
    r: ResolvedRef, ref: str, manifest: MetricSet,
    files: Mapping[str, MetricSet], *, path: Path | None,
) -> Side:
    metrics, sources, other = merge(manifest, files)
    label = r.tag if r.tag and r.tag == ref else (f"{r.tag} ({ref})" if r.tag else ref)
    return Side(ref, r.kind, label, name=r.name, tag=r.tag, commit=r.commit,
                step=r.step if path is None else _step_of(path),
                path=str(path) if path else None, metrics=metrics, sources=sources,
                non_numeric=other)


def _step_of(step_dir: Path) -> int | None:
    from modelver.checkpoint import format as fmt

    m = fmt.STEP_DIR_RE.match(step_dir.name)
    return int(m.group(1)) if m else None


def _workspace_artifact(git: GitRepo, name_hint: str | None) -> Any:
    if name_hint is not None:
        return artifact_at(git, name_hint, None)
    arts = artifacts_at(git, None)
    if len(arts) != 1:
        raise UnknownRefError(WORKSPACE, hint="dvc.yaml declares several artifacts (or none): "
                              "compare against a version, NAME@vX.Y.Z")
    return next(iter(arts.values()))


# --- metrics --------------------------------------------------------------------------------


def _manifest_metrics(step_dir: Path) -> MetricSet:
    from modelver.checkpoint import format as fmt

    try:
        return split_values(fmt.read_manifest(step_dir).metrics,
                            what=f"{step_dir}/{fmt.MANIFEST}")
    except (CheckpointCorruptedError, MalformedDataError):  # reported by the integrity check
        return MetricSet()


def _baseline_manifest_metrics(
    git: GitRepo, dvc: Any, r: ResolvedRef, manifest: str
) -> tuple[MetricSet, ResolvedRef]:
    """A version's tag carries its manifest metrics (no data needed: CI may not have the
    baseline's checkpoint); a commit's manifest alone is read from the cache or remote."""
    from modelver import versions as v

    if r.kind == "version" and r.name and r.version:
        found = v.build_registry(git.list_tags()).get(r.name, v.Semver.parse(r.version))
        if found is not None and "metrics" in found.meta:
            return split_values(found.meta["metrics"], what=f"tag {found.tag}"), r
    r, tree = with_step(dvc, r)
    wanted = f"{r.step_dir}/{manifest}"
    md5 = next((f.md5 for f in tree if f.relpath == wanted), None)
    if md5 is None:
        raise CheckpointCorruptedError(f"{r.ref}:{wanted}", ["the baseline has no "
                                       f"{manifest}"])
    data = read_json_object(dvc, md5, what=f"baseline {r.ref}:{wanted}")
    if not isinstance(data, dict):
        raise MalformedDataError(f"baseline {r.ref}:{wanted}", "manifest", data,
                                 expected="an object")
    return split_values(data.get("metrics"), what=f"baseline {r.ref}:{wanted}"), r


def _decide(rule: Rule, cand: Side, base: Side, *, allow_nan: bool) -> RuleResult:
    """A rule on both sides' values: numbers, and the non-numeric ones (refused by name)."""
    names = tuple(sorted(rule.metric_names()))
    sides: dict[str, dict[str, object]] = {
        word: {**{k: NonNumeric(v) for k, v in side.non_numeric.items()}, **side.metrics}
        for word, side in (("candidate", cand), ("baseline", base))
    }
    detail = ", ".join(
        f"{operand_label(s, n)}={_value(sides[s][n])}" for s, n in rule.operands if n in sides[s]
    )
    try:
        fired = rule.evaluate(sides["candidate"], sides["baseline"], allow_nan=allow_nan)
    except RuleEvaluationError as e:
        return RuleResult(rule.text, "error", str(e), names)
    return RuleResult(rule.text, "fail" if fired else "pass", detail, names)


def _value(x: object) -> str:
    return format(x, ".6g") if isinstance(x, float) else str(x)


def _rows(cand: Side, base: Side, rules: Sequence[RuleResult]) -> list[MetricRow]:
    """Every bare metric of either side; ``checkpoint.X`` only where a file shadows X, or a
    rule reads it."""
    ruled = {n for r in rules for n in r.metrics}
    shadowed = {k for s in (cand, base) for k, src in s.sources.items()
                if src != "checkpoint" and CHECKPOINT_PREFIX + k in s.metrics}
    names = [
        n for n in dict.fromkeys([*cand.metrics, *base.metrics, *sorted(ruled)])
        if not n.startswith(CHECKPOINT_PREFIX) or n[len(CHECKPOINT_PREFIX):] in shadowed
        or n in ruled
    ]
    order = {"error": 3, "fail": 2, "pass": 1}
    rows = []
    for n in names:
        c, b = cand.metrics.get(n), base.metrics.get(n)
        mine = [r for r in rules if n in r.metrics]
        worst = max((r.status for r in mine), key=order.__getitem__, default="")
        rows.append(MetricRow(n, b, c, c - b if c is not None and b is not None else None,
                              tuple(r.rule for r in mine), worst))
    return rows


# --- integrity and resumability ---------------------------------------------------------------


def _integrity(step_dir: Path, lock_problems: list[str]) -> Integrity:
    from modelver.checkpoint import verify_checkpoint

    try:
        files = len(verify_checkpoint(step_dir).files)
        problems: list[str] = []
    except CheckpointCorruptedError as e:
        files, problems = 0, e.problems
    except CheckpointNotFoundError as e:
        files, problems = 0, [e.message]
    return Integrity(not (problems or lock_problems), problems + lock_problems, files,
                     against_lock=_is_cached_copy(step_dir))


def _is_cached_copy(step_dir: Path) -> bool:
    return ".dvc/tmp/modelver" in step_dir.as_posix()


def load_factory(spec: str, *, root: Path) -> Callable[[], Any]:
    """``MODULE:FACTORY`` (imported with ``root`` on sys.path) or ``file.py:FACTORY``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise InvalidModelSpecError(spec, "expected MODULE:FACTORY")
    try:
        with _on_path(root):
            if module_name.endswith(".py") or "/" in module_name:
                path = Path(module_name) if Path(module_name).is_absolute() else root / module_name
                if not path.is_file():
                    raise InvalidModelSpecError(spec, f"no such file {path}")
                loader = importlib.util.spec_from_file_location(path.stem, path)
                assert loader is not None and loader.loader is not None
                module = importlib.util.module_from_spec(loader)
                with _on_path(path.parent):
                    loader.loader.exec_module(module)
            else:
                module = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidModelSpecError(spec, f"cannot import it ({e})") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InvalidModelSpecError(spec, f"{module_name} has no callable '{attr}'")
    return factory


@contextmanager
def _on_path(directory: Path) -> Iterator[None]:
    entry = str(directory.resolve())
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)


def check_resumable(
    step_dir: Path, *, factory: Callable[[], Any] | None, model: str | None
) -> Resumability:
    """Restore the checkpoint (tensors, state.json, RNG states) as a resumed run would: into
    what ``factory`` builds, or into buffers shaped like the saved tensors. The process's own
    RNG states are put back afterwards."""
    from modelver.checkpoint import format as fmt
    from modelver.checkpoint import restore_checkpoint
    from modelver.checkpoint.reader import read_state_json
    from modelver.checkpoint.state import capture_rng, is_stateful, restore_rng

    manifest = fmt.read_manifest(step_dir)
    saved = sorted(read_state_json(step_dir, manifest)["components"])
    if factory is not None:
        try:
            built = factory()
        except Exception as e:
            raise ModelverError(f"--model {model} raised {type(e).__name__}: {e}",
                                hint="run it in the repository root with the candidate's "
                                "params.yaml") from e
        state = dict(built) if isinstance(built, Mapping) else (
            {"model": built} if is_stateful(built) else None)
        if state is None:
            raise InvalidModelSpecError(str(model), "the factory must return a dict of "
                                        "components or a module")
        mode = "factory"
    else:
        state, mode = _rebuilt_state(step_dir, manifest), "shapes"
    rng = capture_rng()
    try:
        restore_checkpoint(step_dir, state)
    except ModelverError as e:  # a shape mismatch, a hash mismatch found while reading
        return Resumability("failed", mode, model, [], saved, e.message)
    except Exception as e:  # the user's objects refused their state (a sampler, a scheduler)
        return Resumability("failed", mode, model, [], saved, f"{type(e).__name__}: {e}")
    finally:
        restore_rng(rng)
    restored = [c for c in saved if c in state]
    return Resumability("ok", mode, model, restored, [c for c in saved if c not in state], None)


class _Rebuilt:
    """A stand-in for a component: ``state_dict()`` is the saved structure with empty tensors
    of the saved shapes, so the restore reads every tensor into place and checks it."""

    def __init__(self, skeleton: Any, buffers: Mapping[str, Any]) -> None:
        from modelver.checkpoint.state import unflatten

        self._state = unflatten(skeleton, buffers)

    def state_dict(self) -> Any:
        return self._state

    def load_state_dict(self, value: Any) -> None:
        self._state = value


def _rebuilt_state(step_dir: Path, manifest: Any) -> dict[str, Any]:
    import torch

    from modelver.checkpoint.distributed import chunk_names, sharded_index
    from modelver.checkpoint.reader import read_state_json

    meta = read_state_json(step_dir, manifest)
    chunks = chunk_names(meta)
    shapes = {n: (e.shape, e.dtype) for n, e in manifest.tensors.items() if n not in chunks}
    shapes.update(sharded_index(meta))
    buffers = {n: torch.empty(s, dtype=getattr(torch, d)) for n, (s, d) in shapes.items()}
    buffers.update({a: buffers[t] for a, t in meta.get("aliases", {}).items() if t in buffers})
    return {c: _Rebuilt(d["state"], buffers) for c, d in meta["components"].items()}


# --- the pull-request report ----------------------------------------------------------------

_MARK = {"pass": "✅ pass", "fail": "❌ fail", "error": "⚠️ error", "": ""}
_RESUME_MARK = {"ok": "✅", "failed": "❌", "skipped": "⏭️"}


def _num(x: float | None, *, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.6g}" if signed else f"{x:.6g}"


def _where(s: Side) -> str:
    bits = [f"`{s.label}`"]
    if s.commit:
        bits.append(f"commit `{s.commit[:10]}`")
    if s.step is not None:
        bits.append(f"step {s.step}")
    return ", ".join(bits)


def to_markdown(report: CheckReport) -> str:
    """A Markdown report for a pull-request comment: verdict, metric table, checks, rules."""
    verdict = "✅ passed" if report.passed else "❌ failed"
    lines = [
        f"### modelver check: {verdict}",
        "",
        f"Candidate {_where(report.candidate)} vs baseline {_where(report.baseline)}.",
        "",
        "| metric | baseline | candidate | delta | rule | result |",
        "|---|---:|---:|---:|---|---|",
    ]
    for m in report.metrics:
        rules = "<br>".join(f"`{r}`" for r in m.rules)
        lines.append(f"| {_md_escape(m.name)} | {_num(m.baseline)} | {_num(m.candidate)} | "
                     f"{_num(m.delta, signed=True)} | {rules} | {_MARK[m.result]} |")
    if not report.metrics:
        lines.append("| (no metrics) | | | | | |")
    other = non_numeric_summary(report)
    if other:
        lines += ["", f"**Non-numeric metrics (not compared):** {_md_escape(other)}"]
    i, r = report.integrity, report.resume
    lock = " and the md5s `dvc.lock` pins" if i.against_lock else ""
    lines += [
        "",
        "**Integrity:** " + (f"✅ {i.files} files match their manifest hashes{lock}" if i.ok
                             else "❌ " + "; ".join(i.problems[:5])),
        "",
        "**Resumable:** " + _RESUME_MARK[r.status] + " " + resume_summary(r),
    ]
    if report.rules:
        lines += ["", "| rule | result | values |", "|---|---|---|"]
        lines += [f"| `{x.rule}` | {_MARK[x.status]} | {x.detail} |" for x in report.rules]
    lines += ["", f"**Result:** {'passed' if report.passed else report.reason}", ""]
    return "\n".join(lines)


def non_numeric_summary(report: CheckReport) -> str:
    """``candidate: name='text'; baseline: ...`` for metrics whose values are not numbers."""
    parts = []
    for word, side in (("candidate", report.candidate), ("baseline", report.baseline)):
        if side.non_numeric:
            items = sorted(side.non_numeric.items())
            shown = ", ".join(f"{clip(k, 40)[1:-1]}={v}" for k, v in items[:10])
            more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
            parts.append(f"{word}: {shown}{more}")
    return "; ".join(parts)


def _md_escape(text: str) -> str:
    """Untrusted text (metric names come from files) that cannot break a table or a code span."""
    return " ".join(text.split()).replace("|", "\\|").replace("`", "'")


def resume_summary(r: Resumability) -> str:
    """One line on what the restore did, for the report and the terminal."""
    if r.status == "skipped":
        return f"not tried: {r.problem}"
    if r.status == "failed":
        return str(r.problem)
    into = (f"what {r.factory} builds" if r.mode == "factory"
            else "buffers rebuilt from the checkpoint's own shapes (no --model: the "
            "architecture itself was not checked)")
    rest = f"; not restored: {', '.join(r.not_restored)}" if r.not_restored else ""
    return f"restored {', '.join(r.restored)} into {into}{rest}"
