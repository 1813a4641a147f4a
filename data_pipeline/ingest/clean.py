"""Turns raw reader batches into article batches: UTF-8 repair, empty texts, duplicate titles, source ids.

Policies (each case is counted in the ingest report, with examples; nothing is dropped silently):
- invalid UTF-8 in a title or text: decoded with U+FFFD replacement, the article is kept and counted;
- empty title, or a text that is empty or only whitespace: the article is skipped and counted;
- a title seen before (exact string match, after repair): the later article is skipped and counted
  (keep-first), so ids do not depend on anything after the first occurrence;
- source_id = (index of the article among the kept ones, in input order) + id_offset: dense, stable for the
  same inputs, reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nulls_dist.data_pipeline.titles import SeenTitles, title_hashes

ARTICLES_SCHEMA = pa.schema([
    ("source_id", pa.int64()),
    ("title", pa.string()),
    ("page_id", pa.int64()),
    ("url", pa.string()),
    ("text", pa.string()),
    ("chars", pa.int64()),
])
MAX_EXAMPLES = 20


@dataclass
class CleanCounts:
    """Running totals of what cleaning did; `examples` keeps the first MAX_EXAMPLES of each case."""

    num_read: int = 0
    num_written: int = 0
    num_duplicate_titles: int = 0
    num_empty_texts: int = 0
    num_empty_titles: int = 0
    num_invalid_utf8: int = 0
    total_chars: int = 0
    examples: dict[str, list] = field(default_factory=lambda: {
        "duplicate_titles": [], "empty_texts": [], "empty_titles": [], "invalid_utf8": []})

    def note(self, case: str, example) -> None:
        if len(self.examples[case]) < MAX_EXAMPLES:
            self.examples[case].append(example)


def to_valid_utf8(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """A string/binary column -> (valid string column with nulls as "", (n,) bool: was invalid)."""
    bad = np.zeros(len(arr), dtype=bool)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        try:
            arr.validate(full=True)
            return pc.fill_null(arr.cast(pa.string()), ""), bad
        except pa.ArrowInvalid:
            arr = arr.view(pa.large_binary() if pa.types.is_large_string(arr.type) else pa.binary())
    else:
        try:
            return pc.fill_null(arr.cast(pa.string()), ""), bad
        except pa.ArrowInvalid:
            pass
    out = []
    for i, value in enumerate(arr.to_pylist()):
        if value is None:
            out.append("")
            continue
        try:
            out.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(value.decode("utf-8", "replace"))
            bad[i] = True
    return pa.array(out, pa.string()), bad


class Cleaner:
    """Stateful across batches: remembers seen titles and hands out the next source id."""

    def __init__(self, id_offset: int, counts: CleanCounts | None = None):
        self.next_id = id_offset
        self.counts = counts or CleanCounts()
        self._seen = SeenTitles()

    @property
    def seen_titles_bytes(self) -> int:
        return self._seen.nbytes

    def clean(self, raw: pa.RecordBatch, where: str) -> pa.RecordBatch:
        """One raw batch -> an article batch (ARTICLES_SCHEMA); `where` names the input for examples."""
        c = self.counts
        n = raw.num_rows
        c.num_read += n
        titles, bad_title = to_valid_utf8(raw.column("title"))
        texts, bad_text = to_valid_utf8(raw.column("text"))
        invalid = bad_title | bad_text
        title_list = titles.to_pylist()
        for i in np.flatnonzero(invalid):
            c.num_invalid_utf8 += 1
            c.note("invalid_utf8", {"title": title_list[i], "input": where})

        empty_title = np.asarray(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(titles)), 0))
        empty_text = np.asarray(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0))
        keep = ~(empty_title | empty_text)
        for i in np.flatnonzero(empty_title):
            c.num_empty_titles += 1
            c.note("empty_titles", {"input": where, "page_id": raw.column("page_id")[i].as_py()})
        for i in np.flatnonzero(empty_text & ~empty_title):
            c.num_empty_texts += 1
            c.note("empty_texts", {"title": title_list[i], "input": where})

        idx = np.flatnonzero(keep)
        duplicate = self._seen.add(title_hashes((title_list[i] for i in idx), count=len(idx)))
        for i in idx[duplicate]:
            c.num_duplicate_titles += 1
            c.note("duplicate_titles", {"title": title_list[i], "input": where})
        idx = idx[~duplicate]

        take = pa.array(idx, pa.int64())
        texts_kept = texts.take(take)
        chars = pc.cast(pc.utf8_length(texts_kept), pa.int64())
        source_ids = pa.array(np.arange(self.next_id, self.next_id + len(idx), dtype=np.int64))
        self.next_id += len(idx)
        c.num_written += len(idx)
        c.total_chars += int(pc.sum(chars).as_py() or 0)
        return pa.record_batch(
            [source_ids, titles.take(take), raw.column("page_id").take(take),
             raw.column("url").take(take), texts_kept, chars],
            schema=ARTICLES_SCHEMA)
