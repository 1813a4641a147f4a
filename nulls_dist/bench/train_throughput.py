"""Training throughput of the `gathered` and `masked` sink paths, measured in one process on the same device.

Each path trains the same model (same seed) inside a DeepSpeed engine (ZeRO-0, world size 1, the trainer's
DeepSpeed config, optimizer and loss) on synthetic packed batches: random tokens, each row split into
single-source segments of `--segment` tokens with distinct source ids. Prints one JSON object: device name,
versions, model, tokens/s and step time per path, FLOP/s counted both ways (gathered real / masked dense-
equivalent), MFU where the device's peak is known, and the gathered/masked speed-up.

    python -m nulls_dist.bench.train_throughput                      # CPU, debug model
    python -m nulls_dist.bench.train_throughput --preset paper_wiki_1b --micro-batch 16 --seq-len 1024
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from nulls_dist.config import NullConfig
from nulls_dist.model import NullTransformer, SinkMode, flops_per_token
from nulls_dist.train import callbacks as cb
from nulls_dist.train.config import train_config_from_dict
from nulls_dist.train.distributed import dist_env_from_environ, resolve_device, setup_distributed, teardown_distributed
from nulls_dist.train.ds_config import build_ds_config, lr_scheduler_factory
from nulls_dist.train.trainer import next_token_loss, param_groups


def synthetic_batch(cfg: NullConfig, micro_batch: int, seq_len: int, segment: int, step: int, device) -> dict:
    """(B, T+1) tokens with single-source segments of `segment` tokens; ids start above the vocabulary."""
    g = torch.Generator().manual_seed(step)
    T = seq_len + 1
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, T), generator=g)  # (B, T)
    seg_index = torch.arange(T) // segment  # (T,)
    row_base = (step * micro_batch + torch.arange(micro_batch)) * (T // segment + 1)  # (B,)
    source_ids = cfg.vocab_size + row_base[:, None] + seg_index[None, :]  # (B, T)
    loss_mask = torch.ones(micro_batch, T, dtype=torch.bool)
    return {k: v.to(device) for k, v in dict(tokens=tokens, source_ids=source_ids, loss_mask=loss_mask).items()}


def measure(path: str, args, device, env) -> dict:
    import deepspeed

    overrides = {"sink_path": path}
    if args.n_layer is not None:
        overrides["n_layer"] = args.n_layer
    model_cfg = NullConfig.from_preset(args.preset, **overrides)
    torch.manual_seed(0)
    model = NullTransformer(model_cfg).to(device)
    tcfg = train_config_from_dict({
        "train": {"max_steps": args.warmup + args.steps, "device": device.type, "sink_path": path},
        "data": {"name": "synthetic"},
        "deepspeed": {"zero_stage": 0, "micro_batch": args.micro_batch, "grad_accum": 1},
        "optim": {"warmup_steps": 1},
    })
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, tcfg.optim.weight_decay),
        config=build_ds_config(tcfg, env.world_size, on_gpu=device.type == "cuda"),
        lr_scheduler=lr_scheduler_factory(tcfg), dist_init_required=False)
    times = []
    for step in range(args.warmup + args.steps):
        batch = synthetic_batch(model_cfg, args.micro_batch, args.seq_len, args.segment, step, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = engine(batch["tokens"][:, :-1], source_ids=batch["source_ids"][:, :-1], mode=SinkMode.train())
        loss, _ = next_token_loss(logits, batch)
        engine.backward(loss)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    tokens_per_s = args.micro_batch * args.seq_len / step_s
    real = flops_per_token(model_cfg, args.seq_len, gathered=True)
    dense = flops_per_token(model_cfg, args.seq_len, gathered=False)
    out = {"step_ms_median": step_s * 1e3, "tokens_per_s": tokens_per_s, "loss_last": float(loss.detach()),
           "flops_per_s_gathered": real * tokens_per_s, "flops_per_s_masked_equiv": dense * tokens_per_s}
    peak = cb.device_peak_flops(device)
    if peak is not None:
        out["mfu_gathered"] = real * tokens_per_s / peak
        out["mfu_masked_equiv"] = dense * tokens_per_s / peak
    if device.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    del engine, model
    return out


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="NullConfig preset (default: debug on CPU, paper_wiki_1b on GPU)")
    parser.add_argument("--n-layer", type=int, default=None, help="override n_layer (a slice that fits the device)")
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--segment", type=int, default=None, help="tokens per single-source segment")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--paths", default="gathered,masked")
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    args.preset = args.preset or ("paper_wiki_1b" if gpu else "debug")
    args.micro_batch = args.micro_batch or (16 if gpu else 8)
    args.seq_len = args.seq_len or (1024 if gpu else 128)
    args.segment = args.segment or (512 if gpu else 64)
    env = dist_env_from_environ()
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints to stdout; stdout carries only the JSON
        setup_distributed(env, device)
        try:
            results = {path: measure(path, args, device, env) for path in args.paths.split(",")}
        finally:
            teardown_distributed()
    import deepspeed

    report = {
        "benchmark": "train_throughput",
        "device": cb.device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "deepspeed": deepspeed.__version__, "commit": _commit(),
        "preset": args.preset, "n_layer_override": args.n_layer, "micro_batch": args.micro_batch,
        "seq_len": args.seq_len, "segment": args.segment, "steps": args.steps, "warmup": args.warmup,
        "precision": "bf16" if gpu else "fp32",
        "results": results,
    }
    if "gathered" in results and "masked" in results:
        report["gathered_over_masked"] = results["gathered"]["tokens_per_s"] / results["masked"]["tokens_per_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
