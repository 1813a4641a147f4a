"""The ingest stage: inputs (parquet / MediaWiki XML / JSONL) -> `<output_dir>/articles/part-*.parquet` plus
`<output_dir>/ingest_report.json`, and `iter_articles` to stream the result back.

Streaming: one batch of `batch_rows` articles is in memory at a time; the only state that grows is the set
of seen title hashes (8 bytes per title). Idempotent: a finished output whose report carries the same
input fingerprint, and whose parts all still match the size and sha256 the report records for them, is reused;
otherwise (with a warning naming the part) stale parts are removed and the stage runs again. Every part and
the report are written under a temporary name and renamed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nulls_dist.data_pipeline.ingest.clean import ARTICLES_SCHEMA, Cleaner
from nulls_dist.data_pipeline.ingest.readers import (
    expand_inputs,
    input_fingerprint,
    read_articles,
)
from nulls_dist.data_pipeline.verify import Recorded, verify_files
from nulls_dist.formats import atomic
from nulls_dist.formats.digests import file_sha256

log = logging.getLogger(__name__)

ARTICLES_DIR = "articles"
REPORT_NAME = "ingest_report.json"
PART_PATTERN = "part-{index:05d}.parquet"
REPORT_VERSION = 1


@dataclass
class IngestConfig:
    inputs: list[str] = field(default_factory=list)  # files, directories or globs
    format: str = "auto"  # auto|parquet|xml|jsonl (auto: by extension .parquet, .xml/.xml.bz2, .jsonl/.jsonl.gz)
    output_dir: str = "data/out"  # writes <output_dir>/articles/part-00000.parquet ... and ingest_report.json
    id_offset: int = 49152  # source_id = title index (0-based, in input order) + id_offset
    rows_per_part: int = 50_000
    batch_rows: int = 2_048  # pyarrow row-group batch size when reading
    num_workers: int = 1  # processes converting MediaWiki XML wikitext (same output for any number)

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.id_offset < 0:
            raise ValueError(f"id_offset must be >= 0, got {self.id_offset}")
        if self.rows_per_part <= 0:
            raise ValueError(f"rows_per_part must be positive, got {self.rows_per_part}")
        if self.batch_rows <= 0:
            raise ValueError(f"batch_rows must be positive, got {self.batch_rows}")


class _PartWriter:
    """Writes article batches into parts of exactly `rows_per_part` rows (the last may be shorter)."""

    def __init__(self, directory: Path, rows_per_part: int):
        self.directory, self.rows_per_part = directory, rows_per_part
        self.parts: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0
        self._first_id = -1

    def write(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            if self._writer is None:
                self._open(batch.column("source_id")[0].as_py())
            room = self.rows_per_part - self._rows
            head, batch = batch.slice(0, room), batch.slice(room)
            self._writer.write_batch(head)
            self._rows += head.num_rows
            if self._rows == self.rows_per_part:
                self._close_part()

    def close(self) -> list[dict]:
        if self._writer is not None:
            self._close_part()
        return self.parts

    def _open(self, first_id: int) -> None:
        name = PART_PATTERN.format(index=len(self.parts))
        self._tmp = atomic.temp_sibling(self.directory / name)
        self._writer = pq.ParquetWriter(self._tmp, ARTICLES_SCHEMA, compression="zstd")
        self._rows, self._first_id = 0, first_id

    def _close_part(self) -> None:
        self._writer.close()
        name = PART_PATTERN.format(index=len(self.parts))
        entry = {"name": name, "rows": self._rows, "first_source_id": self._first_id,
                 "bytes": self._tmp.stat().st_size, "sha256": file_sha256(self._tmp)}
        atomic.commit(self._tmp, self.directory / name)
        self.parts.append(entry)
        self._writer = None


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (reset by exec, unlike getrusage's ru_maxrss, which a subprocess
    inherits from its parent), falling back to ru_maxrss off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _fingerprint(cfg: IngestConfig, files: list[tuple[Path, str]]) -> str:
    key = {"version": REPORT_VERSION, "format": cfg.format, "id_offset": cfg.id_offset,
           "rows_per_part": cfg.rows_per_part,
           "inputs": [dict(input_fingerprint(p), format=fmt) for p, fmt in files]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def read_report(output_dir: str | Path) -> dict | None:
    """The ingest report, None when there is none; ValueError naming it when it is not a JSON object."""
    path = Path(output_dir) / REPORT_NAME
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"ingest report {path}: not valid JSON ({exc}); rerun the ingest stage") from None
    if not isinstance(report, dict) or not isinstance(report.get("parts"), list):
        raise ValueError(f"ingest report {path}: not an ingest report (no parts list); rerun the ingest stage")
    return report


def part_problem(output_dir: str | Path, report: dict, num_threads: int = 1) -> str | None:
    """None when every part the report lists is there with its recorded size and sha256, else the first
    difference (naming the part)."""
    output_dir = Path(output_dir)
    where = str(output_dir / REPORT_NAME)
    unrecorded = [p["name"] for p in report["parts"] if "sha256" not in p or "bytes" not in p]
    if unrecorded:
        return f"{where} records no sha256 for part {unrecorded[0]} (written by an older version)"
    files = [Recorded(p["name"], output_dir / ARTICLES_DIR / p["name"], p["sha256"], p["bytes"], where)
             for p in report["parts"]]
    problems = verify_files(files, num_threads, desc="verify ingest parts")
    return next(iter(problems.values()), None)


def verify_ingest(output_dir: str | Path, num_threads: int = 1) -> None:
    """For stages that read a finished ingest output without running the ingest stage: ValueError naming the
    first part that does not match the report (the ingest stage rewrites it)."""
    report = read_report(output_dir)
    if report is None:
        return  # the stage that reads it says "run the ingest stage first"
    problem = part_problem(output_dir, report, num_threads)
    if problem is not None:
        raise ValueError(f"ingest output {output_dir}: {problem}; rerun the ingest stage (stage=ingest) to rewrite it")


def _is_complete(output_dir: Path, fingerprint: str, num_threads: int) -> dict | None:
    try:
        report = read_report(output_dir)
    except ValueError as exc:
        log.warning("ingest: %s", exc)
        return None
    if not report or report.get("fingerprint") != fingerprint:
        return None
    problem = part_problem(output_dir, report, num_threads)
    if problem is not None:
        log.warning("ingest: %s; ingesting again", problem)
        return None
    return report


def _write_json_atomic(path: Path, obj: dict) -> None:
    atomic.write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def run_ingest(cfg: IngestConfig) -> dict:
    """Run the ingest stage (or reuse a finished identical one); returns the report dict."""
    cfg.validate()
    files = expand_inputs(cfg.inputs, cfg.format)
    out = Path(cfg.output_dir)
    fingerprint = _fingerprint(cfg, files)
    done = _is_complete(out, fingerprint, cfg.num_workers)
    if done is not None:
        log.info("ingest: %s is complete for these inputs, skipping", out)
        return done

    articles = out / ARTICLES_DIR
    articles.mkdir(parents=True, exist_ok=True)
    (out / REPORT_NAME).unlink(missing_ok=True)
    for stale in list(articles.glob("part-*.parquet")) + list(articles.glob(atomic.temp_glob("part-*"))):
        stale.unlink()

    start = time.time()
    cleaner = Cleaner(cfg.id_offset)
    writer = _PartWriter(articles, cfg.rows_per_part)
    inputs_report = []
    reader_stats: Counter = Counter()
    with tqdm(desc="ingest", unit="article", disable=None) as bar:
        for path, fmt in files:
            before = cleaner.counts.num_read, cleaner.counts.num_written
            for raw in read_articles(path, fmt, cfg.batch_rows, reader_stats, cfg.num_workers):
                writer.write(cleaner.clean(raw, str(path)))
                bar.update(raw.num_rows)
            inputs_report.append(dict(input_fingerprint(path), format=fmt,
                                      num_read=cleaner.counts.num_read - before[0],
                                      num_written=cleaner.counts.num_written - before[1]))
    parts = writer.close()

    c = cleaner.counts
    report = {
        "version": REPORT_VERSION,
        "fingerprint": fingerprint,
        "config": asdict(cfg),
        "inputs": inputs_report,
        "id_offset": cfg.id_offset,
        "first_source_id": cfg.id_offset,
        "end_source_id": cleaner.next_id,  # exclusive
        "num_read": c.num_read,
        "num_written": c.num_written,
        "total_chars": c.total_chars,
        "duplicate_titles": {"count": c.num_duplicate_titles, "policy": "keep-first",
                             "examples": c.examples["duplicate_titles"]},
        "empty_texts": {"count": c.num_empty_texts, "policy": "skip",
                        "examples": c.examples["empty_texts"]},
        "empty_titles": {"count": c.num_empty_titles, "policy": "skip",
                         "examples": c.examples["empty_titles"]},
        "invalid_utf8": {"count": c.num_invalid_utf8, "policy": "replace-with-U+FFFD-and-keep",
                         "examples": c.examples["invalid_utf8"]},
        "xml": {k.removeprefix("xml_"): v for k, v in sorted(reader_stats.items()) if k.startswith("xml_")},
        "invalid_utf8_sequences_in_xml": reader_stats.get("invalid_utf8_sequences", 0),
        "parts": parts,
        "seen_titles_bytes": cleaner.seen_titles_bytes,
        "elapsed_s": round(time.time() - start, 3),
        "peak_rss_mb": peak_rss_mb(),
    }
    _write_json_atomic(out / REPORT_NAME, report)
    log.info("ingest: %d read, %d written, %d duplicate titles, %d empty texts, %d invalid UTF-8 -> %s",
             c.num_read, c.num_written, c.num_duplicate_titles, c.num_empty_texts, c.num_invalid_utf8, out)
    return report


def article_parts(output_dir: str | Path) -> list[Path]:
    """The part files of a finished ingest output, in source-id order."""
    report = read_report(output_dir)
    if report is None:
        raise ValueError(f"output_dir {output_dir!s}: no {REPORT_NAME}; run the ingest stage first")
    parts = [Path(output_dir) / ARTICLES_DIR / p["name"] for p in report["parts"]]
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise ValueError(f"output_dir {output_dir!s}: article part(s) missing: {missing}")
    return parts


def iter_articles(output_dir: str | Path, columns: list[str] | None = None,
                  batch_rows: int = 2_048) -> Iterator[pa.RecordBatch]:
    """Stream the ingested articles in source-id order: source_id int64, title, page_id int64, url, text,
    chars int64 (or just `columns`)."""
    for part in article_parts(output_dir):
        pf = pq.ParquetFile(part)
        for group in range(pf.num_row_groups):
            yield from iter_row_group(pf, group, columns, batch_rows)


def iter_row_group(pf: pq.ParquetFile, group: int, columns: list[str] | None,
                   batch_rows: int) -> Iterator[pa.RecordBatch]:
    """One row group of a part file in batches, decoded on this thread, and the arrow pool's free pages given
    back when it is done (also when the consumer stops early). Why: iterating a whole file lets the reader run
    ahead over row groups, and memory freed by pyarrow's decode threads stayed in mimalloc's caches, so RSS rose
    with every row group read (measured: +52 MB over 8 row groups of 2048 articles; this way: flat)."""
    try:
        yield from pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns, use_threads=False)
    finally:
        pa.default_memory_pool().release_unused()
