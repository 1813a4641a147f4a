"""torchrun worker for tests/test_sink_tables.py: trains the toy problem of sink_tables_helpers.py on
`ShardedSinkTables` (gloo, CPU) and records losses, checkpoints and exports. Each rank writes
`<mode>_rank<r>.json` as its success marker. Not collected by pytest.

Modes (the test runs them in this order, on one OUT_DIR):
- main (2 ranks): the equivalence variants; a straight 24-step run (losses, export, every rank's own rows);
  the same run stopped at step 8 (checkpoint `ckpt_a`) and resumed on 2 ranks; the init export; the
  guard against a second lookup per step; the refusal of a checkpoint of another shape.
- resume1 (1 rank): `ckpt_a` -> steps 8..16 -> checkpoint `ckpt_b`; init exports of both layouts.
- resume2 (2 ranks): `ckpt_b` -> steps 16..24.

usage: python -m torch.distributed.run --nproc_per_node N tests/sink_tables_worker.py MODE OUT_DIR
"""
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from nulls_dist.train.sink_tables import ShardedSinkTables, compact_rows, split_rows
from nulls_dist.train.sink_tables_io import export_tables, load_tables, save_tables
from sink_tables_helpers import ce_sum, counted_targets, lr_at, rank_micro_batches, source_rows, tables_config

STEPS = 20  # equivalence
TOTAL, STOP_A, STOP_B = 24, 8, 16  # checkpoint: 2 ranks to 8, 1 rank to 16, 2 ranks to 24


def train_steps(tables: ShardedSinkTables, start: int, stop: int) -> list[float]:
    """Steps [start, stop) as the trainer would run them; the reported loss of every step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, count = tables.cfg, counted_targets(tables.cfg.grad_accum)
    losses = []
    for step in range(start, stop):
        tables.set_learning_rate(lr_at(cfg, step))
        local = torch.zeros((), dtype=torch.float64)
        for batch in rank_micro_batches(step, cfg.grad_accum, rank, world):
            rows, local_rows = zip(*(compact_rows(r) for r in source_rows(batch)))
            values = tables.lookup(list(rows))
            ce = ce_sum(batch, [split_rows(v) for v in values], list(local_rows))
            (ce * world / count).backward()  # DeepSpeed would average this over the ranks
            local += ce.detach().double()
        tables.step()
        dist.all_reduce(local)
        losses.append(local.item() / count)
    return losses


def snapshot(tables: ShardedSinkTables) -> list[torch.Tensor]:
    """Copies of this rank's rows and of its rows' optimizer state (every state tensor of every table)."""
    out = [view.clone() for _, _, view in tables.local_shards()]
    for per_param in tables.module.fused_optimizer.state_dict()["state"].values():
        for state in per_param.values():
            out += [shard.tensor.clone() for shard in state.local_shards()]
    return out


def skipped_steps() -> dict:
    """update_at_step tables: a step that one rank flags bad, and one with a NaN gradient on one rank only, leave
    every rank's rows and state exactly as they were; a good step moves them."""
    rank = dist.get_rank()
    tables = ShardedSinkTables(tables_config(update_at_step=True))
    rows = [torch.tensor([1, 7, 30]), torch.tensor([2, 9, 33, 60])]
    result = {}

    def step(skip: bool, nan: bool) -> tuple[float, bool]:
        before = snapshot(tables)
        values = tables.lookup(rows)
        loss = sum((v * (1 + rank)).square().sum() for v in values)
        (loss * float("nan") if nan else loss).backward()
        flag = tables.step(skip=torch.tensor(skip))
        return flag.item(), all(torch.equal(a, b) for a, b in zip(before, snapshot(tables)))

    result["flagged"] = step(skip=rank == 1, nan=False)
    result["nan_on_rank_0"] = step(skip=False, nan=rank == 0)
    result["good"] = step(skip=False, nan=False)
    return result


def own_rows(tables: ShardedSinkTables) -> list:
    return [[layer, start, view.tolist()] for layer, start, view in tables.local_shards()]


def equivalence() -> dict:
    from torchrec.distributed import comm_ops

    variants = {
        "rowwise_adagrad": ({}, None),
        "adagrad": ({"optimizer": "adagrad"}, None),
        "sgd": ({"optimizer": "sgd"}, None),
        "sgd_without_1_over_w": ({"optimizer": "sgd"}, 1.0),
        "rowwise_adagrad_shared": ({"layout": "shared"}, None),
        "rowwise_adagrad_accum2": ({"grad_accum": 2}, None),
        "sgd_shared_accum2": ({"optimizer": "sgd", "layout": "shared", "grad_accum": 2}, None),
        "sgd_update_at_step": ({"optimizer": "sgd", "update_at_step": True}, None),  # what the trainer runs
    }
    out = {name: train_steps(ShardedSinkTables(tables_config(**changes), grad_scale=scale), 0, STEPS)
           for name, (changes, scale) in variants.items()}
    # the total scale must not depend on TorchRec's process-wide division flag
    comm_ops.set_gradient_division(False)
    try:
        out["sgd_torchrec_sums"] = train_steps(ShardedSinkTables(tables_config("sgd")), 0, STEPS)
    finally:
        comm_ops.set_gradient_division(True)
    return out


def main_mode(out: Path) -> dict:
    rank = dist.get_rank()
    result = {"equivalence": equivalence(), "skipped_steps": skipped_steps()}
    cfg = tables_config()
    straight = ShardedSinkTables(cfg)
    export_tables(straight, out / "init_w2.safetensors")
    result["straight"] = train_steps(straight, 0, TOTAL)
    export_tables(straight, out / "trained.safetensors")
    result["own_rows"] = own_rows(straight)

    first = ShardedSinkTables(cfg)
    result["first_a"] = train_steps(first, 0, STOP_A)
    save_tables(first, out / "ckpt_a")
    resumed = ShardedSinkTables(cfg)
    result["resume_meta"] = load_tables(resumed, out / "ckpt_a")
    result["resumed_same_w"] = train_steps(resumed, STOP_A, TOTAL)

    guard = ShardedSinkTables(cfg)
    empty = [torch.empty(0, dtype=torch.int64)] * cfg.num_layers
    guard.lookup(empty)
    try:
        guard.lookup(empty)
        result["second_lookup"] = "no error"
    except RuntimeError as err:
        result["second_lookup"] = str(err)
    guard.step()
    # a rank with no rows for a layer still takes part (rank 1 looks up nothing in layer 0)
    rows = [torch.empty(0, dtype=torch.int64) if rank == 1 else torch.tensor([3, 40]), torch.tensor([5, 33])]
    values = guard.lookup(rows)
    sum(v.sum() for v in values).backward()
    guard.step()
    result["empty_layer_shapes"] = [list(v.shape) for v in values]

    result["invalid_rows"] = []
    for bad in (torch.tensor([3, 64]), torch.tensor([5, 5])):
        try:
            with torch.no_grad():
                guard.lookup([torch.tensor([1]), bad], validate=True)
            result["invalid_rows"].append("no error")
        except ValueError as err:
            result["invalid_rows"].append(str(err))

    other = ShardedSinkTables(tables_config(rows=32))
    try:
        load_tables(other, out / "ckpt_a")
        result["mismatch"] = "no error"
    except RuntimeError as err:
        result["mismatch"] = str(err)
    return result


def resume1_mode(out: Path) -> dict:
    cfg = tables_config()
    tables = ShardedSinkTables(cfg)
    export_tables(tables, out / "init_w1.safetensors")
    export_tables(ShardedSinkTables(tables_config(layout="shared")), out / "init_w1_shared.safetensors")
    result = {"resume_meta": load_tables(tables, out / "ckpt_a")}
    result["losses"] = train_steps(tables, STOP_A, STOP_B)
    save_tables(tables, out / "ckpt_b")
    return result


def resume2_mode(out: Path) -> dict:
    tables = ShardedSinkTables(tables_config())
    result = {"resume_meta": load_tables(tables, out / "ckpt_b")}
    result["losses"] = train_steps(tables, STOP_B, TOTAL)
    result["finite"] = tables.all_finite()
    return result


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        result = {"main": main_mode, "resume1": resume1_mode, "resume2": resume2_mode}[mode](out)
        result.update(ok=True, world_size=dist.get_world_size())
    except Exception:
        result = {"ok": False, "error": traceback.format_exc()}
        print(result["error"], file=sys.stderr, flush=True)
    (out / f"{mode}_rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
