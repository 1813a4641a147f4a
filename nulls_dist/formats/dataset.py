"""The on-disk data contract shared by the pipeline (writer) and its readers (the training loader, the
evaluation): sample keys, dtypes, shard and file naming, the source-id offset, and the dataset manifest read back
(`read_manifest`, `manifest_shards`). Standard library and numpy only, so that torch-side code can import it
without pulling the pipeline in.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from nulls_dist.formats.documents import read_json_object

# Keys of one WebDataset sample (a packed context of `context_length` tokens).
TOKENS_KEY = "tokens.npy"  # (T,) uint16 when vocab_size <= 65536, else uint32
SOURCE_IDS_KEY = "source_ids.npy"  # (T,) uint32: every token's source id
LOSS_MASK_KEY = "loss_mask.npy"  # (T,) uint8: 1 = a real token, 0 = padding
SAMPLE_KEYS = (TOKENS_KEY, SOURCE_IDS_KEY, LOSS_MASK_KEY)

SOURCE_ID_DTYPE = np.uint32
LOSS_MASK_DTYPE = np.uint8

SHARD_PATTERN = "shard-{index:06d}.tar"
MANIFEST_NAME = "manifest.json"
REGISTRY_NAME = "registry.parquet"
SCHEMA_VERSION = 1

# The paper's offset: source id = title index + vocabulary size (49152), keeping ids disjoint from token ids.
PAPER_ID_OFFSET = 49152

SPLIT_TRAIN = "train"
SPLIT_HOLDOUT = "holdout"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id of a vocabulary."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index=index)


def sample_key(shard_index: int, sample_index: int) -> str:
    return f"{shard_index:06d}-{sample_index:08d}"


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The dataset manifest at `path` (`manifest.json`, or the dataset directory holding it), under the training
    loader's rules: it exists, is a JSON object and has this SCHEMA_VERSION. ValueError naming the file."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{path}: no dataset manifest (run `nulls-data` first)")
    manifest = read_json_object(path, "dataset manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}")
    return manifest


def manifest_shards(manifest: dict[str, Any], where: str | os.PathLike = MANIFEST_NAME,
                    splits: tuple[str, ...] = (SPLIT_TRAIN, SPLIT_HOLDOUT)) -> list[dict[str, Any]]:
    """The shard entries of the given splits, train (`shards`) then holdout (`holdout.shards`), each with at least
    name, samples and sha256 (bytes when recorded); ValueError naming `where` and the entry when one is not."""
    lists = {SPLIT_TRAIN: manifest.get("shards"), SPLIT_HOLDOUT: (manifest.get("holdout") or {}).get("shards")}
    out = []
    for split in splits:
        entries = lists[split]
        field = "shards" if split == SPLIT_TRAIN else "holdout.shards"
        if not isinstance(entries, list):
            raise ValueError(f"{where}: `{field}` is not a list of shard entries")
        for i, entry in enumerate(entries):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("sha256"), str) and isinstance(entry.get("samples"), int)):
                raise ValueError(f"{where}: `{field}[{i}]` needs a name, samples and sha256, got {entry!r}")
            out.append(entry)
    return out
