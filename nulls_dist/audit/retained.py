"""Survivors' retained share of their sinks under a cumulative forget set, for the certificate.

A survivor is a trained source of the manifest outside the forget set. Its retained share is the part of its
sink rows (summed over layers) that no forgotten source holds: what `sink_off` still lets it use (and what
`hard` leaves non-zero). The certificate records the mean, the worst (with its source id) and the 1st
percentile over the survivors (`forget_budget.share_summary`).

- `exact` while the manifest holds at most `exact_budget` survivors: one streaming pass over the manifest's
  `sinks` column, every survivor counted (their shares are kept, 8 bytes each, for the percentile).
- `sampled` beyond it: a seeded sample of `sample_size` survivors (drawn from the manifest's `source_id` and
  `trained` columns only) whose sinks come from the manifest's sink assignment (`SinkKeys`, the code that wrote
  the manifest's `sinks`); the certificate states the method, sample size and seed, and `verify` redraws the
  same sample.

Measured cost is in docs/forget_budget.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from nulls_dist.audit.collateral import ForgetSinks
from nulls_dist.audit.manifest import SinkKeys, iter_manifest, read_index, sinks_array
from nulls_dist.config import NullConfig
from nulls_dist.forget_budget import retained_shares, share_summary

MEANING = ("trained sources outside the cumulative forget set: the share of their sink rows (summed over layers) "
           "that no forgotten source holds")


@dataclass(frozen=True)
class RetainedShareOptions:
    exact_budget: int = 2_000_000  # survivors counted exactly (16 MB of shares); beyond it, a sample
    sample_size: int = 100_000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("exact_budget", "sample_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def _forgotten_rows(forget: ForgetSinks, layers_share_sinks: bool) -> np.ndarray:
    """(L', P) bool: the forgotten rows in the layout of the manifest's `sinks` (L' = 1 when layers share)."""
    return forget.union[:1] if layers_share_sinks else forget.union


def _survivors(manifest_dir: Path, forget_ids: np.ndarray) -> np.ndarray:
    parts = []
    for batch in iter_manifest(manifest_dir, columns=["source_id", "trained"]):
        ids = batch.column("source_id").to_numpy()
        keep = batch.column("trained").to_numpy(zero_copy_only=False) & ~np.isin(ids, forget_ids)
        parts.append(ids[keep])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _exact(manifest_dir: Path, forget: ForgetSinks, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shares, ids = [], []
    for batch in iter_manifest(manifest_dir, columns=["source_id", "trained", "sinks"]):
        sid = batch.column("source_id").to_numpy()
        keep = batch.column("trained").to_numpy(zero_copy_only=False) & ~np.isin(sid, forget.source_ids)
        if not keep.any():
            continue
        sinks = sinks_array(batch.column("sinks").filter(pa.array(keep)))  # (s, L', K)
        shares.append(retained_shares(sinks, rows)[0])
        ids.append(sid[keep])
    if not shares:
        return np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate(shares), np.concatenate(ids)


def _sampled(index: dict[str, Any], survivors: np.ndarray, rows: np.ndarray,
             opts: RetainedShareOptions) -> tuple[np.ndarray, np.ndarray]:
    size = min(opts.sample_size, len(survivors))
    picked = np.sort(np.random.default_rng(opts.seed).choice(survivors, size=size, replace=False))
    keys = SinkKeys(NullConfig(**index["model_config"]))
    shares = []
    for start in range(0, len(picked), 65_536):
        sinks = keys.rows(picked[start:start + 65_536])  # (s, K) or (s, L, K) when layer-specific
        shares.append(retained_shares(sinks, rows)[0])
    return np.concatenate(shares), picked


def survivors_retained_share(manifest_dir: str | Path, forget: ForgetSinks,
                             opts: RetainedShareOptions | None = None) -> dict[str, Any]:
    """The certificate's `survivors_retained_share`: method, sizes and the summary of the survivors' shares."""
    opts = opts or RetainedShareOptions()
    manifest_dir = Path(manifest_dir)
    index = read_index(manifest_dir)
    rows = _forgotten_rows(forget, bool(index["layers_share_sinks"]))
    survivors = _survivors(manifest_dir, forget.source_ids)
    out: dict[str, Any] = {"meaning": MEANING, "num_forgotten": int(len(forget.source_ids)),
                           "num_survivors": int(len(survivors))}
    if len(survivors) <= opts.exact_budget:
        shares, ids = _exact(manifest_dir, forget, rows)
        out.update(method="exact")
    else:
        shares, ids = _sampled(index, survivors, rows, opts)
        out.update(method="sampled", sample_size=int(len(ids)), seed=opts.seed,
                   exact_budget=opts.exact_budget)
    return {**out, **share_summary(shares, ids)}
