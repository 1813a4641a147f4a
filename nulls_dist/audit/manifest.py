"""The per-source sink manifest of a trained checkpoint: one record per registry source, written streaming as
sharded Parquet (each shard through a temporary name and a rename) plus `index.json`.

Format version 2. Record columns (see docs/unlearning.md):
    source_id int64, title string, split string, trained bool, tokens int64 (tokens trained on; 0 if not trained),
    strategy string, strategy_version string,
    sinks            list<int32> when every layer uses the same mask (index `layers_share_sinks: true`): the
                     source's active pool units, stored once; list<list<int32>> (one list per layer) when the
                     assignment is layer-specific (`layers_share_sinks: false`),
    num_sharing int64, max_overlap int32, max_overlap_source int64 (-1: none), overlap_exact bool,
    sink_digest      fixed_size_binary(32): sha256 over its sink keys' digests, which cover the key's gate, up
                     and down rows in every layer (the definition: `sink_digests.py`).
Version 1 stored L identical copies of a shared sink list per record (about 82 GB raw at the paper's 32 layers
and 6.4M sources) and a digest over L x K row digests; readers refuse it (`read_index`): rebuild it.

Memory is bounded by the chunk size: the registry is read in row batches, the overlap reference (all trained
sources for `exact`, a seeded sample for `sampled`) is a sparse incidence matrix, and records leave as soon
as a shard is full. Each chunk's sink rows are computed once and serve its record, its overlap keys and its
digest; with `workers` > 1 chunks are computed by a thread pool (torch, numpy, hashlib and Arrow release the
GIL) and written in registry order, so the output does not depend on the worker count. The index
(`index.json`, written last) is the manifest's root: its sha256 is the manifest digest that certificates cite.
"""
from __future__ import annotations

import datetime as dt
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from nulls_dist.formats.dataset import SPLIT_TRAIN
from nulls_dist.config import NullConfig
from nulls_dist.sinks import SinkAssignment
from nulls_dist.formats import atomic
from nulls_dist.formats.digests import file_sha256
from nulls_dist.audit import sink_digests
from nulls_dist.formats.documents import read_json_object
from nulls_dist.audit.overlap import OverlapIndex, pair_work

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
MANIFEST_FORMAT = "nulls-sink-manifest"
MANIFEST_VERSION = 2  # 2: a shared sink list stored once per record; digests per sink key (sink_digests.py)
SHARD_PATTERN = "manifest-{index:05d}.parquet"
OVERLAP_METHODS = ("auto", "exact", "sampled")
_AUTO_PROBE = 8192  # sources whose sinks estimate sum_u load_u^2 for `auto` (only the exact/sampled decision)


def schema(layers_share_sinks: bool) -> pa.Schema:
    """The record schema: `sinks` is one list, or one list per layer when the assignment is layer-specific."""
    sinks = pa.list_(pa.int32()) if layers_share_sinks else pa.list_(pa.list_(pa.int32()))
    return pa.schema([
        ("source_id", pa.int64()), ("title", pa.string()), ("split", pa.string()), ("trained", pa.bool_()),
        ("tokens", pa.int64()), ("strategy", pa.string()), ("strategy_version", pa.string()),
        ("sinks", sinks), ("num_sharing", pa.int64()), ("max_overlap", pa.int32()),
        ("max_overlap_source", pa.int64()), ("overlap_exact", pa.bool_()),
        ("sink_digest", pa.binary(sink_digests.DIGEST_BYTES)),
    ])


@dataclass
class ManifestOptions:
    """Typed options of `build_manifest` (the Hydra entry point fills them from conf/unlearn/manifest.yaml)."""

    shard_rows: int = 1_000_000
    chunk_rows: int = 65_536
    overlap: str = "auto"  # exact | sampled | auto (exact while the pair work fits exact_budget)
    overlap_sample: int = 1024
    exact_budget: int = 200_000_000  # incidences sum_u load_u^2 an exact pass may touch
    product_budget: int = 16_000_000  # result entries per chunk product (~130 MB of int64/float temporaries)
    seed: int = 0
    exclude_source_ids: list[int] = field(default_factory=list)
    # chunks computed at once (threads); the caller keeps torch at one intra-op thread when this is > 1
    workers: int = 1

    def __post_init__(self) -> None:
        if self.overlap not in OVERLAP_METHODS:
            raise ValueError(f"overlap must be one of {OVERLAP_METHODS}, got {self.overlap!r}")
        for name in ("shard_rows", "chunk_rows", "overlap_sample", "product_budget", "workers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class SinkKeys:
    """Source ids -> sink rows as a record stores them, and the sink keys the overlap and digests use."""

    def __init__(self, model_cfg: NullConfig) -> None:
        self.assignment = SinkAssignment(model_cfg.sink_assignment_config())
        self.n_layer = model_cfg.n_layer
        self.n_sink = model_cfg.n_sink
        self.layer_specific = model_cfg.sink_layer_specific
        self.num_keys = self.n_sink * (self.n_layer if self.layer_specific else 1)

    def rows(self, source_ids: np.ndarray) -> np.ndarray:
        """(S,) -> (S, K) int64 pool indices, -1 padded; (S, L, K) when layer-specific."""
        ids = torch.from_numpy(np.ascontiguousarray(source_ids, dtype=np.int64))
        if not self.layer_specific:
            return self.assignment.rows(ids, 0).numpy()  # (S, K): every layer holds these units
        return np.stack([self.assignment.rows(ids, layer).numpy() for layer in range(self.n_layer)], axis=1)

    def keys(self, rows: np.ndarray) -> np.ndarray:
        """`rows` -> (S, K') sink keys (layer * n_sink + unit when layer-specific), -1 padded, record order."""
        if not self.layer_specific:
            return rows
        offsets = (np.arange(self.n_layer, dtype=np.int64) * self.n_sink)[None, :, None]
        return np.where(rows >= 0, rows + offsets, -1).reshape(rows.shape[0], -1)

    def chunked_keys(self, source_ids: np.ndarray, chunk: int) -> np.ndarray:
        """Keys of many sources, computed `chunk` at a time (rows of different chunks may differ in width)."""
        parts = [self.keys(self.rows(source_ids[i:i + chunk])) for i in range(0, len(source_ids), chunk)]
        width = max((p.shape[1] for p in parts), default=1)
        parts = [np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=-1) for p in parts]
        return np.concatenate(parts) if parts else np.zeros((0, width), np.int64)


def iter_registry(path: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Row batches of source_id, title, tokens, split from registry.parquet."""
    if not path.is_file():
        raise ValueError(f"registry file not found: {path}")
    pf = pq.ParquetFile(path)
    missing = {"source_id", "title", "tokens", "split"} - set(pf.schema_arrow.names)
    if missing:
        raise ValueError(f"{path}: registry lacks column(s) {sorted(missing)}")
    yield from pf.iter_batches(batch_size=batch_rows, columns=["source_id", "title", "tokens", "split"])


def trained_mask(batch: pa.RecordBatch, excluded: np.ndarray) -> np.ndarray:
    ids = batch.column("source_id").to_numpy().astype(np.int64)
    is_train = pc.equal(batch.column("split"), SPLIT_TRAIN).to_numpy(zero_copy_only=False)
    return is_train.astype(bool) & ~np.isin(ids, excluded)


def _trained_ids(registry: Path, opts: ManifestOptions, excluded: np.ndarray) -> np.ndarray:
    parts = [b.column("source_id").to_numpy().astype(np.int64)[trained_mask(b, excluded)]
             for b in iter_registry(registry, opts.chunk_rows)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def build_overlap_index(trained: np.ndarray, keys: SinkKeys, opts: ManifestOptions) -> OverlapIndex:
    """Exact over all trained sources when the pair work fits the budget (or is forced), else a sample."""
    method = opts.overlap
    if method == "auto":  # estimate sum_u load_u^2 from a sample of sources (only for the decision)
        rng = np.random.default_rng(opts.seed)
        probe = trained if len(trained) <= _AUTO_PROBE else rng.choice(trained, _AUTO_PROBE, replace=False)
        k = keys.chunked_keys(probe, opts.chunk_rows)
        loads = np.bincount(k[k >= 0], minlength=keys.num_keys) * (len(trained) / max(1, len(probe)))
        method = "exact" if pair_work(loads) <= opts.exact_budget else "sampled"
    if method == "exact" or len(trained) <= opts.overlap_sample:
        ref = trained
        exact = True
    else:
        rng = np.random.default_rng(opts.seed)
        ref = np.sort(rng.choice(trained, size=opts.overlap_sample, replace=False))
        exact = False
    log.info("overlap: %s against %d reference sources", "exact" if exact else "sampled", len(ref))
    return OverlapIndex(ref, keys.chunked_keys(ref, opts.chunk_rows), keys.num_keys, len(trained), exact)


def _lists(rows: np.ndarray) -> pa.Array:
    """(S, K) -1 padded -> list<int32>, or (S, L, K) -> list<list<int32>>, dropping the padding."""
    valid = rows >= 0
    lengths = valid.sum(axis=-1).reshape(-1)  # (S,) or (S*L,)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    inner = pa.ListArray.from_arrays(pa.array(offsets), pa.array(rows[valid].astype(np.int32)))
    if rows.ndim == 2:
        return inner
    s, num_layers, _ = rows.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, s * num_layers + 1, num_layers, dtype=np.int32)), inner)


class _ShardWriter:
    """Parquet shards of at most `shard_rows` records, each written to a temp name and renamed on close."""

    def __init__(self, out_dir: Path, shard_rows: int, table_schema: pa.Schema) -> None:
        self.out_dir, self.shard_rows, self.schema = out_dir, shard_rows, table_schema
        self.shards: list[dict[str, Any]] = []
        self._writer = None
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        start = 0
        while start < table.num_rows:
            if self._writer is None:
                self._open()
            take = min(self.shard_rows - self._rows, table.num_rows - start)
            part = table.slice(start, take)
            self._writer.write_table(part)
            ids = part.column("source_id").to_numpy()
            info = self.shards[-1]
            info["first_source_id"] = int(ids[0]) if info["first_source_id"] is None else info["first_source_id"]
            info["last_source_id"] = int(ids[-1])
            info["min_source_id"] = min(info["min_source_id"], int(ids.min()))
            info["max_source_id"] = max(info["max_source_id"], int(ids.max()))
            self._rows += take
            start += take
            if self._rows == self.shard_rows:
                self._close()

    def _open(self) -> None:
        name = SHARD_PATTERN.format(index=len(self.shards))
        self._tmp = atomic.temp_sibling(self.out_dir / name)
        self._writer = pq.ParquetWriter(self._tmp, self.schema)
        self.shards.append({"name": name, "rows": 0, "first_source_id": None, "last_source_id": None,
                            "min_source_id": np.iinfo(np.int64).max, "max_source_id": -1})
        self._rows = 0

    def _close(self) -> None:
        self._writer.close()
        final = self.out_dir / self.shards[-1]["name"]
        atomic.commit(self._tmp, final)
        self.shards[-1].update(rows=self._rows, sha256=file_sha256(final))
        self._writer = None

    def finish(self) -> list[dict[str, Any]]:
        if self._writer is not None:
            self._close()
        return self.shards


def _in_order(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """fn over items, results in input order; with workers > 1 at most workers + 1 items are in flight."""
    if workers == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="manifest") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def build_manifest(
    out_dir: str | Path,
    *,
    state_dict: Mapping[str, torch.Tensor],
    model_cfg: NullConfig,
    registry_path: str | Path,
    checkpoint_sha256: str,
    data_manifest_sha256: str | None = None,
    checkpoint_path: str = "",
    opts: ManifestOptions | None = None,
) -> dict[str, Any]:
    """Write the manifest shards and index of one checkpoint; returns the index. Only the sink tables of
    `state_dict` are read, one layer at a time (any mapping will do, e.g. a lazy one)."""
    opts = opts or ManifestOptions()
    out_dir, registry_path = Path(out_dir), Path(registry_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = SinkKeys(model_cfg)
    shared = not keys.layer_specific
    table_schema = schema(shared)
    describe = keys.assignment.describe()
    excluded = np.asarray(sorted(opts.exclude_source_ids), dtype=np.int64)
    trained = _trained_ids(registry_path, opts, excluded)
    index = build_overlap_index(trained, keys, opts)
    chunk = min(opts.chunk_rows, index.chunk_rows_for(opts.product_budget))
    digests = sink_digests.key_digests(state_dict, keys.n_layer, keys.n_sink, shared)  # (num_keys+1, 32)
    writer = _ShardWriter(out_dir, opts.shard_rows, table_schema)

    def records(batch: pa.RecordBatch) -> pa.Table:
        return _records(batch, keys, index, digests, describe, excluded, table_schema)

    num_sources = 0
    total = pq.ParquetFile(registry_path).metadata.num_rows
    with tqdm(total=total, desc="manifest", unit="src", disable=None) as bar:
        for table in _in_order(records, iter_registry(registry_path, chunk), opts.workers):
            writer.write(table)
            num_sources += table.num_rows
            bar.update(table.num_rows)
    shards = writer.finish()
    index_doc = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint_sha256": checkpoint_sha256, "checkpoint_path": checkpoint_path,
        "data_manifest_sha256": data_manifest_sha256, "registry_sha256": file_sha256(registry_path),
        "strategy": describe, "model_config": model_cfg.to_dict(),
        "layer_specific": keys.layer_specific, "layers_share_sinks": shared,
        "n_layer": keys.n_layer, "n_sink": keys.n_sink, "sink_digest": sink_digests.DEFINITION,
        "num_sources": num_sources, "num_trained": int(len(trained)),
        "exclude_source_ids": [int(x) for x in excluded],
        "overlap": {"method": "exact" if index.exact else "sampled", "reference_sources": int(len(index.ref_ids)),
                    "seed": opts.seed, "unit": "layer*n_sink+unit" if keys.layer_specific else "pool unit"},
        "schema": {f.name: str(f.type) for f in table_schema},
        "shards": shards,
    }
    atomic.write_json(out_dir / INDEX_NAME, index_doc)
    return index_doc


def _records(batch: pa.RecordBatch, keys: SinkKeys, index: OverlapIndex, digests: np.ndarray,
             describe: dict[str, Any], excluded: np.ndarray, table_schema: pa.Schema) -> pa.Table:
    """One chunk's records: its sink rows are computed once and give the list, the overlap keys and the digest."""
    ids = batch.column("source_id").to_numpy().astype(np.int64)  # (c,)
    trained = trained_mask(batch, excluded)
    rows = keys.rows(ids)  # (c, K) or (c, L, K)
    sink_keys = keys.keys(rows)  # (c, K')
    stats = index.query(ids, sink_keys)
    tokens = np.where(trained, batch.column("tokens").to_numpy(zero_copy_only=False).astype(np.int64), 0)
    c = len(ids)
    digest = sink_digests.source_digests(sink_keys, digests)  # (c, 32)
    return pa.table({
        "source_id": ids, "title": batch.column("title"), "split": batch.column("split"), "trained": trained,
        "tokens": tokens, "strategy": pa.array([describe["strategy"]] * c, pa.string()),
        "strategy_version": pa.array([describe["version"]] * c, pa.string()), "sinks": _lists(rows),
        "num_sharing": stats.num_sharing, "max_overlap": stats.max_overlap,
        "max_overlap_source": stats.max_overlap_source, "overlap_exact": np.full(c, index.exact),
        "sink_digest": pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(sink_digests.DIGEST_BYTES), c, [None, pa.py_buffer(digest.tobytes())]),
    }, schema=table_schema)


def manifest_digest(manifest_dir: str | Path) -> str:
    """sha256 of index.json (which pins every shard's sha256)."""
    path = Path(manifest_dir) / INDEX_NAME
    if not path.is_file():
        raise ValueError(f"manifest index not found: {path}")
    return file_sha256(path)


def check_manifest_belongs(manifest_dir: str | Path, ckpt) -> dict[str, Any]:
    """ValueError unless the manifest was built from this checkpoint (or from the trained checkpoint a
    hard-unlearned one derives from); returns the index."""
    from nulls_dist.deploy.forget import base_checkpoint_sha256

    index = read_index(manifest_dir)
    base = base_checkpoint_sha256(ckpt)
    if index["checkpoint_sha256"] != base:
        raise ValueError(f"manifest {manifest_dir} was built from checkpoint {index['checkpoint_sha256'][:16]}..., "
                         f"not from {ckpt.path} ({base[:16]}...)")
    return index


def read_index(manifest_dir: str | Path) -> dict[str, Any]:
    """The index of a version-2 manifest; ValueError naming the file for anything else (version 1 included)."""
    path = Path(manifest_dir) / INDEX_NAME
    doc = read_json_object(path, "manifest index")
    if doc.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a sink manifest index (format {doc.get('format')!r})")
    if doc.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: sink manifest version {doc.get('version')}, but this code reads version "
                         f"{MANIFEST_VERSION} only (version 1 stored a copy of the sinks per layer and digests over "
                         f"them); rebuild it with nulls-manifest")
    if doc.get("layers_share_sinks") is not (not doc.get("layer_specific")):
        raise ValueError(f"{path}: layers_share_sinks={doc.get('layers_share_sinks')!r} contradicts "
                         f"layer_specific={doc.get('layer_specific')!r}")
    return doc


def record_schema(index: dict[str, Any]) -> pa.Schema:
    return schema(bool(index["layers_share_sinks"]))


def iter_manifest(manifest_dir: str | Path, columns: list[str] | None = None,
                  batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """Record batches of every shard, in order."""
    manifest_dir = Path(manifest_dir)
    for shard in read_index(manifest_dir)["shards"]:
        yield from pq.ParquetFile(manifest_dir / shard["name"]).iter_batches(batch_size=batch_rows, columns=columns)


def read_records(manifest_dir: str | Path, source_ids: Iterable[int], columns: list[str]) -> pa.Table:
    """The records of the given ids (any order; unknown ids are simply absent). Shards whose id range holds
    none of them are skipped and row groups are pruned by their source_id statistics, so a lookup in a 6.4M
    manifest does not decode every `sinks` list."""
    manifest_dir = Path(manifest_dir)
    index = read_index(manifest_dir)
    wanted = np.unique(np.asarray(list(source_ids), dtype=np.int64))
    columns = list(dict.fromkeys(["source_id", *columns]))
    parts = []
    for shard in index["shards"]:
        lo = np.searchsorted(wanted, shard["min_source_id"], side="left")
        hi = np.searchsorted(wanted, shard["max_source_id"], side="right")
        if hi <= lo:
            continue
        inside = wanted[lo:hi].tolist()
        parts.append(pq.read_table(manifest_dir / shard["name"], columns=columns,
                                   filters=[("source_id", "in", inside)]))
    if not parts:
        return record_schema(index).empty_table().select(columns)
    return pa.concat_tables(parts)


def sinks_array(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A `sinks` column -> (S, L', K) int64, -1 padded: L' = 1 for the shared list<int32> form (every layer
    holds those units), L' = L for the per-layer list<list<int32>> form."""
    if isinstance(column, pa.ChunkedArray):
        column = pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([], column.type)
    s = len(column)
    nested = pa.types.is_list(column.type.value_type)
    inner = column.flatten() if nested else column  # (S*L') lists
    lengths = np.asarray(inner.value_lengths().to_numpy(zero_copy_only=False), dtype=np.int64)
    num_layers = (len(inner) // s if s else 0) if nested else 1
    width = int(lengths.max()) if len(lengths) else 0
    out = np.full((len(inner), width), -1, dtype=np.int64)
    values = inner.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    pos = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[np.repeat(np.arange(len(inner)), lengths), pos] = values
    return out.reshape(s, num_layers, width)
