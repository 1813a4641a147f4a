"""The step loader: micro-batch contract (labels, sink plans), a sample order independent of ranks and workers,
exact resume across world sizes at sample granularity, complete epochs per stream, forget sets, shard checks."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nulls_data_fixtures import build_dataset
from nulls_dist.config import NullConfig
from nulls_dist.data.loader import (IGNORE_INDEX, ShardStreams, StreamLayout, build_step_loader,
                                    default_num_streams, fixed_batches, load_manifest, merge_states)
from nulls_dist.formats import dataset as schema
from nulls_dist.formats.shards import ShardError, read_shard
from nulls_dist.sink_plan import plan_for_batch, segments_numpy
from nulls_dist.sinks import SinkAssignment


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("loader"))  # 10 train shards of 37-68 samples, context 32


def _row_ids(micro: dict) -> list[str]:
    """One identity per sample of a micro-batch (its input tokens, sources and labels)."""
    rows = torch.cat([micro["input_ids"], micro["source_ids"], micro["labels"]], dim=1).numpy()
    return [hashlib.sha1(r.tobytes()).hexdigest() for r in rows]


def _steps(loaders: list, num_steps: int) -> list[list[str]]:
    """Sample identities of each step over all ranks (a step is a set: the loss sums over all its tokens)."""
    iters = [iter(loader) for loader in loaders]
    out = []
    for _ in range(num_steps):
        ids = []
        for it in iters:
            for micro in next(it):
                ids += _row_ids(micro)
        out.append(sorted(ids))
    return out


def _loaders(dataset, world_size, num_workers=0, num_streams=4, global_batch=8, micro_batch=2, seed=3, **kw):
    return [build_step_loader(dataset, StreamLayout(num_streams, global_batch, micro_batch, world_size, rank,
                                                    num_workers), seed=seed, **kw) for rank in range(world_size)]


def test_micro_batches_follow_the_contract(dataset):
    cfg = NullConfig.from_preset("debug", vocab_size=300, sink_strategy="uniform", sink_k=5)
    assignment = SinkAssignment(cfg.sink_assignment_config())
    builder = lambda ids: plan_for_batch(ids, cfg, assignment)  # noqa: E731
    (loader,) = _loaders(dataset, 1, plan_builder=builder, vocab_size=300)
    step = next(iter(loader))
    T = load_manifest(dataset)["context_length"]
    assert len(step) == 4  # global batch 8 / micro-batch 2 on one rank
    for micro in step:
        assert micro["input_ids"].shape == micro["source_ids"].shape == micro["labels"].shape == (2, T - 1)
        assert micro["input_ids"].dtype == micro["labels"].dtype == torch.int64
        assert micro["num_targets"] == int((micro["labels"] != IGNORE_INDEX).sum()) > 0
        plan = micro["plan"]
        offsets, seg_source, sources, _ = segments_numpy(micro["source_ids"].numpy())
        assert torch.equal(plan.sources, torch.from_numpy(sources)) and torch.equal(plan.offsets, torch.from_numpy(offsets))
        assert plan.rows.shape == (1, len(sources), 5) and plan.tiles is not None


def test_labels_count_only_same_source_unpadded_targets(dataset):
    manifest = load_manifest(dataset)
    entry = manifest["shards"][0]
    raw = read_shard(dataset / entry["name"], entry["sha256"], entry["samples"])
    streams = ShardStreams(dataset, manifest["shards"], 1, seed=0)
    samples, keeps, _ = streams.take(0, (0, 0, 0), 3)
    from nulls_dist.data.loader import make_micro_batch

    micro = make_micro_batch(samples, keeps, None, None)
    for b, sample in enumerate(samples):
        tokens, sources, mask = (sample[k].astype(np.int64) for k in schema.SAMPLE_KEYS)
        for t in range(len(tokens) - 1):
            counts = bool(mask[t + 1]) and sources[t + 1] == sources[t]
            assert int(micro["labels"][b, t]) == (tokens[t + 1] if counts else IGNORE_INDEX)
    assert len(raw) == entry["samples"]


@pytest.mark.parametrize("world_size,num_workers", [(2, 0), (2, 2), (4, 0), (1, 2)])
def test_steps_do_not_depend_on_ranks_or_workers(dataset, world_size, num_workers):
    reference = _steps(_loaders(dataset, 1), 12)
    assert _steps(_loaders(dataset, world_size, num_workers), 12) == reference


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_resume_on_another_world_size_continues_at_the_next_sample(dataset, before, after):
    straight = _steps(_loaders(dataset, 1), 14)
    first = _loaders(dataset, before, num_workers=2 if before == 2 else 0)
    head = _steps(first, 9)
    state = json.loads(json.dumps(merge_states([loader.state_dict() for loader in first])))  # as on disk
    second = _loaders(dataset, after)
    for loader in second:
        loader.load_state_dict(state)
    assert head + _steps(second, 5) == straight


def test_every_stream_reads_each_of_its_samples_once_per_epoch(dataset):
    manifest = load_manifest(dataset)
    streams = ShardStreams(dataset, manifest["shards"], 2, seed=7)
    for stream in range(2):
        shards = streams.stream_shards(stream, 0)
        total = sum(manifest["shards"][i]["samples"] for i in shards)
        samples, _, position = streams.take(stream, (0, 0, 0), total)
        ids = {hashlib.sha1(b"".join(s[k].tobytes() for k in schema.SAMPLE_KEYS)).hexdigest() for s in samples}
        assert len(ids) == total  # no sample twice, none skipped
        assert position[0] == 0 and position[1] == len(shards) - 1  # still inside epoch 0, on its last shard
        nxt, _, position = streams.take(stream, position, 1)
        assert position[0] == 1 and position[1] == 0  # the next sample opens epoch 1


def test_order_depends_on_seed(dataset):
    assert _steps(_loaders(dataset, 1, seed=3), 4) != _steps(_loaders(dataset, 1, seed=4), 4)


def test_excluded_sources_get_no_labels_and_pure_samples_are_skipped(dataset):
    (plain,) = _loaders(dataset, 1)
    step = next(iter(plain))
    victim = int(step[0]["source_ids"][0, 0])
    (loader,) = _loaders(dataset, 1, exclude_source_ids=[victim])
    for _, micro in zip(range(30), (m for s in loader for m in s)):
        counted = micro["labels"] != IGNORE_INDEX
        targets_of_victim = torch.zeros_like(counted)
        targets_of_victim[:, :] = micro["source_ids"] == victim
        assert not (counted & targets_of_victim).any()
        assert (counted.sum(dim=1) > 0).all()  # no sample without a counted target


def test_corrupt_or_missing_shards_are_errors_naming_them(dataset, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    name = load_manifest(copy)["shards"][3]["name"]
    raw = bytearray((copy / name).read_bytes())
    raw[600] ^= 0xFF
    (copy / name).write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=name):
        _loaders(copy, 1)  # verified up front (a small dataset)
    (loader,) = _loaders(copy, 1, verify=False)
    with pytest.raises(ShardError, match="sha256"):
        _steps([loader], 200)  # and again when read (within the first epoch of every stream)
    (copy / name).unlink()
    with pytest.raises(ShardError, match=f"{name} is missing"):
        _loaders(copy, 1)


def test_fixed_batches_of_the_holdout_split(dataset):
    holdout = set(load_manifest(dataset)["holdout"]["source_ids"])
    batches = fixed_batches(dataset, schema.SPLIT_HOLDOUT, 2, 3, seed=1)
    assert len(batches) == 3
    assert {int(s) for b in batches for s in torch.unique(b["source_ids"])} <= holdout
    again = fixed_batches(dataset, schema.SPLIT_HOLDOUT, 2, 3, seed=1)
    assert all(_row_ids(a) == _row_ids(b) for a, b in zip(batches, again))


def test_state_of_another_order_is_refused(dataset):
    (loader,) = _loaders(dataset, 1)
    _steps([loader], 2)
    state = loader.state_dict()
    (other,) = _loaders(dataset, 1, seed=9)
    with pytest.raises(RuntimeError, match="seed"):
        other.load_state_dict(state)
    (other,) = _loaders(dataset, 1, num_streams=2)
    with pytest.raises(RuntimeError, match="num_streams"):
        other.load_state_dict(state)


@pytest.mark.parametrize("args,field", [
    ((3, 8, 2, 1, 0, 0), "data_loader.num_streams"),  # does not divide the global batch
    ((4, 8, 2, 3, 0, 0), "data_loader.num_streams"),  # not a multiple of the world size
    ((4, 8, 2, 2, 0, 3), "data_loader.num_workers"),  # 2 streams per rank, 3 workers
    ((4, 8, 3, 1, 0, 0), "deepspeed.micro_batch"),  # 8 samples per step do not cut into 3s
])
def test_layout_errors_name_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        StreamLayout(*args)


def test_default_stream_count_prefers_equal_streams():
    assert default_num_streams(global_batch=8, num_shards=10, world_size=1) == 2  # 8 does not divide 10; 2 does
    assert default_num_streams(global_batch=8, num_shards=16, world_size=2) == 8
    assert default_num_streams(global_batch=4, num_shards=7, world_size=1) == 1
    with pytest.raises(ValueError, match="world size"):
        default_num_streams(global_batch=3, num_shards=7, world_size=2)
