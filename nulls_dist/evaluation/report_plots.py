"""The audit report's PNG figures (matplotlib, Agg), each written through a temporary name (`save_png`):
fact probes, text losses, membership ROC curves (linear and the low-FPR region on log axes), worst-case routing,
the quantization attack, relearning curves and per-request curves of successive forget requests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nulls_dist.formats import atomic

LOSS_GROUPS = ("forget", "related", "retained", "holdout")
ROC_ATTACKS = ("min_k", "ref_oracle_loss")
ROC_DEPLOYMENTS = ("original", "unlearned", "oracle", "ga", "npo")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display; every report figure is a PNG file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> str:
    """Write `fig` to `path` atomically and close it; returns the file name (extra report sections use it too)."""
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    pyplot().close(fig)
    return path.name


def probes_plot(result: dict, out_dir: Path, groups) -> str:
    plt = pyplot()
    deps = result["deployments"]
    names = list(deps)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, metric in zip(axes, ("truth_ratio_gmean", "accuracy")):
        width = 0.8 / len(groups)
        for i, group in enumerate(groups):
            values = np.array([deps[n]["probes"][group][metric] for n in names])
            err = None
            if metric == "accuracy":  # Wilson 95% intervals as error bars
                ci = np.array([deps[n]["probes"][group]["accuracy_ci95"] for n in names])  # (deployments, 2)
                err = np.abs(ci.T - values)
            ax.bar(x + (i - (len(groups) - 1) / 2) * width, values, width, yerr=err, capsize=2, label=group)
        ax.set_xticks(x, names, rotation=20)
        ax.set_title("Truth Ratio, geometric mean (log)" if metric == "truth_ratio_gmean" else "accuracy (95% CI)")
        if metric == "truth_ratio_gmean":
            ax.set_yscale("log")  # known facts ~0.01, unknown ones ~1
        else:
            ax.axhline(result.get("chance_accuracy", float("nan")), color="grey", lw=0.8, ls="--")  # chance
    axes[0].legend(fontsize=7)
    return save_png(fig, out_dir / "probes.png")


def loss_plot(result: dict, out_dir: Path) -> str:
    plt = pyplot()
    deps = result["deployments"]
    names = list(deps)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, group in enumerate(LOSS_GROUPS):
        ax.bar(x + (i - 1.5) * 0.2, [deps[n]["loss"][group] for n in names], 0.2, label=group)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("nats / token")
    ax.legend(fontsize=8)
    return save_png(fig, out_dir / "loss.png")


def roc_plot(result: dict, out_dir: Path) -> str | None:
    """Per headline attack: the ROC (linear) and its low-FPR region on log-log axes (FPR from 1/(2n), where the
    ROC's FPR-0 points are drawn, to 1), with the chance diagonal."""
    deps = result["deployments"]
    rows = [a for a in ROC_ATTACKS if any(a in deps[n].get("membership", {}).get("attacks", {}) for n in deps)]
    if not rows:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 4 * len(rows)), squeeze=False)
    for (ax_lin, ax_log), attack in zip(axes, rows):
        floor = None
        for name in (n for n in ROC_DEPLOYMENTS if n in deps):
            summary = deps[name]["membership"]["attacks"].get(attack)
            if not summary or "roc" not in summary:
                continue
            fpr, tpr = np.array(summary["roc"]["fpr"]), np.array(summary["roc"]["tpr"])
            floor = 0.5 * summary["roc"]["min_positive_fpr"]
            label = f"{name} (AUC {summary['auc']:.2f})"
            ax_lin.plot(fpr, tpr, label=label, drawstyle="steps-post")
            ax_log.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=label, drawstyle="steps-post")
        for ax in (ax_lin, ax_log):
            ax.plot([floor or 1e-3, 1], [floor or 1e-3, 1], color="grey", lw=0.8, ls="--")
            ax.set_xlabel("false positive rate (never-trained sources)")
            ax.set_ylabel("true positive rate (forgotten sources)")
        ax_lin.set_title(f"{attack}: ROC")
        ax_log.set_xscale("log")
        ax_log.set_yscale("log")
        ax_log.set_title(f"{attack}: low-FPR region (FPR 0 drawn at 1/(2n))")
        for alpha in (0.01, 0.05):
            ax_log.axvline(alpha, color="grey", lw=0.6, ls=":")
        ax_lin.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, out_dir / "roc.png")


def worst_case_plot(wc: dict | None, out_dir: Path) -> str | None:
    if not wc or not wc["deployments"]:
        return None
    plt = pyplot()
    names = list(wc["deployments"])
    groups = wc["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 3.5), squeeze=False)
    kinds = (("routed_accuracy", "routed (deployed)"), ("mean_route_accuracy", "average route"),
             ("confident_accuracy", "most confident route"), ("any_correct", "best route (knows the answer)"))
    for ax, group in zip(axes[0], groups):
        x = np.arange(len(names))
        for i, (key, label) in enumerate(kinds):
            vals = [wc["deployments"][n]["groups"][group]["summary"].get(key, np.nan) for n in names]
            ax.bar(x + (i - 1.5) * 0.2, vals, 0.2, label=label)
        ax.set_xticks(x, names)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"worst-case routing: {group} accuracy")
        ax.legend(fontsize=7)
    return save_png(fig, out_dir / "worst_case.png")


def quantization_plot(q: dict | None, result: dict, out_dir: Path) -> str | None:
    if not q or not q["deployments"]:
        return None
    plt = pyplot()
    base = sorted({n.split("@")[0] for n in q["deployments"]}, key=lambda n: list(result["deployments"]).index(n)
                  if n in result["deployments"] else 99)
    levels = ["fp32"] + [f"int{b}" for b in q["bits"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(base))
    for i, level in enumerate(levels):
        src = result["deployments"] if level == "fp32" else q["deployments"]
        vals = [src.get(n if level == "fp32" else f"{n}@{level}", {}).get("probes", {}).get("unique_forget", {})
                .get("accuracy", np.nan) for n in base]
        ax.bar(x + (i - (len(levels) - 1) / 2) * 0.25, vals, 0.25, label=level)
    ax.set_xticks(x, base)
    ax.set_ylabel("forgotten unique-fact accuracy")
    ax.axhline(result.get("chance_accuracy", np.nan), color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    ax.set_title(f"quantization attack (groups of {q['group_size'] or 'a whole row'})")
    return save_png(fig, out_dir / "quantization.png")


def relearning_plot(rl: dict | None, out_dir: Path) -> str | None:
    """Recovery on one axis for every deployment: forgotten unique-fact accuracy against fine-tuning steps."""
    if not rl or not rl["conditions"]:
        return None
    plt = pyplot()
    conds = list(rl["conditions"])
    fig, axes = plt.subplots(1, len(conds), figsize=(6 * len(conds), 3.8), squeeze=False, sharey=True)
    for ax, cond in zip(axes[0], conds):
        for name, run in rl["conditions"][cond]["deployments"].items():
            ax.plot(run["steps"], run["accuracy"], marker="o", label=name)
        ax.axhline(rl["threshold"], color="black", lw=0.8, ls="--", label="threshold")
        ax.axhline(rl["level_original"], color="grey", lw=0.8, ls=":", label="original")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("fine-tuning steps")
        ax.set_title(f"relearning on {cond.replace('_', ' ')}")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("forgotten unique-fact accuracy")
    axes[0][0].legend(fontsize=7)
    return save_png(fig, out_dir / "relearning.png")


def successive_plot(succ: dict | None, out_dir: Path) -> str | None:
    if not succ or not succ["stages"]:
        return None
    plt = pyplot()
    stages = succ["stages"]
    x = [s["num_forgotten"] for s in stages]
    panels = (("unique_forget_accuracy", "forgotten unique-fact accuracy"),
              ("shared_forget_via_retained_accuracy", "shared facts via a surviving source"),
              ("loss_retained", "retained loss (nats/token)"), ("auc_min_k", "Min-K% AUC (forget vs holdout)"),
              ("worst_case_confident_accuracy", "worst-case routing: most confident route"))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for name in ("original", "unlearned", "oracle"):
            vals = [np.nan if s.get(name, {}).get(key) is None else s[name][key] for s in stages]
            if not all(np.isnan(vals)):
                ax.plot(x, vals, marker="o", label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("sources forgotten (cumulative)")
    axes[-1].plot(x, [s["survivor_capacity"] for s in stages], marker="o", color="black")
    axes[-1].set_title("sinks a survivor keeps", fontsize=9)
    axes[-1].set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, out_dir / "successive.png")


def all_plots(result: dict, out_dir: Path, groups) -> list[str]:
    files = [probes_plot(result, out_dir, groups), loss_plot(result, out_dir), roc_plot(result, out_dir),
             worst_case_plot(result.get("worst_case"), out_dir),
             quantization_plot(result.get("quantization"), result, out_dir),
             relearning_plot(result.get("relearning"), out_dir), successive_plot(result.get("successive"), out_dir)]
    return [f for f in files if f]
