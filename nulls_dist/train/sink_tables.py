"""The sink rows of every NULL layer as TorchRec tables, row-wise sharded over the data-parallel ranks, updated by
an exact fused sparse optimizer (fbgemm's table-batched embedding kernels) beside the DeepSpeed engine that
holds the dense weights. docs/sink_tables.md is the user's guide; this docstring is the contract.

Why: forgetting is cheap for survivors only when each layer has 2^20..2^24 sink rows (docs/nulls_facts.md, "The
forget budget"). Dense ZeRO keeps a dense gradient and two dense Adam moments per row; these tables keep the
rows once, spread over the ranks, plus one float of optimizer state per row, and touch only the rows a
micro-batch uses.

Layout (`SinkTablesConfig.layout`). A table row is one sink unit of one layer: its gate, up and down rows
concatenated, (3D,) = [gate | up | down], so one lookup per layer returns all three.
- "per_layer": one table of R rows per layer (`layer_<i>`); row `u` of layer `i` is row `u` of table i.
- "shared": one table of L*R rows (`sinks`); row `u` of layer `i` is row `i*R + u`. The same rows and values,
  one table id space (the fbgemm kernel batches the per-layer tables into one launch anyway, so the two cost
  the same; "shared" spreads the ranks' row ranges over layers instead of splitting every layer).
Both are initialised identically: `init_rows(cfg, layer, start, stop)` depends on (seed, layer, row) only, never
on the world size or which rank owns a row.

Optimizer (`SinkTablesConfig.optimizer`), what fbgemm-gpu-cpu 1.8.0 runs on the CPU (Adam, partial row-wise Adam,
LAMB and LARS assert "not supported in CPU mode"):
- "rowwise_adagrad" (EXACT_ROWWISE_ADAGRAD, the default): per row r with summed gradient g (3D,)
      state[r] += mean(g**2);  row[r] -= lr * g / (sqrt(state[r]) + eps)
  one float of state per row; lazy: a row moves only in a step whose batch holds one of its sources (no
  momentum to carry it on, no decay to erode it while its sources are absent).
- "adagrad" (EXACT_ADAGRAD): the element-wise version, state (R, 3D): as much memory as the table.
- "sgd" (EXACT_SGD): row[r] -= lr * g.
"Exact": a row looked up several times in one step (by several ranks or several micro-batches) gets ONE update
from its summed gradient.

Gradient scale. The trainer backpropagates (this rank's CE sum) * W / (global counted targets) because DeepSpeed
averages dense gradients over the W ranks. A table row must see the same total, the sum over ranks divided by
W: `grad_scale` (default 1/W) is that factor. TorchRec's all-to-all backward already divides by W while its
process-wide `comm_ops.GRADIENT_DIVISION` is on (its default); `lookup` reads that flag and scales by the rest,
so the total is `grad_scale` either way. (Row-wise Adagrad is invariant to a constant gradient scale up to eps;
SGD is not, and neither is anything that reads the gradient's size.)

Gradient accumulation (`SinkTablesConfig.grad_accum`, = the trainer's `deepspeed.grad_accum`):
- 1 (and `update_at_step` off): the update is fused into backward: each lookup's backward sends the rows'
  gradients to their owners, which update them at once. A second training lookup before `step()` is refused (it
  would be a second update).
- G > 1, or `update_at_step` (what the trainer uses, at any G): exact accumulation, applied in `step()`. A training lookup returns detached leaf tensors (no TorchRec graph); backward only
  fills their `.grad`; `step()` sums every micro-batch's gradients per row and applies them in ONE fused
  update, through one more (collective) lookup of the step's union of rows. Every micro-batch sees the rows as
  they were at the start of the step, as the dense weights do. Costs one extra lookup per step and keeps the
  micro-batches' looked-up rows and their gradients until `step()`. `step(skip=flag)` applies zero gradients
  instead when any rank's flag is set or any rank's summed gradients are not finite (one all-reduce of a device
  scalar; no host read): a zero gradient leaves a row and its Adagrad state exactly as they were, so a step that
  DeepSpeed skips for a non-finite gradient is skipped by the tables too.
Lookups with grad disabled (evaluation) never update anything.

What the trainer calls (every call except the static ones is a collective: every rank calls it, in the same
order, even with no rows):
    tables = ShardedSinkTables(cfg, device)                      # after init_process_group
    per step:   tables.set_learning_rate(lr)                     # before the step's first backward
                per micro-batch: rows = tables.lookup(plan_rows) # [(R_l, 3D)], plan_rows[l] (R_l,) distinct
                                 gate, up, down = split_rows(rows[l])   # (R_l, D) views for sink_mlp
                                 ... engine.backward(loss)
                tables.step()                                    # after the last micro-batch's backward
    at save:    save_tables(tables, tag_dir)                     # sink_tables_io; before nulls_meta.json
                tables.all_finite()                              # refuse to checkpoint non-finite rows
    at load:    tables = ShardedSinkTables(cfg, device); load_tables(tables, tag_dir)   # any world size
    export:     export_tables(tables, path)                      # safetensors for deployment
`compact_rows(source_rows)` turns a batch's (U, K) pool rows into the distinct rows to look up and the
(U, K) indices into them that `sink_mlp` takes (a host sync: build it in the loader's workers).

Shape legend: L layers, R rows per layer, D model width, R_l rows one rank looks up for layer l, U sources,
K rows per source (-1 padded).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from nulls_dist.formats.checkpoint import sink_table_name
from nulls_dist.model import split_sink_rows
from nulls_dist.sink_plan import compact_rows_numpy

from nulls_dist.train.config import SINK_TABLE_LAYOUTS as LAYOUTS
from nulls_dist.train.config import SINK_TABLE_OPTIMIZERS as OPTIMIZERS

# Rows per deterministic init block: each block has its own generator, so any row range is filled by generating
# whole blocks. 4096 rows bound the temporary at 4096 * 3D floats (47 MB at the paper's D=960).
INIT_BLOCK_ROWS = 4096
_SEED_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _check(condition: bool, name: str, value, expected: str) -> None:
    if not condition:
        raise ValueError(f"sink_tables.{name} must be {expected}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SinkTablesConfig:
    """The sink tables of one model: L layers of R rows, D = n_embd; see the module docstring for each choice."""

    num_layers: int
    rows: int
    dim: int
    layout: str = "per_layer"
    optimizer: str = "rowwise_adagrad"
    lr: float = 0.01
    eps: float = 1e-8
    init_std: float = 0.02
    seed: int = 0
    grad_accum: int = 1
    update_at_step: bool = False  # apply the step's summed gradients in step() even when grad_accum == 1

    def __post_init__(self) -> None:
        _check(_is_int(self.num_layers) and self.num_layers > 0, "num_layers", self.num_layers, "a positive integer")
        _check(_is_int(self.rows) and 0 < self.rows and self.num_layers * self.rows < 2**31, "rows", self.rows,
               "a positive integer with num_layers * rows < 2**31 (fbgemm's row index)")
        _check(_is_int(self.dim) and self.dim > 0, "dim", self.dim, "a positive integer")
        _check(self.layout in LAYOUTS, "layout", self.layout, f"one of {LAYOUTS}")
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"one of {OPTIMIZERS}")
        for name in ("lr", "eps", "init_std"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                   and value >= 0, name, value, "a finite non-negative number")
        _check(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "a non-negative integer")
        _check(_is_int(self.grad_accum) and self.grad_accum > 0, "grad_accum", self.grad_accum, "a positive integer")
        _check(isinstance(self.update_at_step, bool), "update_at_step", self.update_at_step, "true or false")

    @property
    def deferred(self) -> bool:
        """Training lookups return leaves whose gradients `step()` applies (module docstring)."""
        return self.grad_accum > 1 or self.update_at_step

    @property
    def row_dim(self) -> int:
        return 3 * self.dim

    def describe(self) -> dict:
        """What a checkpoint must match to be loaded (the learning rate and seed may change on resume)."""
        return {"layout": self.layout, "num_layers": self.num_layers, "rows": self.rows, "dim": self.dim,
                "optimizer": self.optimizer}


# ------------------------------------------------------------------------------------------------ pure helpers
def init_rows(cfg: SinkTablesConfig, layer: int, start: int, stop: int) -> torch.Tensor:
    """Initial values of rows [start, stop) of `layer`: (stop - start, 3D) fp32, N(0, init_std) like the model's
    reset_parameters. Block b of a layer is drawn by a generator seeded from (seed, layer, b), always whole, so a
    row's value never depends on which range (which rank) asked for it."""
    if not 0 <= start <= stop <= cfg.rows:
        raise ValueError(f"rows [{start}, {stop}) are outside the layer's [0, {cfg.rows})")
    out = torch.empty(stop - start, cfg.row_dim)
    for block in range(start // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS)):
        lo = block * INIT_BLOCK_ROWS
        hi = min(lo + INIT_BLOCK_ROWS, cfg.rows)
        seed = (cfg.seed * _SEED_MIX[0] + layer * _SEED_MIX[1] + block * _SEED_MIX[2]) % 2**63
        values = torch.randn(hi - lo, cfg.row_dim, generator=torch.Generator().manual_seed(seed))
        a, b = max(lo, start), min(hi, stop)
        out[a - start: b - start] = values[a - lo: b - lo]
    return out.mul_(cfg.init_std)


def split_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R_l, 3D) looked-up rows -> the gate, up and down (R_l, D) views `sink_mlp` takes as w_gate, w_up, w_down
    (column slices: no copy; gradients flow back into the rows). The model's own split."""
    return split_sink_rows(rows)


def compact_rows(source_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, K) pool rows (-1 padded) -> (rows (R_l,) the distinct rows ascending, local (U, K) indices into `rows`,
    -1 padded): look up `rows`, call `sink_mlp` with `local` on the compact tables. A host computation: the
    loader's workers build it into every compact sink plan (`sink_plan.compact_rows_numpy`, which this wraps)."""
    rows, local = compact_rows_numpy(source_rows.detach().cpu().numpy().astype(np.int64))
    return torch.from_numpy(rows).to(source_rows.device), torch.from_numpy(local).to(source_rows.device)


class _LibraryInfoFilter(logging.Filter):
    """Drops fbgemm's INFO lines (it logs every loaded .so and every table's arguments through the root logger,
    on every rank); its warnings and errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}fbgemm_gpu{os.sep}" not in record.pathname


def quiet_library_logs() -> None:
    """Keep TorchRec's and fbgemm's INFO chatter out of the run's log (idempotent)."""
    root = logging.getLogger()
    if not any(isinstance(f, _LibraryInfoFilter) for f in root.filters):
        root.addFilter(_LibraryInfoFilter())
    logging.getLogger("torchrec").setLevel(logging.WARNING)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


# ------------------------------------------------------------------------------------------------ the tables
class ShardedSinkTables:
    """Every layer's sink rows, row-wise sharded over `process_group` (default: the default group). See the
    module docstring for the calls a trainer makes; `device` is where this rank's rows live (cpu or cuda)."""

    def __init__(self, cfg: SinkTablesConfig, device: torch.device | str = "cpu",
                 process_group: dist.ProcessGroup | None = None, grad_scale: float | None = None) -> None:
        # TorchRec and fbgemm load here, not at import: they take seconds, and the pure helpers above (init_rows,
        # compact_rows, the config) serve the reference tests and the loader without them
        quiet_library_logs()
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec import EmbeddingCollection, EmbeddingConfig
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.embedding_types import EmbeddingComputeKernel
        from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
        from torchrec.distributed.types import ShardingEnv

        if not dist.is_initialized():
            raise RuntimeError("ShardedSinkTables needs an initialised process group (train.distributed)")
        self.cfg = cfg
        self.device = torch.device(device)
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.process_group)
        self.grad_scale = 1.0 / self.world_size if grad_scale is None else float(grad_scale)
        if cfg.layout == "per_layer":
            self.table_names = [sink_table_name(cfg.layout, layer) for layer in range(cfg.num_layers)]
            rows_per_table = cfg.rows
        else:
            self.table_names = [sink_table_name(cfg.layout, 0)]
            rows_per_table = cfg.num_layers * cfg.rows
        # meta: no process ever allocates a whole table; sharding allocates each rank's rows only
        collection = EmbeddingCollection(device=torch.device("meta"), tables=[
            EmbeddingConfig(name=name, embedding_dim=cfg.row_dim, num_embeddings=rows_per_table,
                            feature_names=[name]) for name in self.table_names])
        optimizer = {"rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
                     "sgd": EmbOptimType.EXACT_SGD}[cfg.optimizer]
        sharder = EmbeddingCollectionSharder(fused_params={"optimizer": optimizer, "learning_rate": cfg.lr,
                                                           "eps": cfg.eps})
        # FUSED explicitly: left to itself the plan picks the DENSE kernel (no fused optimizer) for tables that
        # have no in-backward optimizer attached
        plan = construct_module_sharding_plan(
            collection, {name: row_wise(compute_kernel=EmbeddingComputeKernel.FUSED.value)
                         for name in self.table_names},
            sharder=sharder, local_size=self.world_size, world_size=self.world_size, device_type=self.device.type)
        self.module = sharder.shard(collection, plan, ShardingEnv.from_process_group(self.process_group),
                                    self.device)
        self._looked_up = False  # grad_accum == 1: a training lookup happened since the last step()
        self._pending: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # grad_accum > 1
        self.reset_rows()

    # ------------------------------------------------------------------------------------------ local rows
    def local_shards(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(layer, first row within the layer, (n, 3D) view of this rank's rows of that layer), for every layer
        range this rank owns. Writing into the view writes the table."""
        state = self.module.state_dict()
        for index, name in enumerate(self.table_names):
            for shard in state[f"embeddings.{name}.weight"].local_shards():
                start = shard.metadata.shard_offsets[0]
                tensor = shard.tensor
                if self.cfg.layout == "per_layer":
                    if tensor.shape[0]:
                        yield index, start, tensor
                    continue
                stop = start + tensor.shape[0]
                for layer in range(start // self.cfg.rows, -(-stop // self.cfg.rows)):
                    lo, hi = max(start, layer * self.cfg.rows), min(stop, (layer + 1) * self.cfg.rows)
                    if hi > lo:
                        yield layer, lo - layer * self.cfg.rows, tensor[lo - start: hi - start]

    @torch.no_grad()
    def reset_rows(self) -> None:
        """Every row := `init_rows` (a world-size-independent function of the seed); optimizer state stays."""
        for layer, start, view in self.local_shards():
            for lo in range(0, view.shape[0], INIT_BLOCK_ROWS):
                hi = min(lo + INIT_BLOCK_ROWS, view.shape[0])
                view[lo:hi].copy_(init_rows(self.cfg, layer, start + lo, start + hi))

    def all_finite(self) -> bool:
        """Whether every row on every rank is finite (a collective and a host sync: for checkpoint time)."""
        bad = torch.zeros((), dtype=torch.float32, device=self.device)
        for _, _, view in self.local_shards():
            bad += (~torch.isfinite(view)).sum().float()
        dist.all_reduce(bad, group=self.process_group)
        return bad.item() == 0

    # ------------------------------------------------------------------------------------------ steps
    def set_learning_rate(self, lr: float) -> None:
        """The learning rate of the next updates (the trainer's schedule, applied every step)."""
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"sink_tables learning rate must be a finite non-negative number, got {lr!r}")
        optimizer = self.module.fused_optimizer
        for group in optimizer.param_groups:
            group["lr"] = float(lr)
        optimizer.step()  # the fused optimizers only copy param_groups' lr into the kernel's lr tensor here

    def lookup(self, rows_per_layer: list[torch.Tensor], validate: bool = False) -> list[torch.Tensor]:
        """Per layer l, this rank's distinct rows (R_l,) int64 in [0, R) -> their values (R_l, 3D) on `device`.
        Training lookups (grad enabled) update exactly those rows once `step()` or backward says so (module
        docstring, "Gradient accumulation"). A collective: every rank calls it, with or without rows.
        `validate` checks range and distinctness (a host sync: for debugging; `compact_rows` makes valid rows)."""
        if len(rows_per_layer) != self.cfg.num_layers:
            raise ValueError(f"lookup takes one row tensor per layer ({self.cfg.num_layers}), got "
                             f"{len(rows_per_layer)}")
        for layer, rows in enumerate(rows_per_layer):
            if rows.dim() != 1 or rows.dtype != torch.int64:
                raise ValueError(f"rows of layer {layer} must be a 1-D int64 tensor, got {rows.dtype} "
                                 f"{tuple(rows.shape)}")
            if validate and rows.numel():
                if rows.min().item() < 0 or rows.max().item() >= self.cfg.rows:
                    raise ValueError(f"rows of layer {layer} must lie in [0, {self.cfg.rows})")
                if torch.unique(rows).numel() != rows.numel():
                    raise ValueError(f"rows of layer {layer} must be distinct")
        if not torch.is_grad_enabled():
            return self._lookup(rows_per_layer)
        if not self.cfg.deferred:
            if self._looked_up:
                raise RuntimeError("a second training lookup before step() with sink_tables.grad_accum=1 would "
                                   "update the rows twice in one step; set grad_accum to the micro-batches "
                                   "per step")
            self._looked_up = True
            return self._lookup(rows_per_layer)
        with torch.no_grad():
            leaves = [v.detach().requires_grad_(True) for v in self._lookup(rows_per_layer)]
        self._pending.append(([r.to(self.device) for r in rows_per_layer], leaves))
        return leaves

    def step(self, skip: torch.Tensor | None = None) -> torch.Tensor | None:
        """End of an optimizer step, after the last micro-batch's backward: deferred (grad_accum > 1 or
        update_at_step) applies the step's summed gradients (one fused update; a collective); otherwise the rows
        were updated in backward and this only closes the step.

        `skip` (deferred only): a device bool scalar, this rank's "the step is bad" (non-finite loss, DeepSpeed's
        overflow). Returns the step's global bad flag (float32 device scalar: 1 when any rank skipped or had
        non-finite summed gradients, which were then applied as zeros), or None when not deferred."""
        self._looked_up = False
        if not self.cfg.deferred:
            if skip is not None:
                raise ValueError("step(skip=...) needs deferred updates (grad_accum > 1 or update_at_step)")
            return None
        pending, self._pending = self._pending, []
        union, grads = [], []
        for layer in range(self.cfg.num_layers):
            ids = [rows[layer] for rows, _ in pending]
            rows = torch.unique(torch.cat(ids)) if ids else torch.empty(0, dtype=torch.int64, device=self.device)
            total = torch.zeros(rows.numel(), self.cfg.row_dim, device=self.device)
            for micro_rows, (_, leaves) in zip(ids, pending):
                if leaves[layer].grad is not None:
                    # a micro-batch's rows are distinct, so this indexed add has no duplicate index: the sum
                    # runs in micro-batch order, deterministic on every device
                    at = torch.searchsorted(rows, micro_rows)
                    total[at] += leaves[layer].grad
            union.append(rows)
            grads.append(total)
        bad = torch.zeros((), dtype=torch.float32, device=self.device) if skip is None else \
            skip.to(device=self.device, dtype=torch.float32).reshape(())
        for total in grads:
            bad = torch.maximum(bad, (~torch.isfinite(total)).any().to(torch.float32))
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.process_group)
        grads = [torch.where(bad > 0, torch.zeros_like(total), total) for total in grads]
        with torch.enable_grad():
            torch.autograd.backward(self._lookup(union), grads)
        return bad

    # ------------------------------------------------------------------------------------------ internals
    def _lookup(self, rows_per_layer: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchrec import KeyedJaggedTensor
        from torchrec.distributed import comm_ops

        rows_per_layer = [r.to(self.device) for r in rows_per_layer]
        counts = [r.numel() for r in rows_per_layer]
        if self.cfg.layout == "per_layer":
            features = KeyedJaggedTensor(keys=self.table_names, values=torch.cat(rows_per_layer),
                                         lengths=torch.tensor(counts, dtype=torch.int64, device=self.device))
            out = self.module(features)
            values = [out[name].values() for name in self.table_names]
        else:
            ids = torch.cat([r + layer * self.cfg.rows for layer, r in enumerate(rows_per_layer)])
            features = KeyedJaggedTensor(keys=self.table_names, values=ids,
                                         lengths=torch.tensor([ids.numel()], dtype=torch.int64, device=self.device))
            values = list(self.module(features)[self.table_names[0]].values().split(counts))
        done_by_torchrec = 1.0 / self.world_size if comm_ops.get_gradient_division() else 1.0
        scale = self.grad_scale / done_by_torchrec
        if scale != 1.0 and torch.is_grad_enabled():
            values = [_ScaleGrad.apply(v, scale) for v in values]
        return values
