"""The on-disk data contract shared by the pipeline (writer) and the training loader (reader): sample keys,
dtypes, shard and file naming, the source-id offset. Standard library and numpy only, so that torch-side code
can import it without pulling the pipeline in.
"""
from __future__ import annotations

import numpy as np

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
