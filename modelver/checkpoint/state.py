"""Split training state into tensors and JSON, and put it back; RNG capture and restore.

No pickle: every non-tensor value must be JSON-representable. Tuples, non-string dict keys,
dtypes and NumPy arrays are encoded with small ``{"__kind__": ...}`` markers so they come back
with their exact Python types (an optimizer's ``betas`` stays a tuple, its state keys stay ints).
"""

from __future__ import annotations

import base64
import random
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modelver.errors import NotSerializableError

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class FlatTensor:
    """A tensor of the state with what the writer needs to place it in a file."""

    name: str
    tensor: torch.Tensor
    group: str  # tensors of one group always share a file (a module's weight and bias)
    frozen: bool  # requires_grad=False parameter: packed apart so its file stays byte-identical


def is_stateful(obj: object) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


def component_state(obj: object) -> Any:
    if is_stateful(obj):
        return obj.state_dict()  # type: ignore[attr-defined]
    return obj


def frozen_names(obj: object) -> set[str]:
    if isinstance(obj, torch.nn.Module):
        return {n for n, p in obj.named_parameters() if not p.requires_grad}
    return set()


def flatten(
    component: str, value: Any, frozen: set[str] | None = None
) -> tuple[Any, list[FlatTensor]]:
    """JSON skeleton with ``{"__tensor__": name}`` placeholders, and the tensors in order."""
    tensors: list[FlatTensor] = []
    frozen = frozen or set()

    def walk(v: Any, path: tuple[str, ...]) -> Any:
        if isinstance(v, torch.Tensor):
            name = component + "/" + "/".join(path)
            key = "/".join(path)
            group = key.rsplit(".", 1)[0] if len(path) == 1 else "/".join(path[:-1])
            tensors.append(FlatTensor(name, v, group, key in frozen))
            return {"__tensor__": name}
        if isinstance(v, np.ndarray):
            return {"__ndarray__": walk(torch.from_numpy(np.ascontiguousarray(v)), path)}
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, (int, float)):
            return v
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, Mapping):
            if all(isinstance(k, str) for k in v):
                return {k: walk(x, (*path, k)) for k, x in v.items()}
            items = []
            for k, x in v.items():
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise NotSerializableError(component + "/" + "/".join(path), k)
                items.append([k, walk(x, (*path, str(k)))])
            return {"__dict__": items}
        if isinstance(v, torch.Size):
            return {"__size__": list(v)}
        if isinstance(v, tuple):
            return {"__tuple__": [walk(x, (*path, str(i))) for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [walk(x, (*path, str(i))) for i, x in enumerate(v)]
        if isinstance(v, torch.dtype):
            return {"__dtype__": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"__device__": str(v)}
        raise NotSerializableError(component + "/" + "/".join(path), v)

    return walk(value, ()), tensors


def unflatten(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`; dicts come back as ``OrderedDict`` like ``state_dict()``."""

    def walk(v: Any) -> Any:
        if isinstance(v, list):
            return [walk(x) for x in v]
        if not isinstance(v, dict):
            return v
        if len(v) == 1:
            ((key, inner),) = v.items()
            if key == "__tensor__":
                return tensors[inner]
            if key == "__ndarray__":
                return walk(inner).numpy()
            if key == "__dict__":
                return OrderedDict((k, walk(x)) for k, x in inner)
            if key == "__tuple__":
                return tuple(walk(x) for x in inner)
            if key == "__size__":
                return torch.Size(inner)
            if key == "__dtype__":
                return getattr(torch, inner)
            if key == "__device__":
                return torch.device(inner)
        return OrderedDict((k, walk(x)) for k, x in v.items())

    return walk(skeleton)


def safe_filename(component: str) -> str:
    return _UNSAFE.sub("_", component) or "_"


# --- RNG --------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng() -> dict[str, Any]:
    """Every global RNG a training step may draw from (CUDA only if already initialised)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    out: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(rng: Mapping[str, Any]) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(rng["torch"]))
    cuda = rng.get("cuda")
    if cuda and torch.cuda.is_available():
        states = [_unb64(s) for s in cuda]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:  # a different number of GPUs: seed what overlaps, the rest keep theirs
            for i, s in enumerate(states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)
