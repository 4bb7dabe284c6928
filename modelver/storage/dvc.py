"""The DVC backend, and the only module that imports ``dvc`` (lazily: class-level questions
and ``import modelver`` never load it).

modelver addresses a version's data by the ``md5: ….dir`` that ``dvc.lock`` pins for the
artifact's output, and moves objects between the local cache and the remote with DVC's own
object databases, so one step directory can be fetched without pulling a whole output.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelver.checkpoint.commit import write_beside
from modelver.errors import (
    CorruptObjectError,
    DataMissingError,
    DirtyWorkspaceError,
    MalformedDataError,
    ModelverError,
    NotARepositoryError,
    NotPinnedError,
    RemoteError,
    clip,
)
from modelver.hashing import md5_file
from modelver.healing import corrupt, quarantine, set_aside
from modelver.remote import RemoteStore, first_line
from modelver.storage.base import Pin, Setup, Storage, TreeFile
from modelver.storage.dvcfile import Artifact, check_oid, default_remote_dir, find_locked_out
from modelver.untrusted import relative_path

if TYPE_CHECKING:
    from dvc_data.hashfile.tree import Tree

    from modelver.gitrepo import GitRepo

Progress = Callable[[int, int], None]  # (done, total) in files
# Checkpoints are write-once directories, so linking them from the cache is safe. Reflink first:
# on XFS/btrfs nothing is copied at all. On ext4 DVC then copies new files into the cache at
# commit (it hard-links only when hardlink comes first), but leaves the workspace files plain,
# so the next `dvc repro` need not copy every persisted checkpoint to "unprotect" it.
CACHE_TYPES = "reflink,hardlink,copy"
DEFAULT_REMOTE = "modelver"
QUARANTINE = "modelver-quarantine"  # under the cache dir, beside DVC's files/ (never read)


def _callback(progress: Progress | None, size: int | None = None) -> Any:
    """An fsspec callback reporting (done, total) files to ``progress``."""
    from fsspec.callbacks import Callback

    class _Progress(Callback):
        def call(self, *args: Any, **kwargs: Any) -> None:
            if progress is not None:
                progress(int(self.value), int(self.size or 0))

    cb = _Progress()
    if size is not None:
        cb.set_size(size)
    return cb


@contextmanager
def _quiet_dvc() -> Iterator[None]:
    """DVC logs warnings itself; modelver reports through its own errors instead."""
    log = logging.getLogger("dvc")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def init_dvc(root: Path) -> bool:
    """``dvc init`` unless ``root`` already is a DVC repository; True when it initialised."""
    from dvc.repo import Repo

    if (root / ".dvc").is_dir():
        return False
    with _quiet_dvc():
        Repo.init(os.fspath(root)).close()
    return True


class DvcStorage(Storage):
    """A DVC repository opened at a Git working tree root."""

    kind = "dvc"
    saved_in = "in the DVC cache"
    runs_pipeline = True
    tag_meta: ClassVar[dict[str, str]] = {}  # the default: tags before backends had none

    def __init__(self, root: Path) -> None:
        from dvc.exceptions import NotDvcRepoError
        from dvc.repo import Repo

        self.root = root
        self.scratch = root / ".dvc" / "tmp" / "modelver"
        self._names: dict[str, str] = {}  # object id -> a file it is (for error messages)
        try:
            with _quiet_dvc():
                self._repo = Repo(os.fspath(root), uninitialized=False)
        except NotDvcRepoError as e:
            raise NotARepositoryError(root, "DVC") from e

    def close(self) -> None:
        self._repo.close()

    # --- class level: what a commit pins -----------------------------------------------------

    @classmethod
    def setup(
        cls, root: Path, *, remote: str | None, artifact: tuple[str, str],
        declared: Callable[[], Mapping[str, Artifact]],
    ) -> Setup:
        """``dvc init``, a default remote (the embedded one unless given or already set), and
        a linking cache."""
        created = init_dvc(root)
        dvc = cls(root)
        try:
            current = dvc.default_remote()
            if remote is not None:
                url, is_new = remote, current is None or current[1] != remote
            elif current is not None:
                url, is_new = current[1], False
            else:
                url, is_new = str(default_remote_dir(root)), True
                Path(url).mkdir(parents=True, exist_ok=True)
            dvc.configure(remote_url=url if is_new else None, local=remote is None)
        finally:
            dvc.close()
        notes: tuple[str, ...] = ("initialised DVC",) if created else ()
        notes += (
            f"remote {'set' if is_new else 'kept'}: {url}",
            f"cache link type: {CACHE_TYPES}",
            "next: git add .dvc && git commit -m 'modelver init'",
        )
        return Setup(created, url, is_new, CACHE_TYPES, notes=notes)

    @classmethod
    def pin(cls, git: GitRepo, art: Artifact, commit: str, *, action: str) -> Pin:
        out = find_locked_out(git.read_file(commit, "dvc.lock"), art.path)
        if out is None:
            raise NotPinnedError(
                art.name, commit[:10], reason=f"dvc.lock does not pin its path '{art.path}'",
                action=action,
            )
        return Pin(out.md5, out.stage, dict(out.params))

    @classmethod
    def check_tag_workspace(cls, git: GitRepo, art: Artifact) -> None:
        if git.is_modified("dvc.lock"):
            raise DirtyWorkspaceError(
                "dvc.lock has uncommitted changes", hint="commit dvc.lock, then tag the new commit"
            )
        dvc = cls(git.root)
        try:
            status = dvc.output_status(art.path)
        finally:
            dvc.close()
        if status not in (None, "deleted"):
            raise DirtyWorkspaceError(
                f"workspace '{art.path}' differs from what dvc.lock pins ({status})",
                hint="run 'dvc commit' (or 'dvc repro'), commit dvc.lock, then tag",
            )

    # --- configuration -------------------------------------------------------------------

    def default_remote(self) -> tuple[str, str] | None:
        """(name, url) of the default remote, if one is configured."""
        conf = self._repo.config
        name = conf["core"].get("remote")
        if not name or name not in conf["remote"]:
            return None
        return name, str(conf["remote"][name]["url"])

    def configure(self, *, remote_url: str | None, local: bool = False) -> None:
        """Set the cache link type (in ``.dvc/config``) and, when given, the default remote:
        in ``.dvc/config.local`` with ``local`` (a machine-specific path), else ``.dvc/config``."""
        with self._repo.config.edit("repo") as conf:
            conf["cache"]["type"] = CACHE_TYPES
        if remote_url is None:
            return
        if not local:  # a local default from an earlier init would shadow the shared one
            with self._repo.config.edit("local") as conf:
                conf["remote"].pop(DEFAULT_REMOTE, None)
                if conf["core"].get("remote") == DEFAULT_REMOTE:
                    del conf["core"]["remote"]
        with self._repo.config.edit("local" if local else "repo") as conf:
            conf["remote"][DEFAULT_REMOTE] = {"url": remote_url}
            conf["core"]["remote"] = DEFAULT_REMOTE

    def share_with(self, worktree: Path) -> None:
        """A linked Git worktree uses this repository's cache and local remote config."""
        from dvc.repo import Repo

        src = self.root / ".dvc" / "config.local"
        dst = worktree / ".dvc" / "config.local"
        if src.is_file():
            dst.write_text(src.read_text())
        cache_dir = self._repo.cache.local_cache_dir
        other = Repo(os.fspath(worktree), uninitialized=False)
        try:
            with other.config.edit("local") as conf:
                conf["cache"]["dir"] = cache_dir
        finally:
            other.close()

    # --- workspace state -----------------------------------------------------------------

    def output_status(self, path: str) -> str | None:
        """None when the workspace output matches ``dvc.lock``; else DVC's word for it."""
        from dvc.exceptions import DvcException

        try:
            with _quiet_dvc():
                status = self._repo.status(targets=[os.fspath(self.root / path)])
        except DvcException as e:
            raise ModelverError(f"dvc status failed: {e}") from e
        for entries in status.values():  # {stage: [{"changed outs": {path: "modified"}}]}
            for entry in entries:
                outs = entry.get("changed outs") if isinstance(entry, dict) else None
                if isinstance(outs, dict) and outs:
                    return str(next(iter(outs.values())))
        return None

    def workspace_saved(self, path: str) -> bool:
        """Whether every file now at ``path`` is in the cache (replacing it loses nothing)."""
        return not self.workspace_unsaved(path)

    def workspace_unsaved(self, path: str) -> list[str]:
        """The md5s of the files now at ``path`` that the cache lacks (hashed through DVC's
        state, so files DVC or the writer hashed before are not read again)."""
        target = self.root / path
        if not target.exists():
            return []
        from dvc_data.hashfile.build import build
        from dvc_data.hashfile.tree import Tree

        cache = self._repo.cache.local
        with _quiet_dvc():
            _, _, obj = build(cache, os.fspath(target), cache.fs, "md5", ignore=None)
        found = [hi.value for _, _, hi in obj] if isinstance(obj, Tree) else [obj.hash_info.value]
        return [str(m) for m in found if not cache.exists(m)]

    # --- objects -------------------------------------------------------------------------

    def tree(self, tree_id: str, *, remote: str | None = None) -> list[TreeFile]:
        """Files of a directory object, fetching just its listing from the remote if needed."""
        tree = self._load_tree(tree_id, remote=remote)
        return [
            TreeFile("/".join(key), hi.value, getattr(meta, "size", None))
            for key, meta, hi in tree
        ]

    def _load_tree(self, tree_id: str, *, remote: str | None = None) -> Tree:
        """A directory object, healed or fetched, whose every name stays inside the directory
        and whose every id is an md5: a remote's listing is data anyone with write access made."""
        from dvc_data.hashfile.hash_info import HashInfo
        from dvc_data.hashfile.tree import Tree

        check_oid(tree_id, field="directory object")
        if not tree_id.endswith(".dir"):
            raise MalformedDataError(
                "DVC object", "directory object", tree_id, expected="an id ending in '.dir'"
            )
        self.fetch([tree_id], remote=remote)
        self.heal([tree_id], remote=remote)
        cache = self._repo.cache.local
        try:
            tree = Tree.load(cache, HashInfo("md5", tree_id))
        except Exception as e:  # not JSON, not a list of entries: DVC raises what it meets
            raise MalformedDataError(
                f"DVC directory object {tree_id}", "content", first_line(e), expected="a listing"
            ) from e
        for key, _, hi in tree:
            rel = "/".join(key)
            if str(relative_path(rel, field=f"file name in {tree_id}", root=self.root)) != rel:
                raise MalformedDataError(
                    f"DVC directory object {tree_id}", "file name", rel,
                    expected="a normalised relative path",
                )
            check_oid(hi.value if hi else None, field=f"md5 of {rel}")
            self._names.setdefault(hi.value, rel)
        return tree

    def object_path(self, md5: str) -> Path:
        return Path(self._repo.cache.local.oid_to_path(check_oid(md5)))

    def missing_in_cache(self, md5s: Iterable[str]) -> list[str]:
        cache = self._repo.cache.local
        return [m for m in md5s if not cache.exists(check_oid(m))]

    def corrupt_in_cache(self, md5s: Iterable[str]) -> list[str]:
        """Objects present in the cache whose content no longer has their md5 (read in full)."""
        return corrupt(
            md5s, path_of=self.object_path, digest=md5_file,
            expected=lambda m: m.removesuffix(".dir"),
        )

    def heal(
        self, md5s: Iterable[str], *, remote: str | None = None, progress: Progress | None = None
    ) -> list[str]:
        """Move cache objects that fail their md5 aside (kept under ``modelver-quarantine``,
        never deleted) and fetch them again; returns the ids fetched again.

        Read-only copies hard-linked to a bad object (scratch checkouts) are removed with it.
        A remote that lacks the object, or whose copy is bad too, is one error naming both."""
        bad = self.corrupt_in_cache(md5s)
        if not bad:
            return []
        moved = set_aside(
            bad, path_of=self.object_path, folder=self._quarantine_dir(),
            links_under=self.scratch,
        )
        try:
            self.fetch(bad, remote=remote, progress=progress)
        except CorruptObjectError as e:
            raise CorruptObjectError(
                e.oid, name=e.name, remote=e.remote,
                reason=f"failed its md5 in the local cache (moved to {moved[e.oid]}) and the "
                f"copy in remote '{e.remote}' fails it too",
            ) from e
        except DataMissingError as e:
            m = (e.missing or bad)[0]
            name = self._remote_name(remote)
            raise CorruptObjectError(
                m, name=self._names.get(m), remote=name,
                # a local remote's bad copy is dropped by DVC's own status check: no good copy
                reason=f"failed its md5 in the local cache (moved to {moved[m]}) and remote "
                f"'{name}' has no good copy (missing, or failing its md5 too)",
            ) from e
        return bad

    def _quarantine_dir(self) -> Path:
        return Path(self._repo.cache.local_cache_dir) / QUARANTINE

    def missing_in_remote(self, md5s: Iterable[str], *, remote: str | None = None) -> list[str]:
        odb = self._remote_odb(remote, "status")
        wanted = list(md5s)
        try:
            return [m for m in wanted if not odb.exists(m)]
        except Exception as e:
            raise RemoteError(self._remote_name(remote), first_line(e)) from e

    def fetch(
        self, md5s: Iterable[str], *, remote: str | None = None, progress: Progress | None = None
    ) -> None:
        """Copy objects from the remote into the local cache; DataMissingError if absent."""
        from dvc_data.hashfile.hash_info import HashInfo
        from dvc_data.hashfile.transfer import transfer

        wanted = self.missing_in_cache(md5s)
        if not wanted:
            return
        odb = self._remote_odb(remote, "fetch")
        cache = self._repo.cache.local
        try:
            with _quiet_dvc():
                result = transfer(
                    odb, cache, [HashInfo("md5", m) for m in wanted],
                    # checked below: DVC's own check deletes a bad remote copy
                    callback=_callback(progress), verify=False, shallow=True,
                )
        except Exception as e:
            raise RemoteError(self._remote_name(remote), first_line(e)) from e
        still = self.missing_in_cache(wanted)
        if result.failed or still:
            first = (still or [str(hi.value) for hi in result.failed])[0]
            name = self._names.get(first)
            raise DataMissingError(
                f"{len(still) or len(result.failed)} object(s) (first: {first}"
                + (f" {clip(name)})" if name else ")"),
                missing=still,
            )
        bad = self.corrupt_in_cache(wanted)  # a remote is data too: never cache a bad copy
        if bad:
            moved = [quarantine(self.object_path(m), self._quarantine_dir(), name=m) for m in bad]
            name = self._remote_name(remote)
            raise CorruptObjectError(
                bad[0], name=self._names.get(bad[0]), remote=name,
                reason=f"fetched from remote '{name}' fails its md5 (moved to {moved[0]})"
                + (f"; {len(bad) - 1} more object(s) too" if len(bad) > 1 else ""),
            )

    def hash_file(self, path: Path) -> str:
        return md5_file(path)

    def in_remote(self, oids: Sequence[str]) -> bool | None:
        if self.default_remote() is None:
            return None
        try:
            return not self.missing_in_remote(oids)
        except RemoteError:
            return None

    def push(
        self, trees: Sequence[tuple[str, str, str | None]], *, what: str,
        progress: Progress | None = None,
    ) -> int:
        """Every pinned tree's listing and files to the default remote; objects not in the
        cache are fine when the remote has them already."""
        wanted: list[str] = []
        for tree_id, _, _ in trees:
            wanted += [tree_id] + [f.oid for f in self.tree(tree_id)]
        wanted = list(dict.fromkeys(wanted))
        absent = self.missing_in_cache(wanted)
        if absent and self.missing_in_remote(absent):
            raise DataMissingError(f"{len(absent)} object(s) of {what}")
        return self.push_objects([m for m in wanted if m not in set(absent)], progress=progress)

    def push_objects(
        self, md5s: Iterable[str], *, remote: str | None = None, progress: Progress | None = None
    ) -> int:
        """Copy objects from the local cache to the remote; returns how many were sent."""
        from dvc_data.hashfile.hash_info import HashInfo
        from dvc_data.hashfile.transfer import transfer

        wanted = list(dict.fromkeys(md5s))
        absent = self.missing_in_cache(wanted)
        if absent:
            raise DataMissingError(f"{len(absent)} object(s)", missing=absent)
        odb = self._remote_odb(remote, "push")
        cache = self._repo.cache.local
        try:
            with _quiet_dvc():
                result = transfer(
                    cache, odb, [HashInfo("md5", m) for m in wanted],
                    callback=_callback(progress), shallow=True,
                )
        except Exception as e:
            raise RemoteError(self._remote_name(remote), first_line(e)) from e
        if result.failed:
            raise RemoteError(self._remote_name(remote), f"{len(result.failed)} upload(s) failed")
        with suppress(RemoteError):  # a janitor: a remote refusing deletes still got the push
            self.remote_store(remote).clean_tmp()
        return len(result.transferred)

    def materialize(
        self,
        tree_id: str,
        dest: Path,
        *,
        prefix: str | None = None,
        progress: Progress | None = None,
        check: Callable[[Path], None] | None = None,
    ) -> None:
        """Write a directory object (or its ``prefix`` subdirectory) to ``dest`` from the cache.

        Objects are md5-checked (and healed) first, so a link never serves a corrupt cache
        object. The tree is written beside ``dest`` and swapped in with renames, after
        ``check`` (given the new tree) returns: a kill or a failed check leaves ``dest`` whole,
        old or new; leftovers of a killed call are finished by the next one.
        """
        from dvc_data.hashfile.checkout import CheckoutError
        from dvc_data.hashfile.checkout import checkout as _checkout
        from dvc_data.hashfile.tree import Tree

        cache = self._repo.cache.local
        tree = self._load_tree(tree_id)
        key: Any = tuple(prefix.split("/")) if prefix else None  # run-<id>/step-N: two parts
        obj = tree.get_obj(cache, key) if key else tree  # (dvc_data annotates a 1-tuple)
        if obj is None:
            raise DataMissingError(f"{prefix} in {tree_id}")
        oids = [hi.value for _, _, hi in obj] if isinstance(obj, Tree) else [obj.oid]
        self.fetch(oids, progress=progress)
        self.heal(oids, progress=progress)

        def fill(tmp: Path) -> None:
            for attempt in (1, 2):
                cb = _callback(progress, len(obj) if isinstance(obj, Tree) else 1)
                try:
                    with _quiet_dvc():
                        _checkout(
                            os.fspath(tmp), cache.fs, obj, cache, force=True,
                            progress_callback=cb, state=self._repo.state,
                        )
                    break
                except CheckoutError as e:
                    # DVC drops cache objects that changed under it: fetch them again once
                    if attempt == 2 or not self.missing_in_cache(oids):
                        raise DataMissingError(str(dest), missing=[str(p) for p in e.paths]) from e
                    self.fetch(oids, progress=progress)

        write_beside(dest, fill, check=check)

    def _remote_name(self, remote: str | None) -> str:
        if remote:
            return remote
        found = self.default_remote()
        return found[0] if found else "(none)"

    def _remote_odb(self, remote: str | None, command: str) -> Any:
        from dvc.exceptions import DvcException

        if remote is not None and self._is_url(remote):
            return self.remote_store(remote).odb
        try:
            return self._repo.cloud.get_remote_odb(remote, command)
        except DvcException as e:
            raise RemoteError(self._remote_name(remote), first_line(e)) from e

    # --- background push and recover ---------------------------------------------------

    def _is_url(self, remote: str) -> bool:
        """A remote URL or path rather than the name of a configured remote."""
        if remote in self._repo.config["remote"]:
            return False
        return "://" in remote or os.path.isabs(remote)

    def remote_store(self, remote: str | None = None) -> RemoteStore:
        """The DVC remote ``remote`` (a configured name or a URL; None: the default)."""
        from dvc.data_cloud import Remote
        from dvc.exceptions import DvcException
        from dvc.fs import get_cloud_fs
        from dvc_objects.fs.local import LocalFileSystem

        try:
            if remote is not None and self._is_url(remote):
                cls, config, fs_path = get_cloud_fs(self._repo.config, url=remote)
                found = Remote(remote, fs_path, cls(**config), **config)
            else:
                found = self._repo.cloud.get_remote(remote, "push")
            return RemoteStore(
                found.name, found.fs, found.path, found.odb, local_fs=LocalFileSystem()
            )
        except DvcException as e:
            raise RemoteError(remote or self._remote_name(remote), first_line(e)) from e

    def git_head(self) -> tuple[str | None, str | None]:
        """(HEAD commit, current branch) through DVC's own SCM handle; None where absent."""
        from dvc.exceptions import DvcException
        from scmrepo.exceptions import SCMError

        scm = self._repo.scm
        found: list[str | None] = []
        for read in (scm.get_rev, scm.active_branch):
            try:
                found.append(str(read()))
            except (DvcException, SCMError, TypeError):  # no commit yet, detached HEAD
                found.append(None)
        return found[0], found[1]


def dir_object(files: Mapping[str, tuple[str, int]]) -> tuple[str, bytes]:
    """DVC's ``.dir`` object (its md5 and bytes) listing files ``name -> (md5, size)``; the
    same bytes ``dvc add`` of that directory writes, so DVC's tools can read it."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for name, (md5, size) in files.items():
        tree.add(tuple(name.split("/")), Meta(size=size), HashInfo("md5", md5))
    tree.digest()
    return str(tree.oid), tree.as_bytes()


def find_root(path: Path) -> Path:
    """The root of the DVC repository holding ``path``."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Path(Repo.find_root(os.fspath(path)))
    except NotDvcRepoError as e:
        raise NotARepositoryError(path, "DVC") from e


def record_hashes(folder: Path, md5s: Mapping[str, str]) -> bool:
    """Tell DVC the MD5 of files just written in ``folder`` (file name -> md5), so that
    ``dvc commit``/``dvc repro`` takes them from its hash state instead of reading the files.

    DVC trusts a state entry while the file keeps its inode, mtime and size, exactly as for the
    hashes it computed itself. Only the state database is written, never the repository lock,
    so this works from a stage's command while ``dvc repro`` runs. False outside a DVC repo.
    """
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo

    folder = Path(os.path.realpath(folder))  # DVC keys paths under the physical cwd
    try:
        root = Repo.find_root(os.fspath(folder))
    except NotDvcRepoError:
        return False
    with _quiet_dvc():
        repo = Repo(root, uninitialized=False)
        try:
            items = [
                (os.fspath(folder / name), HashInfo("md5", md5), None)
                for name, md5 in md5s.items()
            ]
            repo.state.save_many(items, repo.fs)
        finally:
            repo.close()
    return True
