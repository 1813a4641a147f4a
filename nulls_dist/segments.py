"""Segments of a packed batch: maximal runs of one source id inside one row, the unit the gathered sink
MLP works on (design.md, "Segments").

Shape legend:
    B  rows, T  tokens per row, N = B*T flattened tokens
    S  segments, U  distinct sources in the batch
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Segments(NamedTuple):
    offsets: torch.Tensor  # (S+1,) int64: segment s covers flattened tokens [offsets[s], offsets[s+1])
    seg_source: torch.Tensor  # (S,) int64 index into `sources`
    sources: torch.Tensor  # (U,) int64 distinct source ids, ascending

    @property
    def num_segments(self) -> int:
        return self.seg_source.numel()

    def token_source_index(self) -> torch.Tensor:  # (N,) int64 index into `sources`
        lengths = self.offsets[1:] - self.offsets[:-1]  # (S,)
        return torch.repeat_interleave(self.seg_source, lengths, output_size=int(self.offsets[-1]))


def source_segments(source_ids: torch.Tensor) -> Segments:
    """Split a (B, T) batch of per-token source ids into same-source segments (no loop over tokens).

    A segment never crosses a row boundary, even when the next row starts with the same source.
    """
    if source_ids.dim() != 2:
        raise ValueError(f"source_ids must be (B, T), got shape {tuple(source_ids.shape)}")
    row_len = source_ids.shape[1]
    flat = source_ids.reshape(-1).to(torch.int64)  # (N,)
    num_tokens = flat.numel()
    if num_tokens == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=flat.device)
        return Segments(torch.zeros(1, dtype=torch.int64, device=flat.device), empty, empty)
    is_start = torch.ones(num_tokens, dtype=torch.bool, device=flat.device)  # (N,)
    is_start[1:] = flat[1:] != flat[:-1]
    is_start[::row_len] = True  # every row opens a segment
    starts = torch.nonzero(is_start, as_tuple=True)[0]  # (S,)
    offsets = torch.cat([starts, starts.new_tensor([num_tokens])])  # (S+1,)
    sources, seg_source = torch.unique(flat[starts], sorted=True, return_inverse=True)  # (U,), (S,)
    return Segments(offsets, seg_source, sources)
