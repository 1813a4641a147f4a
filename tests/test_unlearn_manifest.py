"""Checkpoint consolidation (DeepSpeed ZeRO 0/2/3 -> NullTransformer state dict), deployed checkpoints, and the
per-source sink manifest checked against brute-force set computations."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from unlearn_helpers import ID_OFFSET, NUM_HOLDOUT, NUM_TRAIN, make_ds_checkpoint, make_registry  # noqa: E402

from nulls_dist.config import NullConfig  # noqa: E402
from nulls_dist.model import NullTransformer  # noqa: E402
from nulls_dist.sinks import SinkAssignment  # noqa: E402
from nulls_dist.deploy.checkpoint_io import build_model, load_checkpoint, save_deployed, sink_table_keys  # noqa: E402
from nulls_dist.formats.weights import state_dict_digest  # noqa: E402
from nulls_dist.audit.manifest import (  # noqa: E402
    INDEX_NAME, ManifestOptions, build_manifest, manifest_digest, sinks_array,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    make_ds_checkpoint(root / "run", zero_stage=2)
    make_registry(root / "registry.parquet")
    return root


def _read(manifest_dir: Path) -> pa.Table:
    index = json.loads((manifest_dir / INDEX_NAME).read_text())
    return pa.concat_tables([pq.read_table(manifest_dir / s["name"]) for s in index["shards"]])


def _sink_sets(cfg: NullConfig, ids, layer_keys: bool) -> dict[int, set]:
    a = SinkAssignment(cfg.sink_assignment_config())
    out = {}
    for sid in ids:
        keys = set()
        for layer in range(cfg.n_layer if layer_keys else 1):
            rows = a.rows(torch.tensor([sid]), layer)[0]
            keys |= {(layer, int(r)) for r in rows[rows >= 0]}
        out[sid] = keys
    return out


def _brute_force(sets: dict[int, set], ref_ids) -> dict[int, tuple[int, int, int]]:
    out = {}
    for sid, keys in sets.items():
        shares = {t: len(keys & sets[t]) for t in ref_ids if t != sid}
        sharing = sum(1 for v in shares.values() if v > 0)
        best = max(shares.values(), default=0)
        partner = min((t for t, v in shares.items() if v == best), default=-1) if best > 0 else -1
        out[sid] = (sharing, best, partner)
    return out


@pytest.mark.parametrize("stage", [0, 3])
def test_consolidates_other_zero_stages(tmp_path, stage):
    run_dir = make_ds_checkpoint(tmp_path / f"z{stage}", zero_stage=stage)
    ckpt = load_checkpoint(run_dir)
    expected = torch.load(run_dir / "expected_state.pt")
    assert set(ckpt.state_dict) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(ckpt.state_dict[key], value.float(), rtol=0, atol=0)


def test_zero2_checkpoint_and_deployed_roundtrip(run, tmp_path):
    ckpt = load_checkpoint(run / "run")
    expected = torch.load(run / "run" / "expected_state.pt")
    assert ckpt.kind == "training" and ckpt.path.name == "step_00000003"
    for key, value in expected.items():
        torch.testing.assert_close(ckpt.state_dict[key], value, rtol=0, atol=0)
    model = build_model(ckpt)
    assert isinstance(model, NullTransformer)
    save_deployed(tmp_path / "dep", ckpt.state_dict, ckpt.meta)
    assert not list((tmp_path / "dep").glob(".*tmp*"))
    deployed = load_checkpoint(tmp_path / "dep")
    assert deployed.kind == "deployed"
    assert state_dict_digest(deployed.state_dict) == state_dict_digest(ckpt.state_dict)
    changed = dict(ckpt.state_dict)
    changed["lm_head.weight"] = changed["lm_head.weight"].clone()
    changed["lm_head.weight"][0, 0] += 1e-3
    assert state_dict_digest(changed) != state_dict_digest(ckpt.state_dict)


def test_missing_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_manifest_exact_matches_brute_force(run, tmp_path):
    ckpt = load_checkpoint(run / "run")
    cfg = ckpt.model_config
    digest = state_dict_digest(ckpt.state_dict)
    index = build_manifest(tmp_path / "m", state_dict=ckpt.state_dict, model_cfg=cfg,
                           registry_path=run / "registry.parquet", checkpoint_sha256=digest,
                           data_manifest_sha256="d" * 64, opts=ManifestOptions(shard_rows=16, overlap="exact"))
    assert [s["rows"] for s in index["shards"]] == [16, 16, 12]
    assert index["overlap"]["method"] == "exact" and index["num_trained"] == NUM_TRAIN
    assert index["checkpoint_sha256"] == digest and len(manifest_digest(tmp_path / "m")) == 64
    table = _read(tmp_path / "m")
    ids = table.column("source_id").to_pylist()
    assert ids == list(range(ID_OFFSET, ID_OFFSET + NUM_TRAIN + NUM_HOLDOUT))
    assert index["shards"][1]["first_source_id"] == ID_OFFSET + 16
    trained_ids = ids[:NUM_TRAIN]
    sets = _sink_sets(cfg, ids, layer_keys=False)
    expected = _brute_force(sets, trained_ids)
    rows = table.to_pylist()
    for row in rows:
        assert row["trained"] == (row["source_id"] in trained_ids)
        assert row["tokens"] == ((row["source_id"] - ID_OFFSET) * 10 + 100 if row["trained"] else 0)
        assert row["overlap_exact"]
        assert len(row["sinks"]) == cfg.n_layer and all(s == sorted(u for _, u in sets[row["source_id"]])
                                                         for s in row["sinks"])
        assert (row["num_sharing"], row["max_overlap"], row["max_overlap_source"]) == expected[row["source_id"]]
    # the digest of one source's sink rows, recomputed by hand
    row = rows[3]
    h = hashlib.sha256()
    for layer, units in enumerate(row["sinks"]):
        tables = [ckpt.state_dict[k].numpy() for k in sink_table_keys(layer)]
        for u in units:
            h.update(hashlib.sha256(np.concatenate([t[u] for t in tables]).tobytes()).digest())
    assert row["sink_digest"] == h.hexdigest()


def test_manifest_layer_specific_and_excluded(run, tmp_path):
    cfg = NullConfig.from_preset("debug", sink_strategy="uniform", sink_layer_specific=True, sink_k=6)
    torch.manual_seed(0)
    state = NullTransformer(cfg).state_dict()
    excluded = [ID_OFFSET + 2, ID_OFFSET + 7]
    build_manifest(tmp_path / "m", state_dict=state, model_cfg=cfg, registry_path=run / "registry.parquet",
                   checkpoint_sha256=state_dict_digest(state),
                   opts=ManifestOptions(overlap="exact", exclude_source_ids=excluded))
    table = _read(tmp_path / "m")
    ids = table.column("source_id").to_pylist()
    trained_ids = [i for i in ids[:NUM_TRAIN] if i not in excluded]
    sets = _sink_sets(cfg, ids, layer_keys=True)
    expected = _brute_force(sets, trained_ids)
    rows = sinks_array(table.column("sinks"))  # (S, L, K)
    assert rows.shape == (len(ids), cfg.n_layer, 6)
    assert not np.array_equal(rows[:, 0], rows[:, 1])  # layers differ
    for i, row in enumerate(table.to_pylist()):
        assert row["trained"] == (row["source_id"] in trained_ids)
        assert (row["num_sharing"], row["max_overlap"], row["max_overlap_source"]) == expected[row["source_id"]]


def test_manifest_sampled_estimates(run, tmp_path):
    cfg = NullConfig.from_preset("debug", sink_strategy="uniform", sink_k=4)
    state = NullTransformer(cfg).state_dict()
    index = build_manifest(tmp_path / "m", state_dict=state, model_cfg=cfg, registry_path=run / "registry.parquet",
                           checkpoint_sha256="x", opts=ManifestOptions(overlap="sampled", overlap_sample=10, seed=3))
    assert index["overlap"] == {"method": "sampled", "reference_sources": 10, "seed": 3, "unit": "pool unit"}
    table = _read(tmp_path / "m")
    ids = table.column("source_id").to_pylist()
    sample = np.sort(np.random.default_rng(3).choice(np.array(ids[:NUM_TRAIN], dtype=np.int64), 10, replace=False))
    sets = _sink_sets(cfg, ids, layer_keys=False)
    in_sample = _brute_force(sets, sample.tolist())
    for row in table.to_pylist():
        sharing, best, partner = in_sample[row["source_id"]]
        others = 10 - (row["source_id"] in sample)
        assert not row["overlap_exact"]
        assert row["num_sharing"] == round(sharing * (NUM_TRAIN - 1) / others)
        assert (row["max_overlap"], row["max_overlap_source"]) == (best, partner)


def test_manifest_cli(run, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-c", "from nulls_dist.cli.manifest import main; main()",
                           f"checkpoint={run / 'run'}", f"out={out}", f"registry={run / 'registry.parquet'}",
                           "exclude_sources=[4100,'Article 9']"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["num_sources"] == NUM_TRAIN + NUM_HOLDOUT and summary["num_trained"] == NUM_TRAIN - 2
    assert (out / INDEX_NAME).is_file() and not list(tmp_path.glob("*.log"))
    bad = subprocess.run([sys.executable, "-c", "from nulls_dist.cli.manifest import main; main()",
                          f"checkpoint={run / 'run'}", f"out={tmp_path / 'bad'}",
                          f"registry={run / 'registry.parquet'}", "exclude_sources=['No such title']"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "No such title" in bad.stderr
    assert not (tmp_path / "bad").exists()
