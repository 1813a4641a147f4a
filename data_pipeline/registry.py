"""The source registry: one row per source (registry.parquet), its atomic writer, and bounded-memory lookup.

`SourceRegistry.open(path)` keeps three numpy arrays in memory, about 20 bytes per source (6.4M sources:
~130 MB): the source ids (int64), the sorted 64-bit title hashes (uint64) and their row order (uint32).
Titles and other columns stay on disk and are read on demand, one row group at a time (a few row groups are
cached). Every hash hit is checked against the stored title, so a hash collision can never give a wrong id.

Items naming sources (`resolve`, used for holdouts and exclude lists):
- an `int` is a source id; a string of digits or `id:<n>` is a source id;
- `title:<text>` is a title (for titles made of digits); any other string is a title;
- `@<path>` / `file:<path>`, or an existing `.txt` file path, is a file of such items, one per line
  (blank lines and lines starting with `#` are skipped).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nulls_dist.data_pipeline.titles import title_hash, title_hashes
from nulls_dist.formats import atomic
from nulls_dist.formats.digests import file_sha256

REGISTRY_SCHEMA = pa.schema([
    ("source_id", pa.int64()),
    ("title", pa.string()),
    ("page_id", pa.int64()),
    ("url", pa.string()),
    ("chars", pa.int64()),
    ("tokens", pa.int64()),
    ("shards", pa.string()),  # the shard indices holding the source's tokens, comma separated
    ("split", pa.string()),  # schema.SPLIT_TRAIN | schema.SPLIT_HOLDOUT
])
REGISTRY_COLUMNS = tuple(REGISTRY_SCHEMA.names)
# Row groups of 8192 rows keep an on-demand title read to ~200 KB (see bench/registry_bench.py).
REGISTRY_ROW_GROUP = 8192
_CACHED_GROUPS = 16


def write_registry(path: str | Path, batches: Iterable[pa.RecordBatch | pa.Table],
                   row_group_size: int = REGISTRY_ROW_GROUP) -> dict:
    """Write registry rows (REGISTRY_COLUMNS, source ids strictly increasing) to `path` atomically.
    Returns {"path", "rows", "sha256"}."""
    path = Path(path)
    rows, last_id = 0, None
    with atomic.atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, REGISTRY_SCHEMA, compression="zstd") as writer:
            for batch in batches:
                table = _as_registry_table(batch, path)
                if table.num_rows == 0:
                    continue
                ids = table.column("source_id").to_numpy()
                if np.any(np.diff(ids) <= 0) or (last_id is not None and ids[0] <= last_id):
                    raise ValueError(f"registry {path}: source ids must be strictly increasing "
                                     f"(near source_id {int(ids[0])})")
                last_id = int(ids[-1])
                writer.write_table(table, row_group_size=row_group_size)
                rows += table.num_rows
        digest = file_sha256(tmp)
    return {"path": str(path), "rows": rows, "sha256": digest}


def _as_registry_table(batch, path: Path) -> pa.Table:
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    missing = [c for c in REGISTRY_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"registry {path}: rows lack column(s) {missing} (need {list(REGISTRY_COLUMNS)})")
    return table.select(list(REGISTRY_COLUMNS)).cast(REGISTRY_SCHEMA)




def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".parquet" and p.is_file())
        if files:
            return files
    raise ValueError(f"registry path {path!s}: not a parquet file or a directory of parquet files")


def _read_index_columns(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(source_ids (n,) int64, title hashes (n,) uint64), filled row group by row group."""
    pfs = [pq.ParquetFile(f) for f in files]
    for f, pf in zip(files, pfs):
        missing = {"source_id", "title"} - set(pf.schema_arrow.names)
        if missing:
            raise ValueError(f"registry {f}: lacks column(s) {sorted(missing)}")
    n = sum(pf.metadata.num_rows for pf in pfs)
    if n >= 2**32:
        raise ValueError(f"registry: {n} rows exceed the uint32 row index")
    source_ids = np.empty(n, dtype=np.int64)
    hashes = np.empty(n, dtype=np.uint64)
    at = 0
    for pf in pfs:
        for gi in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(gi, columns=["source_id", "title"])
            k = table.num_rows
            source_ids[at:at + k] = table.column("source_id").combine_chunks().to_numpy()  # Array: no pandas
            hashes[at:at + k] = title_hashes(table.column("title").to_pylist(), count=k)
            at += k
    return source_ids, hashes


class SourceRegistry:
    """Title <-> source id lookup over a registry parquet file (or a directory of parquet parts with at
    least source_id and title columns, such as the ingest stage's `articles/`)."""

    def __init__(self, files: list[Path], source_ids: np.ndarray, sorted_hashes: np.ndarray, order: np.ndarray):
        self.files = files
        self._pfs = [pq.ParquetFile(f) for f in files]
        self._ids = source_ids  # (n,) int64, strictly increasing
        self._ids.flags.writeable = False
        self._dense = len(source_ids) == 0 or int(source_ids[-1] - source_ids[0]) == len(source_ids) - 1
        self._hashes = sorted_hashes  # (n,) uint64, ascending
        self._order = order  # (n,) uint32: row of the i-th smallest hash
        groups = [(fi, gi, pf.metadata.row_group(gi).num_rows)
                  for fi, pf in enumerate(self._pfs) for gi in range(pf.metadata.num_row_groups)]
        self._groups = [(fi, gi) for fi, gi, _ in groups]
        self._group_start = np.cumsum([0] + [n for _, _, n in groups])  # (G+1,)
        self._cache: OrderedDict[tuple[int, str], pa.Array] = OrderedDict()

    @classmethod
    def open(cls, path: str | Path, index_cache: str | Path | None = None) -> SourceRegistry:
        """Open a registry. `index_cache`: an .npz file keeping the built index; reused while the registry
        files keep their size and mtime, rebuilt (and rewritten atomically) otherwise."""
        files = _parquet_files(Path(path))
        fingerprint = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
        if index_cache is not None and Path(index_cache).is_file():
            with np.load(index_cache) as z:
                if str(z["fingerprint"]) == fingerprint:
                    return cls(files, z["source_ids"], z["hashes"], z["order"])
        source_ids, hashes = _read_index_columns(files)
        if np.any(np.diff(source_ids) <= 0):
            raise ValueError(f"registry {path}: source ids are not strictly increasing")
        order = np.argsort(hashes, kind="stable")
        hashes = hashes[order]
        order = order.astype(np.uint32)
        if index_cache is not None:
            with atomic.atomic_open(index_cache, "wb") as f:
                np.savez(f, fingerprint=np.array(fingerprint), source_ids=source_ids, hashes=hashes, order=order)
        return cls(files, source_ids, hashes, order)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def source_ids(self) -> np.ndarray:
        """(n,) int64, ascending, read-only."""
        return self._ids

    @property
    def nbytes(self) -> int:
        return int(self._ids.nbytes + self._hashes.nbytes + self._order.nbytes)

    # ---- rows ------------------------------------------------------------------------------------

    def _row_of_id(self, source_id: int) -> int | None:
        n = len(self._ids)
        if n == 0:
            return None
        if self._dense:
            row = source_id - int(self._ids[0])
            return row if 0 <= row < n else None
        row = int(np.searchsorted(self._ids, source_id))
        return row if row < n and int(self._ids[row]) == source_id else None

    def _column_group(self, group: int, column: str) -> pa.Array:
        key = (group, column)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        fi, gi = self._groups[group]
        values = self._pfs[fi].read_row_group(gi, columns=[column]).column(0).combine_chunks()
        self._cache[key] = values
        if len(self._cache) > _CACHED_GROUPS:
            self._cache.popitem(last=False)
        return values

    def _value(self, row: int, column: str):
        group = int(np.searchsorted(self._group_start, row, side="right")) - 1
        return self._column_group(group, column)[row - int(self._group_start[group])].as_py()

    def _rows_of_title(self, title: str) -> list[int]:
        h = np.uint64(title_hash(title))
        lo = int(np.searchsorted(self._hashes, h, side="left"))
        hi = int(np.searchsorted(self._hashes, h, side="right"))
        return [int(r) for r in self._order[lo:hi] if self._value(int(r), "title") == title]

    # ---- public lookups --------------------------------------------------------------------------

    def find_id(self, title: str) -> int | None:
        rows = self._rows_of_title(title)
        return int(self._ids[rows[0]]) if rows else None

    def find_ids(self, titles: Sequence[str]) -> list[int | None]:
        """Ids for many titles (None where unknown), reading each needed row group once."""
        hashes = title_hashes(titles, count=len(titles))
        lo = np.searchsorted(self._hashes, hashes, side="left")
        hi = np.searchsorted(self._hashes, hashes, side="right")
        candidates = [(i, int(r)) for i in range(len(titles)) for r in self._order[lo[i]:hi[i]]]
        candidates.sort(key=lambda c: c[1])  # row order = row-group order: each group is read once
        found: list[int | None] = [None] * len(titles)
        for i, row in candidates:
            if found[i] is None and self._value(row, "title") == titles[i]:
                found[i] = int(self._ids[row])
        return found

    def id_for_title(self, title: str) -> int:
        source_id = self.find_id(title)
        if source_id is None:
            raise ValueError(f"unknown title {title!r} (not in registry {self.files[0].parent})")
        return source_id

    def title_for_id(self, source_id: int) -> str:
        row = self._row_of_id(int(source_id))
        if row is None:
            raise ValueError(f"unknown source id {source_id} (not in registry {self.files[0].parent})")
        return self._value(row, "title")

    def has_id(self, source_id: int) -> bool:
        return self._row_of_id(int(source_id)) is not None

    def row(self, source_id: int) -> dict:
        """Every stored column of one source."""
        row = self._row_of_id(int(source_id))
        if row is None:
            raise ValueError(f"unknown source id {source_id} (not in registry {self.files[0].parent})")
        names = self._pfs[self._groups[0][0]].schema_arrow.names
        return {name: self._value(row, name) for name in names}

    def resolve(self, items: Sequence[str | int] | str | int) -> list[int]:
        """Source ids for ids, titles or files of them (see the module docstring), in the given order
        without repeats; raises ValueError listing every item that names no source."""
        parsed = [(*_parse_item(item), origin) for item, origin in _expand_items(items)]
        titles = [value for kind, value, _ in parsed if kind == "title"]
        title_ids = iter(self.find_ids(titles))
        ids, unknown = [], []
        for kind, value, origin in parsed:
            source_id = (value if self.has_id(value) else None) if kind == "id" else next(title_ids)
            if source_id is None:
                unknown.append(f"{kind} {value!r}{origin}")
            else:
                ids.append(source_id)
        if unknown:
            raise ValueError(f"{len(unknown)} unknown source(s): " + "; ".join(unknown))
        return list(dict.fromkeys(ids))


def _expand_items(items) -> Iterable[tuple[str | int, str]]:
    """(item, where it came from) for the items, reading files of items."""
    if isinstance(items, (str, int, np.integer)):
        items = [items]
    for item in items:
        file = _item_file(item)
        if file is None:
            yield item, ""
            continue
        if not file.is_file():
            raise ValueError(f"source list file {file} does not exist")
        for line_no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield line, f" ({file}:{line_no})"


def _item_file(item) -> Path | None:
    if not isinstance(item, str):
        return None
    for prefix in ("@", "file:"):
        if item.startswith(prefix):
            return Path(item[len(prefix):])
    if item.endswith(".txt") and os.path.isfile(item):
        return Path(item)
    return None


def _parse_item(item) -> tuple[str, int | str]:
    if isinstance(item, (bool, np.bool_)):
        raise ValueError(f"source item {item!r} is neither an id nor a title")
    if isinstance(item, (int, np.integer)):
        return "id", int(item)
    if not isinstance(item, str):
        raise ValueError(f"source item {item!r} is neither an id nor a title")
    if item.startswith("title:"):
        return "title", item[len("title:"):]
    if item.startswith("id:"):
        item = item[len("id:"):].strip()
        if not item.isdigit():
            raise ValueError(f"source item 'id:{item}' is not an integer id")
        return "id", int(item)
    if item.isascii() and item.isdigit():
        return "id", int(item)
    return "title", item
