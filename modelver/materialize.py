"""Where a REF's checkpoint lives on disk: its pinned listing, one step directory written
read-only into the backend's scratch directory (with the delta bases it decodes against), and
checked against what the commit pins.

Listings are data others wrote: every listed file path is relative and inside, every hash hex
(:func:`tree`), so a crafted listing cannot make materialising write outside its destination.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from modelver import untrusted
from modelver.errors import CheckpointNotFoundError, UnknownRefError, clip
from modelver.refs import (
    DEFAULT_ACTION,
    ResolvedRef,
    artifacts_at,
    checked_hash,
    checked_output,
    open_git,
    resolve_ref,
)
from modelver.storage import Storage, TreeFile, open_storage

Progress = Callable[[int, int], None]


def tree(st: Storage, tree_id: str, *, what: str) -> list[TreeFile]:
    """A pinned directory's listing, every file path relative and inside it, every hash hex:
    a crafted ``.dir`` object must not make materialising write outside its destination."""
    files = st.tree(checked_hash(tree_id, field=what))
    for f in files:
        untrusted.relative_path(f.relpath, field=f"{what} file", root=tree_id)
        checked_hash(f.oid, field=f"{what} file {clip(f.relpath)}")
    return files


def step_dirs(files: Sequence[TreeFile]) -> dict[str, int]:
    """Checkpoints in a tree listing that carry a manifest, ``step-N`` or ``run-<id>/step-N``
    (:mod:`modelver.checkpoint.runid`): relative path -> step."""
    from modelver.checkpoint import format as fmt

    found = {}
    for f in files:
        where, _, name = f.relpath.rpartition("/")
        if name == fmt.MANIFEST:
            m = untrusted.CHECKPOINT_SUBDIR_RE.match(where)
            if m:
                found[where] = int(m.group(2))
    return found


def chosen_run(st: Storage, files: Sequence[TreeFile], what: str) -> str | None:
    """Which run a pinned output stands for: the one its ``CURRENT_RUN.json`` names, else its
    only run; None for the layout without runs."""
    from modelver.checkpoint import runid

    pointer = [f for f in files if f.relpath == runid.CURRENT_FILE]
    if pointer:
        where = f"{runid.CURRENT_FILE} of {what}"
        st.fetch([pointer[0].oid])
        return runid.parse_current(st.object_path(pointer[0].oid).read_bytes(), where=where)
    runs = {m.group(1) for m in map(untrusted.CHECKPOINT_SUBDIR_RE.match, step_dirs(files)) if m}
    if len(runs) > 1 and None not in runs:
        raise CheckpointNotFoundError(
            what, reason=f"it holds runs {', '.join(sorted(map(str, runs)))} and no "
            f"{runid.CURRENT_FILE} says which one its commit trained"
        )
    return next(iter(runs)) if len(runs) == 1 else None


def newest_step_dir(st: Storage, files: Sequence[TreeFile], what: str) -> tuple[str, int]:
    """The newest checkpoint of the run the pinned output stands for (:func:`chosen_run`)."""
    run = chosen_run(st, files, what)
    prefix = "" if run is None else f"run-{run}/"
    dirs = {k: s for k, s in step_dirs(files).items()
            if k.startswith(prefix) and k.count("/") == prefix.count("/")}
    if not dirs:
        reason = "no complete checkpoint in the pinned output"
        raise CheckpointNotFoundError(what, reason=reason + (f" for run {run}" if run else ""))
    name = max(dirs, key=lambda k: dirs[k])
    return name, dirs[name]


def with_step(st: Storage, r: ResolvedRef) -> tuple[ResolvedRef, list[TreeFile]]:
    """Fill in the checkpoint from the pinned listing (fetching the listing if needed).

    The tag's ``step_dir`` is only a hint: used when the listing has it, its step then read
    from the listing's name."""
    assert r.checkpoint_hash is not None
    files = tree(st, r.checkpoint_hash, what=f"checkpoint of {r.ref}")
    dirs = step_dirs(files)
    if r.step_dir and r.step_dir in dirs:
        return ResolvedRef(**{**asdict(r), "step": dirs[r.step_dir]}), files
    name, step = newest_step_dir(st, files, r.ref)
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
    st = open_storage(git.root)
    try:
        return materialize_step(st, r, progress=progress)[0]
    finally:
        st.close()


def local_step_dir(path: Path) -> Path:
    """A step directory itself, or the newest complete one under a checkpoints root (of the
    run its ``CURRENT_RUN.json`` names, when it holds runs)."""
    from modelver.checkpoint import format as fmt

    if (path / fmt.MANIFEST).is_file():
        return path
    from modelver.checkpoint import latest_checkpoint, runid

    run = runid.current_run(path)
    if run is None:
        runs = runid.list_runs(path)
        run = runs[0] if len(runs) == 1 else None
    info = latest_checkpoint(path, run=run)
    if info is None:
        raise CheckpointNotFoundError(path)
    return Path(info.path)


def materialize_step(
    st: Storage, r: ResolvedRef, *, progress: Progress | None
) -> tuple[Path, ResolvedRef, list[TreeFile]]:
    r, files = with_step(st, r)
    assert r.checkpoint_hash and r.step_dir
    root = st.scratch / checked_hash(r.checkpoint_hash, field=f"checkpoint of {r.ref}")
    run_dir = r.step_dir.rpartition("/")[0]  # delta bases are siblings, in the same run
    todo, done = [r.step_dir], []
    while todo:  # the step directory, then the delta bases its manifest names, and theirs
        step_dir = todo.pop(0)
        done.append(step_dir)
        dest = root / step_dir
        mine = [f for f in files if f.relpath.startswith(step_dir + "/")]
        if not (dest.is_dir() and not pin_problems(dest, step_dir, mine, full=False,
                                                    hash_file=st.hash_file)):
            st.fetch([f.oid for f in mine], progress=progress)
            st.materialize(r.checkpoint_hash, dest, prefix=step_dir, progress=progress)
        bases = [f"{run_dir}/{b}" if run_dir else b for b in delta_bases(dest)]
        todo += [b for b in bases if b not in done and b not in todo]
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
    hash_file: Callable[[Path], str],
) -> list[str]:
    """Does ``dest`` hold what the commit pins? Sizes always; the manifest's content id (and,
    with ``full``, every file's) since the manifest's own hashes only vouch for the rest.
    ``hash_file``: the backend's (:meth:`Storage.hash_file`: md5 for DVC, sha256 for LFS)."""
    from modelver.checkpoint import format as fmt

    problems = []
    for f in files:
        rel = f.relpath[len(step_dir) + 1 :]
        p = dest / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif f.size is not None and p.stat().st_size != f.size:
            problems.append(f"{rel} size differs from what dvc.lock pins")
        elif (full or rel == fmt.MANIFEST) and hash_file(p) != f.oid:
            problems.append(f"{rel} md5 differs from what dvc.lock pins")
    return problems




def read_object_json(st: Storage, md5: str, *, what: str = "object") -> Any:
    """A small JSON object (a manifest) from the cache, fetched if needed; parsed as hostile."""
    st.fetch([checked_hash(md5, field=what)])
    return untrusted.load_json(st.object_path(md5).read_bytes(), what=what)
