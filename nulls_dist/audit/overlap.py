"""Sink-overlap statistics between sources, in bounded memory.

A source's sinks are a set of "sink keys": the pool unit when every layer uses the same mask, or
`layer * n_sink + unit` when the assignment is layer-specific. For each queried source we report how many
trained sources share at least one sink key with it, the largest number shared with one other source, and
which source that is (the smallest id among ties).

Two methods:
- `exact`: sparse products `Q_chunk @ A^T` over chunks of queried sources, where A is the CSR incidence
  matrix (trained sources x sink keys). Work is sum_u load_u^2 and grows quadratically with the number of
  sources when overlaps are dense (6.4M sources x 100 sinks: ~5e13), so it is used only under a budget.
- `sampled`: the same statistics against a seeded uniform sample of M trained sources. `num_sharing` is then
  the sample fraction scaled to all trained sources (an unbiased estimate) and the largest overlap is the
  largest within the sample (a lower bound); records carry `overlap_exact = false`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

# The sampled reference is held as a dense (Q, R) table and summed with torch's embedding_bag (K row reads
# per source, multi-threaded); that needs Q*R entries, so it is used while Q stays under this many times K
# (debug pool 448 x 1024 refs = 0.9 MB; paper pool 7692 x 1024 = 16 MB).
_DENSE_ADVANTAGE = 200
_DENSE_MAX_ENTRIES = 1 << 26  # 128 MB of float16
# The table is float16: its entries are 0/1 and a bag sums at most its own length, and float16 holds every
# integer up to 2048 exactly, so the counts are exact for bags up to that length (longer ones use float32).
# Reading half the bytes of float32 made the bag sums 3.4x faster at the paper pool (7.6 against 25.6 us per
# source, 1024 refs, one thread, 2-core x86_64 VM): the sums are bound by reading K table rows per source.
_FP16_MAX_BAG = 2048


@dataclass
class OverlapStats:
    num_sharing: np.ndarray  # (c,) int64
    max_overlap: np.ndarray  # (c,) int32
    max_overlap_source: np.ndarray  # (c,) int64, -1 when no source shares a sink


def incidence(keys: np.ndarray, num_keys: int) -> sp.csr_matrix:
    """CSR (S, num_keys) int32 0/1 matrix from a (S, K) key array padded with -1."""
    valid = keys >= 0  # (S, K)
    indptr = np.zeros(keys.shape[0] + 1, dtype=np.int64)
    np.cumsum(valid.sum(axis=1), out=indptr[1:])
    cols = keys[valid].astype(np.int32)
    data = np.ones(cols.shape[0], dtype=np.float32)
    return sp.csr_matrix((data, cols, indptr), shape=(keys.shape[0], num_keys))


def pair_work(key_loads: np.ndarray) -> int:
    """Incidences an exact all-pairs product touches: sum over keys of load^2."""
    loads = key_loads.astype(np.float64)
    return int((loads * loads).sum())


def _reduce_rows(counts: sp.csr_matrix, query_ids: np.ndarray, ref_ids: np.ndarray) -> OverlapStats:
    """Per row of a (c, R) shared-count matrix: non-self sharers, max shared, its smallest-id partner."""
    counts = counts.tocsr()
    counts.sum_duplicates()
    rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))  # (nnz,)
    partner = ref_ids[counts.indices]  # (nnz,)
    data = np.where(partner == query_ids[rows], 0, counts.data).astype(np.int64)  # self shares nothing
    c = counts.shape[0]
    num_sharing = np.bincount(rows, weights=(data > 0), minlength=c).astype(np.int64)
    max_overlap = np.zeros(c, dtype=np.int64)
    np.maximum.at(max_overlap, rows, data)
    is_max = (data == max_overlap[rows]) & (data > 0)
    best = np.full(c, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(best, rows[is_max], partner[is_max])
    best[max_overlap == 0] = -1
    return OverlapStats(num_sharing, max_overlap.astype(np.int32), best)


def _reduce_dense(counts: torch.Tensor, query_ids: np.ndarray, ref_ids: np.ndarray) -> OverlapStats:
    """Dense (c, R) variant of `_reduce_rows`; `ref_ids` ascending, so the first maximum is the smallest id."""
    pos = np.minimum(np.searchsorted(ref_ids, query_ids), len(ref_ids) - 1)  # (c,)
    hit = np.nonzero(ref_ids[pos] == query_ids)[0]
    counts[torch.from_numpy(hit), torch.from_numpy(pos[hit])] = 0  # self shares nothing
    # numpy counts the non-zero entries of a (c, R) float16 table 2.8x faster than torch's bool sum (paper pool,
    # 1024 refs: 2.0 against 5.6 us per source, one thread); counts are never negative
    num_sharing = np.count_nonzero(counts.numpy(), axis=1).astype(np.int64)
    max_overlap, best = counts.max(dim=1)  # first maximal index on ties
    max_overlap = max_overlap.numpy().astype(np.int64)
    best = np.where(max_overlap > 0, ref_ids[best.numpy()], -1)
    return OverlapStats(num_sharing, max_overlap.astype(np.int32), best.astype(np.int64))


class OverlapIndex:
    """The reference set (all trained sources, or a sample) that queried sources are compared with."""

    def __init__(self, ref_ids: np.ndarray, ref_keys: np.ndarray, num_keys: int, total_trained: int,
                 exact: bool) -> None:
        order = np.argsort(ref_ids, kind="stable")
        self.ref_ids = np.asarray(ref_ids, dtype=np.int64)[order]  # (R,) ascending
        ref_keys = ref_keys[order]
        self.num_keys = num_keys
        self.total_trained = total_trained
        self.exact = exact
        self.matrix = incidence(ref_keys, num_keys)  # (R, Q)
        k_mean = max(1.0, float((ref_keys >= 0).sum(axis=1).mean())) if len(ref_keys) else 1.0
        self.dense = num_keys < _DENSE_ADVANTAGE * k_mean and num_keys * len(self.ref_ids) <= _DENSE_MAX_ENTRIES
        self.dense_ref = None
        if self.dense:  # (Q, R) float16 0/1
            self.dense_ref = torch.from_numpy(np.ascontiguousarray(self.matrix.T.toarray(), dtype=np.float16))

    def query(self, query_ids: np.ndarray, query_keys: np.ndarray) -> OverlapStats:
        """Statistics for a chunk of sources: query_ids (c,), query_keys (c, K) padded with -1."""
        query_ids = np.asarray(query_ids, dtype=np.int64)
        if self.dense:
            valid = query_keys >= 0  # (c, K)
            lengths = valid.sum(axis=1)
            offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])[:-1].astype(np.int64))  # (c,)
            table = self.dense_ref if lengths.max(initial=0) <= _FP16_MAX_BAG else self.dense_ref.float()
            flat = torch.from_numpy(query_keys[valid].astype(np.int64))  # (n,) the bags, back to back
            counts = F.embedding_bag(flat, table, offsets, mode="sum")  # (c, R) shared sinks per pair
            stats = _reduce_dense(counts, query_ids, self.ref_ids)
        else:
            q = incidence(query_keys, self.num_keys)  # (c, Q)
            stats = _reduce_rows(q @ self.matrix.T, query_ids, self.ref_ids)  # sparse (c, R)
        if not self.exact:
            in_ref = np.isin(query_ids, self.ref_ids)
            others = np.maximum(len(self.ref_ids) - in_ref, 1)
            scale = (self.total_trained - 1) / others
            stats.num_sharing = np.rint(stats.num_sharing * scale).astype(np.int64)
        return stats

    def chunk_rows_for(self, budget_entries: int) -> int:
        """How many queried sources fit one product under `budget_entries` result entries."""
        if self.dense:
            return max(1, budget_entries // max(1, len(self.ref_ids)))
        loads = np.asarray(self.matrix.sum(axis=0)).ravel()
        neighbours = pair_work(loads) / max(1, len(self.ref_ids))  # mean entries per result row
        return int(max(1, min(1 << 20, budget_entries // max(1.0, neighbours))))
