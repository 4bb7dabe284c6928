"""The MLflow mirror: ``modelver mlflow sync`` as a function (needs the 'mlflow' extra)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mlflow is imported only when a sync runs
    from modelver.integrations.mlflow import SyncResult


def mlflow_sync(
    name: str | None = None,
    *,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    repo_root: str | Path = ".",
) -> SyncResult:
    """Register every version (of ``name``) in an MLflow model registry, stages as aliases."""
    from modelver.integrations.mlflow import sync

    return sync(name, tracking_uri=tracking_uri, registry_uri=registry_uri, repo_root=repo_root)
