"""modelver export: a version's (or any checkpoint's) weights as files for serving and sharing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

Progress = Callable[[int, int], None]

if TYPE_CHECKING:
    from modelver.checkpoint.export import ExportResult


def export(
    ref: str,
    *,
    to: str | Path,
    format: str = "safetensors",
    dtype: str | None = None,
    component: str = "model",
    max_shard_size: int | None = None,
    force: bool = False,
    repo_root: str | Path = ".",
    progress: Progress | None = None,
) -> ExportResult:
    """Export REF's ``component`` (no optimizer state) into directory ``to``.

    REF is resolved as ``show``/``diff``/``checkout`` resolve it: a version, a stage, a commit,
    a DVC experiment, or a checkpoint directory (a step directory or a checkpoints root; also
    outside a Git repository). A version's checkpoint is read from the DVC cache (fetched when
    missing) and its files carry the version, commit and checkpoint hash in their metadata.
    """
    from modelver.checkpoint.export import DEFAULT_MAX_SHARD_SIZE, export_checkpoint
    from modelver.errors import NotARepositoryError
    from modelver.materialize import local_step_dir, materialize_step
    from modelver.refs import ResolvedRef, open_git, resolve_ref
    from modelver.storage import open_storage

    provenance: dict[str, str] = {}
    try:
        r = resolve_ref(repo_root, ref, action="cannot export")
    except NotARepositoryError:
        if "@" in ref or "#" in ref:  # meant a version: say there is no repository
            raise
        # outside Git only a directory makes sense (local_step_dir refuses anything else)
        r = ResolvedRef(kind="path", ref=ref, path=Path(repo_root, ref).resolve())
    if r.path is not None:
        step_dir = local_step_dir(r.path)
    else:
        st = open_storage(open_git(repo_root).root)
        try:
            step_dir, r, _ = materialize_step(st, r, progress=progress)
        finally:
            st.close()
        provenance = {
            "modelver.version": r.tag or "",
            "modelver.commit": r.commit or "",
            "modelver.checkpoint": r.checkpoint_hash or "",
            "modelver.step_dir": r.step_dir or "",
        }
    return export_checkpoint(
        step_dir, Path(repo_root, to), format=format, dtype=dtype, component=component,
        max_shard_size=DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size,
        force=force, provenance={k: v for k, v in provenance.items() if v}, progress=progress,
    )
