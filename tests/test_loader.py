"""The torch-side shard loader: disjoint rank x worker split, (seed, epoch) shuffling, exact resume from
`state_dict()` with 2 ranks x 2 DataLoader workers, manifest checks (missing / corrupt shards), forget sets."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from nulls_dist.formats import dataset as schema
from nulls_data_fixtures import build_dataset
from nulls_dist.data import ShardDataset, build_loader


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("loader"))


def _manifest(path: Path) -> dict:
    return json.loads((path / schema.MANIFEST_NAME).read_text())


def _batches(loader, limit=None) -> list[dict]:
    out = []
    for batch in loader:
        out.append({k: v.clone() for k, v in batch.items()})
        if limit is not None and len(out) == limit:
            break
    return out


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() == {"tokens", "source_ids", "loss_mask"}
        for key in x:
            assert torch.equal(x[key], y[key])


def test_batches_have_contract_shapes_and_dtypes(dataset):
    batch = next(iter(build_loader(dataset, batch_size=3, num_epochs=1)))
    T = _manifest(dataset)["context_length"]
    assert batch["tokens"].shape == batch["source_ids"].shape == batch["loss_mask"].shape == (3, T)
    assert batch["tokens"].dtype == batch["source_ids"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.bool


@pytest.mark.parametrize("num_workers", [2, 0])
def test_resume_mid_epoch_gives_the_uninterrupted_batches_bit_for_bit(dataset, num_workers):
    for rank in range(2):
        make = lambda: build_loader(dataset, batch_size=3, rank=rank, world_size=2, seed=5,  # noqa: E731
                                    num_workers=num_workers, num_epochs=2)
        full = _batches(make())
        assert len(full) > 8
        for stop in (3, len(full) // 2 + 1):
            first = make()
            head = _batches(first, limit=stop)
            state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
            resumed = make()
            resumed.load_state_dict(state)
            _assert_same(head + _batches(resumed), full)


def _all_samples(dataset: Path) -> list[bytes]:
    urls = [str(dataset / e["name"]) for e in _manifest(dataset)["shards"]]
    return sorted(s[schema.TOKENS_KEY].astype(np.int64).tobytes() + s[schema.SOURCE_IDS_KEY].astype(np.int64).tobytes()
                  for s in wds.WebDataset(urls, shardshuffle=False).decode())


def test_ranks_and_workers_split_an_epoch_disjointly_and_completely(dataset):
    seen = []
    for rank in range(2):
        for batch in build_loader(dataset, batch_size=2, rank=rank, world_size=2, seed=1, num_workers=2,
                                  num_epochs=1):
            seen += [t.numpy().tobytes() + s.numpy().tobytes() for t, s in zip(batch["tokens"], batch["source_ids"])]
    assert sorted(seen) == _all_samples(dataset)  # every sample exactly once across 2 ranks x 2 workers


def test_order_depends_on_seed_and_epoch_only(dataset):
    ds = ShardDataset(dataset, rank=0, world_size=2, seed=3)
    assert ds.worker_shards(0, 0, 2) == ShardDataset(dataset, rank=0, world_size=2, seed=3).worker_shards(0, 0, 2)
    orders = {tuple(ShardDataset(dataset, seed=3).worker_shards(e, 0, 1)) for e in range(4)}
    assert len(orders) > 1
    a = _batches(build_loader(dataset, batch_size=4, seed=3, num_epochs=1))
    b = _batches(build_loader(dataset, batch_size=4, seed=4, num_epochs=1))
    assert not all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))


def test_excluded_sources_are_masked_and_pure_samples_dropped(dataset):
    full = _batches(build_loader(dataset, batch_size=1, num_epochs=1))
    counts: dict[int, int] = {}
    for b in full:
        for s in b["source_ids"][b["loss_mask"]].tolist():
            counts[s] = counts.get(s, 0) + 1
    long_source = max(counts, key=counts.get)  # spans whole contexts on its own
    excluded = {long_source, min(counts)}
    kept = _batches(build_loader(dataset, batch_size=1, num_epochs=1, exclude_source_ids=excluded))
    assert len(kept) < len(full)
    for b in kept:
        excluded_tokens = torch.isin(b["source_ids"], torch.tensor(sorted(excluded)))
        assert not b["loss_mask"][excluded_tokens].any() and b["loss_mask"].any()
    kept_counts: dict[int, int] = {}
    for b in kept:
        for s in b["source_ids"][b["loss_mask"]].tolist():
            kept_counts[s] = kept_counts.get(s, 0) + 1
    assert kept_counts == {s: n for s, n in counts.items() if s not in excluded}


def _copy(dataset: Path, tmp: Path) -> Path:
    dst = tmp / "copy"
    shutil.copytree(dataset, dst, ignore=shutil.ignore_patterns("ingest"))
    return dst


def test_missing_shard_is_an_error_naming_it(dataset, tmp_path):
    data = _copy(dataset, tmp_path)
    name = _manifest(data)["shards"][2]["name"]
    (data / name).unlink()
    with pytest.raises(ValueError, match=f"{name} is missing"):
        ShardDataset(data)


def test_corrupt_shard_is_an_error_naming_it(dataset, tmp_path):
    data = _copy(dataset, tmp_path)
    name = _manifest(data)["shards"][1]["name"]
    raw = bytearray((data / name).read_bytes())
    raw[2000] ^= 0xFF
    (data / name).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{name}.*sha256"):
        _batches(build_loader(data, batch_size=2, num_epochs=1))


def test_skip_mode_counts_and_logs_bad_shards(dataset, tmp_path, caplog):
    data = _copy(dataset, tmp_path)
    shards = _manifest(data)["shards"]
    (data / shards[0]["name"]).unlink()
    (data / shards[3]["name"]).write_bytes(b"not a tar")
    caplog.set_level(logging.WARNING)
    loader = build_loader(data, batch_size=1, num_epochs=1, on_bad_shard="skip")
    got = _batches(loader)
    assert loader.dataset.num_skipped_shards == 2
    assert len(got) == sum(s["samples"] for s in shards) - shards[0]["samples"] - shards[3]["samples"]
    assert shards[0]["name"] in caplog.text and shards[3]["name"] in caplog.text


def test_holdout_split_reads_only_holdout_shards(dataset):
    holdout = set(_manifest(dataset)["holdout"]["source_ids"])
    batches = _batches(build_loader(dataset, batch_size=1, split="holdout", num_epochs=1))
    assert batches and all(set(b["source_ids"].flatten().tolist()) <= holdout for b in batches)


def test_state_from_another_layout_is_refused(dataset):
    loader = build_loader(dataset, batch_size=2, rank=0, world_size=2, num_epochs=1)
    _batches(loader, limit=1)
    other = build_loader(dataset, batch_size=2, rank=0, world_size=1, num_epochs=1)
    with pytest.raises(RuntimeError, match="world_size"):
        other.load_state_dict(loader.state_dict())
