"""The unlearning report: `report.json` (every number), `report.md` (tables) and PNG plots (fact probes, text
losses, relearning curves), each file written through a temporary name."""
from __future__ import annotations

import math
import os
from pathlib import Path

from nulls_dist.unlearn.checkpoint_io import write_json_atomic

PROBE_GROUPS = ("unique_forget", "shared_forget", "shared_forget_via_retained", "unique_related")
LOSS_GROUPS = ("forget", "related", "retained", "holdout")


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def markdown(result: dict) -> str:
    deps = result["deployments"]
    lines = ["# Unlearning report", "",
             f"Forgotten sources: {result['forget_ids']}; related retained sources: {len(result['related_ids'])}; "
             f"holdout sources: {result['num_holdout']}; probes: {result['num_probes']}.", "",
             "## Fact probes (Truth Ratio: lower = fact known; accuracy: answer beats its distractors)", "",
             "| deployment | " + " | ".join(f"{g} TR | {g} acc" for g in PROBE_GROUPS) + " |",
             "|---" * (1 + 2 * len(PROBE_GROUPS)) + "|"]
    for name, r in deps.items():
        cells = [f"{_fmt(r['probes'][g]['truth_ratio'])} | {_fmt(r['probes'][g]['accuracy'])}" for g in PROBE_GROUPS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
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
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)


def plots(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    deps = result["deployments"]
    names = list(deps)
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, metric in zip(axes, ("truth_ratio", "accuracy")):
        width = 0.8 / len(PROBE_GROUPS)
        for i, group in enumerate(PROBE_GROUPS):
            ax.bar(x + (i - (len(PROBE_GROUPS) - 1) / 2) * width, [deps[n]["probes"][group][metric] for n in names],
                   width, label=group)
        ax.set_xticks(x, names, rotation=20)
        ax.set_title(metric.replace("_", " ") + (" (log)" if metric == "truth_ratio" else ""))
        if metric == "truth_ratio":
            ax.set_yscale("log")  # known facts ~0.01, unknown ones up to ~1e5
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
    write_json_atomic(out_dir / "report.json", result)
    tmp = out_dir / f".report.md.tmp-{os.getpid()}"
    tmp.write_text(markdown(result))
    os.replace(tmp, out_dir / "report.md")
    return {"json": str(out_dir / "report.json"), "markdown": str(out_dir / "report.md"), "plots": files}
