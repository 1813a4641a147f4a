"""The residue study's pictures (docs/residue.md), from its results.json, each PNG written atomically:
- `residue_classes.png`: the share of the Min-K% and LOSS membership signal each token class carries (base pair);
- `residue_scan.png`: membership AUCs of the unlearned model and its oracle across training length and the
  backbone's share, and the mean log-prob gap on title words against the rest;
- `mitigations.png`: the goal's four quantities for the unmitigated pair and each mitigation;
- `token_gaps.png`: the per-token log-prob gap (unlearned minus oracle) along one forgotten article."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nulls_dist.evaluation.residue_plots import class_shares_png, token_gaps_png
from nulls_dist.formats import atomic


def _save(fig, path: Path) -> str:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")
    return path.name


def _aucs(r: dict) -> dict[str, float]:
    plain, cal = r["membership"]["plain"]["min_k"], r["membership"]["reference_calibrated"]["ref_loss"]
    return {"min_k": plain["auc"], "min_k_oracle": plain["auc_retrain"], "cal": cal["auc"],
            "cal_oracle": cal["auc_retrain"]}


def _scan(plt, pairs: dict, path: Path) -> str:
    length = [("s250_pgen32", 250), ("s500_pgen32", 500), ("s1000_pgen32", 1000)]
    backbone = [("s500_pgen64", 1 / 64), ("s500_pgen32", 1 / 32), ("s500_pgen8", 1 / 8)]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for col, (points, xlabel, logx) in enumerate(((length, "training steps", False),
                                                  (backbone, "backbone share p_gen", True))):
        points = [(n, x) for n, x in points if n in pairs]
        if not points:
            continue
        xs = [x for _, x in points]
        a = [_aucs(pairs[n]) for n, _ in points]
        ax = axes[0, col]
        for key, style, label in (("min_k", "o-", "Min-K%, unlearned"), ("min_k_oracle", "o--", "Min-K%, oracle"),
                                  ("cal", "s-", "calibrated (ref_loss), unlearned"),
                                  ("cal_oracle", "s--", "calibrated, oracle")):
            ax.plot(xs, [v[key] for v in a], style, label=label)
        ax.set_ylim(0, 1.02)
        ax.axhline(0.5, color="grey", lw=0.6)
        ax.set_ylabel("AUC forgotten vs holdout")
        ax = axes[1, col]
        for cls, style in (("title", "o-"), ("name", "s-"), ("content", "^-")):
            ax.plot(xs, [pairs[n]["residue"]["families"]["name"][cls]["mean_gap_members"] for n, _ in points], style,
                    label=f"{cls} tokens")
        ax.set_ylabel("mean log-prob gap, forgotten text\n(unlearned - oracle, nats)")
        for ax in axes[:, col]:
            ax.set_xlabel(xlabel)
            if logx:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"1/{round(1 / x)}" if logx else str(x) for x in xs])
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    out = _save(fig, path)
    plt.close(fig)
    return out


def _mitigations(plt, pairs: dict, path: Path) -> str:
    names = [n for n, r in pairs.items() if r["group"] == "mitigation" or n == "s500_pgen32"]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    a = [_aucs(pairs[n]) for n in names]
    for ax, (key, title) in zip(axes[:2], (("min_k", "Min-K% AUC"), ("cal", "calibrated (ref_loss) AUC"))):
        ax.bar(x - 0.2, [v[key] for v in a], 0.4, label="unlearned")
        ax.bar(x + 0.2, [v[key + "_oracle"] for v in a], 0.4, label="its oracle")
        ax.set_title(title + " (goal: within 0.1)", fontsize=9)
        ax.set_ylim(0, 1.02)
    ax = axes[2]
    for offset, dep in ((-0.2, "unlearned"), (0.2, "oracle")):
        acc = np.array([pairs[n]["probes"][dep]["unique_forget"]["accuracy"] for n in names])
        ci = np.array([pairs[n]["probes"][dep]["unique_forget"]["accuracy_ci95"] for n in names])  # (pairs, 2)
        ax.bar(x + offset, acc, 0.4, yerr=np.abs(ci.T - acc), capsize=2, label=dep)
    ax.set_title("unique-fact accuracy, forgotten articles", fontsize=9)
    ax = axes[3]
    ax.bar(x, [pairs[n]["loss"]["unlearned"]["retained"] for n in names], 0.5, color="tab:green")
    base = pairs["s500_pgen32"]["loss"]["unlearned"]["retained"] if "s500_pgen32" in pairs else None
    if base is not None:
        ax.axhline(base * 1.05, color="black", ls="--", lw=0.8, label="unmitigated + 5%")
        ax.legend(fontsize=7)
    ax.set_title("retained loss, unlearned (nats/token)", fontsize=9)
    for ax in axes:
        ax.set_xticks(x, [n.replace("s500_pgen32", "unmitigated") for n in names], rotation=20, fontsize=8)
    axes[0].legend(fontsize=7)
    out = _save(fig, path)
    plt.close(fig)
    return out


def _token_gaps(pairs: dict, path: Path) -> str | None:
    shown = [n for n in ("s500_pgen32", *[n for n, r in pairs.items() if r["group"] == "mitigation"])
             if n in pairs and "example" in pairs[n]] or [n for n in pairs if "example" in pairs[n]][:1]
    return token_gaps_png([(n.replace("s500_pgen32", "unmitigated"), pairs[n]["example"]) for n in shown], path)


def write_plots(results: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = results["pairs"]
    files = []
    if "s500_pgen32" in pairs:
        files.append(class_shares_png(pairs["s500_pgen32"]["residue"], out_dir / "residue_classes.png"))
    files.append(_scan(plt, pairs, out_dir / "residue_scan.png"))
    if any(r["group"] == "mitigation" for r in pairs.values()):
        files.append(_mitigations(plt, pairs, out_dir / "mitigations.png"))
    gaps = _token_gaps(pairs, out_dir / "token_gaps.png")
    return files + ([gaps] if gaps else [])
