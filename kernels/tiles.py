"""The tile plan of a packed batch: the index object the sink-MLP op's forward and backward share (like
scattermoe's routing plan), built once per batch -- in numpy by the data loader's workers (`tile_plan_numpy`,
exact size) or with torch on the batch's device (`tile_plan_torch`, a static size bound, no host sync) -- and
used by both implementations (the Triton kernels and the batched torch reference).

A tile is up to `block_m` consecutive tokens of ONE segment; tiles never straddle segments, so a tile has one
source. Empty tiles (`start == end`) pad the torch-built plan to its static size and do nothing.

Shape legend:
    N  tokens   S  segments   U  distinct sources   T  tiles   BM  block_m (tokens per tile)
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass(frozen=True)
class TilePlan:
    """Index tensors (int64, all on one device) shared by the forward and backward launches."""

    tile_start: torch.Tensor  # (T,) first token of each tile; start == end marks an empty tile
    tile_end: torch.Tensor  # (T,) end of the tile's segment (exclusive)
    tile_src: torch.Tensor  # (T,) source index of each tile
    seg_order: torch.Tensor  # (S,) segments grouped by source, ascending within a source
    src_seg: torch.Tensor  # (U+1,) source u owns seg_order[src_seg[u]:src_seg[u+1]]
    block_m: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.tile_start, self.tile_end, self.tile_src, self.seg_order, self.src_seg

    def to(self, device, non_blocking: bool = False) -> "TilePlan":
        return TilePlan(*(t.to(device, non_blocking=non_blocking) for t in self.tensors()), self.block_m)

    def pin_memory(self) -> "TilePlan":
        return TilePlan(*(t.pin_memory() for t in self.tensors()), self.block_m)

    @property
    def num_tiles(self) -> int:
        return self.tile_start.shape[0]

    def token_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, BM) token indices of every tile slot and (T, BM) bool validity (slots past a tile's end)."""
        slot = torch.arange(self.block_m, device=self.tile_start.device)  # (BM,)
        index = self.tile_start[:, None] + slot[None, :]  # (T, BM)
        valid = index < self.tile_end[:, None]
        return torch.where(valid, index, 0), valid


TILE_FIELDS = tuple(f.name for f in fields(TilePlan))


def tile_plan_numpy(offsets: np.ndarray, seg_source: np.ndarray, num_sources: int, block_m: int) -> TilePlan:
    """Exact plan (no empty tiles) from host arrays: offsets (S+1,), seg_source (S,) int64."""
    offsets = np.asarray(offsets, dtype=np.int64)
    seg_source = np.asarray(seg_source, dtype=np.int64)
    seg_len = offsets[1:] - offsets[:-1]  # (S,)
    tiles_per_seg = -(-seg_len // block_m)  # (S,) ceil
    tile_seg = np.repeat(np.arange(len(seg_len)), tiles_per_seg)  # (T,)
    first_tile = np.repeat(np.cumsum(tiles_per_seg) - tiles_per_seg, tiles_per_seg)  # (T,)
    tile_start = offsets[tile_seg] + (np.arange(len(tile_seg)) - first_tile) * block_m
    tile_end = offsets[tile_seg + 1]
    seg_order = np.argsort(seg_source, kind="stable")
    src_seg = np.searchsorted(seg_source[seg_order], np.arange(num_sources + 1))
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return TilePlan(as_t(tile_start), as_t(tile_end), as_t(seg_source[tile_seg]), as_t(seg_order), as_t(src_seg),
                    block_m)


def tile_plan_torch(offsets: torch.Tensor, seg_source: torch.Tensor, num_sources: int, num_tokens: int,
                    block_m: int) -> TilePlan:
    """The same plan from device tensors without a host sync: sum_s ceil(len_s / BM) <= N / BM + S is a static
    bound on the number of tiles, so the plan has that many and the spare ones are empty."""
    num_segments = seg_source.numel()
    seg_len = offsets[1:] - offsets[:-1]  # (S,)
    tiles_per_seg = (seg_len + block_m - 1) // block_m  # (S,)
    tile_cum = torch.cumsum(tiles_per_seg, 0)  # (S,)
    num_tiles = -(-num_tokens // block_m) + num_segments
    tile = torch.arange(num_tiles, device=offsets.device)  # (T,)
    tile_seg = torch.searchsorted(tile_cum, tile, right=True)  # (T,)
    live = tile_seg < num_segments
    tile_seg = tile_seg.clamp(max=max(num_segments - 1, 0))
    first_tile = tile_cum[tile_seg] - tiles_per_seg[tile_seg]
    tile_end = torch.where(live, offsets[tile_seg + 1], 0)
    tile_start = torch.where(live, offsets[tile_seg] + (tile - first_tile) * block_m, 0)
    seg_order = torch.argsort(seg_source, stable=True)  # (S,)
    # source u's segments are seg_order[src_seg[u]:src_seg[u+1]]: boundaries of the sorted source indices
    src_seg = torch.searchsorted(seg_source[seg_order], torch.arange(num_sources + 1, device=offsets.device))
    return TilePlan(tile_start.contiguous(), tile_end.contiguous(), seg_source[tile_seg].contiguous(), seg_order,
                    src_seg, block_m)
