"""The trainer's side of the data contract: read the dataset manifest of prepared shards, and build the
stateful training loader and the fixed evaluation batches (trained and held-out sources) over them.
Preparing missing data and resolving `exclude_sources` titles need the data pipeline, so they happen at the
entry point (cli.py), which passes the shard directory and source ids down.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nulls_dist.formats import dataset as schema
from nulls_dist.formats.digests import file_sha256
from nulls_dist.train.config import TrainConfig
from nulls_dist.train.distributed import DistEnv


@dataclass(frozen=True)
class DataHandle:
    shard_dir: Path
    manifest_path: Path
    manifest_sha256: str
    context_length: int
    vocab_size: int
    holdout_source_ids: tuple[int, ...]
    exclude_source_ids: tuple[int, ...]  # `train.exclude_sources` resolved through the registry


def open_data(data_dir: str | Path, exclude_source_ids: tuple[int, ...] = ()) -> DataHandle:
    """Read the dataset manifest of prepared shards (the entry point prepares them and resolves exclusions)."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / schema.MANIFEST_NAME
    if not manifest_path.is_file():
        raise ValueError(f"data: no dataset manifest at {manifest_path}; run `nulls-data` first")
    manifest = json.loads(manifest_path.read_text())
    holdout = manifest.get("holdout", {}).get("source_ids", [])
    return DataHandle(
        shard_dir=data_dir,
        manifest_path=manifest_path,
        manifest_sha256=file_sha256(manifest_path),
        context_length=int(manifest["context_length"]),
        vocab_size=int(manifest["tokenizer"]["vocab_size"]),
        holdout_source_ids=tuple(int(s) for s in holdout),
        exclude_source_ids=tuple(sorted(int(s) for s in exclude_source_ids)),
    )


def build_train_loader(data: DataHandle, cfg: TrainConfig, env: DistEnv):
    """This rank's stateful loader over the training split (tokens/source_ids (B, T) int64, loss_mask bool)."""
    from nulls_dist.data.loader import build_loader

    return build_loader(data.shard_dir, batch_size=cfg.deepspeed.micro_batch, rank=env.rank,
                        world_size=env.world_size, seed=cfg.seed, num_workers=cfg.data.num_workers,
                        split=schema.SPLIT_TRAIN, exclude_source_ids=data.exclude_source_ids)


def fixed_batches(data: DataHandle, cfg: TrainConfig, env: DistEnv) -> tuple[list[dict], list[dict]]:
    """The first `eval.num_batches` micro-batches of trained and of held-out sources (seeded, never reshuffled):
    every evaluation of a run, and of its resumption, sees the same tokens. Every rank reads the same batches
    (a held-out split may have fewer shards than ranks); the evaluator averages over ranks anyway."""
    from nulls_dist.data.loader import build_loader

    out = []
    for split in (schema.SPLIT_TRAIN, schema.SPLIT_HOLDOUT):
        if split == schema.SPLIT_HOLDOUT and not data.holdout_source_ids:
            out.append([])
            continue
        loader = build_loader(data.shard_dir, batch_size=cfg.deepspeed.micro_batch, rank=0, world_size=1,
                              seed=cfg.seed + 1, num_workers=0, split=split,
                              exclude_source_ids=data.exclude_source_ids if split == schema.SPLIT_TRAIN else None)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == cfg.eval.num_batches:
                break
        out.append(batches)
    return out[0], out[1]
