"""Weights files: safetensors only (a file a user hands us is parsed, never unpickled), written atomically, and
`state_dict_digest`, the content digest every manifest and certificate cites.

`state_dict_digest` depends only on key names, dtypes, shapes and values, so the same weights give the same
digest in a training checkpoint, a deployed copy or memory.

`RowReader` reads selected rows of one 2-D tensor of a safetensors file through a memory map: a deployment that
needs one source's ~100 sink rows reads those pages, not the whole table. Its writer, for tables no process
holds whole (row-sharded sink tables): `allocate_tables` lays out the header and sizes the file, then every
process writes the rows it owns in place through `RowWriter`.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Iterable

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


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over (key, dtype, shape, bytes) of every tensor, keys sorted."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_header(path: Path) -> tuple[int, dict]:
    """(start of the data section, the tensor entries) of a safetensors file, offsets not yet trusted."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return 8 + header_len, {k: v for k, v in header.items() if k != "__metadata__"}


def allocate_tables(path: str | os.PathLike, shapes: dict[str, tuple[int, int]],
                    metadata: dict[str, str] | None = None) -> Path:
    """Create a safetensors file of float32 2-D tensors `shapes` (key -> (rows, cols), laid out in that order)
    whose data is not yet written: the file is sized (sparse where the file system allows), so processes can
    fill their rows with `RowWriter` in any order. Not atomic by itself: write it under a temporary name
    (`atomic.temp_sibling`) and rename when every writer is done."""
    header: dict[str, object] = {}
    offset = 0
    for key, (rows, cols) in shapes.items():
        size = int(rows) * int(cols) * 4
        header[key] = {"dtype": "F32", "shape": [int(rows), int(cols)], "data_offsets": [offset, offset + size]}
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
        """Rows [start, start + len(rows)) of table `key` := `rows` ((n, cols) float32)."""
        if key not in self._entries:
            raise WeightsError(f"{self.path}: no tensor {key!r}")
        entry = self._entries[key]
        num_rows, cols = entry["shape"]
        if rows.dim() != 2 or rows.shape[1] != cols or rows.dtype != torch.float32:
            raise ValueError(f"rows for {key} must be float32 (n, {cols}), got {rows.dtype} {tuple(rows.shape)}")
        if start < 0 or start + rows.shape[0] > num_rows:
            raise ValueError(f"rows [{start}, {start + rows.shape[0]}) are outside {key}'s [0, {num_rows})")
        data = rows.detach().to("cpu").contiguous().numpy().tobytes()
        position = self._base + entry["data_offsets"][0] + start * cols * 4
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
                self.keys = set(f.keys())
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{self.path}: not a readable safetensors file ({exc})") from None
        self._base, self._entries = _read_header(self.path)
        self._maps: dict[str, np.ndarray] = {}

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
        return torch.from_numpy(np.ascontiguousarray(table[index]))
