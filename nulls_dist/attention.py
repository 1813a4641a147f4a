"""Attention of the NULL model: causal AND same-source (a packed context never attends across sources), with
grouped-query attention done natively (no repeated K/V). The mask is built once per forward, outside the
layers, and shared by all of them (`build_mask`):

- `causal`: every row is one source and there is no cache offset: SDPA's `is_causal` (flash-capable);
- `flex`: FlexAttention's block mask from the per-token source ids (`create_block_mask`): only the tiles a
  source's tokens open are computed. GPU training uses it; torch 2.13's FlexAttention has no CPU backward, so on
  the CPU it serves forward passes only;
- `dense`: a (B, 1, T, L) boolean mask into SDPA: the CPU training path and the oracle the others are tested
  against;
- `none`: every query may see every key (one-token decode steps of a single-source row).

Shape legend: B rows, H heads, G query groups, T queries, L keys, hs head size.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

ATTENTION_IMPLS = ("auto", "sdpa", "flex")


@dataclass(frozen=True)
class AttentionMask:
    kind: str  # "causal" | "dense" | "flex" | "none"
    value: Any = None  # dense: (B, 1, T, L) bool; flex: a BlockMask


def same_source_causal_mask(
    source_ids: torch.Tensor,  # (B, T) query tokens' source ids
    key_source_ids: torch.Tensor | None = None,  # (B, L) key tokens' source ids (default: the queries)
    query_pos: torch.Tensor | None = None,  # (T,) positions of the queries among the keys (default: the last T)
) -> torch.Tensor:  # (B, 1, T, L) bool, True = may attend
    """Causal AND same-source: token t sees key j iff j <= pos(t) and both carry the same source id."""
    if key_source_ids is None:
        key_source_ids = source_ids
    num_keys, num_queries = key_source_ids.shape[1], source_ids.shape[1]
    device = source_ids.device
    if query_pos is None:
        query_pos = torch.arange(num_keys - num_queries, num_keys, device=device)
    key_pos = torch.arange(num_keys, device=device)
    causal = key_pos[None, :] <= query_pos[:, None]  # (T, L)
    same = source_ids[:, :, None] == key_source_ids[:, None, :]  # (B, T, L)
    return (same & causal[None])[:, None]


def flex_block_mask(source_ids: torch.Tensor, key_source_ids: torch.Tensor | None = None,
                    first_query_pos: int | None = None):
    """FlexAttention BlockMask of the same-source causal mask; queries at positions first_query_pos + t."""
    from torch.nn.attention.flex_attention import create_block_mask

    key_source_ids = source_ids if key_source_ids is None else key_source_ids
    num_rows, num_queries = source_ids.shape
    num_keys = key_source_ids.shape[1]
    offset = num_keys - num_queries if first_query_pos is None else first_query_pos

    def same_source_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + offset) & (source_ids[b, q_idx] == key_source_ids[b, kv_idx])

    return create_block_mask(same_source_causal, num_rows, None, num_queries, num_keys, device=source_ids.device)


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return impl


def build_mask(impl: str, source_ids: torch.Tensor | None, single_source_rows: bool, num_queries: int,
               num_keys: int, first_query_pos: int, key_source_ids: torch.Tensor | None = None,
               device: torch.device | None = None) -> AttentionMask:
    """The forward's mask (see the module docstring); `source_ids` (B, T) may be None for single-source rows."""
    if single_source_rows or source_ids is None:
        if num_queries == num_keys and first_query_pos == 0:
            return AttentionMask("causal")
        if num_queries == 1 and first_query_pos == num_keys - 1:
            return AttentionMask("none")
        pos = torch.arange(first_query_pos, first_query_pos + num_queries, device=device)
        causal = torch.arange(num_keys, device=device)[None, :] <= pos[:, None]  # (T, L)
        return AttentionMask("dense", causal[None, None])
    if resolve_impl(impl, source_ids.device) == "flex":
        return AttentionMask("flex", flex_block_mask(source_ids, key_source_ids, first_query_pos))
    pos = torch.arange(first_query_pos, first_query_pos + num_queries, device=source_ids.device)
    return AttentionMask("dense", same_source_causal_mask(source_ids, key_source_ids, pos))


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """q (B, H, T, hs), k/v (B, G, L, hs) -> (B, H, T, hs); G divides H (grouped-query attention)."""
    gqa = q.shape[1] != k.shape[1]
    if mask.kind == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        # compiled on CUDA (the fused kernel); eager elsewhere (the CPU reference implementation, forward only)
        fn = _compiled_flex() if q.is_cuda else flex_attention
        return fn(q, k, v, block_mask=mask.value, enable_gqa=gqa)
    if mask.kind == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.value if mask.kind == "dense" else None,
                                          enable_gqa=gqa)
