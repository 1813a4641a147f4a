"""Benchmark of the source registry at Wikipedia scale: build a synthetic registry of `--num-sources` titles
(default 6,407,814, as English Wikipedia 20231101), then measure the write time, the index build time of
`SourceRegistry.open`, lookup latency (title -> id and id -> title, p50/p99 over random queries), a batched
`resolve`, the ingest duplicate-title set over the same titles, and RSS. Prints JSON.

    python -m nulls_dist.data_pipeline.bench.registry_bench [--num-sources 6407814] [--queries 2000] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from nulls_dist.data_pipeline.ingest.run import peak_rss_mb
from nulls_dist.data_pipeline.registry import (
    REGISTRY_SCHEMA,
    SourceRegistry,
    write_registry,
)
from nulls_dist.data_pipeline.titles import SeenTitles, title_hashes
from nulls_dist.formats.dataset import PAPER_ID_OFFSET

WIKIPEDIA_SOURCES = 6_407_814
_WORDS = ("river", "station", "album", "battle", "church", "football", "county", "species", "school", "film")


def synthetic_title(i: int) -> str:
    # Wikipedia-like lengths (mean ~20 characters) with a unique numeric core.
    return f"{_WORDS[i % 10].capitalize()} {i} ({_WORDS[(i // 10) % 10]})" if i % 3 else f"Topic {i}"


def _batches(num_sources: int, batch: int = 65_536):
    for start in range(0, num_sources, batch):
        idx = range(start, min(start + batch, num_sources))
        n = len(idx)
        titles = [synthetic_title(i) for i in idx]
        yield pa.record_batch([
            pa.array(np.arange(start, start + n) + PAPER_ID_OFFSET, pa.int64()), pa.array(titles),
            pa.array(np.arange(start, start + n) * 3 + 12, pa.int64()),
            pa.array(["https://en.wikipedia.org/wiki?curid=" + str(i * 3 + 12) for i in idx]),
            pa.array(np.full(n, 2_000), pa.int64()), pa.array(np.full(n, 500), pa.int64()),
            pa.array([str(i // 40_000) for i in idx]), pa.array(["train"] * n)], schema=REGISTRY_SCHEMA)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
            "mean_ms": round(float(ms.mean()), 4)}


def _time_each(fn, args) -> list[float]:
    out = []
    for a in args:
        t = time.perf_counter()
        fn(a)
        out.append(time.perf_counter() - t)
    return out


def run(num_sources: int, queries: int, seed: int, workdir: Path) -> dict:
    result = {"num_sources": num_sources, "queries": queries, "machine": platform.processor() or platform.machine(),
              "rss_start_mb": round(_rss_mb(), 1)}
    path = workdir / "registry.parquet"
    t = time.perf_counter()
    info = write_registry(path, _batches(num_sources))
    result["write_s"] = round(time.perf_counter() - t, 2)
    result["registry_mb"] = round(path.stat().st_size / 2**20, 1)
    assert info["rows"] == num_sources

    rss_before = _rss_mb()
    t = time.perf_counter()
    reg = SourceRegistry.open(path)
    result["open_index_build_s"] = round(time.perf_counter() - t, 2)
    result["index_mb"] = round(reg.nbytes / 2**20, 1)
    result["rss_after_open_delta_mb"] = round(_rss_mb() - rss_before, 1)
    result["peak_rss_after_open_mb"] = peak_rss_mb()  # write + open only
    cache = workdir / "registry.index.npz"
    SourceRegistry.open(path, index_cache=cache)
    t = time.perf_counter()
    SourceRegistry.open(path, index_cache=cache)
    result["open_from_index_cache_s"] = round(time.perf_counter() - t, 3)

    rng = np.random.default_rng(seed)
    picks = rng.integers(0, num_sources, size=queries)
    titles = [synthetic_title(int(i)) for i in picks]
    ids = [int(i) + PAPER_ID_OFFSET for i in picks]
    title_to_id = _time_each(reg.id_for_title, titles)
    id_to_title = _time_each(reg.title_for_id, ids)
    assert [reg.id_for_title(s) for s in titles[:50]] == ids[:50]
    result["title_to_id"] = _percentiles(title_to_id)
    result["id_to_title"] = _percentiles(id_to_title)
    t = time.perf_counter()
    assert reg.resolve(titles) == list(dict.fromkeys(ids))
    result["resolve_batch_s"] = round(time.perf_counter() - t, 3)

    rss_before = _rss_mb()
    seen = SeenTitles()
    hash_s = add_s = 0.0
    for start in range(0, num_sources, 2048):  # ingest's batch size; title generation is not timed
        batch = [synthetic_title(i) for i in range(start, min(start + 2048, num_sources))]
        t = time.perf_counter()
        hashes = title_hashes(batch, count=len(batch))
        t2 = time.perf_counter()
        seen.add(hashes)
        hash_s, add_s = hash_s + t2 - t, add_s + time.perf_counter() - t2
    result["dedup_hash_s"] = round(hash_s, 2)
    result["dedup_set_add_s"] = round(add_s, 2)
    result["dedup_set_mb"] = round(seen.nbytes / 2**20, 1)
    result["rss_after_dedup_delta_mb"] = round(_rss_mb() - rss_before, 1)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-sources", type=int, default=WIKIPEDIA_SOURCES)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the synthetic registry is written (default: temp)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.num_sources <= 0 or args.queries <= 0:
        raise ValueError("--num-sources and --queries must be positive")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        result = run(args.num_sources, args.queries, args.seed, Path(tmp))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
