"""The trainer's side of the data contract: read the dataset manifest of prepared shards, and build the
step loader and the fixed evaluation batches (trained and held-out sources) over them, with the sink plans
built in the loader. Preparing missing data and resolving `exclude_sources` titles need the data pipeline, so
they happen at the entry point (cli/train.py), which passes the shard directory and source ids down.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from nulls_dist.config import NullConfig
from nulls_dist.data.loader import StepLoader, StreamLayout, build_step_loader, fixed_batches, load_manifest
from nulls_dist.formats import dataset as schema
from nulls_dist.formats.digests import file_sha256
from nulls_dist.sink_plan import plan_for_batch
from nulls_dist.train.config import TrainConfig


@dataclass(frozen=True)
class DataHandle:
    shard_dir: Path
    manifest_path: Path
    manifest_sha256: str
    registry_sha256: str | None  # recorded at training time so the audit tools can check they read the same one
    context_length: int
    vocab_size: int
    num_train_shards: int
    holdout_source_ids: tuple[int, ...]
    exclude_source_ids: tuple[int, ...]  # `train.exclude_sources` resolved through the registry


def open_data(data_dir: str | Path, exclude_source_ids: tuple[int, ...] = ()) -> DataHandle:
    """Read the dataset manifest of prepared shards (the entry point prepares them and resolves exclusions)."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / schema.MANIFEST_NAME
    manifest = load_manifest(data_dir)
    holdout = manifest.get("holdout", {}).get("source_ids", [])
    return DataHandle(
        shard_dir=data_dir,
        manifest_path=manifest_path,
        manifest_sha256=file_sha256(manifest_path),
        registry_sha256=manifest.get("registry", {}).get("sha256"),
        context_length=int(manifest["context_length"]),
        vocab_size=int(manifest["tokenizer"]["vocab_size"]),
        num_train_shards=len(manifest["shards"]),
        holdout_source_ids=tuple(int(s) for s in holdout),
        exclude_source_ids=tuple(sorted(int(s) for s in exclude_source_ids)),
    )


def plan_builder(model_cfg: NullConfig, assignment, compact: bool = False):
    """A picklable function (B, T) source ids -> SinkPlan, run in the loader's worker processes; `compact`: the
    plans also carry each layer's distinct rows and local indices (sharded sink tables: no host work in the
    step)."""
    return functools.partial(plan_for_batch, cfg=model_cfg, assignment=assignment, compact=compact)


def build_train_loader(data: DataHandle, cfg: TrainConfig, layout: StreamLayout, model_cfg: NullConfig,
                       assignment, pin_memory: bool = False, compact: bool = False) -> StepLoader:
    """This rank's step loader over the training split (every shard verified up front for small datasets)."""
    return build_step_loader(data.shard_dir, layout, seed=cfg.seed, exclude_source_ids=data.exclude_source_ids,
                             vocab_size=model_cfg.padded_vocab_size,
                             plan_builder=plan_builder(model_cfg, assignment, compact), pin_memory=pin_memory,
                             verify=cfg.data.verify_shards)


def build_eval_batches(data: DataHandle, cfg: TrainConfig, model_cfg: NullConfig,
                       assignment, compact: bool = False) -> tuple[list[dict], list[dict]]:
    """The first `eval.num_batches` micro-batches of trained and of held-out sources (seeded, never reshuffled):
    every evaluation of a run, and of its resumption, sees the same tokens. Every rank reads the same batches
    (a held-out split may have fewer shards than ranks); the evaluator averages over ranks anyway."""
    builder = plan_builder(model_cfg, assignment, compact)
    trained = fixed_batches(data.shard_dir, schema.SPLIT_TRAIN, cfg.deepspeed.micro_batch, cfg.eval.num_batches,
                            cfg.seed + 1, data.exclude_source_ids, model_cfg.padded_vocab_size, builder)
    heldout = []
    if data.holdout_source_ids:
        heldout = fixed_batches(data.shard_dir, schema.SPLIT_HOLDOUT, cfg.deepspeed.micro_batch,
                                cfg.eval.num_batches, cfg.seed + 1, None, model_cfg.padded_vocab_size, builder)
    return trained, heldout
