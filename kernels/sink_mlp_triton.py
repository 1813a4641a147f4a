"""Triton kernels for the sink-MLP op (see `kernels/sink_mlp.py` for the contract and the torch reference).

Owns four kernels, their launchers, the autograd wrapper `sink_mlp_triton` and a functional backward that can
also return compact (rows, values) table gradients. Design and tiling are explained in docs/kernels.md.

Shape legend (as in sink_mlp.py):
    N  tokens          D  model width          P  rows in the sink pool
    S  segments        U  distinct sources     K  padded active rows per source (-1 = padding)
    T  token tiles (each tile = up to BLOCK_M tokens of ONE segment; the plan: `kernels/tiles.py`)
    O  output rows of the table-gradient reduction (P for dense, R touched rows for compact)

Forward  (saves the pre-activations gate/up (N, K) in fp32; h = silu(gate) * up is recomputed elementwise):
    1. _hidden_kernel   grid (T, K/BK):  gate, up = x @ W_gate[S]^T, x @ W_up[S]^T      (contract over D)
    2. _expand_kernel   grid (T, D/BD):  y = (silu(gate) * up) @ W_down[S]               (contract over K)
Backward:
    1. _hidden_kernel   grid (T, K/BK):  dh = dy @ W_down[S]^T; d_gate, d_up from dh, gate, up
    2. _expand_kernel   grid (T, D/BD):  dx = d_gate @ W_gate[S] + d_up @ W_up[S]
    3. _slot_grad_kernel grid (U, K/BK, D/BD): per (source, row slot) partial table gradients, summed over that
       source's segments and tokens in a fixed order (one program owns each output element).
    4. _row_reduce_kernel grid (O/BR, D/BD): (row, slot) pairs sorted once by row (torch, stable); each program
       walks its rows' runs in sorted order and writes every output row (zeros for untouched rows).
No floating-point atomics anywhere: every output element is written by exactly one program, in a fixed order,
so gradients are bit-identical across runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nulls_dist.kernels.sink_mlp_ref import check_sink_mlp_inputs
from nulls_dist.kernels.tiles import TilePlan, tile_plan_torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Default tiles: multiples of 16 (tl.dot's minimum on NVIDIA), untuned: no GPU has measured them yet.
DEFAULT_BLOCKS = {"block_m": 64, "block_k": 32, "block_d": 64, "block_r": 16}


@triton.jit
def _tile_range(tile_start_ptr, tile_end_ptr, tile_src_ptr, pid):
    """First token, end token (exclusive) and source index of token tile `pid`."""
    start = tl.load(tile_start_ptr + pid)
    end = tl.load(tile_end_ptr + pid)
    src = tl.load(tile_src_ptr + pid)
    return start, end, src


@triton.jit
def _hidden_kernel(
    a_ptr,  # (N, D) x (forward) or dy (backward)
    w1_ptr,  # (P, D) w_gate (forward) or w_down (backward)
    w2_ptr,  # (P, D) w_up (forward); unused in backward
    rows_ptr,  # (U, K) int64, -1 padded
    tile_start_ptr, tile_end_ptr, tile_src_ptr,  # (T,) int64
    gate_ptr, up_ptr,  # (N, K) fp32: written in forward, read in backward
    d_gate_ptr, d_up_ptr,  # (N, K) fp32: written in backward
    D, K,
    BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    start, end, src = _tile_range(tile_start_ptr, tile_end_ptr, tile_src_ptr, pid_t)
    if start >= end:
        return
    tok = start + tl.arange(0, BLOCK_M).to(tl.int64)  # (BM,)
    tok_mask = tok < end
    slot = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
    slot_mask = slot < K
    rows = tl.load(rows_ptr + src * K + slot, mask=slot_mask, other=-1)  # (BK,) int64
    row_mask = rows >= 0
    rows = tl.where(row_mask, rows, 0)
    acc1 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        a = tl.load(a_ptr + tok[:, None] * D + d[None, :], mask=tok_mask[:, None] & d_mask[None, :], other=0.0)
        w_offs = rows[None, :] * D + d[:, None]  # (BD, BK): W[S]^T
        w_mask = row_mask[None, :] & d_mask[:, None]
        acc1 = tl.dot(a, tl.load(w1_ptr + w_offs, mask=w_mask, other=0.0), acc1, input_precision=DOT_PRECISION)
        if not BACKWARD:
            acc2 = tl.dot(a, tl.load(w2_ptr + w_offs, mask=w_mask, other=0.0), acc2, input_precision=DOT_PRECISION)
    nk_offs = tok[:, None] * K + slot[None, :]
    nk_mask = tok_mask[:, None] & slot_mask[None, :]
    if BACKWARD:
        gate = tl.load(gate_ptr + nk_offs, mask=nk_mask, other=0.0)
        up = tl.load(up_ptr + nk_offs, mask=nk_mask, other=0.0)
        sig = tl.sigmoid(gate)
        # d silu(g)/dg = sig * (1 + g * (1 - sig))
        tl.store(d_gate_ptr + nk_offs, acc1 * up * sig * (1.0 + gate * (1.0 - sig)), mask=nk_mask)
        tl.store(d_up_ptr + nk_offs, acc1 * gate * sig, mask=nk_mask)
    else:
        tl.store(gate_ptr + nk_offs, acc1, mask=nk_mask)
        tl.store(up_ptr + nk_offs, acc2, mask=nk_mask)


@triton.jit
def _expand_kernel(
    h1_ptr, h2_ptr,  # (N, K) fp32: gate, up (SWIGLU) or d_gate, d_up
    w1_ptr, w2_ptr,  # (P, D): w_down (SWIGLU; w2 unused) or w_gate, w_up
    rows_ptr,  # (U, K) int64, -1 padded
    tile_start_ptr, tile_end_ptr, tile_src_ptr,  # (T,) int64
    out_ptr,  # (N, D): y (SWIGLU) or dx
    D, K,
    SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    start, end, src = _tile_range(tile_start_ptr, tile_end_ptr, tile_src_ptr, pid_t)
    if start >= end:
        return
    tok = start + tl.arange(0, BLOCK_M).to(tl.int64)  # (BM,)
    tok_mask = tok < end
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,)
    d_mask = d < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        slot = k0 + tl.arange(0, BLOCK_K)
        slot_mask = slot < K
        rows = tl.load(rows_ptr + src * K + slot, mask=slot_mask, other=-1)  # (BK,)
        row_mask = rows >= 0
        rows = tl.where(row_mask, rows, 0)
        nk_offs = tok[:, None] * K + slot[None, :]
        nk_mask = tok_mask[:, None] & slot_mask[None, :]
        h1 = tl.load(h1_ptr + nk_offs, mask=nk_mask, other=0.0)  # (BM, BK) fp32
        h2 = tl.load(h2_ptr + nk_offs, mask=nk_mask, other=0.0)
        w_offs = rows[:, None] * D + d[None, :]  # (BK, BD)
        w_mask = row_mask[:, None] & d_mask[None, :]
        w1 = tl.load(w1_ptr + w_offs, mask=w_mask, other=0.0)
        if SWIGLU:
            h = h1 * tl.sigmoid(h1) * h2
            acc = tl.dot(h.to(w1.dtype), w1, acc, input_precision=DOT_PRECISION)
        else:
            w2 = tl.load(w2_ptr + w_offs, mask=w_mask, other=0.0)
            acc = tl.dot(h1.to(w1.dtype), w1, acc, input_precision=DOT_PRECISION)
            acc = tl.dot(h2.to(w2.dtype), w2, acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + tok[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tok_mask[:, None] & d_mask[None, :])


@triton.jit
def _slot_grad_kernel(
    x_ptr, dy_ptr,  # (N, D)
    gate_ptr, up_ptr, d_gate_ptr, d_up_ptr,  # (N, K) fp32
    offsets_ptr,  # (S+1,) int64
    seg_order_ptr,  # (S,) int64: segments grouped by source, ascending within a source
    src_seg_ptr,  # (U+1,) int64: source u owns seg_order[src_seg[u]:src_seg[u+1]]
    part_gate_ptr, part_up_ptr, part_down_ptr,  # (U*K, D) fp32 partial table gradients per (source, slot)
    D, K,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    src = tl.program_id(0).to(tl.int64)
    slot = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
    slot_mask = slot < K
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,)
    d_mask = d < D
    acc_gate = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    acc_down = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    seg_lo = tl.load(src_seg_ptr + src)
    seg_hi = tl.load(src_seg_ptr + src + 1)
    for i in range(seg_lo, seg_hi):
        seg = tl.load(seg_order_ptr + i)
        start = tl.load(offsets_ptr + seg)
        end = tl.load(offsets_ptr + seg + 1)
        for m0 in range(start, end, BLOCK_M):
            tok = m0 + tl.arange(0, BLOCK_M).to(tl.int64)  # (BM,)
            tok_mask = tok < end
            kn_offs = tok[None, :] * K + slot[:, None]  # (BK, BM): the (N, K) buffers read transposed
            kn_mask = slot_mask[:, None] & tok_mask[None, :]
            d_gate_t = tl.load(d_gate_ptr + kn_offs, mask=kn_mask, other=0.0)
            d_up_t = tl.load(d_up_ptr + kn_offs, mask=kn_mask, other=0.0)
            gate_t = tl.load(gate_ptr + kn_offs, mask=kn_mask, other=0.0)
            up_t = tl.load(up_ptr + kn_offs, mask=kn_mask, other=0.0)
            h_t = gate_t * tl.sigmoid(gate_t) * up_t
            nd_offs = tok[:, None] * D + d[None, :]
            nd_mask = tok_mask[:, None] & d_mask[None, :]
            x = tl.load(x_ptr + nd_offs, mask=nd_mask, other=0.0)  # (BM, BD)
            dy = tl.load(dy_ptr + nd_offs, mask=nd_mask, other=0.0)
            acc_gate = tl.dot(d_gate_t.to(x.dtype), x, acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(d_up_t.to(x.dtype), x, acc_up, input_precision=DOT_PRECISION)
            acc_down = tl.dot(h_t.to(dy.dtype), dy, acc_down, input_precision=DOT_PRECISION)
    out_offs = (src * K + slot[:, None]) * D + d[None, :]
    out_mask = slot_mask[:, None] & d_mask[None, :]
    tl.store(part_gate_ptr + out_offs, acc_gate, mask=out_mask)
    tl.store(part_up_ptr + out_offs, acc_up, mask=out_mask)
    tl.store(part_down_ptr + out_offs, acc_down, mask=out_mask)


@triton.jit
def _row_reduce_kernel(
    part_gate_ptr, part_up_ptr, part_down_ptr,  # (U*K, D) fp32
    perm_ptr,  # (U*K,) int64: slots sorted by their row (stable)
    run_start_ptr, run_end_ptr,  # (O,) int64: output row o sums perm[run_start[o]:run_end[o]]
    out_gate_ptr, out_up_ptr, out_down_ptr,  # (O, D) in the weights' dtype
    O, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    o = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    o_mask = o < O
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,)
    d_mask = d < D
    lo = tl.load(run_start_ptr + o, mask=o_mask, other=0)
    count = tl.load(run_end_ptr + o, mask=o_mask, other=0) - lo  # (BR,)
    acc_gate = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    acc_down = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for j in range(0, tl.max(count, axis=0)):
        live = j < count  # (BR,)
        slot = tl.load(perm_ptr + lo + j, mask=live, other=0)
        offs = slot[:, None] * D + d[None, :]
        mask = live[:, None] & d_mask[None, :]
        acc_gate += tl.load(part_gate_ptr + offs, mask=mask, other=0.0)
        acc_up += tl.load(part_up_ptr + offs, mask=mask, other=0.0)
        acc_down += tl.load(part_down_ptr + offs, mask=mask, other=0.0)
    out_offs = o[:, None] * D + d[None, :]
    out_mask = o_mask[:, None] & d_mask[None, :]
    tl.store(out_gate_ptr + out_offs, acc_gate.to(out_gate_ptr.dtype.element_ty), mask=out_mask)
    tl.store(out_up_ptr + out_offs, acc_up.to(out_up_ptr.dtype.element_ty), mask=out_mask)
    tl.store(out_down_ptr + out_offs, acc_down.to(out_down_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class CompactGrads:
    """Row-sparse table gradients: `rows` (R,) ascending touched pool rows; values (R, D) each."""

    rows: torch.Tensor
    d_gate: torch.Tensor
    d_up: torch.Tensor
    d_down: torch.Tensor


def uses_interpreter() -> bool:
    """True when this module's kernels were built by the Triton CPU interpreter (TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_hidden_kernel, InterpretedFunction)


def check_triton_inputs(x, offsets, seg_source, source_rows, w_gate, w_up, w_down, validate_indices=True):
    """Raise ValueError on what these kernels do not support; no silent fallback to torch."""
    check_sink_mlp_inputs(x, offsets, seg_source, source_rows, w_gate, w_up, w_down)
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    tensors = {"x": x, "offsets": offsets, "seg_source": seg_source, "source_rows": source_rows,
               "w_gate": w_gate, "w_up": w_up, "w_down": w_down}
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not x.is_cuda and not uses_interpreter():
        raise ValueError(
            f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton), x is on {x.device}")
    if validate_indices and offsets.numel() > 1:
        _check_indices(offsets, seg_source, source_rows, x.shape[0], w_gate.shape[0])


def _check_indices(offsets, seg_source, source_rows, num_tokens: int, num_pool: int) -> None:
    """Out-of-range indices would make the masked loads read foreign memory: check them (one host sync)."""
    checks = {
        "offsets[0] must be 0": offsets[0] != 0,
        f"offsets[-1] must be N={num_tokens}": offsets[-1] != num_tokens,
        "offsets must be non-decreasing": (offsets[1:] < offsets[:-1]).any(),
        f"seg_source values must lie in [0, U={source_rows.shape[0]})":
            ((seg_source < 0) | (seg_source >= source_rows.shape[0])).any(),
        f"source_rows values must lie in [-1, P={num_pool})": ((source_rows < -1) | (source_rows >= num_pool)).any(),
    }
    failed = torch.stack(list(checks.values())).tolist()
    for message, is_bad in zip(checks, failed):
        if is_bad:
            raise ValueError(message)


def _launch_args(x: torch.Tensor, blocks: dict) -> dict:
    if set(blocks) != set(DEFAULT_BLOCKS):
        raise ValueError(f"blocks keys must be {sorted(DEFAULT_BLOCKS)}, got {sorted(blocks)}")
    if any(v < 16 or v & (v - 1) for v in blocks.values()):
        raise ValueError(f"block sizes must be powers of two >= 16, got {blocks}")
    # fp32 stays true fp32 (no TF32) so fp32 results match the fp32 reference.
    return {"DOT_PRECISION": "ieee" if x.dtype == torch.float32 else "tf32"}


def sink_forward(x, source_rows, w_gate, w_up, w_down, plan: TilePlan, blocks: dict):
    """Launch the forward. Returns y (N, D) and the fp32 pre-activations gate, up (N, K) for backward."""
    num_tokens, dim = x.shape
    num_rows = source_rows.shape[1]
    extra = _launch_args(x, blocks)
    gate = torch.empty(num_tokens, num_rows, device=x.device, dtype=torch.float32)  # (N, K)
    up = torch.empty_like(gate)
    y = torch.empty_like(x)  # (N, D)
    num_tiles = plan.tile_start.numel()
    bm, bk, bd = blocks["block_m"], blocks["block_k"], blocks["block_d"]
    _hidden_kernel[(num_tiles, triton.cdiv(num_rows, bk))](
        x, w_gate, w_up, source_rows, plan.tile_start, plan.tile_end, plan.tile_src, gate, up, gate, up,
        dim, num_rows, BACKWARD=False, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd, **extra)
    _expand_kernel[(num_tiles, triton.cdiv(dim, bd))](
        gate, up, w_down, w_down, source_rows, plan.tile_start, plan.tile_end, plan.tile_src, y,
        dim, num_rows, SWIGLU=True, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd, **extra)
    return y, gate, up


def _reduction_runs(source_rows: torch.Tensor, num_pool: int, compact: bool):
    """Sort (row, slot) pairs by row; return perm (U*K,), run bounds (O,) and, if compact, the rows (R,)."""
    flat = source_rows.reshape(-1)  # (U*K,)
    keys = torch.where(flat >= 0, flat, num_pool)  # padding sorts last and is never read
    sorted_rows, perm = torch.sort(keys, stable=True)
    if compact:
        out_rows = torch.unique(flat[flat >= 0])  # (R,) ascending; one host sync for R
    else:
        out_rows = torch.arange(num_pool, device=flat.device)  # (P,)
    run_start = torch.searchsorted(sorted_rows, out_rows)
    run_end = torch.searchsorted(sorted_rows, out_rows, right=True)
    return perm, run_start, run_end, out_rows


def sink_backward(dy, x, offsets, source_rows, w_gate, w_up, w_down, gate, up, plan: TilePlan, blocks: dict,
                  need_dx: bool = True, need_tables: bool = True, compact: bool = False):
    """Launch the backward. Returns dx (N, D) or None, and the table gradients: a (d_gate, d_up, d_down)
    tuple of dense (P, D) tensors, a CompactGrads, or None."""
    num_tokens, dim = x.shape
    num_sources, num_rows = source_rows.shape
    num_pool = w_gate.shape[0]
    if dy.shape != x.shape:
        raise ValueError(f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    dy = dy.to(x.dtype).contiguous()
    extra = _launch_args(x, blocks)
    bm, bk, bd, br = blocks["block_m"], blocks["block_k"], blocks["block_d"], blocks["block_r"]
    num_tiles = plan.tile_start.numel()
    d_gate = torch.empty_like(gate)  # (N, K) fp32
    d_up = torch.empty_like(gate)
    _hidden_kernel[(num_tiles, triton.cdiv(num_rows, bk))](
        dy, w_down, w_down, source_rows, plan.tile_start, plan.tile_end, plan.tile_src, gate, up, d_gate, d_up,
        dim, num_rows, BACKWARD=True, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd, **extra)
    dx = None
    if need_dx:
        dx = torch.empty_like(x)
        _expand_kernel[(num_tiles, triton.cdiv(dim, bd))](
            d_gate, d_up, w_gate, w_up, source_rows, plan.tile_start, plan.tile_end, plan.tile_src, dx,
            dim, num_rows, SWIGLU=False, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd, **extra)
    if not need_tables:
        return dx, None
    parts = [torch.empty(num_sources * num_rows, dim, device=x.device, dtype=torch.float32) for _ in range(3)]
    _slot_grad_kernel[(num_sources, triton.cdiv(num_rows, bk), triton.cdiv(dim, bd))](
        x, dy, gate, up, d_gate, d_up, offsets, plan.seg_order, plan.src_seg, *parts,
        dim, num_rows, BLOCK_M=bm, BLOCK_K=bk, BLOCK_D=bd, **extra)
    perm, run_start, run_end, out_rows = _reduction_runs(source_rows, num_pool, compact)
    num_out = out_rows.numel()
    outs = [torch.empty(num_out, dim, device=x.device, dtype=w_gate.dtype) for _ in range(3)]
    if num_out:
        _row_reduce_kernel[(triton.cdiv(num_out, br), triton.cdiv(dim, bd))](
            *parts, perm, run_start, run_end, *outs, num_out, dim, BLOCK_R=br, BLOCK_D=bd)
    if compact:
        return dx, CompactGrads(out_rows, *outs)
    return dx, tuple(outs)


def _is_empty(x, seg_source, source_rows) -> bool:
    return x.shape[0] == 0 or x.shape[1] == 0 or seg_source.numel() == 0 or source_rows.shape[1] == 0


class _SinkMLPFunction(torch.autograd.Function):
    """Saves x, the tables, the index plan and the fp32 pre-activations gate/up (N, K); backward recomputes
    h = silu(gate) * up elementwise instead of storing it or redoing the two D-long contractions."""

    @staticmethod
    def forward(ctx, x, offsets, seg_source, source_rows, w_gate, w_up, w_down, blocks, plan):
        y, gate, up = sink_forward(x, source_rows, w_gate, w_up, w_down, plan, blocks)
        ctx.save_for_backward(x, offsets, source_rows, w_gate, w_up, w_down, gate, up, *plan.tensors())
        ctx.blocks = blocks
        return y

    @staticmethod
    def backward(ctx, dy):
        x, offsets, source_rows, w_gate, w_up, w_down, gate, up, *plan_tensors = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, tables = sink_backward(dy, x, offsets, source_rows, w_gate, w_up, w_down, gate, up,
                                   TilePlan(*plan_tensors, ctx.blocks["block_m"]), ctx.blocks, need_dx=need[0],
                                   need_tables=any(need[4:7]), compact=False)
        d_gate, d_up, d_down = tables if tables is not None else (None, None, None)
        return dx, None, None, None, d_gate, d_up, d_down, None, None


def _plan_for(tiles: TilePlan | None, offsets, seg_source, num_sources: int, num_tokens: int,
              blocks: dict) -> TilePlan:
    if tiles is None:
        return tile_plan_torch(offsets, seg_source, num_sources, num_tokens, blocks["block_m"])
    if tiles.block_m != blocks["block_m"]:
        raise ValueError(f"tiles were planned for block_m={tiles.block_m}, the launch uses {blocks['block_m']}")
    return tiles


def sink_mlp_triton(x, offsets, seg_source, source_rows, w_gate, w_up, w_down, *, blocks: dict | None = None,
                    tiles: TilePlan | None = None, validate_indices: bool = True) -> torch.Tensor:
    """The sink-MLP op on Triton kernels, differentiable in x and the three tables (dense (P, D) gradients).

    `blocks` overrides DEFAULT_BLOCKS (tests use small tiles); `tiles` is a precomputed plan (built here, on the
    device and without a host sync, when absent); `validate_indices` checks every index against the shapes,
    which costs one host sync: the model turns it on only in debug mode, since its loader validated the batch."""
    blocks = {**DEFAULT_BLOCKS, **(blocks or {})}
    if tiles is not None and "block_m" not in (blocks or {}):
        blocks["block_m"] = tiles.block_m
    check_triton_inputs(x, offsets, seg_source, source_rows, w_gate, w_up, w_down, validate_indices)
    if _is_empty(x, seg_source, source_rows):
        # Exactly zero (no active rows or no tokens); multiplying keeps the autograd graph to the tables.
        return x * 0 + (w_gate.sum() + w_up.sum() + w_down.sum()) * 0
    x, w_gate, w_up, w_down = (t.contiguous() for t in (x, w_gate, w_up, w_down))
    plan = _plan_for(tiles, offsets, seg_source, source_rows.shape[0], x.shape[0], blocks)
    return _SinkMLPFunction.apply(x, offsets.contiguous(), seg_source.contiguous(), source_rows.contiguous(),
                                  w_gate, w_up, w_down, blocks, plan)


def sink_mlp_triton_grads(x, offsets, seg_source, source_rows, w_gate, w_up, w_down, dy, *,
                          compact: bool = True, blocks: dict | None = None):
    """Forward + backward without autograd, for a row-sparse optimizer: returns (y, dx, table gradients),
    the gradients as CompactGrads (compact=True) or a dense (d_gate, d_up, d_down) tuple."""
    blocks = {**DEFAULT_BLOCKS, **(blocks or {})}
    check_triton_inputs(x, offsets, seg_source, source_rows, w_gate, w_up, w_down)
    if _is_empty(x, seg_source, source_rows):
        raise ValueError("sink_mlp_triton_grads needs at least one token, segment and row slot")
    x, w_gate, w_up, w_down = (t.contiguous() for t in (x, w_gate, w_up, w_down))
    offsets, seg_source, source_rows = offsets.contiguous(), seg_source.contiguous(), source_rows.contiguous()
    plan = _plan_for(None, offsets, seg_source, source_rows.shape[0], x.shape[0], blocks)
    y, gate, up = sink_forward(x, source_rows, w_gate, w_up, w_down, plan, blocks)
    dx, tables = sink_backward(dy, x, offsets, source_rows, w_gate, w_up, w_down, gate, up, plan, blocks,
                               compact=compact)
    return y, dx, tables
