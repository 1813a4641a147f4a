"""Each source's trained token stream, read back from the dataset's WebDataset shards (train shards and the
`holdout/` shards) with the standard library's tarfile and the data schema's sample keys: the tokens that
carry the source's id and loss_mask 1, in shard and sample order (the order the packer wrote them)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterable

import numpy as np

from nulls_dist.formats.dataset import LOSS_MASK_KEY, SOURCE_IDS_KEY, TOKENS_KEY


def _samples(path: Path):
    """(tokens, source_ids, loss_mask) per sample of one tar shard."""
    current: dict[str, dict[str, np.ndarray]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, suffix = member.name.partition(".")
            data = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
            sample = current.setdefault(key, {})
            sample[suffix] = data
            if all(k in sample for k in (TOKENS_KEY, SOURCE_IDS_KEY, LOSS_MASK_KEY)):
                yield sample[TOKENS_KEY], sample[SOURCE_IDS_KEY], sample[LOSS_MASK_KEY]
                del current[key]


def read_source_tokens(dataset_dir: str | Path, source_ids: Iterable[int],
                       max_tokens: int | None = None) -> dict[int, np.ndarray]:
    """source id -> (n,) int64 tokens, from `shard-*.tar` and `holdout/shard-*.tar` under `dataset_dir`."""
    dataset_dir = Path(dataset_dir)
    wanted = np.asarray(sorted({int(s) for s in source_ids}), dtype=np.int64)
    shards = sorted(dataset_dir.glob("shard-*.tar")) + sorted((dataset_dir / "holdout").glob("shard-*.tar"))
    if not shards:
        raise ValueError(f"no shard-*.tar files under {dataset_dir}")
    parts: dict[int, list[np.ndarray]] = {}
    for shard in shards:
        for tokens, sources, mask in _samples(shard):
            sources = sources.astype(np.int64)
            keep = np.isin(sources, wanted) & (mask > 0)
            for sid in np.unique(sources[keep]):
                parts.setdefault(int(sid), []).append(tokens[keep & (sources == sid)].astype(np.int64))
    out = {sid: np.concatenate(chunks) for sid, chunks in parts.items()}
    if max_tokens is not None:
        out = {sid: t[:max_tokens] for sid, t in out.items()}
    return out
