"""Packing tokenized articles into fixed-length contexts with a per-token source id and a loss mask.

Every article becomes [BOS] + tokens + [EOS], all tagged with the article's source id.
- `pack`: articles are concatenated into one stream that is cut every `context_length` tokens; a long article
  simply continues in the next context, every token keeping its source id. The last partial context of a
  stream is padded (pad id, the source id of its last real token, loss_mask 0), so no token is ever dropped.
- `single`: one source per context; an article longer than a context fills several contexts, the last one
  padded the same way.

Document order: the caller passes articles in a deterministic order; `shuffled(articles, seed)` permutes a
bounded list of them (the shard stage shuffles each slice's articles with a seed derived from the packing seed
and the slice index), so the output is a pure function of (input, seed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from data_pipeline.schema import LOSS_MASK_DTYPE, SOURCE_ID_DTYPE

PACKING_MODES = ("pack", "single")


@dataclass
class PackingConfig:
    mode: str = "pack"
    context_length: int = 1024
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in PACKING_MODES:
            raise ValueError(f"packing.mode must be one of {PACKING_MODES}, got {self.mode!r}")
        if self.context_length < 2:
            raise ValueError(f"packing.context_length must be >= 2, got {self.context_length}")


class Context(NamedTuple):
    tokens: np.ndarray  # (T,) int64 token ids (the shard writer narrows the dtype)
    source_ids: np.ndarray  # (T,) uint32
    loss_mask: np.ndarray  # (T,) uint8, 0 on padding


def shuffled(items: list, seed: int | list[int]) -> list:
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def _with_specials(tokens: np.ndarray, bos_id: int, eos_id: int) -> np.ndarray:
    out = np.empty(len(tokens) + 2, dtype=np.int64)  # (L+2,)
    out[0], out[-1] = bos_id, eos_id
    out[1:-1] = tokens
    return out


class _Builder:
    """Fills one context at a time and emits it when full or when flushed (padded)."""

    def __init__(self, context_length: int, pad_id: int) -> None:
        self.T, self.pad_id = context_length, pad_id
        self._reset()

    def _reset(self) -> None:
        self.tokens = np.full(self.T, self.pad_id, dtype=np.int64)
        self.source_ids = np.zeros(self.T, dtype=SOURCE_ID_DTYPE)
        self.loss_mask = np.zeros(self.T, dtype=LOSS_MASK_DTYPE)
        self.fill = 0

    def add(self, tokens: np.ndarray, source_id: int) -> Iterator[Context]:
        pos = 0
        while pos < len(tokens):
            n = min(self.T - self.fill, len(tokens) - pos)
            self.tokens[self.fill : self.fill + n] = tokens[pos : pos + n]
            self.source_ids[self.fill : self.fill + n] = source_id
            self.loss_mask[self.fill : self.fill + n] = 1
            self.fill += n
            pos += n
            if self.fill == self.T:
                yield self._emit()

    def flush(self) -> Iterator[Context]:
        if self.fill:
            self.source_ids[self.fill :] = self.source_ids[self.fill - 1]
            yield self._emit()

    def _emit(self) -> Context:
        ctx = Context(self.tokens, self.source_ids, self.loss_mask)
        self._reset()
        return ctx


def pack_articles(
    articles: Iterable[tuple[int, np.ndarray]], cfg: PackingConfig, bos_id: int, eos_id: int, pad_id: int
) -> Iterator[Context]:
    """articles: (source_id, token ids without specials) in document order -> contexts of cfg.context_length."""
    builder = _Builder(cfg.context_length, pad_id)
    for source_id, tokens in articles:
        yield from builder.add(_with_specials(np.asarray(tokens), bos_id, eos_id), source_id)
        if cfg.mode == "single":
            yield from builder.flush()
    yield from builder.flush()
