"""Benchmark of the whole MLP layer (torch backbone SwiGLU + sink MLP), fwd / bwd / fwd+bwd, for three sink
paths on the same card in the same run: `masked` (the published dense form: SwiGLU over backbone + the whole
pool, then the per-token mask), `gathered` (torch reference, `nulls_dist.kernels.sink_mlp.sink_mlp_ref`) and `triton`.
Prints (and optionally writes) JSON with ms, achieved TFLOP/s and GB/s for the FLOPs and bytes the layer must
do, the share of the card's roofline, the card's name, versions and the git commit.

    python -m nulls_dist.kernels.bench.sink_mlp_bench --out bench.json            # GPU: paper + large-pool shapes
    TRITON_INTERPRET=1 python -m nulls_dist.kernels.bench.sink_mlp_bench --smoke  # CPU: tiny shape, interpreter

Shape legend: N tokens, D width, B backbone units, P pool rows, U sources, K rows per source, I = B + P.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from nulls_dist.kernels.sink_mlp import sink_mlp

LOG = logging.getLogger(__name__)
# Dense bf16 tensor-core peak (no sparsity) and HBM bandwidth from NVIDIA's datasheets, keyed by the name
# torch reports. A card not listed gets no roofline share: we never guess a peak.
DEVICE_PEAKS = {
    "NVIDIA H100 80GB HBM3": (989.4e12, 3.35e12),  # H100 SXM5
    "NVIDIA H100 PCIe": (756.0e12, 2.0e12),
    "NVIDIA H100 NVL": (835.0e12, 3.9e12),
    "NVIDIA H200": (989.4e12, 4.8e12),  # H200 SXM
    "NVIDIA A100-SXM4-80GB": (312.0e12, 2.039e12),
    "NVIDIA A100-SXM4-40GB": (312.0e12, 1.555e12),
}


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    num_backbone: int
    pool: int
    num_rows: int  # sequences in the micro-batch
    row_len: int
    seg_len: int  # tokens per single-source segment
    k: int | None  # rows per source (uniform subsets); None = each unit on with probability p_mem
    p_mem: float = 0.013


PAPER = Shape("paper", 960, 500, 7692, 16, 1024, 512, None)
LARGE = [Shape(f"large-pool{p}-k{k}", 2048, 512, p, 4, 2048, 2048, k) for p in (65536, 1048576) for k in (64, 256)]
SMOKE = Shape("smoke", 24, 8, 97, 2, 16, 5, None, p_mem=0.1)


def bernoulli_source_rows(num_sources: int, pool: int, p_mem: float, gen: torch.Generator) -> torch.Tensor:
    """(U, K) ascending active rows, -1 padded: every unit on with probability p_mem, independently. This is the
    row-count distribution of the published hash (Binomial(P, p_mem), ~100 +- 10 at the paper's shape); which
    rows are on does not change the kernels' cost, so the kernels need no copy of the hash itself."""
    mask = torch.rand(num_sources, pool, generator=gen) < p_mem  # (U, P)
    return rows_from_mask(mask)


def rows_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(U, P) bool -> (U, K) int64 ascending active rows, -1 padded to the widest source."""
    width = int(mask.sum(1).max())
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]  # active rows first
    return torch.where(torch.gather(mask, 1, order), order, -1)


def make_batch(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Random weights and a packed batch of single-source segments, each segment its own source."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = shape.num_rows * shape.row_len
    seg_lens = []
    for _ in range(shape.num_rows):
        seg_lens += [shape.seg_len] * (shape.row_len // shape.seg_len)
        if shape.row_len % shape.seg_len:
            seg_lens.append(shape.row_len % shape.seg_len)
    num_segments = len(seg_lens)
    offsets = torch.tensor([0] + seg_lens).cumsum(0)  # (S+1,)
    if shape.k is None:
        source_rows = bernoulli_source_rows(num_segments, shape.pool, shape.p_mem, gen)
    else:
        source_rows = torch.stack([torch.randperm(shape.pool, generator=gen)[: shape.k].sort().values
                                   for _ in range(num_segments)])  # (U, K)
    dev_gen = torch.Generator(device=device).manual_seed(seed)  # tables are drawn on the card (1M x 2048)
    std = shape.dim**-0.5
    make = lambda *s: torch.randn(*s, generator=dev_gen, device=device, dtype=dtype) * std  # noqa: E731
    return {
        "x": torch.randn(num_tokens, shape.dim, generator=dev_gen, device=device, dtype=dtype),  # (N, D)
        "dy": make(num_tokens, shape.dim),
        "backbone": [make(shape.num_backbone, shape.dim) for _ in range(3)],  # gate, up (B, D); down^T (B, D)
        "sink": [make(shape.pool, shape.dim) for _ in range(3)],  # (P, D) each
        "offsets": offsets.to(device),
        "seg_source": torch.arange(num_segments, device=device),
        "source_rows": source_rows.to(device),
        "num_backbone": shape.num_backbone,
    }


def backbone_mlp(x, w_gate, w_up, w_down_t):  # (N, D) -> (N, D)
    return (F.silu(x @ w_gate.t()) * (x @ w_up.t())) @ w_down_t


def masked_layer(x, params, batch):
    """Published form: one SwiGLU over all I = B + P units (joint tables, as fc_1/fc_2/proj are stored),
    inactive sink units zeroed by the token's mask."""
    gate, up, down_t = params  # (I, D) each
    rows, num_backbone = batch["source_rows"], batch["num_backbone"]
    src_mask = torch.zeros(rows.shape[0], gate.shape[0], dtype=x.dtype, device=x.device)  # (U, I)
    src_mask[:, :num_backbone] = 1
    src_index = torch.arange(rows.shape[0], device=x.device)[:, None].expand_as(rows)
    src_mask[src_index[rows >= 0], num_backbone + rows[rows >= 0]] = 1
    lengths = batch["offsets"][1:] - batch["offsets"][:-1]
    token_mask = src_mask[torch.repeat_interleave(batch["seg_source"], lengths, output_size=x.shape[0])]  # (N, I)
    return (F.silu(x @ gate.t()) * (x @ up.t()) * token_mask) @ down_t


def split_layer(impl):
    """Backbone as torch matmuls + the sink op on the separate (P, D) sink tables (the model's layout)."""
    def layer(x, params, batch):
        backbone, sink = params[:3], params[3:]
        y_sink = sink_mlp(x, batch["offsets"], batch["seg_source"], batch["source_rows"], *sink, impl=impl)
        return backbone_mlp(x, *backbone) + y_sink
    return layer


def folded_layer(x, params, batch):
    """Backbone folded into the Triton op as rows every source includes (joint (I, D) tables)."""
    return sink_mlp(x, batch["offsets"], batch["seg_source"], batch["folded_rows"], *params, impl="triton")


# name -> (layer, which parameter set it differentiates: "split" = 3 backbone + 3 sink, "joint" = 3 (I, D))
LAYERS = {"masked": (masked_layer, "joint"), "gathered": (split_layer("torch"), "split"),
          "triton": (split_layer("triton"), "split"), "triton_folded_backbone": (folded_layer, "joint")}


def layer_params(batch: dict, layout: str) -> list:
    """Leaf parameters: "split" (model layout) or "joint" (I, D) tables, built outside the timed region as
    if the model stored them that way (built per impl and dropped after: at pool 1M a copy is 13 GB)."""
    if layout == "split":
        return [w.requires_grad_(True) for w in batch["backbone"] + batch["sink"]]
    return [torch.cat([b, s]).detach().requires_grad_(True) for b, s in zip(batch["backbone"], batch["sink"])]


def add_folded_rows(batch: dict) -> None:
    rows, num_backbone = batch["source_rows"], batch["num_backbone"]
    everyone = torch.arange(num_backbone, device=rows.device).expand(rows.shape[0], num_backbone)  # (U, B)
    batch["folded_rows"] = torch.cat([everyone, torch.where(rows >= 0, rows + num_backbone, -1)], 1)  # (U, B+K)


def timer(device: str, warmup: int, rep: int):
    if device == "cuda":
        return lambda fn: triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")

    def cpu_time(fn):  # ms of one call after one warm call: the CPU smoke run checks plumbing, not speed
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return cpu_time


def layer_cost(shape: Shape, batch: dict, elem_bytes: int) -> dict:
    """FLOPs and bytes the layer must do: only backbone + active rows computed; dense table gradients."""
    n, d = batch["x"].shape
    rows = batch["source_rows"]
    lengths = (batch["offsets"][1:] - batch["offsets"][:-1]).cpu()
    active = (rows >= 0).sum(1).cpu()[batch["seg_source"].cpu()]  # (S,) active rows of each segment
    unit_tokens = shape.num_backbone * n + int((lengths * active).sum())  # sum over tokens of active units
    touched = int(torch.unique(rows[rows >= 0]).numel())
    fwd_flops = 6 * d * unit_tokens  # three (tokens x D x units) matmuls
    fwd_bytes = elem_bytes * d * (2 * n + 3 * shape.num_backbone + 3 * touched)  # x, y, weights
    # backward: read dy, x, weights; write dx, backbone grads and the dense (P, D) sink grads
    bwd_bytes = elem_bytes * d * (3 * n + 6 * shape.num_backbone + 3 * touched + 3 * shape.pool)
    return {"fwd": (fwd_flops, fwd_bytes), "bwd": (2 * fwd_flops, bwd_bytes),
            "fwd+bwd": (3 * fwd_flops, fwd_bytes + bwd_bytes), "touched_rows": touched,
            "mean_active_rows": float(active.float().mean()), "masked_flops_fwd": 6 * d * n * (shape.num_backbone + shape.pool)}


def masked_fits(shape: Shape, n: int, elem_bytes: int, device: str) -> str | None:
    """Why the masked form would not fit on the card, or None. ~6 (N, I) intermediates live at once."""
    if device != "cuda":
        return None
    need = 6 * n * (shape.num_backbone + shape.pool) * elem_bytes
    total = torch.cuda.get_device_properties(0).total_memory
    return None if need < 0.8 * total else f"needs ~{need / 2**30:.0f} GiB of (N, I) intermediates, card has {total / 2**30:.0f} GiB"


PHASES = ("fwd", "bwd", "fwd+bwd")


def rates(flops: int, num_bytes: int, ms: float, peaks) -> dict:
    out = {"ms": round(ms, 4), "tflops": flops / ms / 1e9, "gbps": num_bytes / ms / 1e6}
    if peaks is not None:
        roofline_ms = max(flops / peaks[0], num_bytes / peaks[1]) * 1e3
        out["roofline_ms"] = roofline_ms
        out["roofline_share"] = roofline_ms / ms
    return out


def time_layer(layer, x, params, batch, y_ref, time_ms):
    """Max |error| against the gathered output, and ms for fwd, bwd and fwd+bwd of one layer."""
    leaves, dy = [x, *params], batch["dy"]
    with torch.no_grad():
        err = (layer(x, params, batch).float() - y_ref).abs().max().item()
    y = layer(x, params, batch)
    phases = {
        "fwd": time_ms(lambda: layer(x, params, batch)),  # builds the autograd graph, as in training
        "bwd": time_ms(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)),
        "fwd+bwd": time_ms(lambda: torch.autograd.grad(layer(x, params, batch), leaves, dy)),
    }
    return err, phases


def bench_shape(shape: Shape, dtype: torch.dtype, device: str, time_ms, peaks) -> dict:
    batch = make_batch(shape, dtype, device)
    add_folded_rows(batch)
    elem_bytes = torch.finfo(dtype).bits // 8
    cost = layer_cost(shape, batch, elem_bytes)
    x = batch["x"].requires_grad_(True)
    record = {"shape": asdict(shape), "num_tokens": x.shape[0], "num_sources": batch["source_rows"].shape[0],
              "k_padded": batch["source_rows"].shape[1], "touched_rows": cost["touched_rows"],
              "mean_active_rows": cost["mean_active_rows"], "masked_flops_fwd": cost["masked_flops_fwd"],
              "flops": {p: cost[p][0] for p in PHASES}, "bytes": {p: cost[p][1] for p in PHASES}, "impls": {}}
    with torch.no_grad():
        y_ref = LAYERS["gathered"][0](x, layer_params(batch, "split"), batch).float()
    for impl, (layer, layout) in LAYERS.items():
        reason = masked_fits(shape, x.shape[0], elem_bytes, device) if impl == "masked" else None
        if reason:
            record["impls"][impl] = {"skipped": reason}
            continue
        LOG.info("shape %s: timing %s", shape.name, impl)
        try:
            err, phases = time_layer(layer, x, layer_params(batch, layout), batch, y_ref, time_ms)
        except torch.cuda.OutOfMemoryError as exc:  # a failed impl is a result, not a crash of the run
            record["impls"][impl] = {"skipped": f"out of memory: {exc}".splitlines()[0]}
            torch.cuda.empty_cache()
            continue
        record["impls"][impl] = {"max_abs_err_vs_gathered": err, "y_scale": y_ref.abs().max().item(),
                                 **{p: rates(*cost[p], ms, peaks) for p, ms in phases.items()}}
    done = record["impls"]
    for fast in ("triton", "triton_folded_backbone"):
        for base in ("masked", "gathered"):
            if "fwd+bwd" in done.get(fast, {}) and "fwd+bwd" in done.get(base, {}):
                record[f"speedup_fwd+bwd_{fast}_vs_{base}"] = done[base]["fwd+bwd"]["ms"] / done[fast]["fwd+bwd"]["ms"]
    return record


def git_commit() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def metadata(device: str, dtype: torch.dtype, interpreted: bool) -> dict:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu {platform.machine()} ({os.cpu_count()} cores)"
    return {"device": name, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), **git_commit(),
            "triton_interpreter": interpreted, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "peaks": DEVICE_PEAKS.get(name) if device == "cuda" else None}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Whole-MLP-layer benchmark: masked vs gathered vs triton")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run (triton under the interpreter)")
    parser.add_argument("--shapes", default="paper,large", help="comma list of: paper, large")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # stderr; JSON goes to stdout
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        shapes, dtype = [SMOKE], torch.float32
    else:
        if device != "cuda":
            parser.error("full shapes need a CUDA GPU; use --smoke on CPU")
        chosen = set(args.shapes.split(","))
        shapes = ([PAPER] if "paper" in chosen else []) + (LARGE if "large" in chosen else [])
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    from nulls_dist.kernels.sink_mlp_triton import uses_interpreter

    if device == "cpu" and not uses_interpreter():
        # Triton reads TRITON_INTERPRET when it is imported, so it must be set before the process starts.
        parser.error("the CPU smoke run needs TRITON_INTERPRET=1 in the environment")
    meta = metadata(device, dtype, uses_interpreter())
    peaks = meta["peaks"] if dtype == torch.bfloat16 else None  # the table holds bf16 tensor-core peaks
    time_ms = timer(device, args.warmup, args.rep)
    report = {"meta": meta, "results": [bench_shape(s, dtype, device, time_ms, peaks) for s in shapes]}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)  # a benchmark result, not an artifact others depend on
    return report


if __name__ == "__main__":
    main()
