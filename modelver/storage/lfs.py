"""The Git LFS backend: checkpoint tensor files as LFS objects of the Git repository.

Shells out to ``git`` and ``git lfs`` (GitPython stays in ``gitrepo.py``). A version's checkpoint
is the Git tree of the artifact path at the tagged commit (its hash is the identity recorded in
the tag). ``*.safetensors`` files are LFS pointers; ``MANIFEST.json`` and ``state.json`` stay
plain Git blobs, so tag, show and ``diff --stat`` read them without any LFS download. Files are
addressed by the sha256 of their content: the pointer's oid, or computed for plain blobs, which
are kept beside the LFS objects under ``<git dir>/modelver/blobs``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from modelver import versions
from modelver.checkpoint import format as fmt
from modelver.checkpoint.commit import write_beside
from modelver.errors import (
    CorruptObjectError,
    DataMissingError,
    DirtyWorkspaceError,
    InvalidArgumentError,
    MalformedDataError,
    ModelverError,
    NotPinnedError,
    RemoteError,
)
from modelver.hashing import sha256_file
from modelver.healing import corrupt, quarantine, set_aside
from modelver.storage.base import Pin, Progress, Setup, Storage, TreeFile
from modelver.untrusted import relative_path

if TYPE_CHECKING:
    from modelver.gitrepo import GitRepo
    from modelver.storage.dvcfile import Artifact
POINTER_MAX = 1024  # git-lfs pointers are ~130 bytes; it never cleans a file this small
_POINTER_HEAD = b"version https://git-lfs.github.com/spec/v1\n"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
REMOTE = "origin"


def lfs_patterns(path: str) -> list[str]:
    """``.gitattributes`` lines for an artifact path: tensor files (plain and delta-encoded)
    in LFS, JSON in Git."""
    return [
        f"{path}/**/*{suffix} filter=lfs diff=lfs merge=lfs -text"
        for suffix in (".safetensors", ".safetensors" + fmt.DELTA_SUFFIX)
    ]


def require_lfs() -> None:
    try:
        ok = subprocess.run(["git", "lfs", "version"], capture_output=True).returncode == 0
    except OSError:
        ok = False
    if not ok:
        raise ModelverError(
            "git-lfs is not installed", hint="install it (Debian: apt-get install git-lfs)"
        )


def _git(root: Path, *args: str, data: bytes | None = None, remote: bool = False) -> bytes:
    proc = subprocess.run(["git", *args], cwd=root, input=data, capture_output=True)
    if proc.returncode != 0:
        lines = [  # git-lfs ends with where its log went: the cause is the line before
            ln.strip() for ln in proc.stderr.decode(errors="replace").splitlines()
            if ln.strip() and not ln.startswith(("Errors logged to", "Use `git lfs logs"))
        ]
        cause = lines[-1] if lines else f"exit code {proc.returncode}"
        if remote:
            raise RemoteError(REMOTE, cause)
        raise ModelverError(f"'git {' '.join(args[:3])}' failed: {cause}")
    return proc.stdout


def init_lfs(root: Path, paths: Sequence[str]) -> list[str]:
    """``git lfs install --local`` and LFS patterns for ``paths``; returns the lines added."""
    require_lfs()
    _git(root, "lfs", "install", "--local")
    attrs = root / ".gitattributes"
    text = attrs.read_text() if attrs.is_file() else ""
    added = [ln for p in paths for ln in lfs_patterns(p) if ln not in text.splitlines()]
    if added:
        sep = "" if not text or text.endswith("\n") else "\n"
        attrs.write_text(text + sep + "".join(ln + "\n" for ln in added))
    return added


def tree_hash(root: Path, commit: str, path: str) -> str | None:
    """The Git tree hash of ``path`` at ``commit``; None when the commit has no such directory."""
    proc = subprocess.run(
        ["git", "ls-tree", "-d", commit, "--", path.rstrip("/")],
        cwd=root, capture_output=True, text=True,
    )
    head = proc.stdout.split("\t", 1)[0].split() if proc.returncode == 0 else []
    return head[2] if len(head) == 3 and head[1] == "tree" else None


def _parse_pointer(data: bytes, *, path: str) -> tuple[str, int] | None:
    """(oid, size) of an LFS pointer; None for a plain file. The oid names a file under
    ``.git/lfs/objects``: a committed pointer is data, so it must be 64 hex digits."""
    if not data.startswith(_POINTER_HEAD):
        return None
    what = f"Git LFS pointer {path}"
    text = data.decode(errors="replace")
    fields = dict(ln.split(" ", 1) for ln in text.splitlines() if " " in ln)
    oid = fields.get("oid", "")
    if not oid.startswith("sha256:"):
        return None
    oid = oid.removeprefix("sha256:")
    if not _SHA256_RE.fullmatch(oid):
        raise MalformedDataError(what, "oid", oid, expected="sha256: and 64 hex digits")
    size = fields.get("size", "0")
    if not size.isdigit() or len(size) > 20:
        raise MalformedDataError(what, "size", size, expected="a byte count")
    return oid, int(size)


class LfsStorage(Storage):
    """The Git LFS side of a working tree: listing, fetching and writing checkpoint trees."""

    kind = "lfs"
    saved_in = "committed to Git"
    runs_pipeline = False  # resume runs 'dvc repro' only where a dvc.yaml is
    tag_meta: ClassVar[dict[str, str]] = {"backend": "lfs"}  # the checkpoint: a Git tree id

    def __init__(self, root: Path) -> None:
        require_lfs()
        self.root = root
        common = _git(root, "rev-parse", "--git-common-dir").decode().strip()
        self.git_dir = (root / common).resolve()
        self.scratch = self.git_dir / "modelver" / "checkouts"
        self._blobs = self.git_dir / "modelver" / "blobs"
        self._pointers: dict[str, tuple[int, str]] = {}  # oid -> (size, path) for smudge
        self._blob_of: dict[str, str] = {}  # oid of a plain file -> its Git blob

    def close(self) -> None:
        """Nothing to release: every call is its own ``git`` process."""

    # --- class level: what a commit pins -----------------------------------------------------

    @classmethod
    def setup(
        cls, root: Path, *, remote: str | None, artifact: tuple[str, str],
        declared: Callable[[], Mapping[str, Artifact]],
    ) -> Setup:
        """Git LFS for the artifacts' paths (declared in modelver.yaml unless dvc.yaml
        declares artifacts); the remote is the Git remote 'origin'."""
        from modelver.storage import CONFIG, read_config, write_config

        if remote is not None:  # a usage error (exit 2), before anything is written
            raise InvalidArgumentError(
                "remote", remote,
                expected="none: with Git LFS the remote is the Git remote 'origin' "
                "(git remote add origin URL)",
            )
        cfg = root / CONFIG
        if read_config(cfg.read_text() if cfg.is_file() else None).get("backend", "lfs") != "lfs":
            raise DirtyWorkspaceError(f"{CONFIG} says another backend", hint=f"edit {CONFIG}")
        versions.check_name(artifact[0], "artifact name")
        written = write_config(
            root, backend="lfs", artifacts={} if declared() else {artifact[0]: artifact[1]}
        )
        added = init_lfs(root, sorted({a.path for a in declared().values()}))
        notes = tuple(f"Git LFS: added '{line}' to .gitattributes" for line in added)
        notes += ("wrote modelver.yaml (backend: lfs, artifacts)",) if written else ()
        notes += (
            "data goes to the Git remote 'origin' with 'modelver push'",
            "next: git add .gitattributes modelver.yaml && git commit -m 'modelver init'",
        )
        return Setup(False, REMOTE, False, "copy", added, written, notes)

    @classmethod
    def pin(cls, git: GitRepo, art: Artifact, commit: str, *, action: str) -> Pin:
        """The Git tree of the path; the params are params.yaml at the commit (no dvc.lock)."""
        import yaml

        found = tree_hash(git.root, commit, art.path)
        if found is None:
            raise NotPinnedError(
                art.name, commit[:10], reason=f"its tree has no '{art.path}'", action=action
            )
        text = git.read_file(commit, "params.yaml")
        data = yaml.safe_load(text) if text else None
        return Pin(found, None, {"params.yaml": data} if isinstance(data, dict) else {})

    @classmethod
    def check_tag_workspace(cls, git: GitRepo, art: Artifact) -> None:
        if git.is_modified(art.path):
            raise DirtyWorkspaceError(
                f"'{art.path}' has uncommitted changes",
                hint=f"git add {art.path} && git commit, then tag the new commit",
            )

    # --- objects ----------------------------------------------------------------------------

    def tree(self, tree_id: str) -> list[TreeFile]:
        """Files of a Git tree by content sha256 (plain blobs are copied aside on the way)."""
        out = _git(self.root, "ls-tree", "-r", "-l", "-z", tree_id)
        entries = []
        for rec in out.split(b"\0"):
            if not rec:
                continue
            head, name = rec.split(b"\t", 1)
            _, kind, sha, length = head.split()
            if kind == b"blob":
                entries.append((name.decode(), sha.decode(), int(length)))
        # small blobs may be pointers; read them (and the plain JSON files) in one process
        small = [e for e in entries if e[2] <= POINTER_MAX or not e[0].endswith(".safetensors")]
        contents = self._cat([blob for _, blob, _ in small])
        files = []
        for path, blob, size in entries:
            relative_path(path, field=f"file of tree {tree_id}", root=self.root)
            data = contents.get(blob)
            pointer = _parse_pointer(data, path=path) if data is not None else None
            if pointer is not None:
                self._pointers[pointer[0]] = (pointer[1], path)
                files.append(TreeFile(path, pointer[0], pointer[1]))
            else:  # plain JSON, or a large file committed without LFS: read through Git
                if data is None:
                    data = _git(self.root, "cat-file", "blob", blob)
                oid = hashlib.sha256(data).hexdigest()  # in memory: small
                self._blob_of[oid] = blob
                self._keep_blob(oid, data)
                files.append(TreeFile(path, oid, size))
        return files

    def _cat(self, blobs: Sequence[str]) -> dict[str, bytes]:
        if not blobs:
            return {}
        out = _git(self.root, "cat-file", "--batch", data="".join(b + "\n" for b in blobs).encode())
        found: dict[str, bytes] = {}
        pos = 0
        for blob in blobs:
            end = out.index(b"\n", pos)
            size = int(out[pos:end].split()[2])
            found[blob] = out[end + 1 : end + 1 + size]
            pos = end + 1 + size + 1
        return found

    def _keep_blob(self, oid: str, data: bytes) -> None:
        dest = self._blobs / oid
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{oid}.{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, dest)

    def object_path(self, md5: str) -> Path:
        lfs = self.git_dir / "lfs" / "objects" / md5[:2] / md5[2:4] / md5
        return lfs if lfs.is_file() or md5 in self._pointers else self._blobs / md5

    def missing_in_cache(self, md5s: Iterable[str]) -> list[str]:
        """Objects not here; a 40-digit hash is a Git object (a version's tree)."""
        return [m for m in md5s if not self._present(m)]

    def _present(self, oid: str) -> bool:
        if len(oid) == 40:
            return subprocess.run(["git", "cat-file", "-e", oid], cwd=self.root).returncode == 0
        return self.object_path(oid).is_file()

    def corrupt_in_cache(self, md5s: Iterable[str]) -> list[str]:
        """Objects here whose content no longer has their sha256 (read in full); a 40-digit
        hash is a Git object, which Git itself checks."""
        oids = [o for o in md5s if len(o) != 40]
        return corrupt(oids, path_of=self.object_path, digest=sha256_file)

    def heal(self, md5s: Iterable[str], *, progress: Progress | None = None) -> list[str]:
        """Move objects that fail their sha256 aside (``<git dir>/modelver/quarantine``, never
        deleted) and get them again: LFS objects from 'origin', plain files from Git."""
        bad = self.corrupt_in_cache(md5s)
        moved = set_aside(bad, path_of=self.object_path, folder=self._quarantine_dir())
        for oid in bad:
            if oid in self._blob_of:
                self._keep_blob(oid, _git(self.root, "cat-file", "blob", self._blob_of[oid]))
            try:
                self.fetch([oid], progress=progress)
            except CorruptObjectError as e:
                raise CorruptObjectError(
                    oid, name=self._name(oid), remote=REMOTE,
                    reason=f"failed its sha256 here (moved to {moved[oid]}) and the copy on "
                    f"'{REMOTE}' fails it too",
                ) from e
            except DataMissingError as e:
                raise CorruptObjectError(
                    oid, name=self._name(oid), remote=REMOTE,
                    reason=f"failed its sha256 here (moved to {moved[oid]}) and '{REMOTE}' does "
                    "not have it",
                ) from e
        return bad

    def _quarantine_dir(self) -> Path:
        return self.git_dir / "modelver" / "quarantine"

    def _name(self, oid: str) -> str | None:
        return self._pointers[oid][1] if oid in self._pointers else None

    def fetch(self, md5s: Iterable[str], *, progress: Progress | None = None) -> None:
        """Download missing LFS objects from 'origin' (``git lfs smudge`` of their pointers)."""
        wanted = self.missing_in_cache(md5s)
        for i, oid in enumerate(wanted):
            if oid not in self._pointers:
                raise DataMissingError(f"object {oid[:12]}", missing=[oid])
            size, path = self._pointers[oid]
            pointer = _POINTER_HEAD + f"oid sha256:{oid}\nsize {size}\n".encode()
            try:
                _git(self.root, "lfs", "smudge", path, data=pointer, remote=True)
            except RemoteError as e:
                if "invalid hash" not in e.message:
                    raise
                raise CorruptObjectError(  # git-lfs checked the download and kept nothing
                    oid, name=path, remote=REMOTE,
                    reason=f"fetched from '{REMOTE}' fails its sha256 (git-lfs refused it)",
                ) from e
            if progress is not None:
                progress(i + 1, len(wanted))
        still = self.missing_in_cache(wanted)
        if still:
            raise DataMissingError(f"{len(still)} object(s)", missing=still)
        bad = self.corrupt_in_cache(wanted)
        if bad:
            moved = quarantine(self.object_path(bad[0]), self._quarantine_dir(), name=bad[0])
            raise CorruptObjectError(
                bad[0], name=self._name(bad[0]), remote=REMOTE,
                reason=f"fetched from '{REMOTE}' fails its sha256 (moved to {moved})",
            )

    def materialize(
        self,
        tree_id: str,
        dest: Path,
        *,
        prefix: str | None = None,
        progress: Progress | None = None,
        check: Callable[[Path], None] | None = None,
    ) -> None:
        """Write a tree (or its ``prefix`` subdirectory) to ``dest``: copies of checked
        objects, built beside it and swapped in after ``check`` (given the new tree) returns,
        so ``dest`` holds exactly the tree's files, old or new, never a mix."""
        start = f"{prefix}/" if prefix else ""
        files = [f for f in self.tree(tree_id) if f.relpath.startswith(start)]
        if not files:
            raise DataMissingError(f"{prefix} in {tree_id}")
        self.fetch([f.oid for f in files], progress=progress)
        self.heal([f.oid for f in files], progress=progress)

        def fill(tmp: Path) -> None:
            for i, f in enumerate(files):
                target = tmp / f.relpath[len(start) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.object_path(f.oid), target)
                if progress is not None:
                    progress(i + 1, len(files))

        write_beside(dest, fill, check=check)

    def workspace_saved(self, path: str) -> bool:
        """Whether ``path`` matches HEAD (so replacing it loses nothing committed to Git)."""
        out = _git(self.root, "status", "--porcelain", "--untracked-files=all", "--", path)
        return not out.strip()

    def hash_file(self, path: Path) -> str:
        return sha256_file(path)

    def remote_tags(self) -> set[str]:
        """Tags 'origin' has (one ``git ls-remote``)."""
        out = _git(self.root, "ls-remote", "--tags", REMOTE, remote=True).decode()
        refs = (ln.split("\t", 1)[1] for ln in out.splitlines() if "\t" in ln)
        return {r.removeprefix("refs/tags/").removesuffix("^{}") for r in refs}

    def in_remote(self, oids: Sequence[str]) -> bool | None:
        return None  # no cheap query of 'origin'

    def share_with(self, worktree: Path) -> None:
        """Linked worktrees share the Git directory, and so the LFS objects, already."""

    def push(
        self, trees: Sequence[tuple[str, str, str | None]], *, what: str,
        progress: Progress | None = None,
    ) -> int:
        """The trees' LFS objects to 'origin'; an object missing here is fine when its
        version's tag is on 'origin' (a pushed tag means its data went first)."""
        if subprocess.run(["git", "remote", "get-url", REMOTE], cwd=self.root,
                          capture_output=True).returncode != 0:
            raise RemoteError(REMOTE, "no Git remote 'origin' (Git LFS stores data there)")
        on_origin = self.remote_tags()
        wanted: list[str] = []
        for tree_id, label, tag in trees:
            files = [f.oid for f in self.tree(tree_id)]
            absent = set(self.missing_in_cache(files))
            if absent and tag not in on_origin:
                raise DataMissingError(f"{len(absent)} object(s) of {label}")
            wanted += [m for m in files if m not in absent]
        return self._upload(wanted)

    def _upload(self, md5s: Iterable[str]) -> int:
        """Upload these LFS objects to 'origin' (by id: ``git lfs push <refs>`` would skip
        objects of commits 'origin' already has); returns how many were handed over."""
        oids = [m for m in dict.fromkeys(md5s) if m in self._pointers]
        for i in range(0, len(oids), 100):
            _git(self.root, "lfs", "push", REMOTE, "--object-id", *oids[i : i + 100], remote=True)
        return len(oids)
