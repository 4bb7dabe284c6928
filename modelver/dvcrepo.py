"""DVC access for modelver: the only module that imports ``dvc``.

modelver addresses a version's data by the ``md5: ….dir`` that ``dvc.lock`` pins for the
artifact's output, and moves objects between the local cache and the remote with DVC's own
object databases, so one step directory can be fetched without pulling a whole output.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from dvc.exceptions import DvcException, NotDvcRepoError
from dvc.repo import Repo
from dvc_data.hashfile.checkout import CheckoutError
from dvc_data.hashfile.checkout import checkout as _checkout
from dvc_data.hashfile.hash_info import HashInfo
from dvc_data.hashfile.meta import Meta
from dvc_data.hashfile.transfer import transfer
from dvc_data.hashfile.tree import Tree
from dvc_objects.fs.local import LocalFileSystem
from fsspec.callbacks import Callback

from modelver.errors import (
    CorruptObjectError,
    DataMissingError,
    MalformedDataError,
    ModelverError,
    NotARepositoryError,
    RemoteError,
    clip,
)
from modelver.healing import corrupt, md5_of, quarantine, set_aside
from modelver.remote import RemoteStore, first_line
from modelver.storage import clean_side_dirs, scratch_dir, side_path, swap_in
from modelver.untrusted import relative_path

Progress = Callable[[int, int], None]  # (done, total) in files
# Checkpoints are write-once directories, so linking them from the cache is safe. Reflink first:
# on XFS/btrfs nothing is copied at all. On ext4 DVC then copies new files into the cache at
# commit (it hard-links only when hardlink comes first), but leaves the workspace files plain,
# so the next `dvc repro` need not copy every persisted checkpoint to "unprotect" it.
CACHE_TYPES = "reflink,hardlink,copy"
DEFAULT_REMOTE = "modelver"
_LOCK_HASH = re.compile(r"^[0-9a-f]{32}(\.dir)?$")  # dvc.lock md5 (parse/find_locked_out)
_OID_RE = re.compile(r"^[0-9a-f]{32}(\.dir)?$")
QUARANTINE = "modelver-quarantine"  # under the cache dir, beside DVC's files/ (never read)


def check_oid(oid: object, *, field: str = "object id") -> str:
    """A DVC md5 object id (``.dir`` for a directory): it becomes a cache and remote path."""
    if not isinstance(oid, str) or not _OID_RE.fullmatch(oid):
        raise MalformedDataError(
            "DVC object", field, oid, expected="32 hex digits (with '.dir' for a directory)"
        )
    return oid


@dataclass(frozen=True)
class Artifact:
    name: str
    path: str
    type: str | None


@dataclass(frozen=True)
class LockedOut:
    """The ``dvc.lock`` record of a stage output: what a commit pins."""

    stage: str
    path: str
    md5: str  # "<hex>.dir" for a directory
    size: int | None
    nfiles: int | None
    params: dict[str, Any]  # params file -> the params the stage ran with


@dataclass(frozen=True)
class TreeFile:
    relpath: str  # "step-00000030/model.safetensors"
    md5: str
    size: int | None


# --- dvc.yaml / dvc.lock (plain YAML; no repository needed) --------------------------------


def parse_artifacts(dvc_yaml: str | None, *, source: str = "dvc.yaml") -> dict[str, Artifact]:
    """The ``artifacts:`` section of a ``dvc.yaml`` (or ``modelver.yaml``) text.

    Paths are data a commit carries: each must be relative and stay inside the repository
    (:class:`~modelver.errors.UnsafePathError` otherwise), returned normalised."""
    from modelver.untrusted import relative_path

    data = _load_yaml(dvc_yaml)
    section = data.get("artifacts") or {}
    if not isinstance(section, dict):
        return {}
    found = {}
    for name, spec in section.items():
        if isinstance(spec, dict) and spec.get("path"):
            field = f"{source} artifacts.{name}.path"
            path = str(relative_path(spec["path"], field=field, root="<repository>"))
            kind = spec.get("type")
            found[str(name)] = Artifact(str(name), path, kind if isinstance(kind, str) else None)
    return found


def find_locked_out(dvc_lock: str | None, path: str) -> LockedOut | None:
    """The locked output at ``path`` (normalised), or None when no stage pins it.

    ``dvc.lock`` is data a commit carries: entries of the wrong shape are skipped, outputs
    whose path leaves the repository never match, and the matching output's md5 must be a hex
    hash (it names a cache object and a directory) and its size and count integers."""
    from modelver.errors import MalformedDataError
    from modelver.untrusted import integer, mapping, relative_path

    data = _load_yaml(dvc_lock)
    want = str(relative_path(path, field="artifact path", root="<repository>"))
    stages = data.get("stages")
    if not isinstance(stages, dict):
        return None
    for stage, info in stages.items():
        if not isinstance(info, dict) or not isinstance(info.get("outs"), list):
            continue
        for out in info["outs"]:
            if not isinstance(out, dict) or not isinstance(out.get("path"), str):
                continue
            if os.path.normpath(out["path"]).replace(os.sep, "/") != want or not out.get("md5"):
                continue
            what = f"dvc.lock stages.{stage}.outs[{want}]"
            md5 = out["md5"]
            if not isinstance(md5, str) or not _LOCK_HASH.match(md5):
                raise MalformedDataError(what, "md5", md5, expected="a hex md5")
            sizes = {
                k: None if out.get(k) is None else integer(out[k], what=what, field=k)
                for k in ("size", "nfiles")
            }
            params = info.get("params") or {}
            return LockedOut(
                stage=str(stage),
                path=path,
                md5=md5,
                size=sizes["size"],
                nfiles=sizes["nfiles"],
                params=dict(mapping(params, what=f"dvc.lock stages.{stage}", field="params")),
            )
    return None


def _load_yaml(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# --- the repository ------------------------------------------------------------------------


class _Cb(Callback):
    def __init__(self, progress: Progress | None) -> None:
        super().__init__()
        self._progress = progress

    def call(self, *args: Any, **kwargs: Any) -> None:
        if self._progress is not None:
            self._progress(int(self.value), int(self.size or 0))


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
    if (root / ".dvc").is_dir():
        return False
    with _quiet_dvc():
        Repo.init(os.fspath(root)).close()
    return True


class DvcRepo:
    """A DVC repository opened at a Git working tree root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._names: dict[str, str] = {}  # object id -> a file it is (for error messages)
        try:
            with _quiet_dvc():
                self._repo = Repo(os.fspath(root), uninitialized=False)
        except NotDvcRepoError as e:
            raise NotARepositoryError(root, "DVC") from e

    def close(self) -> None:
        self._repo.close()

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

    def share_config_with(self, worktree: Path) -> None:
        """Let a linked Git worktree use this repository's cache and local remote config."""
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
        target = self.root / path
        if not target.exists():
            return True
        from dvc_data.hashfile.build import build

        cache = self._repo.cache.local
        with _quiet_dvc():
            _, _, obj = build(cache, os.fspath(target), cache.fs, "md5", ignore=None)
        if isinstance(obj, Tree):
            return all(cache.exists(hi.value) for _, _, hi in obj)
        return cache.exists(obj.hash_info.value)

    # --- objects -------------------------------------------------------------------------

    def tree(self, md5_dir: str, *, remote: str | None = None) -> list[TreeFile]:
        """Files of a directory object, fetching just its listing from the remote if needed."""
        tree = self._load_tree(md5_dir, remote=remote)
        return [
            TreeFile("/".join(key), hi.value, getattr(meta, "size", None))
            for key, meta, hi in tree
        ]

    def _load_tree(self, md5_dir: str, *, remote: str | None = None) -> Tree:
        """A directory object, healed or fetched, whose every name stays inside the directory
        and whose every id is an md5: a remote's listing is data anyone with write access made."""
        check_oid(md5_dir, field="directory object")
        if not md5_dir.endswith(".dir"):
            raise MalformedDataError(
                "DVC object", "directory object", md5_dir, expected="an id ending in '.dir'"
            )
        self.fetch([md5_dir], remote=remote)
        self.heal([md5_dir], remote=remote)
        cache = self._repo.cache.local
        try:
            tree = Tree.load(cache, HashInfo("md5", md5_dir))
        except Exception as e:  # not JSON, not a list of entries: DVC raises what it meets
            raise MalformedDataError(
                f"DVC directory object {md5_dir}", "content", first_line(e), expected="a listing"
            ) from e
        for key, _, hi in tree:
            rel = "/".join(key)
            if str(relative_path(rel, field=f"file name in {md5_dir}", root=self.root)) != rel:
                raise MalformedDataError(
                    f"DVC directory object {md5_dir}", "file name", rel,
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
            md5s, path_of=self.object_path, digest=md5_of,
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
            links_under=scratch_dir(self),
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
                    callback=_Cb(progress), verify=False, shallow=True,
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

    def push(
        self, md5s: Iterable[str], *, remote: str | None = None, progress: Progress | None = None
    ) -> int:
        """Copy objects from the local cache to the remote; returns how many were sent."""
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
                    callback=_Cb(progress), shallow=True,
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
        md5_dir: str,
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
        cache = self._repo.cache.local
        tree = self._load_tree(md5_dir)
        obj = tree.get_obj(cache, (prefix,)) if prefix else tree
        if obj is None:
            raise DataMissingError(f"{prefix} in {md5_dir}")
        oids = [hi.value for _, _, hi in obj] if isinstance(obj, Tree) else [obj.oid]
        self.fetch(oids, progress=progress)
        self.heal(oids, progress=progress)
        clean_side_dirs(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = side_path(dest, "new")
        try:
            for attempt in (1, 2):
                cb = _Cb(progress)
                cb.set_size(len(obj) if isinstance(obj, Tree) else 1)
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
            tmp.mkdir(exist_ok=True)  # an empty tree writes nothing
            if check is not None:
                check(tmp)
            swap_in(tmp, dest)
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def _remote_name(self, remote: str | None) -> str:
        if remote:
            return remote
        found = self.default_remote()
        return found[0] if found else "(none)"

    def _remote_odb(self, remote: str | None, command: str) -> Any:
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
        from dvc.fs import get_cloud_fs

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
    tree = Tree()
    for name, (md5, size) in files.items():
        tree.add(tuple(name.split("/")), Meta(size=size), HashInfo("md5", md5))
    tree.digest()
    return str(tree.oid), tree.as_bytes()


def find_root(path: Path) -> Path:
    """The root of the DVC repository holding ``path``."""
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


def repro(cwd: Path, *, quiet: bool = False) -> None:
    """``dvc repro`` in ``cwd``; its output goes straight to the terminal (it can take hours)."""
    cmd = [sys.executable, "-m", "dvc", "repro"] + (["--quiet"] if quiet else [])
    proc = subprocess.run(cmd, cwd=cwd, check=False)
    if proc.returncode != 0:
        raise ModelverError(
            f"'dvc repro' failed with exit code {proc.returncode} in {cwd}",
            hint="fix the stage, then run 'dvc repro' there again; checkpoints so far are kept",
        )
