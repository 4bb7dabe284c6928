"""The two sides of a check: a ref (version, stage, commit, directory, ``workspace``) resolved
to a :class:`Side` with its metrics, and for the candidate a local step directory.

Metrics are the checkpoint manifest's plus those of the DVC metrics files (``metrics:`` in
``dvc.yaml``) at the same revision. The baseline needs no data when its version tag carries
the manifest metrics: CI may not have the baseline's checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from modelver.check.report import Side
from modelver.errors import (
    CheckpointCorruptedError,
    MalformedDataError,
    NotARepositoryError,
    UnknownRefError,
)
from modelver.gitrepo import GitRepo
from modelver.materialize import local_step_dir, materialize_step, pin_problems, with_step
from modelver.metrics import MetricSet, merge, metrics_files, read_json_object, split_values
from modelver.refs import ResolvedRef, artifact_at, artifacts_at, open_git, resolve_ref
from modelver.storage import open_storage

Progress = Callable[[int, int], None]
WORKSPACE = "workspace"  # the CANDIDATE/BASELINE word for the working tree's newest checkpoint


def try_git(repo_root: str | Path) -> GitRepo | None:
    """The repository, or None: outside Git a check compares checkpoint directories."""
    try:
        return open_git(repo_root)
    except NotARepositoryError:
        return None


def resolve_side(
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
    st = open_storage(git.root)
    try:
        if candidate:
            step_dir, r, tree = materialize_step(st, r, progress=progress)
            assert r.step_dir is not None
            mine = [f for f in tree if f.relpath.startswith(r.step_dir + "/")]
            lock = pin_problems(step_dir, r.step_dir, mine, full=True, hash_file=st.hash_file)
            manifest = _manifest_metrics(step_dir)
        else:
            step_dir, lock = None, []
            manifest, r = _baseline_manifest_metrics(git, st, r, fmt.MANIFEST)
    finally:
        st.close()
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


def _manifest_metrics(step_dir: Path) -> MetricSet:
    from modelver.checkpoint import format as fmt

    try:
        return split_values(fmt.read_manifest(step_dir).metrics,
                            what=f"{step_dir}/{fmt.MANIFEST}")
    except (CheckpointCorruptedError, MalformedDataError):  # reported by the integrity check
        return MetricSet()


def _baseline_manifest_metrics(
    git: GitRepo, st: Any, r: ResolvedRef, manifest: str
) -> tuple[MetricSet, ResolvedRef]:
    """A version's tag carries its manifest metrics (no data needed: CI may not have the
    baseline's checkpoint); a commit's manifest alone is read from the cache or remote."""
    from modelver import versions as v

    if r.kind == "version" and r.name and r.version:
        found = v.build_registry(git.list_tags()).get(r.name, v.Semver.parse(r.version))
        if found is not None and "metrics" in found.meta:
            return split_values(found.meta["metrics"], what=f"tag {found.tag}"), r
    r, tree = with_step(st, r)
    wanted = f"{r.step_dir}/{manifest}"
    md5 = next((f.oid for f in tree if f.relpath == wanted), None)
    if md5 is None:
        raise CheckpointCorruptedError(f"{r.ref}:{wanted}", ["the baseline has no "
                                       f"{manifest}"])
    data = read_json_object(st, md5, what=f"baseline {r.ref}:{wanted}")
    if not isinstance(data, dict):
        raise MalformedDataError(f"baseline {r.ref}:{wanted}", "manifest", data,
                                 expected="an object")
    return split_values(data.get("metrics"), what=f"baseline {r.ref}:{wanted}"), r
