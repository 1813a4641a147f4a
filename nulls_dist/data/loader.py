"""The torch-side reader of the pipeline's WebDataset shards: `ShardDataset`, an IterableDataset split
disjointly over data-parallel ranks and DataLoader workers, shuffled by (seed, epoch), and `StatefulLoader`
(from `build_loader`), a DataLoader wrapper whose `state_dict()` resumes the exact batch sequence.

Order. Epoch e permutes the shard list with rng(seed, e); rank r takes every world_size-th shard of it and its
logical worker w every num_workers-th of those; each shard's samples are permuted with rng(seed, e, shard).
A (rank, worker) stream is the concatenation of its epochs, so its position is (epoch, shard_pos, sample_pos).

Exact resume. Every sample carries its logical worker and the position after it; the wrapper strips both
from the batch and records them only for batches it has handed out (prefetched ones do not count). A
resumed DataLoader asks its physical worker 0 first, so physical worker p plays logical worker
(p + next_worker) % num_workers: the round-robin continues where it stopped.

Forget sets. `exclude_source_ids` gives the retrain-oracle dataset without re-tokenizing: tokens of those
sources get loss_mask 0 and samples left with no loss token are dropped. With the causal AND same-source
attention mask no other source's token can attend to an excluded token, and the MLP (sink or backbone) acts
per token, so an excluded token changes no loss term but its own (masked) one: the excluded sources
contribute exactly zero gradient, as if never trained on. (Batch composition and step count differ from a
re-packed corpus; the per-source gradient contributions do not.)

Batches: `tokens` (B, T) int64, `source_ids` (B, T) int64, `loss_mask` (B, T) bool.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nulls_dist.formats import dataset as schema

log = logging.getLogger(__name__)

BAD_SHARD_MODES = ("error", "skip")
SPLITS = (schema.SPLIT_TRAIN, schema.SPLIT_HOLDOUT)
_WORKER_KEY, _POS_KEY = "_worker", "_pos"


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / schema.MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"data_dir {data_dir}: no {schema.MANIFEST_NAME} (run `nulls-data` first)")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != schema.SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {manifest.get('schema_version')}, expected {schema.SCHEMA_VERSION}")
    return manifest


def _read_shard(path: Path, expected_sha256: str, num_samples: int) -> list[dict[str, np.ndarray]]:
    """All samples of one shard, in key order, after checking its sha256 against the manifest."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise ValueError(f"shard {path}: sha256 {digest} does not match the manifest's {expected_sha256}")
    samples: dict[str, dict[str, np.ndarray]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            key, _, field = member.name.partition(".")
            samples.setdefault(key, {})[field] = np.load(io.BytesIO(tar.extractfile(member).read()))
    if len(samples) != num_samples or any(set(s) != set(schema.SAMPLE_KEYS) for s in samples.values()):
        raise ValueError(f"shard {path}: {len(samples)} samples or missing fields, manifest says {num_samples}")
    return [samples[k] for k in sorted(samples)]


class ShardDataset(IterableDataset):
    """One rank's share of a split's shards. `num_epochs=None` streams forever (the trainer counts steps)."""

    def __init__(self, data_dir: str | Path, rank: int = 0, world_size: int = 1, seed: int = 0,
                 split: str = schema.SPLIT_TRAIN, exclude_source_ids: Iterable[int] | None = None,
                 on_bad_shard: str = "error", num_epochs: int | None = None) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if on_bad_shard not in BAD_SHARD_MODES:
            raise ValueError(f"on_bad_shard must be one of {BAD_SHARD_MODES}, got {on_bad_shard!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.data_dir, self.rank, self.world_size, self.seed = Path(data_dir), rank, world_size, seed
        self.split, self.on_bad_shard, self.num_epochs = split, on_bad_shard, num_epochs
        self.manifest = load_manifest(data_dir)
        self.shards = self.manifest["shards"] if split == schema.SPLIT_TRAIN else self.manifest["holdout"]["shards"]
        if len(self.shards) < world_size:
            raise ValueError(f"{data_dir}: {len(self.shards)} {split} shards cannot feed world_size {world_size}")
        self.context_length = int(self.manifest["context_length"])
        self.special_ids = dict(self.manifest["special_ids"])
        self.exclude = np.array(sorted({int(i) for i in exclude_source_ids or ()}), dtype=np.int64)
        self.num_skipped_shards = 0
        self._missing = {i for i, s in enumerate(self.shards) if not (self.data_dir / s["name"]).is_file()}
        for i in sorted(self._missing):
            self._bad_shard(i, f"shard {self.data_dir / self.shards[i]['name']} is missing")
        self._positions: dict[int, tuple[int, int, int]] = {}  # logical worker -> (epoch, shard_pos, sample_pos)
        self._rotation = 0

    # -- order ------------------------------------------------------------------------------------------------

    def worker_shards(self, epoch: int, worker: int, num_workers: int) -> list[int]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [int(i) for i in perm[self.rank :: self.world_size][worker::num_workers]]

    def _sample_order(self, epoch: int, shard: int, num_samples: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, shard]).permutation(num_samples)

    # -- bad shards -------------------------------------------------------------------------------------------

    def _bad_shard(self, index: int, reason: str) -> None:
        if self.on_bad_shard == "error":
            raise ValueError(reason)
        self.num_skipped_shards += 1
        log.warning("skipping bad shard (%d skipped so far): %s", self.num_skipped_shards, reason)

    def _load(self, index: int) -> list[dict[str, np.ndarray]] | None:
        if index in self._missing:
            return None
        entry = self.shards[index]
        try:
            return _read_shard(self.data_dir / entry["name"], entry["sha256"], entry["samples"])
        except (OSError, ValueError, tarfile.TarError) as err:
            self._bad_shard(index, f"shard {self.data_dir / entry['name']} is unreadable or corrupt: {err}")
            return None

    # -- iteration --------------------------------------------------------------------------------------------

    def _to_sample(self, raw: dict[str, np.ndarray]) -> dict[str, torch.Tensor] | None:
        tokens = torch.from_numpy(raw[schema.TOKENS_KEY].astype(np.int64))  # (T,)
        source_ids = torch.from_numpy(raw[schema.SOURCE_IDS_KEY].astype(np.int64))  # (T,)
        keep = raw[schema.LOSS_MASK_KEY].astype(bool)  # (T,)
        if len(self.exclude):
            keep &= ~np.isin(raw[schema.SOURCE_IDS_KEY], self.exclude)
            if not keep.any():
                return None
        return {"tokens": tokens, "source_ids": source_ids, "loss_mask": torch.from_numpy(keep)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        num_workers, physical = (info.num_workers, info.id) if info else (1, 0)
        if len(self.shards) < self.world_size * num_workers:
            raise ValueError(f"{len(self.shards)} shards < world_size {self.world_size} x num_workers {num_workers}")
        worker = (physical + self._rotation) % num_workers
        epoch, shard_pos, sample_pos = self._positions.get(worker, (0, 0, 0))
        while self.num_epochs is None or epoch < self.num_epochs:
            shards = self.worker_shards(epoch, worker, num_workers)
            for shard_pos in range(shard_pos, len(shards)):
                index = shards[shard_pos]
                if sample_pos >= self.shards[index]["samples"]:
                    sample_pos = 0
                    continue
                samples = self._load(index)
                order = self._sample_order(epoch, index, len(samples)) if samples is not None else []
                for sample_pos in range(sample_pos + 1, len(order) + 1):
                    sample = self._to_sample(samples[order[sample_pos - 1]])
                    if sample is None:
                        continue
                    self._positions[worker] = (epoch, shard_pos, sample_pos)
                    sample[_WORKER_KEY] = worker
                    sample[_POS_KEY] = torch.tensor([epoch, shard_pos, sample_pos])
                    yield sample
                sample_pos = 0
            epoch, shard_pos, sample_pos = epoch + 1, 0, 0

    # -- state ------------------------------------------------------------------------------------------------

    def _identity(self) -> dict:
        shards = hashlib.sha256("".join(s["sha256"] for s in self.shards).encode()).hexdigest()
        return {"rank": self.rank, "world_size": self.world_size, "seed": self.seed, "split": self.split,
                "shards_sha256": shards}

    def state_dict(self) -> dict:
        """The position of an in-process iteration (num_workers=0); the loader wrapper tracks workers."""
        return {**self._identity(), "positions": {str(w): list(p) for w, p in self._positions.items()},
                "rotation": self._rotation}

    def load_state_dict(self, state: dict) -> None:
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise RuntimeError(f"loader state mismatch on {key!r}: checkpoint has a different value")
        self._positions = {int(w): tuple(p) for w, p in state["positions"].items()}
        self._rotation = int(state.get("rotation", 0))


class StatefulLoader:
    """A DataLoader over a ShardDataset that records, per logical worker, the position after the last batch
    handed out, and which worker the next batch comes from."""

    def __init__(self, dataset: ShardDataset, batch_size: int, num_workers: int = 0, **dataloader_kwargs) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.dataloader_kwargs = dataloader_kwargs
        self._positions: dict[int, tuple[int, int, int]] = {}
        self._next_worker = 0
        self.num_batches = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.dataset._positions = dict(self._positions)
        self.dataset._rotation = self._next_worker
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                            **self.dataloader_kwargs)
        for batch in loader:
            worker = int(batch.pop(_WORKER_KEY)[0])
            self._positions[worker] = tuple(int(v) for v in batch.pop(_POS_KEY)[-1])
            self._next_worker = (worker + 1) % max(self.num_workers, 1)
            self.num_batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"dataset": {**self.dataset._identity(),
                            "positions": {str(w): list(p) for w, p in self._positions.items()},
                            "rotation": self._next_worker},
                "num_workers": self.num_workers, "batch_size": self.batch_size, "num_batches": self.num_batches}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_workers", "batch_size"):
            if state[key] != getattr(self, key):
                raise RuntimeError(f"loader state mismatch: {key} was {state[key]}, now {getattr(self, key)}")
        self.dataset.load_state_dict(state["dataset"])
        self._positions = dict(self.dataset._positions)
        self._next_worker = self.dataset._rotation
        self.num_batches = int(state["num_batches"])


def build_loader(data_dir: str | Path, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, split: str = schema.SPLIT_TRAIN,
                 exclude_source_ids: Iterable[int] | None = None, on_bad_shard: str = "error",
                 num_epochs: int | None = None, **dataloader_kwargs) -> StatefulLoader:
    dataset = ShardDataset(data_dir, rank=rank, world_size=world_size, seed=seed, split=split,
                           exclude_source_ids=exclude_source_ids, on_bad_shard=on_bad_shard, num_epochs=num_epochs)
    return StatefulLoader(dataset, batch_size, num_workers=num_workers, **dataloader_kwargs)
