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
  on any world size as before. One chunk is in memory at a time (a saving rank's rows of one table). Returns what
  was not zero before, per file and tensor (rows and elements): `nulls-unlearn purge` certifies it per file.
- `check_sink_tables(directory, num_layers, rows)`: everything the edit will parse, parsed without writing
  (purge plans every artifact before it writes one).
- `nonzero_sink_table_rows(directory, units_per_layer)`: the given units' rows that are not zero, per file and
  tensor (purge's verify): the same restricted reads, only those rows looked at.
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


def table_rows_to_zero(meta: dict, units_per_layer: dict[int, np.ndarray], where: Path) -> dict[str, np.ndarray]:
    """{table: ascending table rows} of the pool units `units_per_layer[l]` of every layer l, under the directory's
    layout (`meta`: its sink_tables.json); ValueError when a unit or layer lies outside its shape."""
    rows, table_layout = int(meta["rows"]), meta["layout"]
    wanted: dict[str, list[np.ndarray]] = {}
    for layer, units in units_per_layer.items():
        units = np.asarray(units, dtype=np.int64)
        if units.size and (units.min() < 0 or units.max() >= rows or not 0 <= layer < int(meta["num_layers"])):
            raise ValueError(f"rows to zero must lie in the {meta['num_layers']} layers x {rows} rows of {where}")
        name = layout.sink_table_name(table_layout, layer)
        wanted.setdefault(name, []).append(layout.sink_table_row(table_layout, layer, units, rows))
    return {table: np.unique(np.concatenate(parts)) for table, parts in wanted.items()}


def tensor_role(key: str) -> str:
    """`rows` for a table's weights, `state` for one of its optimizer-state tensors (DCP keys, formats.checkpoint)."""
    return "state" if key.startswith(layout.SINK_TABLES_STATE_PREFIX.split("{")[0]) else "rows"


def _load_chunk(directory: Path, chunk: StoredChunk, f) -> torch.Tensor:
    f.seek(chunk.offset)
    try:
        return torch.load(io.BytesIO(f.read(chunk.length)), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch's weights-only loader refuses, the chunk is not ours
        raise CheckpointError(f"{directory / chunk.file}: chunk {chunk.key} at byte {chunk.offset} is not a tensor "
                              f"torch's weights-only loader reads ({type(exc).__name__})") from None


def _forgotten_chunks(directory: Path, zero: dict[str, np.ndarray], mode: str):
    """(open file, chunk, its tensor, the chunk-local rows of `zero` it holds) for every stored chunk of a table
    in `zero` holding one of its rows; one chunk in memory at a time. Checks the chunks of each table's weights
    cover every row to zero (CheckpointError naming the directory)."""
    covered: dict[str, int] = {}
    for chunk in sorted(read_dcp_metadata(directory), key=lambda c: (c.file, c.offset)):
        table = _row_tensor_table(chunk.key, list(zero))
        if table is None:
            continue
        with open(directory / chunk.file, mode) as f:
            tensor = _load_chunk(directory, chunk, f)
            inside = zero[table][(zero[table] >= chunk.first_row) & (zero[table] < chunk.first_row + tensor.shape[0])]
            covered[chunk.key] = covered.get(chunk.key, 0) + int(inside.size)
            if inside.size:
                yield f, chunk, tensor, torch.from_numpy(inside - chunk.first_row)
    for table, table_rows in zero.items():
        key = layout.SINK_TABLES_WEIGHT_KEY.format(table=table)
        if table_rows.size and covered.get(key, 0) != table_rows.size:
            raise CheckpointError(f"{directory}: the chunks of {key} hold {covered.get(key, 0)} of the "
                                  f"{table_rows.size} rows to zero")


def _count(found: dict, chunk: StoredChunk, picked: torch.Tensor) -> None:
    """found[file][key] += {rows, elements} that are not zero (NaN counts as non-zero) in `picked` (the rows)."""
    nonzero = picked.reshape(picked.shape[0], -1) != 0
    rows, elements = int(nonzero.any(dim=1).sum()), int(nonzero.sum())
    if rows:
        entry = found.setdefault(chunk.file, {}).setdefault(chunk.key, {"rows": 0, "elements": 0})
        entry["rows"] += rows
        entry["elements"] += elements


def check_sink_tables(directory: str | Path, num_layers: int, rows: int) -> dict:
    """Parse a sink-table directory as `zero_sink_table_rows` will, writing nothing: complete (every file of its
    sink_tables.json with its size), the DCP index readable by the restricted unpickler, a plain chunk layout,
    and the shape of the model (`num_layers` x `rows`). Returns its sink_tables.json; CheckpointError naming the
    file otherwise."""
    directory = Path(directory)
    meta = layout.read_sink_tables_meta(directory)
    if int(meta.get("num_layers", -1)) != num_layers or int(meta.get("rows", -1)) != rows:
        raise CheckpointError(f"{directory / layout.SINK_TABLES_META_NAME}: tables of {meta.get('num_layers')} layers "
                              f"x {meta.get('rows')} rows, the model has {num_layers} x {rows}")
    tables = {layout.sink_table_name(meta["layout"], layer) for layer in range(num_layers)}
    keys = {c.key for c in read_dcp_metadata(directory)}
    missing = [k for k in sorted(layout.SINK_TABLES_WEIGHT_KEY.format(table=t) for t in tables) if k not in keys]
    if missing:
        raise CheckpointError(f"{directory / DCP_METADATA_NAME}: no chunk of {missing[:3]}")
    return meta


def nonzero_sink_table_rows(directory: str | Path, units_per_layer: dict[int, np.ndarray]) -> dict[str, dict]:
    """{file: {key: {rows, elements}}} of the given pool units' rows that are not zero, in the tables and every
    optimizer-state tensor; only files where any are. Reads each chunk holding such a row through torch's
    weights-only loader and looks at those rows only."""
    directory = Path(directory)
    zero = table_rows_to_zero(layout.read_sink_tables_meta(directory), units_per_layer, directory)
    found: dict[str, dict] = {}
    for _, chunk, tensor, local in _forgotten_chunks(directory, zero, "rb"):
        _count(found, chunk, tensor[local])
    return found


def zero_sink_table_rows(source_dir: str | Path, out_dir: str | Path,
                         units_per_layer: dict[int, np.ndarray]) -> dict[str, dict]:
    """Copy the sink-table directory `source_dir` to `out_dir` (which must not exist) with the rows of
    `units_per_layer[l]` (pool units of layer l) zero in the tables and in every optimizer-state tensor; returns
    {file: {key: {rows, elements}}}: what was not zero before, per file and tensor (a chunk with nothing to zero
    keeps its bytes). CheckpointError naming the file when the source is incomplete or not editable."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    meta = layout.read_sink_tables_meta(source_dir)  # complete: every file of the directory has its size
    zero = table_rows_to_zero(meta, units_per_layer, source_dir)
    read_dcp_metadata(source_dir)  # refuse a crafted or transformed index before anything is written
    out_dir.mkdir(parents=True, exist_ok=False)
    for name in meta["files"]:
        shutil.copyfile(source_dir / name, out_dir / name)
    zeroed: dict[str, dict] = {}
    for f, chunk, tensor, local in _forgotten_chunks(out_dir, zero, "r+b"):
        picked = tensor[local]
        if not bool((picked != 0).any()):
            continue  # already zero: the chunk's bytes stay as they are
        _count(zeroed, chunk, picked)
        tensor[local] = 0
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        if buffer.tell() != chunk.length:
            raise CheckpointError(f"{source_dir / chunk.file}: chunk {chunk.key} saves to {buffer.tell()} bytes "
                                  f"instead of {chunk.length}; cannot edit it in place")
        f.seek(chunk.offset)
        f.write(buffer.getbuffer())  # a view: no third copy of the chunk
    layout.write_sink_tables_meta(out_dir, {k: v for k, v in meta.items() if k not in ("format", "files")})
    return zeroed
