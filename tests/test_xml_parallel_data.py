"""MediaWiki XML ingest with wikitext converted in parallel worker processes: the same parts, report and
source ids as one worker, in order, with a bounded number of pages in flight."""
import re
from collections import Counter

import pytest

from nulls_dist.data_pipeline.ingest import IngestConfig, iter_articles, run_ingest
from nulls_dist.data_pipeline.ingest.wikitext import convert_pages, wikitext_to_text
from nulls_dist.data_pipeline.registry import SourceRegistry

_RUN_SPECIFIC = ("config", "elapsed_s", "peak_rss_mb")


@pytest.fixture
def xml_fixture(repo_root):
    return repo_root / "data_pipeline" / "fixtures" / "mini-pages-articles.xml"


def _bigger_dump(fixture, path, copies: int):
    """The fixture's pages repeated `copies` times under new titles and page ids (several conversion chunks)."""
    text = fixture.read_text()
    head, rest = text.split("  <page>", 1)
    pages = re.findall(r"  <page>.*?</page>\n", "  <page>" + rest, flags=re.S)
    out = [head]
    for k in range(copies):
        for page in pages:
            page = re.sub(r"<title>(.*?)</title>", lambda m: f"<title>{m.group(1)} {k}</title>", page)
            out.append(re.sub(r"<id>(\d+)</id>", lambda m: f"<id>{int(m.group(1)) + 1000 * k}</id>", page))
    path.write_text("".join(out) + "</mediawiki>\n")
    return path


def _ingest(tmp_path, name, inputs, num_workers, **kw):
    out = tmp_path / name
    report = run_ingest(IngestConfig(inputs=[str(p) for p in inputs], output_dir=str(out), num_workers=num_workers,
                                     **kw))
    parts = {p.name: p.read_bytes() for p in sorted((out / "articles").glob("part-*.parquet"))}
    return out, {k: v for k, v in report.items() if k not in _RUN_SPECIFIC}, parts


def test_two_workers_give_the_same_parts_report_and_ids_as_one(tmp_path, xml_fixture):
    big = _bigger_dump(xml_fixture, tmp_path / "big-pages-articles.xml", copies=40)  # 280 pages, 160 articles
    inputs = [xml_fixture, big]
    one, report_one, parts_one = _ingest(tmp_path, "one", inputs, 1, batch_rows=32, rows_per_part=50)
    two, report_two, parts_two = _ingest(tmp_path, "two", inputs, 2, batch_rows=32, rows_per_part=50)
    assert report_two == report_one
    assert report_one["xml"] == {"pages": 287, "skipped_non_article": 82, "skipped_redirect": 41}
    assert report_one["num_written"] == 3 + 3 * 40 and len(parts_one) == 3
    assert parts_two == parts_one  # byte for byte: source ids, titles, urls and converted texts in order
    reg_one, reg_two = SourceRegistry.open(one / "articles"), SourceRegistry.open(two / "articles")
    assert reg_two.source_ids.tolist() == reg_one.source_ids.tolist()
    assert [reg_two.id_for_title(t) for t in ("Velmora", "Velmora 0", "Quessel River 39")] == \
           [reg_one.id_for_title(t) for t in ("Velmora", "Velmora 0", "Quessel River 39")] == [49152, 49155, 49155 + 3 * 39 + 1]
    texts = [r["text"] for b in iter_articles(two) for r in b.to_pylist()]
    assert texts[0].startswith("Velmora is a fishing town") and "{{" not in "".join(texts)


def test_the_bundled_fixture_alone_is_identical_with_two_workers(tmp_path, xml_fixture):
    _, report_one, parts_one = _ingest(tmp_path, "one", [xml_fixture], 1)
    _, report_two, parts_two = _ingest(tmp_path, "two", [xml_fixture], 2)
    assert report_two == report_one and parts_two == parts_one and report_one["num_written"] == 3


def test_convert_pages_keeps_order_and_bounds_pages_in_flight():
    consumed = []

    def pages():
        for i in range(100):
            consumed.append(i)
            yield (i, f"'''Page {i}''' links [[Target {i}|text {i}]].{{{{Infobox|n={i}}}}}")

    stats, out, most_ahead = Counter(), [], 0
    for item in convert_pages(pages(), stats, num_workers=2, chunk_pages=4):
        out.append(item)
        most_ahead = max(most_ahead, len(consumed) - len(out))
    assert [i for i, _ in out] == list(range(100))
    assert out[7] == (7, wikitext_to_text("'''Page 7''' links [[Target 7|text 7]].{{Infobox|n=7}}")) == (7, "Page 7 links text 7.")
    assert most_ahead <= 2 * 2 * 4  # at most 2 * num_workers chunks of chunk_pages pages were read ahead
    assert not stats  # nothing failed


def test_num_workers_must_be_positive(tmp_path, xml_fixture):
    with pytest.raises(ValueError, match="num_workers"):
        run_ingest(IngestConfig(inputs=[str(xml_fixture)], output_dir=str(tmp_path / "o"), num_workers=0))
