"""Capacity plan for a NULL training run on SLURM GPU nodes: parameter counts, memory per GPU for each ZeRO
stage, activation memory per micro-batch, FLOPs per token (gathered vs published masked form), projected
tokens/s per GPU, GPU-hours and wall-clock for 1/4/16 nodes, the disk to hold the shards, and the sink tables at
R = 2^16 .. 2^24 rows per layer (memory per GPU, dense ZeRO against TorchRec row-wise sharding, beside the forget
budget each R buys). Prints JSON.

Every number here is COMPUTED from the model shape and stated assumptions (the cost facts measured on one H100
in /work/shared/docs/nulls_facts.md); none is a measurement of this trainer. docs/capacity_plan.md is its output, explained.

    python -m nulls_dist.launch.capacity_plan --preset paper_wiki_1b --tokens 32e9 > plan.json
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

from nulls_dist.config import NullConfig
from nulls_dist.forget_budget import analytic_retained_share

GIB = 2**30

# Measured on one H100 80GB, torch 2.11, bf16 (docs/nulls_facts.md "Cost facts"): MLP layer fwd+bwd at the paper's shape,
# 16 x 1024 tokens in 512-token single-source segments.
MLP_MS_PER_16K_TOKENS = {"masked": 4.78, "gathered": 2.11}
MICROBENCH_TOKENS = 16 * 1024
HBM_TB_S = 3.0
# Non-MLP matmuls (attention projections, scores, LM head) at the utilisation published dense ~1B training
# reaches (40-46K tokens/s/GPU at ~40% MFU, docs/nulls_facts.md): 40% of the measured 743 TFLOP/s bf16 matmul rate.
DENSE_MATMUL_TFLOPS = 0.40 * 743
PUBLISHED_DENSE_1B_TOKENS_S = 40_000  # the low end of the published range: the conservative planning rate
# Collective bandwidth per GPU, NCCL bus bandwidth (assumed, typical H100 nodes): NVLink within a node; 8 x 400 Gb/s
# InfiniBand per node (50 GB/s per GPU) across nodes, of which NCCL reaches ~90%.
BUSBW_GB_S = {"intra": 350.0, "inter": 45.0}
# One tar sample: tokens uint16 + source ids uint32 + loss mask uint8 per position, plus ~2.7 KiB of tar/.npy
# headers (data_pipeline/shards.py, measured on written shards).
TAR_BYTES_PER_SAMPLE = 3 * (512 + 128 + 256)
# Sink-table sizes of the plan: R rows per layer, the paper's 7,692 up to 2^24 (fbgemm indexes rows in int32: the
# shared layout's L * R must stay below 2^31, 32 x 2^24 = 2^29 does).
SINK_TABLE_ROWS = tuple(2**e for e in range(16, 25))
SINK_TABLE_GPUS = (8, 32, 128)
BUDGET_FORGETS = (100, 1_000, 10_000)
# TorchRec row-wise tables (nulls_dist/train/sink_tables.py): fp32 rows [gate | up | down] and fbgemm's optimizer
# state per row: row-wise Adagrad one float, element-wise Adagrad one per weight, SGD none.
SHARDED_STATE_FLOATS_PER_ROW = {"rowwise_adagrad": lambda row_dim: 1, "adagrad": lambda row_dim: row_dim,
                                "sgd": lambda row_dim: 0}
H100_GIB = 80 * 10**9 / GIB


@dataclass
class ParamCounts:
    embedding: int
    lm_head: int
    attention: int
    backbone_mlp: int
    sink_tables: int
    norms: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


def param_counts(cfg: NullConfig) -> ParamCounts:
    d, hs = cfg.n_embd, cfg.head_size
    qkv = d * (cfg.n_head + 2 * cfg.n_query_groups) * hs
    proj = cfg.n_head * hs * d
    return ParamCounts(
        embedding=cfg.padded_vocab_size * d,
        lm_head=cfg.padded_vocab_size * d,
        attention=cfg.n_layer * (qkv + proj),
        backbone_mlp=cfg.n_layer * 3 * cfg.n_backbone * d,
        sink_tables=cfg.n_layer * 3 * cfg.n_sink * d,
        norms=(2 * cfg.n_layer + 1) * d,
    )


def model_state_gib(num_params: int, stage: int, num_gpus: int) -> dict[str, float]:
    """Per-GPU bytes of bf16 weights + bf16 grads + fp32 master/Adam m/v (2 + 2 + 12 bytes per parameter),
    with ZeRO-1 sharding the optimizer states, ZeRO-2 also the grads, ZeRO-3 also the weights."""
    shard = {"weights": stage >= 3, "grads": stage >= 2, "optimizer": stage >= 1}
    per_param = {"weights": 2, "grads": 2, "optimizer": 12}
    out = {k: num_params * b / (num_gpus if shard[k] else 1) / GIB for k, b in per_param.items()}
    out["total"] = sum(out.values())
    return out


def activation_values_per_token_layer(cfg: NullConfig, sink_path: str, active_sinks: int) -> int:
    """bf16 values autograd keeps per token per layer (no activation checkpointing), counted op by op."""
    d, q = cfg.n_embd, cfg.n_head * cfg.head_size
    kv = 2 * cfg.n_query_groups * cfg.head_size
    attention = d + d + (q + kv) + (q + kv // 2) + q  # norm in/out, qkv, roped q/k, attention out (proj input)
    mlp_units = cfg.n_backbone + active_sinks if sink_path == "gathered" else cfg.n_mlp_units
    mlp = d + d + 3 * mlp_units + (cfg.n_mlp_units if sink_path == "masked" else 0)  # + the masked product
    return attention + mlp


def activation_gib(cfg: NullConfig, micro_batch: int, context: int, sink_path: str, active_sinks: int,
                   checkpointing: bool) -> float:
    tokens = micro_batch * context
    if checkpointing:  # each layer's input kept; one layer recomputed at a time
        per_token = 2 * (cfg.n_layer * cfg.n_embd + activation_values_per_token_layer(cfg, sink_path, active_sinks))
    else:
        per_token = 2 * cfg.n_layer * activation_values_per_token_layer(cfg, sink_path, active_sinks)
    logits = (2 + 4 + 4) * cfg.padded_vocab_size  # bf16 logits, fp32 copy for the loss, fp32 grad
    return tokens * (per_token + logits) / GIB


def forward_flops_per_token(cfg: NullConfig, sink_path: str, active_sinks: int, context: int) -> dict[str, float]:
    d, q = cfg.n_embd, cfg.n_head * cfg.head_size
    attn_linear = 2 * (d * (q + 2 * cfg.n_query_groups * cfg.head_size) + q * d)
    attn_scores = 2 * 2 * (context / 2) * q  # QK^T and AV over the causal half on average
    mlp_units = cfg.n_backbone + active_sinks if sink_path == "gathered" else cfg.n_mlp_units
    mlp = 2 * 3 * mlp_units * d
    head = 2 * d * cfg.padded_vocab_size
    return {"attention": cfg.n_layer * (attn_linear + attn_scores), "mlp": cfg.n_layer * mlp, "lm_head": head,
            "total": cfg.n_layer * (attn_linear + attn_scores + mlp) + head}


def projected_tokens_per_s(cfg: NullConfig, sink_path: str, active_sinks: int, context: int) -> float:
    """One H100: measured MLP time (docs/nulls_facts.md) + other matmuls at dense-1B utilisation + elementwise passes."""
    flops = forward_flops_per_token(cfg, sink_path, active_sinks, context)
    mlp_s = cfg.n_layer * MLP_MS_PER_16K_TOKENS[sink_path] / 1e3 / MICROBENCH_TOKENS
    matmul_s = 3 * (flops["attention"] + flops["lm_head"]) / (DENSE_MATMUL_TFLOPS * 1e12)
    # ~20 bf16 passes over the (tokens, D) stream per layer (norms, rope, residuals) + 3 fp32 passes over logits
    elementwise_s = (cfg.n_layer * 20 * 2 * cfg.n_embd + 3 * 4 * cfg.padded_vocab_size) / (HBM_TB_S * 1e12)
    return 1.0 / (mlp_s + matmul_s + elementwise_s)


def scaling(num_params: int, nodes: int, gpus_per_node: int, tokens_per_gpu_s: float, global_batch_tokens: int,
            total_tokens: float) -> dict[str, float]:
    """Step time = compute + one gradient reduce-scatter + parameter all-gather (bf16), no overlap assumed."""
    gpus = nodes * gpus_per_node
    compute_s = global_batch_tokens / gpus / tokens_per_gpu_s
    busbw = BUSBW_GB_S["intra" if nodes == 1 else "inter"] * 1e9
    comm_s = 2 * 2 * num_params * (gpus - 1) / gpus / busbw
    efficiency = compute_s / (compute_s + comm_s)
    wall_s = total_tokens / (gpus * tokens_per_gpu_s * efficiency)
    return {"gpus": gpus, "step_compute_s": compute_s, "step_comm_s": comm_s, "scaling_efficiency": efficiency,
            "wall_clock_h": wall_s / 3600, "gpu_hours": wall_s * gpus / 3600}


def data_disk_gb(total_tokens: float, epochs: int, context: int, token_bytes: int = 2) -> dict[str, float]:
    samples = total_tokens / epochs / (context - 1)  # packed: every context trains context-1 targets
    per_sample = context * (token_bytes + 4 + 1) + TAR_BYTES_PER_SAMPLE
    return {"samples_per_epoch": samples, "bytes_per_sample": per_sample, "shards_gb": samples * per_sample / 1e9}


def sink_table_gib(cfg: NullConfig, rows: int, num_gpus: int) -> dict:
    """Per-GPU GiB of every layer's three (R, D) sink tables: dense in the DeepSpeed engine at each ZeRO stage
    (bf16 weights and dense-shaped bf16 grads, fp32 master + Adam m + v: `model_state_gib`) against TorchRec
    row-wise sharding over the GPUs (fp32 rows + the optimizer's state per row, nothing dense)."""
    params = cfg.n_layer * 3 * rows * cfg.n_embd
    row_dim, num_rows = 3 * cfg.n_embd, cfg.n_layer * rows
    dense = {f"zero{stage}": model_state_gib(params, stage, num_gpus)["total"] for stage in range(4)}
    sharded = {name: num_rows * (row_dim + state(row_dim)) * 4 / num_gpus / GIB
               for name, state in SHARDED_STATE_FLOATS_PER_ROW.items()}
    # dense: every step reduce-scatters the dense-shaped bf16 gradient and all-gathers bf16 weights of every row,
    # as `scaling` counts for all parameters; sharded tables send only the rows the batch looks up
    comm = 2 * 2 * params * (num_gpus - 1) / num_gpus / 1e9
    return {"dense": dense, "sharded": sharded, "dense_comm_gb_per_step": comm}


def sink_table_plan(cfg: NullConfig, k: float) -> dict:
    """The sink tables at each of SINK_TABLE_ROWS rows per layer, with k sinks per source (the paper's ~100)."""
    out = {}
    for rows in SINK_TABLE_ROWS:
        params = cfg.n_layer * 3 * rows * cfg.n_embd
        out[f"2^{rows.bit_length() - 1}"] = {
            "rows_per_layer": rows, "params": params, "fp32_gib": params * 4 / GIB,
            "gib_per_gpu": {str(n): sink_table_gib(cfg, rows, n) for n in SINK_TABLE_GPUS},
            "retained_share_after": {str(f): analytic_retained_share(f, k, rows) for f in BUDGET_FORGETS},
        }
    return {"label": "tables only (add the other model states and the activations above); dense = in the DeepSpeed "
                     "engine, sharded = TorchRec row-wise over the GPUs (docs/sink_tables.md)",
            "k": k, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "gpu_gib": H100_GIB, "rows": out}


def plan(preset: str, tokens: float, epochs: int, context: int, global_batch_tokens: int) -> dict:
    cfg = NullConfig.from_preset(preset)
    active = round(cfg.n_sink * cfg.p_mem)  # each pool unit is on for a source with probability p_mem: ~100
    params = param_counts(cfg)
    rates = {"conservative_published_dense_1b": PUBLISHED_DENSE_1B_TOKENS_S,
             "projected_masked": projected_tokens_per_s(cfg, "masked", active, context),
             "projected_gathered": projected_tokens_per_s(cfg, "gathered", active, context)}
    return {
        "label": "PROJECTION: computed from shapes and docs/nulls_facts.md cost facts, not measured",
        "preset": preset, "active_sinks_per_source": active, "params": {**asdict(params), "total": params.total},
        "model_state_gib_per_gpu": {f"zero{s}": {str(n): model_state_gib(params.total, s, n) for n in (8, 32, 128)}
                                    for s in range(4)},
        "activation_gib_per_gpu": {
            f"{path}_mb{mb}{'_ckpt' if ck else ''}": activation_gib(cfg, mb, context, path, active, ck)
            for path in ("gathered", "masked") for mb in (4, 8, 16) for ck in (False, True)},
        "forward_flops_per_token": {path: forward_flops_per_token(cfg, path, active, context)
                                    for path in ("gathered", "masked")},
        "tokens_per_s_per_gpu": rates,
        "runs": {name: {f"{n}x8": scaling(params.total, n, 8, rate, global_batch_tokens, tokens) for n in (1, 4, 16)}
                 for name, rate in rates.items()},
        "data": data_disk_gb(tokens, epochs, context),
        "sink_tables": sink_table_plan(cfg, active),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper_wiki_1b")
    parser.add_argument("--tokens", type=float, default=32e9, help="tokens trained (all epochs)")
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--global-batch-tokens", type=int, default=1024 * 1024)
    args = parser.parse_args(argv)
    if args.tokens <= 0 or not math.isfinite(args.tokens):
        raise ValueError(f"--tokens must be positive, got {args.tokens}")
    print(json.dumps(plan(args.preset, args.tokens, args.epochs, args.context, args.global_batch_tokens), indent=1))


if __name__ == "__main__":
    main()
