"""The arithmetic behind nulls_dist.sinks: the published mask hash (torch int64, two's-complement wraparound
as on every torch device), a splitmix64 stream (numpy uint64, whose wraparound is defined) and GF(q)
polynomial codewords (torch). Only integer arithmetic after set-up, so results are bit-identical everywhere.

Shape legend:
    S  source ids in one chunk
    P  sink pool size
    M  candidate draws per source (uniform)
    k  sinks per source
    r  coefficients per codeword polynomial (degree < r)
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------- published hash
REF_A = 1588635695
REF_M = 4294967291
REF_BASE = 2**16

# ---------------------------------------------------------------------------------------------- splitmix64
MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
MIX_C1 = 0xBF58476D1CE4E5B9
MIX_C2 = 0x94D049BB133111EB


def mix64_int(z: int) -> int:
    """splitmix64 finalizer on a Python int, result in [0, 2**64)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX_C1) & MASK64
    z = ((z ^ (z >> 27)) * MIX_C2) & MASK64
    return z ^ (z >> 31)


# ---------------------------------------------------------------------------------------------- reference
def reference_table(pool_size: int) -> torch.Tensor:
    """(P,) int64: a**j with int64 wraparound (= a**j mod 2**64 whatever the multiplication order), then mod M
    (torch's floor-mod, so in [0, M))."""
    j = torch.arange(pool_size, dtype=torch.int64)
    return torch.pow(torch.tensor(REF_A, dtype=torch.int64), j) % REF_M


def _reference_hit(h: torch.Tensor, p_mem: float) -> torch.Tensor:
    """The published comparison on h in [0, M): float32 division, then `< p_mem` in float32."""
    ratio = h.to(torch.float32) / torch.tensor(REF_M, dtype=torch.float32)
    return ratio < torch.tensor(p_mem, dtype=torch.float32)


def reference_threshold(p_mem: float) -> int:
    """Smallest h with `h / M < p_mem` false in float32: the float test equals the integer test `h < T`.

    The float32 ratio is monotone in h, so the accepted h form a prefix; a binary search finds its end once
    and the per-unit work becomes one integer comparison.
    """
    lo, hi = 0, REF_M  # invariant: hit(lo - 1) true or lo == 0; hit(hi) false or hi == M
    while lo < hi:
        mid = (lo + hi) // 2
        if bool(_reference_hit(torch.tensor([mid]), p_mem)[0]):
            lo = mid + 1
        else:
            hi = mid
    return lo


# ids per inner step of reference_mask: ~2**16 int64 products stay in L2; measured 13 -> 9 ns per (id, unit)
# against one 2**21-element step on the dev box.
REF_INNER_ELEMENTS = 1 << 16


def reference_mask(source_ids: torch.Tensor, table: torch.Tensor, threshold: int, id_dtype: str) -> torch.Tensor:
    """(S,) ids, (P,) table -> (S, P) bool: ((s * 2**16) * table mod M) < threshold, with the id dtype's wrap."""
    if id_dtype == "int32":
        # int32 ids wrap at s * 2**16 before the product is promoted to int64 (published behaviour).
        base = (source_ids.to(torch.int32) * REF_BASE).to(torch.int64)  # (S,)
    else:
        base = source_ids.to(torch.int64) * REF_BASE  # (S,)
    out = torch.empty(base.numel(), table.numel(), dtype=torch.bool, device=base.device)  # (S, P)
    step = max(1, REF_INNER_ELEMENTS // max(1, table.numel()))
    for i in range(0, base.numel(), step):
        h = base[i : i + step, None] * table[None, :]  # (s, P), int64 wraparound
        torch.remainder(h, REF_M, out=h)  # floor mod: in [0, M)
        torch.lt(h, threshold, out=out[i : i + step])
    return out


# ---------------------------------------------------------------------------------------------- uniform
# numpy, not torch: on one core its AVX2/AVX-512 sort is ~10x and its uint64 hashing ~3x faster than torch's
# CPU kernels (measured on the dev box, 20k sources x 108 draws); uint64 wraparound is defined behaviour.
def _value_bits(pool_size: int) -> int:
    """Bits of a raw draw: draws are the top bits of a 32-bit word, and those >= P are rejected."""
    return max(1, (pool_size - 1).bit_length())


def uniform_num_draws(k: int, pool_size: int) -> int:
    """Candidate draws per source in the first pass (even); pool_size means "rank every unit" (large k / P).

    A share f = P / 2**bits of the draws is in range; expected repeats among the valid ones ~ k^2 / 2P. The
    margin (4 standard deviations of both) makes a second pass rare (~1e-5 of sources at the paper's k=100,
    P=7692) while keeping the sort short.
    """
    accept = pool_size / 2 ** _value_bits(pool_size)
    expected_dups = k * k / (2 * pool_size)
    target = k + expected_dups + 4 * math.sqrt(expected_dups + k * (1 - accept) / accept) + 4
    m = math.ceil(target / accept)
    m += m % 2
    return pool_size if 2 * m > pool_size else m


def _mix64_np(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array, in place (same bits as mix64_int)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(MIX_C1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(MIX_C2)
    z ^= z >> np.uint64(31)
    return z


def _source_state(source_ids: np.ndarray, seed: int, layer_key: int) -> np.ndarray:
    """(S,) int64 -> (S,) uint64: a splitmix64 state per (seed, layer, source)."""
    key = mix64_int(mix64_int(seed * GAMMA + 1) + layer_key * GAMMA)
    state = source_ids.astype(np.uint64) * np.uint64(GAMMA) + np.uint64(key)
    return _mix64_np(state)


def _hashes(state: np.ndarray, num: int) -> np.ndarray:
    """(S,) states -> (S, num) uint64: the first num splitmix64 outputs of each state."""
    steps = np.array([((t + 1) * GAMMA) & MASK64 for t in range(num)], dtype=np.uint64)
    return _mix64_np(state[:, None] + steps[None, :])


def _draws(state: np.ndarray, num: int, pool_size: int) -> np.ndarray:
    """(S,) states -> (S, num) uint32 raw draws in [0, 2**bits), num even: the top bits of each 32-bit half of
    num/2 hashes (low half first). Draws >= P are rejected by the caller (exact uniformity, no modulo bias)."""
    z = np.asarray(_hashes(state, num // 2), dtype="<u8")  # (S, num/2), little-endian on every machine
    words = z.view("<u4").astype(np.uint32, copy=False)  # (S, num)
    return words >> np.uint32(32 - _value_bits(pool_size))


def uniform_rows(source_ids: torch.Tensor, k: int, pool_size: int, seed: int, layer_key: int) -> torch.Tensor:
    """(S,) -> (S, k) ascending: each source's first k distinct draws from its splitmix64 stream (a uniform
    k-subset), or, when k is a large share of the pool, the k units with the smallest per-unit hash."""
    state = _source_state(source_ids.cpu().numpy(), seed, layer_key)
    draws = uniform_num_draws(k, pool_size)
    if draws == pool_size:
        rows = _smallest_keys(state, k, pool_size)
    else:
        rows = _first_distinct(state, k, pool_size, draws)
    return torch.from_numpy(rows).to(source_ids.device)


def _smallest_keys(state: np.ndarray, k: int, pool_size: int) -> np.ndarray:
    z = _hashes(state, pool_size)  # (S, P) one random key per unit
    unit = np.arange(pool_size, dtype=np.uint64)
    keys = ((z >> np.uint64(34)) << np.uint64(31)) | unit[None, :]  # unique: ties cannot reorder
    chosen = np.partition(keys, k - 1, axis=1)[:, :k] & np.uint64(2**31 - 1)
    return np.sort(chosen.astype(np.int64), axis=1)


def _first_distinct(state: np.ndarray, k: int, pool_size: int, draws: int) -> np.ndarray:
    """First k distinct in-range values of each source's draws; sources short of k retry with twice the draws
    (a fresh, longer stream: still a uniform k-subset by symmetry of the pool labels)."""
    bits = max(1, (draws - 1).bit_length())
    wide = _value_bits(pool_size) + bits > 31
    packed = _draws(state, draws, pool_size).astype(np.int64 if wide else np.int32)  # (S, M)
    packed <<= bits
    packed |= np.arange(draws, dtype=packed.dtype)[None, :]  # value, then draw index: all keys distinct
    packed = np.sort(packed, axis=1)  # (S, M) by value, then by draw order
    sorted_vals, sorted_draw = packed >> bits, packed & ((1 << bits) - 1)
    first = np.ones(sorted_vals.shape, dtype=bool)
    first[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]  # earliest draw of each value
    first &= sorted_vals < pool_size
    enough = first.sum(axis=1) >= k  # (S,)
    # a value is kept when its first draw is among the first k first-draws: cut at the k-th smallest first draw
    first_draw = np.where(first, sorted_draw, draws)  # (S, M)
    cut = np.partition(first_draw, k - 1, axis=1)[:, k - 1 : k]  # (S, 1)
    # dropped values move past the kept ones (re-sorting int32 is cheaper than boolean compaction)
    compact = np.sort(np.where(first_draw <= cut, sorted_vals, np.iinfo(sorted_vals.dtype).max), axis=1)
    out = compact[:, :k].astype(np.int64)  # (S, k)
    if enough.all():
        return out
    short = ~enough
    if 2 * draws >= pool_size * 8:  # unreachable for k <= P/2 in practice; keeps the loop finite
        out[short] = _smallest_keys(state[short], k, pool_size)
    else:
        out[short] = _first_distinct(state[short], k, pool_size, 2 * draws)
    return out


# ---------------------------------------------------------------------------------------------- code
Affine = tuple[list[list[int]], list[int]] | None


def code_affine(q: int, r: int, seed: int, layer_specific: bool) -> Callable[[int], Affine]:
    """layer -> an invertible affine map c -> A c + b on GF(q)^r coefficient vectors (None = identity).

    A is unit upper triangular, so A e_0 = e_0: sources differing only in the constant coefficient stay
    disjoint, and consecutive indices (which cycle through that coefficient) still load every unit evenly.
    Identity when seed == 0 and the assignment is not layer-specific.
    """

    def affine(layer: int) -> Affine:
        if seed == 0 and not layer_specific:
            return None
        base = mix64_int(mix64_int(seed * GAMMA + 7) + (layer + 1) * GAMMA)
        entry = lambda i, j: mix64_int(base + (i * r + j + 1) * GAMMA) % q  # noqa: E731
        a = [[1 if i == j else (entry(i, j) if j > i else 0) for j in range(r)] for i in range(r)]
        b = [entry(r, i) for i in range(r)]
        return a, b

    return affine


def code_rows(index: torch.Tensor, q: int, r: int, k: int, affine: Affine) -> torch.Tensor:
    """(S,) indices in [0, q**r) -> (S, k) ascending sinks {x*q + f(x) : x < k}, f from the index's base-q digits."""
    digits = []
    rest = index
    for _ in range(r):
        digits.append(rest % q)  # (S,)
        rest = rest // q
    if affine is not None:
        a, b = affine
        digits = [sum(a[i][j] * digits[j] for j in range(r)) % q + b[i] for i in range(r)]
        digits = [d % q for d in digits]
    coeffs = [d.to(torch.int32)[:, None] for d in digits]  # r x (S, 1); q*q + q fits int32
    x = torch.arange(k, dtype=torch.int32, device=index.device)[None, :]  # (1, k)
    f = coeffs[r - 1].expand(-1, k)  # Horner: f = (...(c_{r-1} x + c_{r-2}) x + ...) + c_0 mod q
    for i in range(r - 2, -1, -1):
        f = (f * x + coeffs[i]) % q  # (S, k)
    return (x * q + f).to(torch.int64)
