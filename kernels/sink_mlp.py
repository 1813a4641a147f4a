"""The sink-MLP op: each same-source segment of a packed batch runs a SwiGLU over only its source's active
sink rows. This module owns the public op and its dispatch; the specification is `sink_mlp_ref.py`, the
Triton kernels `sink_mlp_triton.py`.
"""
from __future__ import annotations

import torch

from nulls_dist.kernels.sink_mlp_ref import check_sink_mlp_inputs, sink_mlp_ref
from nulls_dist.kernels.tiles import TilePlan

__all__ = ["IMPLS", "TilePlan", "check_sink_mlp_inputs", "sink_mlp", "sink_mlp_ref"]

IMPLS = ("auto", "triton", "torch")


def sink_mlp(
    x: torch.Tensor,
    offsets: torch.Tensor,
    seg_source: torch.Tensor,
    source_rows: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    impl: str = "auto",
    tiles: TilePlan | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Public op. `auto` picks Triton on CUDA tensors and the torch reference elsewhere. `tiles`: a precomputed
    tile plan (`kernels/tiles.py`; the model's loader builds one per batch); `validate=False` skips the index
    checks that cost a host sync (for callers whose indices were validated where they were built)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if x.is_cuda else "torch"
    if impl == "torch":
        return sink_mlp_ref(x, offsets, seg_source, source_rows, w_gate, w_up, w_down, tiles=tiles)
    from nulls_dist.kernels.sink_mlp_triton import sink_mlp_triton

    return sink_mlp_triton(x, offsets, seg_source, source_rows, w_gate, w_up, w_down, tiles=tiles,
                           validate_indices=validate)
