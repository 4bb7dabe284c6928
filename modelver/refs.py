"""What a REF names, and where its checkpoint lives on disk.

REF is ``NAME@vX.Y.Z``, ``NAME`` (latest), ``NAME#STAGE``, a commit or branch, or a checkpoint
directory. Versions and commits point at the DVC md5 that ``dvc.lock`` pins for the artifact's
output; :func:`checkpoint_dir_for` links one step directory of it out of the DVC cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelver import versions as v
from modelver.errors import (
    ArtifactNotFoundError,
    CheckpointNotFoundError,
    NotPinnedError,
    UnknownRefError,
)
from modelver.gitrepo import GitRepo
from modelver.storage import (
    CONFIG,
    Storage,
    backend_of,
    hash_file_for,
    open_storage,
    scratch_dir,
)

if TYPE_CHECKING:
    from modelver.dvcrepo import Artifact, DvcRepo, LockedOut, TreeFile

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ResolvedRef:
    """What a REF names: a version, a commit's pinned checkpoint, or a directory on disk."""

    kind: str  # "version" | "commit" | "path"
    ref: str
    name: str | None = None
    version: str | None = None
    tag: str | None = None
    commit: str | None = None
    path_in_repo: str | None = None  # the artifact's output path, e.g. "checkpoints"
    checkpoint_hash: str | None = None  # DVC md5 of that output ("….dir")
    step_dir: str | None = None  # "step-00000300"
    step: int | None = None
    path: Path | None = None  # kind "path": the checkpoint (or checkpoints root) directory


# --- repository access ---------------------------------------------------------------------


def open_git(cwd: str | Path) -> GitRepo:
    return GitRepo(cwd)


def open_dvc(root: Path) -> DvcRepo:
    from modelver.dvcrepo import DvcRepo

    return DvcRepo(root)


def artifacts_at(git: GitRepo, rev: str | None) -> dict[str, Artifact]:
    """Artifacts declared in dvc.yaml at ``rev`` (None: the workspace file), else in
    modelver.yaml (a Git LFS repository without a DVC pipeline)."""
    from modelver.dvcrepo import parse_artifacts

    def read(name: str) -> str | None:
        if rev is None:
            f = git.root / name
            return f.read_text() if f.is_file() else None
        return git.read_file(rev, name)

    return parse_artifacts(read("dvc.yaml")) or parse_artifacts(read(CONFIG))


def artifact_at(git: GitRepo, name: str, rev: str | None) -> Artifact:
    arts = artifacts_at(git, rev)
    if name not in arts:
        raise ArtifactNotFoundError(name, known=sorted(arts))
    return arts[name]


def locked_out(git: GitRepo, art: Artifact, commit: str) -> LockedOut:
    from modelver.dvcrepo import find_locked_out

    out = find_locked_out(git.read_file(commit, "dvc.lock"), art.path)
    if out is None:
        raise NotPinnedError(
            art.name, commit[:10], reason=f"dvc.lock does not pin its path '{art.path}'"
        )
    return out


def pinned_hash(git: GitRepo, art: Artifact, commit: str) -> str:
    """The checkpoint hash a commit pins: dvc.lock's md5, or the Git tree of the path (LFS)."""
    if backend_of(git.root) != "lfs":
        return locked_out(git, art, commit).md5
    from modelver.lfsrepo import tree_hash

    found = tree_hash(git.root, commit, art.path)
    if found is None:
        raise NotPinnedError(art.name, commit[:10], reason=f"its tree has no '{art.path}'")
    return found


def step_dirs(files: Sequence[TreeFile]) -> dict[str, int]:
    """Step directories in a tree listing that carry a manifest: name -> step."""
    from modelver.checkpoint import format as fmt

    found = {}
    for f in files:
        parts = f.relpath.split("/")
        if len(parts) == 2 and parts[1] == fmt.MANIFEST:
            m = fmt.STEP_DIR_RE.match(parts[0])
            if m:
                found[parts[0]] = int(m.group(1))
    return found


def newest_step_dir(files: Sequence[TreeFile], what: str) -> tuple[str, int]:
    dirs = step_dirs(files)
    if not dirs:
        raise CheckpointNotFoundError(what, reason="no complete checkpoint in the pinned output")
    name = max(dirs, key=lambda k: dirs[k])
    return name, dirs[name]


def load_registry(git: GitRepo) -> v.Registry:
    return v.build_registry(git.list_tags())


# --- refs ----------------------------------------------------------------------------------


def resolve_ref(repo_root: str | Path, ref: str) -> ResolvedRef:
    """Interpret REF: ``NAME@vX.Y.Z``, ``NAME``, ``NAME#STAGE``, a commit/branch, or a path.

    Needs no data: the checkpoint's step comes from the tag metadata (or is left None for a
    commit until :func:`checkpoint_dir_for` reads the pinned listing).
    """
    git = open_git(repo_root)
    if "@" in ref and not Path(ref).exists():
        name, ver = v.parse_version_ref(ref)
        found = load_registry(git).get(name, ver)
        if found is None:
            raise UnknownRefError(ref, hint=f"run 'modelver list {name}' to see its versions")
        return version_ref(git, ref, found)
    stage = v.parse_stage_ref(ref)
    if stage is not None:
        found = load_registry(git).in_stage(*stage)
        if found is None:
            raise UnknownRefError(ref, hint=f"no version of {stage[0]} is in stage '{stage[1]}'")
        return version_ref(git, ref, found)
    if v.is_name(ref):
        latest = load_registry(git).latest(ref)
        if latest is not None:
            return version_ref(git, ref, latest)
    path = Path(ref)
    if not path.is_absolute():
        path = Path(repo_root) / path
    if path.is_dir():
        return ResolvedRef(kind="path", ref=ref, path=path.resolve())
    commit = git.try_resolve_commit(ref)
    if commit is None:
        raise UnknownRefError(ref)
    arts = artifacts_at(git, commit)
    if len(arts) != 1:
        raise UnknownRefError(
            ref, hint="the commit declares several artifacts (or none): use NAME@vX.Y.Z"
        )
    art = next(iter(arts.values()))
    return ResolvedRef(
        kind="commit", ref=ref, name=art.name, commit=commit, path_in_repo=art.path,
        checkpoint_hash=pinned_hash(git, art, commit),
    )


def version_ref(git: GitRepo, ref: str, ver: v.VersionTag) -> ResolvedRef:
    path = ver.meta.get("path")
    md5 = ver.meta.get("checkpoint")
    if not path or not md5:  # a tag made by another tool: read what its commit pins
        art = artifact_at(git, ver.name, ver.commit)
        path, md5 = art.path, pinned_hash(git, art, ver.commit)
    return ResolvedRef(
        kind="version", ref=ref, name=ver.name, version=str(ver.version), tag=ver.tag,
        commit=ver.commit, path_in_repo=path, checkpoint_hash=md5,
        step_dir=ver.meta.get("step_dir"), step=ver.step,
    )


def with_step(dvc: Storage, r: ResolvedRef) -> tuple[ResolvedRef, list[TreeFile]]:
    """Fill in the step directory from the pinned listing (fetching the listing if needed)."""
    assert r.checkpoint_hash is not None
    files = dvc.tree(r.checkpoint_hash)
    if r.step_dir and r.step_dir in step_dirs(files):
        return r, files
    name, step = newest_step_dir(files, r.ref)
    return ResolvedRef(**{**asdict(r), "step_dir": name, "step": step}), files


def checkpoint_dir_for(
    ref: str | None, *, repo_root: str | Path = ".", progress: Progress | None = None
) -> Path:
    """A local step directory holding REF's checkpoint, for reading (diff, verify).

    A version or commit is linked from the DVC cache (fetching only that step's objects from
    the remote when missing) into ``.dvc/tmp/modelver/<hash>/<step dir>`` (Git LFS: under
    ``.git/modelver/checkouts``), reused afterwards.
    None means the newest checkpoint of the workspace's (single) artifact.
    """
    git = open_git(repo_root)
    if ref is None:
        arts = artifacts_at(git, None)
        if len(arts) != 1:
            raise UnknownRefError("(workspace)", hint="name the artifact: NAME, NAME@vX.Y.Z")
        return local_step_dir(git.root / next(iter(arts.values())).path)
    r = resolve_ref(git.root, ref)
    if r.kind == "path":
        assert r.path is not None
        return local_step_dir(r.path)
    dvc = open_storage(git.root)
    try:
        return materialize_step(dvc, r, progress=progress)[0]
    finally:
        dvc.close()


def local_step_dir(path: Path) -> Path:
    """A step directory itself, or the newest complete one under a checkpoints root."""
    from modelver.checkpoint import format as fmt

    if (path / fmt.MANIFEST).is_file():
        return path
    from modelver.checkpoint import latest_checkpoint

    info = latest_checkpoint(path)
    if info is None:
        raise CheckpointNotFoundError(path)
    return Path(info.path)


def materialize_step(
    dvc: Storage, r: ResolvedRef, *, progress: Progress | None
) -> tuple[Path, ResolvedRef, list[TreeFile]]:
    r, files = with_step(dvc, r)
    assert r.checkpoint_hash and r.step_dir
    root = scratch_dir(dvc) / r.checkpoint_hash
    hash_file = hash_file_for(dvc)
    todo, done = [r.step_dir], []
    while todo:  # the step directory, then the delta bases its manifest names, and theirs
        step_dir = todo.pop(0)
        done.append(step_dir)
        dest = root / step_dir
        mine = [f for f in files if f.relpath.startswith(step_dir + "/")]
        if not (dest.is_dir() and not pin_problems(dest, step_dir, mine, full=False,
                                                    hash_file=hash_file)):
            dvc.fetch([f.md5 for f in mine], progress=progress)
            dvc.materialize(r.checkpoint_hash, dest, prefix=step_dir, progress=progress)
        todo += [b for b in delta_bases(dest) if b not in done and b not in todo]
    return root / r.step_dir, r, files


def delta_bases(step_dir: Path) -> tuple[str, ...]:
    """Sibling step directories a checkpoint's delta files decode against (none if it is
    full or unreadable: verifying it then says what is wrong)."""
    from modelver.checkpoint import format as fmt
    from modelver.errors import CheckpointCorruptedError

    try:
        return fmt.read_manifest(step_dir).bases
    except (CheckpointCorruptedError, CheckpointNotFoundError):
        return ()


def pin_problems(
    dest: Path,
    step_dir: str,
    files: Sequence[TreeFile],
    *,
    full: bool,
    hash_file: Callable[[Path], str] | None = None,
) -> list[str]:
    """Does ``dest`` hold what dvc.lock pins? Sizes always; the manifest's md5 (and, with
    ``full``, every file's md5) since the manifest's own hashes only vouch for the rest.
    ``hash_file``: the backend's file hash (default md5, as DVC; sha256 for Git LFS)."""
    from modelver.checkpoint import format as fmt

    problems = []
    for f in files:
        rel = f.relpath[len(step_dir) + 1 :]
        p = dest / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif f.size is not None and p.stat().st_size != f.size:
            problems.append(f"{rel} size differs from what dvc.lock pins")
        elif (full or rel == fmt.MANIFEST) and (hash_file or md5_file)(p) != f.md5:
            problems.append(f"{rel} md5 differs from what dvc.lock pins")
    return problems


def md5_file(path: Path) -> str:
    from modelver.checkpoint import format as fmt

    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(fmt.CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_object_json(dvc: Storage, md5: str) -> Any:
    import json

    dvc.fetch([md5])
    return json.loads(dvc.object_path(md5).read_text())


