"""A training run's sink rows in row-sharded TorchRec tables beside the DeepSpeed engine (`sink_tables.mode` sharded,
or auto above `sink_tables.auto_min_rows`): what the trainer calls per step, at save and at load
(docs/sink_tables.md, "In the trainer"). The model is built with `sink_storage="external"`, so the engine holds
every weight but the sink rows; the loader's workers build compact sink plans (the distinct rows per layer and
each source's indices into them), and each micro-batch's forward runs on the rows looked up here.

Semantics chosen to match the dense weights' step (docs/sink_tables.md, "Gradient accumulation"):
- updates are deferred to the end of the optimizer step at any `grad_accum` (exact accumulation: one update per
  row from the step's summed gradients, every micro-batch sees the rows as they were at the start of the step);
- the gradient a row receives is the dense weights' (the trainer backpropagates CE sum * W * G / global count;
  DeepSpeed's backward divides that loss by G, which every gradient of the graph carries, the looked-up rows'
  included, and its all-reduce averages the dense gradients over W: the tables' grad scale is 1 / W);
- a step that is bad on any rank (non-finite loss, DeepSpeed's overflow, non-finite table gradients) updates no
  row (zero gradients; no host read), as DeepSpeed skips the dense step;
- the sparse lr is `sink_tables.lr`, times the dense warmup/cosine multiplier when `follow_schedule`.

The tables live in host memory (this project pins fbgemm-gpu-cpu, whose kernels are the CPU ones): on a CUDA run
the looked-up rows are copied to the model's device and their gradients flow back to the host leaves; the host
sink plan (the loader's, before it moves to the device) names the rows, so the lookup reads nothing back. Only
the step's bad flag crosses back to the host, once per step. (CPU runs are tested; no GPU was lent to this work.)

Every method is a collective: every rank calls it, in the same order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nulls_dist.config import NullConfig
from nulls_dist.sink_plan import SinkPlan
from nulls_dist.train.config import TrainConfig
from nulls_dist.train.ds_config import WarmupCosine
from nulls_dist.train.sink_tables import ShardedSinkTables, SinkTablesConfig
from nulls_dist.train.sink_tables_io import export_tables, load_tables, save_tables


def uses_sharded_tables(cfg: TrainConfig, model_cfg: NullConfig) -> bool:
    """Whether this run keeps its sink rows in sharded tables; ValueError naming the field when it cannot."""
    if model_cfg.n_sink == 0 or not cfg.sink_tables.sharded(model_cfg.n_sink):
        return False
    if cfg.sink_path == "masked":
        raise ValueError(f"train.sink_path=masked computes every one of the {model_cfg.n_sink} pool units per token: "
                         "it needs dense sink tables (sink_tables.mode=dense); sharded tables run the gathered path")
    return True


class TableSinks:
    """The sharded sink tables of one run on this rank (module docstring)."""

    def __init__(self, cfg: TrainConfig, model_cfg: NullConfig, device: torch.device, world_size: int,
                 grad_accum: int) -> None:
        section = cfg.sink_tables
        self.train_cfg = cfg
        self.num_layers = model_cfg.n_layer
        self.cfg = SinkTablesConfig(num_layers=model_cfg.n_layer, rows=model_cfg.n_sink, dim=model_cfg.n_embd,
                                    layout=section.layout, optimizer=section.optimizer, lr=section.lr,
                                    eps=section.eps, init_std=section.init_std, seed=cfg.seed,
                                    grad_accum=grad_accum, update_at_step=True)
        self.schedule = WarmupCosine(cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr / cfg.optim.lr)
        # DeepSpeed's backward already took the 1/G off the loss: the rows need the ranks' 1/W (module docstring)
        self.tables = ShardedSinkTables(self.cfg, "cpu", grad_scale=1.0 / world_size)
        self.device = device  # the model's
        self.lr = section.lr

    def describe(self) -> dict[str, Any]:
        """The checkpoint meta's `sink_tables` record: what a resume must match (formats.checkpoint)."""
        return {"mode": "sharded", **self.cfg.describe()}

    def table_bytes(self) -> int:
        return self.cfg.num_layers * self.cfg.rows * self.cfg.row_dim * 4

    # ------------------------------------------------------------------------------------------ per step
    def begin_step(self, step: int) -> None:
        """The sparse lr of optimizer step `step` (0-based, as the dense LambdaLR counts)."""
        section = self.train_cfg.sink_tables
        self.lr = section.lr * (self.schedule(step) if section.follow_schedule else 1.0)
        self.tables.set_learning_rate(self.lr)

    def rows_for(self, plan: SinkPlan) -> list[torch.Tensor] | None:
        """The (R_l, 3D) rows of a compact host plan's `table_rows`, per layer, on the model's device; None for a
        plan without sinks. With grad enabled the rows are this step's leaves (their gradients are applied in
        `end_step`); without, a plain lookup that updates nothing."""
        if plan.kind == "none":
            return None
        if plan.kind != "gathered":
            raise ValueError(f"a {plan.kind!r} sink plan needs every pool row; the sharded tables serve gathered "
                             "plans (train, sink_on, sink_off)")
        values = self.tables.lookup([plan.layer_table_rows(layer) for layer in range(self.num_layers)])
        return [v.to(self.device, non_blocking=True) for v in values]

    def end_step(self, bad: torch.Tensor) -> torch.Tensor:
        """Apply the step's summed gradients (zeros when any rank's `bad`); returns the global bad flag on the
        model's device."""
        return (self.tables.step(skip=bad.to("cpu")) > 0).to(self.device)

    # ------------------------------------------------------------------------------------------ checkpoints
    def all_finite(self) -> bool:
        return self.tables.all_finite()

    def save(self, tag_dir: Path, dense_state: dict[str, torch.Tensor] | None) -> None:
        """`<tag_dir>/sink_tables/` (rows and optimizer state, DCP) and `<tag_dir>/model.safetensors` (rank 0's
        dense weights plus every rank's rows in place: the whole model, as the tools read it)."""
        from nulls_dist.formats import checkpoint as layout

        save_tables(self.tables, tag_dir)
        export_tables(self.tables, Path(tag_dir) / layout.WEIGHTS_NAME, dense_state)

    def load(self, tag_dir: Path) -> dict[str, Any]:
        return load_tables(self.tables, tag_dir)
