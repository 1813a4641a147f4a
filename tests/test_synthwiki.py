"""SynthWiki: deterministic output, probes consistent with the article texts, bundled copy up to date."""
import json
import re

import pyarrow.parquet as pq
import pytest

from nulls_dist.data_pipeline import synthwiki
from nulls_dist.data_pipeline.synthwiki import SynthWikiConfig, generate, load_probes, write


def _mentions(word: str, texts: list[str]) -> list[int]:
    pattern = re.compile(rf"\b{re.escape(word)}\b")
    return [i for i, text in enumerate(texts) if pattern.search(text)]


def _holders(subject: str, answer: str, texts: list[str]) -> list[int]:
    """The articles that state the fact: they name both its subject and its answer."""
    return sorted(set(_mentions(subject, texts)) & set(_mentions(answer, texts)))


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
        assert _holders(p["subject"], p["answer"], texts) == p["source_indices"], p
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


def test_answers_and_distractors_are_all_familiar_words():
    """Every candidate answer of a probe also occurs in other articles, so a model that never saw the fact's
    article has seen every candidate: the probe tests the association, not the word's novelty."""
    rows, probes = generate(SynthWikiConfig(seed=2, num_clusters=20))
    texts = [r["text"] for r in rows]
    for p in probes:
        outside = [i for i in _mentions(p["answer"], texts) if i not in p["source_indices"]]
        assert outside, p
        for d in p["distractors"]:
            assert _mentions(d, texts), (p["probe_id"], d)
        assert len(set(p["distractors"])) == synthwiki.NUM_DISTRACTORS


def test_bad_config_names_field():
    with pytest.raises(ValueError, match="articles_per_cluster"):
        generate(SynthWikiConfig(articles_per_cluster=9))
    with pytest.raises(ValueError, match="values_per_attribute"):
        generate(SynthWikiConfig(values_per_attribute=4))


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


# ------------------------------------------------------------------------------------------------ larger corpora
def _word_index(texts: list[str]) -> dict[str, set[int]]:
    index: dict[str, set[int]] = {}
    for i, text in enumerate(texts):
        for word in set(re.findall(r"[A-Za-z']+", text)):
            index.setdefault(word, set()).add(i)
    return index


def test_a_thousand_articles_deterministic_with_probes_that_scale_and_match():
    cfg = synthwiki.config_for_articles(1002, seed=0)
    assert cfg.num_clusters == 167
    rows, probes = generate(cfg)
    assert (rows, probes) == generate(synthwiki.config_for_articles(1002, seed=0))
    texts, titles = [r["text"] for r in rows], [r["title"] for r in rows]
    assert len(rows) == len(set(titles)) == 1002
    assert sum(p["kind"] == "unique" for p in probes) == 4 * 1002
    assert sum(p["kind"] == "shared" for p in probes) == 167 * len(synthwiki.SHARED_ATTRS)
    assert len({p["probe_id"] for p in probes}) == len(probes)
    index = _word_index(texts)
    for p in probes:
        # candidates name every word of the subject and the answer; the exact phrase check decides among them
        words = re.findall(r"[A-Za-z']+", p["subject"]) + [p["answer"]]
        candidates = sorted(set.intersection(*(index.get(w, set()) for w in words)))
        holders = [candidates[j] for j in _holders(p["subject"], p["answer"], [texts[i] for i in candidates])]
        assert holders == p["source_indices"], p
        assert p["source_ids"] == [i + cfg.id_offset for i in p["source_indices"]]
        assert p["answer"] not in p["distractors"]


def test_num_articles_must_fill_whole_clusters():
    with pytest.raises(ValueError, match=r"num_articles .* got 1000; e.g. 996 or 1002"):
        synthwiki.config_for_articles(1000)
    assert synthwiki.config_for_articles(1000, articles_per_cluster=5).num_clusters == 200


def test_generated_on_demand_from_a_spec(tmp_path):
    spec = "synthwiki:num_articles=12,seed=1"
    out = synthwiki.materialize(spec, tmp_path)
    assert out.parent == tmp_path / synthwiki.GENERATED_SUBDIR and out.name.startswith("synthwiki-12-s1-")
    reference = tmp_path / "reference"
    write(synthwiki.config_for_articles(12, seed=1), reference)
    for name in (synthwiki.PROBES_NAME, synthwiki.META_NAME):
        assert (out / name).read_text() == (reference / name).read_text()
    stamp = (out / synthwiki.PARQUET_NAME).stat().st_mtime_ns
    assert synthwiki.materialize(spec, tmp_path) == out  # reused, not rewritten
    assert (out / synthwiki.PARQUET_NAME).stat().st_mtime_ns == stamp
    assert synthwiki.materialize("synthwiki:num_articles=12,seed=2", tmp_path) != out
    for bad, message in (("synthwiki:num_articles=13", "num_articles"), ("synthwiki:colour=3", "colour"),
                         ("synthwiki:seed=x", "seed must be an integer"),
                         ("synthwiki:num_articles=12,num_clusters=2", "not both"),
                         ("synthwiki:values_per_attribute=3", "values_per_attribute")):
        with pytest.raises(ValueError, match=message):
            synthwiki.parse_spec(bad)


def test_the_pipeline_ingests_a_spec(tmp_path):
    from nulls_dist.data_pipeline.pipeline import DataConfig, IngestSettings, run_ingest_stage

    cfg = DataConfig(output_dir=str(tmp_path / "data"), id_offset=100,
                     ingest=IngestSettings(inputs=["synthwiki:num_articles=18,seed=4"]))
    report = run_ingest_stage(cfg)
    assert report["num_written"] == 18
    titles = [r["title"] for r in generate(synthwiki.config_for_articles(18, seed=4))[0]]
    from nulls_dist.data_pipeline.ingest.run import iter_articles

    ingested = [t for batch in iter_articles(cfg.ingest_dir, columns=["title"]) for t in batch.column(0).to_pylist()]
    assert ingested == titles  # in source-id order: article index + id_offset
