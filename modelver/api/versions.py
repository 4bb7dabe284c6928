"""Versions: init, tag, promote, deprecate, unassign, list and show."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelver import untrusted
from modelver import versions as v
from modelver.errors import (
    ArtifactNotFoundError,
    DataMissingError,
    MalformedDataError,
    ModelverError,
    RegistryStateError,
    RemoteError,
    UnknownRefError,
    VersionExistsError,
)
from modelver.materialize import newest_step_dir, read_object_json, tree, with_step
from modelver.metrics import CommitMetrics, metrics_at
from modelver.refs import (
    ResolvedRef,
    artifact_at,
    artifacts_at,
    checked_output,
    load_registry,
    open_git,
    pinned,
    resolve_ref,
    version_ref,
)
from modelver.storage import Storage, TreeFile, open_storage
from modelver.storage import backend as storage_backend

if TYPE_CHECKING:
    from modelver.gitrepo import GitRepo

Progress = Callable[[int, int], None]


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionInfo:
    """A version, or (``version`` and ``tag`` None) an untagged commit or experiment shown."""

    name: str
    version: str | None
    tag: str | None
    commit: str
    date: str
    step: int | None
    metrics: dict[str, float]  # the checkpoint manifest's
    stages: list[str]
    checkpoint_hash: str | None
    parent: str | None
    message: str
    invalid: str | None = None  # why the tag's metadata was refused; the tag is unusable
    # the DVC metrics files at the commit, path -> {name: value} (None: not read)
    dvc_metrics: dict[str, dict[str, float | str]] | None = None
    dvc_metrics_error: str | None = None  # the file that could not be read, and why
    deprecated: str | None = None  # the tag that deprecated the version or its artifact

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

    @property
    def run(self) -> str | None:
        """The run of the checkpoint (``run-<id>/step-N``), None without runs."""
        m = untrusted.CHECKPOINT_SUBDIR_RE.match(self.step_dir or "")
        return m.group(1) if m else None

    def to_json(self) -> dict[str, Any]:
        d = self.info.to_json()
        d.update(
            path=self.path,
            step_dir=self.step_dir,
            run=self.run,
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
    notes: tuple[str, ...] = ()  # what was done and what to do next, one line each


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
class DeprecateResult:
    tag: str
    name: str
    version: str | None  # None: the whole artifact
    commit: str


@dataclass(frozen=True)
class UnassignResult:
    tag: str
    name: str
    version: str
    stage: str
    current: str | None  # the stage's version now (an older assignment still in effect), or None


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


def _dvc_metrics(found: CommitMetrics | None) -> dict[str, Any]:
    """VersionInfo's DVC metrics fields from what :func:`metrics_at` read at its commit."""
    if found is None:
        return {}
    files = {rel: {**m.numbers, **m.other} for rel, m in found.files.items()}
    return {"dvc_metrics": files,
            "dvc_metrics_error": None if found.problem is None else str(found.problem)}


def _info(ver: v.VersionTag, dvc: CommitMetrics | None = None) -> VersionInfo:
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
        deprecated=ver.deprecated,
        **_dvc_metrics(dvc),
    )


# --- init, tag, promote ----------------------------------------------------------------------


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
    git = open_git(path)
    chosen = storage_backend(name=backend)
    done = chosen.setup(
        git.root, remote=remote, artifact=artifact, declared=lambda: artifacts_at(git, None)
    )
    return InitResult(
        git.root, done.created, done.remote, done.remote_is_new, done.link_types, chosen.kind,
        done.lfs_patterns, done.config_written, done.notes,
    )


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
    if bump is not None:  # above every version, deprecated ones too: a tag name is never reused
        name = v.check_name(ref, "artifact name")
        ever = registry.of(name, deprecated=True)
        version = (ever[-1].version if ever else v.Semver(0, 0, 0)).bump(bump)
    else:
        name, version = v.parse_version_ref(ref)
    tag_name = v.version_tag(name, version)
    commit = git.resolve_commit_or_exp(rev)
    art = artifact_at(git, name, commit)
    path = checked_output(git, art.path, commit=commit, field=f"artifact {name} path")
    kind = storage_backend(git.root)
    pin = pinned(git, art, commit, action="cannot tag")
    checkpoint, stage = pin.tree, pin.stage
    existing = registry.of(name, deprecated=True)
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
        kind.check_tag_workspace(git, art)
    where = f"{path} at {commit[:10]}"
    st = open_storage(git.root)
    try:
        files = tree(st, checkpoint, what=f"checkpoint of {where}")
        step_dir, step = newest_step_dir(st, files, where)
        manifest_md5 = next(f.oid for f in files if f.relpath == f"{step_dir}/{fmt.MANIFEST}")
        what = f"manifest of {step_dir} ({where})"
        raw = read_object_json(st, manifest_md5, what=what)
    finally:
        st.close()
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
    meta.update(kind.tag_meta)  # what the checkpoint hash is (LFS: the path's Git tree)
    summary = message or f"Registering artifact {name} version {version}"
    text = v.format_message(summary, meta)
    problem = v.read_tag_meta(text, tag=tag_name, root=git.root)[2]
    if problem is not None:  # what list and show will read back must pass, or no tag is made
        raise problem
    git.create_tag(tag_name, commit, text)
    return TagResult(tag_name, name, str(version), commit, step, metrics, checkpoint, parent)


def promote(ref: str, stage: str, *, repo_root: str | Path = ".") -> PromoteResult:
    """Assign a version to a stage with a GTO ``NAME#STAGE#N`` tag."""
    v.check_name(stage, "stage name")
    git = open_git(repo_root)
    r = resolve_ref(git.root, ref, action="cannot promote")
    if r.kind != "version" or r.name is None or r.version is None or r.commit is None:
        raise UnknownRefError(ref, hint="promote takes a version: NAME@vX.Y.Z")
    registry = load_registry(git)
    ver = registry.get(r.name, v.Semver.parse(r.version))
    if ver is not None and ver.deprecated:
        raise RegistryStateError(
            f"cannot promote {ver.tag}: deprecated by {ver.deprecated}",
            hint=f"a deprecated version holds no stage; tag a new version of {r.name}",
        )
    current = registry.in_stage(r.name, stage)
    if current is not None and str(current.version) == r.version:
        return PromoteResult(None, r.name, r.version, stage)
    tag_name = v.stage_tag(r.name, stage, registry.stage_counters.get(r.name, 0) + 1)
    summary = f"Assigning stage {stage} to artifact {r.name} version {r.version}"
    _after(registry.last_event(r.name))
    git.create_tag(tag_name, r.commit, v.format_message(summary, {"version": r.version}))
    return PromoteResult(tag_name, r.name, r.version, stage)


def deprecate(
    ref: str, *, message: str | None = None, repo_root: str | Path = "."
) -> DeprecateResult:
    """Deprecate a version (``NAME@vX.Y.Z``: GTO's deregistration, ``NAME@vX.Y.Z!``) or a
    whole artifact (``NAME``: ``NAME@deprecated``), as ``gto deprecate`` writes them. Its
    stages stop counting; ``list`` hides it unless asked; registering a new version of a
    deprecated artifact revives it (GTO's rule)."""
    git = open_git(repo_root)
    registry = load_registry(git)
    if "@" in ref:
        name, version = v.parse_version_ref(ref)
        ver = _known_version(registry, ref, name, version)
        if ver.deprecated:
            raise RegistryStateError(f"{ver.tag} is deprecated already (by {ver.deprecated})",
                                     hint=f"'modelver list {name} --deprecated' shows it")
        kind, commit = "deregistration", ver.commit
        summary = message or f"Deregistering artifact {name} version {version}"
    else:
        name = v.check_name(ref, "artifact name")
        if name in registry.deprecated_artifacts:
            raise RegistryStateError(
                f"artifact {name} is deprecated already (by {registry.deprecated_artifacts[name]})",
                hint=f"tag a new version of {name} to bring it back",
            )
        last = registry.last_event(name)
        if last is None:
            raise _no_versions(git, name)
        kind, commit, version = "deprecation", last.commit, None
        summary = message or f"Deprecating artifact '{name}'"
        _after(last)  # a deprecation in the second of the artifact's last event loses to it
    tag_name = v.event_tag(kind, name, version=version)  # GTO's simple form, once
    if git.tag_exists(tag_name):  # deprecated before and revived since: GTO's --force form
        tag_name = v.event_tag(kind, name, version=version,
                               counter=registry.stage_counters.get(name, 0) + 1)
    git.create_tag(tag_name, commit, summary.strip() + "\n")  # the tag's name says it all
    return DeprecateResult(tag_name, name, None if version is None else str(version), commit)


def unassign(
    ref: str, stage: str, *, message: str | None = None, repo_root: str | Path = "."
) -> UnassignResult:
    """Take a stage from a version with a GTO ``NAME#STAGE!#N`` tag: from the stage's current
    version (``NAME``) or from a version that holds it (``NAME@vX.Y.Z``). An older assignment
    still in effect becomes the stage's version again, as in ``gto show``."""
    v.check_name(stage, "stage name")
    git = open_git(repo_root)
    registry = load_registry(git)
    if "@" in ref:
        name, version = v.parse_version_ref(ref)
        ver: v.VersionTag | None = _known_version(registry, ref, name, version)
    else:
        name = v.check_name(ref, "artifact name")
        if not registry.of(name, deprecated=True):
            raise _no_versions(git, name)
        ver = registry.in_stage(name, stage) or next(
            (x for x in registry.of(name, deprecated=True) if stage in x.stages), None
        )
    if ver is None or stage not in ver.assigned:
        what = (f"no version of {name} is in stage '{stage}'" if ver is None
                else f"{ver.tag} does not hold stage '{stage}'")
        raise RegistryStateError(what, hint=f"'modelver list {name}' shows the stages")
    if ver.deprecated:
        raise RegistryStateError(
            f"cannot unassign {ver.tag}: deprecated by {ver.deprecated}",
            hint="a deprecated version's stages no longer count",
        )
    tag_name = v.event_tag("unassignment", name, stage=stage,
                           counter=registry.stage_counters.get(name, 0) + 1)
    summary = message or (
        f"Unassigning stage '{stage}' to artifact '{name}' version '{ver.version}'"
    )
    git.create_tag(tag_name, ver.commit,
                   v.format_message(summary, {"version": str(ver.version)}))
    now = load_registry(git).in_stage(name, stage)
    return UnassignResult(tag_name, name, str(ver.version), stage,
                          None if now is None else str(now.version))


def _known_version(
    registry: v.Registry, ref: str, name: str, version: v.Semver
) -> v.VersionTag:
    ver = registry.get(name, version)
    if ver is None:
        raise UnknownRefError(ref, hint=f"run 'modelver list {name} --deprecated' to see its "
                              "versions")
    return ver


def _no_versions(git: GitRepo, name: str) -> ModelverError:
    known = artifacts_at(git, None)
    if name not in known:
        return ArtifactNotFoundError(name, known=sorted(known))
    return UnknownRefError(name, hint=f"{name} has no versions yet: nothing to change")


def _after(last: v.TagEvent | None) -> None:
    """GTO's clock is the tagger time in whole seconds, and an assignment or a deprecation made
    in the second of the artifact's last event does not count as newer: wait for the next
    second (at most one; never for a tag dated ahead of this clock). Git stamps tags from a
    coarse clock that can lag this one by a tick: hence the slack."""
    slack = 0.05
    if last is not None:
        wait = math.floor(last.time) + 1 + slack - time.time()
        if 0 < wait <= 1 + slack:
            time.sleep(wait)


# --- list, show ------------------------------------------------------------------------------


def list_versions(
    name: str | None = None, *, repo_root: str | Path = ".", dvc_metrics: bool = False,
    deprecated: bool = False,
) -> list[VersionInfo]:
    """Every live version (of ``name``; with ``deprecated`` the deprecated ones too), oldest
    first; one ``git for-each-ref`` call. With ``dvc_metrics`` each version's commit's DVC
    metrics files too: a few ``git cat-file --batch`` calls for all versions, and DVC-cached
    files only from the local cache."""
    git = open_git(repo_root)
    registry = load_registry(git)
    if name is not None:
        v.check_name(name, "artifact name")
        if not registry.of(name, deprecated=True) and name not in artifacts_at(git, None):
            raise ArtifactNotFoundError(name, known=sorted(artifacts_at(git, None)))
        found = registry.of(name, deprecated=deprecated)
    else:
        found = list(registry.versions)
        if deprecated:
            found = sorted(found + list(registry.deprecated), key=lambda x: (x.name, x.version))
    if not dvc_metrics:
        return [_info(x) for x in found]
    read = metrics_at(git, [x.commit for x in found], fetch=False)
    return [_info(x, read[x.commit]) for x in found]


def show(ref: str, *, repo_root: str | Path = ".", check_remote: bool = True) -> VersionDetails:
    """One version (or a commit or DVC experiment, shown as the version tagged there if
    there is one) with its params, files, DVC metrics files and where its data is."""
    git = open_git(repo_root)
    r = resolve_ref(git.root, ref, action="cannot show")
    if r.kind == "path" or r.name is None or r.commit is None:
        raise UnknownRefError(ref, hint="show takes a version (NAME, NAME@vX.Y.Z, NAME#STAGE), "
                              "a commit or an experiment, not a directory")
    name, commit = r.name, r.commit
    registry = load_registry(git)
    if r.version is not None:
        ver = registry.get(name, v.Semver.parse(r.version))
    else:  # a commit: the version of its artifact tagged there, if any
        ver = next((x for x in registry.of(name, deprecated=True) if x.commit == commit), None)
        if ver is not None:
            r = version_ref(git, ref, ver, action="cannot show")
    assert r.checkpoint_hash is not None and r.path_in_repo is not None
    art = artifact_at(git, name, commit)
    params = pinned(git, art, commit, action="cannot show").params
    st = open_storage(git.root)
    try:
        try:
            r, files = with_step(st, r)
        except (DataMissingError, RemoteError):
            files = []
        assert r.checkpoint_hash is not None and r.path_in_repo is not None
        prefix = f"{r.step_dir}/"
        mine = [f for f in files if f.relpath.startswith(prefix)]
        hashes = [r.checkpoint_hash] + [f.oid for f in mine]
        in_cache = not st.missing_in_cache(hashes)
        sizes, metrics = _manifest_facts(
            st, [f for f in mine if f.relpath == prefix + "MANIFEST.json"]
        )
        in_remote = st.in_remote(hashes) if check_remote else None
    finally:
        st.close()
    dvc = metrics_at(git, [commit])[commit]
    if ver is not None:
        info = _info(ver, dvc)
    else:
        info = VersionInfo(
            name=name, version=None, tag=None, commit=commit, date=git.commit_date(commit),
            step=r.step, metrics=metrics, stages=[], checkpoint_hash=r.checkpoint_hash,
            parent=None, message="", **_dvc_metrics(dvc),
        )
    return VersionDetails(
        info=info,
        path=r.path_in_repo,
        step_dir=r.step_dir,
        params=params,
        files=[
            FileInfo(f.relpath[len(prefix) :], sizes.get(f.relpath[len(prefix) :], f.size), f.oid)
            for f in mine
        ],
        in_cache=in_cache,
        in_remote=in_remote,
    )


def _manifest_facts(
    st: Storage, manifest: Sequence[TreeFile]
) -> tuple[dict[str, int], dict[str, float]]:
    """File sizes (DVC's listing has none) and metrics from the checkpoint's manifest when it
    is in the cache; both optional, so an unreadable manifest gives neither."""
    if not manifest or st.missing_in_cache([manifest[0].oid]):
        return {}, {}
    path = st.object_path(manifest[0].oid)
    try:
        raw = untrusted.load_json(path.read_bytes(), what="manifest")
        sizes = {str(k): int(e["size"]) for k, e in raw["files"].items()}
        metrics = untrusted.metrics(raw.get("metrics") or {}, what="manifest")
    except (ModelverError, ValueError, KeyError, TypeError, AttributeError, OSError):
        return {}, {}
    sizes["MANIFEST.json"] = path.stat().st_size
    return sizes, metrics
