"""Random access to the ingested corpus by global row range: the ingest stage's part files
(`ingest.article_parts`, in source-id order) are one table; a slice [start, stop) of it is read from only the row groups it overlaps, so that
parallel shard workers each read their own deterministic slice in bounded memory.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nulls_dist.data_pipeline.ingest import article_parts, iter_row_group, read_report

# Rows per read batch: ~4 MB of Wikipedia text (arrow memory per open slice, not per row group). Row groups are
# read with `ingest.iter_row_group` (calling thread, pool memory returned after each group: why, there).
READ_BATCH_ROWS = 1024


@dataclass(frozen=True)
class CorpusIndex:
    files: tuple[str, ...]
    file_rows: tuple[tuple[int, ...], ...]  # rows per row group, per file
    digests: tuple[str, ...] = ()  # each part's sha256 as the ingest report records it (checked on reuse)

    @property
    def num_rows(self) -> int:
        return sum(sum(groups) for groups in self.file_rows)

    def fingerprint(self) -> str:
        """Changes when any part file's name, size, row layout or content (its recorded sha256) changes."""
        parts = [(Path(f).name, Path(f).stat().st_size, rows, digest)
                 for f, rows, digest in zip(self.files, self.file_rows, self.digests or [""] * len(self.files))]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def index_corpus(ingest_dir: str | Path) -> CorpusIndex:
    files = article_parts(ingest_dir)
    if not files:
        raise ValueError(f"ingest output {ingest_dir}: no articles (run the ingest stage)")
    file_rows = []
    for f in files:
        meta = pq.ParquetFile(f).metadata
        file_rows.append(tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))
    digests = tuple(p.get("sha256", "") for p in read_report(ingest_dir)["parts"])
    return CorpusIndex(tuple(str(f) for f in files), tuple(file_rows), digests)


def read_rows(index: CorpusIndex, start: int, stop: int, columns: list[str],
              batch_rows: int = READ_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Rows [start, stop) of the corpus, in order, as record batches of the given columns. Row groups are
    streamed `batch_rows` rows at a time (not materialised whole): a slice that straddles row groups never
    holds more than one batch of text in arrow memory, whatever the row group size."""
    offset = 0
    for path, groups in zip(index.files, index.file_rows):
        pf = None
        for g, num in enumerate(groups):
            lo, hi = offset, offset + num
            offset = hi
            if hi <= start or lo >= stop:
                continue
            pf = pf or pq.ParquetFile(path)
            at = lo  # global row of the next batch
            for batch in iter_row_group(pf, g, columns, batch_rows):
                b_lo, b_hi = max(start - at, 0), min(stop - at, batch.num_rows)
                at += batch.num_rows
                if b_hi > b_lo:
                    yield batch.slice(b_lo, b_hi - b_lo)
                if at >= stop:
                    break
        if offset >= stop:
            return


def iter_all(index: CorpusIndex, columns: list[str], batch_rows: int = 8192) -> Iterator[pa.RecordBatch]:
    for path in index.files:
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns)


def read_selected_rows(index: CorpusIndex, source_ids: pa.Array, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The corpus rows whose source_id is in `source_ids`, in order. Only the source_id column is read from row
    groups holding none of them (a few holdout sources must not cost a second read of the whole corpus text)."""
    for path, groups in zip(index.files, index.file_rows):
        pf = pq.ParquetFile(path)
        for g in range(len(groups)):
            keep = pc.is_in(pf.read_row_group(g, columns=["source_id"], use_threads=False).column(0),
                           value_set=source_ids)
            if not pc.any(keep).as_py():
                continue
            # the kept rows of the group as one table (as a whole-group read would give), streamed in batches
            pieces, at = [], 0
            for batch in iter_row_group(pf, g, columns, READ_BATCH_ROWS):
                pieces.append(batch.filter(keep.slice(at, batch.num_rows)))
                at += batch.num_rows
            kept = pa.Table.from_batches(pieces).combine_chunks()
            del pieces
            pa.default_memory_pool().release_unused()  # the unfiltered batches
            yield from kept.to_batches()
