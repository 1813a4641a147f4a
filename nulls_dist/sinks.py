"""Sink assignment: source ids -> each source's active sink units (0-based indices into the sink pool).

One abstraction, three strategies (see docs/sinks.md):
    reference  the published NULLs mask contract, bit-exact (loads released checkpoints)
    uniform    exactly k distinct sinks per source, drawn from a splitmix64 stream seeded by the source
    code       a constant-weight code from polynomials over GF(q): two sources share at most r-1 sinks

Everything is computed from the id on the fly (no per-source table) with integer arithmetic only, so the result
is the same in every process and on every machine. Work is chunked so temporaries stay a few tens of MiB.
Results come back on the device of `source_ids` (uniform computes on the CPU, the others where the ids are).

Shape legend:
    S  source ids in one call
    P  sink pool size (pool_size)
    K  sinks per returned row (fixed k for uniform/code, widest source in the call for reference)
    M  candidate draws per source (uniform)
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from nulls_dist import sink_hash
from nulls_dist.sink_config import (ID_DTYPES, INT32_MAX, STRATEGIES, SinkAssignmentConfig, code_parameters,
                                    largest_prime_at_most)

__all__ = ["ID_DTYPES", "STRATEGIES", "SinkAssignment", "SinkAssignmentConfig", "largest_prime_at_most",
           "mask_to_rows", "rows_to_mask"]

VERSIONS = {"reference": "nulls-published-1", "uniform": "splitmix64-first-k-1", "code": "gf-poly-1"}
# Elements per temporary (S_chunk x P, S_chunk x M or S_chunk x k): 2**21 int64 = 16 MiB. On the dev box
# (65536 paper ids) 2**18..2**21 ran equally fast and 2**14 ~30% slower (per-call overhead).
CHUNK_ELEMENTS = 1 << 21


class SinkAssignment:
    """Maps source ids to their active sink units; see the module docstring for the strategies."""

    def __init__(self, cfg: SinkAssignmentConfig):
        self.cfg = cfg
        self.q: int | None = None
        self.r: int | None = None
        self.capacity: int | None = None
        if cfg.strategy == "reference":
            self.k = None
            self._ref_table = sink_hash.reference_table(cfg.pool_size)  # (P,) int64
            self._ref_threshold = sink_hash.reference_threshold(cfg.p_mem)
        elif cfg.strategy == "uniform":
            self.k = cfg.k if cfg.k is not None else max(1, min(cfg.pool_size, round(cfg.p_mem * cfg.pool_size)))
        else:
            self._init_code()

    # ----------------------------------------------------------------------------------------------- set-up
    def _init_code(self) -> None:
        self.q, self.r, self.k, self.capacity = code_parameters(self.cfg)
        self._code_affine = sink_hash.code_affine(self.q, self.r, self.cfg.seed, self.cfg.layer_specific)

    # ----------------------------------------------------------------------------------------------- public
    def rows(self, source_ids: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """(S,) integer source ids -> (S, K) int64 ascending active pool indices, right-padded with -1."""
        source_ids = self._check_ids(source_ids)
        num = source_ids.numel()
        if self.cfg.strategy == "reference":
            return self._reference_rows(source_ids)
        step = max(1, CHUNK_ELEMENTS // max(1, self._draws_per_source()))
        fn = self._uniform_rows if self.cfg.strategy == "uniform" else self._code_rows
        if num == 0:
            return torch.empty(0, self.k, dtype=torch.int64, device=source_ids.device)
        parts = [fn(source_ids[i : i + step], layer) for i in range(0, num, step)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def mask(self, source_ids: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """(S,) integer source ids -> (S, pool_size) bool, True where the sink unit is active."""
        source_ids = self._check_ids(source_ids)
        if self.cfg.strategy == "reference":
            step = max(1, CHUNK_ELEMENTS // self.cfg.pool_size)
            parts = [self._reference_mask(source_ids[i : i + step]) for i in range(0, source_ids.numel(), step)]
            if not parts:
                return torch.zeros(0, self.cfg.pool_size, dtype=torch.bool, device=source_ids.device)
            return torch.cat(parts)
        return rows_to_mask(self.rows(source_ids, layer), self.cfg.pool_size)

    def describe(self) -> dict:
        """JSON-ready description (stored beside checkpoints so an assignment can be re-derived and compared)."""
        cfg = self.cfg
        out = {"strategy": cfg.strategy, "version": VERSIONS[cfg.strategy], **asdict(cfg)}
        out.update(k=self.k, q=self.q, r=self.r, capacity=self.capacity)
        if cfg.strategy == "reference":
            out["expected_k"] = cfg.p_mem * cfg.pool_size
            out["threshold"] = self._ref_threshold
        if cfg.strategy == "code":
            out["max_shared_sinks"] = self.r - 1
            out["units_used"] = self.k * self.q
        return out

    # ----------------------------------------------------------------------------------------------- checks
    def _check_ids(self, source_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(source_ids, torch.Tensor):
            source_ids = torch.as_tensor(source_ids)
        if source_ids.dim() != 1:
            raise ValueError(f"source_ids must be a 1-D tensor (S,), got shape {tuple(source_ids.shape)}")
        if source_ids.dtype.is_floating_point or source_ids.dtype == torch.bool or source_ids.is_complex():
            raise ValueError(f"source_ids must be an integer tensor, got dtype {source_ids.dtype}")
        source_ids = source_ids.to(torch.int64)
        if source_ids.numel() == 0:
            return source_ids
        lo, hi = int(source_ids.min()), int(source_ids.max())
        if lo < 0:
            raise ValueError(f"source_ids must be non-negative, got source id {lo}")
        if self.cfg.id_dtype == "int32" and hi > INT32_MAX:
            raise ValueError(f"source id {hi} does not fit id_dtype='int32' (max {INT32_MAX})")
        if self.cfg.strategy == "code":
            if lo < self.cfg.min_source_id:
                raise ValueError(f"source id {lo} is below min_source_id={self.cfg.min_source_id}")
            if hi - self.cfg.min_source_id >= self.capacity:
                raise ValueError(
                    f"source id {hi} is beyond the code's capacity q**r={self.capacity} "
                    f"(min_source_id={self.cfg.min_source_id}); set num_sources to cover it"
                )
        return source_ids

    def _draws_per_source(self) -> int:
        if self.cfg.strategy == "uniform":
            return sink_hash.uniform_num_draws(self.k, self.cfg.pool_size)
        return self.k

    # ----------------------------------------------------------------------------------------------- strategies
    def _reference_mask(self, source_ids: torch.Tensor) -> torch.Tensor:  # (S,) -> (S, P) bool
        table = self._ref_table.to(source_ids.device)
        return sink_hash.reference_mask(source_ids, table, self._ref_threshold, self.cfg.id_dtype)

    def _reference_rows(self, source_ids: torch.Tensor) -> torch.Tensor:  # (S,) -> (S, K)
        pool = self.cfg.pool_size
        step = max(1, CHUNK_ELEMENTS // pool)
        parts, widths = [], []
        for i in range(0, source_ids.numel(), step):
            rows = mask_to_rows(self._reference_mask(source_ids[i : i + step]))
            parts.append(rows)
            widths.append(rows.shape[1])
        if not parts:
            return torch.empty(0, 0, dtype=torch.int64, device=source_ids.device)
        width = max(widths)
        parts = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=-1) for p in parts]
        return torch.cat(parts)

    def _uniform_rows(self, source_ids: torch.Tensor, layer: int) -> torch.Tensor:  # (S,) -> (S, k)
        layer_key = layer if self.cfg.layer_specific else 0
        return sink_hash.uniform_rows(source_ids, self.k, self.cfg.pool_size, self.cfg.seed, layer_key)

    def _code_rows(self, source_ids: torch.Tensor, layer: int) -> torch.Tensor:  # (S,) -> (S, k)
        index = source_ids - self.cfg.min_source_id
        affine = self._code_affine(layer if self.cfg.layer_specific else 0)
        return sink_hash.code_rows(index, self.q, self.r, self.k, affine)


# --------------------------------------------------------------------------------------------------- helpers
def mask_to_rows(mask: torch.Tensor) -> torch.Tensor:
    """(S, P) bool -> (S, K) int64 ascending active indices, right-padded with -1; K = widest row."""
    num, pool = mask.shape
    if mask.device.type == "cpu" and pool:
        # numpy's scan of a bool array is ~1.8x torch's 2-D nonzero on the CPU (reference masks of 272 paper
        # ids: 2.0 against 3.6 ns per (id, unit), one thread, 2-core x86_64 VM), and the flat index splits exactly
        flat = torch.from_numpy(np.flatnonzero(mask.contiguous().numpy()))
        row, col = flat // pool, flat % pool  # row-major: grouped by row, ascending col
    else:
        row, col = mask.nonzero(as_tuple=True)  # row-major: grouped by row, ascending col
    counts = torch.bincount(row, minlength=num)  # (S,); cheaper than mask.sum for sparse masks
    width = int(counts.max()) if num else 0
    out = torch.full((num, width), -1, dtype=torch.int64, device=mask.device)
    starts = torch.cumsum(counts, 0) - counts  # (S,)
    pos = torch.arange(row.numel(), device=mask.device) - starts[row]
    out[row, pos] = col
    return out


def rows_to_mask(rows: torch.Tensor, pool_size: int) -> torch.Tensor:
    """(S, K) -1 padded indices -> (S, pool_size) bool."""
    mask = torch.zeros(rows.shape[0], pool_size + 1, dtype=torch.bool, device=rows.device)
    mask.scatter_(1, torch.where(rows < 0, pool_size, rows), True)
    return mask[:, :pool_size].contiguous()
