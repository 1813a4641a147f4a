"""Benchmark: build the per-source sink manifest for N synthetic sources (default 6,407,814, the paper's
article count) at a model shape (`--preset`: the 2-layer `debug` model, or the paper's `paper_wiki_1b`: 32
layers, n_embd 960, a 7,692-unit pool), and print JSON with the wall time, throughput, peak RSS and the output
size on disk (per column).

Goal (issue 5): at most 10 minutes on 2 cores and under 4 GB RSS for 6.4M sources at the paper shape.

    python nulls_dist/bench/manifest_bench.py --preset paper_wiki_1b --strategy reference --workers 2
    python nulls_dist/bench/manifest_bench.py --preset debug --strategy uniform
    python nulls_dist/bench/manifest_bench.py --preset paper_wiki_1b --num-sources 200000 --workers 1 --profile

The paper shape's weights are synthetic and never held whole: only the sink tables exist (the manifest reads
nothing else), each made on access from a generator seeded by its name (32 x 3 x 7692 x 960 fp32 = 2.8 GB if
they were held at once), so the measured RSS is the manifest's own, as with a memory-mapped checkpoint.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nulls_dist.formats.dataset import PAPER_ID_OFFSET, SPLIT_HOLDOUT, SPLIT_TRAIN
from nulls_dist.config import NullConfig
from nulls_dist.deploy.checkpoint_io import sink_table_keys
from nulls_dist.model import NullTransformer
from nulls_dist.formats.weights import state_dict_digest
from nulls_dist.audit.manifest import ManifestOptions, build_manifest

PAPER_NUM_SOURCES = 6_407_814
PRESETS = ("debug", "paper_wiki_1b")
DEFAULT_STRATEGY = {"debug": "uniform", "paper_wiki_1b": "reference"}


class SyntheticSinkTables(Mapping):
    """The sink tables of a model shape, each (n_sink, n_embd) fp32 made on access from a generator seeded by
    (seed, crc32 of its key): the same values on every access and every machine, nothing held in between."""

    def __init__(self, cfg: NullConfig, seed: int = 0) -> None:
        self.shape = (cfg.n_sink, cfg.n_embd)
        self.seed = seed
        self._keys = [k for layer in range(cfg.n_layer) for k in sink_table_keys(layer)]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        g = torch.Generator().manual_seed(self.seed * 2**32 + zlib.crc32(key.encode()))
        return torch.randn(self.shape, generator=g) * 0.02

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


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


def column_bytes(manifest_dir: Path) -> dict[str, int]:
    """Compressed bytes per column over every shard (from the Parquet footers)."""
    out: dict[str, int] = {}
    for shard in sorted(manifest_dir.glob("manifest-*.parquet")):
        meta = pq.ParquetFile(shard).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                name = col.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="debug", choices=PRESETS, help="model shape (weights are synthetic)")
    parser.add_argument("--num-sources", type=int, default=PAPER_NUM_SOURCES)
    parser.add_argument("--strategy", default=None, choices=["uniform", "code", "reference"],
                        help="sink assignment (default: reference for paper_wiki_1b, uniform for debug)")
    parser.add_argument("--overlap", default="auto", choices=["auto", "exact", "sampled"])
    parser.add_argument("--overlap-sample", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="chunks computed at once (threads; torch then runs one intra-op thread each)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the workers are the parallelism)")
    parser.add_argument("--profile", action="store_true", help="cProfile the build (main thread) to stderr")
    parser.add_argument("--workdir", default=None, help="where the registry and manifest go (default: a temp dir)")
    args = parser.parse_args()

    strategy = args.strategy or DEFAULT_STRATEGY[args.preset]
    # parallelism is across chunks; intra-op threads inside each worker would oversubscribe the cores
    torch.set_num_threads(args.torch_threads)
    cfg = NullConfig.from_preset(args.preset, sink_strategy=strategy)
    if args.preset == "debug":
        torch.manual_seed(0)
        state = NullTransformer(cfg).state_dict()
    else:
        state = SyntheticSinkTables(cfg)
    t0 = time.perf_counter()
    checkpoint_sha256 = state_dict_digest(state)
    t_digest = time.perf_counter() - t0
    profiler = cProfile.Profile(time.process_time) if args.profile else None  # CPU time: robust to a shared machine
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_synthetic_registry(tmp / "registry.parquet", args.num_sources, PAPER_ID_OFFSET)
        t_registry = time.perf_counter() - t0
        cpu0 = time.process_time()
        t1 = time.perf_counter()
        if profiler:
            profiler.enable()
        index = build_manifest(
            tmp / "manifest", state_dict=state, model_cfg=cfg, registry_path=tmp / "registry.parquet",
            checkpoint_sha256=checkpoint_sha256,
            opts=ManifestOptions(overlap=args.overlap, overlap_sample=args.overlap_sample, workers=args.workers),
        )
        if profiler:
            profiler.disable()
        seconds = time.perf_counter() - t1
        cpu_seconds = time.process_time() - cpu0
        disk = sum(f.stat().st_size for f in (tmp / "manifest").iterdir())
        columns = column_bytes(tmp / "manifest")
    peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
        print(text.getvalue(), file=sys.stderr)
    print(json.dumps({
        "bench": "manifest", "preset": args.preset, "num_sources": args.num_sources,
        "num_trained": index["num_trained"], "strategy": strategy, "pool": cfg.n_sink, "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd, "sinks_per_source": index["strategy"].get("k") or index["strategy"].get("expected_k"),
        "layers_share_sinks": index["layers_share_sinks"], "overlap": index["overlap"], "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "manifest_seconds": round(seconds, 2), "manifest_cpu_seconds": round(cpu_seconds, 2),
        "sources_per_second": round(args.num_sources / seconds),
        "registry_write_seconds": round(t_registry, 2), "checkpoint_digest_seconds": round(t_digest, 2),
        "peak_rss_mb": round(peak_rss_kb / 1024, 1),
        "manifest_disk_bytes": disk, "manifest_disk_mb": round(disk / 2**20, 1), "column_bytes": columns,
        "shards": len(index["shards"]), "goal": {"seconds": 600, "rss_mb": 4096},
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "pyarrow": pa.__version__, "commit": _commit(),
    }, indent=2))


if __name__ == "__main__":
    main()
