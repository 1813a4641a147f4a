"""The toy training problem the sink-table tests share: a stack of L sink-MLP layers (the real `sink_mlp` op,
impl="torch") with a fixed random head and cross-entropy, fed packed batches whose sources share sink rows, and
the dense single-process reference that holds every table as a plain tensor and applies the update rules by hand.

Each step has `grad_accum` micro-batches of PARTS_PER_MICRO parts; part j of a micro-batch goes to rank
j % world_size, so on 2 ranks each rank holds one part and on 1 rank one rank holds both: the global batch never
depends on the world size. Part 0 and part 1 of a micro-batch always share one source (a source split across
ranks) and draw the rest from a small set of ids, so ranks touch the same rows in the same step.

The loss each rank backpropagates is the trainer's: (its CE sum) * W / (the step's counted targets), which a
DeepSpeed engine would average over ranks; the reported step loss is the CE sum over all ranks / the count.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nulls_dist.kernels.sink_mlp import sink_mlp
from nulls_dist.sink_config import SinkAssignmentConfig
from nulls_dist.sinks import SinkAssignment
from nulls_dist.train.sink_tables import SinkTablesConfig, init_rows

L, D, R, K, V = 2, 16, 64, 6, 11  # layers, width, rows per layer, rows per source, classes
TOKENS_PER_PART = 24
PARTS_PER_MICRO = 2
SOURCES = list(range(100, 112))
INIT_STD = 0.2  # large enough that the sink layers move the loss from step 0 (0.02 would hide them)
LR = {"rowwise_adagrad": 0.1, "adagrad": 0.1, "sgd": 1.0}

ASSIGNMENT = SinkAssignment(SinkAssignmentConfig(strategy="uniform", pool_size=R, k=K, layer_specific=True, seed=3))
HEAD = torch.randn(D, V, generator=torch.Generator().manual_seed(7)) / math.sqrt(D)


def tables_config(optimizer: str = "rowwise_adagrad", **changes) -> SinkTablesConfig:
    fields = {"num_layers": L, "rows": R, "dim": D, "lr": LR[optimizer], "init_std": INIT_STD, "seed": 11}
    return SinkTablesConfig(optimizer=optimizer, **{**fields, **changes})


def lr_at(cfg: SinkTablesConfig, step: int) -> float:
    """A schedule (cosine over 40 steps), so resumes also check that the learning rate is set every step."""
    return cfg.lr * (0.55 + 0.45 * math.cos(math.pi * step / 40))


def part(step: int, micro: int, index: int) -> dict:
    """One part: x (N, D), segments (offsets (S+1,), seg_source (S,)) over sources (U,), labels (N,)."""
    gen = torch.Generator().manual_seed(1_000_003 * step + 1009 * micro + index)
    shared = SOURCES[(step + micro) % len(SOURCES)]  # in both parts of the micro-batch
    others = torch.randperm(len(SOURCES), generator=gen)[:2].tolist()
    sources = torch.tensor([shared] + [SOURCES[i] for i in others])
    cuts = sorted(torch.randperm(TOKENS_PER_PART - 1, generator=gen)[:2].add(1).tolist())
    offsets = torch.tensor([0] + cuts + [TOKENS_PER_PART])
    x = torch.randn(TOKENS_PER_PART, D, generator=gen)
    # a label each source's rows can learn: a function of the source and of the token's first feature's sign
    token_source = sources.repeat_interleave(offsets.diff())
    labels = (token_source * 5 + (x[:, 0] > 0).long()) % V
    return {"x": x, "offsets": offsets, "seg_source": torch.arange(3), "sources": sources, "labels": labels}


def merge(parts: list[dict]) -> dict:
    """Several parts as one packed micro-batch (tokens, segments and source slots concatenated)."""
    shift_t = [0]
    shift_s = [0]
    for p in parts:
        shift_t.append(shift_t[-1] + p["x"].shape[0])
        shift_s.append(shift_s[-1] + p["sources"].numel())
    return {"x": torch.cat([p["x"] for p in parts]),
            "offsets": torch.cat([torch.tensor([0])] + [p["offsets"][1:] + t for p, t in zip(parts, shift_t)]),
            "seg_source": torch.cat([p["seg_source"] + s for p, s in zip(parts, shift_s)]),
            "sources": torch.cat([p["sources"] for p in parts]),
            "labels": torch.cat([p["labels"] for p in parts])}


def rank_micro_batches(step: int, grad_accum: int, rank: int, world_size: int) -> list[dict]:
    return [merge([part(step, m, j) for j in range(PARTS_PER_MICRO) if j % world_size == rank])
            for m in range(grad_accum)]


def counted_targets(grad_accum: int) -> int:
    return grad_accum * PARTS_PER_MICRO * TOKENS_PER_PART


def source_rows(batch: dict) -> list[torch.Tensor]:
    """Per layer, (U, K) pool rows of the batch's source slots."""
    return [ASSIGNMENT.rows(batch["sources"], layer=layer) for layer in range(L)]


def ce_sum(batch: dict, tables: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
           rows: list[torch.Tensor]) -> torch.Tensor:
    """Sum of cross-entropy of the batch through L residual sink-MLP layers; tables[l] = (gate, up, down)."""
    h = batch["x"]
    for layer in range(L):
        gate, up, down = tables[layer]
        h = h + sink_mlp(h, batch["offsets"], batch["seg_source"], rows[layer], gate, up, down, impl="torch")
    return F.cross_entropy(h @ HEAD, batch["labels"], reduction="sum")


# ------------------------------------------------------------------------------------------------ reference
class DenseReference:
    """Every table as one dense (R, 3D) tensor in one process; `rule` is the update written by hand:
    rowwise_adagrad / adagrad / sgd (what the sharded tables should do) or adam (a different rule)."""

    def __init__(self, cfg: SinkTablesConfig, rule: str | None = None) -> None:
        self.cfg, self.rule = cfg, rule or cfg.optimizer
        self.tables = [init_rows(cfg, layer, 0, cfg.rows) for layer in range(cfg.num_layers)]
        self.state = [torch.zeros(cfg.rows) if self.rule == "rowwise_adagrad" else torch.zeros(cfg.rows, cfg.row_dim)
                      for _ in range(cfg.num_layers)]
        self.adam_v = [torch.zeros(cfg.rows, cfg.row_dim) for _ in range(cfg.num_layers)]
        self.t = 0

    def step(self, step: int) -> float:
        cfg = self.cfg
        params = [t.clone().requires_grad_(True) for t in self.tables]
        split = [(p[:, :D], p[:, D: 2 * D], p[:, 2 * D:]) for p in params]
        total = sum(ce_sum(b, split, source_rows(b)) for b in rank_micro_batches(step, cfg.grad_accum, 0, 1))
        loss = total / counted_targets(cfg.grad_accum)
        loss.backward()
        lr, self.t = lr_at(cfg, step), self.t + 1
        with torch.no_grad():
            for layer, p in enumerate(params):
                g, w = p.grad, self.tables[layer]
                if self.rule == "rowwise_adagrad":  # untouched rows have g = 0 and do not move
                    self.state[layer] += (g * g).mean(dim=1)
                    w -= lr * g / (self.state[layer].sqrt() + cfg.eps)[:, None]
                elif self.rule == "adagrad":
                    self.state[layer] += g * g
                    w -= lr * g / (self.state[layer].sqrt() + cfg.eps)
                elif self.rule == "sgd":
                    w -= lr * g
                elif self.rule == "adam":  # dense Adam: moves every row, touched or not, through its moments
                    m, v = self.state[layer], self.adam_v[layer]
                    m.mul_(0.9).add_(g, alpha=0.1)
                    v.mul_(0.999).addcmul_(g, g, value=0.001)
                    w -= lr * (m / (1 - 0.9 ** self.t)) / ((v / (1 - 0.999 ** self.t)).sqrt() + cfg.eps)
                else:
                    raise ValueError(self.rule)
        return loss.item()

    def run(self, steps: int) -> list[float]:
        return [self.step(step) for step in range(steps)]
