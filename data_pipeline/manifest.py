"""The shard stage's two summaries: `registry.parquet` (one row per source, with the tokens it has in the
shards, the shards holding it and its split) and `manifest.json` (the dataset manifest the loader checks).
Both are written atomically and carry no timestamps, so an identical rerun writes identical files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import schema
from data_pipeline.article_slices import index_corpus, read_rows
from data_pipeline.registry import write_registry
from data_pipeline.shards import HOLDOUT_TASK, WORK_DIR

_META_COLUMNS = ["source_id", "title", "page_id", "url", "chars"]


def _shard_indices(names: list[str]) -> str:
    """["holdout/shard-000002.tar", ...] -> "2,...": the registry's `shards` column (the split names the dir)."""
    return ",".join(str(int(Path(n).stem.removeprefix("shard-"))) for n in names)


def _stats(out_dir: Path, task_name: str) -> dict[int, tuple[int, list[str]]]:
    table = pq.read_table(out_dir / WORK_DIR / f"{task_name}.stats.parquet")
    return {s: (t, sh) for s, t, sh in zip(table.column("source_id").to_pylist(),
                                           table.column("tokens").to_pylist(),
                                           table.column("shards").to_pylist())}


def _registry_batches(ingest_dir: Path, out_dir: Path, plan: dict, markers: list[dict]):
    index = index_corpus(ingest_dir)
    holdout = _stats(out_dir, HOLDOUT_TASK) if any(m["task"] == HOLDOUT_TASK for m in markers) else {}
    aps = plan["articles_per_shard"]
    for marker in markers:
        if marker["task"] == HOLDOUT_TASK:
            continue
        i = int(marker["task"].removeprefix("shard-"))
        train = _stats(out_dir, marker["task"])
        for batch in read_rows(index, i * aps, min((i + 1) * aps, index.num_rows), _META_COLUMNS):
            ids = batch.column("source_id").to_pylist()
            rows = [holdout.get(s) or train[s] for s in ids]
            yield pa.RecordBatch.from_arrays(
                [*(batch.column(c) for c in _META_COLUMNS),
                 pa.array([r[0] for r in rows], pa.int64()),
                 pa.array([_shard_indices(r[1]) for r in rows], pa.string()),
                 pa.array([schema.SPLIT_HOLDOUT if s in holdout else schema.SPLIT_TRAIN for s in ids], pa.string())],
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
    path = Path(out_dir) / schema.MANIFEST_NAME
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path
