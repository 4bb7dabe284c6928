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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modelver import untrusted
from modelver.errors import MalformedDataError, NotSerializableError

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


def optimizer_param_names(state: Mapping[str, Any]) -> dict[str, list[str | None]]:
    """Each optimizer's parameters, in its param groups' order (that of their ids in its
    state dict), named ``component/name`` after the module of ``state`` holding them (None:
    in no module). Recorded at save because the ids alone cannot say which parameter a
    moment belongs to; found by identity, never guessed."""
    owner = {id(p): f"{comp}/{n}" for comp, obj in state.items()
             if isinstance(obj, torch.nn.Module) for n, p in obj.named_parameters()}
    return {comp: [owner.get(id(p)) for g in obj.param_groups for p in g["params"]]
            for comp, obj in state.items() if isinstance(obj, torch.optim.Optimizer)}


def flatten(
    component: str, value: Any, frozen: set[str] | None = None
) -> tuple[Any, list[FlatTensor]]:
    """JSON skeleton with ``{"__tensor__": name}`` placeholders, and the tensors in order."""
    flat = _Flattener(component, frozen or set())
    return flat.walk(value, ()), flat.tensors


def live_tensors(component: str, obj: Any) -> dict[str, torch.Tensor]:
    """The tensors of a component's live state by their saved names, for a restore to read into
    in place: detached, except a plain tensor that needs no grad, which is itself (then nothing
    is copied onto it after the read)."""
    flat = _Flattener(component, set())
    if isinstance(obj, torch.Tensor):
        flat.tensor(obj, ())
    else:
        flat.walk(component_state(obj), ())
    return {f.name: f.tensor if type(f.tensor) is torch.Tensor and not f.tensor.requires_grad
            else f.tensor.detach() for f in flat.tensors}


class _Flattener:
    """:func:`flatten`'s walk. A class, not a nested recursive function: such a function holds
    itself through its closure, a reference cycle per call that only the cyclic collector
    frees (10^5 components: 10^5 cycles, each holding its tensors)."""

    def __init__(self, component: str, frozen: set[str]) -> None:
        self.component = component
        self.frozen = frozen
        self.tensors: list[FlatTensor] = []

    def walk(self, v: Any, path: tuple[str, ...]) -> Any:
        if isinstance(v, torch.Tensor):
            return self.tensor(v, path)
        if isinstance(v, np.ndarray):
            return {"__ndarray__": self.walk(torch.from_numpy(np.ascontiguousarray(v)), path)}
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, (int, float)):
            return v
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, Mapping):
            if all(isinstance(k, str) for k in v):
                return {k: self.walk(x, (*path, k)) for k, x in v.items()}
            items = []
            for k, x in v.items():
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise NotSerializableError(self.component + "/" + "/".join(path), k)
                items.append([k, self.walk(x, (*path, str(k)))])
            return {"__dict__": items}
        if isinstance(v, torch.Size):
            return {"__size__": list(v)}
        if isinstance(v, tuple):
            return {"__tuple__": [self.walk(x, (*path, str(i))) for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [self.walk(x, (*path, str(i))) for i, x in enumerate(v)]
        if isinstance(v, torch.dtype):
            return {"__dtype__": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"__device__": str(v)}
        raise NotSerializableError(self.component + "/" + "/".join(path), v)

    def tensor(self, v: torch.Tensor, path: tuple[str, ...]) -> dict[str, str]:
        name = self.component + "/" + "/".join(path)
        key = "/".join(path)
        group = key.rsplit(".", 1)[0] if len(path) == 1 else "/".join(path[:-1])
        self.tensors.append(FlatTensor(name, v, group, key in self.frozen))
        return {"__tensor__": name}


_MARKERS = {"__tensor__", "__ndarray__", "__dict__", "__tuple__", "__size__", "__dtype__",
            "__device__"}
_MARKER_RE = re.compile(r"^__\w+__$")
_WHAT = "state.json"


def _bad(value: object, expected: str) -> MalformedDataError:
    return MalformedDataError(_WHAT, "a value", value, expected=expected)


def unflatten(
    skeleton: Any, tensors: Mapping[str, torch.Tensor] | None, *, names: set[str] | None = None
) -> Any:
    """Inverse of :func:`flatten`; dicts come back as ``OrderedDict`` like ``state_dict()``.

    Strict: an unknown ``__marker__`` or a marker of the wrong shape raises
    :class:`MalformedDataError`. With ``tensors=None`` it only checks (every tensor reference
    must be in ``names``), so a restore can reject a bad ``state.json`` before anything changes.
    """
    if type(skeleton) is dict and len(skeleton) == 1 and "__tensor__" in skeleton:
        # a bare tensor's component (10^5 of them in a state of many): no walk to set up
        return _tensor_ref(skeleton["__tensor__"], tensors, names)
    return _Unflattener(tensors, names).walk(skeleton)


def _tensor_ref(
    inner: Any, tensors: Mapping[str, torch.Tensor] | None, names: set[str] | None
) -> Any:
    """What ``{"__tensor__": inner}`` stands for: the tensor, or None when only checking."""
    known = names if tensors is None else tensors
    if not isinstance(inner, str) or known is None or inner not in known:
        raise _bad(inner, "the name of a stored tensor")
    return None if tensors is None else tensors[inner]


class _Unflattener:
    """:func:`unflatten`'s walk (a class for the reason :class:`_Flattener` is one)."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor] | None, names: set[str] | None
    ) -> None:
        self.tensors = tensors
        self.names = names

    def walk(self, v: Any) -> Any:
        if isinstance(v, list):
            return [self.walk(x) for x in v]
        if not isinstance(v, dict):
            return v
        if len(v) == 1:
            ((key, inner),) = v.items()
            if key in _MARKERS:
                return self.marker(key, inner)
            if _MARKER_RE.match(key):
                raise MalformedDataError(_WHAT, "marker", key, expected="a known __marker__")
        return OrderedDict((k, self.walk(x)) for k, x in v.items())

    def marker(self, key: str, inner: Any) -> Any:
        if key == "__tensor__":
            return _tensor_ref(inner, self.tensors, self.names)
        if key == "__ndarray__":
            if not (isinstance(inner, dict) and list(inner) == ["__tensor__"]):
                raise _bad(inner, "a tensor reference")
            t = self.walk(inner)
            return None if t is None else t.numpy()
        if key in ("__dict__", "__tuple__", "__size__") and not isinstance(inner, list):
            raise _bad(inner, f"a list after {key}")
        if key == "__dict__":
            pairs = []
            for item in inner:
                if not (isinstance(item, list) and len(item) == 2) or isinstance(
                    item[0], list | dict
                ):
                    raise _bad(item, "a [key, value] pair with a scalar key")
                pairs.append((item[0], self.walk(item[1])))
            return OrderedDict(pairs)
        if key == "__tuple__":
            return tuple(self.walk(x) for x in inner)
        if key == "__size__":
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in inner):
                raise _bad(inner, "a list of sizes")
            return torch.Size(inner)
        if key == "__dtype__":
            dtype = getattr(torch, inner, None) if isinstance(inner, str) else None
            if not isinstance(dtype, torch.dtype):
                raise _bad(inner, "a torch dtype name")
            return dtype
        if not isinstance(inner, str) or len(inner) > 64:
            raise _bad(inner, "a device name")
        try:
            return torch.device(inner)
        except (RuntimeError, ValueError) as e:
            raise _bad(inner, "a device name") from e


def skeleton_is_dict(value: object) -> bool:
    """Whether a state.json value comes back from :func:`unflatten` as a dict: a plain object
    or a ``__dict__`` marker, not another marker (checked before ``.items()`` is called)."""
    if not isinstance(value, dict):
        return False
    if len(value) != 1:
        return True
    key = next(iter(value))
    return key == "__dict__" or not _MARKER_RE.match(key)


def safe_filename(component: str) -> str:
    return _UNSAFE.sub("_", component) or "_"


# --- RNG --------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    raw = bytearray(base64.b64decode(s, validate=True))
    if not raw:
        raise ValueError("an empty RNG state")
    return torch.frombuffer(raw, dtype=torch.uint8)


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
    """Put the saved global RNG states back (checked in full first: nothing half-set)."""
    prepare_rng(rng)()


def prepare_rng(rng: object) -> Callable[[], None]:
    """Check saved RNG states on scratch generators and return what sets the global ones.

    Every state is validated before the returned call, which then cannot fail half-way."""
    try:
        return _prepare_rng(untrusted.mapping(rng, what=_WHAT, field="rng"))
    except MalformedDataError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError) as e:
        raise MalformedDataError(_WHAT, "rng", str(e), expected="saved RNG states") from e


def _prepare_rng(rng: Mapping[str, Any]) -> Callable[[], None]:
    version, internal, gauss = rng["python"]
    py_state = (version, tuple(internal), gauss)
    random.Random().setstate(py_state)  # validates (raises) without touching the global one
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np_state = (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached)
    np.random.RandomState().set_state(np_state)
    torch_state = _unb64(_b64_text(rng["torch"]))
    torch.Generator().set_state(torch_state)
    cuda = rng.get("cuda")
    cuda_states: list[torch.Tensor] = []
    if cuda and torch.cuda.is_available():
        if not isinstance(cuda, list):
            raise TypeError("cuda RNG states are not a list")
        cuda_states = [_unb64(_b64_text(s)) for s in cuda]
        size = torch.cuda.get_rng_state(0).numel() if torch.cuda.device_count() else 0
        if any(s.numel() != size for s in cuda_states):
            raise ValueError("a CUDA RNG state has the wrong size")

    def apply() -> None:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states:
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
            else:  # a different number of GPUs: seed what overlaps, the rest keep theirs
                for i, st in enumerate(cuda_states[: torch.cuda.device_count()]):
                    torch.cuda.set_rng_state(st, i)

    return apply


def _b64_text(s: object) -> str:
    if not isinstance(s, str) or len(s) > 1 << 20:
        raise TypeError("an RNG state is not base64 text")
    return s
