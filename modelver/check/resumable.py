"""Can training continue from the candidate? A real restore, as a resumed run would do it.

Into what the user's factory builds, or, without one, into buffers rebuilt from the
checkpoint's own shapes (every tensor is still read and hash-checked, the architecture is not).
The process's RNG states are put back afterwards: a check must not perturb its caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from modelver.check.report import Resumability
from modelver.errors import InvalidModelSpecError, ModelverError


def check_resumable(
    step_dir: Path, *, factory: Callable[[], Any] | None, model: str | None
) -> Resumability:
    """Restore the checkpoint (tensors, state.json, RNG states) as a resumed run would: into
    what ``factory`` builds, or into buffers shaped like the saved tensors. The process's own
    RNG states are put back afterwards."""
    from modelver.checkpoint import format as fmt
    from modelver.checkpoint import restore_checkpoint
    from modelver.checkpoint.reader import read_state_json
    from modelver.checkpoint.state import capture_rng, is_stateful, restore_rng

    manifest = fmt.read_manifest(step_dir)
    saved = sorted(read_state_json(step_dir, manifest)["components"])
    if factory is not None:
        try:
            built = factory()
        except Exception as e:
            raise ModelverError(f"--model {model} raised {type(e).__name__}: {e}",
                                hint="run it in the repository root with the candidate's "
                                "params.yaml") from e
        state = dict(built) if isinstance(built, Mapping) else (
            {"model": built} if is_stateful(built) else None)
        if state is None:
            raise InvalidModelSpecError(str(model), "the factory must return a dict of "
                                        "components or a module")
        mode = "factory"
    else:
        state, mode = _rebuilt_state(step_dir, manifest), "shapes"
    rng = capture_rng()
    try:
        restore_checkpoint(step_dir, state)
    except ModelverError as e:  # a shape mismatch, a hash mismatch found while reading
        return Resumability("failed", mode, model, [], saved, e.message)
    except Exception as e:  # the user's objects refused their state (a sampler, a scheduler)
        return Resumability("failed", mode, model, [], saved, f"{type(e).__name__}: {e}")
    finally:
        restore_rng(rng)
    restored = [c for c in saved if c in state]
    return Resumability("ok", mode, model, restored, [c for c in saved if c not in state], None)


class _Rebuilt:
    """A stand-in for a component: ``state_dict()`` is the saved structure with empty tensors
    of the saved shapes, so the restore reads every tensor into place and checks it."""

    def __init__(self, skeleton: Any, buffers: Mapping[str, Any]) -> None:
        from modelver.checkpoint.state import unflatten

        self._state = unflatten(skeleton, buffers)

    def state_dict(self) -> Any:
        return self._state

    def load_state_dict(self, value: Any) -> None:
        self._state = value


def _rebuilt_state(step_dir: Path, manifest: Any) -> dict[str, Any]:
    import torch

    from modelver.checkpoint.distributed import sharded_index
    from modelver.checkpoint.reader import read_state_json
    from modelver.checkpoint.shardindex import chunk_names

    meta = read_state_json(step_dir, manifest)
    chunks = chunk_names(manifest)
    shapes = {n: (e.shape, e.dtype) for n, e in manifest.tensors.items() if n not in chunks}
    shapes.update(sharded_index(meta))
    buffers = {n: torch.empty(s, dtype=getattr(torch, d)) for n, (s, d) in shapes.items()}
    buffers.update({a: buffers[t] for a, t in meta.get("aliases", {}).items() if t in buffers})
    return {c: _Rebuilt(d["state"], buffers) for c, d in meta["components"].items()}
