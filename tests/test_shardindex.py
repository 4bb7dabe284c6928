"""The chunk layout rebuilt from index entries, and the check that it tiles what a reader fills
(DCP itself leaves any region no chunk covers unfilled, silently)."""

from __future__ import annotations

import pytest

from modelver.checkpoint import format as fmt
from modelver.checkpoint import shardindex
from modelver.checkpoint.shardindex import ShardedTensor, chunk_layout, cover_problem
from modelver.errors import MalformedDataError


def manifest(chunks: dict[str, tuple[int, ...]], dtype: str = "float32") -> fmt.Manifest:
    entries = {
        name: fmt.TensorEntry(name, "dcp-m/00000.safetensors", dtype, shape, (8, 8), "0" * 32)
        for name, shape in chunks.items()
    }
    plain = fmt.TensorEntry("m/other@0", "m-00000.safetensors", "int64", (3,), (8, 32), "0" * 32)
    files = {f: fmt.FileEntry(f, 32, "0" * 32) for f in ("dcp-m/00000.safetensors",
                                                          "m-00000.safetensors")}
    return fmt.Manifest(1, None, "", {}, files, {**entries, plain.name: plain})


def layout(shape: list[int], chunks: dict[str, tuple[int, ...]]) -> ShardedTensor:
    sharded = {"m/w": {"dtype": "float32", "shape": shape}}
    return chunk_layout(sharded, manifest(chunks))["m/w"]


def test_the_layout_is_rebuilt_from_chunk_names_and_entry_shapes() -> None:
    w = layout([4, 6], {"m/w@0,0": (2, 6), "m/w@2,0": (2, 6)})
    assert w.shape == (4, 6) and w.dtype == "float32"
    assert [(c.offsets, c.sizes) for c in w.chunks] == [((0, 0), (2, 6)), ((2, 0), (2, 6))]
    # a plain tensor whose name happens to hold "@" is no chunk: it lives in a top-level file
    assert shardindex.chunk_names(manifest({"m/w@0,0": (4, 6)})) == {"m/w@0,0"}


@pytest.mark.parametrize("name, shape", [
    ("m/w@0,1", (4, 6)),  # leaves the tensor
    ("m/w@0", (4, 6)),  # one offset for two dimensions
    ("m/w@0,0", (4,)),  # a box of one dimension
    ("m/w@0,²", (4, 6)),  # not ASCII digits
    ("m/w@-1,0", (4, 6)),
    ("m/w@" + "9" * 25 + ",0", (4, 6)),
    ("m/w", (4, 6)),  # no offsets at all
    ("m/v@0,0", (4, 6)),  # of no sharded tensor
])
def test_a_chunk_entry_that_is_no_box_inside_its_tensor_is_refused(
    name: str, shape: tuple[int, ...]
) -> None:
    with pytest.raises(MalformedDataError, match="a chunk inside a sharded tensor"):
        layout([4, 6], {name: shape})


def test_a_chunk_of_another_dtype_is_refused() -> None:
    sharded = {"m/w": {"dtype": "float32", "shape": [4]}}
    with pytest.raises(MalformedDataError, match="of its dtype"):
        chunk_layout(sharded, manifest({"m/w@0": (4,)}, dtype="bfloat16"))


def test_chunks_that_tile_the_tensor_or_a_box_of_it_pass() -> None:
    grid = {f"m/w@{r},{c}": (2, 3) for r in (0, 2) for c in (0, 3)}  # a 2 x 2 mesh
    w = layout([4, 6], grid)
    assert cover_problem("m/w", w, (0, 0), (4, 6)) is None
    assert cover_problem("m/w", w, (1, 2), (2, 3)) is None  # a box across four chunks
    assert cover_problem("m/w", w, (0, 0), (0, 6)) is None  # an empty local shard


def test_a_gap_or_an_overlap_is_named() -> None:
    gap = layout([4, 6], {"m/w@0,0": (2, 6), "m/w@3,0": (1, 6)})
    assert "without data" in (cover_problem("m/w", gap, (0, 0), (4, 6)) or "")
    assert cover_problem("m/w", gap, (0, 0), (2, 6)) is None  # this box is whole
    assert "[1, 0]+[2, 6]" in (cover_problem("m/w", gap, (1, 0), (2, 6)) or "")
    over = layout([4, 6], {"m/w@0,0": (3, 6), "m/w@2,0": (2, 6)})
    assert "overlap" in (cover_problem("m/w", over, (0, 0), (4, 6)) or "")
    # as many elements as the tensor, yet one chunk over another and a gap
    both = layout([4, 6], {"m/w@0,0": (2, 6), "m/w@1,0": (2, 6)})
    assert "overlap" in (cover_problem("m/w", both, (0, 0), (4, 6)) or "")
    # ... the same in the second dimension, within one row band
    for cols, how in (({"m/w@0,0": (2, 4), "m/w@0,2": (2, 2)}, "overlap"),
                      ({"m/w@0,0": (2, 2), "m/w@0,3": (2, 3)}, "without data")):
        assert how in (cover_problem("m/w", layout([2, 6], cols), (0, 0), (2, 6)) or "")


def test_a_0d_tensor_is_covered_by_its_one_chunk() -> None:
    sharded = {"m/s": {"dtype": "float32", "shape": []}}
    s = chunk_layout(sharded, manifest({"m/s@": ()}))["m/s"]
    assert cover_problem("m/s", s, (), ()) is None
    empty = chunk_layout(sharded, manifest({}))["m/s"]
    assert "without data" in (cover_problem("m/s", empty, (), ()) or "")


def test_chunks_too_many_to_compare_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    cells = {f"m/w@{r},{c}": (1, 1) for r in range(4) for c in range(6)}  # 6 per row band
    assert cover_problem("m/w", layout([4, 6], cells), (0, 0), (4, 6)) is None
    monkeypatch.setattr(shardindex, "MAX_PAIRS", 8)
    assert "too many" in (cover_problem("m/w", layout([4, 6], cells), (0, 0), (4, 6)) or "")
