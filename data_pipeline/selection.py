"""Which sources are held out (never trained on) and which are excluded (the retrain-oracle dataset).

Random holdouts use a keyed per-source hash, not a shuffled list: whether a source is held out by
`fraction` depends only on (seed, source id), so it stays the same when the corpus grows or is re-ordered;
`count` takes the `count` sources with the smallest keys. Explicit items (ids, titles, files; see
`registry.py`) are always held out, on top of the random ones.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from nulls_dist.data_pipeline.registry import SourceRegistry

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


def _check_random(fraction: float, count: int, num_sources: int) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1], got {fraction}")
    if count < 0 or count > num_sources:
        raise ValueError(f"holdout count must be in [0, {num_sources}] (the number of sources), got {count}")
    if fraction > 0 and count > 0:
        raise ValueError(f"set holdout fraction ({fraction}) or count ({count}), not both")


def random_holdouts(id_batches: Iterable[np.ndarray], num_sources: int, fraction: float = 0.0, count: int = 0,
                    seed: int = 0) -> frozenset[int]:
    """The random part of `select_holdouts`, streamed over batches of ascending source ids (e.g. the ingest
    parts' source_id column): memory is one batch plus the `count` best keys (or the picked fraction), not the
    corpus. Same result as `select_holdouts` without explicit sources."""
    _check_random(fraction, count, num_sources)
    if fraction == 0 and count == 0:
        return frozenset()
    picked: list[np.ndarray] = []
    best_ids, best_keys = np.empty(0, np.int64), np.empty(0, np.float64)  # (<= count,)
    for ids in id_batches:
        ids = np.asarray(ids, dtype=np.int64)
        keys = source_keys(ids, seed)
        if fraction > 0:
            picked.append(ids[keys < fraction])
            continue
        cand_ids, cand_keys = np.concatenate([best_ids, ids]), np.concatenate([best_keys, keys])
        order = np.lexsort((cand_ids, cand_keys))[:count]  # by key, ties by id: a stable argsort over the ids
        best_ids, best_keys = cand_ids[order], cand_keys[order]
    return frozenset(int(i) for i in (np.concatenate(picked) if fraction > 0 else best_ids))


def select_holdouts(registry: SourceRegistry, sources: Sequence[str | int] | str | int | None = None,
                    fraction: float = 0.0, count: int = 0, seed: int = 0) -> frozenset[int]:
    """The held-out source ids: the explicit `sources`, plus either a `fraction` of all sources or
    `count` of them chosen by the seeded key. Deterministic for (registry ids, arguments)."""
    _check_random(fraction, count, len(registry))
    chosen = set() if _is_empty(sources) else set(registry.resolve(sources))
    chosen.update(random_holdouts([registry.source_ids], len(registry), fraction, count, seed))
    return frozenset(chosen)


def resolve_exclude_sources(spec: Sequence[str | int] | str | int | None,
                            registry: SourceRegistry) -> frozenset[int]:
    """`exclude_sources` (ids, titles or a file of them) -> source ids; ValueError lists every unknown item."""
    if _is_empty(spec):
        return frozenset()
    return frozenset(registry.resolve(spec))
