"""Where versions' checkpoint data lives: DVC (the default) or Git LFS, one module each.

The backend is chosen by ``modelver.yaml`` at the repository root (``backend: lfs``, written by
``modelver init --backend lfs``); without that file it is DVC. Artifacts are declared under
``artifacts:`` in ``dvc.yaml`` when it declares any, else in ``modelver.yaml`` (same schema:
``artifacts: {NAME: {path: PATH}}``).

:class:`~modelver.storage.base.Storage` is the whole contract; nothing outside this package
asks which backend it has. A new backend is one module and one line in :data:`BACKENDS`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

from modelver.errors import MalformedDataError, ModelverError, clip
from modelver.storage.base import Pin, Setup, Storage, TreeFile
from modelver.untrusted import relative_path

__all__ = ["BACKENDS", "CONFIG", "Pin", "Setup", "Storage", "TreeFile", "backend", "open_storage"]

CONFIG = "modelver.yaml"
BACKENDS = {  # name -> "module:class"; a module is imported when its backend is used
    "dvc": "modelver.storage.dvc:DvcStorage",
    "lfs": "modelver.storage.lfs:LfsStorage",
}


def read_config(text: str | None) -> dict[str, Any]:
    """``modelver.yaml`` as a dict ({} when absent or not a mapping).

    The file is committed data: YAML that does not parse, an unknown backend, or an artifact
    path that leaves the repository is one error line, never a traceback nor a path outside."""
    try:
        data = yaml.safe_load(text) if text else None
    except yaml.YAMLError as e:
        raise MalformedDataError(CONFIG, "content", str(e).splitlines()[0], expected="YAML") from e
    if not isinstance(data, dict):
        return {}
    name = data.get("backend", "dvc")
    if not isinstance(name, str) or name not in BACKENDS:
        raise ModelverError(
            f"{CONFIG}: unknown backend {clip(name)}", hint=f"use one of {', '.join(BACKENDS)}"
        )
    arts = data.get("artifacts")
    if isinstance(arts, dict):
        for art, spec in arts.items():
            if isinstance(spec, dict) and spec.get("path"):
                relative_path(
                    spec["path"], field=f"{CONFIG} artifacts.{art}.path", root="<repository>"
                )
    return data


def write_config(root: Path, *, backend: str, artifacts: dict[str, str]) -> bool:
    """Write ``modelver.yaml`` unless it exists; True when written."""
    f = root / CONFIG
    if f.is_file():
        return False
    data: dict[str, Any] = {"backend": backend}
    if artifacts:
        data["artifacts"] = {name: {"path": path} for name, path in artifacts.items()}
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    return True


def backend(root: Path | None = None, *, name: str | None = None) -> type[Storage]:
    """The backend class of the repository at ``root`` (or the one called ``name``)."""
    if name is None:
        assert root is not None
        f = root / CONFIG
        name = str(read_config(f.read_text() if f.is_file() else None).get("backend", "dvc"))
    module, _, cls = BACKENDS[name].partition(":")
    found: type[Storage] = getattr(importlib.import_module(module), cls)
    return found


def open_storage(root: Path) -> Storage:
    return backend(root)(root)  # type: ignore[call-arg]
