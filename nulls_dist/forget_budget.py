"""The forget budget: how much of its sinks a surviving source keeps once other sources are forgotten.

In `sink_off` a surviving source uses its own sinks minus the union of every forgotten source's sinks
(docs/nulls_facts.md), so each forget request costs every survivor some capacity. A source with k of R rows per
layer keeps, after F forgets of sources with k rows each, about

    exp(-F k / R)              (the analytic figure the docs quote)
    (1 - k / R) ** F           (exact in expectation when every source holds a uniform k-subset)

of its rows. This module owns that arithmetic and the measured counterpart: the retained share of concrete
survivors against a concrete forgotten set, and its summary (mean, worst, a low percentile). It is numpy and
the standard library only, so the launcher's capacity plan imports it without torch; callers hand it sink rows
as numpy arrays (from `SinkAssignment.rows` or a manifest's `sinks` column).

Shape legend:
    S  surviving sources       K  sinks per source (-1 padded)
    L  layers (L' = 1 when every layer uses the same mask)       P  sink rows per layer
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

FORGET_COUNTS = (1, 10, 100, 1_000, 10_000)  # the points nulls-sinks --forget-budget reports by default
LOW_PERCENTILE = 1.0  # "low percentile" of survivors' retained share: the 1st percentile
LOW_KEY = f"p{LOW_PERCENTILE:g}"  # its key in summaries (certificates, JSON): "p1"


def analytic_retained_share(num_forgotten: int, k: float, rows: int) -> float:
    """exp(-F k / R): a survivor's expected kept share of its sinks after F forgets (k sinks of R rows each)."""
    return math.exp(-num_forgotten * k / rows)


def uniform_retained_share(num_forgotten: int, k: float, rows: int) -> float:
    """(1 - k/R)**F: the expectation when every forgotten source holds a uniform k-subset of the R rows."""
    return (1.0 - k / rows) ** num_forgotten


def retained_shares(sinks: np.ndarray, forgotten: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each survivor's kept share of its sink rows, summed over layers.

    sinks: (S, K) or (S, L', K) int pool indices, -1 padded (L' = 1: the same units in every layer);
    forgotten: (P,) or (L', P) bool, True where a row belongs to a forgotten source.
    Returns (shares (S,) float64, has_sinks (S,) bool); a source without any sink has share nan.
    """
    if sinks.ndim == 2:
        sinks = sinks[:, None, :]  # (S, 1, K)
    if forgotten.ndim == 1:
        forgotten = forgotten[None, :]  # (1, P)
    if forgotten.shape[0] != sinks.shape[1]:
        raise ValueError(f"forgotten rows cover {forgotten.shape[0]} layers, the sinks {sinks.shape[1]}")
    pool = forgotten.shape[1]
    padded = np.concatenate([forgotten, np.zeros((forgotten.shape[0], 1), dtype=bool)], axis=1)  # (L', P+1)
    valid = sinks >= 0  # (S, L', K)
    layer = np.arange(sinks.shape[1])[None, :, None]
    lost = padded[layer, np.where(valid, sinks, pool)]  # (S, L', K): padding maps to the always-False column
    total = valid.sum(axis=(1, 2))  # (S,)
    kept = total - lost.sum(axis=(1, 2))
    has = total > 0
    shares = np.full(len(total), np.nan)
    shares[has] = kept[has] / total[has]
    return shares, has


def share_summary(shares: np.ndarray, ids: np.ndarray | None = None) -> dict:
    """mean, worst (min, with its source id when `ids` (S,) is given) and the LOW_PERCENTILE-th percentile of
    (S,) retained shares (nan entries, sources without sinks, are left out and counted)."""
    keep = ~np.isnan(shares)
    values = shares[keep]
    out = {"num": int(keep.sum()), "num_without_sinks": int((~keep).sum())}
    if not len(values):
        return {**out, "mean": None, "min": None, LOW_KEY: None}
    worst = int(np.argmin(values))
    out.update(mean=float(values.mean()), min=float(values[worst]),
               **{LOW_KEY: float(np.percentile(values, LOW_PERCENTILE))})
    if ids is not None:
        out["min_source_id"] = int(ids[keep][worst])
    return out


def sampled_budget(rows_of: Callable[[np.ndarray], np.ndarray], pool_rows: int, first_id: int, num_ids: int,
                   forget_counts: tuple[int, ...] = FORGET_COUNTS, num_survivors: int = 10_000, seed: int = 0,
                   chunk: int = 8192) -> dict:
    """Survivors' retained share measured on the real assignment.

    From the ids [first_id, first_id + num_ids) a seeded sample of max(forget_counts) sources is forgotten in
    order (nested: the first F of them are the forget set at F, as successive requests would build it) and
    `num_survivors` other sampled sources are the survivors. `rows_of(ids (n,)) -> (n, K)` gives the sinks
    (-1 padded) of one layer. Returns the survivors' mean k, the sample sizes and per F the measured summary.
    """
    counts = sorted(set(int(f) for f in forget_counts))
    if not counts or counts[0] < 1:
        raise ValueError(f"forget counts must be positive integers, got {list(forget_counts)}")
    most = counts[-1]
    if most >= num_ids:
        raise ValueError(f"the largest forget count {most} needs more than the {num_ids} source ids to draw from")
    num_survivors = min(num_survivors, num_ids - most)
    if num_survivors < 1:
        raise ValueError(f"num_survivors must be positive, got {num_survivors}")
    rng = np.random.default_rng(seed)
    picked = rng.choice(num_ids, size=most + num_survivors, replace=False).astype(np.int64) + first_id
    forget_ids, survivor_ids = picked[:most], np.sort(picked[most:])
    survivors = rows_of(survivor_ids)  # (S, K)
    union = np.zeros(pool_rows, dtype=bool)  # (P,)
    points, done = [], 0
    for f in counts:
        for start in range(done, f, chunk):
            rows = rows_of(forget_ids[start:min(f, start + chunk)])
            union[rows[rows >= 0]] = True
        done = f
        shares, _ = retained_shares(survivors, union)
        points.append({"forgotten": f, "forgotten_rows": int(union.sum()),
                       "sampled": share_summary(shares, survivor_ids)})
    k = float((survivors >= 0).sum(axis=1).mean())
    return {"num_survivors": num_survivors, "seed": seed, "id_range": [first_id, first_id + num_ids],
            "mean_k": k, "points": points}
