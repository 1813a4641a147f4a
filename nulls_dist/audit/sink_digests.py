"""The sink digest: what a manifest record's `sink_digest` commits to. One definition, used by the manifest
writer (`manifest.py`) and by every re-computation (`verify.py`, tests).

A source's sinks are a list of sink keys (as in `overlap.py`): pool units u when every layer uses the same
mask (`layers_share_sinks`), (layer, unit) pairs when the assignment is layer-specific. Each key has a digest
over the weight rows it names, and a source's digest is a hash of its keys' digests:

    layers share the mask:  key_digest(u)    = sha256(row_0(u) | row_1(u) | ... | row_{L-1}(u))
    layer-specific:         key_digest(l, u) = sha256(row_l(u))
    where row_l(u)          = gate_l[u] | up_l[u] | down_l[u]
    sink_digest(source)     = sha256(key_digest(k_1) | key_digest(k_2) | ...)

`gate_l`, `up_l`, `down_l` are `transformer.h.{l}.mlp.sink_{gate,up,down}` (each (P, n_embd)); a row is
cast to float32 and taken as little-endian bytes; `|` concatenates; key digests are the raw 32 bytes; the keys
are in record order (ascending units; layer-specific: layer-major, ascending units within a layer). A source
with no sinks has sha256 of the empty string.

So the digest commits to a source's rows in every layer (change any layer's gate, up or down row of one of its
units and it changes), but with a shared mask a source costs one hash over K * 32 bytes instead of L * K
row digests: the L-layer work is done once per pool unit (P hashes over L * 3 * n_embd floats in all, streamed
in blocks of UNIT_BLOCK units, one layer at a time, so at most UNIT_BLOCK rows of one layer's three tables are
copied at once: a memory-mapped `WeightsFile` of 2**24-row tables is digested in bounded memory).

Manifest version 1 hashed L * K_max per-row digests per source (-1 padding as zero digests); its digests are
not comparable with these, and readers refuse version-1 manifests (`manifest.read_index`).
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np
import torch

from nulls_dist.deploy.checkpoint_io import sink_table_keys
from nulls_dist.formats.weights import read_rows

DIGEST_BYTES = 32
DEFINITION = "nulls-sink-digest-2"  # named in the manifest index; change it with any change above
# Pool units hashed per block: UNIT_BLOCK x 3 x n_embd floats of one layer are in memory at once (768 MB at the
# paper's n_embd=960), whatever the pool size.
UNIT_BLOCK = 65536


def _layer_rows(state_dict: Mapping[str, torch.Tensor], layer: int, units: np.ndarray) -> np.ndarray:
    """(n,) sorted distinct pool units -> (n, 3D) little-endian float32 rows gate | up | down of one layer (read
    through the memory map of a lazy state dict: only those rows)."""
    parts = [read_rows(state_dict, k, units).detach().to(torch.float32).numpy() for k in sink_table_keys(layer)]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype="<f4")  # (n, 3D)


def key_digests(state_dict: Mapping[str, torch.Tensor], n_layer: int, n_sink: int, layers_share_sinks: bool,
                units: np.ndarray | None = None) -> np.ndarray:
    """(num_keys + 1, 32) uint8 key digests indexed by sink key (u, or l * P + u when layer-specific); the last
    row, which -1 padding points at, is zeros. `units` limits the work to those pool units (the other rows stay
    zero): what re-checking a few sources needs. The state dict may be any mapping (a lazy one is read one
    layer at a time)."""
    units = np.arange(n_sink, dtype=np.int64) if units is None else np.unique(np.asarray(units, dtype=np.int64))
    num_keys = n_sink * (1 if layers_share_sinks else n_layer)
    table = np.zeros((num_keys + 1, DIGEST_BYTES), dtype=np.uint8)
    if not len(units):
        return table
    for lo in range(0, len(units), UNIT_BLOCK):
        block = units[lo: lo + UNIT_BLOCK]
        if layers_share_sinks:
            hashers = [hashlib.sha256() for _ in range(len(block))]
            for layer in range(n_layer):
                rows = _layer_rows(state_dict, layer, block)  # (n, 3D)
                for h, row in zip(hashers, rows):
                    h.update(row)
            table[block] = np.frombuffer(b"".join(h.digest() for h in hashers), np.uint8).reshape(-1, DIGEST_BYTES)
            continue
        for layer in range(n_layer):
            rows = _layer_rows(state_dict, layer, block)
            digests = b"".join(hashlib.sha256(row).digest() for row in rows)
            table[layer * n_sink + block] = np.frombuffer(digests, np.uint8).reshape(-1, DIGEST_BYTES)
    return table


def source_digests(keys: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(S, K') sink keys in record order, -1 padded -> (S, 32) uint8 sink digests (`table` from key_digests)."""
    valid = keys >= 0  # (S, K')
    gathered = np.ascontiguousarray(table[keys[valid]])  # (n, 32): source-major, keys in record order
    ends = np.cumsum(valid.sum(axis=1)) * DIGEST_BYTES  # (S,)
    starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
    buf = memoryview(gathered.reshape(-1))
    out = b"".join(hashlib.sha256(buf[a:b]).digest() for a, b in zip(starts.tolist(), ends.tolist()))
    return np.frombuffer(out, dtype=np.uint8).reshape(len(keys), DIGEST_BYTES)


def sink_keys(sinks: list, n_sink: int, layers_share_sinks: bool) -> list[int]:
    """One record's `sinks` (a list of units, or one list per layer) -> its sink keys in record order."""
    if layers_share_sinks:
        return [int(u) for u in sinks]
    return [layer * n_sink + int(u) for layer, units in enumerate(sinks) for u in units]


def recompute_hex(state_dict: Mapping[str, torch.Tensor], n_layer: int, n_sink: int, layers_share_sinks: bool,
                  records: list[list]) -> list[str]:
    """Hex sink digests of a few records' `sinks` from the weights (only their units are hashed)."""
    keys = [sink_keys(s, n_sink, layers_share_sinks) for s in records]
    flat = [k for ks in keys for k in ks]
    units = np.asarray(flat, dtype=np.int64) % n_sink if flat else np.zeros(0, np.int64)
    table = key_digests(state_dict, n_layer, n_sink, layers_share_sinks, units)
    width = max((len(k) for k in keys), default=0)
    padded = np.full((len(keys), width), -1, dtype=np.int64)
    for i, ks in enumerate(keys):
        padded[i, :len(ks)] = ks
    return [bytes(d).hex() for d in source_digests(padded, table)]
