"""Ingest: the three readers, the counted edge cases, stable ids, idempotence, streaming parts."""
import bz2
import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nulls_dist.data_pipeline.ingest import IngestConfig, iter_articles, read_report, run_ingest
from nulls_dist.data_pipeline.ingest.readers import expand_inputs
from nulls_dist.data_pipeline.titles import SeenTitles

FIXTURE = "mini-pages-articles.xml"


@pytest.fixture
def xml_fixture(repo_root):
    return repo_root / "data_pipeline" / "fixtures" / FIXTURE


def _rows(out) -> list[dict]:
    return [row for batch in iter_articles(out) for row in batch.to_pylist()]


def _wiki_parquet(path, rows, invalid_text_at=None):
    """A wikimedia/wikipedia-layout file; `invalid_text_at` gets a text holding invalid UTF-8 bytes."""
    texts = [r[2].encode() for r in rows]
    if invalid_text_at is not None:
        texts[invalid_text_at] = b"caf\xe9 au lait \xff"
    table = pa.table({
        "id": pa.array([str(r[0]) for r in rows]),
        "url": pa.array([f"https://en.wikipedia.org/wiki?curid={r[0]}" for r in rows]),
        "title": pa.array([r[1] for r in rows]),
        "text": pa.array(texts, pa.binary()).view(pa.string()),
    })
    pq.write_table(table, path, row_group_size=2)


def test_parquet_many_files_counts_and_ids(tmp_path):
    src = tmp_path / "wiki"
    src.mkdir()
    # written out of name order: files are read sorted by name
    _wiki_parquet(src / "train-00001-of-00002.parquet",
                  [(7, "Gamma", "third"), (8, "Alpha", "a duplicate title"), (9, "Delta", " \n ")])
    _wiki_parquet(src / "train-00000-of-00002.parquet",
                  [(1, "Alpha", "first"), (2, "Beta", "second"), (3, "Café", "x")], invalid_text_at=2)
    report = run_ingest(IngestConfig(inputs=[str(src)], output_dir=str(tmp_path / "out"), id_offset=100,
                                     batch_rows=2, rows_per_part=2))
    rows = _rows(tmp_path / "out")
    assert [r["title"] for r in rows] == ["Alpha", "Beta", "Café", "Gamma"]
    assert [r["source_id"] for r in rows] == [100, 101, 102, 103]
    assert [r["page_id"] for r in rows] == [1, 2, 3, 7]
    assert rows[0]["url"] == "https://en.wikipedia.org/wiki?curid=1"
    assert rows[2]["text"] == "caf\ufffd au lait \ufffd" and rows[2]["chars"] == len(rows[2]["text"])
    assert report["num_read"] == 6 and report["num_written"] == 4
    assert report["duplicate_titles"]["count"] == 1
    assert report["duplicate_titles"]["examples"][0]["title"] == "Alpha"
    assert report["empty_texts"]["count"] == 1 and report["empty_texts"]["examples"][0]["title"] == "Delta"
    assert report["invalid_utf8"]["count"] == 1
    assert [p["rows"] for p in report["parts"]] == [2, 2]
    assert report["end_source_id"] == 104


def test_xml_plain_and_multistream_bz2(tmp_path, xml_fixture):
    plain = run_ingest(IngestConfig(inputs=[str(xml_fixture)], output_dir=str(tmp_path / "plain")))
    rows = _rows(tmp_path / "plain")
    assert [r["title"] for r in rows] == ["Velmora", "Quessel River", "Ostrel Highlands"]
    assert [r["page_id"] for r in rows] == [10, 13, 16]
    assert rows[0]["url"] == "https://mini.example.org/wiki/Velmora"
    velmora = rows[0]["text"]
    assert velmora.startswith("Velmora is a fishing town on the Quessel in the Ostrel Highlands.")
    assert "1642" in velmora and "History" in velmora
    for markup in ("{{", "[[", "<ref", "cite", "Category", "thumb", "harbour", "wikitable", "NOTOC", "'''"):
        assert markup not in "".join(r["text"] for r in rows), markup
    assert "Tarrow & Lune" in rows[1]["text"]
    assert plain["xml"] == {"pages": 7, "skipped_non_article": 2, "skipped_redirect": 1}
    assert plain["empty_texts"]["count"] == 1  # "Ostrel stub" holds only a template and a category

    # multistream: pages compressed as separate bz2 streams, concatenated
    data = xml_fixture.read_bytes()
    cut = data.index(b"  <page>", data.index(b"<title>Talk:Velmora"))
    multi = tmp_path / "mini-pages-articles-multistream.xml.bz2"
    multi.write_bytes(bz2.compress(data[:cut]) + bz2.compress(data[cut:]))
    report = run_ingest(IngestConfig(inputs=[str(multi)], output_dir=str(tmp_path / "bz2")))
    assert _rows(tmp_path / "bz2") == rows
    assert report["xml"] == plain["xml"] and report["num_written"] == 3


def test_xml_invalid_utf8_is_replaced_and_counted(tmp_path, xml_fixture):
    data = xml_fixture.read_bytes().replace(b"fishing town", b"fishing \xff\xfe town")
    path = tmp_path / "broken-pages-articles.xml"
    path.write_bytes(data)
    report = run_ingest(IngestConfig(inputs=[str(path)], output_dir=str(tmp_path / "out")))
    assert report["invalid_utf8_sequences_in_xml"] == 2
    assert "fishing \ufffd\ufffd town" in _rows(tmp_path / "out")[0]["text"]


def test_jsonl_plain_and_gz(tmp_path):
    lines = [b'{"title": "One", "text": "first text", "id": 5, "url": "u1"}',
             b'',
             b'{"title": "Two", "text": "bad \xff byte"}',
             b'{"title": "Three", "text": "lone \\ud800 surrogate"}',
             b'{"title": "One", "text": "again"}',
             b'{"title": "Four", "text": ""}']
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(b'{"title": "Five", "text": "from gzip"}\n')
    report = run_ingest(IngestConfig(inputs=[str(path), str(tmp_path / "*.gz")],
                                     output_dir=str(tmp_path / "out"), id_offset=0))
    rows = _rows(tmp_path / "out")
    assert [(r["source_id"], r["title"]) for r in rows] == [(0, "One"), (1, "Two"), (2, "Three"), (3, "Five")]
    assert rows[0]["page_id"] == 5 and rows[0]["url"] == "u1" and rows[1]["page_id"] == -1
    assert rows[1]["text"] == "bad \ufffd byte"
    assert "\ufffd" in rows[2]["text"]
    assert report["invalid_utf8"]["count"] == 2
    assert report["duplicate_titles"]["count"] == 1 and report["empty_texts"]["count"] == 1


def test_ids_stable_offset_configurable_and_idempotent(tmp_path, repo_root):
    bundled = str(repo_root / "data_pipeline" / "bundled" / "synthwiki")
    out = tmp_path / "out"
    first = run_ingest(IngestConfig(inputs=[bundled], output_dir=str(out), rows_per_part=100))
    part = out / "articles" / "part-00000.parquet"
    stamp = os.stat(part).st_mtime_ns
    again = run_ingest(IngestConfig(inputs=[bundled], output_dir=str(out), rows_per_part=100))
    assert again == first and os.stat(part).st_mtime_ns == stamp  # reused, not rewritten
    ids = [r["source_id"] for r in _rows(out)]
    assert ids == list(range(49152, 49152 + 240)) and len(first["parts"]) == 3

    # another offset (and part size) reruns; no stale part survives
    other = run_ingest(IngestConfig(inputs=[bundled], output_dir=str(out), id_offset=7, rows_per_part=1000))
    assert len(other["parts"]) == 1 and sorted(p.name for p in (out / "articles").iterdir()) == ["part-00000.parquet"]
    rows = _rows(out)
    assert [r["source_id"] for r in rows] == list(range(7, 247))
    fresh = tmp_path / "fresh"
    run_ingest(IngestConfig(inputs=[bundled], output_dir=str(fresh), id_offset=7))
    assert _rows(fresh) == rows
    assert json.loads((out / "ingest_report.json").read_text()) == read_report(out) == other


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="matches no input"):
        expand_inputs([str(tmp_path / "nothing-*.parquet")])
    pq.write_table(pa.table({"title": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"x\.parquet.*text"):
        run_ingest(IngestConfig(inputs=[str(tmp_path / "x.parquet")], output_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="format"):
        expand_inputs([str(tmp_path / "x.parquet")], "csv")
    with pytest.raises(ValueError, match="id_offset"):
        run_ingest(IngestConfig(inputs=[str(tmp_path / "x.parquet")], id_offset=-1))


def test_seen_titles_agrees_with_a_set():
    rng = np.random.default_rng(0)
    seen, reference = SeenTitles(merge_every=50), set()
    for _ in range(200):
        hashes = rng.integers(0, 3000, size=rng.integers(0, 40)).astype(np.uint64)
        expected = []
        for h in hashes.tolist():
            expected.append(h in reference)
            reference.add(h)
        assert seen.add(hashes).tolist() == expected
    assert len(seen) == len(reference) and seen.nbytes == 8 * len(reference)


def test_iter_articles_needs_a_finished_ingest(tmp_path):
    with pytest.raises(ValueError, match="run the ingest stage"):
        list(iter_articles(tmp_path))
