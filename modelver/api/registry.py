"""Versions: init, tag, promote, list and show."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelver import untrusted
from modelver import versions as v
from modelver.errors import (
    ArtifactNotFoundError,
    DataMissingError,
    DirtyWorkspaceError,
    MalformedDataError,
    ModelverError,
    RemoteError,
    UnknownRefError,
    VersionExistsError,
)
from modelver.gitrepo import GitRepo
from modelver.refs import (
    ResolvedRef,
    artifact_at,
    artifacts_at,
    checked_output,
    load_registry,
    locked_out,
    newest_step_dir,
    open_dvc,
    open_git,
    open_storage,
    pinned_hash,
    read_object_json,
    resolve_ref,
    tree,
    with_step,
)
from modelver.storage import backend_of

if TYPE_CHECKING:
    from modelver.dvcrepo import Artifact, TreeFile
    from modelver.storage import Storage

Progress = Callable[[int, int], None]


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    tag: str
    commit: str
    date: str
    step: int | None
    metrics: dict[str, float]
    stages: list[str]
    checkpoint_hash: str | None
    parent: str | None
    message: str
    invalid: str | None = None  # why the tag's metadata was refused; the tag is unusable

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int | None
    md5: str


@dataclass(frozen=True)
class VersionDetails:
    info: VersionInfo
    path: str
    step_dir: str | None
    params: dict[str, Any]
    files: list[FileInfo]
    in_cache: bool
    in_remote: bool | None  # None: no remote configured or unreachable

    def to_json(self) -> dict[str, Any]:
        d = self.info.to_json()
        d.update(
            path=self.path,
            step_dir=self.step_dir,
            params=self.params,
            files=[asdict(f) for f in self.files],
            in_cache=self.in_cache,
            in_remote=self.in_remote,
        )
        return d


@dataclass(frozen=True)
class InitResult:
    root: Path
    dvc_initialized: bool
    remote_url: str
    remote_is_new: bool
    cache_type: str
    backend: str = "dvc"
    lfs_patterns: list[str] = field(default_factory=list)  # .gitattributes lines added
    config_written: bool = False  # modelver.yaml


@dataclass(frozen=True)
class TagResult:
    tag: str
    name: str
    version: str
    commit: str
    step: int
    metrics: dict[str, float]
    checkpoint_hash: str
    parent: str | None


@dataclass(frozen=True)
class PromoteResult:
    tag: str | None  # None when the version already was in that stage
    name: str
    version: str
    stage: str


@dataclass(frozen=True)
class CheckoutResult:
    ref: ResolvedRef
    path: Path  # the materialised checkpoint (step) directory
    step: int
    verified: tuple[str, ...] = ()  # the step directories checked before they were put there


@dataclass(frozen=True)
class ResumeResult:
    ref: ResolvedRef
    branch: str
    workdir: Path
    step: int
    overrides: dict[str, Any]
    reproduced: bool


@dataclass(frozen=True)
class TransferResult:
    refs: list[str]
    objects: int  # objects copied
    tags: list[str] = field(default_factory=list)  # tags sent to / fetched from the Git remote


def _info(ver: v.VersionTag) -> VersionInfo:
    return VersionInfo(
        name=ver.name,
        version=str(ver.version),
        tag=ver.tag,
        commit=ver.commit,
        date=ver.date,
        step=ver.step,
        metrics=ver.metrics,
        stages=list(ver.stages),
        checkpoint_hash=ver.meta.get("checkpoint"),
        parent=ver.meta.get("parent"),
        message=ver.message,
        invalid=ver.invalid,
    )


# --- init, tag, promote ----------------------------------------------------------------------


def default_remote_dir(root: Path) -> Path:
    """The embedded default remote: a directory outside the repository, per repository."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha1(str(root.resolve()).encode(), usedforsecurity=False).hexdigest()[:8]
    return base / "modelver" / "remotes" / f"{root.name}-{digest}"


def init(
    path: str | Path = ".",
    *,
    remote: str | None = None,
    backend: str = "dvc",
    artifact: tuple[str, str] = ("model", "checkpoints"),
) -> InitResult:
    """Make a Git repository ready for modelver: DVC, a default remote, a linking cache; or,
    with ``backend="lfs"``, Git LFS for the artifacts' paths (declared in modelver.yaml unless
    dvc.yaml declares artifacts) and 'origin' as the remote."""
    from modelver.dvcrepo import CACHE_TYPES, init_dvc

    git = open_git(path)
    if backend == "lfs":
        return _init_lfs(git, remote=remote, artifact=artifact)
    created = init_dvc(git.root)
    dvc = open_dvc(git.root)
    try:
        current = dvc.default_remote()
        if remote is not None:
            url, is_new = remote, current is None or current[1] != remote
        elif current is not None:
            url, is_new = current[1], False
        else:
            url, is_new = str(default_remote_dir(git.root)), True
            Path(url).mkdir(parents=True, exist_ok=True)
        dvc.configure(remote_url=url if is_new else None, local=remote is None)
    finally:
        dvc.close()
    return InitResult(git.root, created, url, is_new, CACHE_TYPES)


def _init_lfs(git: GitRepo, *, remote: str | None, artifact: tuple[str, str]) -> InitResult:
    from modelver.lfsrepo import init_lfs
    from modelver.storage import CONFIG, read_config, write_config

    if remote is not None:
        raise ModelverError(
            "--remote is for DVC: with Git LFS the remote is the Git remote 'origin'",
            hint="git remote add origin URL",
        )
    cfg = git.root / CONFIG
    if read_config(cfg.read_text() if cfg.is_file() else None).get("backend", "lfs") != "lfs":
        raise DirtyWorkspaceError(f"{CONFIG} says another backend", hint=f"edit {CONFIG}")
    v.check_name(artifact[0], "artifact name")
    declared = artifacts_at(git, None)
    written = write_config(
        git.root, backend="lfs", artifacts={} if declared else {artifact[0]: artifact[1]}
    )
    arts = artifacts_at(git, None)
    added = init_lfs(git.root, sorted({a.path for a in arts.values()}))
    return InitResult(git.root, False, "origin", False, "copy", "lfs", added, written)


def tag(
    ref: str,
    *,
    rev: str = "HEAD",
    bump: str | None = None,
    message: str | None = None,
    repo_root: str | Path = ".",
) -> TagResult:
    """Register ``NAME@vX.Y.Z`` (or NAME with ``bump``) at REV, after checking what it pins.

    Everything the tag will say is read and checked first (the checkpoint's manifest, its
    metrics, the metadata as :func:`modelver.versions.parse_meta` will read it back): a
    refusal leaves no tag behind."""
    from modelver.checkpoint import format as fmt

    git = open_git(repo_root)
    registry = load_registry(git)
    if bump is not None:
        name = v.check_name(ref, "artifact name")
        latest = registry.latest(name)
        version = latest.version.bump(bump) if latest else v.Semver(0, 0, 0).bump(bump)
    else:
        name, version = v.parse_version_ref(ref)
    tag_name = v.version_tag(name, version)
    commit = git.resolve_commit(rev)
    art = artifact_at(git, name, commit)
    path = checked_output(git, art.path, commit=commit, field=f"artifact {name} path")
    lfs = backend_of(git.root) == "lfs"
    checkpoint = pinned_hash(git, art, commit, action="cannot tag")
    stage = None if lfs else locked_out(git, art, commit, action="cannot tag").stage
    existing = registry.of(name)
    if git.tag_exists(tag_name) or registry.get(name, version):
        raise VersionExistsError(tag_name)
    same_commit = [x.tag for x in existing if x.commit == commit]
    if same_commit:  # GTO refuses two versions of one artifact on one commit
        raise VersionExistsError(
            tag_name, reason=f"cannot share commit {commit[:10]} with {same_commit[0]}"
        )
    if existing and existing[-1].version >= version:
        raise VersionExistsError(tag_name, reason=f"is not above the latest {existing[-1].tag}")
    if commit == git.head_commit():
        _check_workspace_matches(git, art, lfs=lfs)
    where = f"{path} at {commit[:10]}"
    dvc = open_storage(git.root)
    try:
        files = tree(dvc, checkpoint, what=f"checkpoint of {where}")
        step_dir, step = newest_step_dir(files, where)
        manifest_md5 = next(f.md5 for f in files if f.relpath == f"{step_dir}/{fmt.MANIFEST}")
        what = f"manifest of {step_dir} ({where})"
        raw = read_object_json(dvc, manifest_md5, what=what)
    finally:
        dvc.close()
    try:
        manifest = fmt.Manifest.from_json(raw, where=step_dir)
    except (KeyError, TypeError, AttributeError) as e:  # a reader that missed a check
        raise MalformedDataError(what, "content", str(e), expected="a modelver manifest") from e
    if manifest.step != step:
        raise MalformedDataError(what, "step", manifest.step, expected=f"{step} (its directory)")
    metrics = untrusted.metrics(manifest.metrics, what=what)
    parent = str(existing[-1].version) if existing else None
    meta: dict[str, Any] = {
        "modelver": 1,
        "step": step,
        "step_dir": step_dir,
        "metrics": metrics,
        "checkpoint": checkpoint,
        "path": path,
        "stage": stage,
        "parent": parent,
    }
    if lfs:
        meta["backend"] = "lfs"  # checkpoint: the Git tree hash of the path
    summary = message or f"Registering artifact {name} version {version}"
    text = v.format_message(summary, meta)
    problem = v.read_tag_meta(text, tag=tag_name, root=git.root)[2]
    if problem is not None:  # what list and show will read back must pass, or no tag is made
        raise problem
    git.create_tag(tag_name, commit, text)
    return TagResult(tag_name, name, str(version), commit, step, metrics, checkpoint, parent)


def _check_workspace_matches(git: GitRepo, art: Artifact, *, lfs: bool) -> None:
    if lfs:
        if git.is_modified(art.path):
            raise DirtyWorkspaceError(
                f"'{art.path}' has uncommitted changes",
                hint=f"git add {art.path} && git commit, then tag the new commit",
            )
        return
    if git.is_modified("dvc.lock"):
        raise DirtyWorkspaceError(
            "dvc.lock has uncommitted changes", hint="commit dvc.lock, then tag the new commit"
        )
    dvc = open_dvc(git.root)
    try:
        status = dvc.output_status(art.path)
    finally:
        dvc.close()
    if status not in (None, "deleted"):
        raise DirtyWorkspaceError(
            f"workspace '{art.path}' differs from what dvc.lock pins ({status})",
            hint="run 'dvc commit' (or 'dvc repro'), commit dvc.lock, then tag",
        )


def promote(ref: str, stage: str, *, repo_root: str | Path = ".") -> PromoteResult:
    """Assign a version to a stage with a GTO ``NAME#STAGE#N`` tag."""
    v.check_name(stage, "stage name")
    git = open_git(repo_root)
    r = resolve_ref(git.root, ref, action="cannot promote")
    if r.kind != "version" or r.name is None or r.version is None or r.commit is None:
        raise UnknownRefError(ref, hint="promote takes a version: NAME@vX.Y.Z")
    registry = load_registry(git)
    current = registry.in_stage(r.name, stage)
    if current is not None and str(current.version) == r.version:
        return PromoteResult(None, r.name, r.version, stage)
    tag_name = v.stage_tag(r.name, stage, registry.stage_counters.get(r.name, 0) + 1)
    summary = f"Assigning stage {stage} to artifact {r.name} version {r.version}"
    git.create_tag(tag_name, r.commit, v.format_message(summary, {"version": r.version}))
    return PromoteResult(tag_name, r.name, r.version, stage)


# --- list, show ------------------------------------------------------------------------------


def list_versions(name: str | None = None, *, repo_root: str | Path = ".") -> list[VersionInfo]:
    """Every version (of ``name``), oldest first; one ``git for-each-ref`` call."""
    git = open_git(repo_root)
    registry = load_registry(git)
    if name is not None:
        v.check_name(name, "artifact name")
        found = registry.of(name)
        if not found and name not in artifacts_at(git, None):
            raise ArtifactNotFoundError(name, known=sorted(artifacts_at(git, None)))
        return [_info(x) for x in found]
    return [_info(x) for x in registry.versions]


def show(ref: str, *, repo_root: str | Path = ".", check_remote: bool = True) -> VersionDetails:
    """One version with its params, files and where its data is."""
    from modelver.dvcrepo import DvcRepo, find_locked_out

    git = open_git(repo_root)
    r = resolve_ref(git.root, ref, action="cannot show")
    if r.kind != "version" or r.name is None or r.version is None or r.commit is None:
        raise UnknownRefError(ref, hint="show takes a version: NAME, NAME@vX.Y.Z or NAME#STAGE")
    ver = load_registry(git).get(r.name, v.Semver.parse(r.version))
    assert ver is not None and r.checkpoint_hash is not None and r.path_in_repo is not None
    lfs = backend_of(git.root) == "lfs"
    out = None if lfs else find_locked_out(git.read_file(r.commit, "dvc.lock"), r.path_in_repo)
    dvc = open_storage(git.root)
    try:
        try:
            r, files = with_step(dvc, r)
        except (DataMissingError, RemoteError):
            files = []
        assert r.checkpoint_hash is not None and r.path_in_repo is not None
        prefix = f"{r.step_dir}/"
        mine = [f for f in files if f.relpath.startswith(prefix)]
        hashes = [r.checkpoint_hash] + [f.md5 for f in mine]
        in_cache = not dvc.missing_in_cache(hashes)
        sizes = _sizes(dvc, [f for f in mine if f.relpath == prefix + "MANIFEST.json"])
        in_remote: bool | None = None  # Git LFS: not asked (no cheap query of 'origin')
        if check_remote and isinstance(dvc, DvcRepo) and dvc.default_remote() is not None:
            try:
                in_remote = not dvc.missing_in_remote(hashes)
            except RemoteError:
                in_remote = None
    finally:
        dvc.close()
    return VersionDetails(
        info=_info(ver),
        path=r.path_in_repo,
        step_dir=r.step_dir,
        params=dict(out.params) if out else _params_at(git, ver.commit) if lfs else {},
        files=[
            FileInfo(f.relpath[len(prefix) :], sizes.get(f.relpath[len(prefix) :], f.size), f.md5)
            for f in mine
        ],
        in_cache=in_cache,
        in_remote=in_remote,
    )


def _params_at(git: GitRepo, commit: str) -> dict[str, Any]:
    """Git LFS has no dvc.lock: the params are params.yaml at the version's commit."""
    import yaml

    text = git.read_file(commit, "params.yaml")
    data = yaml.safe_load(text) if text else None
    return {"params.yaml": data} if isinstance(data, dict) else {}


def _sizes(dvc: Storage, manifest: Sequence[TreeFile]) -> dict[str, int]:
    """File sizes from the version's manifest when it is in the cache (DVC's listing has none)."""
    if not manifest or dvc.missing_in_cache([manifest[0].md5]):
        return {}
    path = dvc.object_path(manifest[0].md5)
    try:
        files = untrusted.load_json(path.read_bytes(), what="manifest")["files"]
        sizes = {str(k): int(e["size"]) for k, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, OSError):  # sizes are optional
        return {}
    sizes["MANIFEST.json"] = path.stat().st_size
    return sizes
