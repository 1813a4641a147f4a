"""Large sink pools without TorchRec in the process: the config (pools of 2**24 rows and more for uniform/code,
the trainer's `sink_tables` section), compact sink plans, the model on external rows (outputs and every gradient
against the same model holding dense tables; no host sync in the step), the deployment's row store (only the
rows a mode needs are read; a fine-tuned copy trains the rows it uses exactly as the dense model would), the lazy
weights file (streamed digest, zeroed copy) and the restricted reading of DCP's pickled index. The multi-process
runs are tests/test_train_sink_tables.py.
"""
from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from nulls_dist.bench.syncs import SyncCounter
from nulls_dist.config import NullConfig
from nulls_dist.deploy.checkpoint_io import LoadedCheckpoint, build_model, load_checkpoint, save_deployed
from nulls_dist.formats import checkpoint as layout
from nulls_dist.formats.weights import (WeightsFile, copy_zeroing_rows, load_weights, read_rows, save_weights,
                                        state_dict_digest)
from nulls_dist.model import IGNORE_INDEX, NullTransformer, SinkMode
from nulls_dist.sink_plan import compact_rows_numpy, plan_for_batch, plan_for_mode
from nulls_dist.sinks import SinkAssignment

BASE = 4096  # debug vocabulary: source ids start here
SHARDED = {"mode": "sharded", "layout": "per_layer", "num_layers": 2, "rows": 0, "dim": 64,
           "optimizer": "rowwise_adagrad"}


def model_config(layer_specific: bool = True, pool: int = 4099, k: int = 9) -> NullConfig:
    return NullConfig.from_preset("debug", sink_strategy="uniform", sink_k=k, sink_layer_specific=layer_specific,
                                  sink_pool_size=pool)


def batch(seed: int = 0, rows: int = 3, length: int = 40):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 4096, (rows, length), generator=gen)
    source_ids = torch.tensor([[BASE] * 10 + [BASE + 1] * 30, [BASE + 2] * 40, [BASE + 3] * 5 + [BASE] * 35])
    labels = torch.randint(0, 4096, (rows, length), generator=gen)
    labels[:, ::7] = IGNORE_INDEX
    return input_ids, source_ids, labels


def dense_and_external(cfg: NullConfig) -> tuple[NullTransformer, NullTransformer]:
    torch.manual_seed(0)
    dense = NullTransformer(cfg)
    external = NullTransformer(cfg, sink_storage="external")
    external.load_state_dict({k: v for k, v in dense.state_dict().items() if ".sink_" not in k})
    return dense, external


def rows_of(dense: NullTransformer, plan) -> list[torch.Tensor]:
    """What a lookup returns: per layer the plan's table rows [gate | up | down], as fresh leaves."""
    out = []
    for layer, block in enumerate(dense.transformer.h):
        rows = plan.layer_table_rows(layer)
        mlp = block.mlp
        out.append(torch.cat([mlp.sink_gate[rows], mlp.sink_up[rows], mlp.sink_down[rows]], 1).detach()
                   .requires_grad_(True))
    return out


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("strategy", ["uniform", "code"])
@pytest.mark.parametrize("pool", [2**24, 2**26 + 5])
def test_pools_of_2_24_rows_and_more_for_uniform_and_code(strategy, pool):
    cfg = NullConfig.from_preset("debug", sink_strategy=strategy, sink_k=32, sink_pool_size=pool,
                                 sink_layer_specific=True, num_sources=10**6, min_source_id=BASE)
    assert cfg.n_sink == pool and cfg.n_backbone == 64 and cfg.n_mlp_units == 64 + pool
    assignment = SinkAssignment(cfg.sink_assignment_config())
    ids = torch.arange(BASE, BASE + 50)
    per_layer = [assignment.rows(ids, layer) for layer in range(cfg.n_layer)]
    for rows in per_layer:
        assert rows.shape == (50, 32) and int(rows.min()) >= 0 and int(rows.max()) < pool
        assert all(len(set(r.tolist())) == 32 for r in rows)
    assert not torch.equal(per_layer[0], per_layer[1])  # layer-specific hashing at any size
    plan = plan_for_batch(np.full((1, 8), BASE + 7), cfg, assignment, compact=True)
    assert [r.numel() for r in plan.table_rows] == [32, 32]


@pytest.mark.parametrize("changes,match", [
    (dict(sink_strategy="reference", sink_pool_size=2**20), "'reference'.*keeps its pool"),
    (dict(sink_strategy="uniform", sink_pool_size=2**20), "sink_k must be set with sink_pool_size"),
    (dict(sink_strategy="uniform", sink_k=4, sink_pool_size=0), "sink_pool_size must be an integer"),
    (dict(sink_strategy="uniform", sink_k=4, sink_pool_size=2**31), "sink_pool_size must be an integer"),
    (dict(sink_strategy="uniform", sink_k=4, sink_pool_size=True), "sink_pool_size must be an integer"),
    (dict(sink_strategy="uniform", sink_k=40, sink_pool_size=16), "sink_k=40 must lie in"),
])
def test_pool_size_errors_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        NullConfig.from_preset("debug", **changes)


def _train_config(**section):
    from train_helpers import compose_raw

    from nulls_dist.train.config import train_config_from_dict

    raw = compose_raw([])
    raw["sink_tables"].update(section)
    return train_config_from_dict(raw)


@pytest.mark.parametrize("field,value", [("mode", "sparse"), ("auto_min_rows", 0), ("layout", "rows"),
                                         ("optimizer", "adam"), ("lr", float("nan")), ("lr", 2.0), ("eps", 0.0),
                                         ("init_std", -1.0), ("follow_schedule", "yes")])
def test_sink_tables_section_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"sink_tables.{field} must be"):
        _train_config(**{field: value})
    with pytest.raises(ValueError, match="sink_tables.rows"):
        _train_config(rows=3)  # an unknown key is named too


def test_auto_mode_shards_large_pools_only_and_masked_needs_dense_tables():
    from nulls_dist.train.table_sinks import uses_sharded_tables

    cfg = _train_config()
    assert cfg.sink_tables.mode == "auto" and cfg.sink_tables.auto_min_rows == 2**20
    small, large = model_config(pool=2**20 - 1), model_config(pool=2**20)
    assert not uses_sharded_tables(cfg, small) and uses_sharded_tables(cfg, large)
    assert uses_sharded_tables(_train_config(mode="sharded"), small)
    assert not uses_sharded_tables(_train_config(mode="dense"), large)
    masked = _train_config(mode="sharded")
    masked.sink_path = "masked"
    with pytest.raises(ValueError, match="sink_tables.mode=dense"):
        uses_sharded_tables(masked, small)


# ------------------------------------------------------------------------------------------------ plans
@pytest.mark.parametrize("layer_specific", [True, False])
def test_compact_plans_name_each_source_rows_through_local_indices(layer_specific):
    cfg = model_config(layer_specific)
    assignment = SinkAssignment(cfg.sink_assignment_config())
    _, source_ids, _ = batch()
    plan = plan_for_batch(source_ids.numpy(), cfg, assignment, compact=True)
    assert len(plan.table_rows) == (2 if layer_specific else 1) and plan.local_rows.shape == plan.rows.shape
    plan.check(cfg.n_sink)  # ascending distinct table rows, local indices naming exactly the pool rows
    for layer in range(cfg.n_layer):
        rows, local = plan.layer_table_rows(layer), plan.layer_local_rows(layer)
        pool = plan.layer_rows(layer)
        assert torch.equal(torch.where(local >= 0, rows[local.clamp(min=0)], -1), pool)
        assert torch.equal(rows, torch.unique(pool[pool >= 0]))
    broken = plan_for_batch(source_ids.numpy(), cfg, assignment, compact=True)
    broken.local_rows[0, 0, 0] = (broken.local_rows[0, 0, 0] + 1) % broken.table_rows[0].numel()
    with pytest.raises(ValueError, match="do not name the plan's pool rows"):
        broken.check(cfg.n_sink)
    from nulls_dist.train.data import plan_builder

    shipped = pickle.loads(pickle.dumps(plan_builder(cfg, assignment, compact=True)))  # as to a loader worker
    built = shipped(source_ids.numpy())
    assert all(torch.equal(a, b) for a, b in zip(built.table_rows, plan.table_rows))
    assert torch.equal(built.local_rows, plan.local_rows)
    distinct, local = compact_rows_numpy(np.array([[5, 9, -1], [9, 2, 5]]))
    assert distinct.tolist() == [2, 5, 9] and local.tolist() == [[1, 2, -1], [2, 0, 1]]
    expected = plan_for_mode(SinkMode.expected(), (1, 4), cfg, assignment, compact=True)
    assert expected.kind == "dense" and torch.equal(expected.table_rows[0], torch.arange(cfg.n_sink))
    masked = NullConfig.from_preset("debug", sink_path="masked")
    with pytest.raises(ValueError, match="sink_path 'masked'"):
        plan_for_batch(source_ids.numpy(), masked, SinkAssignment(masked.sink_assignment_config()), compact=True)


# ------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("layer_specific", [True, False])
def test_external_rows_give_the_dense_model_outputs_and_gradients(layer_specific):
    cfg = model_config(layer_specific)
    dense, external = dense_and_external(cfg)
    input_ids, source_ids, labels = batch()
    plan = plan_for_batch(source_ids.numpy(), cfg, dense.sink_assignment, compact=True)
    rows = rows_of(dense, plan)
    want = dense(input_ids, source_ids, plan=plan, labels=labels)
    want.backward()
    got = external(input_ids, source_ids, plan=plan, labels=labels, sink_rows=rows)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for layer, block in enumerate(dense.transformer.h):
        table_rows, dim = plan.layer_table_rows(layer), cfg.n_embd
        for index, name in enumerate(("sink_gate", "sink_up", "sink_down")):
            full = getattr(block.mlp, name).grad
            torch.testing.assert_close(rows[layer].grad[:, index * dim: (index + 1) * dim], full[table_rows],
                                       rtol=1e-5, atol=1e-8)
            untouched = torch.ones(cfg.n_sink, dtype=torch.bool)
            untouched[table_rows] = False
            assert torch.all(full[untouched] == 0)  # the rows a lookup leaves out get no gradient
    for (name, a), b in zip(dense.named_parameters(), (p for n, p in dense.named_parameters())):
        if ".sink_" not in name:
            torch.testing.assert_close(dict(external.named_parameters())[name].grad, b.grad, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="pass sink_rows"):
        external(input_ids, source_ids, plan=plan, labels=labels)
    with pytest.raises(ValueError, match="compact sink plan"):
        external(input_ids, source_ids, plan=plan_for_batch(source_ids.numpy(), cfg, dense.sink_assignment),
                 labels=labels, sink_rows=rows)


def test_a_forward_on_external_rows_has_no_host_sync():
    cfg = model_config(True)
    dense, external = dense_and_external(cfg)
    input_ids, source_ids, labels = batch(1)
    plan = plan_for_batch(source_ids.numpy(), cfg, dense.sink_assignment, compact=True)  # as the workers do
    rows = rows_of(dense, plan)
    with SyncCounter() as counter:
        loss = external(input_ids, source_ids, plan=plan, labels=labels, sink_rows=rows)
        loss.backward()
    assert counter.total == 0, dict(counter.counts)
    with SyncCounter() as planless:  # the counter sees a forward that must read the ids back
        external(input_ids, source_ids, labels=labels, sink_rows=rows)
    assert planless.total > 0


# ------------------------------------------------------------------------------------------------ deployment
@pytest.fixture
def lazy_checkpoint(tmp_path):
    """A deployed checkpoint whose meta says its sink tables were sharded in training, and the dense model."""
    cfg = model_config(True, pool=2**12 + 3)
    torch.manual_seed(0)
    dense = NullTransformer(cfg).eval()
    meta = {"model": cfg.to_dict(), "sink_tables": {**SHARDED, "rows": cfg.n_sink}}
    save_deployed(tmp_path / "deployed", dense.state_dict(), meta)
    return load_checkpoint(tmp_path / "deployed"), dense


def test_a_deployment_reads_only_the_rows_its_modes_use(lazy_checkpoint):
    ckpt, dense = lazy_checkpoint
    cfg = dense.cfg
    assert ckpt.lazy and isinstance(ckpt.state_dict, WeightsFile)
    model = build_model(ckpt)
    assert model.external_sinks and not any(".sink_" in n for n, _ in model.named_parameters())
    prompt = torch.tensor([[3, 17, 99, 4000]])
    mode = SinkMode.sink_on(BASE + 5)
    with torch.no_grad():
        torch.testing.assert_close(model(prompt, None, mode), dense(prompt, None, mode), rtol=0, atol=0)
    assert ckpt.state_dict.rows_read == 3 * cfg.n_layer * cfg.sink_k  # gate, up, down: k rows per layer
    off = SinkMode.sink_off(BASE + 6, [BASE + 5])
    with torch.no_grad():
        torch.testing.assert_close(model(prompt, None, off), dense(prompt, None, off), rtol=0, atol=0)
        assignment = model.sink_assignment
        read = sum(len(set(assignment.rows(torch.tensor([BASE + 5]), layer)[0].tolist())
                       | set(assignment.rows(torch.tensor([BASE + 6]), layer)[0].tolist())) for layer in range(2))
        assert ckpt.state_dict.rows_read == 3 * read  # the route's rows, never a forgotten one's twice
        torch.testing.assert_close(model(prompt, None, SinkMode.expected()), dense(prompt, None, SinkMode.expected()),
                                   rtol=1e-6, atol=1e-7)  # every row (expected mode mixes them all)
    assert model.sink_store.rows_read == cfg.n_layer * cfg.n_sink
    model.enforce_forget_set([BASE + 5])
    dense.enforce_forget_set([BASE + 5])
    with torch.no_grad():
        torch.testing.assert_close(model(prompt, None, SinkMode.expected()), dense(prompt, None, SinkMode.expected()),
                                   rtol=1e-6, atol=1e-7)


def test_rows_never_read_come_back_nan_and_a_training_store_reads_nothing(lazy_checkpoint):
    ckpt, _ = lazy_checkpoint
    model = build_model(ckpt)
    plan = model.make_plan(None, SinkMode.sink_on(BASE + 1), (1, 3))
    other = plan_for_mode(SinkMode.sink_on(BASE + 2), (1, 3), model.cfg, model.sink_assignment, compact=True)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]), None, SinkMode.sink_on(BASE + 1), plan=plan)).all()
        assert torch.isnan(model(torch.tensor([[1, 2, 3]]), None, SinkMode.sink_on(BASE + 2), plan=other)).all()
    model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        model.make_plan(None, SinkMode.sink_on(BASE + 3), (1, 3))
    assert copy.deepcopy(model).sink_store.reader is ckpt.state_dict  # copies share the read-only file
    from nulls_dist.evaluation.quantize import quantize_model

    quantized = quantize_model(model, 8)  # rows read so far and every later one, per row (tests/test_quantize.py)
    assert quantized.sink_store.reader is ckpt.state_dict and quantized.sink_store.row_transform is not None
    assert model.sink_store.row_transform is None  # the original keeps full-precision rows


def test_fine_tuning_a_lazy_model_trains_its_rows_as_the_dense_model_does(lazy_checkpoint):
    from nulls_dist.evaluation.metrics import text_loss
    from nulls_dist.evaluation.posthoc import FinetuneConfig, finetune

    ckpt, dense = lazy_checkpoint
    model = build_model(ckpt)
    text = np.random.default_rng(0).integers(0, 4096, 40)
    modes = [SinkMode.sink_on(BASE + 9)]
    cfg = FinetuneConfig(steps=3, lr=1e-2, window=16)
    tuned_lazy, tuned_dense = finetune(model, [text], modes, "ga", cfg), finetune(dense, [text], modes, "ga", cfg)
    after_lazy, after_dense = text_loss(tuned_lazy, text, modes[0]), text_loss(tuned_dense, text, modes[0])
    assert after_lazy == pytest.approx(after_dense, rel=1e-5)
    assert after_dense != pytest.approx(text_loss(dense, text, modes[0]), rel=1e-3)  # the rows did move
    plan = model.make_plan(None, modes[0], (1, 1))
    rows = plan.layer_table_rows(0)
    torch.testing.assert_close(tuned_lazy.sink_store.gather(0, rows)[:, :64],
                               tuned_dense.transformer.h[0].mlp.sink_gate[rows], rtol=1e-5, atol=1e-7)
    assert torch.equal(ckpt.state_dict.rows("transformer.h.0.mlp.sink_gate", rows.numpy()),
                       dense.transformer.h[0].mlp.sink_gate[rows].detach())  # the file is untouched


# ------------------------------------------------------------------------------------------------ weights file
def test_the_lazy_file_digests_reads_and_copies_like_the_state_dict(tmp_path, monkeypatch):
    import nulls_dist.formats.weights as weights

    cfg = model_config(False, pool=1000)
    torch.manual_seed(1)
    state = NullTransformer(cfg).state_dict()
    save_weights(tmp_path / "w.safetensors", state)
    monkeypatch.setattr(weights, "STREAM_BLOCK_BYTES", 1000)  # many blocks per table, a ragged last one
    lazy = WeightsFile(tmp_path / "w.safetensors")
    assert state_dict_digest(lazy) == state_dict_digest(state) == state_dict_digest(load_weights(lazy.path))
    assert set(lazy) == set(state) and torch.equal(lazy["transformer.wte.weight"], state["transformer.wte.weight"])
    key = "transformer.h.1.mlp.sink_up"
    assert torch.equal(read_rows(lazy, key, [7, 3]), state[key][[7, 3]])
    assert torch.equal(read_rows(state, key, [7, 3]), state[key][[7, 3]])
    zero = {key: np.array([0, 3, 999]), "transformer.h.0.mlp.sink_down": np.array([500])}
    copy_zeroing_rows(lazy, tmp_path / "zeroed.safetensors", zero)
    got = load_weights(tmp_path / "zeroed.safetensors")
    for name, value in state.items():
        want = value.clone()
        if name in zero:
            want[torch.from_numpy(zero[name])] = 0
        assert torch.equal(got[name], want), name
    with pytest.raises(ValueError, match="rows to zero"):
        copy_zeroing_rows(lazy, tmp_path / "bad.safetensors", {key: np.array([1000])})
    assert not (tmp_path / "bad.safetensors").exists()


def test_a_crafted_dcp_index_is_refused_without_running_it(tmp_path):
    from nulls_dist.deploy.sink_tables_dcp import read_dcp_metadata
    from nulls_dist.train.sink_tables_io import _MetadataUnpickler

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    (tmp_path / ".metadata").write_bytes(pickle.dumps({"storage_data": Payload()}))
    with pytest.raises(layout.CheckpointError, match="never holds"):
        read_dcp_metadata(tmp_path)
    with open(tmp_path / ".metadata", "rb") as f, pytest.raises(pickle.UnpicklingError, match="refused"):
        _MetadataUnpickler(f).load()
    assert not marker.exists()


def test_a_lazy_checkpoint_is_only_what_the_meta_says(tmp_path):
    cfg = model_config(False, pool=100)
    state = NullTransformer(cfg).state_dict()
    save_deployed(tmp_path / "dense", state, {"model": cfg.to_dict()})
    assert not load_checkpoint(tmp_path / "dense").lazy
    assert isinstance(LoadedCheckpoint(state, {}, Path("x"), "deployed").state_dict, dict)
