"""A tiny NULL that really memorised its training articles, for the audit's attack tests: random-token articles
(one source each), trained in the per-token source mode with plain AdamW until the training text's loss is
near 0, and probes whose answer is the token after a prompt taken from an article. Token ids double as words
(`encode("w17 w3") == [17, 3]`), so probes go through the same code as SynthWiki's."""
from __future__ import annotations

import numpy as np
import torch

from nulls_dist.config import NullConfig
from nulls_dist.model import NullTransformer

BASE = 4096
NUM_SOURCES = 36
ARTICLE_LEN = 24
VOCAB = 128


def encode(text: str) -> list[int]:
    return [int(w[1:]) for w in text.split()]


def decode(ids) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


def articles(seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {BASE + i: rng.integers(4, VOCAB, size=ARTICLE_LEN) for i in range(NUM_SOURCES)}


def train_tiny_null(texts: dict[int, np.ndarray], sources: list[int], steps: int = 120, seed: int = 0,
                    batch: int = 12) -> NullTransformer:
    """A debug NULL (2 layers, width 64, 64 backbone units, ~22 sinks per source) trained on `sources`."""
    torch.manual_seed(seed)
    model = NullTransformer(NullConfig.from_preset("debug", sink_strategy="uniform", vocab_size=VOCAB,
                                                   block_size=64))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    for step in range(steps):
        ids = [sources[(step * batch + j) % len(sources)] for j in range(batch)]
        x = torch.from_numpy(np.stack([texts[s] for s in ids])).long()  # (b, T)
        sids = torch.tensor(ids)[:, None].expand(-1, ARTICLE_LEN - 1)  # (b, T-1)
        loss = model(x[:, :-1], sids, labels=x[:, 1:]) / sids.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def fact_probes(texts: dict[int, np.ndarray], sources, per_source: int = 3, seed: int = 0) -> list[dict]:
    """Cloze probes: the article's tokens up to position p, answer = its token p, 4 distractors drawn from the
    vocabulary (never the answer)."""
    rng = np.random.default_rng(seed)
    out = []
    for sid in sources:
        t = texts[sid]
        for k, pos in enumerate(np.linspace(6, ARTICLE_LEN - 1, per_source).astype(int)):
            pool = [v for v in range(4, VOCAB) if v != t[pos]]
            distractors = rng.choice(pool, 4, replace=False)
            out.append({"probe_id": f"p{sid}-{k}", "kind": "unique", "prompt": decode(t[:pos]),
                        "answer": f"w{t[pos]}", "distractors": [f"w{d}" for d in distractors],
                        "source_ids": [int(sid)]})
    return out
