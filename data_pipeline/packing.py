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


def _join(pieces: list[tuple[int, np.ndarray]], bos_id: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Articles -> one stream (N,) int64 of [BOS] + tokens + [EOS] each, and its (N,) uint32 source ids."""
    lengths = np.fromiter((len(t) + 2 for _, t in pieces), dtype=np.int64, count=len(pieces))  # (A,)
    starts = np.concatenate([[0], np.cumsum(lengths)])  # (A+1,)
    tokens = np.empty(int(starts[-1]), dtype=np.int64)  # (N,)
    tokens[starts[:-1]] = bos_id
    tokens[starts[1:] - 1] = eos_id
    for (_, t), lo, hi in zip(pieces, starts[:-1] + 1, starts[1:] - 1):
        tokens[lo:hi] = t
    sources = np.repeat(np.fromiter((s for s, _ in pieces), dtype=SOURCE_ID_DTYPE, count=len(pieces)), lengths)
    return tokens, sources


def _contexts(tokens: np.ndarray, sources: np.ndarray, T: int, pad_id: int, final: bool) -> Iterator[Context]:
    """Cut a stream into full contexts; the tail is padded (pad id, its last source id, loss_mask 0) when
    `final`, otherwise left for the caller to carry (it is not yielded)."""
    num_full = len(tokens) // T
    for row_tokens, row_sources in zip(tokens[: num_full * T].reshape(num_full, T),
                                       sources[: num_full * T].reshape(num_full, T)):
        yield Context(row_tokens, row_sources, np.ones(T, dtype=LOSS_MASK_DTYPE))
    fill = len(tokens) - num_full * T
    if final and fill:
        ctx = Context(np.full(T, pad_id, dtype=np.int64), np.empty(T, dtype=SOURCE_ID_DTYPE),
                      np.zeros(T, dtype=LOSS_MASK_DTYPE))
        ctx.tokens[:fill] = tokens[num_full * T :]
        ctx.source_ids[:fill] = sources[num_full * T :]
        ctx.source_ids[fill:] = sources[-1]
        ctx.loss_mask[:fill] = 1
        yield ctx


def _pack_stream(articles, T: int, bos_id: int, eos_id: int, pad_id: int, block_tokens: int) -> Iterator[Context]:
    """`pack` mode: articles are joined a block of about `block_tokens` tokens at a time (numpy, not per
    token); the partial context at the end of a block is carried into the next one."""
    carry_tokens = np.empty(0, dtype=np.int64)  # (<T,)
    carry_sources = np.empty(0, dtype=SOURCE_ID_DTYPE)  # (<T,)
    pieces: list[tuple[int, np.ndarray]] = []
    size = 0
    for source_id, tokens in articles:
        pieces.append((source_id, tokens))
        size += len(tokens) + 2
        if size >= block_tokens:
            tokens_, sources_ = _join(pieces, bos_id, eos_id)
            tokens_, sources_ = np.concatenate([carry_tokens, tokens_]), np.concatenate([carry_sources, sources_])
            yield from _contexts(tokens_, sources_, T, pad_id, final=False)
            cut = len(tokens_) // T * T
            carry_tokens, carry_sources = tokens_[cut:].copy(), sources_[cut:].copy()
            pieces, size = [], 0
    if pieces:
        tokens_, sources_ = _join(pieces, bos_id, eos_id)
        carry_tokens, carry_sources = np.concatenate([carry_tokens, tokens_]), np.concatenate([carry_sources, sources_])
    yield from _contexts(carry_tokens, carry_sources, T, pad_id, final=True)


def pack_articles(
    articles: Iterable[tuple[int, np.ndarray]], cfg: PackingConfig, bos_id: int, eos_id: int, pad_id: int,
    block_tokens: int = 1 << 16,
) -> Iterator[Context]:
    """articles: (source_id, token ids without specials) in document order -> contexts of cfg.context_length.
    Contexts of one block may share memory (views of one stream); they are not modified after being yielded."""
    T = cfg.context_length
    if cfg.mode == "pack":
        yield from _pack_stream(((s, np.asarray(t)) for s, t in articles), T, bos_id, eos_id, pad_id,
                                max(block_tokens, T))
        return
    for source_id, tokens in articles:  # single: every article on its own contexts, the last one padded
        tokens_, sources_ = _join([(source_id, np.asarray(tokens))], bos_id, eos_id)
        yield from _contexts(tokens_, sources_, T, pad_id, final=True)
