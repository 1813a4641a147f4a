"""SynthWiki: deterministic output, probes consistent with the article texts, bundled copy up to date."""
import json
import re

import pyarrow.parquet as pq
import pytest

from data_pipeline import synthwiki
from data_pipeline.synthwiki import SynthWikiConfig, generate, load_probes, write


def _holders(answer: str, texts: list[str]) -> list[int]:
    word = re.compile(rf"\b{re.escape(answer)}\b")
    return [i for i, text in enumerate(texts) if word.search(text)]


def test_deterministic_and_seed_dependent():
    cfg = SynthWikiConfig(seed=3, num_clusters=5)
    assert generate(cfg) == generate(SynthWikiConfig(seed=3, num_clusters=5))
    assert generate(cfg)[0] != generate(SynthWikiConfig(seed=4, num_clusters=5))[0]


def test_probes_match_texts():
    cfg = SynthWikiConfig(seed=1, num_clusters=8, articles_per_cluster=5, id_offset=1000)
    rows, probes = generate(cfg)
    texts = [r["text"] for r in rows]
    titles = [r["title"] for r in rows]
    assert len(set(titles)) == len(titles) == 40
    assert {p["kind"] for p in probes} == {"unique", "shared"}
    for p in probes:
        assert _holders(p["answer"], texts) == p["source_indices"], p
        assert p["titles"] == [titles[i] for i in p["source_indices"]]
        assert p["source_ids"] == [i + 1000 for i in p["source_indices"]]
        assert len(p["distractors"]) == synthwiki.NUM_DISTRACTORS
        assert p["answer"] not in p["distractors"] and len(set(p["distractors"])) == len(p["distractors"])
        assert p["subject"] in p["prompt"]
        for i, verbatim in zip(p["source_indices"], p["verbatim"]):
            assert (f"{p['prompt']} {p['answer']}" in texts[i]) == verbatim
        if p["kind"] == "unique":
            assert len(p["source_indices"]) == 1
        else:
            assert len(p["source_indices"]) >= cfg.min_shared_articles
            assert len({i // cfg.articles_per_cluster for i in p["source_indices"]}) == 1  # one cluster
    assert sum(p["kind"] == "unique" for p in probes) == 40 * 4
    assert sum(p["kind"] == "shared" for p in probes) == 8 * len(synthwiki.SHARED_ATTRS)


def test_bad_config_names_field():
    with pytest.raises(ValueError, match="articles_per_cluster"):
        generate(SynthWikiConfig(articles_per_cluster=9))


def test_write_matches_bundled(tmp_path):
    meta = write(SynthWikiConfig(), tmp_path)
    bundled = synthwiki.BUNDLED_DIR
    assert json.loads((bundled / synthwiki.META_NAME).read_text()) == meta
    assert (tmp_path / synthwiki.PROBES_NAME).read_text() == (bundled / synthwiki.PROBES_NAME).read_text()
    fresh = pq.read_table(tmp_path / synthwiki.PARQUET_NAME)
    committed = pq.read_table(bundled / synthwiki.PARQUET_NAME)
    assert fresh.equals(committed)
    assert committed.column_names == ["id", "url", "title", "text"]
    assert meta["num_articles"] == 240 and committed.num_rows == 240
    probes = load_probes(id_offset=7)
    assert probes[0]["source_ids"] == [probes[0]["source_indices"][0] + 7]
