"""Whole `nulls-train` runs with the sink rows dense (DeepSpeed AdamW) against sharded (TorchRec tables beside the
engine, `sink_tables.mode`), at several pool sizes, and what a deployment of the sharded run reads: the trainer's
own cost of large tables, where sink_table_bench.py measures one table alone.

Each point is its own `nulls-train` process (1 rank, ZeRO-1, one torch thread) on the bundled SynthWiki data: the
demo model (D = 64, 2 layers) with a `uniform` pool of the given rows per layer and `--k` rows per source; the
step is `--global-batch` samples of 255 tokens in micro-batches of `--micro-batch`. Reported per point: the median
step time over the steps after the first two (`train/step_time_s` of every log step), the process's peak RSS,
the final loss and the bytes of the last checkpoint. A dense point runs only where its estimate (5x the tables:
weights, gradients, AdamW's two moments, the fp32 master copy) fits `--memory-fraction` of the available memory.
Then, on the largest sharded run: a `sink_on` generation through `build_model` (lazy checkpoint, row store), its
rows read against the table's rows, and that process's peak RSS against the weights file's size.

    nice -n 10 python -m nulls_dist.bench.sharded_training_bench                  # 2^16 and 2^20 rows
    python -m nulls_dist.bench.sharded_training_bench --pools 4096 --steps 3      # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nulls_dist.bench import provenance
from nulls_dist.bench.sink_table_bench import versions

DIM, LAYERS = 64, 2  # the demo model
DENSE_OVER_TABLE = 5.0  # weights + gradients + two AdamW moments + the ZeRO fp32 master: 5 table-sized copies

_GENERATE = r"""
import json, resource, sys, torch
from nulls_dist.deploy.checkpoint_io import build_model, load_checkpoint
from nulls_dist.deploy.generate import SamplingConfig, generate
from nulls_dist.model import SinkMode
ckpt = load_checkpoint(sys.argv[1])
model = build_model(ckpt)
out = generate(model, torch.tensor([1, 5, 7, 9]), SinkMode.sink_on(int(sys.argv[2])), SamplingConfig(max_new_tokens=8))
print(json.dumps({"lazy": ckpt.lazy, "rows_read": ckpt.state_dict.rows_read, "new_tokens": out.tokens.shape[1] - 4,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def _prepare(data_dir: Path) -> Path:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from nulls_dist.data_pipeline.pipeline import data_config_from_dict, run_stages

    if not (data_dir / "manifest.json").is_file():
        with initialize_config_module(config_module="nulls_dist.conf", version_base="1.3"):
            raw = OmegaConf.to_container(compose(config_name="nulls_train", overrides=[f"data.output_dir={data_dir}"]),
                                         resolve=True)
        run_stages(data_config_from_dict(raw["data"]), ["all"])
    return data_dir


def _train(data_dir: Path, run_dir: Path, pool: int, mode: str, args) -> dict:
    cmd = [sys.executable, "-m", "nulls_dist.cli.train", "experiment=demo", "logging.wandb_mode=disabled",
           "logging.log_every=1", "eval.num_batches=0", "optim.warmup_steps=1", "train.cpu_threads=1",
           "data_loader.prepare_if_missing=false", "deepspeed.zero_stage=1", "data_loader.num_streams=4",
           f"deepspeed.global_batch={args.global_batch}", f"deepspeed.micro_batch={args.micro_batch}",
           f"data.output_dir={data_dir}", f"train.run_dir={run_dir}", f"train.max_steps={args.steps}",
           f"checkpoint.every_n_steps={args.steps}", f"sink_tables.mode={mode}",
           "+model.overrides.sink_strategy=uniform", f"+model.overrides.sink_pool_size={pool}",
           f"+model.overrides.sink_k={args.k}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{mode} at {pool} rows failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [m["train/step_time_s"] for m in rows[2:]] or [m["train/step_time_s"] for m in rows]
    tag = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return {"rows": pool, "mode": mode, "median_step_ms": round(1000 * statistics.median(times), 1),
            "peak_rss_gb": round(rows[-1]["mem/max_rss_gib"], 3), "final_loss": round(rows[-1]["train/loss"], 4),
            "checkpoint_gb": round(sum(f.stat().st_size for f in tag.rglob("*") if f.is_file()) / 1e9, 3),
            "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> dict:
    import psutil

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pools", type=int, nargs="+", default=[2**16, 2**20])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--data", type=Path, default=None, help="prepared SynthWiki shards (default: prepared in a temp dir)")
    p.add_argument("--memory-fraction", type=float, default=0.5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sharded_training_bench-") as tmp:
        data_dir = _prepare(args.data or Path(tmp) / "data")
        points = []
        for pool in args.pools:
            table = LAYERS * pool * 3 * DIM * 4
            for mode in ("sharded", "dense"):
                if mode == "dense" and DENSE_OVER_TABLE * table > args.memory_fraction * psutil.virtual_memory().available:
                    points.append({"rows": pool, "mode": mode, "skipped": f"needs ~{DENSE_OVER_TABLE * table / 1e9:.1f} GB"})
                    continue
                points.append({**_train(data_dir, Path(tmp) / f"{mode}-{pool}", pool, mode, args),
                               "table_gb": round(table / 1e9, 3)})
        largest = max(args.pools)
        gen = subprocess.run([sys.executable, "-c", _GENERATE, str(Path(tmp) / f"sharded-{largest}"), "49155"],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if gen.returncode:
            raise RuntimeError(f"generation failed:\n{gen.stderr[-3000:]}")
        generation = json.loads(gen.stdout.strip().splitlines()[-1])
        weights = next((Path(tmp) / f"sharded-{largest}" / "checkpoints").glob("step_*/model.safetensors"))
        generation.update(rows=largest, table_rows_in_file=LAYERS * 3 * largest,
                          weights_file_gb=round(weights.stat().st_size / 1e9, 3))
    report = {"machine": provenance.machine(), "versions": versions(), **provenance.commit(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "points": points, "generation": generation}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
