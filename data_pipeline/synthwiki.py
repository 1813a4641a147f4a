"""SynthWiki: a seeded generator of a small fictional encyclopedia with known facts, and its fact probes.

Run: `python -m nulls_dist.data_pipeline.synthwiki --out data_pipeline/bundled/synthwiki` (the bundled copy).

Each cluster is a fictional region with one article per entity type (town, river, composer, festival,
mountain, guild). Every article states:
- unique facts: 4 attributes of its own entity (exactly one article states each (entity, attribute, value));
- values are invented words drawn from a small pool per attribute (`values_per_attribute`), so every answer
  word also appears in other articles, as the same attribute of other entities: a probe measures whether the
  model knows the association, not whether it has seen the word (a model that never saw an article still
  knows every candidate answer, and a distractor is never favoured just for being familiar);
- shared facts: attributes of the region (capital, language, currency, ruling house, national animal), each
  stated in a random subset (at least 3, or all when fewer) of the region's articles.
Facts are phrased with one of several templates per attribute. Output: `train-00000-of-00001.parquet` in the
`wikimedia/wikipedia` layout (id, url, title, text), `probes.jsonl` (one cloze probe per fact: prompt,
answer, distractors, kind, titles, source indices and source ids = index + id_offset) and `meta.json`.

Larger corpora are not bundled: they are generated on demand, deterministically, from a spec. `--num-articles N`
(a multiple of `articles_per_cluster`: N / 6 clusters by default) on the command line, or the ingest input
`synthwiki:num_articles=1002,seed=0` (any `SynthWikiConfig` field, `key=value`, comma-separated), which
`materialize` writes once under the data pipeline's output directory and reuses while its meta matches. The
probes scale with the corpus: 4 unique facts per article and 5 shared facts per cluster.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nulls_dist.formats import atomic
from nulls_dist.formats.dataset import PAPER_ID_OFFSET

GENERATOR_VERSION = 2
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled" / "synthwiki"
PARQUET_NAME = "train-00000-of-00001.parquet"
PROBES_NAME = "probes.jsonl"
META_NAME = "meta.json"
NUM_DISTRACTORS = 4
SPEC_PREFIX = "synthwiki:"  # an ingest input generated on demand (`materialize`)
GENERATED_SUBDIR = "generated"  # where `materialize` writes, inside the data pipeline's output directory

# An attribute: (name, value kind "Name" | "word", article templates, probe prompt). {E} entity, {R} region,
# {V} value. The probe prompt is the text right before the answer; the first template contains it verbatim.
Attr = tuple[str, str, tuple[str, ...], str]

ENTITY_TYPES: dict[str, dict] = {
    "town": {
        "title": "{N}",
        "intro": ("{E} is a market town in {R}.", "{E} is an old walled town of {R}."),
        "attrs": (
            ("founder", "Name", ("{E} was founded by {V} the Elder.",
                                 "According to local records, {V} the Elder founded {E}.",
                                 "The town traces its founding to {V} the Elder."), "{E} was founded by"),
            ("export", "word", ("The chief export of {E} is {V}.",
                                "{E} is best known for its {V}, which it ships across {R}.",
                                "Traders value the town mainly for its {V}."), "The chief export of {E} is"),
            ("patron", "Name", ("The patron spirit of {E} is {V}.",
                                "Each spring the people of {E} honour their patron spirit, {V}.",
                                "{V} is revered as the patron spirit of the town."), "The patron spirit of {E} is"),
            ("landmark", "Name", ("The most famous building in {E} is the {V} Tower.",
                                  "Visitors to {E} often climb the {V} Tower.",
                                  "The skyline is dominated by the {V} Tower."),
             "The most famous building in {E} is the"),
        ),
    },
    "river": {
        "title": "{N} River",
        "intro": ("The {E} is a river in {R}.", "The {E} flows through the lowlands of {R}."),
        "attrs": (
            ("source", "Name", ("The {E} rises in Lake {V}.", "Its waters begin in Lake {V}, high in the hills.",
                                "From Lake {V} the {E} runs south."), "The {E} rises in Lake"),
            ("fish", "word", ("The most common fish in the {E} is the {V}.",
                              "Fishermen on the {E} mostly catch the {V}.",
                              "The {V}, a silver fish, fills the river every autumn."),
             "The most common fish in the {E} is the"),
            ("bridge", "Name", ("The oldest crossing of the {E} is the {V} Bridge.",
                                "The {V} Bridge has spanned the {E} for four centuries.",
                                "Travellers cross the river at the ancient {V} Bridge."),
             "The oldest crossing of the {E} is the"),
            ("mouth", "Name", ("The {E} empties into the Bay of {V}.", "At its mouth the {E} meets the Bay of {V}.",
                               "The river ends in the Bay of {V}."), "The {E} empties into the Bay of"),
        ),
    },
    "composer": {
        "title": "{N} {M}",
        "intro": ("{E} was a composer from {R}.", "{E} was a celebrated composer of {R}."),
        "attrs": (
            ("birthplace", "Name", ("{E} was born in the village of {V}.",
                                    "Born in the village of {V}, {E} showed early talent.",
                                    "The village of {V} was the composer's birthplace."),
             "{E} was born in the village of"),
            ("instrument", "word", ("{E} played the {V}, a long-necked string instrument.",
                                    "The composer's favourite instrument was the {V}.",
                                    "Few players of the {V} matched {E}."), "{E} played the"),
            ("teacher", "Name", ("{E} studied under the master {V}.",
                                 "As a youth, {E} was taught by the master {V}.",
                                 "The master {V} was the composer's only teacher."), "{E} studied under the master"),
            ("work", "Name", ("{E}'s best-known work is the {V} Suite.",
                              "The {V} Suite remains the most performed piece by {E}.",
                              "Critics still praise the {V} Suite."), "{E}'s best-known work is the"),
        ),
    },
    "festival": {
        "title": "{N} Festival",
        "intro": ("The {E} is a yearly celebration held in {R}.", "The {E} is the largest feast of {R}."),
        "attrs": (
            ("deity", "Name", ("The {E} honours the sky goddess {V}.",
                               "During the {E}, songs are sung to the sky goddess {V}.",
                               "The sky goddess {V} is at the heart of the celebration."),
             "The {E} honours the sky goddess"),
            ("food", "word", ("The traditional dish of the {E} is {V}.", "No {E} is complete without {V}.",
                              "Families cook {V} for the feast."), "The traditional dish of the {E} is"),
            ("symbol", "word", ("The symbol of the {E} is the {V}.",
                                "A painted {V}, the symbol of the {E}, is carried through the streets.",
                                "Children carry the {V} as the emblem of the feast."), "The symbol of the {E} is the"),
            ("queen", "Name", ("The {E} was first held by order of Queen {V}.",
                               "Queen {V} ordered the first {E}.",
                               "The feast began under Queen {V}."), "The {E} was first held by order of Queen"),
        ),
    },
    "mountain": {
        "title": "Mount {N}",
        "intro": ("{E} is a mountain in {R}.", "{E} is the steepest peak of {R}."),
        "attrs": (
            ("climber", "Name", ("{E} was first climbed by {V}.", "The first ascent of {E} was made by {V}.",
                                 "{V} reached the summit before anyone else."), "{E} was first climbed by"),
            ("rock", "word", ("{E} is made mostly of {V}, a green stone.",
                              "Geologists find {V} across the whole of {E}.",
                              "The slopes are formed of dark {V}."), "{E} is made mostly of"),
            ("monastery", "Name", ("The monastery on the slopes of {E} is called {V}.",
                                   "Monks have lived at {V}, high on {E}, for centuries.",
                                   "The monastery of {V} clings to the mountainside."),
             "The monastery on the slopes of {E} is called"),
            ("bird", "word", ("{E} is home to the {V}, a rare mountain bird.",
                              "The rare {V} nests only on {E}.",
                              "Hikers listen for the call of the {V}."), "{E} is home to the"),
        ),
    },
    "guild": {
        "title": "{N} Guild",
        "intro": ("The {E} is a craft guild of {R}.", "The {E} is the oldest trade guild in {R}."),
        "attrs": (
            ("founder", "Name", ("The {E} was founded by the weaver {V}.",
                                 "The weaver {V} founded the {E}.",
                                 "Its first master was the weaver {V}."), "The {E} was founded by the weaver"),
            ("product", "word", ("The {E} is known for making {V}.", "Members of the {E} mostly make {V}.",
                                 "Its workshops turn out fine {V}."), "The {E} is known for making"),
            ("hall", "Name", ("The {E} meets in the {V} Hall.", "Meetings of the {E} take place in the {V} Hall.",
                              "Its members gather in the {V} Hall."), "The {E} meets in the"),
            ("motto", "word", ("The motto of the {E} is a single word: {V}.",
                               "Every member of the {E} swears by its one-word motto, {V}.",
                               "Its motto, {V}, is carved above the door."), "The motto of the {E} is a single word:"),
        ),
    },
}

SHARED_ATTRS: tuple[Attr, ...] = (
    ("capital", "Name", ("The capital of {R} is {V}.", "{R} is governed from its capital, {V}.",
                         "{V}, the capital of {R}, lies a day's ride away."), "The capital of {R} is"),
    ("language", "Name", ("The people of {R} speak {V}.", "{V} is the language spoken throughout {R}.",
                          "Like everyone in {R}, locals speak {V}."), "The people of {R} speak"),
    ("currency", "word", ("The currency of {R} is the {V}.", "Prices in {R} are paid in the {V}.",
                          "Across {R}, the {V} is the coin of trade."), "The currency of {R} is the"),
    ("ruler", "Name", ("{R} is ruled by House {V}.", "House {V} has governed {R} for generations.",
                       "The lords of {R} all belong to House {V}."), "{R} is ruled by House"),
    ("animal", "word", ("The national animal of {R} is the {V}.", "The {V} is the national animal of {R}.",
                        "Every flag of {R} shows the {V}, its national animal."),
     "The national animal of {R} is the"),
)

FILLERS = (
    "The area has a mild climate and long, wet winters.",
    "Its history is recorded in several old chronicles.",
    "Many travellers have written about it.",
    "It appears on the earliest surviving maps of the region.",
    "Scholars still disagree about parts of its past.",
    "Local tradition preserves many stories about it.",
)

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "th",
           "v", "z", "h", "sh", "qu", "tr", "w")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ai", "ou", "ie", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "k", "nd")


@dataclass
class SynthWikiConfig:
    seed: int = 0
    num_clusters: int = 40
    articles_per_cluster: int = 6  # 1 article per entity type, at most len(ENTITY_TYPES)
    id_offset: int = PAPER_ID_OFFSET  # source id = article index + id_offset (the ingest default)
    min_shared_articles: int = 3  # each shared fact is stated in this many articles of its cluster, or more
    values_per_attribute: int = 8  # distinct answer words per attribute (> NUM_DISTRACTORS)

    def validate(self) -> None:
        if self.num_clusters <= 0:
            raise ValueError(f"num_clusters must be positive, got {self.num_clusters}")
        if not 2 <= self.articles_per_cluster <= len(ENTITY_TYPES):
            raise ValueError(f"articles_per_cluster must be in [2, {len(ENTITY_TYPES)}], "
                             f"got {self.articles_per_cluster}")
        if self.min_shared_articles < 2:
            raise ValueError(f"min_shared_articles must be >= 2, got {self.min_shared_articles}")
        if self.values_per_attribute <= NUM_DISTRACTORS:
            raise ValueError(f"values_per_attribute must be > NUM_DISTRACTORS = {NUM_DISTRACTORS}, "
                             f"got {self.values_per_attribute}")


def config_for_articles(num_articles: int, **fields_: int) -> SynthWikiConfig:
    """The config of a corpus of `num_articles` articles (num_clusters = num_articles / articles_per_cluster)."""
    per_cluster = fields_.pop("articles_per_cluster", SynthWikiConfig.articles_per_cluster)
    if not isinstance(num_articles, int) or num_articles <= 0 or num_articles % per_cluster:
        lower = max(per_cluster, num_articles - num_articles % per_cluster) if isinstance(num_articles, int) else 0
        raise ValueError(f"num_articles must be a positive multiple of articles_per_cluster={per_cluster} (every "
                         f"cluster has one article per entity type), got {num_articles!r}; e.g. {lower} or "
                         f"{lower + per_cluster}")
    return SynthWikiConfig(num_clusters=num_articles // per_cluster, articles_per_cluster=per_cluster, **fields_)


def parse_spec(spec: str) -> SynthWikiConfig:
    """`synthwiki:num_articles=1002,seed=0` -> its config; ValueError naming the spec and the bad field."""
    body = spec.removeprefix(SPEC_PREFIX)
    known = {f.name for f in fields(SynthWikiConfig)} | {"num_articles"}
    values: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"ingest.inputs {spec!r}: {item!r} is not key=value with a key in {sorted(known)}")
        try:
            values[key] = int(value)
        except ValueError:
            raise ValueError(f"ingest.inputs {spec!r}: {key} must be an integer, got {value!r}") from None
    if "num_articles" in values:
        if "num_clusters" in values:
            raise ValueError(f"ingest.inputs {spec!r}: give num_articles or num_clusters, not both")
        cfg = config_for_articles(values.pop("num_articles"), **values)
    else:
        cfg = SynthWikiConfig(**values)
    cfg.validate()
    return cfg


def materialize(spec: str, root: str | Path) -> Path:
    """The corpus of a `synthwiki:` spec in `root/generated/synthwiki-<articles>-s<seed>-<hash>/`: written
    (atomically, meta last) when absent or when its meta.json is not this config's, reused otherwise."""
    cfg = parse_spec(spec)
    digest = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:8]
    out = Path(root) / GENERATED_SUBDIR / (f"synthwiki-{cfg.num_clusters * cfg.articles_per_cluster}"
                                           f"-s{cfg.seed}-{digest}")
    meta_path = out / META_NAME
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("config") == asdict(cfg) and meta.get("generator_version") == GENERATOR_VERSION:
            return out
    write(cfg, out)
    return out


class _Words:
    """Invented words, each handed out once per corpus (names, regions and the attributes' value pools)."""

    def __init__(self, rng: random.Random, reserved: set[str]):
        self.rng, self.used = rng, set(reserved)

    def new(self, kind: str) -> str:
        while True:
            n = self.rng.choice((2, 2, 2, 3))
            word = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                           for _ in range(n))
            if 5 <= len(word) <= 10 and word not in self.used:
                self.used.add(word)
                return word.capitalize() if kind == "Name" else word


class _ValueDeck:
    """An attribute's answer words, dealt in shuffled rounds of the whole pool: over n facts every value is used
    floor(n / pool) or ceil(n / pool) times, so each one is the answer of several facts once n >= 2 * pool."""

    def __init__(self, rng: random.Random, pool: list[str]):
        self.rng, self.pool, self.hand = rng, pool, []

    def deal(self) -> str:
        if not self.hand:
            self.hand = self.rng.sample(self.pool, len(self.pool))
        return self.hand.pop()


def _template_vocabulary() -> set[str]:
    texts = [t for spec in ENTITY_TYPES.values() for a in spec["attrs"] for t in (*a[2], a[3])]
    texts += [t for spec in ENTITY_TYPES.values() for t in (*spec["intro"], spec["title"])]
    texts += [t for a in SHARED_ATTRS for t in (*a[2], a[3])] + list(FILLERS)
    return {w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)}


def _pick_template(rng: random.Random, num_templates: int) -> int:
    """Template 0 (the probe's own phrasing) half of the time, a paraphrase otherwise."""
    return 0 if rng.random() < 0.5 else rng.randrange(1, num_templates)


def _fill(template: str, **kw) -> str:
    return template.format(**kw)


def generate(cfg: SynthWikiConfig) -> tuple[list[dict], list[dict]]:
    """-> (articles [{id, url, title, text}], probes) for a config; deterministic in cfg."""
    cfg.validate()
    rng = random.Random(cfg.seed)
    words = _Words(rng, _template_vocabulary())
    type_names = list(ENTITY_TYPES)[:cfg.articles_per_cluster]
    pools = {f"{t}.{a[0]}": [words.new(a[1]) for _ in range(cfg.values_per_attribute)]
             for t in type_names for a in ENTITY_TYPES[t]["attrs"]}
    pools |= {f"region.{a[0]}": [words.new(a[1]) for _ in range(cfg.values_per_attribute)] for a in SHARED_ATTRS}
    decks = {attribute: _ValueDeck(rng, pool) for attribute, pool in pools.items()}
    articles: list[dict] = []
    facts: list[dict] = []  # a fact before its distractors are drawn
    for _ in range(cfg.num_clusters):
        region = words.new("Name")
        first = len(articles)
        sentences: list[list[str]] = []
        for type_name in type_names:
            spec = ENTITY_TYPES[type_name]
            title = _fill(spec["title"], N=words.new("Name"), M=words.new("Name"))
            index = len(articles)
            body = [_fill(rng.choice(spec["intro"]), E=title, R=region)]
            for name, kind, templates, prompt in spec["attrs"]:
                value = decks[f"{type_name}.{name}"].deal()
                choice = _pick_template(rng, len(templates))
                body.append(_fill(templates[choice], E=title, R=region, V=value))
                facts.append({"kind": "unique", "attribute": f"{type_name}.{name}", "subject": title,
                              "prompt": _fill(prompt, E=title, R=region), "answer": value,
                              "indices": [index], "verbatim": [choice == 0]})
            body.append(rng.choice(FILLERS))
            articles.append({"title": title, "index": index})
            sentences.append(body)
        n = len(type_names)
        for name, kind, templates, prompt in SHARED_ATTRS:
            value = decks[f"region.{name}"].deal()
            holders = sorted(rng.sample(range(n), rng.randint(min(cfg.min_shared_articles, n), n)))
            verbatim = []
            for local in holders:
                choice = _pick_template(rng, len(templates))
                sentences[local].append(_fill(templates[choice], R=region, V=value))
                verbatim.append(choice == 0)
            facts.append({"kind": "shared", "attribute": f"region.{name}", "subject": region,
                          "prompt": _fill(prompt, R=region), "answer": value,
                          "indices": [first + i for i in holders], "verbatim": verbatim})
        for local, body in enumerate(sentences):
            intro, rest = body[0], body[1:]
            rng.shuffle(rest)
            articles[first + local]["text"] = " ".join([intro, *rest])
    return _rows(articles), _probes(facts, articles, pools, cfg, rng)


def _rows(articles: list[dict]) -> list[dict]:
    return [{"id": str(a["index"] + 1), "url": "https://synthwiki.invalid/wiki/" + a["title"].replace(" ", "_"),
             "title": a["title"], "text": a["text"]} for a in articles]


def _probes(facts: list[dict], articles: list[dict], pools: dict[str, list[str]], cfg: SynthWikiConfig,
            rng: random.Random) -> list[dict]:
    """One probe per fact; distractors are other values of the same attribute (each is an answer elsewhere)."""
    probes = []
    for number, fact in enumerate(facts):
        pool = [v for v in pools[fact["attribute"]] if v != fact["answer"]]
        probes.append({
            "probe_id": f"{fact['kind'][0]}{number:05d}",
            "kind": fact["kind"],
            "attribute": fact["attribute"],
            "subject": fact["subject"],
            "prompt": fact["prompt"],
            "answer": fact["answer"],
            "distractors": rng.sample(pool, NUM_DISTRACTORS),
            "titles": [articles[i]["title"] for i in fact["indices"]],
            "source_indices": fact["indices"],
            "source_ids": [i + cfg.id_offset for i in fact["indices"]],
            "id_offset": cfg.id_offset,
            "verbatim": fact["verbatim"],
        })
    return probes


PARQUET_SCHEMA = pa.schema([("id", pa.string()), ("url", pa.string()), ("title", pa.string()),
                            ("text", pa.string())])


def write(cfg: SynthWikiConfig, out: str | Path) -> dict:
    """Generate and write the parquet file, probes.jsonl and meta.json (each atomically); returns meta."""
    rows, probes = generate(cfg)
    return write_corpus(out, rows, probes, {"generator_version": GENERATOR_VERSION, "config": asdict(cfg)})


def write_corpus(out: str | Path, rows: list[dict], probes: list[dict], meta: dict) -> dict:
    """A corpus in the layout the ingest reads: `PARQUET_NAME` (id, url, title, text), `PROBES_NAME` and
    `META_NAME` (`meta` plus counts and the file list), each written atomically, meta last; returns meta."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA)
    with atomic.atomic_path(out / PARQUET_NAME) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=64)
    atomic.write_text(out / PROBES_NAME, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in probes))
    meta = {**meta, "num_articles": len(rows), "num_chars": sum(len(r["text"]) for r in rows),
            "num_probes": {k: sum(p["kind"] == k for p in probes) for k in ("unique", "shared")},
            "files": [PARQUET_NAME, PROBES_NAME],
            "source_ids": "source_id = source_index + id_offset (the index is the row in the parquet file)"}
    atomic.write_text(out / META_NAME, json.dumps(meta, indent=2) + "\n")
    return meta


def load_probes(path: str | Path = BUNDLED_DIR / PROBES_NAME, id_offset: int | None = None) -> list[dict]:
    """Read probes; with `id_offset`, source_ids are recomputed as source_indices + id_offset."""
    probes = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
    if id_offset is not None:
        for p in probes:
            p["source_ids"] = [i + id_offset for i in p["source_indices"]]
            p["id_offset"] = id_offset
    return probes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(BUNDLED_DIR))
    defaults = SynthWikiConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    parser.add_argument("--num-articles", type=int, default=None,
                        help="articles in all (a multiple of --articles-per-cluster); sets the number of clusters")
    args = parser.parse_args(argv)
    values = {k: getattr(args, k) for k in asdict(defaults)}
    if args.num_articles is not None:
        values.pop("num_clusters")
        cfg = config_for_articles(args.num_articles, **values)
    else:
        cfg = SynthWikiConfig(**values)
    print(json.dumps(write(cfg, args.out), indent=2))


if __name__ == "__main__":
    main()
