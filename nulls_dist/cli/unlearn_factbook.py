"""The real-text unlearning case: the SynthWiki demo's chain (`nulls_dist.cli.unlearn_demo`) on the CIA World
Factbook (`data_pipeline/reference_corpus.py`), in a work directory:

1. convert the Factbook's first 24 entries (six sections each, cut at 1500 characters) into
   `data/factbook_unlearn/raw` (parquet + probes.jsonl from the text itself; kept when it is already there with
   this config);
2. `nulls-data data=factbook_unlearn` (conf/data/factbook_unlearn.yaml: 48 articles held out);
3. the forget set: one trained (never held-out) article from each of the first `--num-forget` entries, cycling
   through the sections, each with at least `--min-unique` unique-fact probes;
4. the demo's chain with `experiment=unlearn_factbook`: train the original and the retrain oracle, nulls-manifest,
   nulls-unlearn mask and hard, verify both, nulls-eval with the Factbook probes (report in `<workdir>/eval/`);
and prints the demo's headline, then the never-trained level: the holdout articles' unique facts.

    python -m nulls_dist.cli.unlearn_factbook --workdir runs/unlearn_factbook [--num-forget 16]
        [--max-countries N --max-chars N --data-override KEY=VALUE ...] [any unlearn_demo option, e.g. --max-steps]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from nulls_dist.cli import unlearn_demo
from nulls_dist.cli.errors import report_errors
from nulls_dist.data_pipeline import reference_corpus
from nulls_dist.data_pipeline.synthwiki import META_NAME, PROBES_NAME, load_probes
from nulls_dist.formats.dataset import REGISTRY_NAME, SPLIT_TRAIN

DATA_CONFIG = "factbook_unlearn"  # conf/data/: where its output_dir and raw input live, relative to the workdir
DATA_DIR = Path("data") / "factbook_unlearn"
# 138 articles (90 trained, 48 held out), 186K characters, 32K training tokens: a 500-step CPU run memorises it
CORPUS = dict(max_countries=24, max_chars=1500, unique_per_article=6, shared_per_article=4)


def convert(raw: Path, cfg: reference_corpus.ReferenceCorpusConfig) -> dict:
    """The converted corpus in `raw`: written when absent, kept when its meta.json records this config."""
    meta_path = raw / META_NAME
    if not meta_path.is_file():
        return reference_corpus.write(cfg, raw)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    wanted = (reference_corpus.GENERATOR_VERSION, reference_corpus.config_record(cfg))
    if (meta.get("generator_version"), meta.get("config")) != wanted:
        raise ValueError(f"{meta_path}: converted with another generator version or config than this run's "
                         f"{wanted[1]}; use another --workdir")
    return meta


def choose_forget(registry: Path, probes: list[dict], num_forget: int, min_unique: int,
                  sections: tuple[str, ...]) -> list[int]:
    """One trained article per entry (the first `num_forget` entries that have one), entry i looking first at
    section i mod len(sections), then the following ones: the first with >= min_unique unique-fact probes."""
    split = dict(zip(*(pq.read_table(registry, columns=["source_id", "split"]).column(c).to_pylist()
                       for c in ("source_id", "split"))))
    num_unique = Counter(p["source_ids"][0] for p in probes if p["kind"] == "unique")
    articles: dict[str, dict[str, int]] = {}  # entry -> section -> source id, in corpus order
    for p in probes:
        for sid, title in zip(p["source_ids"], p["titles"]):
            section = "Introduction" if title == p["subject"] else title.removesuffix(f" of {p['subject']}")
            articles.setdefault(p["subject"], {})[section] = sid
    forget: list[int] = []
    for i, by_section in enumerate(articles.values()):
        order = [sections[(i + k) % len(sections)] for k in range(len(sections))]
        picks = [by_section[s] for s in order if s in by_section and split.get(by_section[s]) == SPLIT_TRAIN
                 and num_unique[by_section[s]] >= min_unique]
        forget += picks[:1]
        if len(forget) == num_forget:
            return forget
    raise ValueError(f"{registry}: only {len(forget)} entries have a trained article with >= {min_unique} unique "
                     f"probes; lower --num-forget ({num_forget}) or --min-unique")


def print_holdout_level(report: Path) -> None:
    result = json.loads(report.read_text())
    for name, r in result["deployments"].items():
        h = r["probes"]["unique_holdout"]
        print(f"{name:10s} never-trained (holdout) unique facts acc {h['accuracy']:.2f} "
              f"[{h['accuracy_ci95'][0]:.2f}, {h['accuracy_ci95'][1]:.2f}] ({h['num']} probes) | retained loss "
              f"{r['loss']['retained']:.3f} | holdout loss {r['loss']['holdout']:.3f}")


@report_errors("unlearn_factbook")
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Other options go to nulls_dist.cli.unlearn_demo (--max-steps, --baselines, ...)")
    p.add_argument("--workdir", default="runs/unlearn_factbook")
    p.add_argument("--experiment", default="unlearn_factbook", help="conf/experiment/ of both training runs")
    p.add_argument("--num-forget", type=int, default=16, help="forgotten articles, one per entry")
    p.add_argument("--min-unique", type=int, default=3, help="unique-fact probes a forgotten article has at least")
    p.add_argument("--max-countries", type=int, default=CORPUS["max_countries"], help="Factbook entries converted")
    p.add_argument("--max-chars", type=int, default=CORPUS["max_chars"], help="article length cut")
    p.add_argument("--data-override", action="append", default=[], metavar="KEY=VALUE",
                   help="a data config override for nulls-data and both training runs, e.g. holdout.count=8")
    args, demo_args = p.parse_known_args(argv)
    if args.num_forget < 1:
        raise ValueError(f"--num-forget must be >= 1, got {args.num_forget}")
    work = Path(args.workdir).resolve()
    cfg = reference_corpus.ReferenceCorpusConfig(**(CORPUS | {"max_countries": args.max_countries,
                                                               "max_chars": args.max_chars}))
    meta = convert(work / DATA_DIR / "raw", cfg)
    print(f"corpus: {meta['num_articles']} articles, {meta['num_chars']} characters, probes {meta['num_probes']}")
    overrides = [f"data.{o}" for o in args.data_override]
    unlearn_demo._tool("nulls_dist.cli.data", [f"data={DATA_CONFIG}", *overrides], work)
    probes_path = work / DATA_DIR / "raw" / PROBES_NAME
    forget = choose_forget(work / DATA_DIR / REGISTRY_NAME, load_probes(probes_path), args.num_forget,
                           args.min_unique, cfg.sections)
    print(f"forget set ({len(forget)} articles): {','.join(map(str, forget))}")
    unlearn_demo.main(["--workdir", str(work), "--experiment", args.experiment, "--forget", ",".join(map(str, forget)),
                       "--data", str(work / DATA_DIR), "--probes", str(probes_path),
                       *[f"--train-override={o}" for o in overrides], *demo_args])
    print_holdout_level(work / "eval" / "report.json")


if __name__ == "__main__":
    main()
