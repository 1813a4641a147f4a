"""Offline compile check: builds every sink-MLP kernel variant for an NVIDIA target (PTX + cubin through the
ptxas bundled with Triton) without a GPU, to catch code that the CPU interpreter accepts but the compiler
rejects (tl.dot shapes, dtypes, control flow). Run: `python -m nulls_dist.kernels.bench.compile_check --dtype bf16`.
"""
from __future__ import annotations

import argparse
import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nulls_dist.kernels import sink_mlp_triton

TRITON_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def _variants(dtype: str, sk) -> dict:
    """(kernel, pointer/scalar signature, constexprs) for each launch made by sink_mlp_triton."""
    w = f"*{TRITON_DTYPES[dtype]}"
    i64, f32 = "*i64", "*fp32"
    blocks = sk.DEFAULT_BLOCKS
    common = {"BLOCK_M": blocks["block_m"], "BLOCK_K": blocks["block_k"], "BLOCK_D": blocks["block_d"],
              "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    tiles = {"tile_start_ptr": i64, "tile_end_ptr": i64, "tile_src_ptr": i64}
    hidden = {"a_ptr": w, "w1_ptr": w, "w2_ptr": w, "rows_ptr": i64, **tiles, "gate_ptr": f32, "up_ptr": f32,
              "d_gate_ptr": f32, "d_up_ptr": f32, "D": "i32", "K": "i32"}
    expand = {"h1_ptr": f32, "h2_ptr": f32, "w1_ptr": w, "w2_ptr": w, "rows_ptr": i64, **tiles, "out_ptr": w,
              "D": "i32", "K": "i32"}
    slot = {"x_ptr": w, "dy_ptr": w, "gate_ptr": f32, "up_ptr": f32, "d_gate_ptr": f32, "d_up_ptr": f32,
            "offsets_ptr": i64, "seg_order_ptr": i64, "src_seg_ptr": i64, "part_gate_ptr": f32,
            "part_up_ptr": f32, "part_down_ptr": f32, "D": "i32", "K": "i32"}
    reduce = {"part_gate_ptr": f32, "part_up_ptr": f32, "part_down_ptr": f32, "perm_ptr": i64,
              "run_start_ptr": i64, "run_end_ptr": i64, "out_gate_ptr": w, "out_up_ptr": w, "out_down_ptr": w,
              "O": "i32", "D": "i32"}
    return {
        "hidden_fwd": (sk._hidden_kernel, hidden, {**common, "BACKWARD": False}),
        "hidden_bwd": (sk._hidden_kernel, hidden, {**common, "BACKWARD": True}),
        "expand_fwd": (sk._expand_kernel, expand, {**common, "SWIGLU": True}),
        "expand_bwd": (sk._expand_kernel, expand, {**common, "SWIGLU": False}),
        "slot_grad": (sk._slot_grad_kernel, slot, common),
        "row_reduce": (sk._row_reduce_kernel, reduce, {"BLOCK_R": blocks["block_r"], "BLOCK_D": blocks["block_d"]}),
    }


def compile_all(dtype: str = "bf16", arch: int = 90, module=None) -> dict:
    """Compile each variant for sm_<arch>; returns {variant: PTX text}. Raises on any compile error.
    `module` defaults to nulls_dist.kernels.sink_mlp_triton (tests pass a freshly loaded copy)."""
    sk = module or sink_mlp_triton
    if sk.uses_interpreter():
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter builds no compilable kernels")
    target = GPUTarget("cuda", arch, 32)
    out = {}
    for name, (kernel, signature, constexprs) in _variants(dtype, sk).items():
        full_signature = {**signature, **{key: "constexpr" for key in constexprs}}
        compiled = triton.compile(ASTSource(kernel, full_signature, constexprs), target=target)
        out[name] = compiled.asm["ptx"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(TRITON_DTYPES), default="bf16")
    parser.add_argument("--arch", type=int, default=90, help="SM version, e.g. 80 (A100), 90 (H100)")
    args = parser.parse_args()
    ptx = compile_all(args.dtype, args.arch)
    print(json.dumps({"arch": args.arch, "dtype": args.dtype, "ptx_chars": {k: len(v) for k, v in ptx.items()}}))


if __name__ == "__main__":
    main()
