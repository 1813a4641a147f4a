"""The configuration of a sink assignment (`SinkAssignmentConfig`) and its validation, including the code
strategy's parameters. Standard library only, so a model config can be validated (by the launcher's capacity
plan, say) without importing torch; `nulls_dist.sinks` does the index math.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

STRATEGIES = ("reference", "uniform", "code")
ID_DTYPES = ("int64", "int32")
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class SinkAssignmentConfig:
    """How source ids map to sink units.

    k: sinks per source. None derives it: round(p_mem * pool_size) for uniform, q for code; reference ignores
       k (each unit is on with probability ~p_mem). code accepts any k <= q (k evaluation points).
    num_sources: number of sources the run will see; code picks the smallest r with q**r >= num_sources and
       refuses a config that would need r > k (capacity q**k too small). None for code means "every
       non-negative int32 id" (capacity >= 2**31).
    min_source_id: code only; source index = source_id - min_source_id (e.g. 49152 for the paper's ids).
    """

    strategy: str = "reference"
    pool_size: int = 7692
    p_mem: float = 0.013
    k: int | None = None
    layer_specific: bool = False
    seed: int = 0
    num_sources: int | None = None
    id_dtype: str = "int64"
    min_source_id: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not isinstance(self.pool_size, int) or not 1 <= self.pool_size <= INT32_MAX:
            raise ValueError(f"pool_size must be an integer in [1, 2**31), got {self.pool_size!r}")
        if isinstance(self.p_mem, bool) or not isinstance(self.p_mem, (int, float)) or not 0.0 < self.p_mem <= 1.0:
            raise ValueError(f"p_mem must be in (0, 1], got {self.p_mem!r}")
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k must be a positive integer or None, got {self.k!r}")
        if self.k is not None and self.k > self.pool_size:
            raise ValueError(f"k={self.k} is larger than the sink pool (pool_size={self.pool_size})")
        if self.id_dtype not in ID_DTYPES:
            raise ValueError(f"id_dtype must be one of {ID_DTYPES}, got {self.id_dtype!r}")
        if self.num_sources is not None and (not isinstance(self.num_sources, int) or self.num_sources < 1):
            raise ValueError(f"num_sources must be a positive integer or None, got {self.num_sources!r}")
        if not isinstance(self.min_source_id, int) or self.min_source_id < 0:
            raise ValueError(f"min_source_id must be a non-negative integer, got {self.min_source_id!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.strategy == "reference" and self.layer_specific:
            raise ValueError(
                "layer_specific=True is not available for strategy 'reference' (the published hash has no layer)"
            )
        if self.strategy == "code":
            code_parameters(self)  # raises on a pool, k or num_sources the code cannot serve


class CodeParameters(NamedTuple):
    q: int  # field size: the largest prime with q*q <= pool_size
    r: int  # polynomial degree bound: the smallest r with q**r >= num_sources
    k: int  # evaluation points = sinks per source
    capacity: int  # q**r sources


def code_parameters(cfg: SinkAssignmentConfig) -> CodeParameters:
    """The GF(q) code's parameters for `cfg`; ValueError naming the field when the code cannot serve it."""
    q = largest_prime_at_most(math.isqrt(cfg.pool_size))
    if q < 2:
        raise ValueError(f"pool_size={cfg.pool_size} is too small for strategy 'code' (needs q*q >= 4)")
    k = cfg.k if cfg.k is not None else q
    if k > q:
        raise ValueError(
            f"k={k} exceeds q={q} for strategy 'code' (pool_size={cfg.pool_size} gives q = the largest prime "
            f"with q*q <= pool_size; k must be <= q)"
        )
    needed = cfg.num_sources if cfg.num_sources is not None else 2**31  # None: every int32 id
    r = 1
    while q**r < needed:
        r += 1
    if r > k:
        # degree < r polynomials stay distinct on k points only while r <= k: capacity tops out at q**k
        raise ValueError(
            f"num_sources={cfg.num_sources} (needs capacity {needed}) exceeds the capacity q**k={q**k} of "
            f"strategy 'code' (q={q}, k={k}, pool_size={cfg.pool_size}); use a larger pool_size or k"
        )
    return CodeParameters(q, r, k, q**r)


def largest_prime_at_most(n: int) -> int:
    """The largest prime <= n (0 when there is none)."""
    for cand in range(n, 1, -1):
        if all(cand % d for d in range(2, math.isqrt(cand) + 1)):
            return cand
    return 0
