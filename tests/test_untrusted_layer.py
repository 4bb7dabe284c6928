"""The shared validation layer itself (modelver.untrusted): what it refuses, what it returns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelver import untrusted
from modelver.errors import MalformedDataError, UnsafePathError


@pytest.mark.parametrize(
    "value",
    ["../x", "a/../../x", "/etc/passwd", "~/x", "", ".", "a\\..\\b", "a\x00b", 5, None, ["a"],
     "x" * 5000],
)
def test_relative_path_refuses(value: object, tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError) as e:
        untrusted.relative_path(value, field="path", root=tmp_path)
    assert "refusing path" in str(e.value) and len(str(e.value)) < 300


def test_relative_path_normalises(tmp_path: Path) -> None:
    assert str(untrusted.relative_path("./a//b/./c", field="f", root=tmp_path)) == "a/b/c"


def test_inside_refuses_symlinks_on_the_way(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "file-link").symlink_to(outside / "secret")
    for value in ("link/x", "link", "file-link"):
        with pytest.raises(UnsafePathError, match="symlink"):
            untrusted.inside(root, value, field="path")
    assert untrusted.inside(root, "new/dir/file", field="path") == root / "new/dir/file"


def test_inside_follows_no_symlinked_root_escape(tmp_path: Path) -> None:
    """A root that is itself a symlink is the caller's choice; paths below it still resolve in."""
    real = tmp_path / "real"
    (real / "a").mkdir(parents=True)
    alias = tmp_path / "alias"
    alias.symlink_to(real, target_is_directory=True)
    assert untrusted.inside(alias, "a", field="p") == alias / "a"


def test_step_dirname(tmp_path: Path) -> None:
    assert untrusted.step_dirname("step-00000012", field="s", root=tmp_path) == "step-00000012"
    for bad in ("step-12", "step-00000012/..", "../step-00000012", 12):
        with pytest.raises(UnsafePathError):
            untrusted.step_dirname(bad, field="s", root=tmp_path)


def test_load_json_bounds() -> None:
    deep = "[" * 200_000 + "]" * 200_000
    with pytest.raises(MalformedDataError):
        untrusted.load_json(deep, what="x")
    with pytest.raises(MalformedDataError, match="levels"):
        untrusted.load_json("[" * 150 + "]" * 150, what="x")
    with pytest.raises(MalformedDataError):
        untrusted.load_json("9" * 100_000, what="x")  # Python's int digit limit
    with pytest.raises(MalformedDataError, match="bytes"):
        untrusted.load_json("[]", what="x", max_bytes=1)
    with pytest.raises(MalformedDataError):
        untrusted.load_json(b"\xff", what="x")
    assert untrusted.load_json(json.dumps({"loss": float("nan")}), what="x")["loss"] != 0


def test_typed_fields() -> None:
    for bad in (True, 1.0, "1", None, -1):
        with pytest.raises(MalformedDataError):
            untrusted.integer(bad, what="tag", field="step")
    assert untrusted.integer(3, what="tag", field="step") == 3
    with pytest.raises(MalformedDataError, match=r"metrics\.acc"):
        untrusted.metrics({"acc": "high"}, what="tag")
    with pytest.raises(MalformedDataError):
        untrusted.metrics({"acc": True}, what="tag")
    with pytest.raises(MalformedDataError):
        untrusted.mapping([1], what="tag", field="meta")
    assert untrusted.metrics({"acc": 1}, what="tag") == {"acc": 1.0}
    assert not untrusted.finite(float("nan")) and not untrusted.finite(None)
    assert untrusted.finite(0.5)
