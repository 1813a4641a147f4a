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
) -> torch.Tensor:  # (N, D)
    """Plain-torch specification: one gather + bmm per distinct source over all of its tokens.

    Grouping by source (not by segment) keeps the number of small matmuls at U; autograd's index-based
    gather backward gives dense-shaped (P, D) table gradients, zero outside the touched rows.
    """
    check_sink_mlp_inputs(x, offsets, seg_source, source_rows, w_gate, w_up, w_down)
    num_tokens = x.shape[0]
    seg_lengths = offsets[1:] - offsets[:-1]  # (S,)
    token_source = torch.repeat_interleave(seg_source, seg_lengths, output_size=num_tokens)  # (N,)
    y = torch.zeros_like(x)
    for u in torch.unique(seg_source).tolist():
        rows = source_rows[u]
        rows = rows[rows >= 0]  # (k_u,)
        if rows.numel() == 0:
            continue
        token_index = torch.nonzero(token_source == u, as_tuple=True)[0]  # (n_u,)
        xu = x.index_select(0, token_index)  # (n_u, D)
        gate = xu @ w_gate.index_select(0, rows).t()  # (n_u, k_u)
        up = xu @ w_up.index_select(0, rows).t()  # (n_u, k_u)
        yu = (F.silu(gate) * up) @ w_down.index_select(0, rows)  # (n_u, D)
        y = y.index_add(0, token_index, yu)
    return y
