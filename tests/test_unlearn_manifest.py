"""Checkpoint consolidation (DeepSpeed ZeRO 0/2/3 -> NullTransformer state dict), deployed checkpoints, and the
per-source sink manifest (format version 2) checked against brute-force set computations and a by-hand digest."""
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
from nulls_dist.audit import sink_digests  # noqa: E402
from nulls_dist.audit.manifest import (  # noqa: E402
    INDEX_NAME, ManifestOptions, build_manifest, iter_manifest, manifest_digest, read_index, sinks_array,
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


def _row_bytes(state, layer: int, unit: int) -> bytes:
    """gate | up | down row of one unit in one layer, float32 little-endian (the digest's row)."""
    return b"".join(state[k][unit].to(torch.float32).numpy().astype("<f4").tobytes() for k in sink_table_keys(layer))


def _digest_by_hand(state, n_layer: int, sinks, shared: bool) -> bytes:
    """docs/unlearning.md's definition, written out: a key's digest over its rows, then one hash over them."""
    if shared:
        keys = [hashlib.sha256(b"".join(_row_bytes(state, layer, u) for layer in range(n_layer))).digest()
                for u in sinks]
    else:
        keys = [hashlib.sha256(_row_bytes(state, layer, u)).digest() for layer, units in enumerate(sinks)
                for u in units]
    return hashlib.sha256(b"".join(keys)).digest()


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
        assert row["sinks"] == sorted(u for _, u in sets[row["source_id"]])  # one list: every layer's units
        assert (row["num_sharing"], row["max_overlap"], row["max_overlap_source"]) == expected[row["source_id"]]
    # the digest of one source's sink rows, recomputed by hand from the definition
    assert rows[3]["sink_digest"] == _digest_by_hand(ckpt.state_dict, cfg.n_layer, rows[3]["sinks"], shared=True)


def test_shared_sinks_stored_once_and_digest_covers_every_layer(run, tmp_path):
    """Layers share the mask: one sink list per record, and the digest changes with any layer's row of any
    of the source's units (gate, up or down), while a source without that unit keeps its digest."""
    ckpt = load_checkpoint(run / "run")
    cfg, state = ckpt.model_config, ckpt.state_dict
    assert not cfg.sink_layer_specific and cfg.n_layer == 2
    index = build_manifest(tmp_path / "m", state_dict=state, model_cfg=cfg, registry_path=run / "registry.parquet",
                           checkpoint_sha256="0" * 64, opts=ManifestOptions(chunk_rows=7))
    assert index["version"] == 2 and index["layers_share_sinks"] is True and index["layer_specific"] is False
    assert index["sink_digest"] == sink_digests.DEFINITION
    assert index["schema"]["sinks"] == "list<item: int32>"
    table = _read(tmp_path / "m")
    assert table.schema.field("sinks").type == pa.list_(pa.int32())
    assert table.schema.field("sink_digest").type == pa.binary(32)
    rows = table.to_pylist()
    assert all(isinstance(u, int) for row in rows for u in row["sinks"])
    assert sink_digests.recompute_hex(state, cfg.n_layer, cfg.n_sink, True, [r["sinks"] for r in rows]) == [
        r["sink_digest"].hex() for r in rows]
    source, unit = rows[5], rows[5]["sinks"][0]
    others = [r for r in rows if unit not in r["sinks"]]
    assert others
    for layer in range(cfg.n_layer):
        for key in sink_table_keys(layer):
            changed = dict(state)
            changed[key] = state[key].clone()
            changed[key][unit, -1] += 1e-3
            again = sink_digests.recompute_hex(changed, cfg.n_layer, cfg.n_sink, True,
                                               [source["sinks"], others[0]["sinks"]])
            assert again[0] != source["sink_digest"].hex(), key
            assert again[1] == others[0]["sink_digest"].hex(), key
    # end to end: the manifest of the changed weights differs exactly for the sources holding that unit
    build_manifest(tmp_path / "m2", state_dict=changed, model_cfg=cfg, registry_path=run / "registry.parquet",
                   checkpoint_sha256="0" * 64)
    for a, b in zip(rows, _read(tmp_path / "m2").to_pylist()):
        assert (a["sink_digest"] != b["sink_digest"]) == (unit in a["sinks"])


def test_manifest_workers_and_version_1_refused(run, tmp_path):
    """Threads change nothing in the output; a version-1 index is refused with its path in the message."""
    ckpt = load_checkpoint(run / "run")
    shards = []
    for workers in (1, 2):
        index = build_manifest(tmp_path / f"w{workers}", state_dict=ckpt.state_dict, model_cfg=ckpt.model_config,
                               registry_path=run / "registry.parquet", checkpoint_sha256="0" * 64,
                               opts=ManifestOptions(chunk_rows=5, shard_rows=16, workers=workers))
        shards.append([(s["name"], s["rows"], s["sha256"]) for s in index["shards"]])
    assert shards[0] == shards[1] and len(shards[0]) == 3
    path = tmp_path / "w1" / INDEX_NAME
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "version": 1}))
    with pytest.raises(ValueError, match="version 1") as err:
        list(iter_manifest(tmp_path / "w1"))
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="contradicts"):
        path.write_text(json.dumps({**doc, "layers_share_sinks": False}))
        read_index(tmp_path / "w1")


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
    index = read_index(tmp_path / "m")
    assert index["layers_share_sinks"] is False and index["schema"]["sinks"] == "list<item: list<item: int32>>"
    assignment = SinkAssignment(cfg.sink_assignment_config())
    for i, row in enumerate(table.to_pylist()):
        assert row["trained"] == (row["source_id"] in trained_ids)
        assert (row["num_sharing"], row["max_overlap"], row["max_overlap_source"]) == expected[row["source_id"]]
        assert row["sinks"] == [assignment.rows(torch.tensor([row["source_id"]]), layer)[0].tolist()
                                for layer in range(cfg.n_layer)]  # one list per layer
    row = table.slice(4, 1).to_pylist()[0]
    assert row["sink_digest"] == _digest_by_hand(state, cfg.n_layer, row["sinks"], shared=False)


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
