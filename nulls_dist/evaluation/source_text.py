"""Each source's trained token stream, read back from the dataset's WebDataset shards (the train shards and the
`holdout/` shards its `manifest.json` lists) through the verified shard reader (`formats.shards.read_shard`: size,
sha256 and sample count against the manifest before a sample is used): the tokens that carry the source's id and
loss_mask 1, in shard and sample order (the order the packer wrote them)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from nulls_dist.formats.dataset import (
    LOSS_MASK_KEY,
    MANIFEST_NAME,
    SOURCE_IDS_KEY,
    TOKENS_KEY,
    manifest_shards,
    read_manifest,
)
from nulls_dist.formats.shards import read_shard


def read_source_tokens(dataset_dir: str | Path, source_ids: Iterable[int],
                       max_tokens: int | None = None) -> dict[int, np.ndarray]:
    """source id -> (n,) int64 tokens, from every shard the dataset manifest lists. A shard that is missing or does
    not match its manifest entry raises `ShardError` (a ValueError) naming it."""
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    entries = manifest_shards(manifest, dataset_dir / MANIFEST_NAME)
    if not entries:
        raise ValueError(f"{dataset_dir / MANIFEST_NAME} lists no shards")
    wanted = np.asarray(sorted({int(s) for s in source_ids}), dtype=np.int64)
    parts: dict[int, list[np.ndarray]] = {}
    for entry in entries:
        for sample in read_shard(dataset_dir / entry["name"], entry["sha256"], entry["samples"], entry.get("bytes")):
            tokens, sources, mask = sample[TOKENS_KEY], sample[SOURCE_IDS_KEY].astype(np.int64), sample[LOSS_MASK_KEY]
            keep = np.isin(sources, wanted) & (mask > 0)
            for sid in np.unique(sources[keep]):
                parts.setdefault(int(sid), []).append(tokens[keep & (sources == sid)].astype(np.int64))
    out = {sid: np.concatenate(chunks) for sid, chunks in parts.items()}
    if max_tokens is not None:
        out = {sid: t[:max_tokens] for sid, t in out.items()}
    return out
