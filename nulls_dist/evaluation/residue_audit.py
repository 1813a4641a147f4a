"""The residue attribution as a section of the audit report (`nulls-eval --residue`): where the membership signal
that still separates the forgotten texts from never-trained ones lives, token by token, in the unlearned
deployment against the retrain oracle (`evaluation/residue.py` holds the attribution itself).

`measure_residue` scores every forgotten and holdout text token by token in the deployments' own modes (the
unlearned deployment: routed Sink-Off with the forget set in force; the oracle: routed over its own trained
sources; the original, for the share the sinks held: Sink-On on the forgotten source), classes the tokens with a
`CorpusIndex` over the oracle's training texts, and attributes the LOSS and Min-K% gap. `report_section` renders
it: `sections.residue` in report.json, a table of every token class, `residue_classes.png` (the shares) and
`residue_token_gaps.png` (one forgotten article token by token)."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from nulls_dist.evaluation import metrics as M
from nulls_dist.evaluation import residue as R
from nulls_dist.evaluation.report import ReportSection
from nulls_dist.evaluation.residue_plots import class_shares_png, token_gaps_png

log = logging.getLogger(__name__)

SECTION_KEY = "residue"  # report.json: sections.residue
TITLE = "Where the membership residue lives"
CLASSES_PNG = "residue_classes.png"
GAPS_PNG = "residue_token_gaps.png"


def measure_residue(unlearned, oracle, original, data, corpus: R.CorpusIndex, k: float) -> dict[str, Any]:
    """The attribution (`residue.attribute`) of `data`'s forgotten vs holdout texts, unlearned vs oracle (each a
    `evaluate.Deployment`; `original` may be None: then no sink share), plus one forgotten text token by token
    and the seconds it took. JSON-ready (`attribute` returns Python numbers)."""
    started = time.perf_counter()
    members = [s for s in data.forget_ids if s in data.tokens]
    non_members = [s for s in data.holdout_ids if s in data.tokens]
    if not members or not non_members:
        raise ValueError(f"--residue needs forgotten and holdout texts in the dataset, found {len(members)} and "
                         f"{len(non_members)}")
    log.info("residue: %d forgotten and %d holdout texts, token by token", len(members), len(non_members))

    def logprobs(dep, ids):
        return {s: M.token_logprobs(dep.model, data.tokens[s], dep.mode_for(s)) for s in ids}  # (T-1,) each

    lp_unlearned, lp_oracle = logprobs(unlearned, members + non_members), logprobs(oracle, members + non_members)
    lp_original = logprobs(original, members) if original is not None else None
    texts_m = R.text_residues(lp_unlearned, lp_oracle, data.tokens, data.titles, corpus, members, lp_original)
    texts_n = R.text_residues(lp_unlearned, lp_oracle, data.tokens, data.titles, corpus, non_members)
    attribution = R.attribute(texts_m, texts_n, k=k)
    first = texts_m[0]
    example = {"source_id": first.source_id, "title": data.titles[first.source_id],
               "pieces": [corpus.pieces[int(t)] for t in data.tokens[first.source_id][1:]],
               "gap": np.round(first.lp_model - first.lp_reference, 3).tolist(), "name": first.classes["name"].tolist()}
    num_tokens = int(sum(len(t.lp_model) for t in texts_m))
    return {**attribution, "deployment": unlearned.name, "reference": oracle.name, "num_member_tokens": num_tokens,
            "num_corpus_texts": corpus.num_texts, "example": example, "seconds": time.perf_counter() - started}


def _f(x, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_body(res: dict) -> str:
    auc_u, auc_o = res["auc"]["model"], res["auc"]["reference"]
    lines = [f"Token-level attribution (`evaluation/residue.py`) of the membership signal that separates the "
             f"{res['num_members']} forgotten texts (members) from the {res['num_non_members']} never-trained holdout "
             f"texts, in the `{res['deployment']}` deployment against the `{res['reference']}`: per token the gap "
             f"lp_{res['deployment']} - lp_{res['reference']}; the signal is the difference in differences of the "
             f"text scores, members minus non-members (0: the deployment separates them exactly as the oracle does). "
             f"LOSS and Min-K% (k = {res['k']:g}) decompose exactly over tokens, so each class of a family gets a "
             "share, the shares of a family adding up to 1 (a negative share: those tokens look less member-like "
             "than in the oracle). `Min-K AUC without`: the AUC after splicing the oracle's log-probs into the "
             "class's tokens (what if this class carried no residue); `only`: into every other token. `sinks "
             "held`: the part of the original model's advantage over the oracle on the class's forgotten tokens "
             f"that unlearning removed. Token classes from {res['num_corpus_texts']} retained texts.", "",
             f"AUC forgotten vs holdout: Min-K% {_f(auc_u['min_k'])} ({res['reference']} {_f(auc_o['min_k'])}), "
             f"LOSS {_f(auc_u['loss'])} ({_f(auc_o['loss'])}); signal: Min-K% {_f(res['signal']['min_k'], 3)}, "
             f"LOSS {_f(res['signal']['loss'], 3)} nats. Measured in {res['seconds']:.1f} s"
             + (f" (+ {res['seconds_corpus_index']:.1f} s for the token classes' corpus index)"
                if "seconds_corpus_index" in res else "") + ".", ""]
    tops = [(f, R.strongest(res, f)) for f in ("name", "word_spread", "input_spread", "mention", "piece")]
    parts = [f"{f}: `{c}` ({_f(r['share']['min_k'])} of the Min-K% signal on {_f(R.token_fraction(res, f, c))} of "
             f"the forgotten tokens)" for f, top in tops if top for c, r in [top]]
    if parts:
        lines += ["Largest share per family: " + "; ".join(parts) + ".", ""]
    lines += ["| family | class | forgotten tokens | mean gap, forgotten | mean gap, holdout | LOSS share | "
              "Min-K share | Min-K AUC without | Min-K AUC only | sinks held |", "|---" * 10 + "|"]
    for family, rows in res["families"].items():
        for cls, r in rows.items():
            lines.append(f"| {family} | {cls} | {r['num_tokens_members']} | {_f(r['mean_gap_members'], 3)} | "
                         f"{_f(r['mean_gap_non_members'], 3)} | {_f(r['share']['loss'])} | {_f(r['share']['min_k'])} "
                         f"| {_f(r['auc_without']['min_k'])} | {_f(r['auc_only']['min_k'])} | "
                         f"{_f(r.get('sink_share_members'))} |")
    lines += ["", f"![the shares of the signal]({CLASSES_PNG})", "", f"![one forgotten article]({GAPS_PNG})"]
    return "\n".join(lines)


def _plots(res: dict, out_dir) -> list[str]:
    out_dir = Path(out_dir)
    files = [class_shares_png(res, out_dir / CLASSES_PNG)]
    gaps = token_gaps_png([(res["deployment"], res["example"])], out_dir / GAPS_PNG)
    return files + ([gaps] if gaps else [])


def report_section(res: dict) -> ReportSection:
    """`measure_residue`'s result as a section of the evaluation report."""
    return ReportSection(SECTION_KEY, TITLE, markdown_body(res), res, lambda out_dir: _plots(res, out_dir))
