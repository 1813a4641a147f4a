"""Benchmark: time and peak memory to compute the sink index lists of the paper's 6,407,814 source ids
(49152 .. 49152+6407814) on one CPU core, per strategy, in bounded chunks. Prints JSON.

    python -m nulls_dist.bench.sink_assignment                       # all strategies, all ids
    python -m nulls_dist.bench.sink_assignment --strategies reference --num-ids 100000

Each strategy runs in its own subprocess so that its peak RSS is its own. Goal: under 60 s for uniform and
code. Ids past --num-ids are not computed; `extrapolated_all_ids_s` scales the measured rate to all ids.
`seconds` is wall time inside rows(); `cpu_seconds` is this process's CPU time there (the honest number on a
machine shared with other jobs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc

PAPER_FIRST_ID = 49152
PAPER_NUM_SOURCES = 6_407_814
CHUNK_IDS = 65536  # ids per rows() call: 65536 x 100 int64 rows = 50 MiB, the largest live buffer


def _rss_mib() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_strategy(strategy: str, num_ids: int, chunk_ids: int) -> dict:
    """Compute rows() for the first num_ids paper ids in chunks; return timing, memory and a checksum."""
    import numpy as np
    import torch

    from nulls_dist.sinks import SinkAssignment, SinkAssignmentConfig

    torch.set_num_threads(1)
    cfg = SinkAssignmentConfig(strategy=strategy, pool_size=7692, p_mem=0.013,
                               num_sources=PAPER_NUM_SOURCES, min_source_id=PAPER_FIRST_ID)
    assign = SinkAssignment(cfg)
    assign.rows(torch.arange(PAPER_FIRST_ID, PAPER_FIRST_ID + 16))  # warm-up (lazy init, allocator)
    rss_before = _rss_mib()
    tracemalloc.start()  # numpy buffers are traced; torch's are not (peak RSS covers both)
    checksum, num_sinks, seconds, cpu_seconds = 0, 0, 0.0, 0.0
    for lo in range(PAPER_FIRST_ID, PAPER_FIRST_ID + num_ids, chunk_ids):
        hi = min(lo + chunk_ids, PAPER_FIRST_ID + num_ids)
        ids = torch.arange(lo, hi, dtype=torch.int64)
        wall, cpu = time.perf_counter(), time.process_time()
        rows = assign.rows(ids)  # (s, K)
        seconds += time.perf_counter() - wall
        cpu_seconds += time.process_time() - cpu
        valid = rows >= 0
        num_sinks += int(valid.sum())
        # order-dependent fingerprint of the index lists (detects any change in the assignment)
        weights = torch.arange(1, rows.shape[1] + 1, dtype=torch.int64)
        checksum = (checksum * 1_000_003 + int(((rows + 1) * weights).sum())) % (2**61 - 1)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "strategy": strategy,
        "describe": assign.describe(),
        "num_ids": num_ids,
        "chunk_ids": chunk_ids,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "ids_per_s": round(num_ids / seconds),
        "extrapolated_all_ids_s": round(seconds * PAPER_NUM_SOURCES / num_ids, 1),
        "extrapolated_all_ids_cpu_s": round(cpu_seconds * PAPER_NUM_SOURCES / num_ids, 1),
        "mean_sinks_per_source": num_sinks / num_ids,
        "peak_rss_mib": round(_rss_mib(), 1),
        "rss_before_mib": round(rss_before, 1),
        "peak_traced_numpy_mib": round(traced_peak / 2**20, 1),
        "checksum": checksum,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
    }


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Sink assignment benchmark (JSON on stdout)")
    p.add_argument("--strategies", default="uniform,code,reference")
    p.add_argument("--num-ids", type=int, default=PAPER_NUM_SOURCES)
    p.add_argument("--chunk-ids", type=int, default=CHUNK_IDS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 1 <= args.num_ids <= PAPER_NUM_SOURCES:
        raise ValueError(f"--num-ids must be in [1, {PAPER_NUM_SOURCES}], got {args.num_ids}")
    if args.worker:
        print(json.dumps(run_strategy(args.worker, args.num_ids, args.chunk_ids)))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    results = []
    load_before = os.getloadavg()[0]
    for strategy in args.strategies.split(","):
        cmd = [sys.executable, "-m", "nulls_dist.bench.sink_assignment", "--worker", strategy,
               "--num-ids", str(args.num_ids), "--chunk-ids", str(args.chunk_ids)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        results.append(json.loads(out.stdout))
        print(f"{strategy}: {results[-1]['seconds']} s wall, {results[-1]['cpu_seconds']} s cpu", file=sys.stderr)
    report = {"benchmark": "sink_assignment", "pool_size": 7692, "p_mem": 0.013, "first_id": PAPER_FIRST_ID,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "commit": _commit(), "goal_s": 60, "load_avg_1m": [load_before, os.getloadavg()[0]],
              "results": results}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
