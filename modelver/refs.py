"""What a REF names, and where its checkpoint lives on disk.

REF is ``NAME@vX.Y.Z``, ``NAME`` (latest), ``NAME#STAGE``, a commit or branch, or a checkpoint
directory. Versions and commits point at the DVC md5 that ``dvc.lock`` pins for the artifact's
output; :func:`checkpoint_dir_for` links one step directory of it out of the DVC cache.

Tags, ``dvc.yaml`` and listings of ``.dir`` objects are data others wrote: a tag's metadata is
believed only as far as its commit confirms it (:func:`version_ref`), an output path must stay
inside the repository without a symlink in the workspace or in the commit
(:func:`checked_output`), and every listed file path is relative and inside (:func:`tree`).
``action`` ("cannot show", "cannot check out", ...) names the command in every refusal.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelver import untrusted
from modelver import versions as v
from modelver.errors import (
    ArtifactNotFoundError,
    CheckpointNotFoundError,
    MalformedDataError,
    NotPinnedError,
    UnknownRefError,
    UnsafePathError,
    clip,
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
DEFAULT_ACTION = "cannot use"


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

    return parse_artifacts(read("dvc.yaml"), source="dvc.yaml") or parse_artifacts(
        read(CONFIG), source=CONFIG
    )


def artifact_at(git: GitRepo, name: str, rev: str | None) -> Artifact:
    arts = artifacts_at(git, rev)
    if name not in arts:
        raise ArtifactNotFoundError(name, known=sorted(arts))
    return arts[name]


def locked_out(
    git: GitRepo, art: Artifact, commit: str, *, action: str = DEFAULT_ACTION
) -> LockedOut:
    from modelver.dvcrepo import find_locked_out

    out = find_locked_out(git.read_file(commit, "dvc.lock"), art.path)
    if out is None:
        raise NotPinnedError(
            art.name, commit[:10], reason=f"dvc.lock does not pin its path '{art.path}'",
            action=action,
        )
    return out


def pinned_hash(git: GitRepo, art: Artifact, commit: str, *, action: str = DEFAULT_ACTION) -> str:
    """The checkpoint hash a commit pins: dvc.lock's md5, or the Git tree of the path (LFS)."""
    if backend_of(git.root) != "lfs":
        return locked_out(git, art, commit, action=action).md5
    from modelver.lfsrepo import tree_hash

    found = tree_hash(git.root, commit, art.path)
    if found is None:
        raise NotPinnedError(
            art.name, commit[:10], reason=f"its tree has no '{art.path}'", action=action
        )
    return _hash(found, field=f"Git tree of {art.path} at {commit[:10]}")


def _hash(value: object, *, field: str) -> str:
    """A content hash that names a cache object or a scratch directory: hex only."""
    if not isinstance(value, str) or not v.HASH_RE.match(value):
        raise MalformedDataError(field, "hash", value, expected="a hex content hash")
    return value


def checked_output(git: GitRepo, path: str, *, commit: str | None, field: str) -> str:
    """An artifact's output path, refused unless it stays inside the repository: relative,
    no ``..``, no symlink on the way in the workspace (checkout writes there) nor in
    ``commit``'s tree (resume checks that commit out, then writes there)."""
    rel = str(untrusted.relative_path(path, field=field, root=git.root))
    untrusted.inside(git.root, rel, field=field)
    if commit is not None:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        proc = subprocess.run(
            ["git", "ls-tree", "-z", commit, "--", *prefixes],
            cwd=git.root, capture_output=True, check=False,
        )
        for entry in proc.stdout.split(b"\0"):
            mode, _, name = entry.partition(b" ")
            if mode == b"120000":
                where = name.partition(b"\t")[2].decode(errors="replace")
                raise UnsafePathError(
                    field, path, root=git.root,
                    reason=f"'{where}' is a symlink at commit {commit[:10]}",
                )
    return rel


def tree(st: Storage, md5_dir: str, *, what: str) -> list[TreeFile]:
    """A pinned directory's listing, every file path relative and inside it, every hash hex:
    a crafted ``.dir`` object must not make materialising write outside its destination."""
    files = st.tree(_hash(md5_dir, field=what))
    for f in files:
        untrusted.relative_path(f.relpath, field=f"{what} file", root=md5_dir)
        _hash(f.md5, field=f"{what} file {clip(f.relpath)}")
    return files


def step_dirs(files: Sequence[TreeFile]) -> dict[str, int]:
    """Step directories in a tree listing that carry a manifest: name -> step."""
    from modelver.checkpoint import format as fmt

    found = {}
    for f in files:
        parts = f.relpath.split("/")
        if len(parts) == 2 and parts[1] == fmt.MANIFEST:
            m = untrusted.STEP_DIR_RE.match(parts[0])
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
    return v.build_registry(git.list_tags(), root=git.root)


# --- refs ----------------------------------------------------------------------------------


def resolve_ref(
    repo_root: str | Path, ref: str, *, action: str = DEFAULT_ACTION
) -> ResolvedRef:
    """Interpret REF: ``NAME@vX.Y.Z``, ``NAME``, ``NAME#STAGE``, a commit/branch, or a path.

    Needs no data: the checkpoint's step comes from the tag metadata (or is left None for a
    commit until :func:`checkpoint_dir_for` reads the pinned listing). ``action`` ("cannot
    show", ...) starts the message when the commit pins no checkpoint.
    """
    git = open_git(repo_root)
    if "@" in ref and not Path(ref).exists():
        name, ver = v.parse_version_ref(ref)
        found = load_registry(git).get(name, ver)
        if found is None:
            raise UnknownRefError(ref, hint=f"run 'modelver list {name}' to see its versions")
        return version_ref(git, ref, found, action=action)
    stage = v.parse_stage_ref(ref)
    if stage is not None:
        found = load_registry(git).in_stage(*stage)
        if found is None:
            raise UnknownRefError(ref, hint=f"no version of {stage[0]} is in stage '{stage[1]}'")
        return version_ref(git, ref, found, action=action)
    if v.is_name(ref):
        latest = load_registry(git).latest(ref)
        if latest is not None:
            return version_ref(git, ref, latest, action=action)
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
    out = checked_output(git, art.path, commit=commit, field=f"artifact {art.name} path")
    return ResolvedRef(
        kind="commit", ref=ref, name=art.name, commit=commit, path_in_repo=out,
        checkpoint_hash=pinned_hash(git, art, commit, action=action),
    )


def version_ref(
    git: GitRepo, ref: str, ver: v.VersionTag, *, action: str = DEFAULT_ACTION
) -> ResolvedRef:
    """A version's checkpoint: what its commit declares and pins. The tag's own ``path`` and
    ``checkpoint`` (anyone who can push a tag writes them) must agree with that commit, or the
    tag is refused: a crafted tag cannot point a checkout at another directory or object."""
    ver.check()  # invalid metadata: one error line, before anything is read
    art = artifact_at(git, ver.name, ver.commit)
    path = checked_output(git, art.path, commit=ver.commit, field=f"artifact {ver.name} path")
    md5 = pinned_hash(git, art, ver.commit, action=action)
    what = f"tag {ver.tag}"
    if ver.meta.get("path") not in (None, path):
        raise UnsafePathError(
            f"{what} path", ver.meta["path"], root=git.root,
            reason=f"its commit declares the artifact at '{path}'",
        )
    if ver.meta.get("checkpoint") not in (None, md5):
        raise MalformedDataError(
            what, "checkpoint", ver.meta["checkpoint"], expected=f"{md5}, what its commit pins"
        )
    return ResolvedRef(
        kind="version", ref=ref, name=ver.name, version=str(ver.version), tag=ver.tag,
        commit=ver.commit, path_in_repo=path, checkpoint_hash=md5,
        step_dir=ver.meta.get("step_dir"), step=ver.step,
    )


def with_step(dvc: Storage, r: ResolvedRef) -> tuple[ResolvedRef, list[TreeFile]]:
    """Fill in the step directory from the pinned listing (fetching the listing if needed).

    The tag's ``step_dir`` is only a hint: used when the listing has it, its step then read
    from the listing's name."""
    assert r.checkpoint_hash is not None
    files = tree(dvc, r.checkpoint_hash, what=f"checkpoint of {r.ref}")
    dirs = step_dirs(files)
    if r.step_dir and r.step_dir in dirs:
        return ResolvedRef(**{**asdict(r), "step": dirs[r.step_dir]}), files
    name, step = newest_step_dir(files, r.ref)
    return ResolvedRef(**{**asdict(r), "step_dir": name, "step": step}), files


def checkpoint_dir_for(
    ref: str | None,
    *,
    repo_root: str | Path = ".",
    progress: Progress | None = None,
    action: str = DEFAULT_ACTION,
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
        art = next(iter(arts.values()))
        path = checked_output(git, art.path, commit=None, field=f"artifact {art.name} path")
        return local_step_dir(git.root / path)
    r = resolve_ref(git.root, ref, action=action)
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
    root = scratch_dir(dvc) / _hash(r.checkpoint_hash, field=f"checkpoint of {r.ref}")
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
        bases = fmt.read_manifest(step_dir).bases
    except (CheckpointCorruptedError, CheckpointNotFoundError):
        return ()
    for b in bases:  # a sibling name, never a path
        untrusted.step_dirname(b, field="manifest delta base", root=step_dir.parent)
    return bases


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


def read_object_json(dvc: Storage, md5: str, *, what: str = "object") -> Any:
    """A small JSON object (a manifest) from the cache, fetched if needed; parsed as hostile."""
    dvc.fetch([_hash(md5, field=what)])
    return untrusted.load_json(dvc.object_path(md5).read_bytes(), what=what)


