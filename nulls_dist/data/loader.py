"""The torch-side reader of the pipeline's WebDataset shards: a sample order that does not depend on the number
of ranks or workers, exactly resumable at sample granularity on any world size, delivering whole optimizer
steps of ready micro-batches (tensors + the sink plan built in the worker processes).

Order. The training split is read as `num_streams` independent streams (fixed for a run, recorded in its
checkpoints). In epoch e, stream s owns the shards perm_e[s::num_streams] (perm_e = rng(seed, e) over the
shard list), read in that order, each shard's samples permuted with rng(seed, e, shard); a stream is the
concatenation of its epochs. Every optimizer step takes the next `global_batch / num_streams` samples of EVERY
stream; so the samples of step i are the same whatever the world size, and a stream's position (epoch,
shard position, sample position) is all a resume needs.

Placement. Rank r (of W) reads the streams s with s % W == r; its DataLoader worker w reads every
num_workers-th of those. Each worker yields one item per step: its streams' samples for the step, cut into
micro-batches of `micro_batch` samples, each with its `SinkPlan` and labels built right there (numpy, off the
training process's critical path). The training process takes one item per worker per step -- a DataLoader
returns workers' items in order, so a step always starts at worker 0 -- pins them when training on a GPU, and
records the positions of the items it handed out (prefetched items do not count).

Exact resume. `state_dict()` is this rank's streams' positions; `merge_states` joins every rank's into one
world-size independent document (the trainer writes it into the checkpoint), and `load_state_dict` of that
document restarts any layout at exactly the next unread sample of every stream.

Forget sets. `exclude_source_ids` gives the retrain-oracle dataset without re-tokenizing: tokens of those
sources get no label and samples left with no label are skipped (the stream moves on). With the causal AND
same-source attention no other source's token attends to an excluded token and the MLP acts per token, so the
excluded sources contribute exactly zero gradient.

Micro-batch: `input_ids`, `source_ids`, `labels` (B, T-1) int64 (labels = next token, -100 where the target does
not count: padding, or a different source than the input token), `num_targets` (int), `plan` (SinkPlan).
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from nulls_dist.formats import dataset as schema
from nulls_dist.formats.dataset import manifest_shards, read_manifest
from nulls_dist.formats.shards import ShardError, read_shard, verify_shard

log = logging.getLogger(__name__)

SPLITS = (schema.SPLIT_TRAIN, schema.SPLIT_HOLDOUT)
STATE_FORMAT = "nulls-loader-state"
IGNORE_INDEX = -100  # as nulls_dist.model.IGNORE_INDEX (F.cross_entropy's default)
# Datasets up to this many shards are verified (sha256 of every shard) when a loader is built, by default.
VERIFY_UP_FRONT_MAX_SHARDS = 256


def load_manifest(data_dir: str | Path) -> dict:
    return read_manifest(data_dir)


def split_shards(manifest: dict, split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return manifest_shards(manifest, schema.MANIFEST_NAME, (split,))


def verify_shards(data_dir: str | Path, shards: list[dict]) -> None:
    """sha256 of every shard against the manifest, with a progress bar; ShardError names the first bad one."""
    for entry in tqdm(shards, desc="verify shards", unit="shard", disable=len(shards) < 16 or None):
        verify_shard(Path(data_dir) / entry["name"], entry["sha256"], entry.get("bytes"))


def token_source_counts(data_dir: str | Path, exclude_source_ids: Iterable[int] | None, vocab_size: int) -> np.ndarray:
    """(vocab_size,) int64: in how many training sources each token id occurs (tokens that count for the loss:
    loss_mask 1, `exclude_sources` left out). Each source lies in one train shard (the shard stage's tasks own
    whole articles), so distinct (source, token) pairs per shard count each source once; memory is one
    shard's pairs. Every shard is verified against the manifest as it is read."""
    data_dir = Path(data_dir)
    exclude = np.array(sorted({int(i) for i in exclude_source_ids or ()}), dtype=np.int64)
    counts = np.zeros(vocab_size, dtype=np.int64)
    shards = split_shards(load_manifest(data_dir), schema.SPLIT_TRAIN)
    for entry in tqdm(shards, desc="token counts", unit="shard", disable=len(shards) < 16 or None):
        pairs = []
        for sample in read_shard(data_dir / entry["name"], entry["sha256"], entry["samples"], entry.get("bytes")):
            tokens = sample[schema.TOKENS_KEY].astype(np.int64)
            sources = sample[schema.SOURCE_IDS_KEY].astype(np.int64)
            keep = sample[schema.LOSS_MASK_KEY].astype(bool) & ~np.isin(sources, exclude)
            if tokens[keep].size and tokens[keep].max() >= vocab_size:
                raise ValueError(f"{data_dir / entry['name']}: token id {int(tokens[keep].max())} >= the model's "
                                 f"vocabulary ({vocab_size})")
            pairs.append(sources[keep] * vocab_size + tokens[keep])
        if pairs:
            np.add.at(counts, np.unique(np.concatenate(pairs)) % vocab_size, 1)
    return counts


# ------------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class StreamLayout:
    """Who reads which streams, and how many samples a step takes from each; validated on construction."""

    num_streams: int
    global_batch: int  # samples per optimizer step, all ranks together
    micro_batch: int
    world_size: int = 1
    rank: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        ns, gb, w = self.num_streams, self.global_batch, self.world_size
        if ns < 1 or gb % ns:
            raise ValueError(f"data_loader.num_streams={ns} must divide the global batch ({gb} samples per step)")
        if ns % w:
            raise ValueError(f"data_loader.num_streams={ns} must be a multiple of the world size {w}")
        per_rank = ns // w
        if per_rank % max(1, self.num_workers):
            raise ValueError(f"data_loader.num_workers={self.num_workers} must divide the {per_rank} streams of a rank "
                             f"(num_streams={ns} / world size {w})")
        if (self.streams_per_worker * self.per_stream) % self.micro_batch:
            raise ValueError(f"deepspeed.micro_batch={self.micro_batch} must divide the {self.streams_per_worker} x "
                             f"{self.per_stream} samples a loader worker reads per step")

    @property
    def per_stream(self) -> int:
        """Samples each stream gives to every step."""
        return self.global_batch // self.num_streams

    @property
    def streams_per_worker(self) -> int:
        return self.num_streams // self.world_size // max(1, self.num_workers)

    @property
    def grad_accum(self) -> int:
        """Micro-batches per rank per step."""
        return self.global_batch // self.world_size // self.micro_batch

    def rank_streams(self) -> list[int]:
        return list(range(self.rank, self.num_streams, self.world_size))

    def worker_streams(self, worker: int) -> list[int]:
        return self.rank_streams()[worker::max(1, self.num_workers)]


def default_num_streams(global_batch: int, num_shards: int, world_size: int) -> int:
    """The stream count a run uses unless told: a divisor of the global batch, a multiple of the world size and
    at most the number of shards (every stream needs a shard per epoch); among those the largest that divides the
    number of shards (equal streams: every sample is read equally often), else the largest (the loader then
    warns that streams differ in length). The larger it is, the more rank counts a run can later resume on."""
    fits = [ns for ns in range(1, min(global_batch, num_shards) + 1) if global_batch % ns == 0 and ns % world_size == 0]
    if not fits:
        raise ValueError(f"no stream count fits: global batch {global_batch}, {num_shards} shards, world size "
                         f"{world_size} (the global batch must be a multiple of the world size, and there must be at "
                         "least as many shards as ranks)")
    even = [ns for ns in fits if num_shards % ns == 0]
    return max(even or fits)


# ------------------------------------------------------------------------------------------------ streams
class ShardStreams:
    """The sample order of one split (see the module docstring); positions are (epoch, shard_pos, sample_pos)."""

    def __init__(self, data_dir: str | Path, shards: list[dict], num_streams: int, seed: int,
                 exclude_source_ids: Iterable[int] | None = None, context_length: int | None = None) -> None:
        if num_streams > len(shards):
            raise ValueError(f"data_loader.num_streams={num_streams} exceeds the {len(shards)} shards of "
                             f"{data_dir}: every stream needs a shard per epoch")
        self.data_dir, self.shards, self.num_streams, self.seed = Path(data_dir), shards, num_streams, seed
        self.exclude = np.array(sorted({int(i) for i in exclude_source_ids or ()}), dtype=np.int64)
        self.context_length = context_length
        sizes = [sum(s["samples"] for s in shards[i::num_streams]) for i in range(num_streams)]
        if min(sizes) and max(sizes) > 1.1 * min(sizes):
            log.warning("data: the %d streams hold %d to %d samples per epoch (%d shards): shorter streams repeat "
                        "their samples more often; a stream count that divides the shard count avoids this",
                        num_streams, min(sizes), max(sizes), len(shards))
        # decoded shards, least recently used first: one per stream a worker reads, plus the next one
        self._cache: OrderedDict[int, list[dict[str, np.ndarray]]] = OrderedDict()
        self.cache_shards = 2

    def identity(self) -> dict:
        shards = hashlib.sha256("".join(s["sha256"] for s in self.shards).encode()).hexdigest()
        exclude = hashlib.sha256(self.exclude.tobytes()).hexdigest()
        return {"num_streams": self.num_streams, "seed": self.seed, "shards_sha256": shards,
                "exclude_sha256": exclude}

    def stream_shards(self, stream: int, epoch: int) -> list[int]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [int(i) for i in perm[stream::self.num_streams]]

    def _samples(self, index: int) -> list[dict[str, np.ndarray]]:
        if index in self._cache:
            self._cache.move_to_end(index)
        else:
            entry = self.shards[index]
            self._cache[index] = read_shard(self.data_dir / entry["name"], entry["sha256"], entry["samples"],
                                            entry.get("bytes"))
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        return self._cache[index]

    def keep_mask(self, sample: dict[str, np.ndarray]) -> np.ndarray:
        """(T,) bool: tokens that count for the loss (loss_mask, minus excluded sources)."""
        keep = sample[schema.LOSS_MASK_KEY].astype(bool)
        if len(self.exclude):
            keep &= ~np.isin(sample[schema.SOURCE_IDS_KEY], self.exclude)
        return keep

    def take(self, stream: int, position: tuple[int, int, int], count: int):
        """The next `count` usable samples of `stream` from `position`; returns (samples, keep masks, position)."""
        epoch, shard_pos, sample_pos = position
        samples, keeps = [], []
        while len(samples) < count:
            shards = self.stream_shards(stream, epoch)
            if shard_pos >= len(shards):
                epoch, shard_pos, sample_pos = epoch + 1, 0, 0
                continue
            index = shards[shard_pos]
            num = self.shards[index]["samples"]
            if sample_pos >= num:
                shard_pos, sample_pos = shard_pos + 1, 0
                continue
            order = np.random.default_rng([self.seed, epoch, index]).permutation(num)
            sample = self._samples(index)[order[sample_pos]]
            sample_pos += 1
            keep = self.keep_mask(sample)
            if keep.any():
                samples.append(sample)
                keeps.append(keep)
        return samples, keeps, (epoch, shard_pos, sample_pos)


def make_micro_batch(samples: list[dict[str, np.ndarray]], keeps: list[np.ndarray], vocab_size: int | None,
                     plan_builder: Callable | None) -> dict:
    """Stack samples into one micro-batch: inputs = tokens[:, :-1], labels = tokens[:, 1:] where the target
    counts (its loss mask and the same source as the input token), the sink plan of the inputs' sources."""
    tokens = np.stack([s[schema.TOKENS_KEY] for s in samples]).astype(np.int64)  # (B, T)
    sources = np.stack([s[schema.SOURCE_IDS_KEY] for s in samples]).astype(np.int64)  # (B, T)
    keep = np.stack(keeps)  # (B, T)
    if vocab_size is not None and tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token id {int(tokens.max())} is outside the model's vocabulary of {vocab_size}")
    counted = keep[:, 1:] & (sources[:, 1:] == sources[:, :-1])  # (B, T-1)
    labels = np.where(counted, tokens[:, 1:], IGNORE_INDEX)
    batch = {"input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
             "source_ids": torch.from_numpy(np.ascontiguousarray(sources[:, :-1])),
             "labels": torch.from_numpy(np.ascontiguousarray(labels)), "num_targets": int(counted.sum())}
    if plan_builder is not None:
        batch["plan"] = plan_builder(sources[:, :-1])
    return batch


class StepDataset(IterableDataset):
    """One rank's steps: each worker yields, per step, its streams' micro-batches (see the module docstring)."""

    def __init__(self, streams: ShardStreams, layout: StreamLayout, positions: dict[int, tuple[int, int, int]],
                 vocab_size: int | None, plan_builder: Callable | None) -> None:
        super().__init__()
        self.streams, self.layout, self.positions = streams, layout, positions
        self.vocab_size, self.plan_builder = vocab_size, plan_builder

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info else 0
        owned = self.layout.worker_streams(worker)
        self.streams.cache_shards = len(owned) + 1
        positions = {s: tuple(self.positions.get(s, (0, 0, 0))) for s in owned}
        mb = self.layout.micro_batch
        while True:
            samples, keeps = [], []
            for stream in owned:
                got, kept, positions[stream] = self.streams.take(stream, positions[stream], self.layout.per_stream)
                samples += got
                keeps += kept
            micro = [make_micro_batch(samples[i:i + mb], keeps[i:i + mb], self.vocab_size, self.plan_builder)
                     for i in range(0, len(samples), mb)]
            yield {"micro_batches": micro, "positions": {str(s): list(p) for s, p in positions.items()}}


class StepLoader:
    """Iterates optimizer steps: each item is the list of this rank's `grad_accum` micro-batches."""

    def __init__(self, streams: ShardStreams, layout: StreamLayout, vocab_size: int | None = None,
                 plan_builder: Callable | None = None, pin_memory: bool = False) -> None:
        self.streams, self.layout = streams, layout
        self.vocab_size, self.plan_builder, self.pin_memory = vocab_size, plan_builder, pin_memory
        self._positions: dict[int, tuple[int, int, int]] = {}
        self.num_steps = 0

    def __iter__(self) -> Iterator[list[dict]]:
        dataset = StepDataset(self.streams, self.layout, dict(self._positions), self.vocab_size, self.plan_builder)
        workers = self.layout.num_workers
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                            persistent_workers=False, prefetch_factor=2 if workers else None)
        pending: list[dict] = []
        for item in loader:
            pending.append(item)
            if len(pending) < max(1, workers):
                continue
            for part in pending:
                self._positions.update({int(s): tuple(p) for s, p in part["positions"].items()})
            self.num_steps += 1
            step = [mb for part in pending for mb in part["micro_batches"]]
            pending = []
            yield step

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's streams' positions (after the last step handed out) and the order's identity."""
        return {"format": STATE_FORMAT, **self.streams.identity(), "global_batch": self.layout.global_batch,
                "num_steps": self.num_steps,
                "positions": {str(s): list(p) for s, p in sorted(self._positions.items())}}

    def load_state_dict(self, state: dict) -> None:
        """A merged (or this rank's) state; positions of streams this rank does not own are ignored."""
        if state.get("format") != STATE_FORMAT:
            raise RuntimeError(f"loader state: format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        for key, value in self.streams.identity().items():
            if state.get(key) != value:
                raise RuntimeError(f"loader state mismatch on {key!r}: checkpoint {state.get(key)!r}, run {value!r}")
        owned = set(self.layout.rank_streams())
        self._positions = {int(s): tuple(p) for s, p in state["positions"].items() if int(s) in owned}
        self.num_steps = int(state.get("num_steps", 0))


def merge_states(states: list[dict]) -> dict:
    """One world-size independent loader state from every rank's `state_dict()`."""
    merged = dict(states[0])
    merged["positions"] = {}
    for state in states:
        merged["positions"].update(state["positions"])
    merged["positions"] = dict(sorted(merged["positions"].items(), key=lambda kv: int(kv[0])))
    return merged


# ------------------------------------------------------------------------------------------------ builders
def build_step_loader(data_dir: str | Path, layout: StreamLayout, seed: int = 0,
                      exclude_source_ids: Iterable[int] | None = None, vocab_size: int | None = None,
                      plan_builder: Callable | None = None, pin_memory: bool = False,
                      verify: bool | None = None) -> StepLoader:
    """The training loader of one rank. `verify=None`: check every shard's sha256 up front when the dataset
    has at most VERIFY_UP_FRONT_MAX_SHARDS shards (shards are always verified again when read)."""
    manifest = load_manifest(data_dir)
    shards = split_shards(manifest, schema.SPLIT_TRAIN)
    if verify or (verify is None and len(shards) <= VERIFY_UP_FRONT_MAX_SHARDS):
        verify_shards(data_dir, shards)
    streams = ShardStreams(data_dir, shards, layout.num_streams, seed, exclude_source_ids,
                           int(manifest["context_length"]))
    return StepLoader(streams, layout, vocab_size, plan_builder, pin_memory)


def fixed_batches(data_dir: str | Path, split: str, micro_batch: int, num_batches: int, seed: int,
                  exclude_source_ids: Iterable[int] | None = None, vocab_size: int | None = None,
                  plan_builder: Callable | None = None) -> list[dict]:
    """The first `num_batches` micro-batches of a split in one stream (seeded, never reshuffled): every
    evaluation of a run, and of its resumption, sees the same tokens."""
    shards = split_shards(load_manifest(data_dir), split)
    if not shards or num_batches == 0:
        return []
    streams = ShardStreams(data_dir, shards, 1, seed, exclude_source_ids)
    out, position = [], (0, 0, 0)
    for _ in range(num_batches):
        samples, keeps, position = streams.take(0, position, micro_batch)
        out.append(make_micro_batch(samples, keeps, vocab_size, plan_builder))
    return out


__all__ = ["ShardError", "ShardStreams", "StepLoader", "StreamLayout", "build_step_loader", "default_num_streams",
           "fixed_batches", "load_manifest", "merge_states", "split_shards", "verify_shards"]
