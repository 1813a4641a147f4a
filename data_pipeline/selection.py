"""Which sources are held out (never trained on) and which are excluded (the retrain-oracle dataset).

Random holdouts use a keyed per-source hash, not a shuffled list: whether a source is held out by
`fraction` depends only on (seed, source id), so it stays the same when the corpus grows or is re-ordered;
`count` takes the `count` sources with the smallest keys. Explicit items (ids, titles, files; see
`registry.py`) are always held out, on top of the random ones.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipeline.registry import SourceRegistry

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _is_empty(spec) -> bool:
    return spec is None or (isinstance(spec, (str, list, tuple)) and len(spec) == 0)


def source_keys(source_ids: np.ndarray, seed: int) -> np.ndarray:
    """(n,) int64 ids -> (n,) float64 in [0, 1): a splitmix64 hash of (seed, id), the same on every machine."""
    z = np.asarray(source_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def select_holdouts(registry: SourceRegistry, sources: Sequence[str | int] | str | int | None = None,
                    fraction: float = 0.0, count: int = 0, seed: int = 0) -> frozenset[int]:
    """The held-out source ids: the explicit `sources`, plus either a `fraction` of all sources or
    `count` of them chosen by the seeded key. Deterministic for (registry ids, arguments)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1], got {fraction}")
    if count < 0 or count > len(registry):
        raise ValueError(f"holdout count must be in [0, {len(registry)}] (the number of sources), got {count}")
    if fraction > 0 and count > 0:
        raise ValueError(f"set holdout fraction ({fraction}) or count ({count}), not both")
    chosen = set() if _is_empty(sources) else set(registry.resolve(sources))
    ids = registry.source_ids
    if fraction > 0 or count > 0:
        keys = source_keys(ids, seed)
        if fraction > 0:
            picked = ids[keys < fraction]
        else:
            picked = ids[np.argsort(keys, kind="stable")[:count]]
        chosen.update(int(i) for i in picked)
    return frozenset(chosen)


def resolve_exclude_sources(spec: Sequence[str | int] | str | int | None,
                            registry: SourceRegistry) -> frozenset[int]:
    """`exclude_sources` (ids, titles or a file of them) -> source ids; ValueError lists every unknown item."""
    if _is_empty(spec):
        return frozenset()
    return frozenset(registry.resolve(spec))
