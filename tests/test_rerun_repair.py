"""A rerun of the data pipeline trusts nothing it reuses without its digest: a shard, holdout shard or shard stats
file damaged after its task finished is written again (the others are kept), a damaged registry, tokenizer or
ingest part is rebuilt, and the run says what it repaired."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from nulls_data_fixtures import build_dataset, data_config

from nulls_dist.data_pipeline.pipeline import data_config_from_dict, run_stages
from nulls_dist.data_pipeline.shards import WORK_DIR
from nulls_dist.formats import dataset as schema
from nulls_dist.formats.digests import file_sha256


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, dict]:
    out = build_dataset(tmp_path)
    return out, data_config(tmp_path / "corpus.jsonl", out)


def _rerun(raw: dict, stages=("all",)) -> dict:
    return run_stages(data_config_from_dict(raw), list(stages))


def _mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("shard-*.tar")}


@pytest.mark.parametrize("damage", [_flip_byte, _truncate], ids=["flipped-byte", "truncated"])
@pytest.mark.parametrize("which", ["train", "holdout"])
def test_a_damaged_shard_is_written_again_on_rerun(dataset, caplog, damage, which):
    out, raw = dataset
    manifest_bytes = (out / schema.MANIFEST_NAME).read_bytes()
    manifest = json.loads(manifest_bytes)
    entry = (manifest["shards"][1] if which == "train" else manifest["holdout"]["shards"][0])
    damage(out / entry["name"])
    before = _mtimes(out)

    with caplog.at_level(logging.WARNING):
        results = _rerun(raw)

    assert file_sha256(out / entry["name"]) == entry["sha256"]
    assert (out / entry["name"]).stat().st_size == entry["bytes"]
    assert (out / schema.MANIFEST_NAME).read_bytes() == manifest_bytes  # the same dataset again
    assert len(results["repaired"]) == 1 and entry["name"] in results["repaired"][0]
    assert entry["name"] in caplog.text and "writing its shards again" in caplog.text
    rewritten = {name for name, t in _mtimes(out).items() if t != before[name]}
    if which == "train":  # only the damaged shard's task ran again
        assert rewritten == {entry["name"]}
    else:  # the holdout task writes every holdout shard
        assert rewritten == {e["name"] for e in manifest["holdout"]["shards"]}


def test_an_intact_rerun_repairs_nothing(dataset):
    out, raw = dataset
    before = _mtimes(out)
    assert _rerun(raw)["repaired"] == []
    assert _mtimes(out) == before


def test_damaged_stats_or_marker_rerun_their_task(dataset, caplog):
    out, raw = dataset
    manifest_bytes = (out / schema.MANIFEST_NAME).read_bytes()
    registry_bytes = (out / schema.REGISTRY_NAME).read_bytes()
    _flip_byte(out / WORK_DIR / "shard-000002.stats.parquet")
    (out / WORK_DIR / "shard-000003.done.json").write_text('{"task": "shard-000003", "plan": ')
    before = _mtimes(out)
    with caplog.at_level(logging.WARNING):
        results = _rerun(raw, ["shard"])
    assert [r.split(":")[0] for r in results["repaired"]] == ["shard task shard-000002"]
    assert "shard-000003.done.json is not valid JSON" in caplog.text
    assert {n for n, t in _mtimes(out).items() if t != before[n]} == {"shard-000002.tar", "shard-000003.tar"}
    assert (out / schema.REGISTRY_NAME).read_bytes() == registry_bytes
    assert (out / schema.MANIFEST_NAME).read_bytes() == manifest_bytes


def test_a_damaged_registry_is_rebuilt_to_the_manifest_digest(dataset):
    out, raw = dataset
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    _flip_byte(out / schema.REGISTRY_NAME)
    _rerun(raw, ["shard"])
    assert file_sha256(out / schema.REGISTRY_NAME) == manifest["registry"]["sha256"]
    assert json.loads((out / schema.MANIFEST_NAME).read_text()) == manifest


def test_a_damaged_tokenizer_is_trained_again(dataset, caplog):
    out, raw = dataset
    manifest_bytes = (out / schema.MANIFEST_NAME).read_bytes()
    model = out / "tokenizer.model"
    digest = file_sha256(model)
    _flip_byte(model)
    with caplog.at_level(logging.WARNING):
        _rerun(raw)
    assert "tokenizer.model has sha256" in caplog.text and "training it again" in caplog.text
    assert file_sha256(model) == digest  # training is deterministic: the same model, so the same shards
    assert (out / schema.MANIFEST_NAME).read_bytes() == manifest_bytes


def test_a_damaged_ingest_part_is_ingested_again_or_named(dataset, caplog):
    out, raw = dataset
    manifest_bytes = (out / schema.MANIFEST_NAME).read_bytes()
    part = out / "ingest" / "articles" / "part-00000.parquet"
    digest = file_sha256(part)
    _flip_byte(part)
    # a run without the ingest stage cannot rewrite the part: it refuses to read it, naming it
    with pytest.raises(ValueError, match=r"part-00000\.parquet: sha256 .*rerun the ingest stage"):
        _rerun(raw, ["shard"])
    with caplog.at_level(logging.WARNING):
        _rerun(raw)
    assert "part-00000.parquet: sha256" in caplog.text and "ingesting again" in caplog.text
    assert file_sha256(part) == digest
    assert (out / schema.MANIFEST_NAME).read_bytes() == manifest_bytes
