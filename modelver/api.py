"""The operations behind the ``modelver`` commands, as plain typed functions.

Nothing here prints or exits: results are frozen dataclasses, problems are ``modelver.errors``.
dvc and torch are imported inside the functions that need them so ``modelver list`` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelver import versions as v
from modelver.errors import (
    ArtifactNotFoundError,
    CheckpointNotFoundError,
    DataMissingError,
    DirtyWorkspaceError,
    RemoteError,
    UnknownRefError,
    VersionExistsError,
)
from modelver.gitrepo import GitRepo
from modelver.integrity import VerifiedCheckpoint, VerifyResult, verify_dir, verify_one
from modelver.params import apply_overrides
from modelver.params import parse_override as parse_override  # for the CLI
from modelver.refs import ResolvedRef as ResolvedRef  # re-exported for the CLI and diff
from modelver.refs import (
    artifact_at,
    artifacts_at,
    load_registry,
    locked_out,
    materialize_step,
    newest_step_dir,
    open_dvc,
    open_git,
    pin_problems,
    read_object_json,
    resolve_ref,
    version_ref,
    with_step,
)
from modelver.refs import checkpoint_dir_for as checkpoint_dir_for

if TYPE_CHECKING:
    from modelver.dvcrepo import Artifact, DvcRepo, TreeFile

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
            path=self.path, step_dir=self.step_dir, params=self.params,
            files=[asdict(f) for f in self.files], in_cache=self.in_cache,
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
        name=ver.name, version=str(ver.version), tag=ver.tag, commit=ver.commit, date=ver.date,
        step=ver.step, metrics=ver.metrics, stages=list(ver.stages),
        checkpoint_hash=ver.meta.get("checkpoint"), parent=ver.meta.get("parent"),
        message=ver.message,
    )


# --- init, tag, promote ----------------------------------------------------------------------


def default_remote_dir(root: Path) -> Path:
    """The embedded default remote: a directory outside the repository, per repository."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha1(str(root.resolve()).encode(), usedforsecurity=False).hexdigest()[:8]
    return base / "modelver" / "remotes" / f"{root.name}-{digest}"


def init(path: str | Path = ".", *, remote: str | None = None) -> InitResult:
    """Make a Git repository ready for modelver: DVC, a default remote, a linking cache."""
    from modelver.dvcrepo import CACHE_TYPES, init_dvc

    git = open_git(path)
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


def tag(
    ref: str,
    *,
    rev: str = "HEAD",
    bump: str | None = None,
    message: str | None = None,
    repo_root: str | Path = ".",
) -> TagResult:
    """Register ``NAME@vX.Y.Z`` (or NAME with ``bump``) at REV, after checking what it pins."""
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
    out = locked_out(git, art, commit)
    existing = registry.of(name)
    if git.tag_exists(tag_name) or registry.get(name, version):
        raise VersionExistsError(tag_name)
    same_commit = [x.tag for x in existing if x.commit == commit]
    if same_commit:  # GTO refuses two versions of one artifact on one commit
        raise VersionExistsError(tag_name, reason=f"cannot share commit {commit[:10]} with "
                                 f"{same_commit[0]}")
    if existing and existing[-1].version >= version:
        raise VersionExistsError(tag_name, reason=f"is not above the latest {existing[-1].tag}")
    if commit == git.head_commit():
        _check_workspace_matches(git, art)
    dvc = open_dvc(git.root)
    try:
        files = dvc.tree(out.md5)
        step_dir, step = newest_step_dir(files, f"{art.path} at {commit[:10]}")
        manifest_md5 = next(f.md5 for f in files if f.relpath == f"{step_dir}/{fmt.MANIFEST}")
        manifest = fmt.Manifest.from_json(read_object_json(dvc, manifest_md5))
    finally:
        dvc.close()
    parent = str(existing[-1].version) if existing else None
    meta = {
        "modelver": 1, "step": step, "step_dir": step_dir, "metrics": manifest.metrics,
        "checkpoint": out.md5, "path": art.path, "stage": out.stage, "parent": parent,
    }
    summary = message or f"Registering artifact {name} version {version}"
    git.create_tag(tag_name, commit, v.format_message(summary, meta))
    return TagResult(tag_name, name, str(version), commit, step, manifest.metrics, out.md5, parent)


def _check_workspace_matches(git: GitRepo, art: Artifact) -> None:
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
    r = resolve_ref(git.root, ref)
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
    from modelver.dvcrepo import find_locked_out

    git = open_git(repo_root)
    r = resolve_ref(git.root, ref)
    if r.kind != "version" or r.name is None or r.version is None or r.commit is None:
        raise UnknownRefError(ref, hint="show takes a version: NAME, NAME@vX.Y.Z or NAME#STAGE")
    ver = load_registry(git).get(r.name, v.Semver.parse(r.version))
    assert ver is not None and r.checkpoint_hash is not None and r.path_in_repo is not None
    out = find_locked_out(git.read_file(r.commit, "dvc.lock"), r.path_in_repo)
    dvc = open_dvc(git.root)
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
        in_remote: bool | None = None
        if check_remote and dvc.default_remote() is not None:
            try:
                in_remote = not dvc.missing_in_remote(hashes)
            except RemoteError:
                in_remote = None
    finally:
        dvc.close()
    return VersionDetails(
        info=_info(ver), path=r.path_in_repo, step_dir=r.step_dir,
        params=dict(out.params) if out else {},
        files=[
            FileInfo(f.relpath[len(prefix) :], sizes.get(f.relpath[len(prefix) :], f.size), f.md5)
            for f in mine
        ],
        in_cache=in_cache, in_remote=in_remote,
    )


def _sizes(dvc: DvcRepo, manifest: Sequence[TreeFile]) -> dict[str, int]:
    """File sizes from the version's manifest when it is in the cache (DVC's listing has none)."""
    if not manifest or dvc.missing_in_cache([manifest[0].md5]):
        return {}
    path = dvc.object_path(manifest[0].md5)
    try:
        files = json.loads(path.read_text())["files"]
        sizes = {str(k): int(e["size"]) for k, e in files.items()}
    except (ValueError, KeyError, TypeError):
        return {}
    sizes["MANIFEST.json"] = path.stat().st_size
    return sizes


# --- checkout, resume --------------------------------------------------------------------------


def _data_ref(git: GitRepo, ref: str, what: str) -> ResolvedRef:
    r = resolve_ref(git.root, ref)
    if r.kind == "path":
        raise UnknownRefError(ref, hint=f"{what} takes a version or a commit, not a directory")
    return r


def checkout(
    ref: str,
    *,
    to: str | Path | None = None,
    force: bool = False,
    repo_root: str | Path = ".",
    progress: Progress | None = None,
) -> CheckoutResult:
    """Materialise REF's checkpoint: into ``to``/<step dir>, or its whole pinned output into
    the workspace path. Verified; nothing but that directory changes."""
    from modelver.checkpoint import verify_checkpoint

    git = open_git(repo_root)
    r = _data_ref(git, ref, "checkout")
    dvc = open_dvc(git.root)
    try:
        staged, r, files = materialize_step(dvc, r, progress=progress)
        verify_checkpoint(staged)  # corrupted data stops us before the destination changes
        assert r.checkpoint_hash and r.step_dir and r.path_in_repo and r.step is not None
        if to is not None:
            dest = Path(to) / r.step_dir
            if dest.exists() and any(dest.iterdir()) and not force:
                raise DirtyWorkspaceError(f"{dest} exists", hint="choose another --to or --force")
            dvc.materialize(r.checkpoint_hash, dest, prefix=r.step_dir, progress=progress)
        else:
            _replace_output(dvc, r, files, force=force, progress=progress)
            dest = dvc.root / r.path_in_repo / r.step_dir
    finally:
        dvc.close()
    verify_checkpoint(dest)
    return CheckoutResult(r, dest, r.step)


def _replace_output(
    dvc: DvcRepo,
    r: ResolvedRef,
    files: Sequence[TreeFile],
    *,
    force: bool,
    progress: Progress | None,
) -> None:
    assert r.path_in_repo and r.checkpoint_hash
    if not force and not dvc.workspace_saved(r.path_in_repo):
        raise DirtyWorkspaceError(
            f"'{r.path_in_repo}' holds checkpoints that are not in the DVC cache",
            hint="run 'dvc commit' first, use --to DIR, or --force to discard them",
        )
    dvc.fetch([f.md5 for f in files], progress=progress)
    dvc.materialize(r.checkpoint_hash, dvc.root / r.path_in_repo, progress=progress)


def resume(
    ref: str,
    *,
    overrides: Mapping[str, Any] | None = None,
    worktree: str | Path | None = None,
    repro: bool = True,
    quiet: bool = False,
    repo_root: str | Path = ".",
    progress: Progress | None = None,
) -> ResumeResult:
    """Rebuild REF's commit on a new branch, restore its checkpoint, override params, repro."""
    from modelver.checkpoint import verify_checkpoint
    from modelver.dvcrepo import repro as run_repro

    git = open_git(repo_root)
    r = _data_ref(git, ref, "resume")
    assert r.commit and r.path_in_repo
    overrides = dict(overrides or {})
    base = "modelver/resume/" + (f"{r.name}-{r.version}" if r.version else r.commit[:10])
    branch, n = base, 1
    while git.branch_exists(branch):
        n += 1
        branch = f"{base}-{n}"
    main = open_dvc(git.root)
    try:
        r, files = with_step(main, r)
        main.fetch([f.md5 for f in files], progress=progress)
        staged, r, _ = materialize_step(main, r, progress=progress)
        verify_checkpoint(staged)  # a bad checkpoint stops us before any branch exists
        assert r.commit and r.path_in_repo and r.step is not None
        if worktree is None:
            if git.is_dirty():
                raise DirtyWorkspaceError("the Git workspace has uncommitted changes")
            if not main.workspace_saved(r.path_in_repo):
                raise DirtyWorkspaceError(
                    f"'{r.path_in_repo}' holds checkpoints that are not in the DVC cache",
                    hint="run 'dvc commit' first, or resume with --worktree DIR",
                )
            git.create_branch_checkout(branch, r.commit)
            workdir = git.root
        else:
            workdir = Path(worktree).resolve()
            if workdir.exists() and any(workdir.iterdir()):
                raise DirtyWorkspaceError(f"{workdir} exists and is not empty",
                                          hint="choose a new --worktree directory")
            git.add_worktree(workdir, branch, r.commit)
            main.share_config_with(workdir)
    finally:
        main.close()
    dvc = open_dvc(workdir)
    try:
        _replace_output(dvc, r, files, force=True, progress=progress)
    finally:
        dvc.close()
    if overrides:
        apply_overrides(workdir / "params.yaml", overrides)
    if repro:
        run_repro(workdir, quiet=quiet)
    return ResumeResult(r, branch, workdir, r.step, overrides, repro)


# --- push, pull, verify ------------------------------------------------------------------------


def _version_refs(git: GitRepo, refs: Sequence[str]) -> list[ResolvedRef]:
    if refs:
        return [_data_ref(git, ref, "push/pull") for ref in refs]
    return [version_ref(git, x.tag, x) for x in load_registry(git).versions]


def push(
    refs: Sequence[str] = (), *, repo_root: str | Path = ".", progress: Progress | None = None
) -> TransferResult:
    """Send versions' data to the DVC remote (all versions when none are named) and their
    tags to the Git remote 'origin' when there is one."""
    git = open_git(repo_root)
    resolved = _version_refs(git, refs)
    dvc = open_dvc(git.root)
    try:
        wanted: list[str] = []
        for r in resolved:
            assert r.checkpoint_hash
            wanted += [r.checkpoint_hash] + [f.md5 for f in dvc.tree(r.checkpoint_hash)]
        wanted = list(dict.fromkeys(wanted))
        absent = dvc.missing_in_cache(wanted)
        if absent and dvc.missing_in_remote(absent):
            raise DataMissingError(f"{len(absent)} object(s) of {', '.join(refs) or 'versions'}")
        sent = dvc.push([m for m in wanted if m not in set(absent)], progress=progress)
    finally:
        dvc.close()
    tags: list[str] = []
    if git.has_remote("origin"):
        names = {r.name for r in resolved}
        stage_tags = [t.name for t in git.list_tags() if "#" in t.name
                      and t.name.split("#")[0] in names]  # stages are the names' history
        tags = [r.tag for r in resolved if r.tag] + stage_tags
        git.push_tags(tags)
    return TransferResult([r.tag or r.ref for r in resolved], sent, tags)


def pull(
    ref: str, *, repo_root: str | Path = ".", progress: Progress | None = None
) -> TransferResult:
    """Fetch tags from 'origin' (when there is one) and REF's data into the local cache."""
    git = open_git(repo_root)
    before = {t.name for t in git.list_tags()}
    if git.has_remote("origin"):
        git.fetch_tags()
    fetched = sorted({t.name for t in git.list_tags()} - before)
    r = _data_ref(git, ref, "pull")
    assert r.checkpoint_hash
    dvc = open_dvc(git.root)
    try:
        files = dvc.tree(r.checkpoint_hash)
        missing = dvc.missing_in_cache(f.md5 for f in files)
        dvc.fetch(missing, progress=progress)
    finally:
        dvc.close()
    return TransferResult([r.tag or r.ref], len(missing), fetched)


def verify(target: str | None = None, *, repo_root: str | Path = ".") -> VerifyResult:
    """Check checkpoints byte for byte: a version against dvc.lock and its manifest, a
    directory (one checkpoint or a root of them) against the manifests."""
    git = open_git(repo_root) if target is None or not Path(target).is_dir() else None
    if git is not None and target is not None:
        r = resolve_ref(git.root, target)
        if r.kind != "path":
            return _verify_version(git, r)
        assert r.path is not None
        return verify_dir(r.path)
    if target is not None:
        return verify_dir(Path(target))
    assert git is not None
    arts = artifacts_at(git, None)
    if not arts:
        raise ArtifactNotFoundError("(workspace)", known=[])
    checked: list[VerifiedCheckpoint] = []
    for art in arts.values():
        if (git.root / art.path).is_dir():
            checked += verify_dir(git.root / art.path).checked
    if not checked:
        raise CheckpointNotFoundError(git.root, reason="no checkpoint in the artifacts' paths")
    return VerifyResult(checked)


def _verify_version(git: GitRepo, r: ResolvedRef) -> VerifyResult:
    dvc = open_dvc(git.root)
    try:
        dest, r, files = materialize_step(dvc, r, progress=None)
    finally:
        dvc.close()
    assert r.step_dir
    mine = [f for f in files if f.relpath.startswith(r.step_dir + "/")]
    one = verify_one(dest)
    problems = one.problems + pin_problems(dest, r.step_dir, mine, full=True)
    return VerifyResult([VerifiedCheckpoint(dest, r.step, problems)])


# --- check ---------------------------------------------------------------------------------
# Self-contained: imports what it needs inside the functions.

if TYPE_CHECKING:
    from modelver.check import CheckReport
    from modelver.integrations.mlflow import SyncResult


def check(
    candidate: str,
    *,
    baseline: str,
    rules: Sequence[str] = (),
    model: str | None = None,
    repo_root: str | Path = ".",
    progress: Progress | None = None,
) -> CheckReport:
    """Gate CANDIDATE against BASELINE: ``--fail-if`` rules over both sides' metrics, the
    candidate's integrity, and a restore of it (into ``model``, MODULE:FACTORY, when given).

    Rules and the factory are checked before any data is read; a failing rule is a result
    (``report.passed``), not an exception, so the report can still be written.
    """
    from modelver.check import load_factory, run_check
    from modelver.rules import parse_rule

    parsed = [parse_rule(text) for text in rules]
    root = Path(repo_root).resolve()
    factory = load_factory(model, root=root) if model else None
    return run_check(candidate, baseline, rules=parsed, factory=factory, model=model,
                     repo_root=repo_root, progress=progress)


def mlflow_sync(
    name: str | None = None,
    *,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    repo_root: str | Path = ".",
) -> SyncResult:
    """Register every version (of ``name``) in an MLflow model registry, stages as aliases."""
    from modelver.integrations.mlflow import sync

    return sync(name, tracking_uri=tracking_uri, registry_uri=registry_uri, repo_root=repo_root)


# --- recover -------------------------------------------------------------------------------
# A run's checkpoints pushed in the background (CheckpointManager(push=...)), back on any clone.

if TYPE_CHECKING:
    from modelver.publish import RunRecord


@dataclass(frozen=True)
class RecoverResult:
    run: RunRecord
    path: Path  # the restored step directory in the workspace
    remote: str
    objects: int  # objects fetched from the remote
    reproduced: bool

    def to_json(self) -> dict[str, Any]:
        return {**self.run.to_json(), "restored": str(self.path), "remote": self.remote,
                "objects": self.objects, "reproduced": self.reproduced}


def list_runs(*, remote: str | None = None, repo_root: str | Path = ".") -> list[RunRecord]:
    """Runs of this repository that pushed checkpoints to the remote, newest first."""
    from modelver.publish import read_runs, runs_of_repo

    git = open_git(repo_root)
    dvc = open_dvc(git.root)
    try:
        runs = read_runs(dvc.remote_store(remote))
    finally:
        dvc.close()
    return runs_of_repo(runs, known=lambda c: git.try_resolve_commit(c) is not None)


def recover(
    *,
    remote: str | None = None,
    run: str | None = None,
    repro: bool = False,
    quiet: bool = False,
    repo_root: str | Path = ".",
    progress: Progress | None = None,
) -> RecoverResult:
    """Bring back the newest checkpoint a run of this branch pushed (or run ``run``) into its
    checkpoints directory, verified, so ``dvc repro`` continues from it; ``repro`` runs it."""
    import secrets
    import shutil

    from modelver.checkpoint import format as ckfmt
    from modelver.checkpoint import verify_checkpoint
    from modelver.dvcrepo import repro as run_repro
    from modelver.publish import pick_run, read_runs

    git = open_git(repo_root)
    dvc = open_dvc(git.root)
    try:
        store = dvc.remote_store(remote)
        branch = dvc.git_head()[1]
        rec = pick_run(read_runs(store), run=run, branch=branch, remote=store.name,
                       known=lambda c: git.try_resolve_commit(c) is not None)
        missing = dvc.missing_in_cache([rec.dir_md5, *rec.files.values()])
        dvc.fetch(missing, remote=remote, progress=progress)
        dest = git.root / rec.path / rec.step_dir
        # staged under a name the CheckpointManager ignores (and cleans), verified, renamed
        tmp = dest.parent / f".tmp-{rec.step_dir}-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            dvc.materialize(rec.dir_md5, tmp, progress=progress)
            verify_checkpoint(tmp)
            if dest.exists():
                same = (dest / ckfmt.MANIFEST).is_file() and (
                    (dest / ckfmt.MANIFEST).read_bytes() == (tmp / ckfmt.MANIFEST).read_bytes())
                if not same:
                    raise DirtyWorkspaceError(
                        f"{dest} exists and differs from the pushed checkpoint",
                        hint="move it away, then run 'modelver recover' again")
            else:
                os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        dvc.close()
    verify_checkpoint(dest)
    if repro:
        run_repro(git.root, quiet=quiet)
    return RecoverResult(rec, dest, store.name, len(missing), repro)


# --- diff ----------------------------------------------------------------------------------
# Self-contained: imports what it needs inside the functions.

if TYPE_CHECKING:
    from modelver.diff import CheckpointDiff, DiffSide


def diff(
    a: str,
    b: str | None = None,
    *,
    stat: bool = False,
    repo_root: str | Path = ".",
    progress: Progress | None = None,
) -> CheckpointDiff:
    """Compare B (default: the workspace's newest checkpoint) against A, tensor by tensor.

    A and B are versions, commits or checkpoint directories; directories also work outside
    a Git repository. Params come from each version's ``params.yaml`` at its commit.
    """
    from modelver.diff import diff_checkpoints

    side_a, name = _diff_side(a, stat=stat, repo_root=repo_root, progress=progress)
    if b is None:
        side_b = _workspace_side(name, repo_root=repo_root)
    else:
        side_b = _diff_side(b, stat=stat, repo_root=repo_root, progress=progress)[0]
    return diff_checkpoints(side_a, side_b, stat=stat, progress=progress)


def _diff_side(
    ref: str, *, stat: bool, repo_root: str | Path, progress: Progress | None
) -> tuple[DiffSide, str | None]:
    """The checkpoint REF names, with its params when it is a version or commit. For
    ``stat`` a version's manifest alone is read from the DVC cache (or fetched)."""
    from modelver.checkpoint import format as ckfmt
    from modelver.diff import DiffSide
    from modelver.errors import (
        CheckpointCorruptedError,
        CheckpointNotFoundError,
        NotARepositoryError,
    )
    from modelver.refs import (
        local_step_dir,
        materialize_step,
        open_dvc,
        open_git,
        read_object_json,
        resolve_ref,
        with_step,
    )

    try:
        r = resolve_ref(repo_root, ref)
    except NotARepositoryError:
        if "@" in ref or "#" in ref:  # meant a version: say there is no repository
            raise
        path = Path(repo_root, ref).resolve()  # outside Git only a directory makes sense
        if not path.is_dir():
            raise CheckpointNotFoundError(path, reason="no such directory") from None
        return DiffSide(local_step_dir(path), ref), None
    if r.kind == "path":
        assert r.path is not None
        return DiffSide(local_step_dir(r.path), ref), None
    assert r.commit is not None
    git = open_git(repo_root)
    params = _params_yaml(git.read_file(r.commit, "params.yaml"))
    label = r.tag or ref
    dvc = open_dvc(git.root)
    try:
        if stat:
            r, files = with_step(dvc, r)
            wanted = f"{r.step_dir}/{ckfmt.MANIFEST}"
            md5 = next(f.md5 for f in files if f.relpath == wanted)
            try:
                manifest = ckfmt.Manifest.from_json(read_object_json(dvc, md5))
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointCorruptedError(wanted, [f"unreadable manifest: {e}"]) from e
            return DiffSide(None, label, params=params, manifest=manifest), r.name
        path = materialize_step(dvc, r, progress=progress)[0]
    finally:
        dvc.close()
    return DiffSide(path, label, params=params), r.name


def _workspace_side(name: str | None, *, repo_root: str | Path) -> DiffSide:
    """The newest checkpoint in the workspace path of artifact ``name`` (or the only one)."""
    from modelver.diff import DiffSide
    from modelver.errors import NotARepositoryError, UnknownRefError
    from modelver.refs import artifact_at, artifacts_at, local_step_dir, open_git

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
    params = _params_yaml(params_file.read_text() if params_file.is_file() else None)
    return DiffSide(local_step_dir(git.root / art.path), "workspace", params=params)


def _params_yaml(text: str | None) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(text) if text else None
    return data if isinstance(data, dict) else {}
