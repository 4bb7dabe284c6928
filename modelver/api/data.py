"""Data of versions: checkout, resume, push, pull and verify."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from modelver import versions as v
from modelver.api.versions import CheckoutResult, ResumeResult, TransferResult
from modelver.checkpoint.commit import clean_side_dirs
from modelver.errors import (
    ArtifactNotFoundError,
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    DirtyWorkspaceError,
    MalformedDataError,
    ModelverWarning,
    UnknownRefError,
    UnsafePathError,
)
from modelver.gitrepo import GitRepo
from modelver.integrity import VerifiedCheckpoint, VerifyResult, verify_dir, verify_one
from modelver.materialize import materialize_step, pin_problems, step_dirs, with_step
from modelver.params import apply_overrides
from modelver.refs import (
    ResolvedRef,
    artifacts_at,
    load_registry,
    open_git,
    resolve_ref,
    version_ref,
)
from modelver.storage import Storage, TreeFile, open_storage
from modelver.untrusted import checkpoint_subdir, inside, relative_path

Progress = Callable[[int, int], None]


# --- checkout, resume --------------------------------------------------------------------------


def _data_ref(git: GitRepo, ref: str, what: str) -> ResolvedRef:
    verb = {"checkout": "check out", "push/pull": "push"}.get(what, what)
    r = resolve_ref(git.root, ref, action=f"cannot {verb}")
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
    the workspace path. Verified first, then swapped in: nothing but that directory changes,
    and a kill leaves it holding the old version or the new one, never a mix."""
    from modelver.checkpoint import format as ckfmt
    from modelver.checkpoint import verify_checkpoint

    git = open_git(repo_root)
    r = _data_ref(git, ref, "checkout")
    st = open_storage(git.root)
    try:
        staged, r, files = _staged(st, r, progress=progress)
        assert r.checkpoint_hash and r.step_dir and r.path_in_repo and r.step is not None
        if to is not None:
            out = Path(to)
            step_dir = checkpoint_subdir(r.step_dir, field="step_dir", root=out)[0]
            run_dir = step_dir.rpartition("/")[0]  # run-<id>/ of a named run's checkpoint
            # a delta checkpoint brings the step directories it decodes against (its siblings)
            chain = ckfmt.delta_chain(staged, ckfmt.read_manifest(staged))
            needed = [step_dir, *(checkpoint_subdir(
                f"{run_dir}/{p.name}" if run_dir else p.name, field="delta base", root=out
            )[0] for p, _ in chain)]
            for sd in needed:
                there = inside(out, sd, field="step_dir")
                clean_side_dirs(there)
                if there.exists() and any(there.iterdir()) and not force:
                    raise DirtyWorkspaceError(
                        f"{there} exists", hint="choose another --to or --force"
                    )
            for sd in reversed(needed):  # bases first: the checkpoint appears last
                st.materialize(r.checkpoint_hash, out / sd, prefix=sd, progress=progress)
            dest = out / step_dir
            verify_checkpoint(dest)
            verified = tuple(needed)
        else:
            verified = _replace_output(st, r, files, force=force, progress=progress)
            dest = st.root / r.path_in_repo / r.step_dir
    finally:
        st.close()
    return CheckoutResult(r, dest, r.step, verified=verified)


def _staged(
    st: Storage, r: ResolvedRef, *, progress: Progress | None
) -> tuple[Path, ResolvedRef, list[TreeFile]]:
    """REF's step directory in the scratch area, verified. A scratch copy that fails is
    rebuilt once after healing its cache objects (a corrupt object is moved aside and fetched
    again), so one flipped byte in the cache never blocks a checkout for good."""
    from modelver.checkpoint import verify_checkpoint

    for attempt in (1, 2):
        staged, r, files = materialize_step(st, r, progress=progress)
        try:
            verify_checkpoint(staged)  # corrupted data stops us before the destination changes
            return staged, r, files
        except (CheckpointCorruptedError, MalformedDataError):
            if attempt == 2:
                raise
            _drop_scratch(st, r, files, progress=progress)
    raise AssertionError("unreachable")


def _drop_scratch(
    st: Storage, r: ResolvedRef, files: Sequence[TreeFile], *, progress: Progress | None
) -> None:
    """Heal a version's cache objects and forget its scratch copies (rebuilt on next use)."""
    assert r.checkpoint_hash
    st.heal([f.oid for f in files], progress=progress)
    root = st.scratch
    here = inside(root, r.checkpoint_hash, field="checkpoint hash")
    if here.is_dir():
        shutil.rmtree(here)


def output_path(root: Path, rel: object, *, field: str = "artifact path") -> Path:
    """Where an artifact's output lives in a working tree: inside it, below its root, and not
    Git's or DVC's own directory (a crafted path would have a checkout replace them)."""
    path = inside(root, rel, field=field)
    if relative_path(rel, field=field, root=root).parts[0] in (".git", ".dvc"):
        raise UnsafePathError(field, rel, root=root, reason="is Git's or DVC's own directory")
    return path


def _replace_output(
    st: Storage,
    r: ResolvedRef,
    files: Sequence[TreeFile],
    *,
    force: bool,
    progress: Progress | None,
) -> tuple[str, ...]:
    """Swap REF's whole pinned output into the working tree, after verifying every step
    directory it carries (one that fails stops the checkout: the workspace keeps the old
    output). Returns the step directories verified."""
    from modelver.checkpoint import verify_checkpoint

    target = output_path(st.root, r.path_in_repo)
    assert r.path_in_repo and r.checkpoint_hash
    clean_side_dirs(target)  # a killed checkout's old tree comes back before we judge it
    if not force and not st.workspace_saved(r.path_in_repo):
        raise DirtyWorkspaceError(
            f"'{r.path_in_repo}' holds checkpoints that are not {st.saved_in}",
            hint="commit them first, use --to DIR, or --force to discard them",
        )
    st.fetch([f.oid for f in files], progress=progress)
    carried = sorted(step_dirs(files))
    verified: list[str] = []

    def check(new: Path) -> None:
        for sd in carried:
            try:
                verify_checkpoint(new / sd)
            except CheckpointCorruptedError as e:
                raise CheckpointCorruptedError(target / sd, e.problems) from e
            verified.append(sd)

    st.materialize(r.checkpoint_hash, target, progress=progress, check=check)
    return tuple(verified)


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
    git = open_git(repo_root)
    r = _data_ref(git, ref, "resume")
    assert r.commit and r.path_in_repo
    overrides = dict(overrides or {})
    base = "modelver/resume/" + (f"{r.name}-{r.version}" if r.version else r.commit[:10])
    branch, n = base, 1
    while git.branch_exists(branch):
        n += 1
        branch = f"{base}-{n}"
    main = open_storage(git.root)
    try:
        r, files = with_step(main, r)
        main.fetch([f.oid for f in files], progress=progress)
        _staged(main, r, progress=progress)  # a bad checkpoint stops us before any branch exists
        assert r.commit and r.path_in_repo and r.step is not None
        if worktree is None:
            if git.is_dirty():
                raise DirtyWorkspaceError("the Git workspace has uncommitted changes")
            if not main.workspace_saved(r.path_in_repo):
                raise DirtyWorkspaceError(
                    f"'{r.path_in_repo}' holds checkpoints that are not saved",
                    hint="commit them first ('dvc commit' with DVC), or use --worktree DIR",
                )
            git.create_branch_checkout(branch, r.commit)
            workdir = git.root
        else:
            workdir = Path(worktree).resolve()
            if workdir.exists() and any(workdir.iterdir()):
                raise DirtyWorkspaceError(
                    f"{workdir} exists and is not empty", hint="choose a new --worktree directory"
                )
            git.add_worktree(workdir, branch, r.commit)
            main.share_with(workdir)
        runs_pipeline = main.runs_pipeline
    finally:
        main.close()
    st = open_storage(workdir)
    try:
        _replace_output(st, r, files, force=True, progress=progress)
    finally:
        st.close()
    if overrides:
        apply_overrides(workdir / "params.yaml", overrides)
    # a Git LFS repository without a DVC pipeline has nothing to repro: training resumes
    # from the restored checkpoint when the user runs it
    repro = repro and (runs_pipeline or (workdir / "dvc.yaml").is_file())
    if repro:
        from modelver.storage.dvcfile import repro as run_repro

        run_repro(workdir, quiet=quiet)
    return ResumeResult(r, branch, workdir, r.step, overrides, repro)


# --- push, pull, verify ------------------------------------------------------------------------


def _version_refs(git: GitRepo, refs: Sequence[str]) -> list[ResolvedRef]:
    """Named refs resolve or fail (one error line). With none, every version whose tag holds:
    a tag with invalid metadata, or one its commit contradicts, is skipped with a warning, so
    one crafted or broken tag cannot block pushing all the others."""
    if refs:
        return [_data_ref(git, ref, "push/pull") for ref in refs]
    found = []
    for x in load_registry(git).versions:
        why = x.invalid
        if why is None:
            try:
                found.append(version_ref(git, x.tag, x))
                continue
            except (MalformedDataError, UnsafePathError) as e:
                why = e.message
        warnings.warn(f"push: skipped {x.tag}: {why}", ModelverWarning, stacklevel=3)
    return found


def push(
    refs: Sequence[str] = (), *, repo_root: str | Path = ".", progress: Progress | None = None
) -> TransferResult:
    """Send versions' data to the DVC remote (all versions when none are named) and their
    tags to the Git remote 'origin' when there is one."""
    git = open_git(repo_root)
    resolved = _version_refs(git, refs)
    st = open_storage(git.root)
    try:
        trees = [(str(r.checkpoint_hash), r.tag or r.ref, r.tag) for r in resolved]
        sent = st.push(trees, what=", ".join(refs) or "versions", progress=progress)
    finally:
        st.close()
    tags = _tags_of(git, resolved) if git.has_remote("origin") else []
    git.push_tags(tags)
    return TransferResult([r.tag or r.ref for r in resolved], sent, tags)


def _tags_of(git: GitRepo, resolved: Sequence[ResolvedRef]) -> list[str]:
    """The versions' own tags and their artifacts' history: stage (un)assignments and
    deprecations, so ``gto show`` on the other side agrees (other versions stay here)."""
    names = {r.name for r in resolved}
    history = []
    for t in git.list_tags():
        event = v.event_of(t.name)
        if event is not None and event[0] in names and event[1] != "registration":
            history.append(t.name)
    return [r.tag for r in resolved if r.tag] + history


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
    st = open_storage(git.root)
    try:
        files = st.tree(r.checkpoint_hash)
        missing = st.missing_in_cache(f.oid for f in files)
        # objects already here are read in full: one that fails its hash is fetched again
        healed = st.heal([f.oid for f in files if f.oid not in set(missing)], progress=progress)
        st.fetch(missing, progress=progress)
    finally:
        st.close()
    return TransferResult([r.tag or r.ref], len(missing) + len(healed), fetched)


def verify(target: str | None = None, *, repo_root: str | Path = ".") -> VerifyResult:
    """Check checkpoints byte for byte: a version against dvc.lock and its manifest, a
    directory (one checkpoint or a root of them) against the manifests."""
    git = open_git(repo_root) if target is None or not Path(target).is_dir() else None
    if git is not None and target is not None:
        r = resolve_ref(git.root, target, action="cannot verify")
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
    """Every step directory the version carries, against dvc.lock and its manifest. Reads
    only: a corrupt cache object is reported (``pull`` fetches it again), not replaced."""
    st = open_storage(git.root)
    checked: list[VerifiedCheckpoint] = []
    try:
        r, files = with_step(st, r)
        dirs = step_dirs(files)
        for sd in sorted(dirs, key=lambda k: dirs[k]):
            mine = [f for f in files if f.relpath.startswith(sd + "/")]
            bad = set(st.corrupt_in_cache(f.oid for f in mine))
            if bad:
                where = st.scratch / str(r.checkpoint_hash) / sd
                checked.append(VerifiedCheckpoint(where, dirs[sd], [
                    f"{f.relpath[len(sd) + 1:]} fails its hash in the local cache (object "
                    f"{f.oid}; 'modelver pull {r.ref}' fetches it again)"
                    for f in mine if f.oid in bad
                ]))
                continue
            one = replace(r, step_dir=sd, step=dirs[sd])
            for attempt in (1, 2):  # a stale scratch copy is rebuilt once before it counts
                dest, _, _ = materialize_step(st, one, progress=None)
                problems = verify_one(dest).problems + pin_problems(
                    dest, sd, mine, full=True, hash_file=st.hash_file
                )
                if not problems or attempt == 2:
                    break
                shutil.rmtree(dest)
            checked.append(VerifiedCheckpoint(dest, dirs[sd], problems))
    finally:
        st.close()
    return VerifyResult(checked)
