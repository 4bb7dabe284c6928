"""Metrics of a model version as DVC sees them: the metrics files ``dvc.yaml`` declares.

Read from Git at a commit (or from the DVC cache when the file is a cached output) without
importing ``dvc``, in the shape ``dvc metrics show`` gives: nested keys joined with '.'.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml

from modelver.errors import ModelverError
from modelver.gitrepo import GitRepo
from modelver.refs import open_dvc

CHECKPOINT_PREFIX = "checkpoint."  # manifest metrics are always reachable under this prefix


def metrics_paths(dvc_yaml: str | None) -> list[str]:
    """Metrics files that ``dvc.yaml`` declares: stages' ``metrics:`` and the top-level list."""
    try:
        data = yaml.safe_load(dvc_yaml) if dvc_yaml else None
    except yaml.YAMLError:
        return []
    if not isinstance(data, dict):
        return []
    entries: list[Any] = list(data.get("metrics") or [])
    for stage in (data.get("stages") or {}).values():
        if isinstance(stage, dict):
            entries += list(stage.get("metrics") or [])
    paths = []
    for e in entries:
        if isinstance(e, str):
            paths.append(e)
        elif isinstance(e, dict):
            paths += [str(k) for k in e]
    return list(dict.fromkeys(paths))


def metrics_files(git: GitRepo, commit: str | None) -> dict[str, dict[str, float]]:
    """path -> flattened numeric metrics, as ``dvc metrics show`` reads them at ``commit``
    (None: the workspace). A file DVC caches instead of Git is read from the DVC cache."""
    from modelver.dvcrepo import find_locked_out

    dvc_yaml = (
        (git.root / "dvc.yaml").read_text() if commit is None and (git.root / "dvc.yaml").is_file()
        else git.read_file(commit, "dvc.yaml") if commit else None
    )
    found: dict[str, dict[str, float]] = {}
    for rel in metrics_paths(dvc_yaml):
        if commit is None:
            p = git.root / rel
            text = p.read_text() if p.is_file() else None
        else:
            text = git.read_file(commit, rel)
            out = find_locked_out(git.read_file(commit, "dvc.lock"), rel) if text is None else None
            if out is not None:
                text = _cached_text(git, out.md5)
        if text is not None:
            found[rel] = parse_metrics(rel, text)
    return found


def _cached_text(git: GitRepo, md5: str) -> str | None:
    """A metrics file DVC caches (``cache: true``, the default): its object, fetched if needed."""
    dvc = open_dvc(git.root)
    try:
        dvc.fetch([md5])
        return dvc.object_path(md5).read_text()
    except (ModelverError, OSError):
        return None
    finally:
        dvc.close()


def parse_metrics(path: str, text: str) -> dict[str, float]:
    """Numbers of a JSON or YAML metrics file, nested keys joined with '.' (as DVC does)."""
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        return {}
    flat: dict[str, float] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and prefix:
            flat[prefix] = float(value)

    walk(data, "")
    return flat


def merge(
    manifest: Mapping[str, float], files: Mapping[str, dict[str, float]]
) -> tuple[dict[str, float], dict[str, str]]:
    """Metrics files win a bare name (evaluation beats the training loss of the same name);
    the manifest's metrics are also ``checkpoint.NAME``."""
    metrics: dict[str, float] = {}
    sources: dict[str, str] = {}
    for rel, values in files.items():
        for k, val in values.items():
            if k not in metrics:
                metrics[k], sources[k] = val, rel
    for k, val in manifest.items():
        metrics[CHECKPOINT_PREFIX + k], sources[CHECKPOINT_PREFIX + k] = float(val), "checkpoint"
        if k not in metrics:
            metrics[k], sources[k] = float(val), "checkpoint"
    return metrics, sources
