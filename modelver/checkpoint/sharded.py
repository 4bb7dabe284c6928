"""Sharded tensors (DTensor / ShardedTensor, e.g. FSDP2) through torch.distributed.checkpoint.

DCP plans who writes which chunk and reshards on load; the storage underneath is ours. Each rank
writes its chunks as one safetensors file under ``dcp-<component>/`` and indexes each chunk as
``<tensor>@<offsets>`` in its own index shard (:mod:`.shardindex`); ``state.json`` holds each
sharded tensor's global shape and dtype. DCP's pickled ``.metadata`` is never written:
:class:`ChunkReader` rebuilds DCP's metadata from the chunks a process read the index of and
reads them by byte range, hash-checked, so loading with any number of ranks (or with none: full
tensors assembled from the chunks) never unpickles a file. What a process fills is checked to be
tiled by those chunks before anything is read (:func:`plan_sharded`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from modelver.checkpoint import commit
from modelver.checkpoint import format as fmt
from modelver.checkpoint.io import bytes_view, write_shard
from modelver.checkpoint.reader import readinto_exact
from modelver.checkpoint.shardindex import (
    ShardedTensor,
    chunk_layout,
    cover_problem,
    encode,
    index_name,
)
from modelver.checkpoint.state import FlatTensor
from modelver.errors import CheckpointCorruptedError, MalformedDataError
from modelver.hashing import xxh3_bytes


def chunk_name(fqn: str, offsets: Any) -> str:
    return fqn + "@" + ",".join(str(int(o)) for o in offsets)


def is_sharded(t: object) -> bool:
    """A tensor each rank holds only part of (DCP saves and reshards it)."""
    if not isinstance(t, torch.Tensor) or type(t) is torch.Tensor:
        return False
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return True
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return isinstance(t, ShardedTensor)


# --- DCP storage: safetensors chunks, JSON layout, no pickle ----------------------------------


def _dcp_classes() -> Any:
    from torch.distributed.checkpoint import planner, storage

    return planner, storage


def _read_chunk(path: Path, manifest: fmt.Manifest, name: str) -> torch.Tensor:
    """Chunk ``name`` (its entry checked by :func:`chunk_layout`), its bytes against the hash."""
    entry = manifest.tensors[name]
    dest = torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))
    view = bytes_view(dest)
    with fmt.open_member(path, entry.file, field=f"tensors.{entry.name}.file") as f:
        f.seek(entry.offsets[0])
        try:
            complete = readinto_exact(f, view)
        except OSError as e:
            raise fmt.member_error(path, entry.file, e) from e
    if not complete or xxh3_bytes(view) != entry.hash:
        raise CheckpointCorruptedError(path, [f"{entry.file}: {entry.name} differs from the index"])
    return dest


def _narrow(t: torch.Tensor, offsets: Any, sizes: Any) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, sizes, strict=True)):
        t = t.narrow(dim, int(o), int(n))
    return t


def _done(value: Any) -> Any:
    """A completed ``torch.futures.Future`` (what DCP waits on)."""
    fut: torch.futures.Future[Any] = torch.futures.Future()
    fut.set_result(value)
    return fut


def writer_class() -> type:
    planner, storage = _dcp_classes()

    class ChunkWriter(storage.StorageWriter):  # type: ignore[name-defined]
        """Each rank writes its chunks to one safetensors file and indexes them in its own
        index shard beside it; rank 0 learns only of the files (:mod:`.shardindex`)."""

        def __init__(self, tmp: Path, subdir: str) -> None:
            super().__init__()
            self.tmp, self.subdir = tmp, subdir
            self.files: dict[str, fmt.FileEntry] = {}
            self.index: list[str] = []  # the index shards, in rank order
            self.layout: dict[str, dict[str, Any]] = {}  # shape and dtype: boxes are in the index

        def reset(self, checkpoint_id: Any = None) -> None:
            pass

        def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kw: Any) -> None:
            pass

        def prepare_local_plan(self, plan: Any) -> Any:
            return plan

        def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
            return [
                dataclasses.replace(p, storage_data=f"{i:05d}.safetensors")
                for i, p in enumerate(plans)
            ]

        def write_data(self, plan: Any, planner_: Any) -> Any:
            members = []
            for item in plan.items:
                if item.type == planner.WriteItemType.BYTE_IO:
                    raise TypeError(f"{item.index.fqn}: only tensors are saved through DCP")
                t = planner_.resolve_data(item).detach().cpu().contiguous()
                name = chunk_name(item.index.fqn, item.index.offset)
                members.append(FlatTensor(name, t, name, False))
            if not members:
                return _done([])
            folder = self.tmp / self.subdir
            folder.mkdir(exist_ok=True)
            fentry, tentries, _ = write_shard(folder / plan.storage_data, members)
            rel = f"{self.subdir}/{fentry.path}"
            fentry = dataclasses.replace(fentry, path=rel)
            index = {e.name: dataclasses.replace(e, file=rel) for e in tentries}
            shard = index_name(int(plan.storage_data.removesuffix(".safetensors")))
            ientry = commit.write_small(folder / shard, encode(index))
            ientry = dataclasses.replace(ientry, path=f"{self.subdir}/{shard}")
            return _done(
                [
                    storage.WriteResult(
                        index=item.index,
                        size_in_bytes=index[m.name].nbytes,
                        storage_data=(fentry, ientry),
                    )
                    for item, m in zip(plan.items, members, strict=True)
                ]
            )

        def finish(self, metadata: Any, results: list[list[Any]]) -> None:
            for rank_results in results:
                for r in rank_results[:1]:  # one data file and one index shard per rank
                    fentry, ientry = r.storage_data
                    self.files[fentry.path] = fentry
                    self.files[ientry.path] = ientry
                    self.index.append(ientry.path)
            for fqn, md in metadata.state_dict_metadata.items():
                self.layout[fqn] = {
                    "dtype": str(md.properties.dtype).removeprefix("torch."),
                    "shape": list(md.size),
                }
            if (self.tmp / self.subdir).is_dir():
                commit.fsync_path(self.tmp / self.subdir)

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
            return False

    return ChunkWriter


def _reader_class() -> type:
    from torch.distributed.checkpoint import metadata as md

    planner, storage = _dcp_classes()

    class ChunkReader(storage.StorageReader):  # type: ignore[name-defined]
        """DCP metadata rebuilt from the chunks indexed; read by byte range, hash-checked."""

        def __init__(
            self, path: Path, manifest: fmt.Manifest, layout: Mapping[str, ShardedTensor]
        ) -> None:
            super().__init__()
            self.path, self.manifest, self.layout = path, manifest, layout
            self.index: dict[Any, str] = {}

        def reset(self, checkpoint_id: Any = None) -> None:
            pass

        def read_metadata(self, *args: Any, **kw: Any) -> Any:
            sd_md: dict[str, Any] = {}
            index: dict[Any, str] = {}
            for fqn, spec in self.layout.items():
                chunks = []
                for c in spec.chunks:
                    off = torch.Size(c.offsets)
                    chunks.append(md.ChunkStorageMetadata(off, torch.Size(c.sizes)))
                    index[md.MetadataIndex(fqn, off)] = c.name
                props = md.TensorProperties(dtype=getattr(torch, spec.dtype))
                sd_md[fqn] = md.TensorStorageMetadata(props, torch.Size(spec.shape), chunks)
            return md.Metadata(state_dict_metadata=sd_md, storage_data=index)

        def set_up_storage_reader(
            self, metadata: Any, is_coordinator: bool, *args: Any, **kw: Any
        ) -> None:
            self.index = metadata.storage_data

        def prepare_local_plan(self, plan: Any) -> Any:
            return plan

        def prepare_global_plan(self, plans: list[Any]) -> list[Any]:
            return plans

        def read_data(self, plan: Any, planner_: Any) -> Any:
            cache: dict[str, torch.Tensor] = {}
            for item in plan.items:
                if item.type == planner.LoadItemType.BYTE_IO:
                    raise TypeError(f"{item.storage_index.fqn}: not a tensor")
                name = self.index[item.storage_index]
                if name not in cache:
                    cache[name] = _read_chunk(self.path, self.manifest, name)
                src = _narrow(cache[name], item.storage_offsets, item.lengths)
                target = planner_.resolve_tensor(item).detach()
                target.copy_(src)
                planner_.commit_tensor(item, target)
            return _done(None)

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
            return False

    return ChunkReader


def sharded_index(meta: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Full (unsharded) name -> (global shape, dtype) of every sharded tensor."""
    return {
        n: (tuple(spec["shape"]), spec["dtype"]) for n, spec in (meta.get("sharded") or {}).items()
    }


def _optimizer_targets(
    comp: str, opt: torch.optim.Optimizer, layout: Mapping[str, ShardedTensor]
) -> dict[str, torch.Tensor]:
    """A fresh optimizer has no state yet: shard saved state like the parameter it belongs to."""
    params = [p for g in opt.param_groups for p in g["params"]]
    out = {}
    prefix = comp + "/state/"
    for name, spec in layout.items():
        parts = name[len(prefix) :].split("/") if name.startswith(prefix) else []
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) >= len(params):
            continue
        p = params[int(parts[0])]
        if is_sharded(p) and tuple(p.shape) == spec.shape:
            out[name] = torch.empty_like(p, dtype=getattr(torch, spec.dtype))
    return out


def _local_boxes(t: torch.Tensor) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The (offsets, sizes) of what this rank holds of a sharded tensor, as DCP plans them."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return [(tuple(c.offsets), tuple(c.sizes)) for c in t.__create_chunk_list__()]
    return [
        (tuple(s.metadata.shard_offsets), tuple(s.metadata.shard_sizes))
        for s in t.local_shards()  # type: ignore[attr-defined]
    ]


@dataclasses.dataclass(frozen=True)
class ShardedLoad:
    """What :func:`load_sharded` reads: checked in full before any live tensor changes."""

    layout: dict[str, ShardedTensor]
    targets: dict[str, torch.Tensor]  # live shards, filled in place through DCP


def plan_sharded(
    path: Path,
    manifest: fmt.Manifest,
    meta: Mapping[str, Any],
    *,
    live: Mapping[str, torch.Tensor],
    state: Mapping[str, Any] | None,
) -> ShardedLoad:
    """The sharded tensors of the components in ``state`` (all if None): live sharded targets
    (resharded to the current mesh), the rest assembled in full. Each must be tiled by the
    chunks whose index was read, or :class:`CheckpointCorruptedError`."""
    try:
        layout = chunk_layout(meta.get("sharded") or {}, manifest)
    except MalformedDataError as e:
        raise CheckpointCorruptedError(path, [e.message]) from e
    if state is not None:
        layout = {n: s for n, s in layout.items() if n.split("/", 1)[0] in state}
    targets = {n: t for n, t in live.items() if n in layout and is_sharded(t)}
    for comp, obj in (state or {}).items():
        if isinstance(obj, torch.optim.Optimizer):
            for n, t in _optimizer_targets(comp, obj, layout).items():
                targets.setdefault(n, t)
    problems = []
    for name, spec in layout.items():
        boxes = _local_boxes(targets[name]) if name in targets else [((0,) * len(spec.shape),
                                                                      spec.shape)]
        problems += [p for o, n in boxes if (p := cover_problem(name, spec, o, n))]
    if problems:
        if manifest.index:
            problems.append("restoring at the world size of the save reads only this rank's "
                            "index shards: another sharding at that world size is not supported")
        raise CheckpointCorruptedError(path, problems)
    return ShardedLoad(layout, targets)


def load_sharded(path: Path, manifest: fmt.Manifest, plan: ShardedLoad) -> dict[str, torch.Tensor]:
    """Live targets filled through DCP (one collective call on every rank), the other sharded
    tensors assembled from their chunks, each hash-checked as it is read."""
    if plan.targets:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        dcp.load(
            plan.targets,
            storage_reader=_reader_class()(path, manifest, plan.layout),
            no_dist=not dist.is_initialized(),
        )
    out: dict[str, torch.Tensor] = dict(plan.targets)
    for name, spec in plan.layout.items():
        if name in out:
            continue
        full = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype))
        for c in spec.chunks:
            _narrow(full, c.offsets, c.sizes).copy_(_read_chunk(path, manifest, c.name))
        out[name] = full
    return out
