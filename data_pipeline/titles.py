"""64-bit title hashes and a bounded-memory set of seen titles.

Both the ingest duplicate check and the source registry's title index key titles by a 64-bit hash
(blake2b, digest 8 bytes, of the UTF-8 title): 8 bytes per title, so 6.4M titles cost about 51 MB.
For 6.4M titles the chance that two different titles share a hash is about 1e-6; the registry verifies
every hash hit against the stored title, and ingest reports every title it drops as a duplicate.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

TITLE_HASH_DTYPE = np.uint64


def title_hash(title: str) -> int:
    """The stable 64-bit hash of one title (same value on every machine and process)."""
    return int.from_bytes(hashlib.blake2b(title.encode("utf-8"), digest_size=8).digest(), "little")


def title_hashes(titles: Iterable[str], count: int = -1) -> np.ndarray:
    """Hashes of many titles: (n,) uint64."""
    return np.fromiter((title_hash(t) for t in titles), dtype=TITLE_HASH_DTYPE, count=count)


class SeenTitles:
    """The set of title hashes seen so far: a large sorted uint64 array plus a small sorted one of recent
    hashes, merged into the large one every `merge_every` new hashes (O(n) with `np.insert`).
    Memory: 8 bytes per distinct title."""

    def __init__(self, merge_every: int = 262_144):
        if merge_every <= 0:
            raise ValueError(f"merge_every must be positive, got {merge_every}")
        self._sorted = np.empty(0, dtype=TITLE_HASH_DTYPE)
        self._recent = np.empty(0, dtype=TITLE_HASH_DTYPE)
        self._merge_every = merge_every

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    @property
    def nbytes(self) -> int:
        return int(self._sorted.nbytes + self._recent.nbytes)

    def add(self, hashes: np.ndarray) -> np.ndarray:
        """Add a batch of hashes (n,) uint64; returns (n,) bool: True where the hash was already seen
        (earlier in this batch or in an earlier batch)."""
        hashes = np.asarray(hashes, dtype=TITLE_HASH_DTYPE)
        # Sorted distinct needles: searchsorted is several times faster on sorted keys.
        distinct, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        old = _contains(self._sorted, distinct) | _contains(self._recent, distinct)
        duplicate = old[inverse]
        later = np.ones(len(hashes), dtype=bool)
        later[first] = False
        duplicate |= later
        new = distinct[~old]
        self._recent = _insert_sorted(self._recent, new)
        if len(self._recent) >= self._merge_every:
            self._sorted = _insert_sorted(self._sorted, self._recent)
            self._recent = np.empty(0, dtype=TITLE_HASH_DTYPE)
        return duplicate


def _contains(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    if len(sorted_values) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return sorted_values[pos] == values


def _insert_sorted(sorted_values: np.ndarray, new_sorted: np.ndarray) -> np.ndarray:
    return np.insert(sorted_values, np.searchsorted(sorted_values, new_sorted), new_sorted)
