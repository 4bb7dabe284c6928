"""``-S key.path=value`` overrides of ``params.yaml``, the way ``dvc exp run -S`` takes them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelver.errors import ModelverError


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with a YAML value (``lr=0.1`` is a float, ``name=x`` a string)."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ModelverError(f"invalid override '{text}'", hint="use -S key.path=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(params_file: Path, overrides: Mapping[str, Any]) -> None:
    """Set dotted keys in params.yaml, keeping its comments and order."""
    from ruamel.yaml import YAML

    yml = YAML()
    data = yml.load(params_file.read_text()) if params_file.is_file() else None
    data = data if data is not None else {}
    for key, value in overrides.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[last] = value
    with open(params_file, "w") as f:
        yml.dump(data, f)
