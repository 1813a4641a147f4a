"""The unlearning report: `report.json` (every number), `report.md` (tables) and PNG plots (fact probes, text
losses, relearning curves), each file written through a temporary name."""
from __future__ import annotations

import math
from pathlib import Path

from nulls_dist.formats import atomic

from nulls_dist.evaluation.evaluate import PROBE_GROUPS
LOSS_GROUPS = ("forget", "related", "retained", "holdout")


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _interval(values) -> str:
    mean, lo, hi = values
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _vs_oracle(deps: dict) -> list[str]:
    """Paired differences against the retrain oracle (only when an oracle was evaluated)."""
    if not any("probes_vs_oracle" in r for r in deps.values()):
        return []
    lines = ["", "## Against the retrain oracle (paired bootstrap over the same probes, 95% interval)", "",
             "An interval containing 0 means the deployment is indistinguishable from the oracle on that group.", "",
             "| deployment | " + " | ".join(f"{g} acc diff | {g} log-TR diff" for g in PROBE_GROUPS) + " |",
             "|---" * (1 + 2 * len(PROBE_GROUPS)) + "|"]
    for name, r in deps.items():
        if name == "oracle" or "probes_vs_oracle" not in r:
            continue
        vs = r["probes_vs_oracle"]
        lines.append(f"| {name} | " + " | ".join(
            f"{_interval(vs[g]['accuracy_diff'])} | {_interval(vs[g]['log_truth_ratio_diff'])}" for g in PROBE_GROUPS)
            + " |")
    return lines


def markdown(result: dict) -> str:
    deps = result["deployments"]
    lines = ["# Unlearning report", "",
             f"Forgotten sources: {result['forget_ids']}; related retained sources: {len(result['related_ids'])}; "
             f"holdout sources: {result['num_holdout']}; probes: {result['num_probes']}"
             + (f"; not used: {result['probes_unused']}" if result.get("probes_unused") else "") + ".", "",
             "## Fact probes", "",
             "Truth Ratio (geometric mean over probes of mean P(distractor) / P(answer)): ~0 = fact known, "
             "~1 = answer no likelier than its distractors. Accuracy: the answer beats every distractor "
             f"(chance {_fmt(result.get('chance_accuracy'))}), Wilson 95% interval.", "",
             "| deployment | " + " | ".join(f"{g} TR | {g} acc" for g in PROBE_GROUPS) + " |",
             "|---" * (1 + 2 * len(PROBE_GROUPS)) + "|"]
    for name, r in deps.items():
        cells = []
        for g in PROBE_GROUPS:
            p = r["probes"][g]
            lo, hi = p["accuracy_ci95"]
            cells.append(f"{_fmt(p['truth_ratio_gmean'])} | {_fmt(p['accuracy'])} [{_fmt(lo)}, {_fmt(hi)}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += _vs_oracle(deps)
    lines += ["", "## Text loss (nats/token)", "", "| deployment | " + " | ".join(LOSS_GROUPS) + " |",
              "|---" * (1 + len(LOSS_GROUPS)) + "|"]
    for name, r in deps.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r["loss"][g]) for g in LOSS_GROUPS) + " |")
    lines += ["", "## Extraction, membership inference, relearning", "",
              "| deployment | exact-match len | ROUGE-L | Min-K AUC (forget vs holdout) | PrivLeak % | "
              "relearn loss before -> after |", "|---|---|---|---|---|---|"]
    for name, r in deps.items():
        rl = r["relearning"]["loss_rest"]
        lines.append(f"| {name} | {_fmt(r['verbatim']['exact_match_len'])} | {_fmt(r['verbatim']['rouge_l'])} | "
                     f"{_fmt(r['membership']['auc_forget_vs_holdout'])} | "
                     f"{_fmt(r['membership'].get('priv_leak_vs_oracle'))} | {_fmt(rl[0])} -> {_fmt(rl[-1])} |")
    lines += ["", "![probes](probes.png)", "", "![loss](loss.png)", "", "![relearning](relearning.png)", ""]
    return "\n".join(lines)


def _save_png(fig, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")


def plots(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    deps = result["deployments"]
    names = list(deps)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, metric in zip(axes, ("truth_ratio_gmean", "accuracy")):
        width = 0.8 / len(PROBE_GROUPS)
        for i, group in enumerate(PROBE_GROUPS):
            values = np.array([deps[n]["probes"][group][metric] for n in names])
            err = None
            if metric == "accuracy":  # Wilson 95% intervals as error bars
                ci = np.array([deps[n]["probes"][group]["accuracy_ci95"] for n in names])  # (deployments, 2)
                err = np.abs(ci.T - values)
            ax.bar(x + (i - (len(PROBE_GROUPS) - 1) / 2) * width, values, width, yerr=err, capsize=2, label=group)
        ax.set_xticks(x, names, rotation=20)
        ax.set_title("Truth Ratio, geometric mean (log)" if metric == "truth_ratio_gmean" else "accuracy (95% CI)")
        if metric == "truth_ratio_gmean":
            ax.set_yscale("log")  # known facts ~0.01, unknown ones ~1
        else:
            ax.axhline(result.get("chance_accuracy", float("nan")), color="grey", lw=0.8, ls="--")  # chance
    axes[0].legend(fontsize=8)
    _save_png(fig, out_dir / "probes.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, group in enumerate(LOSS_GROUPS):
        ax.bar(x + (i - 1.5) * 0.2, [deps[n]["loss"][group] for n in names], 0.2, label=group)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("nats / token")
    ax.legend(fontsize=8)
    _save_png(fig, out_dir / "loss.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n in names:
        ax.plot(deps[n]["relearning"]["steps"], deps[n]["relearning"]["loss_rest"], marker="o", label=n)
    ax.set_xlabel("fine-tuning steps on the first half")
    ax.set_ylabel("loss on the second half")
    ax.legend(fontsize=8)
    _save_png(fig, out_dir / "relearning.png")
    plt.close(fig)
    return ["probes.png", "loss.png", "relearning.png"]


def write_report(result: dict, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = plots(result, out_dir)
    atomic.write_json(out_dir / "report.json", result)
    atomic.write_text(out_dir / "report.md", markdown(result))
    return {"json": str(out_dir / "report.json"), "markdown": str(out_dir / "report.md"), "plots": files}
