"""The collateral of a forget set: every trained source outside it that shares at least one forgotten sink,
computed exactly and streaming over the manifest shards, and written as a Parquet sidecar of the certificate.

At Wikipedia scale one forgotten source's collateral is millions of sources (6.4M sources with ~100 of 7692
units each: two sources share a unit with probability ~0.73), so certificates never hold it inline: the sidecar
`<certificate stem>.collateral.parquet` (temp name + `os.replace`) holds one row per collateral source and the
certificate cites its sha256 and row count, with a small summary (count, top-N by shared rows).

Sidecar columns (`COLLATERAL_SCHEMA`, in manifest order):
    source_id int64, title string,
    shared_sinks int32      distinct forgotten sink keys it holds (pool units, or (layer, unit) pairs when the
                            assignment is layer-specific),
    shared_rows int32       forgotten sink rows it holds summed over layers (what `hard` takes from it),
    shared_per_layer list<int32>  per-layer shared rows when layer-specific, null otherwise (then every layer
                            shares `shared_sinks` rows),
    forgotten_overlapping list<int64>  the forgotten sources it shares >= 1 sink key with, ascending.

Work per manifest batch is numpy only: one gather of a (L, P) bool table per sink index for the counts, and
one gather + OR-reduce of a (keys, ceil(F/64)) uint64 bitmap for the forgotten sources each one overlaps
(F = forget-set size); memory is bounded by the batch size and `_BUDGET_BYTES`. The overlap lists make the
sidecar grow with F: measured at 6.4M sources (debug pool, 22 of 448 units), 55 MB for F = 1 and 378 MB for
F = 100 (docs/unlearning.md).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nulls_dist.formats import atomic
from nulls_dist.formats.digests import file_sha256
from nulls_dist.audit.manifest import iter_manifest, read_index, read_records, sinks_array

COLLATERAL_SCHEMA = pa.schema([
    ("source_id", pa.int64()), ("title", pa.string()), ("shared_sinks", pa.int32()), ("shared_rows", pa.int32()),
    ("shared_per_layer", pa.list_(pa.int32())), ("forgotten_overlapping", pa.list_(pa.int64())),
])
SIDECAR_SUFFIX = ".collateral.parquet"
TOP_N = 20  # sources listed inline in the certificate summary
_BUDGET_BYTES = 64 << 20  # temporaries of the bitmap gather per sub-chunk


def sidecar_path(certificate_path: str | Path) -> Path:
    """`cert-1.json` -> `cert-1.collateral.parquet` in the same directory."""
    certificate_path = Path(certificate_path)
    return certificate_path.with_name(certificate_path.stem + SIDECAR_SUFFIX)


@dataclass
class ForgetSinks:
    """The forget set's sinks as lookup tables over sink keys (see `overlap.py`)."""

    source_ids: np.ndarray  # (F,) ascending
    rows: np.ndarray  # (L, P+1) bool: forgotten sink rows per layer; column P (the -1 padding) is False
    bits: np.ndarray  # (num_keys+1, W) uint64: bit f of a key's words set when forgotten source f holds it
    layer_specific: bool

    @property
    def union(self) -> np.ndarray:
        """(L, P) bool: the union of the forgotten sources' sink rows in every layer."""
        return self.rows[:, :-1]


def _keys(sinks: np.ndarray, n_sink: int, layer_specific: bool) -> np.ndarray:
    """(S, L, K) pool indices (-1 padded) -> (S, K') sink keys with the padding mapped to the zero key."""
    num_keys = n_sink * (sinks.shape[1] if layer_specific else 1)
    if not layer_specific:
        return np.where(sinks[:, 0, :] >= 0, sinks[:, 0, :], num_keys)
    offsets = (np.arange(sinks.shape[1], dtype=np.int64) * n_sink)[None, :, None]
    return np.where(sinks >= 0, sinks + offsets, num_keys).reshape(sinks.shape[0], -1)


def forget_sinks(manifest_dir: str | Path, source_ids: Iterable[int]) -> ForgetSinks:
    """Lookup tables of the given (manifest) sources; reads only the shards and row groups holding them."""
    index = read_index(manifest_dir)
    n_layer, n_sink, layer_specific = index["n_layer"], index["n_sink"], not index["layers_share_sinks"]
    ids = np.unique(np.asarray(list(source_ids), dtype=np.int64))
    table = read_records(manifest_dir, ids, ["sinks"])
    found = table.column("source_id").to_numpy()
    order = np.argsort(found)
    if not np.array_equal(found[order], ids):
        raise ValueError(f"forget-set source(s) not in the manifest {manifest_dir}: "
                         f"{sorted(set(ids.tolist()) - set(found.tolist()))}")
    sinks = sinks_array(table.column("sinks"))[order]  # (F, L, K), or (F, 1, K) when layers share the sinks
    rows = np.zeros((sinks.shape[1], n_sink + 1), dtype=bool)
    layer = np.broadcast_to(np.arange(sinks.shape[1])[None, :, None], sinks.shape)
    rows[layer[sinks >= 0], sinks[sinks >= 0]] = True
    rows = np.broadcast_to(rows, (n_layer, n_sink + 1)).copy() if sinks.shape[1] == 1 else rows  # (L, P+1)
    num_keys = n_sink * (n_layer if layer_specific else 1)
    words = max(1, (len(ids) + 63) // 64)
    bits = np.zeros((num_keys + 1, words), dtype=np.uint64)
    keys = _keys(sinks, n_sink, layer_specific)  # (F, K')
    f = np.broadcast_to(np.arange(len(ids))[:, None], keys.shape)
    real = keys < num_keys
    np.bitwise_or.at(bits, (keys[real], f[real] // 64), np.left_shift(np.uint64(1), (f[real] % 64).astype(np.uint64)))
    return ForgetSinks(ids, rows, bits, layer_specific)


def _overlapping(keys: np.ndarray, forget: ForgetSinks) -> pa.Array:
    """(h, K') keys of collateral sources -> list<int64> of the forgotten sources each shares a key with."""
    h, width = keys.shape
    words = forget.bits.shape[1]
    step = max(1, _BUDGET_BYTES // max(1, width * words * 8 + words * 64))
    lengths, values = [], []
    for start in range(0, h, step):
        masks = np.bitwise_or.reduce(forget.bits[keys[start:start + step]], axis=1)  # (c, W) uint64
        flags = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")[:, :len(forget.source_ids)]  # (c, F)
        r, col = np.nonzero(flags)
        lengths.append(np.bincount(r, minlength=flags.shape[0]))
        values.append(forget.source_ids[col])
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.zeros(h + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(values) if values else np.zeros(0, np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int64()))


def _per_layer(counts: np.ndarray | None, h: int) -> pa.Array:
    if counts is None:
        return pa.nulls(h, pa.list_(pa.int32()))
    offsets = np.arange(0, counts.size + 1, counts.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(counts.reshape(-1).astype(np.int32)))


def iter_collateral(manifest_dir: str | Path, forget: ForgetSinks) -> Iterator[pa.Table]:
    """Collateral tables (COLLATERAL_SCHEMA) of every manifest batch, in manifest order; exact."""
    n_sink = read_index(manifest_dir)["n_sink"]
    n_layer = forget.rows.shape[0]
    # (rows, L, K) int64 temporaries, and rows x F overlap entries under the int32 offsets of a list column
    batch_rows = min(65_536 // (n_layer if forget.layer_specific else 1), (1 << 28) // max(1, len(forget.source_ids)))
    for batch in iter_manifest(manifest_dir, columns=["source_id", "trained", "title", "sinks"],
                               batch_rows=max(1024, batch_rows)):
        ids = batch.column("source_id").to_numpy()
        keep = batch.column("trained").to_numpy(zero_copy_only=False) & ~np.isin(ids, forget.source_ids)
        sinks = sinks_array(batch.column("sinks"))  # (s, L, K), or (s, 1, K) when layers share the sinks
        sinks = np.where(sinks >= 0, sinks, n_sink)  # padding -> the always-False column P
        per_layer = forget.rows[np.arange(sinks.shape[1])[None, :, None], sinks].sum(axis=2)  # (s, L|1)
        shared = per_layer.sum(axis=1)  # (s,) distinct shared keys
        hit = np.nonzero(keep & (shared > 0))[0]
        if not len(hit):
            continue
        keys = _keys(np.where(sinks[hit] < n_sink, sinks[hit], -1), n_sink, forget.layer_specific)
        shared_rows = shared[hit] * (1 if forget.layer_specific else n_layer)
        yield pa.table({
            "source_id": ids[hit], "title": batch.column("title").take(pa.array(hit)),
            "shared_sinks": shared[hit].astype(np.int32), "shared_rows": shared_rows.astype(np.int32),
            "shared_per_layer": _per_layer(per_layer[hit] if forget.layer_specific else None, len(hit)),
            "forgotten_overlapping": _overlapping(keys, forget),
        }, schema=COLLATERAL_SCHEMA)


class _Summary:
    """Running count, total shared rows and top-N (most shared rows, then smallest id) of collateral tables."""

    def __init__(self, top_n: int = TOP_N) -> None:
        self.top_n, self.num_rows, self.total_shared_rows = top_n, 0, 0
        self.top: pa.Table | None = None

    def add(self, table: pa.Table) -> None:
        self.num_rows += table.num_rows
        self.total_shared_rows += int(np.sum(table.column("shared_rows").to_numpy(), dtype=np.int64))
        both = table if self.top is None else pa.concat_tables([self.top, table])
        order = np.lexsort((both.column("source_id").to_numpy(), -both.column("shared_rows").to_numpy()))
        self.top = both.take(pa.array(order[:self.top_n]))

    def as_dict(self) -> dict[str, Any]:
        return {"num_sources": self.num_rows, "total_shared_rows": self.total_shared_rows,
                "top": [] if self.top is None else [
                    {**row, "num_forgotten_overlapping": len(row.pop("forgotten_overlapping"))}
                    for row in self.top.select(["source_id", "title", "shared_sinks", "shared_rows",
                                                "forgotten_overlapping"]).to_pylist()]}


class ContentDigest:
    """sha256 of collateral rows independent of how they are batched: one hash per value stream (a column's
    values, and the lengths of its strings or lists), combined at the end."""

    def __init__(self) -> None:
        self._h: dict[str, "hashlib._Hash"] = {}

    def _update(self, stream: str, data: bytes | memoryview) -> None:
        self._h.setdefault(stream, hashlib.sha256()).update(data)

    def add(self, table: pa.Table) -> None:
        for name in COLLATERAL_SCHEMA.names:
            col = table.column(name).combine_chunks()
            if pa.types.is_list(col.type):
                lengths = col.value_lengths().fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
                self._update(name + "/len", lengths.tobytes())
                self._update(name, col.flatten().to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
            elif pa.types.is_string(col.type):
                offsets = np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset:col.offset + len(col) + 1]
                self._update(name + "/len", np.diff(offsets).astype(np.int64).tobytes())
                data = col.buffers()[2]
                self._update(name, memoryview(data)[int(offsets[0]):int(offsets[-1])] if data is not None else b"")
            else:
                self._update(name, col.to_numpy().astype(np.int64).tobytes())

    def hexdigest(self) -> str:
        return hashlib.sha256("".join(f"{k}={self._h[k].hexdigest()};" for k in sorted(self._h)).encode()).hexdigest()


def write_collateral(manifest_dir: str | Path, forget: ForgetSinks, path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Compute the collateral into a temporary file beside `path`; returns (temp path, certificate summary).
    The caller renames it onto `path` (`os.replace`) once everything else has succeeded, or unlinks it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.temp_sibling(path)
    summary, digest = _Summary(), ContentDigest()
    try:
        with pq.ParquetWriter(tmp, COLLATERAL_SCHEMA) as writer:
            for table in iter_collateral(manifest_dir, forget):
                writer.write_table(table)
                summary.add(table)
                digest.add(table)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, {"file": path.name, "sha256": file_sha256(tmp), "num_rows": summary.num_rows,
                 "content_sha256": digest.hexdigest(), "columns": COLLATERAL_SCHEMA.names,
                 "top_n": TOP_N, **summary.as_dict()}


def read_sidecar(path: str | Path, forget_ids: Iterable[int]) -> dict[str, Any]:
    """Stream a sidecar and return its summary (as in the certificate), content sha256 and the counts of rows
    that no exact collateral may contain: duplicates, forgotten sources themselves, rows sharing nothing, and
    overlaps naming a source outside the forget set."""
    forget = np.unique(np.asarray(list(forget_ids), dtype=np.int64))
    summary, digest = _Summary(), ContentDigest()
    ids, bad = [], {"forgotten_listed": 0, "shares_nothing": 0, "overlaps_outside_forget_set": 0}
    for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536):
        table = pa.Table.from_batches([batch]).select(COLLATERAL_SCHEMA.names).cast(COLLATERAL_SCHEMA)
        summary.add(table)
        digest.add(table)
        sid = table.column("source_id").to_numpy()
        overlaps = table.column("forgotten_overlapping").combine_chunks()
        bad["forgotten_listed"] += int(np.isin(sid, forget).sum())
        bad["shares_nothing"] += int(((table.column("shared_sinks").to_numpy() <= 0)
                                      | (overlaps.value_lengths().to_numpy(zero_copy_only=False) == 0)).sum())
        bad["overlaps_outside_forget_set"] += int((~np.isin(overlaps.flatten().to_numpy(), forget)).sum())
        ids.append(sid)
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    bad["duplicate_ids"] = int(len(all_ids) - len(np.unique(all_ids)))
    return {"summary": summary.as_dict(), "content_sha256": digest.hexdigest(), "invalid_rows": bad}


def recompute_digest(manifest_dir: str | Path, forget_ids: Iterable[int]) -> str:
    """Content sha256 of the collateral recomputed from the manifest (nothing written)."""
    digest = ContentDigest()
    for table in iter_collateral(manifest_dir, forget_sinks(manifest_dir, forget_ids)):
        digest.add(table)
    return digest.hexdigest()
