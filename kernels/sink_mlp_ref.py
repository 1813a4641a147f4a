"""The plain-torch specification of the sink-MLP op (the `gathered` path, the CPU path and the benchmark
baseline) and the shape/dtype contract every implementation checks. See `sink_mlp.py` for the public op.

Shape legend:
    N  tokens in the flattened batch (B*T)
    D  model width (n_embd)
    P  rows in the sink pool (one row per sink unit, in each of the three tables)
    S  segments (maximal runs of one source inside one row of the batch)
    U  distinct sources in the batch
    K  padded number of active sink rows per source (-1 marks padding)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nulls_dist.kernels.tiles import TilePlan, tile_plan_torch

# Tokens per tile when the reference builds its own plan: a tile's rows are gathered once per BM tokens, and
# BM - 1 slots per segment may be padding; 64 is the Triton kernels' default too.
REF_BLOCK_M = 64


def check_sink_mlp_inputs(
    x: torch.Tensor,
    offsets: torch.Tensor,
    seg_source: torch.Tensor,
    source_rows: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> None:
    """Raise ValueError naming the argument when shapes or dtypes do not follow the op's contract."""
    if x.dim() != 2:
        raise ValueError(f"x must be (N, D), got shape {tuple(x.shape)}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.dim() != 2 or w.shape[1] != x.shape[1]:
            raise ValueError(f"{name} must be (P, D={x.shape[1]}), got shape {tuple(w.shape)}")
        if w.shape[0] != w_gate.shape[0]:
            raise ValueError(f"{name} has {w.shape[0]} rows but w_gate has {w_gate.shape[0]}")
        if w.dtype != x.dtype:
            raise ValueError(f"{name} dtype {w.dtype} differs from x dtype {x.dtype}")
    for name, t in (("offsets", offsets), ("seg_source", seg_source), ("source_rows", source_rows)):
        if t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {t.dtype}")
    if offsets.dim() != 1 or seg_source.dim() != 1 or offsets.numel() != seg_source.numel() + 1:
        raise ValueError(
            f"offsets must be (S+1,) and seg_source (S,), got {tuple(offsets.shape)} and {tuple(seg_source.shape)}"
        )
    if source_rows.dim() != 2:
        raise ValueError(f"source_rows must be (U, K), got shape {tuple(source_rows.shape)}")


def sink_mlp_ref(
    x: torch.Tensor,  # (N, D)
    offsets: torch.Tensor,  # (S+1,) int64 token offsets of the segments
    seg_source: torch.Tensor,  # (S,) int64 index into source_rows
    source_rows: torch.Tensor,  # (U, K) int64 active rows, -1 padded
    w_gate: torch.Tensor,  # (P, D)
    w_up: torch.Tensor,  # (P, D)
    w_down: torch.Tensor,  # (P, D)
    tiles: TilePlan | None = None,
) -> torch.Tensor:  # (N, D)
    """Plain-torch specification, batched over the tiles of `tiles` (built here when not given):

        y[t] = sum_{j in rows(seg(t)), j >= 0} silu(x[t] . w_gate[j]) * (x[t] . w_up[j]) * w_down[j]

    Every tile gathers its tokens (T, BM, D) and its source's rows (T, K, D) and runs two batched matmuls; padding
    (tile slots past the tile's end, -1 rows) is masked to zero, so no index is ever data-dependent in shape:
    given the plan there is no host sync, in forward or in backward (autograd's gather backward gives dense
    (P, D) table gradients, zero outside the touched rows, accumulated in a fixed order on the CPU)."""
    check_sink_mlp_inputs(x, offsets, seg_source, source_rows, w_gate, w_up, w_down)
    num_tokens, dim = x.shape
    if num_tokens == 0 or seg_source.numel() == 0 or source_rows.shape[1] == 0:
        return x * 0 + (w_gate.sum() + w_up.sum() + w_down.sum()) * 0  # zeros, still attached to every input
    if tiles is None:
        tiles = tile_plan_torch(offsets, seg_source, source_rows.shape[0], num_tokens, REF_BLOCK_M)
    token, token_ok = tiles.token_index()  # (T, BM) each
    rows = source_rows[tiles.tile_src]  # (T, K)
    row_ok = rows >= 0
    rows = rows.clamp(min=0)
    xt = x[token] * token_ok[..., None].to(x.dtype)  # (T, BM, D)
    keep = row_ok[..., None].to(x.dtype)  # (T, K, 1)
    gate = torch.bmm(xt, (w_gate[rows] * keep).transpose(1, 2))  # (T, BM, K)
    up = torch.bmm(xt, (w_up[rows] * keep).transpose(1, 2))  # (T, BM, K)
    yt = torch.bmm(F.silu(gate) * up, w_down[rows] * keep)  # (T, BM, D)
    yt = yt * token_ok[..., None].to(yt.dtype)
    return torch.zeros_like(x).index_add(0, token.reshape(-1), yt.reshape(-1, dim))
