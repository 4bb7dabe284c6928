"""What a REF names.

REF is ``NAME@vX.Y.Z``, ``NAME`` (latest), ``NAME#STAGE``, a commit or branch, or a checkpoint
directory. Versions and commits point at the checkpoint hash the commit pins for the
artifact's output (:func:`pinned`: ``dvc.lock``'s md5; with Git LFS the path's Git tree).
Where that checkpoint lives on disk is :mod:`modelver.materialize`.

Tags and ``dvc.yaml`` are data others wrote: a tag's metadata is believed only as far as its
commit confirms it (:func:`version_ref`), and an output path must stay inside the repository
without a symlink in the workspace or in the commit (:func:`checked_output`). ``action``
("cannot show", "cannot check out", ...) names the command in every refusal.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelver import untrusted
from modelver import versions as v
from modelver.errors import (
    ArtifactNotFoundError,
    MalformedDataError,
    UnknownRefError,
    UnsafePathError,
)
from modelver.gitrepo import GitRepo
from modelver.storage import CONFIG, Pin, backend
from modelver.storage.dvcfile import Artifact, parse_artifacts

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


def artifacts_at(git: GitRepo, rev: str | None) -> dict[str, Artifact]:
    """Artifacts declared in dvc.yaml at ``rev`` (None: the workspace file), else in
    modelver.yaml (a Git LFS repository without a DVC pipeline)."""

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


def pinned(git: GitRepo, art: Artifact, commit: str, *, action: str = DEFAULT_ACTION) -> Pin:
    """What a commit pins for an artifact (dvc.lock's output; with Git LFS the path's Git
    tree), its hash checked: it names a cache object and a scratch directory."""
    pin = backend(git.root).pin(git, art, commit, action=action)
    checked_hash(pin.tree, field=f"checkpoint of {art.path} at {commit[:10]}")
    return pin


def checked_hash(value: object, *, field: str) -> str:
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


def load_registry(git: GitRepo) -> v.Registry:
    return v.build_registry(git.list_tags(), root=git.root)


# --- refs ----------------------------------------------------------------------------------


def resolve_ref(
    repo_root: str | Path, ref: str, *, action: str = DEFAULT_ACTION
) -> ResolvedRef:
    """Interpret REF: ``NAME@vX.Y.Z``, ``NAME``, ``NAME#STAGE``, a commit/branch, a path, or
    a DVC experiment (its name as ``dvc exp show`` lists it, or its ``refs/exps/...`` ref).

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
    commit = git.resolve_commit_or_exp(ref)  # a DVC experiment's name or ref works too
    arts = artifacts_at(git, commit)
    if len(arts) != 1:
        raise UnknownRefError(
            ref, hint="the commit declares several artifacts (or none): use NAME@vX.Y.Z"
        )
    art = next(iter(arts.values()))
    out = checked_output(git, art.path, commit=commit, field=f"artifact {art.name} path")
    return ResolvedRef(
        kind="commit", ref=ref, name=art.name, commit=commit, path_in_repo=out,
        checkpoint_hash=pinned(git, art, commit, action=action).tree,
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
    md5 = pinned(git, art, ver.commit, action=action).tree
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
