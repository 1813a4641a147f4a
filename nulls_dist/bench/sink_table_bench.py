"""Training step time and peak memory of one layer's sink table against its row count, 2 gloo ranks on the CPU:
(a) "sparse": `ShardedSinkTables` (row-wise sharded, lookup + sink_mlp + backward with the fused row-wise
Adagrad update of the looked-up rows only) against (b) "dense": the same rows as one dense (R, 3D) parameter
per rank updated as ZeRO-1 would (sink_mlp on the whole table, a dense gradient all-reduced over the ranks,
AdamW over this rank's half of the rows, the halves broadcast back). Only the tables are in the model, so the
numbers are the tables' cost.

Every rank's micro-batch is the same size at every row count: `--tokens` tokens in `--segments` single-source
segments, each source holding `--k` rows drawn uniformly from the R rows (the sink assignment's `uniform`
strategy), new sources every step. Each (path, rows) point is its own torchrun launch so that its peak RSS (per
rank, `ru_maxrss`) is its own; a dense point runs only where its estimated memory fits in the machine's
available memory (`--memory-fraction`). Prints one JSON object: machine, versions, commit, settings, the points
and the ratio of the largest to the smallest table's step time per path.

    nice -n 10 python -m nulls_dist.bench.sink_table_bench                       # 2^16 .. 2^22 rows, D=128
    python -m nulls_dist.bench.sink_table_bench --min-log2 10 --max-log2 12 --steps 2   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nulls_dist.bench import provenance

WORLD = 2


def versions() -> dict:
    """The versions the sparse tables depend on."""
    return provenance.versions("torch", "torchrec", "fbgemm_gpu_cpu", "numpy")


# What one rank's process holds besides its tables (torch, TorchRec, the micro-batch): measured 0.4-0.45 GB.
BASE_BYTES = 450 * 2**20
# Dense peak RSS per rank over the table's size, measured 4.3 at 2^20 rows (D=128): the three (R, D) tables,
# their gradients, AdamW's two moments over 1/W of the rows, and the init and backward temporaries.
DENSE_PEAK_OVER_TABLE = 4.3


def dense_bytes_per_rank(rows: int, dim: int) -> int:
    return BASE_BYTES + int(DENSE_PEAK_OVER_TABLE * rows * 3 * dim * 4)


def sparse_bytes_per_rank(rows: int, dim: int) -> int:
    """1/W of the table + one row-wise Adagrad float per row (the rest is the micro-batch's rows)."""
    return BASE_BYTES + (rows * 3 * dim * 4 + rows * 4) // WORLD


# ------------------------------------------------------------------------------------------------ worker
def _batch(args, rows: int, step: int, rank: int):
    """x (N, D), segments, per-source pool rows (U, K) for this rank and step (fixed size at every R)."""
    import torch

    gen = torch.Generator().manual_seed(1_000_003 * step + rank)
    n = args.tokens
    offsets = torch.linspace(0, n, args.segments + 1).round().long()
    # k distinct rows per source: 2k draws leave at least k distinct ones for any R >= 2^10
    source_rows = torch.stack([torch.unique(torch.randint(0, rows, (2 * args.k,), generator=gen))[: args.k]
                               for _ in range(args.segments)])
    return torch.randn(n, args.dim, generator=gen), offsets, torch.arange(args.segments), source_rows


def _worker(args) -> None:
    import torch
    import torch.distributed as dist

    from nulls_dist.kernels.sink_mlp import sink_mlp
    from nulls_dist.train.sink_tables import ShardedSinkTables, SinkTablesConfig, compact_rows, split_rows

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows, dim = 2**args.log2_rows, args.dim
    target = torch.randn(args.tokens, dim, generator=torch.Generator().manual_seed(5))
    t0 = time.perf_counter()
    if args.path == "sparse":
        tables = ShardedSinkTables(SinkTablesConfig(num_layers=1, rows=rows, dim=dim, lr=0.01))

        def step(i: int) -> None:
            x, offsets, seg_source, source_rows = _batch(args, rows, i, rank)
            wanted, local = compact_rows(source_rows)
            (values,) = tables.lookup([wanted])
            y = sink_mlp(x, offsets, seg_source, local, *split_rows(values), impl="torch")
            ((y * target).sum() * world / (args.tokens * world)).backward()
            tables.step()
    else:
        from nulls_dist.train.sink_tables import init_rows

        cfg = SinkTablesConfig(num_layers=1, rows=rows, dim=dim)
        # three (R, D) parameters, as the model holds sink_gate, sink_up, sink_down; every rank holds them whole
        tables = [torch.nn.Parameter(t.contiguous()) for t in split_rows(init_rows(cfg, 0, 0, rows))]
        bounds = [rows * r // world for r in range(world + 1)]
        mine = [torch.nn.Parameter(t.data[bounds[rank]: bounds[rank + 1]]) for t in tables]  # shared storage
        optimizer = torch.optim.AdamW(mine, lr=5e-4, weight_decay=0.0, foreach=False)

        def step(i: int) -> None:
            x, offsets, seg_source, source_rows = _batch(args, rows, i, rank)
            y = sink_mlp(x, offsets, seg_source, source_rows, *tables, impl="torch")
            ((y * target).sum() * world / (args.tokens * world)).backward()
            for table, part in zip(tables, mine):
                dist.all_reduce(table.grad)  # DeepSpeed averages: the loss above carries W
                table.grad.div_(world)
                part.grad = table.grad[bounds[rank]: bounds[rank + 1]]
            optimizer.step()
            for table in tables:
                for r in range(world):  # each partition's owner sends its updated rows to everyone
                    dist.broadcast(table.data[bounds[r]: bounds[r + 1]], src=r)
                table.grad = None
    dist.barrier()
    init_s = time.perf_counter() - t0
    times = []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        t = time.perf_counter()
        step(i)
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    out = {"rank": rank, "step_ms": [1000 * t for t in times], "peak_rss_gb": rss_gb, "init_s": init_s}
    Path(args.out).with_suffix(f".rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ driver
def _point(args, path: str, log2_rows: int, scratch: Path) -> dict:
    import psutil

    rows = 2**log2_rows
    estimate = (dense_bytes_per_rank if path == "dense" else sparse_bytes_per_rank)(rows, args.dim) * WORLD
    record = {"path": path, "log2_rows": log2_rows, "rows": rows,
              "table_gb": round(rows * 3 * args.dim * 4 / 2**30, 3), "estimated_gb": round(estimate / 2**30, 2)}
    available = psutil.virtual_memory().available
    if estimate > args.memory_fraction * available:
        return {**record, "status": f"skipped: needs ~{estimate / 2**30:.1f} GB, "
                                    f"{available / 2**30:.1f} GB available"}
    out = scratch / f"{path}_{log2_rows}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "nulls_dist.bench.sink_table_bench", "--worker",
           "--path", path, "--log2-rows", str(log2_rows), "--out", str(out)] + _shared_flags(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    ranks = [json.loads(p.read_text()) for p in sorted(scratch.glob(f"{out.stem}.rank*.json"))]
    if proc.returncode != 0 or len(ranks) != WORLD:
        return {**record, "status": f"failed (exit {proc.returncode}): {proc.stderr[-1500:]}"}
    per_step = [max(ms) for ms in zip(*(r["step_ms"] for r in ranks))]  # a step ends when its slowest rank does
    return {**record, "status": "ok", "step_ms_median": round(statistics.median(per_step), 2),
            "step_ms_min": round(min(per_step), 2), "peak_rss_gb_per_rank": [round(r["peak_rss_gb"], 3) for r in ranks],
            "init_s": round(max(r["init_s"] for r in ranks), 1)}


def _free_port() -> int:
    from nulls_dist.train.distributed import free_port

    return free_port()


def _shared_flags(args) -> list[str]:
    return ["--dim", str(args.dim), "--tokens", str(args.tokens), "--segments", str(args.segments), "--k",
            str(args.k), "--steps", str(args.steps), "--warmup", str(args.warmup)]


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-log2", type=int, default=16)
    parser.add_argument("--max-log2", type=int, default=22)
    parser.add_argument("--paths", default="sparse,dense", help="comma list of: sparse, dense")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step")
    parser.add_argument("--segments", type=int, default=8, help="single-source segments per rank per step")
    parser.add_argument("--k", type=int, default=64, help="rows per source")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-fraction", type=float, default=0.7,
                        help="run a point only when its estimated memory is below this share of what is available")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per point")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--log2-rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return None
    paths = args.paths.split(",")
    record = {"benchmark": "sink_table_bench", "machine": provenance.machine(), "versions": versions(),
              **provenance.commit(),
              "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "world_size": WORLD, "backend": "gloo",
              "settings": {k: getattr(args, k) for k in ("dim", "tokens", "segments", "k", "steps", "warmup")},
              "optimizers": {"sparse": "fused exact row-wise Adagrad (looked-up rows only)",
                             "dense": "AdamW over the whole table, ZeRO-1 style (gradient all-reduce, "
                                      "partitioned moments, partitions broadcast)"},
              "points": []}
    with tempfile.TemporaryDirectory(prefix="sink_table_bench_") as scratch:
        for log2_rows in range(args.min_log2, args.max_log2 + 1):
            for path in paths:
                point = _point(args, path, log2_rows, Path(scratch))
                print(json.dumps(point), file=sys.stderr, flush=True)  # progress; the JSON result goes to stdout
                record["points"].append(point)
    for path in paths:
        ok = [p for p in record["points"] if p["path"] == path and p["status"] == "ok"]
        if len(ok) >= 2:
            record[f"{path}_largest_over_smallest"] = {
                "rows": [ok[0]["rows"], ok[-1]["rows"]],
                "step_time": round(ok[-1]["step_ms_median"] / ok[0]["step_ms_median"], 3),
                "peak_rss": round(max(ok[-1]["peak_rss_gb_per_rank"]) / max(ok[0]["peak_rss_gb_per_rank"]), 3)}
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return record


if __name__ == "__main__":
    main()
