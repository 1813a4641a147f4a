"""Offline reading and editing of a sink-table checkpoint directory (`<tag>/sink_tables/`, written by the trainer
through torch.distributed.checkpoint: layout in `formats.checkpoint`) by one process, without a process group and
without TorchRec. Hard unlearning uses it to zero the forgotten rows AND their optimizer state (row-wise Adagrad's
accumulated squared gradients, which are a trace of how much each row was trained) in a copy of the directory,
so a training run resumed from the unlearned checkpoint carries nothing of the forgotten sources either.

- `read_dcp_metadata(directory)`: DCP's `.metadata` is a pickle. It is read by a restricted unpickler that knows
  only the globals of `formats.checkpoint.DCP_METADATA_GLOBALS` and builds plain records in their place (no class
  of torch.distributed is imported, nothing a crafted file names is run); returns every stored chunk: its key,
  first row, file, byte offset and length.
- `zero_sink_table_rows(source_dir, out_dir, units_per_layer)`: a copy of the directory with those pool units'
  rows zero in every layer's table and in every optimizer-state tensor of the table. Each saved chunk (one saving
  rank's rows of one table) is read with torch's weights_only loader, edited and saved again in place: the same
  tensor saves to the same number of bytes, which is checked, so DCP's index stays valid and the directory loads
  on any world size as before. One chunk is in memory at a time (a saving rank's rows of one table).
"""
from __future__ import annotations

import io
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from nulls_dist.formats import checkpoint as layout
from nulls_dist.formats.checkpoint import CheckpointError

DCP_METADATA_NAME = ".metadata"


class _Record:
    """Stands in for a DCP metadata dataclass: its state becomes attributes (a tuple state is kept as `state`)."""

    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


def _stand_ins() -> dict[tuple[str, str], object]:
    out: dict[tuple[str, str], object] = {}
    for module, name in layout.DCP_METADATA_GLOBALS:
        if name == "_MEM_FORMAT_ENCODING":
            out[module, name] = lambda value: value
        elif name == "_get_layout":
            out[module, name] = lambda value: value
        elif name == "Size":
            out[module, name] = tuple
        elif module == "pathlib":
            out[module, name] = lambda *parts: str(PurePosixPath(*parts))
        else:
            out[module, name] = type(name, (_Record,), {})
    return out


class _StandInUnpickler(pickle.Unpickler):
    """Python's documented way to restrict an unpickler (`find_class`), returning plain records."""

    _allowed = _stand_ins()

    def find_class(self, module: str, name: str):
        if (module, name) in self._allowed:
            return self._allowed[module, name]
        if module == "torch" and name in layout.DCP_METADATA_DTYPES:
            return name
        raise pickle.UnpicklingError(f"names {module}.{name}, which DCP metadata never holds")


@dataclass(frozen=True)
class StoredChunk:
    """One tensor chunk of a DCP checkpoint: `key` rows [first_row, ...) live at file[offset: offset + length]."""

    key: str
    first_row: int
    file: str
    offset: int
    length: int


def read_dcp_metadata(directory: str | Path) -> list[StoredChunk]:
    """Every stored tensor chunk of a DCP checkpoint directory (restricted unpickler: module docstring)."""
    path = Path(directory) / DCP_METADATA_NAME
    try:
        with open(path, "rb") as f:
            metadata = _StandInUnpickler(f).load()
        chunks = []
        for index, info in metadata.storage_data.items():
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(f"{path}: chunk {index.fqn} is stored transformed "
                                      f"({info.transform_descriptors}); only plain chunks can be edited")
            offset = tuple(index.offset or (0,))
            chunks.append(StoredChunk(index.fqn, int(offset[0]), str(info.relative_path), int(info.offset),
                                      int(info.length)))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (pickle.UnpicklingError, AttributeError, EOFError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a sink-table checkpoint index ({exc})") from None
    return chunks


def _row_tensor_table(key: str, tables: list[str]) -> str | None:
    """The table whose rows `key` holds along its first dimension (its weights or an optimizer state)."""
    for table in tables:
        if key == layout.SINK_TABLES_WEIGHT_KEY.format(table=table) or \
                key.startswith(layout.SINK_TABLES_STATE_PREFIX.format(table=table)):
            return table
    return None


def zero_sink_table_rows(source_dir: str | Path, out_dir: str | Path,
                         units_per_layer: dict[int, np.ndarray]) -> dict[str, int]:
    """Copy the sink-table directory `source_dir` to `out_dir` (which must not exist) with the rows of
    `units_per_layer[l]` (pool units of layer l) zero in the tables and in every optimizer-state tensor; returns
    {key: rows zeroed}. CheckpointError naming the file when the source is incomplete or not editable."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    meta = layout.read_sink_tables_meta(source_dir)  # complete: every file of the directory has its size
    rows, table_layout = int(meta["rows"]), meta["layout"]
    wanted: dict[str, list[np.ndarray]] = {}
    for layer, units in units_per_layer.items():
        units = np.asarray(units, dtype=np.int64)
        if units.size and (units.min() < 0 or units.max() >= rows or not 0 <= layer < int(meta["num_layers"])):
            raise ValueError(f"rows to zero must lie in the {meta['num_layers']} layers x {rows} rows of {source_dir}")
        name = layout.sink_table_name(table_layout, layer)
        wanted.setdefault(name, []).append(layout.sink_table_row(table_layout, layer, units, rows))
    zero = {table: np.unique(np.concatenate(parts)) for table, parts in wanted.items()}
    chunks = read_dcp_metadata(source_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    for name in meta["files"]:
        shutil.copyfile(source_dir / name, out_dir / name)
    zeroed: dict[str, int] = {}
    for chunk in sorted(chunks, key=lambda c: (c.file, c.offset)):
        table = _row_tensor_table(chunk.key, list(zero))
        if table is None:
            continue
        with open(out_dir / chunk.file, "r+b") as f:
            f.seek(chunk.offset)
            tensor = torch.load(io.BytesIO(f.read(chunk.length)), map_location="cpu", weights_only=True)
            inside = zero[table][(zero[table] >= chunk.first_row) & (zero[table] < chunk.first_row + tensor.shape[0])]
            if not inside.size:
                continue
            tensor[torch.from_numpy(inside - chunk.first_row)] = 0
            buffer = io.BytesIO()
            torch.save(tensor, buffer)
            if buffer.tell() != chunk.length:
                raise CheckpointError(f"{source_dir / chunk.file}: chunk {chunk.key} saves to {buffer.tell()} bytes "
                                      f"instead of {chunk.length}; cannot edit it in place")
            f.seek(chunk.offset)
            f.write(buffer.getvalue())
        zeroed[chunk.key] = zeroed.get(chunk.key, 0) + int(inside.size)
    for table, table_rows in zero.items():
        key = layout.SINK_TABLES_WEIGHT_KEY.format(table=table)
        if table_rows.size and zeroed.get(key, 0) != table_rows.size:
            raise CheckpointError(f"{source_dir}: the chunks of {key} hold {zeroed.get(key, 0)} of the "
                                  f"{table_rows.size} rows to zero")
    layout.write_sink_tables_meta(out_dir, {k: v for k, v in meta.items() if k not in ("format", "files")})
    return zeroed
