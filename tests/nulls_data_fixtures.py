"""Tiny corpora and datasets for the data pipeline and loader tests (tests/test_shards.py, test_loader.py,
test_tokenizer_packing.py, test_nulls_data_cli.py): a seeded JSONL corpus run through the real stages."""
from __future__ import annotations

import json
import random
from pathlib import Path

from nulls_dist.data_pipeline.pipeline import data_config_from_dict, run_stages

WORDS = ("river mountain city king queen war peace born died founded music north south empire bridge tower "
         "harbour forest temple market river school painter poet engine island valley").split()


def write_corpus(path: Path, num_articles: int = 60, seed: int = 0) -> Path:
    """A JSONL corpus of `num_articles` articles, a few of them long enough to span several contexts."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(num_articles):
            n = rng.randint(5, 60) if i % 10 else 200
            text = " ".join(rng.choice(WORDS) for _ in range(n)) + f". Article {i} ends."
            f.write(json.dumps({"title": f"Article {i}", "text": text}) + "\n")
    return path


def data_config(corpus: Path, out_dir: Path, **overrides) -> dict:
    cfg = {
        "output_dir": str(out_dir),
        "id_offset": 1000,
        "ingest": {"inputs": [str(corpus)]},
        "tokenizer": {"vocab_size": 300, "num_threads": 1, "character_coverage": 1.0},
        "packing": {"context_length": 32},
        "shard": {"target_samples": 4, "articles_per_shard": 6, "num_workers": 1},
        "holdout": {"count": 3},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def build_dataset(tmp: Path, num_articles: int = 60, **overrides) -> Path:
    corpus = write_corpus(tmp / "corpus.jsonl", num_articles)
    out = tmp / "data"
    run_stages(data_config_from_dict(data_config(corpus, out, **overrides)), ["all"])
    return out
