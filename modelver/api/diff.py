"""modelver diff: two checkpoints, versions or the workspace, tensor by tensor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

Progress = Callable[[int, int], None]


# --- diff ----------------------------------------------------------------------------------
# Self-contained: imports what it needs inside the functions.

if TYPE_CHECKING:
    from collections.abc import Mapping

    from modelver.diff import CheckpointDiff, DiffSide, MetricDiff
    from modelver.metrics import MetricSet


def diff(
    a: str,
    b: str | None = None,
    *,
    stat: bool = False,
    repo_root: str | Path = ".",
    progress: Progress | None = None,
) -> CheckpointDiff:
    """Compare B (default: the workspace's newest checkpoint) against A, tensor by tensor.

    A and B are versions, commits, DVC experiments or checkpoint directories; directories
    also work outside a Git repository. Params come from each version's ``params.yaml`` at its
    commit; besides the manifests' metrics, the DVC metrics files of each side's commit (or of
    the workspace) are compared as ``FILE:NAME``.
    """
    from dataclasses import replace

    from modelver.diff import diff_checkpoints

    side_a, name, dvc_a = _diff_side(a, stat=stat, repo_root=repo_root, progress=progress)
    dvc_b: dict[str, MetricSet] | None
    if b is None:
        side_b, dvc_b = _workspace_side(name, repo_root=repo_root)
    else:
        side_b, _, dvc_b = _diff_side(b, stat=stat, repo_root=repo_root, progress=progress)
    result = diff_checkpoints(side_a, side_b, stat=stat, progress=progress)
    extra = _dvc_metric_diffs(dvc_a, dvc_b)
    if not extra:
        return result
    changed = result.summary.metrics_changed + sum(1 for m in extra if m.changed)
    return replace(result, metrics=result.metrics + extra,
                   summary=replace(result.summary, metrics_changed=changed))


def _dvc_metric_diffs(
    a: Mapping[str, MetricSet] | None, b: Mapping[str, MetricSet] | None
) -> tuple[MetricDiff, ...]:
    """The DVC metrics files of both sides, metric by metric, named ``FILE:NAME`` (``dvc
    metrics diff`` shows the file too); a side with no commit or workspace has none."""
    from modelver.diff import MetricDiff

    def flat(files: Mapping[str, MetricSet] | None) -> tuple[dict[str, float], dict[str, str]]:
        numbers: dict[str, float] = {}
        other: dict[str, str] = {}
        for rel, m in (files or {}).items():
            numbers.update({f"{rel}:{k}": x for k, x in m.numbers.items()})
            other.update({f"{rel}:{k}": x for k, x in m.other.items()})
        return numbers, other

    (na, oa), (nb, ob) = flat(a), flat(b)
    names = sorted({*na, *oa, *nb, *ob})
    return tuple(MetricDiff(k, na.get(k), nb.get(k), oa.get(k), ob.get(k)) for k in names)


def _diff_side(
    ref: str, *, stat: bool, repo_root: str | Path, progress: Progress | None
) -> tuple[DiffSide, str | None, dict[str, MetricSet] | None]:
    """The checkpoint REF names, with its params and DVC metrics files when it is a version
    or commit. For ``stat`` a version's manifest alone is read from the DVC cache (or
    fetched; with Git LFS it is a plain Git blob)."""
    from modelver.checkpoint import format as ckfmt
    from modelver.checkpoint.reader import check_state_json
    from modelver.diff import DiffSide
    from modelver.errors import (
        CheckpointCorruptedError,
        CheckpointNotFoundError,
        MalformedDataError,
        ModelverError,
        NotARepositoryError,
        clip,
    )
    from modelver.materialize import local_step_dir, materialize_step, with_step
    from modelver.metrics import metrics_files, read_json_object
    from modelver.refs import open_git, resolve_ref
    from modelver.storage import open_storage
    from modelver.untrusted import mapping

    try:
        r = resolve_ref(repo_root, ref, action="cannot diff")
    except NotARepositoryError:
        if "@" in ref or "#" in ref:  # meant a version: say there is no repository
            raise
        path = Path(repo_root, ref).resolve()  # outside Git only a directory makes sense
        if not path.is_dir():
            raise CheckpointNotFoundError(path, reason="no such directory") from None
        return DiffSide(local_step_dir(path), ref), None, None
    if r.kind == "path":
        assert r.path is not None
        return DiffSide(local_step_dir(r.path), ref), None, None
    assert r.commit is not None
    git = open_git(repo_root)
    params = _params_yaml(git.read_file(r.commit, "params.yaml"),
                          what=f"params.yaml at {r.commit[:10]}")
    dvc_metrics = metrics_files(git, r.commit)
    label = r.tag or ref
    commit, version = r.commit, (r.tag if r.tag != ref else None)
    st = open_storage(git.root)
    try:
        if stat:
            r, files = with_step(st, r)

            def read(member: str) -> tuple[str, Any]:
                wanted = f"{r.step_dir}/{member}"
                md5 = next((f.oid for f in files if f.relpath == wanted), None)
                if md5 is None:
                    raise CheckpointCorruptedError(f"{label}:{wanted}", ["no such file in the "
                                                   "version's checkpoint"])
                return f"{label}:{wanted}", read_json_object(st, md5, what=f"{label}:{wanted}")

            where, data = read(ckfmt.MANIFEST)
            try:
                manifest = ckfmt.Manifest.from_json(data)
            except ModelverError:
                raise
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
                problem = f"unreadable manifest: {type(e).__name__}: {clip(str(e))}"
                raise CheckpointCorruptedError(where, [problem]) from None
            where, state = read(ckfmt.STATE_FILE)
            try:
                check_state_json(mapping(state, what=where, field="content"), manifest)
            except MalformedDataError as e:
                raise CheckpointCorruptedError(where, [e.message]) from None
            side = DiffSide(None, ref, params=params, manifest=manifest, state=state,
                            commit=commit, version=version)
            return side, r.name, dvc_metrics
        path = materialize_step(st, r, progress=progress)[0]
    finally:
        st.close()
    side = DiffSide(path, ref, params=params, commit=commit, version=version)
    return side, r.name, dvc_metrics


def _workspace_side(
    name: str | None, *, repo_root: str | Path
) -> tuple[DiffSide, dict[str, MetricSet]]:
    """The newest checkpoint in the workspace path of artifact ``name`` (or the only one),
    and the workspace's DVC metrics files."""
    from modelver.diff import DiffSide
    from modelver.errors import NotARepositoryError, UnknownRefError
    from modelver.materialize import local_step_dir
    from modelver.metrics import metrics_files
    from modelver.refs import artifact_at, artifacts_at, open_git

    try:
        git = open_git(repo_root)
    except NotARepositoryError as e:
        hint = "outside a Git repository there is no workspace: give B, a checkpoint directory"
        raise UnknownRefError("(workspace)", hint=hint) from e
    if name is None:
        arts = artifacts_at(git, None)
        if len(arts) != 1:
            raise UnknownRefError("(workspace)", hint="give B explicitly: a version or a path")
        art = next(iter(arts.values()))
    else:
        art = artifact_at(git, name, None)
    params_file = git.root / "params.yaml"
    params = _params_yaml(_read_small(params_file), what="params.yaml in the workspace")
    side = DiffSide(local_step_dir(git.root / art.path), "workspace", params=params)
    return side, metrics_files(git, None)


def _read_small(path: Path) -> str | None:
    from modelver.metrics import read_text_file

    return read_text_file(path, what="params.yaml in the workspace")


def _params_yaml(text: str | None, *, what: str) -> dict[str, Any]:
    """params.yaml is data: bounded, parsed safely, and refused (one line) when it cannot be
    parsed or nests too deep (YAML aliases can build cycles) rather than diffed wrongly."""
    from modelver.metrics import load_yaml

    data = load_yaml(text, what=what) if text else None
    return data if isinstance(data, dict) else {}
