"""Weights files: safetensors only (a file a user hands us is parsed, never unpickled), written atomically, and
`state_dict_digest`, the content digest every manifest and certificate cites.

`state_dict_digest` depends only on key names, dtypes, shapes and values, so the same weights give the same
digest in a training checkpoint, a deployed copy or memory.

`RowReader` reads selected rows of one 2-D tensor of a safetensors file through a memory map: a deployment that
needs one source's ~100 sink rows reads those pages, not the whole table. Its writer, for tables no process
holds whole (row-sharded sink tables): `allocate_tables` lays out the header and sizes the file, then every
process writes the rows it owns in place through `RowWriter`.

`WeightsFile` is a whole weights file as a lazy, read-only state dict (a `Mapping`): a tensor is read when it
is asked for, `rows(key, index)` reads rows through the memory map, and `state_dict_digest` of it streams the
file block by block, so a checkpoint whose sink tables do not fit in memory is digested, row-read and copied
(`copy_zeroing_rows`: hard unlearning) in bounded memory. Its digest equals that of the same weights in memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nulls_dist.formats import atomic

_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16), "I64": (np.int64, torch.int64),
           "I32": (np.int32, torch.int32), "U8": (np.uint8, torch.uint8), "BOOL": (np.bool_, torch.bool)}


class WeightsError(ValueError):
    """A weights file is missing or not a valid safetensors file; the message names it."""


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict as safetensors through a temporary name (contiguous CPU copies; no shared storage)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with atomic.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file -> state dict on the CPU; WeightsError naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None


# Bytes per block when a weights file is streamed (digest, copy): bounds the memory of a pass over a table of any
# size; 64 MiB reads run at disk speed on the dev box.
STREAM_BLOCK_BYTES = 64 << 20


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (key, dtype, shape, bytes) of every tensor, keys sorted; a `WeightsFile` is streamed."""
    if isinstance(state_dict, WeightsFile):
        return state_dict.digest()
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_rows(state_dict: Mapping[str, torch.Tensor], key: str, rows) -> torch.Tensor:
    """Rows of 2-D tensor `key`: through the memory map for a `WeightsFile` (only those rows are read), by
    indexing for an in-memory state dict."""
    if isinstance(state_dict, RowReader):
        return state_dict.rows(key, np.asarray(rows, dtype=np.int64))
    return state_dict[key][torch.as_tensor(np.asarray(rows, dtype=np.int64))]


def _read_header(path: Path) -> tuple[int, dict]:
    """(start of the data section, the tensor entries) of a safetensors file, offsets not yet trusted."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return 8 + header_len, {k: v for k, v in header.items() if k != "__metadata__"}


def allocate_tables(path: str | os.PathLike, shapes: dict[str, tuple[int, ...]],
                    metadata: dict[str, str] | None = None) -> Path:
    """Create a safetensors file of float32 tensors `shapes` (key -> shape, laid out in that order; the sink
    tables are (rows, cols)) whose data is not yet written: the file is sized (sparse where the file system
    allows), so processes can fill their rows with `RowWriter` in any order. Not atomic by itself: write it under
    a temporary name (`atomic.temp_sibling`) and rename when every writer is done."""
    header: dict[str, object] = {}
    offset = 0
    for key, shape in shapes.items():
        shape = [int(n) for n in shape]
        size = int(np.prod(shape, dtype=np.int64)) * 4
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header so the data section is 8-byte aligned
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


class RowWriter:
    """Writes row blocks of the float32 tables of a file made by `allocate_tables`, in place (positioned writes:
    several processes may write disjoint rows of one file at once)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._base, self._entries = _read_header(self.path)
        self._fd = os.open(self.path, os.O_WRONLY)

    def write(self, key: str, start: int, rows: torch.Tensor) -> None:
        """Rows [start, start + len(rows)) (along the first dimension) of tensor `key` := `rows` (float32, the
        tensor's shape but the first dimension); a whole tensor is `write(key, 0, tensor)`."""
        if key not in self._entries:
            raise WeightsError(f"{self.path}: no tensor {key!r}")
        entry = self._entries[key]
        num_rows, *rest = entry["shape"] or [1]
        if tuple(rows.shape[1:]) != tuple(rest) or rows.dim() != len(entry["shape"] or [1]) or \
                rows.dtype != torch.float32:
            raise ValueError(f"rows for {key} must be float32 (n, {', '.join(map(str, rest))}), got {rows.dtype} "
                             f"{tuple(rows.shape)}")
        if start < 0 or start + rows.shape[0] > num_rows:
            raise ValueError(f"rows [{start}, {start + rows.shape[0]}) are outside {key}'s [0, {num_rows})")
        data = rows.detach().to("cpu").contiguous().numpy().tobytes()
        position = self._base + entry["data_offsets"][0] + start * int(np.prod(rest, dtype=np.int64)) * 4
        while data:  # pwrite may write less than asked (signals, very large writes)
            written = os.pwrite(self._fd, data, position)
            data, position = data[written:], position + written

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RowReader:
    """Selected rows of 2-D tensors in a safetensors file, read through a read-only memory map (the header is
    parsed by `safetensors.safe_open` first, so a malformed file is refused before any offset is trusted)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="pt") as f:  # validates header and offsets
                self.names = frozenset(f.keys())
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{self.path}: not a readable safetensors file ({exc})") from None
        self._base, self._entries = _read_header(self.path)
        self._maps: dict[str, np.ndarray] = {}
        self.rows_read = 0  # rows copied out by `rows` (what a deployment really read of its tables)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key)["shape"])

    def _entry(self, key: str) -> dict:
        if key not in self._entries:
            raise WeightsError(f"{self.path}: no tensor {key!r}")
        return self._entries[key]

    def _map(self, key: str) -> np.ndarray:
        if key not in self._maps:
            entry = self._entry(key)
            if entry["dtype"] not in _DTYPES or len(entry["shape"]) != 2:
                raise WeightsError(f"{self.path}: {key} is {entry['dtype']} {entry['shape']}, need a 2-D table")
            start, _ = entry["data_offsets"]
            self._maps[key] = np.memmap(self.path, dtype=_DTYPES[entry["dtype"]][0], mode="r",
                                        offset=self._base + start, shape=tuple(entry["shape"]))
        return self._maps[key]

    def rows(self, key: str, rows: Iterable[int] | np.ndarray) -> torch.Tensor:
        """(R,) row indices -> (R, D) tensor copied out of the map (only those pages are read)."""
        index = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64)
        table = self._map(key)
        if index.size and (index.min() < 0 or index.max() >= table.shape[0]):
            raise WeightsError(f"{self.path}: row index out of range [0, {table.shape[0]}) for {key}")
        self.rows_read += int(index.size)
        return torch.from_numpy(np.ascontiguousarray(table[index]))

    def __deepcopy__(self, memo) -> "RowReader":
        """A read-only view of a file: copies of a model share it (a deep copy would read every mapped table)."""
        return self


class WeightsFile(RowReader, Mapping):
    """A safetensors weights file as a lazy read-only state dict: `wf[key]` reads that tensor, `rows` reads rows
    through the memory map, `digest()` streams the file (module docstring)."""

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if key not in self.names:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, key: object) -> bool:
        return key in self.names

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._entry(key)["dtype"]][1]

    def blocks(self, key: str) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) blocks of tensor `key` in order, each at most STREAM_BLOCK_BYTES, straight from the
        map (a 0-d or 1-d tensor is one block of itself)."""
        entry = self._entry(key)
        if entry["dtype"] not in _DTYPES:
            raise WeightsError(f"{self.path}: {key} has dtype {entry['dtype']}, which this reader does not know")
        start, end = entry["data_offsets"]
        dtype = np.dtype(_DTYPES[entry["dtype"]][0])
        shape = tuple(entry["shape"])
        if end == start:
            return
        data = np.memmap(self.path, dtype=dtype, mode="r", offset=self._base + start, shape=shape or (1,))
        data = data.reshape(shape or (1,))
        row_bytes = max(1, data[0].nbytes) if data.ndim > 1 else dtype.itemsize
        step = max(1, STREAM_BLOCK_BYTES // row_bytes)
        for lo in range(0, data.shape[0], step):
            yield lo, data[lo: lo + step]

    def digest(self) -> str:
        """`state_dict_digest` of this file's tensors, streamed block by block (bounded memory); computed once
        per reader (a checkpoint is read-only: the tools ask for it several times)."""
        if getattr(self, "_digest", None) is not None:
            return self._digest
        h = hashlib.sha256()
        for key in sorted(self.names):
            shape = tuple(self._entry(key)["shape"])
            h.update(f"{key}|{self.dtype(key)}|{shape}|".encode())
            for _, block in self.blocks(key):
                h.update(np.ascontiguousarray(block).view(np.uint8).data)
        self._digest = h.hexdigest()
        return self._digest


def copy_zeroing_rows(source: WeightsFile, path: str | os.PathLike, zero: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> Path:
    """Write a copy of the float32 weights file `source` at `path` (atomically) in which rows `zero[key]` of the
    2-D tensors named are 0, streaming block by block: no tensor is ever held whole."""
    shapes = {key: source.shape(key) for key in sorted(source.names)}
    for key in shapes:
        if source._entry(key)["dtype"] != "F32":
            raise WeightsError(f"{source.path}: {key} is {source._entry(key)['dtype']}; a streamed copy keeps float32 "
                               "weights only (the trainer writes float32)")
    with atomic.atomic_path(path) as tmp:
        allocate_tables(tmp, shapes, metadata)
        with RowWriter(tmp) as writer:
            for key, shape in shapes.items():
                rows = np.unique(np.asarray(zero.get(key, ()), dtype=np.int64))
                if rows.size and (len(shape) != 2 or rows[0] < 0 or rows[-1] >= shape[0]):
                    raise ValueError(f"rows to zero of {key} must index its {shape[0] if shape else 0} rows")
                for lo, block in source.blocks(key):
                    block = np.array(block, dtype=np.float32)  # a private copy of the mapped pages
                    inside = rows[(rows >= lo) & (rows < lo + block.shape[0])]
                    block[inside - lo] = 0.0
                    writer.write(key, lo, torch.from_numpy(block.reshape((block.shape[0],) + tuple(shape[1:]))))
    return Path(path)
