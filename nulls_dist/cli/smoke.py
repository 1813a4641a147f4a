"""`nulls-smoke`: build a preset NULL model, run forward+backward on a random packed multi-source batch through
both sink paths (gathered and masked), check they agree, and print one JSON object with parameter counts for
every preset (counted on the meta device, nothing allocated) and FLOPs per token.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from nulls_dist.cli.errors import report_errors
from nulls_dist.config import PRESETS, NullConfig
from nulls_dist.model import MODE_KINDS, NullTransformer, SinkMode, flops_per_token, num_parameters_of

# fp32 agreement bound between the two paths; measured max differences are ~1e-6 on the debug preset.
AGREEMENT_ATOL = 1e-4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nulls-smoke", description=__doc__)
    parser.add_argument("--preset", default="debug", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sources-per-row", type=int, default=3)
    parser.add_argument("--strategy", default=None, help="override sink_strategy (reference|uniform|code)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("batch_size", "seq_len", "sources_per_row"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def packed_source_ids(gen: torch.Generator, cfg: NullConfig, num_rows: int, length: int, per_row: int):
    """(B, T) source ids: each row cut at random points into `per_row` runs; ids start at the vocab size
    (the paper's convention) and the last run of a row reappears as the first of the next."""
    rows = []
    next_id = cfg.vocab_size
    for _ in range(num_rows):
        cuts = torch.sort(torch.randperm(length - 1, generator=gen)[: per_row - 1] + 1).values.tolist()
        bounds = [0] + cuts + [length]
        row = []
        for i in range(len(bounds) - 1):
            row += [next_id + i] * (bounds[i + 1] - bounds[i])
        next_id += len(bounds) - 2
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64)


def run_path(cfg: NullConfig, state_dict, input_ids, source_ids, device) -> dict:
    model = NullTransformer(cfg).to(device)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    start = time.perf_counter()
    logits = model(input_ids, source_ids)  # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    loss.backward()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        finite_modes = {
            kind: bool(torch.isfinite(model(input_ids, source_ids, mode)).all())
            for kind, mode in zip(MODE_KINDS, _modes(source_ids))
        }
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return dict(model=model, logits=logits.detach(), loss=float(loss.detach()), seconds=seconds, grads=grads,
                finite_modes=finite_modes)


def _modes(source_ids: torch.Tensor) -> list[SinkMode]:
    first, second = int(source_ids[0, 0]), int(source_ids[0, -1])
    return [SinkMode.train(), SinkMode.sink_on(first), SinkMode.sink_off(first, [second]),
            SinkMode.backbone_only(), SinkMode.expected()]


@report_errors("nulls-smoke")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.manual_seed(args.seed)
    overrides = {"sink_strategy": args.strategy} if args.strategy else {}
    cfg = NullConfig.from_preset(args.preset, **overrides)
    if args.seq_len > cfg.block_size:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the preset's block_size={cfg.block_size}")
    gen = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=gen).to(device)
    source_ids = packed_source_ids(gen, cfg, args.batch_size, args.seq_len, args.sources_per_row).to(device)

    gathered = run_path(NullConfig.from_preset(args.preset, sink_path="gathered", **overrides), None,
                        input_ids, source_ids, device)
    masked = run_path(NullConfig.from_preset(args.preset, sink_path="masked", **overrides),
                      gathered["model"].state_dict(), input_ids, source_ids, device)
    logit_diff = float((gathered["logits"] - masked["logits"]).abs().max())
    grad_diff = max(float((g - masked["grads"][name]).abs().max()) for name, g in gathered["grads"].items())
    agree = logit_diff <= AGREEMENT_ATOL and grad_diff <= AGREEMENT_ATOL
    assignment = gathered["model"].sink_assignment
    report = {
        "preset": args.preset,
        "device": str(device),
        "batch": [args.batch_size, args.seq_len],
        "num_sources_in_batch": int(torch.unique(source_ids).numel()),
        "parameters": gathered["model"].num_parameters(),
        "n_backbone": cfg.n_backbone,
        "n_sink": cfg.n_sink,
        "sink_assignment": assignment.describe() if assignment is not None else None,
        "loss": {"gathered": gathered["loss"], "masked": masked["loss"]},
        "seconds_fwd_bwd": {"gathered": gathered["seconds"], "masked": masked["seconds"]},
        "max_abs_diff": {"logits": logit_diff, "grads": grad_diff},
        "paths_agree": agree,
        "modes_finite": gathered["finite_modes"],
        "preset_parameters": {name: num_parameters_of(NullConfig.from_preset(name)) for name in sorted(PRESETS)},
        "flops_per_token_fwd_bwd": {
            name: {
                "gathered": flops_per_token(c, c.block_size, gathered=True),
                "masked": flops_per_token(c, c.block_size, gathered=False),
            }
            for name, c in ((n, NullConfig.from_preset(n)) for n in sorted(PRESETS))
        },
    }
    print(json.dumps(report, indent=2, default=str))
    return 0 if agree and all(gathered["finite_modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
