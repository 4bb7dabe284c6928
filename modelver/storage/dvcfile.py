"""What the DVC backend needs no DVC import for: ``dvc.yaml`` and ``dvc.lock`` read as the plain
YAML they are, object ids checked, the embedded remote's place, ``dvc repro`` as a process.

What a commit declares (``artifacts:``) and pins (a stage output's md5, size and params) is
data the commit carries: paths must stay inside the repository, hashes must be hex.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from modelver.errors import MalformedDataError, ModelverError
from modelver.untrusted import integer, mapping, relative_path

_LOCK_HASH = re.compile(r"^[0-9a-f]{32}(\.dir)?$")  # dvc.lock md5
_OID_RE = re.compile(r"^[0-9a-f]{32}(\.dir)?$")


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


def parse_artifacts(dvc_yaml: str | None, *, source: str = "dvc.yaml") -> dict[str, Artifact]:
    """The ``artifacts:`` section of a ``dvc.yaml`` (or ``modelver.yaml``) text.

    Paths are data a commit carries: each must be relative and stay inside the repository
    (:class:`~modelver.errors.UnsafePathError` otherwise), returned normalised."""
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


def check_oid(oid: object, *, field: str = "object id") -> str:
    """A DVC md5 object id (``.dir`` for a directory): it becomes a cache and remote path."""
    if not isinstance(oid, str) or not _OID_RE.fullmatch(oid):
        raise MalformedDataError(
            "DVC object", field, oid, expected="32 hex digits (with '.dir' for a directory)"
        )
    return oid


# --- the repository ------------------------------------------------------------------------


def default_remote_dir(root: Path) -> Path:
    """The embedded default remote: a directory outside the repository, per repository."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha1(str(root.resolve()).encode(), usedforsecurity=False).hexdigest()[:8]
    return base / "modelver" / "remotes" / f"{root.name}-{digest}"


def repro(cwd: Path, *, quiet: bool = False) -> None:
    """``dvc repro`` in ``cwd``; its output goes straight to the terminal (it can take hours)."""
    cmd = [sys.executable, "-m", "dvc", "repro"] + (["--quiet"] if quiet else [])
    proc = subprocess.run(cmd, cwd=cwd, check=False)
    if proc.returncode != 0:
        raise ModelverError(
            f"'dvc repro' failed with exit code {proc.returncode} in {cwd}",
            hint="fix the stage, then run 'dvc repro' there again; checkpoints so far are kept",
        )
