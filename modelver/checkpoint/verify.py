"""Is a checkpoint whole? Every file's size and content hash, delta chains decoded, the
tensor index against each safetensors header, state.json, and each sharded tensor tiled by its
chunks."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from modelver.checkpoint import format as fmt
from modelver.checkpoint import tensorfile as tf
from modelver.checkpoint.catalog import resolve_checkpoint_dir
from modelver.checkpoint.delta import open_logical
from modelver.checkpoint.reader import read_state_json
from modelver.checkpoint.sharded import plan_sharded
from modelver.checkpoint.shardindex import read_index
from modelver.errors import CheckpointCorruptedError


def verify_checkpoint(path: str | Path) -> fmt.Manifest:
    """Check every file's size and content hash and the tensor index; raise on any mismatch."""
    path = resolve_checkpoint_dir(path)
    manifest = fmt.read_manifest(path)
    problems = fmt.verify_files(path, manifest)
    if not problems:
        manifest = read_index(path, manifest)  # every shard read, each already hash-checked
        problems = _delta_problems(path, manifest) + index_problems(path, manifest)
    if not problems:
        try:  # what restore checks before it reads a byte
            plan_sharded(path, manifest, read_state_json(path, manifest), live={}, state=None)
        except CheckpointCorruptedError as e:
            problems = e.problems
    if problems:
        raise CheckpointCorruptedError(path, problems)
    return manifest


def _delta_problems(path: Path, manifest: fmt.Manifest) -> list[str]:
    """A delta file is only as good as its base chain: decode it and check the logical hash."""
    problems = []
    for name, d in sorted(manifest.deltas.items()):
        decoded = partial(_decoded_hash, path, manifest, name)
        try:
            problem = fmt.hash_problem(f"{name} decoded from {d.stored}", decoded, d.hash)
        except CheckpointCorruptedError as e:  # a base is missing, replaced or damaged
            problems += e.problems
            continue
        if problem:
            problems.append(problem)
    return problems


def _decoded_hash(path: Path, manifest: fmt.Manifest, name: str) -> str:
    with open_logical(path, manifest, name) as f:
        return tf.hash_safetensors(f, bytearray(tf.DECODED_BUF))


def index_problems(path: Path, manifest: fmt.Manifest) -> list[str]:
    """The tensor index must agree with each safetensors header (names, dtypes, ranges)."""
    problems = []
    by_file: dict[str, dict[str, fmt.TensorEntry]] = {}
    for e in manifest.tensors.values():
        by_file.setdefault(e.file, {})[e.name] = e
    for fname, entries in by_file.items():
        with open_logical(path, manifest, fname) as f:
            start, header = tf.read_safetensors_header(f)
        header.pop("__metadata__", None)
        if set(header) != set(entries):
            problems.append(f"{fname}: tensor index does not match the file header")
            continue
        for name, h in header.items():
            e = entries[name]
            rng = (start + h["data_offsets"][0], start + h["data_offsets"][1])
            if (
                tf.ST_TO_TORCH.get(h["dtype"]) != e.dtype
                or tuple(h["shape"]) != e.shape
                or rng != e.offsets
            ):
                problems.append(f"{fname}: entry {name} differs from the tensor index")
    return problems
