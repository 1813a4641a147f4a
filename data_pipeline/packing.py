"""Packing tokenized articles into fixed-length contexts with a per-token source id and a loss mask.

Every article becomes [BOS] + tokens + [EOS], all tagged with the article's source id.
- `pack`: articles are concatenated into one stream that is cut every `context_length` tokens; a long article
  simply continues in the next context, every token keeping its source id. The last partial context of a
  stream is padded (pad id, the source id of its last real token, loss_mask 0), so no token is ever dropped.
- `single`: one source per context; an article longer than a context fills several contexts, the last one
  padded the same way.

`pack_blocks` yields the contexts as blocks of rows (numpy, one conversion per block: the shard writer turns a
block into tar members without a per-sample array pass); `pack_articles` yields them one `Context` at a time.

Document order: the caller passes articles in a deterministic order; `shuffled(articles, seed)` permutes a
bounded list of them (the shard stage shuffles each slice's articles with a seed derived from the packing seed
and the slice index), so the output is a pure function of (input, seed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from nulls_dist.formats.dataset import LOSS_MASK_DTYPE, SOURCE_ID_DTYPE

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
    tokens: np.ndarray  # (T,) token ids (int64 from pack_articles; the shard writer narrows the dtype)
    source_ids: np.ndarray  # (T,) uint32
    loss_mask: np.ndarray  # (T,) uint8, 0 on padding


class ContextBlock(NamedTuple):
    """n consecutive contexts; every row is C-contiguous."""

    tokens: np.ndarray  # (n, T) token ids in the requested dtype
    source_ids: np.ndarray  # (n, T) uint32
    loss_mask: np.ndarray  # (n, T) uint8, 0 on padding


def shuffled(items: list, seed: int | list[int]) -> list:
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def _join(pieces: list[tuple[int, np.ndarray]], bos_id: int, eos_id: int,
          dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Articles -> one stream (N,) of [BOS] + tokens + [EOS] each, and its (N,) uint32 source ids."""
    lengths = np.fromiter((len(t) for _, t in pieces), dtype=np.int64, count=len(pieces)) + 2  # (A,)
    ends = np.cumsum(lengths)  # (A,)
    tokens = np.empty(int(ends[-1]), dtype=dtype)  # (N,)
    body = np.ones(len(tokens), dtype=bool)  # (N,) False at the specials
    body[ends - lengths] = False
    body[ends - 1] = False
    tokens[~body] = np.tile(np.array([bos_id, eos_id], dtype=dtype), len(pieces))
    tokens[body] = np.concatenate([t for _, t in pieces])
    sources = np.repeat(np.fromiter((s for s, _ in pieces), dtype=SOURCE_ID_DTYPE, count=len(pieces)), lengths)
    return tokens, sources


def _blocks(tokens: np.ndarray, sources: np.ndarray, T: int, pad_id: int, final: bool) -> Iterator[ContextBlock]:
    """Cut a stream into full contexts (one block of views); the tail is padded (pad id, its last source id,
    loss_mask 0) when `final`, otherwise left for the caller to carry (it is not yielded)."""
    num_full = len(tokens) // T
    if num_full:
        yield ContextBlock(tokens[: num_full * T].reshape(num_full, T), sources[: num_full * T].reshape(num_full, T),
                           np.ones((num_full, T), dtype=LOSS_MASK_DTYPE))
    fill = len(tokens) - num_full * T
    if final and fill:
        block = ContextBlock(np.full((1, T), pad_id, dtype=tokens.dtype), np.empty((1, T), dtype=SOURCE_ID_DTYPE),
                             np.zeros((1, T), dtype=LOSS_MASK_DTYPE))
        block.tokens[0, :fill] = tokens[num_full * T :]
        block.source_ids[0, :fill] = sources[num_full * T :]
        block.source_ids[0, fill:] = sources[-1]
        block.loss_mask[0, :fill] = 1
        yield block


def _pack_stream(articles, T: int, bos_id: int, eos_id: int, pad_id: int, block_tokens: int,
                 dtype: np.dtype) -> Iterator[ContextBlock]:
    """`pack` mode: articles are joined a block of about `block_tokens` tokens at a time (numpy, not per
    token); the partial context at the end of a block is carried into the next one."""
    carry_tokens = np.empty(0, dtype=dtype)  # (<T,)
    carry_sources = np.empty(0, dtype=SOURCE_ID_DTYPE)  # (<T,)
    pieces: list[tuple[int, np.ndarray]] = []
    size = 0
    for source_id, tokens in articles:
        pieces.append((source_id, tokens))
        size += len(tokens) + 2
        if size >= block_tokens:
            tokens_, sources_ = _join(pieces, bos_id, eos_id, dtype)
            tokens_, sources_ = np.concatenate([carry_tokens, tokens_]), np.concatenate([carry_sources, sources_])
            yield from _blocks(tokens_, sources_, T, pad_id, final=False)
            cut = len(tokens_) // T * T
            carry_tokens, carry_sources = tokens_[cut:].copy(), sources_[cut:].copy()
            pieces, size = [], 0
    if pieces:
        tokens_, sources_ = _join(pieces, bos_id, eos_id, dtype)
        carry_tokens, carry_sources = np.concatenate([carry_tokens, tokens_]), np.concatenate([carry_sources, sources_])
    yield from _blocks(carry_tokens, carry_sources, T, pad_id, final=True)


def pack_blocks(
    articles: Iterable[tuple[int, np.ndarray]], cfg: PackingConfig, bos_id: int, eos_id: int, pad_id: int,
    dtype: np.dtype | type = np.int64, block_tokens: int = 1 << 16,
) -> Iterator[ContextBlock]:
    """articles: (source_id, token ids without specials) in document order -> blocks of contexts of
    cfg.context_length, tokens in `dtype` (every id must fit it). Blocks may share memory with each other's
    inputs; they are not modified after being yielded."""
    T, dtype = cfg.context_length, np.dtype(dtype)
    if cfg.mode == "pack":
        yield from _pack_stream(((s, np.asarray(t)) for s, t in articles), T, bos_id, eos_id, pad_id,
                                max(block_tokens, T), dtype)
        return
    for source_id, tokens in articles:  # single: every article on its own contexts, the last one padded
        tokens_, sources_ = _join([(source_id, np.asarray(tokens))], bos_id, eos_id, dtype)
        yield from _blocks(tokens_, sources_, T, pad_id, final=True)


def pack_articles(
    articles: Iterable[tuple[int, np.ndarray]], cfg: PackingConfig, bos_id: int, eos_id: int, pad_id: int,
    block_tokens: int = 1 << 16,
) -> Iterator[Context]:
    """As `pack_blocks`, one context at a time, tokens int64. Contexts of one block share memory (views)."""
    for block in pack_blocks(articles, cfg, bos_id, eos_id, pad_id, np.int64, block_tokens):
        for row in range(len(block.tokens)):
            yield Context(block.tokens[row], block.source_ids[row], block.loss_mask[row])
