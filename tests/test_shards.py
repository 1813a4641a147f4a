"""The shard stage end to end on a tiny JSONL corpus through the real ingest and tokenizer: WebDataset tars,
manifest hashes, registry, holdouts, atomic writes, idempotent reruns and resumption after an interruption."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from nulls_data_fixtures import build_dataset, data_config, write_corpus
from nulls_dist.data_pipeline.packing import (
    Context,
    PackingConfig,
    pack_articles,
    pack_blocks,
)
from nulls_dist.data_pipeline.pipeline import data_config_from_dict, run_stages
from nulls_dist.data_pipeline.shards import WORK_DIR, write_shard, write_shard_blocks

from nulls_dist.formats import atomic
from nulls_dist.formats import dataset as schema
from nulls_dist.formats.digests import file_sha256


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    # two worker processes: the parallel path is the one under test
    return build_dataset(tmp_path_factory.mktemp("shards"), shard={"num_workers": 2})


def _manifest(out: Path) -> dict:
    return json.loads((out / schema.MANIFEST_NAME).read_text())


def _read_all(out: Path, entries: list[dict]) -> list[dict]:
    urls = [str(out / e["name"]) for e in entries]
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def test_shards_are_webdataset_tars_with_schema_keys_and_dtypes(dataset):
    manifest = _manifest(dataset)
    samples = _read_all(dataset, manifest["shards"])
    assert len(samples) == manifest["num_samples"] > 0
    first = samples[0]
    assert first["__key__"] == schema.sample_key(0, 0)
    assert first[schema.TOKENS_KEY].dtype == np.uint16 and manifest["token_dtype"] == "uint16"
    assert first[schema.SOURCE_IDS_KEY].dtype == np.uint32
    assert first[schema.LOSS_MASK_KEY].dtype == np.uint8
    for s in samples:
        assert s[schema.TOKENS_KEY].shape == s[schema.SOURCE_IDS_KEY].shape == (manifest["context_length"],)
    assert sum(int(s[schema.LOSS_MASK_KEY].sum()) for s in samples) == manifest["num_tokens"]


def test_manifest_records_hashes_tokenizer_registry_and_config(dataset):
    manifest = _manifest(dataset)
    for entry in manifest["shards"] + manifest["holdout"]["shards"]:
        assert file_sha256(dataset / entry["name"]) == entry["sha256"]
        assert (dataset / entry["name"]).stat().st_size == entry["bytes"]
    assert manifest["tokenizer"]["sha256"] == file_sha256(dataset / manifest["tokenizer"]["path"])
    assert manifest["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert manifest["registry"]["sha256"] == file_sha256(dataset / schema.REGISTRY_NAME)
    assert manifest["packing"] == {"mode": "pack", "context_length": 32, "shuffle": True, "seed": 0}
    assert manifest["id_offset"] == 1000 and manifest["num_articles"] == 60


def test_registry_counts_every_source_token_and_split(dataset):
    manifest = _manifest(dataset)
    registry = pq.read_table(dataset / schema.REGISTRY_NAME).to_pylist()
    assert [r["source_id"] for r in registry] == list(range(1000, 1060))
    assert [r["title"] for r in registry[:2]] == ["Article 0", "Article 1"]
    holdout = set(manifest["holdout"]["source_ids"])
    assert len(holdout) == 3 and {r["source_id"] for r in registry if r["split"] == "holdout"} == holdout
    counted: dict[int, int] = {}
    shards_of: dict[int, set[str]] = {}
    for split, entries in (("train", manifest["shards"]), ("holdout", manifest["holdout"]["shards"])):
        for entry in entries:
            index = str(int(Path(entry["name"]).stem.removeprefix("shard-")))
            for s in _read_all(dataset, [entry]):
                real = s[schema.SOURCE_IDS_KEY][s[schema.LOSS_MASK_KEY] == 1]
                for sid, n in zip(*np.unique(real, return_counts=True)):
                    counted[int(sid)] = counted.get(int(sid), 0) + int(n)
                    shards_of.setdefault(int(sid), set()).add(index)
    for row in registry:
        assert counted[row["source_id"]] == row["tokens"] > 0
        assert set(row["shards"].split(",")) == shards_of[row["source_id"]]


def test_holdout_sources_never_reach_training_shards(dataset):
    manifest = _manifest(dataset)
    holdout = np.array(manifest["holdout"]["source_ids"])
    for s in _read_all(dataset, manifest["shards"]):
        assert not np.isin(s[schema.SOURCE_IDS_KEY], holdout).any()
    held = _read_all(dataset, manifest["holdout"]["shards"])
    assert held and all(np.isin(s[schema.SOURCE_IDS_KEY], holdout).all() for s in held)


def test_rerun_is_idempotent_and_resumes_after_interruption(tmp_path):
    out = build_dataset(tmp_path)
    manifest_bytes = (out / schema.MANIFEST_NAME).read_bytes()
    shard_times = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    cfg = data_config_from_dict(data_config(tmp_path / "corpus.jsonl", out))

    run_stages(cfg, ["all"])  # nothing to do: complete shards with a matching plan are kept
    assert (out / schema.MANIFEST_NAME).read_bytes() == manifest_bytes
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")} == shard_times

    # The state a kill leaves: some tasks never finished (no marker, no tar), one tar half written under its
    # temporary name, one finished shard lost afterwards, no manifest yet.
    names = sorted(shard_times)
    for name in names[: len(names) // 2]:
        (out / name).unlink()
        (out / WORK_DIR / name.replace(".tar", ".done.json")).unlink()
    atomic.temp_sibling(out / names[0]).write_bytes(b"partial tar")
    (out / names[-1]).unlink()
    (out / schema.MANIFEST_NAME).unlink()
    run_stages(cfg, ["shard"])
    assert (out / schema.MANIFEST_NAME).read_bytes() == manifest_bytes
    assert not list(out.glob(atomic.temp_glob()))
    kept = names[len(names) // 2 : -1]
    assert all((out / n).stat().st_mtime_ns == shard_times[n] for n in kept)


def test_changed_packing_rebuilds_the_shards(tmp_path):
    out = build_dataset(tmp_path)
    before = _manifest(out)
    cfg = data_config_from_dict(data_config(tmp_path / "corpus.jsonl", out, packing={"context_length": 48}))
    run_stages(cfg, ["shard"])
    after = _manifest(out)
    assert after["context_length"] == 48 and after["plan_hash"] != before["plan_hash"]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [e["name"] for e in after["shards"]]
    assert _read_all(out, after["shards"])[0][schema.TOKENS_KEY].shape == (48,)


def test_shard_write_is_atomic(tmp_path):
    def contexts():
        tokens = np.arange(8)
        yield Context(tokens, np.full(8, 7, np.uint32), np.ones(8, np.uint8))
        raise RuntimeError("worker killed mid-shard")

    target = tmp_path / schema.shard_name(0)
    with pytest.raises(RuntimeError, match="mid-shard"):
        write_shard(target, 0, contexts(), np.dtype(np.uint16))
    assert not target.exists() and not list(tmp_path.iterdir())  # the final name is never half written
    info = write_shard(target, 0, iter([Context(np.arange(8), np.full(8, 7, np.uint32), np.ones(8, np.uint8))]),
                       np.dtype(np.uint16))
    assert target.exists() and info["samples"] == 1 and info["sha256"] == file_sha256(target)


def test_block_writer_and_context_writer_give_the_same_tar(tmp_path):
    articles = [(7 + i, np.arange(1, 40 + 13 * i, dtype=np.int32)) for i in range(9)]
    cfg = PackingConfig(context_length=32)
    by_context, by_block, sources = tmp_path / "a.tar", tmp_path / "b.tar", []
    a = write_shard(by_context, 3, pack_articles(articles, cfg, 2, 3, 0), np.dtype(np.uint16))
    b = write_shard_blocks(by_block, 3, pack_blocks(articles, cfg, 2, 3, 0, np.uint16, block_tokens=64),
                           np.dtype(np.uint16), sources)
    assert a == b and by_context.read_bytes() == by_block.read_bytes()
    assert sorted(set(np.concatenate(sources).tolist())) == list(range(7, 16))
    first = next(iter(wds.WebDataset(str(by_block), shardshuffle=False).decode()))
    assert first["__key__"] == schema.sample_key(3, 0) and first[schema.TOKENS_KEY][:3].tolist() == [2, 1, 2]


def test_single_packing_and_explicit_holdout_titles(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 20)
    cfg = data_config(corpus, tmp_path / "data", packing={"mode": "single"},
                      holdout={"count": 0, "sources": ["Article 4", 1007]})
    run_stages(data_config_from_dict(cfg), ["all"])
    manifest = _manifest(tmp_path / "data")
    assert manifest["holdout"]["source_ids"] == [1004, 1007]
    for s in _read_all(tmp_path / "data", manifest["shards"]):
        assert len(np.unique(s[schema.SOURCE_IDS_KEY])) == 1


def test_unknown_config_field_is_named():
    with pytest.raises(ValueError, match=r"data.shard: unknown field\(s\) \['num_wrkers'\]"):
        data_config_from_dict({"shard": {"num_wrkers": 3}})


_KILLABLE = """
import json, sys
from nulls_dist.data_pipeline.pipeline import data_config_from_dict, run_stages
run_stages(data_config_from_dict(json.loads(sys.argv[1])), ["shard"])
"""


def test_a_killed_shard_run_resumes_to_the_same_manifest(tmp_path):
    import subprocess
    import sys
    import time

    corpus = write_corpus(tmp_path / "corpus.jsonl", 60)
    out = tmp_path / "data"
    raw = data_config(corpus, out, shard={"articles_per_shard": 1})  # 60 small tasks: a wide window to kill in
    run_stages(data_config_from_dict(raw), ["all"])
    reference = (out / schema.MANIFEST_NAME).read_bytes()
    for path in [*out.glob("shard-*.tar"), out / schema.MANIFEST_NAME]:
        path.unlink()
    shutil.rmtree(out / WORK_DIR)

    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, json.dumps(raw)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / WORK_DIR).glob("shard-*.done.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    done = len(list((out / WORK_DIR).glob("shard-*.done.json")))
    assert 3 <= done < 60 and not (out / schema.MANIFEST_NAME).exists(), "the run was not killed mid-way"

    run_stages(data_config_from_dict(raw), ["shard"])
    assert (out / schema.MANIFEST_NAME).read_bytes() == reference
    assert not list(out.glob(atomic.temp_glob()))


def test_shard_writing_process_stays_torch_free(tmp_path):
    """data_pipeline never imports torch; webdataset (which imports it when installed) is imported with torch
    hidden in a process that has not loaded torch, and its tars read back with the real webdataset."""
    target = tmp_path / "shard-000000.tar"
    code = ("import sys, numpy as np\n"
            "from pathlib import Path\n"
            "from nulls_dist.data_pipeline.packing import Context\n"
            "from nulls_dist.data_pipeline.shards import write_shard\n"
            "ctx = Context(np.arange(8), np.full(8, 7, np.uint32), np.ones(8, np.uint8))\n"
            f"write_shard(Path({str(target)!r}), 0, iter([ctx]), np.dtype(np.uint16))\n"
            "print('torch' in sys.modules, 'webdataset' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr
    samples = list(wds.WebDataset(str(target), shardshuffle=False))
    assert len(samples) == 1 and np.load(io.BytesIO(samples[0][schema.TOKENS_KEY])).tolist() == list(range(8))
