"""Tests for the Triton sink-MLP kernels (kernels/sink_mlp_triton.py) against the torch reference `sink_mlp_ref`.

CPU: Triton reads TRITON_INTERPRET when it is imported (and again when each kernel is decorated), so the
interpreter checks run in ONE worker subprocess started with TRITON_INTERPRET=1 (`python <this file> --worker`);
it first asserts that the kernels really are interpreted, runs every `check_*` below in fp32 and reports each
result as JSON; `test_interpreter` turns every check into its own test. The main pytest process keeps the
compiled kernels: it compiles them (without running) for sm_90, checks that they refuse CPU tensors and runs
the benchmark's `--smoke` mode. GPU tests (`gpu` marker) repeat the comparisons in fp32 and bf16.

fp32 tolerance: every output element is a sum of at most a few hundred fp32 products, taken in a different
order than the reference; the error bound n * eps * max|terms| is ~1e-5 of the tensor's scale (observed ~1e-7).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nulls_dist.kernels.sink_mlp import sink_mlp, sink_mlp_ref

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL_BLOCKS = {"block_m": 16, "block_k": 16, "block_d": 16, "block_r": 16}
FP32_REL_TOL = 2e-5


def packed_batch(seed, num_rows, row_len, num_sources, pool, k, dim, max_seg, dtype=torch.float32, device="cpu"):
    """A random packed batch: rows split into random-length runs (many of length 1), sources drawn with
    repetition (so one source owns several segments), each source's rows drawn from a small hot set of the
    pool (so sources share rows) and -1 padded to k. Neighbouring runs of one source stay separate segments
    (source_segments would merge them; the op does not care)."""
    gen = torch.Generator().manual_seed(seed)
    lengths, seg_source = [], []
    for _ in range(num_rows):
        pos = 0
        while pos < row_len:
            length = min(int(torch.randint(1, max_seg + 1, (1,), generator=gen)), row_len - pos)
            if torch.rand(1, generator=gen) < 0.3:
                length = 1
            lengths.append(length)
            seg_source.append(int(torch.randint(num_sources, (1,), generator=gen)))
            pos += length
    offsets = torch.tensor([0] + lengths).cumsum(0)  # (S+1,)
    hot = torch.randperm(pool, generator=gen)[: min(pool, 2 * k + 2)]  # k <= pool
    source_rows = torch.full((num_sources, k), -1, dtype=torch.int64)  # (U, K)
    for u in range(num_sources):
        num_active = k if u == 0 else int(torch.randint(0, k + 1, (1,), generator=gen))
        chosen = hot[torch.randperm(hot.numel(), generator=gen)[:num_active]].sort().values
        source_rows[u, :num_active] = chosen
    num_tokens = num_rows * row_len
    x = torch.randn(num_tokens, dim, generator=gen)
    weights = [torch.randn(pool, dim, generator=gen) / dim**0.25 for _ in range(3)]
    dy = torch.randn(num_tokens, dim, generator=gen)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return (cast(x), offsets.to(device), torch.tensor(seg_source, device=device), source_rows.to(device),
            *[cast(w) for w in weights], cast(dy))


def run_op(fn, x, offsets, seg_source, source_rows, w_gate, w_up, w_down, dy):
    """Forward + backward; returns y and the four gradients."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w_gate, w_up, w_down)]
    y = fn(leaves[0], offsets, seg_source, source_rows, *leaves[1:])
    grads = torch.autograd.grad(y, leaves, dy)
    return (y.detach(), *grads)


def assert_scaled_close(actual, expected, rel, name):
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * scale + 1e-30, f"{name}: max error {err:.3g} exceeds {rel} x scale {scale:.3g}"


NAMES = ("y", "dx", "d_gate", "d_up", "d_down")
CASES = {  # (num_rows, row_len, num_sources, pool, k, dim, max_seg)
    "prime-D7-P31-K5": (2, 11, 3, 31, 5, 7, 4),
    "D13-P53-K37-multi-chunk": (2, 29, 4, 53, 37, 13, 20),
    "D33-tiny-pool-collisions": (1, 23, 5, 7, 7, 33, 6),
    "one-token-rows": (5, 1, 2, 13, 3, 16, 1),
}


# ---------------------------------------------------------------- the reference itself


def literal_formula(x, offsets, seg_source, source_rows, w_gate, w_up, w_down):
    """The op's definition written out segment by segment (an oracle independent of the tiled reference)."""
    y = torch.zeros_like(x)
    for s in range(seg_source.numel()):
        rows = source_rows[seg_source[s]]
        rows = rows[rows >= 0]
        xs = x[offsets[s]:offsets[s + 1]]
        y[offsets[s]:offsets[s + 1]] = (F.silu(xs @ w_gate[rows].T) * (xs @ w_up[rows].T)) @ w_down[rows]
    return y


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_the_literal_formula(case):
    batch = packed_batch(3, *CASES[case])
    for name, a, b in zip(NAMES, run_op(sink_mlp_ref, *batch), run_op(literal_formula, *batch)):
        assert_scaled_close(a, b, FP32_REL_TOL, f"{case}/{name}")


def test_numpy_and_torch_tile_plans_agree_and_the_reference_needs_no_host_sync():
    from nulls_dist.bench.syncs import SyncCounter

    from nulls_dist.kernels.tiles import tile_plan_numpy, tile_plan_torch

    x, offsets, seg_source, source_rows, wg, wu, wd, dy = packed_batch(5, *CASES["D13-P53-K37-multi-chunk"])
    exact = tile_plan_numpy(offsets.numpy(), seg_source.numpy(), source_rows.shape[0], 16)
    padded = tile_plan_torch(offsets, seg_source, source_rows.shape[0], x.shape[0], 16)
    live = padded.tile_end > padded.tile_start
    assert torch.equal(padded.tile_start[live], exact.tile_start) and torch.equal(padded.tile_src[live], exact.tile_src)
    assert torch.equal(padded.seg_order, exact.seg_order) and torch.equal(padded.src_seg, exact.src_seg)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, wg, wu, wd)]
    with SyncCounter() as counter:
        y = sink_mlp_ref(leaves[0], offsets, seg_source, source_rows, *leaves[1:], tiles=exact)
        y.backward(dy)
    assert counter.total == 0, dict(counter.counts)
    want = run_op(literal_formula, x, offsets, seg_source, source_rows, wg, wu, wd, dy)
    for name, a, b in zip(NAMES, [y.detach()] + [t.grad for t in leaves], want):
        assert_scaled_close(a, b, FP32_REL_TOL, name)


# ---------------------------------------------------------------- interpreter checks (run in the worker)


def _kernels():
    import nulls_dist.kernels.sink_mlp_triton as module

    return module


def _check_case(case):
    def check():
        x, offsets, seg_source, source_rows, wg, wu, wd, dy = packed_batch(len(case), *CASES[case])
        fn = lambda *a: _kernels().sink_mlp_triton(*a, blocks=SMALL_BLOCKS)  # noqa: E731
        got = run_op(fn, x, offsets, seg_source, source_rows, wg, wu, wd, dy)
        want = run_op(sink_mlp_ref, x, offsets, seg_source, source_rows, wg, wu, wd, dy)
        for name, a, b in zip(NAMES, got, want):
            assert_scaled_close(a, b, FP32_REL_TOL, f"{case}/{name}")
        touched = torch.zeros(wg.shape[0], dtype=torch.bool)
        used_rows = source_rows[torch.unique(seg_source)]
        touched[used_rows[used_rows >= 0]] = True
        for name, grad in zip(NAMES[2:], got[2:]):
            assert torch.all(grad[~touched] == 0), f"{case}/{name}: nonzero gradient on an untouched row"
            assert grad[touched].abs().sum() > 0
    return check


def check_kernels_are_interpreted():
    assert _kernels().uses_interpreter(), "TRITON_INTERPRET=1 was set but the kernels are compiled"


def check_default_blocks_and_segments_longer_than_a_tile():
    x, offsets, seg_source, source_rows, wg, wu, wd, dy = packed_batch(7, 1, 150, 2, 41, 34, 17, 150)
    got = run_op(_kernels().sink_mlp_triton, x, offsets, seg_source, source_rows, wg, wu, wd, dy)
    want = run_op(sink_mlp_ref, x, offsets, seg_source, source_rows, wg, wu, wd, dy)
    for name, a, b in zip(NAMES, got, want):
        assert_scaled_close(a, b, FP32_REL_TOL, name)


def check_gradients_are_bit_identical_across_runs():
    batch = packed_batch(3, *CASES["D13-P53-K37-multi-chunk"])
    fn = lambda *a: _kernels().sink_mlp_triton(*a, blocks=SMALL_BLOCKS)  # noqa: E731
    first, second = run_op(fn, *batch), run_op(fn, *batch)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def check_compact_gradients_match_dense():
    x, offsets, seg_source, source_rows, wg, wu, wd, dy = packed_batch(5, *CASES["prime-D7-P31-K5"])
    grads = _kernels().sink_mlp_triton_grads
    y, dx, compact = grads(x, offsets, seg_source, source_rows, wg, wu, wd, dy, compact=True, blocks=SMALL_BLOCKS)
    _, _, dense = grads(x, offsets, seg_source, source_rows, wg, wu, wd, dy, compact=False, blocks=SMALL_BLOCKS)
    want = run_op(sink_mlp_ref, x, offsets, seg_source, source_rows, wg, wu, wd, dy)
    assert_scaled_close(y, want[0], FP32_REL_TOL, "y")
    assert_scaled_close(dx, want[1], FP32_REL_TOL, "dx")
    assert torch.equal(compact.rows, torch.unique(source_rows[source_rows >= 0]))
    for name, values, full, ref in zip(NAMES[2:], (compact.d_gate, compact.d_up, compact.d_down), dense, want[2:]):
        assert torch.equal(values, full[compact.rows]), name
        assert_scaled_close(full, ref, FP32_REL_TOL, name)


def check_gathered_rows_match_the_whole_tables():
    """The op on a batch's gathered rows (what a model with sharded or memory-mapped sink tables passes: the
    distinct rows (R, D) and each source's indices into them) equals the op on the whole (P, D) tables."""
    x, offsets, seg_source, source_rows, wg, wu, wd, dy = packed_batch(21, *CASES["D13-P53-K37-multi-chunk"])
    valid = source_rows >= 0
    rows, inverse = torch.unique(source_rows[valid], return_inverse=True)  # (R,) and each slot's index
    local = torch.full_like(source_rows, -1)
    local[valid] = inverse
    fn = lambda *a: _kernels().sink_mlp_triton(*a, blocks=SMALL_BLOCKS)  # noqa: E731
    whole = run_op(fn, x, offsets, seg_source, source_rows, wg, wu, wd, dy)
    gathered = run_op(fn, x, offsets, seg_source, local, wg[rows], wu[rows], wd[rows], dy)
    for name, a, b in zip(NAMES[:2], gathered[:2], whole[:2]):
        assert_scaled_close(a, b, FP32_REL_TOL, name)
    for name, a, b in zip(NAMES[2:], gathered[2:], whole[2:]):
        assert_scaled_close(a, b[rows], FP32_REL_TOL, name)


def check_sources_without_rows_duplicate_rows_empty_segment():
    x, offsets, seg_source, source_rows, wg, wu, wd, dy = packed_batch(11, *CASES["prime-D7-P31-K5"])
    source_rows[1] = -1  # a source with no active row: its tokens get y = 0
    source_rows[2, :2] = torch.tensor([4, 4])  # a row listed twice counts twice, as in the reference
    offsets = torch.cat([offsets[:3], offsets[2:]])  # an empty segment (not made by source_segments, but legal)
    seg_source = torch.cat([seg_source[:2], seg_source.new_tensor([2]), seg_source[2:]])
    got = run_op(_kernels().sink_mlp_triton, x, offsets, seg_source, source_rows, wg, wu, wd, dy)
    want = run_op(sink_mlp_ref, x, offsets, seg_source, source_rows, wg, wu, wd, dy)
    for name, a, b in zip(NAMES, got, want):
        assert_scaled_close(a, b, FP32_REL_TOL, name)


def check_no_active_rows_gives_zeros():
    x, offsets, seg_source, source_rows, wg, wu, wd, dy = packed_batch(2, *CASES["prime-D7-P31-K5"])
    got = run_op(_kernels().sink_mlp_triton, x, offsets, seg_source, source_rows[:, :0], wg, wu, wd, dy)
    for name, t in zip(NAMES, got):
        assert torch.all(t == 0), name


def check_dispatch_triton_on_interpreter():
    batch = packed_batch(9, *CASES["one-token-rows"])
    got = run_op(lambda *a: sink_mlp(*a, impl="triton"), *batch)
    want = run_op(_kernels().sink_mlp_triton, *batch)
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(a, b), name


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def check_launcher_rejects_unsupported_inputs():
    x, offsets, seg_source, source_rows, wg, wu, wd, _ = packed_batch(1, *CASES["prime-D7-P31-K5"])
    call = _kernels().sink_mlp_triton
    _raises("dtype", call, x.double(), offsets, seg_source, source_rows, wg.double(), wu.double(), wd.double())
    _raises("offsets must be int64", call, x, offsets.int(), seg_source, source_rows, wg, wu, wd)
    _raises("source_rows values", call, x, offsets, seg_source, torch.where(source_rows >= 0, 31, -1), wg, wu, wd)
    _raises("seg_source values", call, x, offsets, seg_source + source_rows.shape[0], source_rows, wg, wu, wd)
    bad_offsets = offsets.clone()
    bad_offsets[-1] -= 1
    _raises("offsets\\[-1\\]", call, x, bad_offsets, seg_source, source_rows, wg, wu, wd)
    _raises("block sizes", call, x, offsets, seg_source, source_rows, wg, wu, wd, blocks={"block_k": 24})
    _raises("w_up", call, x, offsets, seg_source, source_rows, wg, wu[:, :-1], wd)
    _raises("dy must have", _kernels().sink_mlp_triton_grads, x, offsets, seg_source, source_rows, wg, wu, wd,
            x[:-1])


INTERP_CHECKS = {
    "kernels_are_interpreted": check_kernels_are_interpreted,
    **{f"matches_reference[{case}]": _check_case(case) for case in CASES},
    "default_blocks_and_segments_longer_than_a_tile": check_default_blocks_and_segments_longer_than_a_tile,
    "gradients_are_bit_identical_across_runs": check_gradients_are_bit_identical_across_runs,
    "compact_gradients_match_dense": check_compact_gradients_match_dense,
    "gathered_rows_match_the_whole_tables": check_gathered_rows_match_the_whole_tables,
    "sources_without_rows_duplicate_rows_empty_segment": check_sources_without_rows_duplicate_rows_empty_segment,
    "no_active_rows_gives_zeros": check_no_active_rows_gives_zeros,
    "dispatch_triton_on_interpreter": check_dispatch_triton_on_interpreter,
    "launcher_rejects_unsupported_inputs": check_launcher_rejects_unsupported_inputs,
}


def _worker() -> None:
    """Run every interpreter check (stop after the first if the kernels are not interpreted); print JSON."""
    results = {}
    for name, check in INTERP_CHECKS.items():
        try:
            check()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 -- each check's failure is reported to its own test
            results[name] = traceback.format_exc()
            if name == "kernels_are_interpreted":
                break
    print("INTERP_RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interp_results():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("INTERP_RESULTS ")]
    assert proc.returncode == 0 and lines, f"interpreter worker failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1].removeprefix("INTERP_RESULTS "))


@pytest.mark.parametrize("check", list(INTERP_CHECKS))
def test_interpreter(interp_results, check):
    assert check in interp_results, f"not run: {interp_results}"
    assert interp_results[check] == "ok", interp_results[check]


# ------------------------------------------------------------------ main process (compiled kernels, no GPU)


def test_compiled_kernels_refuse_cpu_tensors():
    import nulls_dist.kernels.sink_mlp_triton as compiled

    assert not compiled.uses_interpreter(), "run pytest without TRITON_INTERPRET (the worker sets it)"
    x, offsets, seg_source, source_rows, wg, wu, wd, _ = packed_batch(1, *CASES["prime-D7-P31-K5"])
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        compiled.sink_mlp_triton(x, offsets, seg_source, source_rows, wg, wu, wd)


def test_dispatch_on_cpu_uses_the_reference():
    x, offsets, seg_source, source_rows, wg, wu, wd, _ = packed_batch(4, *CASES["prime-D7-P31-K5"])
    want = sink_mlp_ref(x, offsets, seg_source, source_rows, wg, wu, wd)
    assert torch.equal(sink_mlp(x, offsets, seg_source, source_rows, wg, wu, wd, impl="auto"), want)
    with pytest.raises(ValueError, match="impl"):
        sink_mlp(x, offsets, seg_source, source_rows, wg, wu, wd, impl="cuda")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_sm90(dtype):
    """Compile every kernel variant with the default tiles for an H100 (sm_90) without a GPU."""
    from nulls_dist.kernels.bench.compile_check import compile_all

    compiled = compile_all(dtype, arch=90)
    assert len(compiled) == 6 and all(".entry" in ptx for ptx in compiled.values())
    if dtype == "bf16":  # every kernel with a tl.dot must land on the tensor cores (wgmma / mma.sync)
        assert all("mma" in ptx for name, ptx in compiled.items() if name != "row_reduce")


def test_bench_smoke_json():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "nulls_dist.kernels.bench.sink_mlp_bench", "--smoke"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    meta = report["meta"]
    assert meta["triton_interpreter"] is True and meta["device"].startswith("cpu") and meta["peaks"] is None
    assert meta["torch"] == torch.__version__ and len(meta["commit"] or "") == 40
    (result,) = report["results"]
    assert set(result["impls"]) == {"masked", "gathered", "triton", "triton_folded_backbone"}
    for impl, stats in result["impls"].items():
        assert stats["max_abs_err_vs_gathered"] <= 1e-5 * stats["y_scale"], impl
        for phase in ("fwd", "bwd", "fwd+bwd"):
            assert stats[phase]["ms"] > 0 and stats[phase]["tflops"] > 0 and "roofline_share" not in stats[phase]
    assert result["flops"]["bwd"] == 2 * result["flops"]["fwd"] > 0


# ------------------------------------------------------------------------------------------------- GPU

GPU_CASES = {  # (num_rows, row_len, num_sources, pool, k, dim, max_seg)
    "odd-sizes": (3, 37, 5, 53, 37, 13, 20),
    "paper-like": (4, 1024, 6, 7692, 100, 960, 700),
}
# bf16: inputs are rounded identically for both sides (the reference runs in fp32 on the bf16 values); the
# kernel rounds h, d_gate, d_up and its outputs to bf16 (unit roundoff 2^-9 = 2e-3) before/after fp32
# accumulation, so errors of a few ulps of the tensor's scale are expected: 1e-2 (output) / 2e-2 (gradients,
# two rounded stages).
# GPU fp32 (no TF32): the paper-like case sums up to ~2k products per element (D=960 in the forward, a source's
# tokens in the table gradients); n * eps ~ 2.5e-4 bounds the error, random-sign rounding keeps it near
# sqrt(n) * eps ~ 5e-6 of the scale: 5e-5 leaves room without hiding a wrong term (those show up at >1e-2).
GPU_FP32_REL_TOL = 5e-5
BF16_REL_TOL = {"y": 1e-2, "dx": 2e-2, "d_gate": 2e-2, "d_up": 2e-2, "d_down": 2e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference(case, dtype, monkeypatch):
    from nulls_dist.kernels.sink_mlp_triton import sink_mlp_triton

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # a true fp32 reference

    batch = packed_batch(13, *GPU_CASES[case], dtype=dtype, device="cuda")
    x, offsets, seg_source, source_rows, wg, wu, wd, dy = batch
    got = run_op(sink_mlp_triton, *batch)
    up = [t.float() for t in (x, wg, wu, wd, dy)]
    want = run_op(sink_mlp_ref, up[0], offsets, seg_source, source_rows, *up[1:4], up[4])
    for name, a, b in zip(NAMES, got, want):
        tol = GPU_FP32_REL_TOL if dtype == torch.float32 else BF16_REL_TOL[name]
        assert_scaled_close(a.float(), b, tol, f"{case}/{dtype}/{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_bit_identical_and_auto_dispatch(dtype):
    batch = packed_batch(17, *GPU_CASES["paper-like"], dtype=dtype, device="cuda")
    auto = lambda *a: sink_mlp(*a, impl="auto")  # noqa: E731
    triton_impl = lambda *a: sink_mlp(*a, impl="triton")  # noqa: E731
    first, second = run_op(auto, *batch), run_op(triton_impl, *batch)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"



@pytest.mark.gpu
def test_gpu_deterministic_mode_and_compact_gradients():
    """The index plumbing must not trip torch.use_deterministic_algorithms (as a trainer may set it)."""
    from nulls_dist.kernels.sink_mlp_triton import sink_mlp_triton_grads

    x, offsets, seg_source, source_rows, wg, wu, wd, dy = packed_batch(
        19, *GPU_CASES["paper-like"], dtype=torch.bfloat16, device="cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _, _, compact = sink_mlp_triton_grads(x, offsets, seg_source, source_rows, wg, wu, wd, dy, compact=True)
        _, _, dense = sink_mlp_triton_grads(x, offsets, seg_source, source_rows, wg, wu, wd, dy, compact=False)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(compact.rows, torch.unique(source_rows[source_rows >= 0]))
    for values, full in zip((compact.d_gate, compact.d_up, compact.d_down), dense):
        assert torch.equal(values, full[compact.rows])
        untouched = torch.ones(full.shape[0], dtype=torch.bool, device=full.device)
        untouched[compact.rows] = False
        assert torch.all(full[untouched] == 0)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker()
