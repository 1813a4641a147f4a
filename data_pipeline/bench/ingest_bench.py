"""Benchmark of the ingest stage: throughput and peak RSS on synthetic `wikimedia/wikipedia`-layout parquet
corpora of growing size, each ingested in a fresh subprocess so that peak RSS is per run. RSS that does not
grow with the corpus (beyond the 8-byte-per-title duplicate set) is the streaming claim. With `--xml-pages N`
it also ingests a synthetic MediaWiki XML dump of N pages (templates, refs, links, tables, headings) with
each `--xml-workers` count of wikitext-converting processes: pages/s and peak RSS per worker count, and a
check that every worker count wrote the same parts. Prints JSON.

    python -m nulls_dist.data_pipeline.bench.ingest_bench [--sizes 20000 80000] [--chars 2000] [--xml-pages 3000 --xml-workers 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nulls_dist.data_pipeline.ingest import IngestConfig, run_ingest

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


_XML_HEAD = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">\n<siteinfo><sitename>Bench'
             '</sitename><base>https://bench.invalid/wiki/Main_Page</base></siteinfo>\n')


def write_xml_dump(path: Path, num_pages: int, chars: int, seed: int = 0) -> int:
    """A pages-articles dump: ~`chars` of wikitext per page (prose with links, refs, templates, a table, headings,
    a category); every 10th page is a redirect. Returns the pages written."""
    rng = np.random.default_rng(seed)
    words = ["river", "town", "founded", "north", "guild", "festival", "valley", "composer", "mountain", "harbour"]
    with open(path, "w") as f:
        f.write(_XML_HEAD)
        for i in range(num_pages):
            if i % 10 == 9:
                body, extra = f"#REDIRECT [[Page {i - 1}]]", "<redirect title=\"x\" />"
            else:
                parts = ["{{Infobox place|name=Page %d|population=%d}}" % (i, rng.integers(1000, 99999))]
                while sum(map(len, parts)) < chars:
                    w = rng.choice(words, size=12)
                    parts.append(f"'''{w[0]}''' {w[1]} [[{w[2].title()} {i}|{w[3]}]] {w[4]} {w[5]}.<ref>{{{{cite book|"
                                 f"title={w[6]}|year=19{rng.integers(10, 99)}}}}}</ref> {' '.join(w[7:])}.\n")
                    if rng.random() < 0.2:
                        parts.append(f"== {w[8].title()} ==\n{{| class=\"wikitable\"\n| a || b\n|}}\n")
                parts.append(f"[[Category:{words[i % len(words)].title()}]]")
                body, extra = "".join(parts), ""
            body = body.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            f.write(f"<page><title>Page {i}</title><ns>0</ns><id>{i + 1}</id>{extra}<revision><id>{i + 1}</id>"
                    f"<text xml:space=\"preserve\">{body}</text></revision></page>\n")
        f.write("</mediawiki>\n")
    return num_pages


def _child(corpus: str, out: str, num_workers: int = 1) -> None:
    t = time.perf_counter()
    report = run_ingest(IngestConfig(inputs=[corpus], output_dir=out, num_workers=num_workers))
    elapsed = time.perf_counter() - t
    print(json.dumps({"articles": report["num_written"], "chars": report["total_chars"],
                      "pages": report["xml"].get("pages", 0),
                      "pages_per_s": round(report["xml"].get("pages", 0) / elapsed, 1),
                      "elapsed_s": round(elapsed, 2),
                      "articles_per_s": round(report["num_written"] / elapsed),
                      "mchars_per_s": round(report["total_chars"] / elapsed / 1e6, 2),
                      "peak_rss_mb": report["peak_rss_mb"],
                      "workers_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000])
    parser.add_argument("--chars", type=int, default=2_000)
    parser.add_argument("--xml-pages", type=int, default=0, help="also a MediaWiki XML dump of this many pages")
    parser.add_argument("--xml-chars", type=int, default=4000, help="wikitext characters per XML page")
    parser.add_argument("--xml-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            corpus = Path(tmp) / f"corpus-{size}"
            nbytes = write_corpus(corpus, size, args.chars)
            run = _run_child(corpus, Path(tmp) / f"out-{size}", 1)
            results.append(dict(run, parquet_mb=round(nbytes / 2**20, 1)))
        xml = _xml_runs(Path(tmp), args) if args.xml_pages else None
    print(json.dumps({"chars_per_article": args.chars, "runs": results, "xml": xml,
                      "load_average_after": [round(x, 2) for x in os.getloadavg()]}, indent=2))


def _run_child(corpus: Path, out: Path, num_workers: int) -> dict:
    run = subprocess.run([sys.executable, "-m", "nulls_dist.data_pipeline.bench.ingest_bench", "--child", str(corpus), str(out),
                          str(num_workers)], check=True, capture_output=True, text=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def _xml_runs(tmp: Path, args) -> dict:
    dump = tmp / "bench-pages-articles.xml"
    write_xml_dump(dump, args.xml_pages, args.xml_chars)
    runs, parts = [], []
    for workers in args.xml_workers:
        out = tmp / f"xml-{workers}"
        runs.append(dict(_run_child(dump, out, workers), num_workers=workers))
        parts.append([p.read_bytes() for p in sorted((out / "articles").glob("part-*.parquet"))])
    return {"pages": args.xml_pages, "wikitext_chars_per_page": args.xml_chars, "dump_mb": round(dump.stat().st_size / 2**20, 1),
            "runs": runs, "same_parts_for_every_worker_count": all(p == parts[0] for p in parts),
            "speedup_vs_first": [round(r["pages_per_s"] / runs[0]["pages_per_s"], 2) for r in runs]}


if __name__ == "__main__":
    main()
