"""Training throughput of the `gathered` and `masked` sink paths, measured in one process on the same device,
with the trainer's own step: the model inside a DeepSpeed engine (ZeRO-0, world size 1, the trainer's DeepSpeed
config and optimizer), the summed loss normalised by the step's counted targets, sink plans built on the host
as the loader's workers build them (pinned, copied `non_blocking`), and no host read between log steps.

Batches are synthetic packed contexts: random tokens, each row split into single-source segments of
`--segment` tokens with distinct source ids (the paper's shape: 16 x 1024 in 512-token segments).

Prints one JSON object: device, versions, commit; per path: tokens/s, step time, MFU with the card's real bf16
peak (FLOPs counted both ways: the gathered model's real FLOPs and the dense-equivalent masked FLOPs), peak
memory, host syncs per step (CUDA sync debug mode; the dispatch-mode count on the CPU), and a step-time
breakdown (attention, backbone MLP, sink MLP, LM head + loss, optimizer; each timed alone at the step's shape,
x n_layer); the gathered/masked speed-up; and the issue's goals checked.

    python -m nulls_dist.bench.train_throughput                      # CPU, debug model (a dry run)
    python -m nulls_dist.bench.train_throughput --preset paper_wiki_1b --micro-batch auto   # one GPU
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nulls_dist.bench.syncs import SyncCounter, count_cuda_syncs
from nulls_dist.config import NullConfig
from nulls_dist.model import IGNORE_INDEX, NullTransformer, chunked_cross_entropy, flops_per_token
from nulls_dist.sink_plan import SinkPlan, plan_for_batch
from nulls_dist.train import callbacks as cb
from nulls_dist.train.config import train_config_from_dict
from nulls_dist.train.distributed import dist_env_from_environ, resolve_device, setup_distributed, teardown_distributed
from nulls_dist.train.ds_config import build_ds_config, lr_scheduler_factory
from nulls_dist.train.trainer import param_groups, to_device

GOALS = {"gathered_over_masked": 2.5, "tokens_per_s": 100_000}  # one H100/H200, paper_wiki_1b (the issue)


def synthetic_batch(cfg: NullConfig, assignment, micro_batch: int, seq_len: int, segment: int, step: int) -> dict:
    """A host micro-batch as the loader yields it: inputs, sources, labels (B, T) and the sink plan."""
    g = np.random.default_rng(step)
    tokens = g.integers(0, cfg.vocab_size, (micro_batch, seq_len + 1))  # (B, T+1)
    seg_index = np.arange(seq_len + 1) // segment  # (T+1,)
    row_base = (step * micro_batch + np.arange(micro_batch)) * (seq_len // segment + 2)  # (B,)
    sources = cfg.vocab_size + row_base[:, None] + seg_index[None, :]  # (B, T+1)
    counted = sources[:, 1:] == sources[:, :-1]
    labels = np.where(counted, tokens[:, 1:], IGNORE_INDEX)
    batch = {"input_ids": torch.from_numpy(tokens[:, :-1].copy()), "source_ids": torch.from_numpy(sources[:, :-1].copy()),
             "labels": torch.from_numpy(labels), "num_targets": int(counted.sum())}
    batch["plan"] = plan_for_batch(sources[:, :-1], cfg, assignment)
    return batch


def pinned(batch: dict) -> dict:
    return {k: (v.pin_memory() if hasattr(v, "pin_memory") and torch.cuda.is_available() else v)
            for k, v in batch.items()}


class Timer:
    """Wall time of a region: CUDA events on a GPU (no host sync inside the region), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def region(self, out: list):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            out.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            out.append(time.perf_counter() - t0)

    def seconds(self, marks: list) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1e3 for s, e in marks]
        return list(marks)


def engine_for(model_cfg: NullConfig, args, device, env):
    import deepspeed

    torch.manual_seed(0)
    model = NullTransformer(model_cfg).to(device)
    tcfg = train_config_from_dict({
        "train": {"max_steps": args.warmup + args.steps + 1, "device": device.type,
                  "sink_path": model_cfg.sink_path, "skip_nonfinite_steps": False},
        "data": {"name": "synthetic"},
        "deepspeed": {"zero_stage": 0, "micro_batch": args.micro_batch, "grad_accum": 1},
        "optim": {"warmup_steps": 1},
    })
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, tcfg.optim.weight_decay),
        config=build_ds_config(tcfg, env.world_size, on_gpu=device.type == "cuda"),
        lr_scheduler=lr_scheduler_factory(tcfg), dist_init_required=False)
    return engine


def train_step(engine, batch: dict, device, timer: Timer, marks: dict) -> torch.Tensor:
    """The trainer's step for one micro-batch (grad_accum 1, one rank): scale by 1 / counted targets."""
    batch = to_device(batch, device)
    scale = 1.0 / max(1, batch["num_targets"])
    loss_sum = engine(batch["input_ids"], source_ids=batch["source_ids"], plan=batch["plan"], labels=batch["labels"])
    engine.backward(loss_sum * scale)
    with timer.region(marks["optimizer"]):
        engine.step()
    return loss_sum.detach() * scale


def component_times(model: NullTransformer, batch: dict, device, timer: Timer, repeats: int) -> dict[str, float]:
    """fwd+bwd seconds of each part of ONE layer (and of the head) at the step's shape, alone; x n_layer."""
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    plan: SinkPlan = batch["plan"].to(device)
    B, T = batch["input_ids"].shape
    block = model.transformer.h[0]
    x = torch.randn(B, T, cfg.n_embd, device=device, dtype=dtype, requires_grad=True)
    cos, sin = (c[:T] for c in model.rope(device))
    from nulls_dist.attention import build_mask

    mask = build_mask(model.attention_impl, batch["source_ids"].to(device), plan.single_source_rows, T, T, 0)
    none = SinkPlan("none", B, T)  # the backbone alone; the sink MLP's time is the difference to the full MLP
    parts = {
        "attention": lambda: block.attn(block.norm_1(x), cos, sin, mask),
        "backbone_mlp": lambda: block.mlp(block.norm_2(x), none, 0),
        "sink_mlp_plus_backbone": lambda: block.mlp(block.norm_2(x), plan, 0),
        "lm_head_and_loss": lambda: chunked_cross_entropy(x.flatten(0, 1), model.lm_head.weight,
                                                          batch["labels"].to(device).reshape(-1),
                                                          model.loss_chunk_tokens),
    }
    out = {}
    for name, fn in parts.items():
        marks: list = []
        for i in range(repeats + 1):
            with timer.region(marks):
                y = fn()
                y.backward(torch.ones_like(y) if y.dim() else None)
            x.grad = None
        secs = timer.seconds(marks)[1:]  # the first run warms up
        out[name] = float(np.median(secs))
    per_layer = ("attention", "backbone_mlp", "sink_mlp_plus_backbone")
    result = {f"{k}_ms": out[k] * 1e3 * (cfg.n_layer if k in per_layer else 1) for k in out}
    result["sink_mlp_ms"] = result.pop("sink_mlp_plus_backbone_ms") - result["backbone_mlp_ms"]
    return result


def measure(path: str, args, device, env) -> dict:
    overrides = {"sink_path": path}
    if args.n_layer is not None:
        overrides["n_layer"] = args.n_layer
    model_cfg = NullConfig.from_preset(args.preset, **overrides)
    engine = engine_for(model_cfg, args, device, env)
    model = engine.module
    timer = Timer(device)
    batches = [pinned(synthetic_batch(model_cfg, model.sink_assignment, args.micro_batch, args.seq_len,
                                      args.segment, step)) for step in range(args.warmup + args.steps)]
    marks = {"step": [], "optimizer": []}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i, batch in enumerate(batches):
        if i == args.warmup:
            marks = {"step": [], "optimizer": []}
        with timer.region(marks["step"]):
            loss = train_step(engine, batch, device, timer, marks)
    step_s = float(np.median(timer.seconds(marks["step"])))
    optimizer_s = float(np.median(timer.seconds(marks["optimizer"])))
    # host syncs of one more whole step
    if device.type == "cuda":
        _, syncs = count_cuda_syncs(lambda: train_step(engine, batches[-1], device, timer,
                                                       {"step": [], "optimizer": []}))
        sync_ops = None
    else:
        with SyncCounter() as counter:
            train_step(engine, batches[-1], device, timer, {"step": [], "optimizer": []})
        syncs, sync_ops = counter.total, dict(counter.counts)
    tokens_per_s = args.micro_batch * args.seq_len / step_s
    sinks = float(np.mean([(b["plan"].rows >= 0).sum(-1).float().mean() for b in batches])) \
        if path == "gathered" else None
    real = flops_per_token(model_cfg, args.seq_len, gathered=True, mean_sinks_per_source=sinks)
    dense = flops_per_token(model_cfg, args.seq_len, gathered=False)
    out = {"step_ms_median": step_s * 1e3, "tokens_per_s": tokens_per_s, "loss_last": float(loss),
           "flops_per_token_gathered": real, "flops_per_token_masked_equiv": dense,
           "flops_per_s_gathered": real * tokens_per_s, "flops_per_s_masked_equiv": dense * tokens_per_s,
           "host_syncs_per_step": syncs}
    peak = cb.device_peak_flops(device)
    if peak is not None:
        out["peak_bf16_flops"] = peak
        out["mfu_gathered"] = real * tokens_per_s / peak
        out["mfu_masked_equiv"] = dense * tokens_per_s / peak
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    breakdown = component_times(model, batches[-1], device, timer, args.repeats)
    breakdown["optimizer_ms"] = optimizer_s * 1e3
    breakdown["other_ms"] = out["step_ms_median"] - sum(breakdown.values())
    out["breakdown"] = breakdown
    out["host_sync_ops"] = sync_ops
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def largest_fitting_micro_batch(args, device, env, candidates=(32, 24, 16, 8, 4, 2, 1)) -> int:
    """The largest micro-batch whose gathered-path step runs without running out of device memory."""
    for mb in candidates:
        trial = argparse.Namespace(**{**vars(args), "micro_batch": mb, "warmup": 1, "steps": 1})
        try:
            measure("gathered", trial, device, env)
            return mb
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    raise RuntimeError("no micro-batch fits the device")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="NullConfig preset (default: debug on CPU, paper_wiki_1b on GPU)")
    parser.add_argument("--n-layer", type=int, default=None, help="override n_layer (a slice that fits the device)")
    parser.add_argument("--micro-batch", default=None, help="rows per step, or `auto`: the largest that fits")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--segment", type=int, default=None, help="tokens per single-source segment")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each breakdown component")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--paths", default="gathered,masked")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    args.preset = args.preset or ("paper_wiki_1b" if gpu else "debug")
    args.seq_len = args.seq_len or (1024 if gpu else 64)
    args.segment = args.segment or (512 if gpu else 32)
    env = dist_env_from_environ()
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints to stdout; stdout carries only the JSON
        setup_distributed(env, device)
        try:
            if args.micro_batch == "auto":
                args.micro_batch = largest_fitting_micro_batch(args, device, env) if gpu else 4
            args.micro_batch = int(args.micro_batch or (16 if gpu else 4))
            results = {path: measure(path, args, device, env) for path in args.paths.split(",")}
        finally:
            teardown_distributed()
    import deepspeed
    import triton

    report = {
        "benchmark": "train_throughput", "device": cb.device_name(device), "host": platform.node(),
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "triton": triton.__version__,
        "deepspeed": deepspeed.__version__, "cuda": torch.version.cuda, "commit": _commit(),
        "preset": args.preset, "n_layer_override": args.n_layer, "micro_batch": args.micro_batch,
        "seq_len": args.seq_len, "segment": args.segment, "steps": args.steps, "warmup": args.warmup,
        "precision": "bf16" if gpu else "fp32", "results": results,
    }
    if "gathered" in results and "masked" in results:
        ratio = results["gathered"]["tokens_per_s"] / results["masked"]["tokens_per_s"]
        report["gathered_over_masked"] = ratio
        report["goals"] = {"gathered_over_masked >= 2.5": ratio >= GOALS["gathered_over_masked"],
                           "tokens_per_s >= 100k": results["gathered"]["tokens_per_s"] >= GOALS["tokens_per_s"],
                           "measured_on": "cuda" if gpu else "cpu (dry run: the goals are for one H100/H200)"}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return report


if __name__ == "__main__":
    main()
