"""Sink tables on disk: sharded checkpoints through torch.distributed.checkpoint (DCP) and the safetensors export
for deployment. The layouts are `nulls_dist.formats.checkpoint`'s (its docstring draws them); this module writes
and reads them for a `ShardedSinkTables`.

- `save_tables(tables, tag_dir)`: every rank writes its rows and their optimizer state into
  `<tag_dir>/sink_tables/`; rank 0 writes `sink_tables.json` last. Call it before the tag's `nulls_meta.json`
  (which then lists these files too).
- `load_tables(tables, tag_dir)`: into freshly built tables of the same layout, shape and optimizer, on ANY
  world size: DCP reads every rank's row range out of the saved chunks (resharding). Rows and optimizer state
  are restored bit for bit; the learning rate is not state (the trainer sets it every step).
- `export_tables(tables, path, dense_state=None)`: one safetensors file with three (R, D) float32 tensors per
  layer under the model's parameter names, plus rank 0's `dense_state` (the rest of the model: the trainer's
  `model.safetensors`); each rank writes the rows it owns in place, so no process ever holds a whole table.

DCP's `.metadata` is a pickle; `load_tables` reads it through a restricted unpickler that builds only the classes
of `formats.checkpoint.DCP_METADATA_GLOBALS` (a crafted file naming anything else is refused without running
it); the tensor chunks are read by DCP itself with torch's weights_only loader.

All three are collectives: every rank of the tables' process group calls them. The directory must be on a file
system every rank sees (as DeepSpeed's checkpoints must).
"""
from __future__ import annotations

import importlib
import os
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from nulls_dist.formats import atomic
from nulls_dist.formats import checkpoint as layout
from nulls_dist.formats.weights import RowWriter, allocate_tables
from nulls_dist.train.sink_tables import INIT_BLOCK_ROWS, ShardedSinkTables

# Rows per positioned write of the export: bounds the contiguous copy of one column block (64 MB at D=4096).
EXPORT_BLOCK_ROWS = INIT_BLOCK_ROWS


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch.Size, dtypes by name and nothing else (Python's documented way to
    restrict an unpickler: `find_class`)."""

    def find_class(self, module: str, name: str):
        if (module, name) in layout.DCP_METADATA_GLOBALS or (module == "torch" and name in layout.DCP_METADATA_DTYPES):
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"the sink-table checkpoint's DCP metadata names {module}.{name}, which DCP "
                                     "metadata never holds; refused without running it")


class _RestrictedReader(dcp.FileSystemReader):
    """DCP's file-system reader with the metadata read through `_MetadataUnpickler` instead of `pickle.load`."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as exc:
            raise RuntimeError(f"cannot resume from {path}: {exc}") from None
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _state(tables: ShardedSinkTables) -> dict:
    """The DCP state: ShardedTensors that are views of the live table rows and optimizer state (loading into
    them restores the tables in place)."""
    return {"tables": tables.module.state_dict(), "optimizer": tables.module.fused_optimizer.state_dict()}


def save_tables(tables: ShardedSinkTables, tag_dir: str | os.PathLike) -> Path:
    """Write `<tag_dir>/sink_tables/` (every rank its own file, rank 0 the DCP index and the meta, last)."""
    directory = layout.sink_tables_dir(tag_dir)
    if dist.get_rank(tables.process_group) == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier(group=tables.process_group)
    dcp.save(_state(tables), storage_writer=dcp.FileSystemWriter(str(directory)),
             process_group=tables.process_group)
    dist.barrier(group=tables.process_group)  # every rank's file is complete before the meta records sizes
    if dist.get_rank(tables.process_group) == 0:
        layout.write_sink_tables_meta(directory, {**tables.cfg.describe(), "world_size": tables.world_size})
    dist.barrier(group=tables.process_group)
    return directory


def load_tables(tables: ShardedSinkTables, tag_dir: str | os.PathLike) -> dict:
    """Restore rows and optimizer state saved by `save_tables` (any world size) into `tables`; returns the
    saved meta. CheckpointError when the directory is incomplete, RuntimeError naming each field that differs
    from `tables.cfg` (layout, num_layers, rows, dim, optimizer)."""
    directory = layout.sink_tables_dir(tag_dir)
    meta = layout.read_sink_tables_meta(directory)
    wanted = tables.cfg.describe()
    differ = [f"sink_tables.{k}: checkpoint {meta.get(k)!r} != run {v!r}" for k, v in wanted.items()
              if meta.get(k) != v]
    if differ:
        raise RuntimeError(f"the sink tables in {directory} do not fit this run: " + "; ".join(differ))
    state = _state(tables)
    dcp.load(state, storage_reader=_RestrictedReader(str(directory)), process_group=tables.process_group)
    # the optimizer's state dict is views too, but load_state_dict is the documented way back in
    tables.module.fused_optimizer.load_state_dict(state["optimizer"])
    return meta


def export_tables(tables: ShardedSinkTables, path: str | os.PathLike,
                  dense_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write every layer's rows as `transformer.h.<i>.mlp.sink_{gate,up,down}` (R, D) float32 into one
    safetensors file at `path` (atomically: a temporary that rank 0 renames once every rank has written), with
    rank 0's `dense_state` (float32 tensors, the rest of the model; other ranks pass None) in the same file."""
    cfg, group = tables.cfg, tables.process_group
    path = Path(path)
    names: list = [None]
    is_main = dist.get_rank(group) == 0
    dense_state = dict(dense_state or {}) if is_main else {}
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic.temp_sibling(path)
        shapes = {key: tuple(value.shape) for key, value in sorted(dense_state.items())}
        shapes.update({layout.sink_table_key(layer, part): (cfg.rows, cfg.dim)
                       for layer in range(cfg.num_layers) for part in layout.SINK_PARTS})
        # layout and optimizer are training choices: the export is the same file whichever was used
        metadata = None if dense_state else {"format": layout.SINK_TABLES_FORMAT, "num_layers": str(cfg.num_layers),
                                             "rows": str(cfg.rows), "dim": str(cfg.dim)}
        allocate_tables(tmp, shapes, metadata=metadata)
        names = [str(tmp)]
    dist.broadcast_object_list(names, src=0, group=group)
    tmp = Path(names[0])
    failed: BaseException | None = None
    try:
        with RowWriter(tmp) as writer, torch.no_grad():
            for key, value in dense_state.items():
                writer.write(key, 0, value.detach().to("cpu", torch.float32).reshape(value.shape or (1,)))
            for layer, start, view in tables.local_shards():
                for lo in range(0, view.shape[0], EXPORT_BLOCK_ROWS):
                    block = view[lo: lo + EXPORT_BLOCK_ROWS].to("cpu")
                    for index, part in enumerate(layout.SINK_PARTS):
                        writer.write(layout.sink_table_key(layer, part), start + lo,
                                     block[:, index * cfg.dim: (index + 1) * cfg.dim])
    except Exception as exc:  # every rank must still reach the vote below, or the others wait forever
        failed = exc
    failures = torch.tensor([0 if failed is None else 1], device=tables.device)
    dist.all_reduce(failures, group=group)
    if dist.get_rank(group) == 0:
        if failures.item() == 0:
            atomic.commit(tmp, path)
        else:
            tmp.unlink(missing_ok=True)
    dist.barrier(group=group)
    if failed is not None:
        raise failed
    if failures.item():
        raise RuntimeError(f"export of the sink tables to {path} failed on {int(failures.item())} other rank(s)")
    return path
