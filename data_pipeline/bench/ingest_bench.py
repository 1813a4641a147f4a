"""Benchmark of the ingest stage: throughput and peak RSS on synthetic `wikimedia/wikipedia`-layout parquet
corpora of growing size, each ingested in a fresh subprocess so that peak RSS is per run. RSS that does not
grow with the corpus (beyond the 8-byte-per-title duplicate set) is the streaming claim. Prints JSON.

    python -m data_pipeline.bench.ingest_bench [--sizes 20000 80000] [--chars 2000]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.ingest import IngestConfig, run_ingest

_ROWS_PER_FILE = 20_000


def write_corpus(directory: Path, num_articles: int, chars: int, seed: int = 0) -> int:
    """Synthetic parquet files (row groups of 1000, like the HF files' ~1k); returns the bytes written."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    for f, start in enumerate(range(0, num_articles, _ROWS_PER_FILE)):
        ids = range(start, min(start + _ROWS_PER_FILE, num_articles))
        blob = letters[rng.integers(0, len(letters), size=len(ids) * chars)].tobytes().decode()
        texts = [blob[k * chars:(k + 1) * chars] for k in range(len(ids))]
        table = pa.table({"id": [str(i) for i in ids], "url": [f"https://x.invalid/{i}" for i in ids],
                          "title": [f"Article {i}" for i in ids], "text": texts})
        pq.write_table(table, directory / f"train-{f:05d}.parquet", row_group_size=1000)
    return sum(p.stat().st_size for p in directory.iterdir())


def _child(corpus: str, out: str) -> None:
    t = time.perf_counter()
    report = run_ingest(IngestConfig(inputs=[corpus], output_dir=out))
    elapsed = time.perf_counter() - t
    print(json.dumps({"articles": report["num_written"], "chars": report["total_chars"],
                      "elapsed_s": round(elapsed, 2),
                      "articles_per_s": round(report["num_written"] / elapsed),
                      "mchars_per_s": round(report["total_chars"] / elapsed / 1e6, 2),
                      "peak_rss_mb": report["peak_rss_mb"]}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000])
    parser.add_argument("--chars", type=int, default=2_000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            corpus = Path(tmp) / f"corpus-{size}"
            nbytes = write_corpus(corpus, size, args.chars)
            run = subprocess.run([sys.executable, "-m", "data_pipeline.bench.ingest_bench", "--child",
                                  str(corpus), str(Path(tmp) / f"out-{size}")],
                                 check=True, capture_output=True, text=True)
            results.append(dict(json.loads(run.stdout.strip().splitlines()[-1]), parquet_mb=round(nbytes / 2**20, 1)))
    print(json.dumps({"chars_per_article": args.chars, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
