"""Row-wise sharded sink tables (nulls_dist/train/sink_tables.py) against a dense single-process reference.

Three torchrun launches of tests/sink_tables_worker.py (gloo, CPU) run the toy problem of
tests/sink_tables_helpers.py: 2 ranks (equivalence variants, a straight run, a checkpoint at step 8 resumed on
2 ranks), then 1 rank (that checkpoint resumed to step 16, saved again), then 2 ranks (resumed to step 24).
The dense reference runs here, in this process, with every table a plain tensor and the update rules written
by hand.

Tolerance. Sharded and dense runs do the same arithmetic in another order: the per-rank CE sums are added
across ranks instead of in one sum, TorchRec's kernel adds the two ranks' gradient contributions to a shared
row in its own order, and (with accumulation) the micro-batches' gradients are summed per row before the
update instead of by autograd. Gathering from compact tables is exact. So the losses differ by fp32 rounding
that the updates carry forward: measured at most 2e-6 relative over 24 steps (4e-7 at step 0, where only the
loss sums differ). RTOL = 2e-5 leaves 10x; a wrong rule, or a missing 1/W, moves the losses by 7% or more.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sink_tables_helpers import D, L, R, DenseReference, tables_config

REPO = Path(__file__).resolve().parent.parent
STEPS = 20
RTOL = 2e-5


def rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and all(x == x for x in a + b), "a loss is NaN"
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from nulls_dist.train.distributed import free_port

    out = tmp_path_factory.mktemp("sink_tables")
    results = {}
    for mode, ranks in (("main", 2), ("resume1", 1), ("resume2", 2)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(REPO / "tests" / "sink_tables_worker.py"), mode,
               str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO / "tests")
        markers = [out / f"{mode}_rank{r}.json" for r in range(ranks)]
        found = [json.loads(p.read_text()) for p in markers if p.is_file()]
        assert proc.returncode == 0 and len(found) == ranks and all(r["ok"] for r in found), (
            f"{mode}: torchrun exited {proc.returncode}; {[r.get('error') for r in found]}\n{proc.stderr[-6000:]}")
        results[mode] = found
    results["dir"] = out
    return results


@pytest.fixture(scope="module")
def reference():
    def run(optimizer="rowwise_adagrad", rule=None, steps=STEPS, **changes):
        return DenseReference(tables_config(optimizer, **changes), rule).run(steps)
    return run


# ------------------------------------------------------------------------------------------------ equivalence
@pytest.mark.distributed
@pytest.mark.parametrize("variant,optimizer,changes", [
    ("rowwise_adagrad", "rowwise_adagrad", {}),
    ("adagrad", "adagrad", {}),
    ("sgd", "sgd", {}),
    ("rowwise_adagrad_shared", "rowwise_adagrad", {}),
    ("rowwise_adagrad_accum2", "rowwise_adagrad", {"grad_accum": 2}),
    ("sgd_shared_accum2", "sgd", {"grad_accum": 2}),
    ("sgd_torchrec_sums", "sgd", {}),  # TorchRec's GRADIENT_DIVISION off: the scale makes up the 1/W itself
    ("sgd_update_at_step", "sgd", {}),  # deferred to step() at grad_accum 1, as the trainer runs the tables
])
def test_sharded_losses_equal_the_dense_reference(runs, reference, variant, optimizer, changes):
    sharded = runs["main"][0]["equivalence"][variant]
    dense = reference(optimizer, **changes)
    assert len(sharded) == STEPS and rel_diff(sharded, dense) < RTOL
    assert sharded == runs["main"][1]["equivalence"][variant]  # every rank reports the same global loss
    assert sharded[-1] < sharded[0]


@pytest.mark.distributed
def test_a_step_bad_on_any_rank_changes_no_row_and_no_state_on_every_rank(runs):
    """update_at_step: `step(skip=...)` applies zero gradients when one rank flags the step or one rank's summed
    gradients are not finite (a zero gradient is an exact no-op for every rule); the flag is global."""
    for rank_result in runs["main"]:
        steps = rank_result["skipped_steps"]
        assert steps["flagged"] == [1.0, True] and steps["nan_on_rank_0"] == [1.0, True]
        assert steps["good"] == [0.0, False]


@pytest.mark.distributed
def test_losses_differ_without_the_1_over_w_scale(runs, reference):
    """SGD sees the gradient's size: without 1/W each row gets W times the dense path's gradient. (Row-wise
    Adagrad divides a constant scale out, up to eps, which is why this check uses SGD.)"""
    unscaled = runs["main"][0]["equivalence"]["sgd_without_1_over_w"]
    assert rel_diff(unscaled, reference("sgd")) > 1000 * RTOL


@pytest.mark.distributed
@pytest.mark.parametrize("rule", ["adam", "adagrad", "sgd"])
def test_losses_differ_from_a_reference_with_another_rule(runs, reference, rule):
    sharded = runs["main"][0]["equivalence"]["rowwise_adagrad"]
    other = reference("rowwise_adagrad", rule=rule, **({"lr": 1.0} if rule == "sgd" else {}))
    assert rel_diff(sharded, other) > 1000 * RTOL


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.distributed
def test_resume_on_the_same_world_size_is_bit_identical(runs):
    main = runs["main"][0]
    assert main["first_a"] == main["straight"][:8]
    assert main["resumed_same_w"] == main["straight"][8:]  # exact float equality, every step
    assert main["resume_meta"]["world_size"] == 2 and ".metadata" in main["resume_meta"]["files"]


@pytest.mark.distributed
def test_resharded_resume_continues_the_same_losses(runs, reference):
    """2 ranks to step 8, checkpoint; 1 rank to step 16, checkpoint; 2 ranks to step 24."""
    main, one, two = runs["main"][0], runs["resume1"][0], runs["resume2"][0]
    assert one["resume_meta"]["world_size"] == 2 and two["resume_meta"]["world_size"] == 1
    resumed = main["first_a"] + one["losses"] + two["losses"]
    assert len(resumed) == 24 and rel_diff(resumed, main["straight"]) < RTOL
    assert rel_diff(main["straight"], reference(steps=24)) < RTOL
    assert two["finite"]


@pytest.mark.distributed
def test_checkpoint_of_another_shape_is_refused(runs):
    assert "sink_tables.rows: checkpoint 64 != run 32" in runs["main"][0]["mismatch"]


@pytest.mark.distributed
def test_checkpoint_directory_layout(runs):
    from nulls_dist.formats import checkpoint as layout

    directory = layout.sink_tables_dir(runs["dir"] / "ckpt_b")
    meta = layout.read_sink_tables_meta(directory)
    assert sorted(meta["files"]) == [".metadata", "__0_0.distcp"] and meta["world_size"] == 1
    assert sorted(p.name for p in directory.iterdir()) == sorted(meta["files"]) + [layout.SINK_TABLES_META_NAME]


# ------------------------------------------------------------------------------------------------ lookups
@pytest.mark.distributed
def test_a_second_lookup_in_one_step_is_refused(runs):
    assert "second training lookup before step()" in runs["main"][0]["second_lookup"]


@pytest.mark.distributed
def test_validated_lookup_refuses_rows_out_of_range_or_repeated(runs):
    assert runs["main"][0]["invalid_rows"] == [f"rows of layer 1 must lie in [0, {R})",
                                               "rows of layer 1 must be distinct"]


@pytest.mark.distributed
def test_a_rank_with_no_rows_for_a_layer_takes_part(runs):
    assert runs["main"][0]["empty_layer_shapes"] == [[2, 3 * D], [2, 3 * D]]
    assert runs["main"][1]["empty_layer_shapes"] == [[0, 3 * D], [2, 3 * D]]


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.distributed
def test_row_reader_reads_back_exactly_the_trained_rows(runs):
    from nulls_dist.formats import checkpoint as layout
    from nulls_dist.formats.weights import RowReader

    reader = RowReader(runs["dir"] / "trained.safetensors")
    covered = {layer: 0 for layer in range(L)}
    for rank_result in runs["main"]:
        for layer, start, rows in rank_result["own_rows"]:
            rows = torch.tensor(rows)
            index = list(range(start, start + rows.shape[0]))[::-1]  # any order, as a deployment asks
            for part_index, part in enumerate(layout.SINK_PARTS):
                got = reader.rows(layout.sink_table_key(layer, part), index)
                assert torch.equal(got, rows.flip(0)[:, part_index * D: (part_index + 1) * D])
            covered[layer] += rows.shape[0]
    assert covered == {layer: R for layer in range(L)}
    assert reader.shape(layout.sink_table_key(0, "down")) == (R, D)


@pytest.mark.distributed
def test_init_does_not_depend_on_world_size_or_layout(runs):
    from nulls_dist.formats.weights import load_weights
    from nulls_dist.train.sink_tables import init_rows

    out = runs["dir"]
    files = [out / "init_w2.safetensors", out / "init_w1.safetensors", out / "init_w1_shared.safetensors"]
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()
    weights = load_weights(files[0])
    cfg = tables_config()
    for layer in range(L):
        expected = init_rows(cfg, layer, 0, R)
        assert torch.equal(weights[f"transformer.h.{layer}.mlp.sink_up"], expected[:, D: 2 * D])


def test_export_keys_are_the_model_parameter_names():
    from nulls_dist.config import NullConfig
    from nulls_dist.formats import checkpoint as layout
    from nulls_dist.model import NullTransformer

    cfg = NullConfig.from_preset("debug")
    with torch.device("meta"):
        keys = set(NullTransformer(cfg).state_dict())
    assert {layout.sink_table_key(i, p) for i in range(cfg.n_layer) for p in layout.SINK_PARTS} <= keys


# ------------------------------------------------------------------------------------------------ single process
def test_init_rows_is_block_independent_and_scaled():
    from nulls_dist.train.sink_tables import INIT_BLOCK_ROWS, SinkTablesConfig, init_rows

    cfg = SinkTablesConfig(num_layers=2, rows=3 * INIT_BLOCK_ROWS + 5, dim=4, seed=1)
    whole = init_rows(cfg, 1, 0, cfg.rows)
    cut = INIT_BLOCK_ROWS + 17  # a shard boundary inside a block
    assert torch.equal(torch.cat([init_rows(cfg, 1, 0, cut), init_rows(cfg, 1, cut, cfg.rows)]), whole)
    assert not torch.equal(init_rows(cfg, 0, 0, 8), whole[:8])  # layers differ
    assert abs(whole.std().item() - 0.02) < 0.001


def test_compact_rows_and_split_rows():
    from nulls_dist.train.sink_tables import compact_rows, split_rows

    source_rows = torch.tensor([[9, 3, -1], [3, 40, 7]])
    rows, local = compact_rows(source_rows)
    assert rows.tolist() == [3, 7, 9, 40]
    assert local.tolist() == [[2, 0, -1], [0, 3, 1]]
    table = torch.arange(12.0).reshape(2, 6)
    gate, up, down = split_rows(table)
    assert gate.tolist() == [[0, 1], [6, 7]] and down.tolist() == [[4, 5], [10, 11]]


@pytest.mark.parametrize("field,value", [("rows", 0), ("layout", "columns"), ("optimizer", "adam"),
                                         ("lr", float("nan")), ("grad_accum", 0), ("num_layers", True)])
def test_bad_config_names_the_field(field, value):
    from nulls_dist.train.sink_tables import SinkTablesConfig

    fields = {"num_layers": 2, "rows": 8, "dim": 4, field: value}
    with pytest.raises(ValueError, match=f"sink_tables.{field} must be"):
        SinkTablesConfig(**fields)


def test_allocated_table_file_is_filled_by_positioned_writes(tmp_path):
    from nulls_dist.formats.weights import RowReader, RowWriter, allocate_tables, load_weights

    a, b = torch.randn(7, 3), torch.randn(5, 4)
    path = allocate_tables(tmp_path / "t.safetensors", {"a": (7, 3), "b": (5, 4)})
    with RowWriter(path) as writer:  # out of order, as several ranks would
        writer.write("b", 2, b[2:])
        writer.write("a", 4, a[4:])
        writer.write("a", 0, a[:4])
        writer.write("b", 0, b[:2])
        with pytest.raises(ValueError, match="outside"):
            writer.write("a", 6, a[:2])
    weights = load_weights(path)  # safetensors itself accepts the file
    assert torch.equal(weights["a"], a) and torch.equal(weights["b"], b)
    assert torch.equal(RowReader(path).rows("b", [4, 1]), b[[4, 1]])


@pytest.mark.distributed
def test_bench_smoke_json():
    """The benchmark's driver and both workers on a tiny table (one torchrun launch per point)."""
    proc = subprocess.run([sys.executable, "-m", "nulls_dist.bench.sink_table_bench", "--min-log2", "10",
                           "--max-log2", "10", "--steps", "1", "--warmup", "0"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout)
    assert record["versions"]["torchrec"] == "1.9.2" and record["machine"]["cores"] >= 1
    assert [(p["path"], p["status"]) for p in record["points"]] == [("sparse", "ok"), ("dense", "ok")]
    assert all(p["step_ms_median"] > 0 and len(p["peak_rss_gb_per_rank"]) == 2 for p in record["points"])
