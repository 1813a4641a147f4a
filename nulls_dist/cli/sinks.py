"""`nulls-sinks`: inspect a sink assignment. Prints one source's sinks and/or the collision statistics of a
range or random sample of source ids (sinks per source, per-unit load against the binomial, pairwise overlap),
as text or JSON, and optionally writes a per-unit load histogram PNG. `--forget-budget` prints the survivors'
retained share of their sinks after F = 1, 10, 100, 1k, 10k forgets, analytically (exp(-F k / R)) and sampled
from the real assignment (mean, worst, 1st percentile), optionally as a PNG curve (`--budget-plot`).

    nulls-sinks --strategy reference --pool 7692 --p-mem 0.013 --source-id 49152 --json
    nulls-sinks --strategy code --pool 7692 --num-sources 6407814 --min-source-id 49152 --sample 100000
    nulls-sinks --strategy uniform --pool 1048576 --k 100 --forget-budget --budget-plot budget.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

from nulls_dist import forget_budget as budget
from nulls_dist.cli.errors import report_errors
from nulls_dist.formats import atomic
from nulls_dist.sinks import STRATEGIES, SinkAssignment, SinkAssignmentConfig

PAPER_FIRST_ID = 49152  # data_pipeline.schema.PAPER_ID_OFFSET: source id = title index + vocabulary size
PAPER_NUM_SOURCES = 6_407_814
STATS_CHUNK = 65536  # source ids per rows() call while accumulating loads


def collision_stats(assign: SinkAssignment, source_ids: torch.Tensor, layer: int = 0, pair_ids: int = 2000) -> dict:
    """Statistics of the sink sets of source_ids (S,).

    Loads and the mean pairwise overlap are exact over all ids (sum over units of C(load, 2) counts every
    shared sink of every pair once); the max overlap is exact over the first `pair_ids` ids (dense incidence
    products in chunks).
    """
    pool = assign.cfg.pool_size
    # units the strategy can address at all (code leaves pool_size - k*q units idle by construction)
    usable = assign.describe().get("units_used") or pool
    num = source_ids.numel()
    if num < 2:
        raise ValueError(f"collision statistics need at least 2 source ids, got {num}")
    loads = torch.zeros(pool, dtype=torch.int64)  # (P,)
    counts = []
    for i in range(0, num, STATS_CHUNK):
        rows = assign.rows(source_ids[i : i + STATS_CHUNK], layer)  # (s, K)
        valid = rows >= 0
        counts.append(valid.sum(dim=1))
        loads += torch.bincount(rows[valid], minlength=pool)
    counts = torch.cat(counts).double()  # (S,)
    mean_k = counts.mean().item()
    p_unit = mean_k / usable
    shared_pairs = (loads * (loads - 1) // 2).sum().item()
    max_overlap, pair = _max_overlap(assign, source_ids[:pair_ids], layer)
    loads_f = loads[:usable].double() if usable < pool else loads.double()
    return {
        "num_ids": num,
        "sinks_per_source": {"mean": mean_k, "min": int(counts.min()), "max": int(counts.max()),
                             "std": counts.std().item()},
        "unit_load": {"usable_units": usable, "min": int(loads_f.min()), "max": int(loads_f.max()),
                      "mean": loads_f.mean().item(), "std": loads_f.std().item(),
                      "units_never_used": int((loads == 0).sum()),
                      "binomial_mean": num * p_unit, "binomial_std": math.sqrt(num * p_unit * (1 - p_unit))},
        "pairwise_overlap": {"mean": shared_pairs / (num * (num - 1) / 2), "ideal_mean": mean_k * mean_k / usable,
                             "max": max_overlap, "max_pair": pair, "max_over_first_ids": min(num, pair_ids)},
        "loads": loads[:usable],  # (usable,) dropped before printing; used for the histogram
    }


def _max_overlap(assign: SinkAssignment, source_ids: torch.Tensor, layer: int) -> tuple[int, list[int]]:
    """Largest number of sinks shared by two distinct ids among source_ids (S,), and that pair."""
    x = assign.mask(source_ids, layer).to(torch.float32)  # (S, P); products stay exact below 2**24
    best, pair = -1, [int(source_ids[0]), int(source_ids[1])]
    for i in range(0, x.shape[0], 512):
        shared = x[i : i + 512] @ x.T  # (s, S)
        rows = torch.arange(shared.shape[0])
        shared[rows, rows + i] = -1  # a source with itself
        val, flat = shared.flatten().max(dim=0)
        if int(val) > best:
            best = int(val)
            a, b = divmod(int(flat), x.shape[0])
            pair = [int(source_ids[i + a]), int(source_ids[b])]
    return best, pair


def write_histogram(loads: torch.Tensor, stats: dict, title: str, path: str) -> None:
    """Per-unit load histogram with the binomial expectation marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(loads.numpy(), bins=100, color="tab:blue")
    mean, std = stats["unit_load"]["binomial_mean"], stats["unit_load"]["binomial_std"]
    ax.axvline(mean, color="k", linestyle="--", label=f"binomial mean {mean:.0f} (std {std:.1f})")
    ax.set_xlabel("sources per sink unit")
    ax.set_ylabel("sink units")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- forget budget
def forget_budget(assign: SinkAssignment, first_id: int, num_ids: int, forget_counts: tuple[int, ...],
                  num_survivors: int, seed: int, layer: int = 0) -> dict:
    """The survivors' retained share after each forget count: analytic (k = the survivors' mean sinks, R = the
    units the strategy can use) beside the measurement on the real assignment (`forget_budget.sampled_budget`)."""
    rows_of = lambda ids: assign.rows(torch.from_numpy(ids), layer).numpy()  # noqa: E731  (n,) -> (n, K)
    out = budget.sampled_budget(rows_of, assign.cfg.pool_size, first_id, num_ids, forget_counts, num_survivors,
                                seed)
    rows = assign.describe().get("units_used") or assign.cfg.pool_size
    out.update(rows=rows, layer=layer, low_percentile=budget.LOW_PERCENTILE)
    for point in out["points"]:
        point["analytic"] = budget.analytic_retained_share(point["forgotten"], out["mean_k"], rows)
        point["uniform_expectation"] = budget.uniform_retained_share(point["forgotten"], out["mean_k"], rows)
    return out


def write_budget_plot(result: dict, title: str, path: str) -> None:
    """Retained share against forgets (log x): the analytic curve and the sampled mean, 1st percentile and worst."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    forgotten = [p["forgotten"] for p in points]
    grid = np.geomspace(1, max(forgotten), 200)
    low = budget.LOW_KEY
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(grid, [budget.analytic_retained_share(f, result["mean_k"], result["rows"]) for f in grid], "k--",
            label=f"exp(-F k / R), k {result['mean_k']:.1f}, R {result['rows']}")
    ax.plot(forgotten, [p["sampled"]["mean"] for p in points], "o-", color="tab:blue", label="sampled mean")
    ax.plot(forgotten, [p["sampled"][low] for p in points], "s:", color="tab:orange",
            label=f"sampled percentile {budget.LOW_PERCENTILE:g}")
    ax.plot(forgotten, [p["sampled"]["min"] for p in points], "v:", color="tab:red", label="sampled worst")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sources forgotten (F)")
    ax.set_ylabel("survivors' retained share of their sinks")
    ax.set_title(f"{title} ({result['num_survivors']} sampled survivors)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _parse_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--forget-counts must be comma-separated positive integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"--forget-counts must be comma-separated positive integers, got {text!r}")
    return counts


def _parse_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"--range must be A:B with integers A < B, got {text!r}") from None
    if not 0 <= lo < hi:
        raise ValueError(f"--range must be A:B with 0 <= A < B, got {text!r}")
    return lo, hi


def _universe(args: argparse.Namespace) -> tuple[int, int]:
    """(first id, number of ids) the statistics draw from: --range, by default the paper's ids."""
    lo, hi = _parse_range(args.range) if args.range else (PAPER_FIRST_ID, PAPER_FIRST_ID + PAPER_NUM_SOURCES)
    return lo, hi - lo


def _ids_to_study(args: argparse.Namespace) -> torch.Tensor | None:
    """The ids for the statistics: a range, or a seeded sample from the range (default: the paper's ids)."""
    if args.range is None and args.sample is None:
        return None
    lo, num = _universe(args)
    if args.sample is None:
        return torch.arange(lo, lo + num, dtype=torch.int64)
    if not 2 <= args.sample <= num:
        raise ValueError(f"--sample must be in [2, {num}] (the range's size), got {args.sample}")
    rng = np.random.default_rng(args.sample_seed)
    picked = np.sort(rng.choice(num, size=args.sample, replace=False)) + lo
    return torch.from_numpy(picked.astype(np.int64))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nulls-sinks", description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", choices=STRATEGIES, default="reference")
    p.add_argument("--pool", type=int, default=7692, help="sink pool size (units per layer)")
    p.add_argument("--p-mem", type=float, default=0.013)
    p.add_argument("--k", type=int, default=None, help="sinks per source (uniform, code); default from p-mem / q")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--layer-specific", action="store_true")
    p.add_argument("--num-sources", type=int, default=None, help="code: the capacity must cover this many")
    p.add_argument("--min-source-id", type=int, default=0, help="code: source index = id - this")
    p.add_argument("--id-dtype", choices=("int64", "int32"), default="int64")
    p.add_argument("--source-id", type=int, default=None, help="print this source's sinks")
    p.add_argument("--range", default=None, help="A:B, statistics over ids A..B-1")
    p.add_argument("--sample", type=int, default=None, help="statistics over N ids sampled from --range "
                   f"(default range: the paper's {PAPER_FIRST_ID}:{PAPER_FIRST_ID + PAPER_NUM_SOURCES})")
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--pair-ids", type=int, default=2000, help="max overlap is computed over this many ids")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--histogram", default=None, help="write a per-unit load histogram PNG here")
    p.add_argument("--forget-budget", action="store_true",
                   help="survivors' retained share of their sinks after --forget-counts forgets (analytic and "
                        "sampled from --range, default the paper's ids; seed --sample-seed)")
    p.add_argument("--forget-counts", default=",".join(map(str, budget.FORGET_COUNTS)))
    p.add_argument("--survivors", type=int, default=10_000, help="sampled survivors per forget count")
    p.add_argument("--budget-plot", default=None, help="write the retained-share curve PNG here")
    return p


def run(args: argparse.Namespace) -> dict:
    cfg = SinkAssignmentConfig(
        strategy=args.strategy, pool_size=args.pool, p_mem=args.p_mem, k=args.k,
        layer_specific=args.layer_specific, seed=args.seed, num_sources=args.num_sources,
        id_dtype=args.id_dtype, min_source_id=args.min_source_id,
    )
    assign = SinkAssignment(cfg)
    out: dict = {"config": assign.describe()}
    if args.source_id is not None:
        rows = assign.rows(torch.tensor([args.source_id], dtype=torch.int64), args.layer)[0]
        sinks = rows[rows >= 0].tolist()
        out.update(source_id=args.source_id, layer=args.layer, num_sinks=len(sinks), sinks=sinks)
    ids = _ids_to_study(args)
    if ids is not None:
        stats = collision_stats(assign, ids, args.layer, args.pair_ids)
        loads = stats.pop("loads")
        out["stats"] = stats
        if args.histogram:
            write_histogram(loads, stats, f"{args.strategy}: pool {args.pool}, {stats['num_ids']} ids", args.histogram)
            out["histogram"] = args.histogram
    elif args.histogram:
        raise ValueError("--histogram needs --range or --sample")
    if args.forget_budget:
        first, num = _universe(args)
        out["forget_budget"] = forget_budget(assign, first, num, _parse_counts(args.forget_counts), args.survivors,
                                             args.sample_seed, args.layer)
        if args.budget_plot:
            write_budget_plot(out["forget_budget"], f"{args.strategy}: pool {args.pool}", args.budget_plot)
            out["budget_plot"] = args.budget_plot
    elif args.budget_plot:
        raise ValueError("--budget-plot needs --forget-budget")
    return out


def _print_text(out: dict) -> None:
    cfg = out["config"]
    print(f"strategy {cfg['strategy']} ({cfg['version']}): pool {cfg['pool_size']}, k {cfg['k']}, "
          f"q {cfg['q']}, r {cfg['r']}, capacity {cfg['capacity']}")
    if "sinks" in out:
        print(f"source {out['source_id']} (layer {out['layer']}): {out['num_sinks']} sinks")
        print(" ".join(str(s) for s in out["sinks"]))
    if "stats" in out:
        s = out["stats"]
        k, load, pair = s["sinks_per_source"], s["unit_load"], s["pairwise_overlap"]
        print(f"{s['num_ids']} ids")
        print(f"sinks per source: mean {k['mean']:.2f} min {k['min']} max {k['max']} std {k['std']:.2f}")
        print(f"unit load over {load['usable_units']} usable units: min {load['min']} max {load['max']} "
              f"std {load['std']:.1f} "
              f"(binomial mean {load['binomial_mean']:.1f} std {load['binomial_std']:.1f}); "
              f"{load['units_never_used']} units never used")
        print(f"pairwise overlap: mean {pair['mean']:.3f} (ideal {pair['ideal_mean']:.3f}); max {pair['max']} "
              f"for ids {pair['max_pair']} (over the first {pair['max_over_first_ids']} ids)")
    if "histogram" in out:
        print(f"histogram: {out['histogram']}")
    if "forget_budget" in out:
        b = out["forget_budget"]
        low = budget.LOW_KEY
        print(f"forget budget: survivors' retained share of their sinks (layer {b['layer']}; k {b['mean_k']:.2f} "
              f"of R {b['rows']} rows; {b['num_survivors']} survivors sampled from ids {b['id_range'][0]}:"
              f"{b['id_range'][1]}, seed {b['seed']})")
        print(f"{'forgotten':>10} {'analytic':>9} {'(1-k/R)^F':>9} {'mean':>7} {low:>7} {'worst':>7} "
              f"{'rows gone':>10}")
        for p in b["points"]:
            s = p["sampled"]
            print(f"{p['forgotten']:>10} {p['analytic']:>9.4f} {p['uniform_expectation']:>9.4f} {s['mean']:>7.4f} "
                  f"{s[low]:>7.4f} {s['min']:>7.4f} {p['forgotten_rows']:>10}")
    if "budget_plot" in out:
        print(f"budget plot: {out['budget_plot']}")


@report_errors("nulls-sinks")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        _print_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
