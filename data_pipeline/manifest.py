"""The shard stage's two summaries: `registry.parquet` (one row per source, with the tokens it has in the
shards, the shards holding it and its split) and `manifest.json` (the dataset manifest the loader checks).
Both are written atomically and carry no timestamps, so an identical rerun writes identical files.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nulls_dist.data_pipeline.article_slices import index_corpus, read_rows
from nulls_dist.data_pipeline.registry import write_registry
from nulls_dist.data_pipeline.shards import HOLDOUT_TASK, WORK_DIR
from nulls_dist.formats import atomic
from nulls_dist.formats import dataset as schema

_META_COLUMNS = ["source_id", "title", "page_id", "url", "chars"]


def _shard_indices(shards: pa.ChunkedArray) -> pa.Array:
    """list<string> of shard names (["holdout/shard-000002.tar", ...]) -> "2,...": the registry's `shards` column
    (the split names the directory); arrow kernels, no Python object per row."""
    shards = shards.combine_chunks()
    names = pc.replace_substring_regex(shards.flatten(), r"^(?:.*/)?shard-0*(\d+)\.tar$", r"\1")
    return pc.binary_join(pa.ListArray.from_arrays(shards.offsets, names), ",")


def _stats(out_dir: Path, task_name: str) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """A task's (source_ids (n,) int64, tokens (n,) int64, shards (n,) string), in corpus order."""
    table = pq.read_table(out_dir / WORK_DIR / f"{task_name}.stats.parquet")
    return (table.column("source_id").combine_chunks().to_numpy(), table.column("tokens").combine_chunks().to_numpy(),
            _shard_indices(table.column("shards")))


def _registry_batches(ingest_dir: Path, out_dir: Path, plan: dict, markers: list[dict]):
    index = index_corpus(ingest_dir)
    empty = (np.empty(0, np.int64), np.empty(0, np.int64), pa.array([], pa.string()))
    holdout = _stats(out_dir, HOLDOUT_TASK) if any(m["task"] == HOLDOUT_TASK for m in markers) else empty
    aps = plan["articles_per_shard"]
    for marker in markers:
        if marker["task"] == HOLDOUT_TASK:
            continue
        i = int(marker["task"].removeprefix("shard-"))
        train_ids, train_tokens, train_shards = _stats(out_dir, marker["task"])
        tokens, shards = np.concatenate([train_tokens, holdout[1]]), pa.concat_arrays([train_shards, holdout[2]])
        at = 0  # next train stats row: the task's non-holdout sources, in corpus order like the slice
        # whole row groups per batch (no text is read): the registry's row groups follow the ingest parts'
        for batch in read_rows(index, i * aps, min((i + 1) * aps, index.num_rows), _META_COLUMNS, batch_rows=1 << 20):
            ids = batch.column("source_id").to_numpy()  # (b,) int64
            where = np.minimum(np.searchsorted(holdout[0], ids), max(len(holdout[0]) - 1, 0))  # (b,)
            held = (holdout[0][where] == ids) if len(holdout[0]) else np.zeros(len(ids), bool)  # (b,)
            train_rows = np.arange(at, at + int(np.count_nonzero(~held)))
            at += len(train_rows)
            if not np.array_equal(train_ids[train_rows], ids[~held]):
                raise ValueError(f"shard stats {marker['task']}: sources do not match the corpus slice (rerun shard)")
            # (b,): a row's position in the concatenation [train stats rows, holdout stats rows]
            take = np.empty(len(ids), np.int64)
            take[~held] = train_rows
            take[held] = len(train_ids) + where[held]
            take = pa.array(take)
            yield pa.RecordBatch.from_arrays(
                [*(batch.column(c) for c in _META_COLUMNS),
                 pa.array(tokens[take.to_numpy()], pa.int64()), shards.take(take),
                 pc.if_else(pa.array(held), schema.SPLIT_HOLDOUT, schema.SPLIT_TRAIN)],
                names=[*_META_COLUMNS, "tokens", "shards", "split"],
            )


def write_dataset_registry(ingest_dir: str | Path, out_dir: str | Path, plan: dict, markers: list[dict]) -> dict:
    """`<out_dir>/registry.parquet`, streamed slice by slice in corpus order. Returns {"path", "rows", "sha256"}."""
    out_dir = Path(out_dir)
    return write_registry(out_dir / schema.REGISTRY_NAME, _registry_batches(Path(ingest_dir), out_dir, plan, markers))


def build_manifest(plan: dict, markers: list[dict], tokenizer: dict, registry: dict, id_offset: int,
                   holdout_ids: list[int]) -> dict:
    train = [s for m in markers if m["task"] != HOLDOUT_TASK for s in m["shards"]]
    held = [s for m in markers if m["task"] == HOLDOUT_TASK for s in m["shards"]]
    entry = lambda s: {k: s[k] for k in ("name", "samples", "tokens", "bytes", "sha256")}  # noqa: E731
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "shards": [entry(s) for s in train],
        "num_shards": len(train),
        "num_samples": sum(s["samples"] for s in train),
        "num_tokens": sum(s["tokens"] for s in train),
        "holdout": {
            "shards": [entry(s) for s in held],
            "num_samples": sum(s["samples"] for s in held),
            "num_tokens": sum(s["tokens"] for s in held),
            "num_sources": len(holdout_ids),
            "source_ids": sorted(holdout_ids),
        },
        "num_articles": plan["num_articles"],
        "context_length": plan["packing"]["context_length"],
        "token_dtype": plan["token_dtype"],
        "tokenizer": tokenizer,
        "special_ids": tokenizer["special_ids"],
        "packing": plan["packing"],
        "articles_per_shard": plan["articles_per_shard"],
        "registry": {"path": schema.REGISTRY_NAME, "sha256": registry["sha256"], "rows": registry["rows"]},
        "id_offset": id_offset,
        "plan_hash": plan["hash"],
    }


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    return atomic.write_text(Path(out_dir) / schema.MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True))
