"""Benchmark: build the per-source sink manifest for N synthetic sources (default 6,407,814, the paper's
article count) against a debug-size NullTransformer, and print JSON with the wall time, throughput and peak RSS.

Goal (issue 5): at most 10 minutes on 2 cores and under 4 GB RSS for 6.4M sources.

    python nulls_dist/bench/manifest_bench.py --num-sources 6407814 --strategy uniform
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nulls_dist.formats.dataset import PAPER_ID_OFFSET, SPLIT_HOLDOUT, SPLIT_TRAIN
from nulls_dist.config import NullConfig
from nulls_dist.model import NullTransformer
from nulls_dist.formats.weights import state_dict_digest
from nulls_dist.audit.manifest import ManifestOptions, build_manifest

PAPER_NUM_SOURCES = 6_407_814


def write_synthetic_registry(path: Path, num_sources: int, id_offset: int, batch: int = 500_000) -> None:
    """A registry.parquet with `num_sources` rows written in batches (1 in 1000 sources is a holdout)."""
    schema = pa.schema([("source_id", pa.int64()), ("title", pa.string()), ("tokens", pa.int64()),
                        ("split", pa.string())])
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, num_sources, batch):
            idx = np.arange(start, min(num_sources, start + batch), dtype=np.int64)
            split = np.where(idx % 1000 == 999, SPLIT_HOLDOUT, SPLIT_TRAIN)
            writer.write_table(pa.table({
                "source_id": idx + id_offset,
                "title": pa.array([f"Synthetic article {i}" for i in idx]),
                "tokens": rng.integers(50, 5000, size=len(idx)),
                "split": pa.array(split.tolist()),
            }, schema=schema))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-sources", type=int, default=PAPER_NUM_SOURCES)
    parser.add_argument("--strategy", default="uniform", choices=["uniform", "code", "reference"])
    parser.add_argument("--overlap", default="auto", choices=["auto", "exact", "sampled"])
    parser.add_argument("--overlap-sample", type=int, default=1024)
    parser.add_argument("--workdir", default=None, help="where the registry and manifest go (default: a temp dir)")
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = NullConfig.from_preset("debug", sink_strategy=args.strategy)
    model = NullTransformer(cfg)
    state = model.state_dict()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_synthetic_registry(tmp / "registry.parquet", args.num_sources, PAPER_ID_OFFSET)
        t_registry = time.perf_counter() - t0
        t1 = time.perf_counter()
        index = build_manifest(
            tmp / "manifest", state_dict=state, model_cfg=cfg, registry_path=tmp / "registry.parquet",
            checkpoint_sha256=state_dict_digest(state),
            opts=ManifestOptions(overlap=args.overlap, overlap_sample=args.overlap_sample),
        )
        seconds = time.perf_counter() - t1
        disk = sum(f.stat().st_size for f in (tmp / "manifest").iterdir())
    peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "bench": "manifest", "num_sources": args.num_sources, "num_trained": index["num_trained"],
        "strategy": args.strategy, "pool": cfg.n_sink, "n_layer": cfg.n_layer,
        "sinks_per_source": index["strategy"]["k"], "overlap": index["overlap"],
        "manifest_seconds": round(seconds, 2), "sources_per_second": round(args.num_sources / seconds),
        "registry_write_seconds": round(t_registry, 2), "peak_rss_mb": round(peak_rss_kb / 1024, 1),
        "manifest_disk_mb": round(disk / 2**20, 1), "shards": len(index["shards"]),
        "goal": {"seconds": 600, "rss_mb": 4096},
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "pyarrow": pa.__version__, "commit": _commit(),
    }, indent=2))


if __name__ == "__main__":
    main()
