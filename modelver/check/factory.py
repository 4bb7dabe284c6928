"""``--model MODULE:FACTORY``: importing the user's callable that builds the training state.

The one place that edits ``sys.path``, and only for the import: the repository root (and a
``file.py``'s own directory) go on it and come off again.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from modelver.errors import InvalidModelSpecError


def load_factory(spec: str, *, root: Path) -> Callable[[], Any]:
    """``MODULE:FACTORY`` (imported with ``root`` on sys.path) or ``file.py:FACTORY``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr.isidentifier():
        raise InvalidModelSpecError(spec, "expected MODULE:FACTORY")
    try:
        with _on_path(root):
            if module_name.endswith(".py") or "/" in module_name:
                path = Path(module_name) if Path(module_name).is_absolute() else root / module_name
                if not path.is_file():
                    raise InvalidModelSpecError(spec, f"no such file {path}")
                loader = importlib.util.spec_from_file_location(path.stem, path)
                assert loader is not None and loader.loader is not None
                module = importlib.util.module_from_spec(loader)
                with _on_path(path.parent):
                    loader.loader.exec_module(module)
            else:
                module = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidModelSpecError(spec, f"cannot import it ({e})") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InvalidModelSpecError(spec, f"{module_name} has no callable '{attr}'")
    return factory


@contextmanager
def _on_path(directory: Path) -> Iterator[None]:
    entry = str(directory.resolve())
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)
