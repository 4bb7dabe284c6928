"""One component's weights out of a checkpoint, as files a serving stack or the Hub reads:
``model.safetensors`` (or Hugging Face's shards and index), and with ``hf`` a ``config.json``.

Every byte read is checked on the way out: each tensor's xxh3 against the manifest's index (a
delta is decoded first, DCP chunks are assembled from chunks checked one by one), so a corrupted
checkpoint is an error, never an export. Files are written into a directory beside the
destination and swapped in whole (:func:`~modelver.checkpoint.commit.write_beside`): a failure
or a kill leaves the destination as it was. No torch state beyond one buffer: tensors stream
from the checkpoint's files into the export's in :data:`~tensorfile.READ_BUF` pieces (a delta
chain: :data:`~tensorfile.DECODED_BUF`), so memory does not grow with the model.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelver.checkpoint import commit
from modelver.checkpoint import format as fmt
from modelver.checkpoint import tensorfile as tf
from modelver.checkpoint.catalog import resolve_checkpoint_dir
from modelver.checkpoint.delta import LogicalFile, open_logical
from modelver.checkpoint.io import bytes_view
from modelver.checkpoint.reader import read_state_json
from modelver.checkpoint.sharded import ShardedLoad, load_sharded, plan_sharded
from modelver.checkpoint.shardindex import read_index
from modelver.errors import (
    CheckpointCorruptedError,
    CheckpointWriteError,
    DirtyWorkspaceError,
    InvalidArgumentError,
)
from modelver.hashing import new_hasher

Progress = Callable[[int, int], None]

FORMATS = ("safetensors", "hf")
DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # Hugging Face's default ("5GB")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
HF_CONFIG = "hf_config"  # the manifest extras key holding a model's config.json content
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_FLOATING = {"float64", "float32", "float16", "bfloat16"}  # what --dtype casts (not float8)


@dataclass(frozen=True)
class ExportedFile:
    name: str
    size: int
    tensors: int


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: where, from which checkpoint, and the provenance it records."""

    path: Path
    source: Path
    step: int
    component: str
    format: str
    dtype: str | None  # the cast asked for; None keeps the saved dtypes
    files: tuple[ExportedFile, ...]
    tensors: int
    total_size: int  # tensor bytes, as Hugging Face's index counts them
    metadata: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "source": str(self.source),
            "step": self.step,
            "component": self.component,
            "format": self.format,
            "dtype": self.dtype,
            "files": [{"name": f.name, "size": f.size, "tensors": f.tensors} for f in self.files],
            "tensors": self.tensors,
            "total_size": self.total_size,
            "metadata": self.metadata,
        }


@dataclass(frozen=True)
class _Item:
    """One exported tensor: its state-dict key, where its bytes are, what it becomes."""

    key: str
    entry: fmt.TensorEntry | None  # None: a sharded (DCP) tensor, assembled from its chunks
    name: str  # the stored (or sharded) tensor it reads: aliases of tied weights resolved
    dtype: str  # as saved
    shape: tuple[int, ...]
    out_dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * tf.DTYPES[self.out_dtype][1]


def export_checkpoint(
    path: str | Path,
    to: str | Path,
    *,
    format: str = "safetensors",
    dtype: str | None = None,
    component: str = "model",
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    provenance: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Write ``component``'s tensors of checkpoint ``path`` (a step directory or a checkpoints
    root) under their state-dict keys into directory ``to``.

    ``to`` must be new or empty; ``force`` replaces an earlier export there (a directory of
    nothing but export files), never anything else. ``provenance`` (version, commit, ...)
    goes into every file's ``__metadata__`` with the step and the manifest's hash.
    """
    if format not in FORMATS:
        raise InvalidArgumentError("format", format, expected=" or ".join(FORMATS))
    if dtype is not None and dtype not in DTYPES:
        raise InvalidArgumentError("dtype", dtype, expected=", ".join(DTYPES))
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or (
        max_shard_size < 1
    ):
        raise InvalidArgumentError("max_shard_size", max_shard_size, expected="bytes, at least 1")
    path = resolve_checkpoint_dir(path)
    manifest = read_index(path, fmt.read_manifest(path))
    problems = fmt.check_sizes(path, manifest)
    if problems:
        raise CheckpointCorruptedError(path, problems)
    meta = read_state_json(path, manifest)
    items = _items(manifest, meta, component, dtype)
    sharded = plan_sharded(path, manifest, meta, live={}, state={component: None})
    config = _hf_config(path, manifest, items, dtype) if format == "hf" else None
    dest = Path(to)
    _check_destination(dest, path, force=force)
    metadata = {
        "format": "pt",  # what transformers' loader asks of a safetensors file
        **(provenance or {}),
        "modelver.step": str(manifest.step),
        "modelver.manifest": fmt.hash_member(path, fmt.MANIFEST),
    }
    shards = _plan(items, max_shard_size)
    names = (
        [WEIGHTS] if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    total = sum(i.nbytes for i in items)
    written: list[ExportedFile] = []

    def fill(tmp: Path) -> None:
        tmp.mkdir()
        with _Sources(path, manifest, sharded) as sources:
            done = 0
            for name, shard in zip(names, shards, strict=True):
                size = _write_shard(tmp / name, shard, metadata, sources,
                                    progress=progress, start=done, total=total)
                done += sum(i.nbytes for i in shard)
                written.append(ExportedFile(name, size, len(shard)))
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": total, **metadata},
                "weight_map": {i.key: n for n, s in zip(names, shards, strict=True) for i in s},
            }
            written.append(_write_json(tmp / INDEX, index))
        if config is not None:
            written.append(_write_json(tmp / CONFIG, config))
        commit.fsync_path(tmp)

    try:
        commit.write_beside(dest, fill)
    except OSError as e:
        raise CheckpointWriteError(dest, e, what="export") from e
    return ExportResult(
        path=dest, source=path, step=manifest.step, component=component, format=format,
        dtype=dtype, files=tuple(written), tensors=len(items), total_size=total,
        metadata=metadata,
    )


def _items(
    manifest: fmt.Manifest, meta: Mapping[str, Any], component: str, dtype: str | None
) -> list[_Item]:
    """The component's state-dict keys in saved order, each with the tensor it reads."""
    comps = meta["components"]
    if component not in comps:
        raise InvalidArgumentError(
            "component", component, expected=f"a component of the checkpoint: {', '.join(comps)}"
        )
    skeleton = comps[component]["state"]
    flat = "a component whose state is a mapping of tensors, as a model's state_dict()"
    if not isinstance(skeleton, dict) or not skeleton or list(skeleton) == ["__dict__"]:
        raise InvalidArgumentError("component", component, expected=flat)
    aliases = meta.get("aliases", {})
    sharded = meta.get("sharded") or {}
    items = []
    for key, value in skeleton.items():
        ref = value.get("__tensor__") if isinstance(value, dict) and len(value) == 1 else None
        if not isinstance(ref, str):
            raise InvalidArgumentError("component", component, expected=f"{flat} ({key} is not "
                                       "a tensor)")
        name = aliases.get(ref, ref)
        if name in sharded:
            entry, saved = None, sharded[name]["dtype"]
            shape = tuple(sharded[name]["shape"])
        else:  # state.json was checked: every reference is a stored tensor, a sharded one
            entry = manifest.tensors[name]  # or an alias of one
            saved, shape = entry.dtype, entry.shape
        out = dtype if dtype is not None and saved in _FLOATING else saved
        items.append(_Item(key, entry, name, saved, shape, out))
    return items


def _hf_config(
    path: Path, manifest: fmt.Manifest, items: list[_Item], dtype: str | None
) -> dict[str, Any]:
    """``config.json`` for ``from_pretrained``: what the training recorded in the manifest's
    extras, its dtype the one the weights are exported in."""
    config = manifest.extras.get(HF_CONFIG)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InvalidArgumentError(
            "format", "hf", expected=f"a checkpoint whose manifest records the model config "
            f"(extras['{HF_CONFIG}']: the Trainer integration records it, a hand-written loop "
            f"saves with extras={{'{HF_CONFIG}': model.config.to_dict()}}); {path} has none, "
            "export --format safetensors instead",
        )
    floating = {i.out_dtype for i in items if i.out_dtype in _FLOATING}
    out = dtype or (floating.pop() if len(floating) == 1 else None)
    if out is not None and (dtype is not None or config.get("dtype") is None):
        config = {**config, "dtype": out}
        if "torch_dtype" in config:  # transformers < 5 reads this name
            config["torch_dtype"] = out
    return config


def _check_destination(dest: Path, source: Path, *, force: bool) -> None:
    """Refuse before anything is written: a symlink, a file, the checkpoint itself or a
    directory inside it, a non-empty directory (with ``force``: one holding anything but an
    earlier export's files)."""
    if dest.is_symlink():
        raise InvalidArgumentError("--to", dest, expected="a directory, not a symlink")
    if dest.exists() and not dest.is_dir():
        raise InvalidArgumentError("--to", dest, expected="a directory (a file is in the way)")
    real, src = dest.resolve(), source.resolve()
    if real == src or src in real.parents:
        raise InvalidArgumentError("--to", dest, expected="a directory outside the checkpoint")
    if not dest.is_dir():
        return
    names = sorted(os.listdir(dest))
    if names and not force:
        raise DirtyWorkspaceError(
            f"{dest} is not empty", hint="give a new or empty directory, or --force to replace "
            "an earlier export there",
        )
    for n in names:
        if not (n in (WEIGHTS, INDEX, CONFIG) or _SHARD_RE.match(n)) or not (dest / n).is_file():
            raise DirtyWorkspaceError(
                f"{dest} holds {n}, which no export writes",
                hint="--force replaces only an earlier export: give another directory",
            )


def _plan(items: list[_Item], max_size: int) -> list[list[_Item]]:
    """Shards as Hugging Face cuts them: state-dict order, a new shard when the next tensor
    would pass ``max_size`` (a larger tensor gets a shard of its own)."""
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_size:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


class _Sources:
    """The checkpoint's logical files, opened once each, closed together."""

    def __init__(self, path: Path, manifest: fmt.Manifest, sharded: ShardedLoad) -> None:
        self.path, self.manifest, self.sharded = path, manifest, sharded
        self.open: dict[str, LogicalFile] = {}

    def file(self, name: str) -> LogicalFile:
        if name not in self.open:
            self.open[name] = open_logical(self.path, self.manifest, name)
        return self.open[name]

    def __enter__(self) -> _Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.open.values():
            f.close()


def _header(items: list[_Item], metadata: Mapping[str, str]) -> tuple[bytes, list[_Item]]:
    """The safetensors header and the data order: larger elements first, so every tensor is
    aligned for a zero-copy view; by source position within, so the reads run forward."""
    def position(i: _Item) -> tuple[int, str, int]:
        where = (i.entry.file, i.entry.offsets[0]) if i.entry else ("", 0)
        return (-tf.DTYPES[i.out_dtype][1], *where)

    order = sorted(items, key=position)
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    pos = 0
    for i in order:
        header[i.key] = {"dtype": tf.DTYPES[i.out_dtype][0], "shape": list(i.shape),
                         "data_offsets": [pos, pos + i.nbytes]}
        pos += i.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def _write_shard(
    dest: Path,
    items: list[_Item],
    metadata: Mapping[str, str],
    sources: _Sources,
    *,
    progress: Progress | None,
    start: int,
    total: int,
) -> int:
    header, order = _header(items, metadata)
    buf = bytearray(max(tf.READ_BUF, tf.DECODED_BUF if sources.manifest.deltas else 0))
    done = start
    with io.FileIO(dest, "xb") as out:
        fmt.write_all(out, header)
        for item in order:
            if item.entry is None:
                _write_assembled(out, item, sources)
            else:
                _stream(out, item, item.entry, sources, memoryview(buf))
            done += item.nbytes
            if progress is not None:
                progress(done, total)
        os.fdatasync(out.fileno())
        return out.tell()


def _stream(
    out: io.FileIO, item: _Item, e: fmt.TensorEntry, sources: _Sources, buf: memoryview
) -> None:
    """Copy one stored tensor piece by piece (cast when asked), hashing what was read."""
    f = sources.file(e.file)
    h = new_hasher("xxh3")
    cast = getattr(torch, item.out_dtype) if item.out_dtype != item.dtype else None
    src = getattr(torch, item.dtype)
    pos = e.offsets[0]
    while pos < e.offsets[1]:
        n = f.pread_into(pos, buf[: min(len(buf), e.offsets[1] - pos)])
        if n == 0:
            raise CheckpointCorruptedError(sources.path, [f"{e.file} is truncated"])
        piece = buf[:n]
        h.update(piece)
        fmt.write_all(out, piece if cast is None else
                      bytes_view(torch.frombuffer(piece, dtype=src).to(cast)))
        pos += n
    if h.hexdigest() != e.hash:
        raise CheckpointCorruptedError(
            sources.path, [f"{e.file}: {e.name} differs from the manifest's hash"]
        )


def _write_assembled(out: io.FileIO, item: _Item, sources: _Sources) -> None:
    """A sharded tensor in full, from its DCP chunks (each hash-checked as it is read)."""
    one = ShardedLoad({item.name: sources.sharded.layout[item.name]}, {})
    full = load_sharded(sources.path, sources.manifest, one)[item.name]
    fmt.write_all(out, bytes_view(full.to(getattr(torch, item.out_dtype)).contiguous()))


def _write_json(dest: Path, data: Any) -> ExportedFile:
    raw = (json.dumps(data, indent=2) + "\n").encode()
    commit.write_small(dest, raw)
    return ExportedFile(dest.name, len(raw), 0)
