"""The residue attribution's pictures (`evaluation/residue.attribute` results), each PNG written atomically
(`report_plots.save_png`); the audit report's residue section and the residue study (`bench/residue_plots`)
both draw them:
- `class_shares_png`: the share of the Min-K% and LOSS membership signal each token class carries;
- `token_gaps_png`: the per-token log-prob gap (deployment minus reference) along one forgotten text, title
  words in red, one row per labelled example."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from nulls_dist.evaluation.report_plots import pyplot, save_png

FAMILIES_SHOWN = ("name", "word_spread", "input_spread", "mention", "piece")
SCORE_LABELS = {"min_k": "Min-K% signal", "loss": "LOSS signal"}


def class_shares_png(residue: dict, path: Path, families: Sequence[str] = FAMILIES_SHOWN,
                     title: str = "Which tokens carry the membership signal (unlearned vs oracle, forgotten vs "
                                  "holdout)") -> str:
    """Bars of `share.min_k` and `share.loss` per class of each family in `families`; returns the file name."""
    plt = pyplot()
    fams = residue["families"]
    shown = [f for f in families if f in fams]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.0), sharey=True, squeeze=False)
    for ax, family in zip(axes[0], shown):
        names = list(fams[family])
        x = np.arange(len(names))
        for i, (score, colour) in enumerate((("min_k", "tab:red"), ("loss", "tab:blue"))):
            ax.bar(x + (i - 0.5) * 0.38, [fams[family][c]["share"][score] for c in names], 0.38, color=colour,
                   label=SCORE_LABELS[score])
        ax.set_xticks(x, names, rotation=30, fontsize=8)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(family, fontsize=9)
    axes[0, 0].set_ylabel("share of the signal")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10, y=1.04)
    return save_png(fig, Path(path))


def token_gaps_png(examples: Sequence[tuple[str, dict]], path: Path) -> str | None:
    """One bar row per (label, example); an example is {source_id, title, pieces (T-1,), gap (T-1,), name (T-1,)}
    with `name` the token's name class. The x labels are the first example's pieces. None when there is none."""
    if not examples:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(examples), 1, figsize=(14, 1.9 * len(examples)), sharex=True, squeeze=False)
    for ax, (label, ex) in zip(axes[:, 0], examples):
        gap = np.asarray(ex["gap"])
        colours = np.where(np.asarray(ex["name"]) == "title", "tab:red", "tab:grey")
        ax.bar(np.arange(len(gap)), gap, color=colours)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel(label, fontsize=8)
    ex = examples[0][1]
    axes[-1, 0].set_xticks(np.arange(len(ex["pieces"])), ex["pieces"], rotation=90, fontsize=6)
    axes[0, 0].set_title(f"log-prob gap per token (unlearned - oracle, nats) along forgotten article "
                         f"{ex['source_id']} ({ex['title']}); red: its title's words", fontsize=9)
    return save_png(fig, Path(path))
