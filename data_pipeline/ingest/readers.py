"""Streaming readers for the three input formats, each yielding raw `pyarrow.RecordBatch`es.

A raw batch has columns title, page_id (int64, -1 unknown), url, text. title and text may still be
`binary` or hold invalid UTF-8: `clean.py` validates and repairs them (and counts), so that the repair
and its counting happen in one place for every format.

- parquet: the `wikimedia/wikipedia` layout (id, url, title, text), read in row-group batches.
- xml: MediaWiki `pages-articles` dumps, plain, `.bz2` or multistream `.bz2` (concatenated streams, which
  the `bz2` module reads as one), parsed with iterparse and cleared page by page; wikitext -> plain text.
- jsonl: one object per line with `title` and `text` (optional `id`, `url`), plain or `.gz`.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import json
import os
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nulls_dist.data_pipeline.ingest.wikitext import convert_pages

FORMATS = ("parquet", "xml", "jsonl")
_SUFFIXES = {
    "parquet": (".parquet",),
    "xml": (".xml", ".xml.bz2"),
    "jsonl": (".jsonl", ".jsonl.gz"),
}
RAW_COLUMNS = ("title", "page_id", "url", "text")


def detect_format(path: str | Path) -> str:
    name = str(path).lower()
    for fmt, suffixes in _SUFFIXES.items():
        if name.endswith(suffixes):
            return fmt
    raise ValueError(f"inputs: cannot tell the format of {path!s} from its extension "
                     f"(known: {sorted(s for v in _SUFFIXES.values() for s in v)}); set format explicitly")


def expand_inputs(inputs: list[str], fmt: str = "auto") -> list[tuple[Path, str]]:
    """Files, directories or globs -> [(file, format)]. Each input's files are sorted by name; inputs keep
    their given order; a file named twice is read once. A directory read with format auto yields the files
    of one format: parquet if it holds any, else xml, else jsonl (so a dataset directory's side files,
    e.g. SynthWiki's probes.jsonl, are not read as articles)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"format must be one of auto|{'|'.join(FORMATS)}, got {fmt!r}")
    if not inputs:
        raise ValueError("inputs: no input files given")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = _directory_files(path, fmt)
        elif path.is_file():
            found = [path]
        else:
            found = [Path(p) for p in sorted(glob.glob(str(item))) if Path(p).is_file()]
        if not found:
            raise ValueError(f"inputs: {item!r} matches no input file")
        files.extend(found)
    seen: set[Path] = set()
    out = []
    for path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            out.append((path, detect_format(path) if fmt == "auto" else fmt))
    return out


def _directory_files(directory: Path, fmt: str) -> list[Path]:
    files = [p for p in sorted(directory.iterdir()) if p.is_file()]
    for candidate in (FORMATS if fmt == "auto" else (fmt,)):
        found = [p for p in files if _matches(p, candidate)]
        if found:
            return found
    return []


def _matches(path: Path, fmt: str) -> bool:
    name = path.name.lower()
    suffixes = [s for f, v in _SUFFIXES.items() if fmt in ("auto", f) for s in v]
    return name.endswith(tuple(suffixes))


# What a truncated or malformed input raises while it is decoded: bz2/gzip streams cut short (EOFError) or
# corrupt (OSError, zlib.error), XML that is not well formed (ParseError), a parquet file arrow cannot read.
_DECODE_ERRORS = (EOFError, OSError, zlib.error, ET.ParseError, pa.ArrowException)


def read_articles(path: Path, fmt: str, batch_rows: int, stats: Counter,
                  num_workers: int = 1) -> Iterator[pa.RecordBatch]:
    """Raw batches of one input file; format-specific counts go to `stats`. `num_workers` processes convert
    XML wikitext (the other formats need no conversion). A truncated or malformed file raises ValueError naming
    it (and the line or position where the decoder gave up, when it says)."""
    if fmt == "parquet":
        batches = read_parquet(path, batch_rows)
    elif fmt == "xml":
        batches = read_xml(path, batch_rows, stats, num_workers)
    elif fmt == "jsonl":
        batches = read_jsonl(path, batch_rows, stats)
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return _naming_the_input(path, fmt, batches)


def _naming_the_input(path: Path, fmt: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    try:
        yield from batches
    except _DECODE_ERRORS as exc:
        if isinstance(exc, OSError) and exc.filename is not None:
            raise  # opening the file failed (missing, not permitted): the OS error names it
        raise ValueError(f"input {path}: truncated or not valid {fmt} ({type(exc).__name__}: {exc})") from None


def _raw_batch(titles, page_ids, urls, texts) -> pa.RecordBatch:
    return pa.record_batch([pa.array(titles, pa.binary()), pa.array(page_ids, pa.int64()),
                            pa.array(urls, pa.string()), pa.array(texts, pa.binary())],
                           names=list(RAW_COLUMNS))


# ---- parquet ---------------------------------------------------------------------------------------

def read_parquet(path: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    missing = {"title", "text"} - names
    if missing:
        raise ValueError(f"input {path}: parquet file lacks column(s) {sorted(missing)} "
                         f"(the wikimedia/wikipedia layout has id, url, title, text)")
    columns = [c for c in ("id", "url", "title", "text") if c in names]
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        n = batch.num_rows
        page_ids = _page_ids(batch.column("id")) if "id" in names else pa.array([-1] * n, pa.int64())
        urls = (batch.column("url").cast(pa.string()) if "url" in names
                else pa.array([""] * n, pa.string()))
        yield pa.record_batch([batch.column("title"), page_ids, pc.fill_null(urls, ""), batch.column("text")],
                              names=list(RAW_COLUMNS))


def _page_ids(ids: pa.Array) -> pa.Array:
    """The `id` column (a decimal string in wikimedia/wikipedia) -> int64, -1 where missing or not a number."""
    try:
        return pc.fill_null(pc.cast(ids, pa.int64()), -1)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([_int_or(v, -1) for v in ids.to_pylist()], pa.int64())


def _int_or(value, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _raw_bytes(text: str) -> bytes:
    """UTF-8 bytes of a decoded string, giving back the original invalid bytes (surrogateescape) and
    writing JSON's lone surrogate escapes (\\ud800) as the invalid bytes they stand for."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


# ---- JSONL -----------------------------------------------------------------------------------------

def read_jsonl(path: Path, batch_rows: int, stats: Counter) -> Iterator[pa.RecordBatch]:
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    cols: tuple[list, list, list, list] = ([], [], [], [])
    with opener(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            # surrogateescape keeps invalid bytes through json; _raw_bytes writes them back out, for
            # clean.py to repair and count.
            try:
                obj = json.loads(line.decode("utf-8", "surrogateescape"))
            except json.JSONDecodeError as e:
                raise ValueError(f"input {path}: line {line_no} is not valid JSON ({e})") from e
            if not isinstance(obj, dict) or "title" not in obj or "text" not in obj:
                raise ValueError(f"input {path}: line {line_no} needs an object with 'title' and 'text'")
            cols[0].append(_raw_bytes(str(obj["title"])))
            cols[1].append(_int_or(obj.get("id"), -1))
            cols[2].append(str(obj.get("url") or "").encode("utf-8", "replace").decode("utf-8"))
            cols[3].append(_raw_bytes(str(obj["text"] or "")))
            if len(cols[0]) >= batch_rows:
                yield _raw_batch(*cols)
                cols = ([], [], [], [])
    if cols[0]:
        yield _raw_batch(*cols)


# ---- MediaWiki XML ---------------------------------------------------------------------------------

class _Utf8Repair:
    """A binary stream that passes valid UTF-8 through and replaces each invalid byte sequence with
    U+FFFD (counted in `stats['invalid_utf8_sequences']`), so the XML parser never sees invalid bytes."""

    def __init__(self, raw, stats: Counter, chunk: int = 1 << 20):
        self._raw, self._stats, self._chunk = raw, stats, chunk
        self._pending = b""

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(self._chunk if size is None or size < 0 else max(size, 4))
        at_eof = not data
        data = self._pending + data
        self._pending = b""
        out = []
        while data:
            try:
                out.append(data.decode("utf-8"))
                break
            except UnicodeDecodeError as e:
                out.append(data[:e.start].decode("utf-8"))
                if e.reason == "unexpected end of data" and e.end == len(data) and not at_eof:
                    self._pending = data[e.start:]  # a character split across reads
                    break
                out.append("\ufffd")
                self._stats["invalid_utf8_sequences"] += 1
                data = data[e.end:]
        text = "".join(out)
        if not text and self._pending and not at_eof:
            return self.read(size)
        return text.encode("utf-8")


def _open_xml(path: Path):
    return bz2.open(path, "rb") if str(path).lower().endswith(".bz2") else open(path, "rb")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(elem, name: str) -> str | None:
    for child in elem:
        if _local(child.tag) == name:
            return child.text or ""
    return None


def read_xml(path: Path, batch_rows: int, stats: Counter, num_workers: int = 1) -> Iterator[pa.RecordBatch]:
    """Pages are parsed here; their wikitext is converted by `num_workers` processes (`convert_pages`), in
    order, so batches and their rows do not depend on `num_workers`."""
    cols: tuple[list, list, list, list] = ([], [], [], [])
    for title, page_id, url, text in convert_pages(_xml_pages(path, stats), stats, num_workers):
        for col, value in zip(cols, (title.encode("utf-8", "surrogatepass"), page_id, url,
                                     text.encode("utf-8", "surrogatepass"))):
            col.append(value)
        if len(cols[0]) >= batch_rows:
            yield _raw_batch(*cols)
            cols = ([], [], [], [])
    if cols[0]:
        yield _raw_batch(*cols)


def _xml_pages(path: Path, stats: Counter) -> Iterator[tuple[str, int, str, str]]:
    """(title, page_id, url, wikitext) of the article pages of a dump, streamed with iterparse."""
    url_base = ""
    with _open_xml(path) as raw:
        events = ET.iterparse(_Utf8Repair(raw, stats), events=("start", "end"))
        root = None
        for event, elem in events:
            if root is None:
                root = elem
            if event != "end":
                continue
            tag = _local(elem.tag)
            if tag == "siteinfo":
                base = _child_text(elem, "base") or ""
                url_base = base.rsplit("/", 1)[0] + "/" if "/" in base else ""
                root.clear()
            elif tag == "page":
                page = _page(elem, url_base, stats)
                root.clear()  # drops this page (and anything before it) from memory
                if page is not None:
                    yield page


def _page(elem, url_base: str, stats: Counter):
    """One <page> -> (title, page_id, url, wikitext) or None for redirects and non-article namespaces."""
    stats["xml_pages"] += 1
    title = _child_text(elem, "title") or ""
    ns = _int_or(_child_text(elem, "ns"), 0)
    if ns != 0:
        stats["xml_skipped_non_article"] += 1
        return None
    if any(_local(child.tag) == "redirect" for child in elem):
        stats["xml_skipped_redirect"] += 1
        return None
    revisions = [child for child in elem if _local(child.tag) == "revision"]
    wikitext = (_child_text(revisions[-1], "text") or "") if revisions else ""
    url = url_base + title.replace(" ", "_") if url_base else ""
    return title, _int_or(_child_text(elem, "id"), -1), url, wikitext


def input_fingerprint(path: Path) -> dict:
    st = os.stat(path)
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
