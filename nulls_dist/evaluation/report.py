"""The unlearning audit report: `report.json` (every number), `report.md` (a plain-language section "What NULLs
do and do not remove" from the measured numbers, then one table per attack) and the PNG figures of
`report_plots`, each file written through a temporary name.

Other studies add their own sections without touching this module: `write_report(result, out, sections=[...])`
with `ReportSection`s (a key under `report.json`'s "sections", a markdown body, optional plots written by the
section itself with `report_plots.save_png`). `nulls-eval` adds two: the two-checkpoint comparison
(`--compare-before/--compare-after`: `checkpoint_diff.report_section`) and the residue attribution (`--residue`,
on with an oracle: `residue_audit.report_section`); "What NULLs do and do not remove" reads their numbers from
`result["sections"]` (`findings.py`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from nulls_dist.formats import atomic

from nulls_dist.evaluation.evaluate import PROBE_GROUPS
from nulls_dist.evaluation.findings import findings
from nulls_dist.evaluation.membership_audit import HEADLINE_ATTACKS
from nulls_dist.evaluation.report_plots import LOSS_GROUPS, all_plots


@dataclass
class ReportSection:
    """An extra section of the report (e.g. a checkpoint comparison or a residue study)."""

    key: str  # report.json: result["sections"][key] = data
    title: str
    markdown: str  # the body, under "## title"
    data: dict | None = None
    plots: Callable[[Path], list[str]] | None = None  # writes PNGs into the report directory, returns their names


def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _interval(values, digits: int = 3) -> str:
    mean, lo, hi = values
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _ci(values, digits: int = 2) -> str:
    lo, hi = values
    return f"[{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def _findings(result: dict) -> list[str]:
    lines = ["## What NULLs do and do not remove", "",
             "Each line is decided by the numbers below (rules in `nulls_dist/evaluation/findings.py`: 95% "
             "intervals against the retrain oracle).", ""]
    lines += [f"- **{f['topic']}: {f['verdict']}.** {f['text']}" for f in findings(result)]
    return lines + [""]


def _probes(result: dict) -> list[str]:
    deps = result["deployments"]
    lines = ["## Fact probes", "",
             "Truth Ratio (geometric mean over probes of mean P(distractor) / P(answer)): ~0 = fact known, "
             "~1 = answer no likelier than its distractors. Accuracy: the answer beats every distractor "
             f"(chance {_fmt(result.get('chance_accuracy'))}), Wilson 95% interval.", ""]
    rows = []
    for name, r in deps.items():
        cells = [name]
        for g in PROBE_GROUPS:
            p = r["probes"][g]
            cells.append(f"{_fmt(p['truth_ratio_gmean'])} | {_fmt(p['accuracy'])} {_ci(p['accuracy_ci95'])}")
        rows.append(cells)
    lines += _table(["deployment"] + [c for g in PROBE_GROUPS for c in (f"{g} TR", f"{g} acc")], rows)
    if any("probes_vs_oracle" in r for r in deps.values()):
        lines += ["", "Against the retrain oracle (paired bootstrap over the same probes, 95% interval; an interval "
                  "containing 0 = indistinguishable from the oracle on that group):", ""]
        rows = [[name] + [f"{_interval(r['probes_vs_oracle'][g]['accuracy_diff'])} | "
                          f"{_interval(r['probes_vs_oracle'][g]['log_truth_ratio_diff'])}" for g in PROBE_GROUPS]
                for name, r in deps.items() if name != "oracle" and "probes_vs_oracle" in r]
        lines += _table(["deployment"] + [c for g in PROBE_GROUPS for c in (f"{g} acc diff", f"{g} log-TR diff")],
                        rows)
    lines += ["", "## Text loss and extraction", ""]
    rows = [[name] + [_fmt(r["loss"][g]) for g in LOSS_GROUPS]
            + ([_fmt(r["verbatim"]["exact_match_len"]), _fmt(r["verbatim"]["rouge_l"])] if "verbatim" in r else
               ["n/a", "n/a"]) for name, r in deps.items()]
    lines += _table(["deployment"] + [f"{g} loss" for g in LOSS_GROUPS] + ["exact-match len", "ROUGE-L"], rows)
    return lines + ["", "![probes](probes.png)", "", "![loss](loss.png)", ""]


def _membership(result: dict) -> list[str]:
    deps = {n: r for n, r in result["deployments"].items() if r.get("membership", {}).get("attacks")}
    if not deps:
        return []
    first = next(iter(deps.values()))["membership"]["attacks"]
    any_attack = next(iter(first.values()))
    n_mem, n_non = any_attack["num_members"], any_attack["num_non_members"]
    attacks = [a for a in HEADLINE_ATTACKS if a in first]
    lines = ["## Membership inference (forgotten vs never-trained sources)", "",
             f"{n_mem} forgotten (members) vs {n_non} holdout (non-members) sources, each text in the deployment's "
             f"mode for its source. Scores: higher = more member-like; `ref_oracle_*` = score minus the retrain "
             f"oracle's on the same text, `ref_reference_*` = minus the separately trained reference's"
             f"{'' if result.get('reference') else ' (no --reference given)'}. AUC with a 95% bootstrap interval "
             f"(sources resampled, {result['config']['membership']['num_resamples']} times). The smallest resolvable "
             f"FPR is 1/{n_non} = {1 / n_non:.3f}: TPR at a lower FPR is the TPR at FPR 0 (marked *).", ""]
    rows = [[name] + [f"{_fmt(r['membership']['attacks'][a]['auc'], 2)} "
                      f"{_ci(r['membership']['attacks'][a]['auc_ci'])}" if a in r['membership']['attacks']
                      else "n/a" for a in attacks] for name, r in deps.items()]
    lines += _table(["deployment"] + [f"{a} AUC" for a in attacks], rows)
    lines += ["", "TPR at low FPR and MUSE PrivLeak (against the oracle; 0 = like the oracle, -100 = fully "
              "separable, > 0 = over-unlearning), per attack:", ""]
    rows = []
    for name, r in deps.items():
        for a in ("min_k", "ref_oracle_loss", "loss", "zlib", "min_k_pp"):
            s = r["membership"]["attacks"].get(a)
            if s is None:
                continue
            tpr = s["tpr_at_fpr"]
            cell = lambda k: f"{_fmt(tpr[k]['tpr'], 2)}{'' if tpr[k]['resolvable'] else '*'} {_ci(tpr[k]['tpr_ci'])}"  # noqa: E731
            rows.append([name, a, cell("0.01"), cell("0.05"),
                         f"{_fmt(s.get('priv_leak'), 1)} {_ci(s.get('priv_leak_ci', [None, None]), 1)}"])
    lines += _table(["deployment", "attack", "TPR @ 1% FPR", "TPR @ 5% FPR", "PrivLeak %"], rows)
    spread = [(n, a, v) for n, r in deps.items() for a, v in r["membership"].get("small_holdout", {}).items()
              if v.get("auc_subsets")]
    if spread:
        lines += ["", f"What a holdout of {spread[0][2]['n']} sources hides: the AUC against random subsets of "
                  f"{spread[0][2]['n']} of the {n_non} holdout sources (mean [2.5%, 97.5%], min - max over 2000 "
                  "subsets) next to the AUC against all of them.", ""]
        rows = [[n, a, _fmt(v["auc_all"], 2), f"{_fmt(v['auc_subsets'][0], 2)} {_ci(v['auc_subsets'][1:])}",
                 f"{_fmt(v['auc_subsets_min_max'][0], 2)} - {_fmt(v['auc_subsets_min_max'][1], 2)}"]
                for n, a, v in spread]
        lines += _table(["deployment", "attack", f"AUC, {n_non} holdout", f"AUC, {spread[0][2]['n']} holdout",
                         "range"], rows)
    return lines + ["", "![roc](roc.png)", ""]


def _worst_case(result: dict) -> list[str]:
    wc = result.get("worst_case")
    if not wc or not wc["deployments"]:
        return []
    lines = ["## Worst-case routing", "",
             "Each forgotten fact scored under every route the deployment offers (every surviving source's Sink-Off, "
             "backbone_only, expected; the oracle: its own trained sources). `routed`: what the deployment answers; "
             "`average route`; `most confident`: the answer-blind attacker's pick (the route whose top candidate is "
             "likeliest); `best route`: some route ranks the answer first (an attacker who knows the answer: an upper "
             "bound, high even for the oracle with hundreds of routes). Differences: paired bootstrap against the "
             "oracle over its own routes.", ""]
    rows = []
    for name, res in wc["deployments"].items():
        for g, v in res["groups"].items():
            s = v["summary"]
            vs = res.get("vs_oracle", {}).get(g)
            rows.append([name, g, str(s["num"]), str(res["num_routes"]), _fmt(s.get("routed_accuracy"), 2),
                         _fmt(s["mean_route_accuracy"], 2), _fmt(s["confident_accuracy"], 2),
                         f"{_fmt(s['any_correct'], 2)} {_ci(s['any_correct_ci95'])}", _fmt(s["best_truth_ratio_gmean"]),
                         *(_interval(vs[k], 2) if vs else "" for k in ("mean_route_accuracy_diff",
                                                                       "confident_accuracy_diff", "any_correct_diff")),
                         f"{res['seconds']:.0f} s"])
    lines += _table(["deployment", "group", "facts", "routes", "routed acc", "average route", "most confident",
                     "best route", "best TR", "average vs oracle", "most confident vs oracle", "best route vs oracle",
                     "time"], rows)
    return lines + ["", "![worst case](worst_case.png)", ""]


def _quantization(result: dict) -> list[str]:
    q = result.get("quantization")
    if not q:
        return []
    lines = ["## Quantization attack", "",
             f"Weights fake-quantized to int{'/int'.join(map(str, q['bits']))} (symmetric round-to-nearest, groups of "
             f"{q['group_size'] or 'a whole row'} columns; sink rows and embeddings per row: "
             "`evaluation/quantize.py`), probes and membership in the same modes. `vs oracle` = paired difference "
             "against the oracle quantized the same way.", ""]
    rows = []
    for name, r in q["deployments"].items():
        u = r["probes"]["unique_forget"]
        vs = r.get("probes_vs_oracle", {}).get("unique_forget")
        mk = r.get("membership", {}).get("attacks", {}).get("min_k", {})
        rows.append([name, f"{_fmt(u['accuracy'], 2)} / {_fmt(u['truth_ratio_gmean'])}",
                     _interval(vs["accuracy_diff"], 2) if vs and not name.startswith("oracle") else "",
                     _fmt(r["probes"]["shared_forget_via_retained"]["accuracy"], 2), _fmt(r["loss"]["retained"]),
                     _fmt(mk.get("auc"), 2), _fmt(mk.get("priv_leak"), 1)])
    lines += _table(["deployment", "unique (forgotten) acc / TR", "vs oracle", "shared via retained acc",
                     "retained loss", "Min-K AUC", "PrivLeak %"], rows)
    return lines + ["", "![quantization](quantization.png)", ""]


def _relearning(result: dict) -> list[str]:
    rl = result.get("relearning")
    if not rl:
        return []
    c = rl["config"]
    lines = ["## Relearning", "",
             f"Fine-tuning (AdamW, lr {c['lr']:g}, one {c['window']}-token window per step) of each deployment in its "
             f"own modes; measured: accuracy on the {rl['num_probes']} unique facts of the attacked forgotten articles "
             f"{rl['attacked_sources']}. Threshold {_fmt(rl['threshold'], 3)} = midway between the oracle "
             f"({_fmt(rl['level_oracle'], 3)}) and the original ({_fmt(rl['level_original'], 3)}) before fine-tuning. "
             "`forget_text`: the attacked articles' own text; `related_text`: only retained articles sharing a "
             f"fact with them ({len(rl['related_sources'])} articles).", ""]
    rows = []
    for cond, res in rl["conditions"].items():
        for name, run in res["deployments"].items():
            s = run["steps_to_threshold"]
            rows.append([cond, name, f"> {c['steps']}" if s is None else str(s),
                         " -> ".join(_fmt(a, 2) for a in run["accuracy"])])
    lines += _table(["attack", "deployment", "steps to threshold", f"accuracy at steps {c['eval_at']}"], rows)
    return lines + ["", "![relearning](relearning.png)", ""]


def _successive(result: dict) -> list[str]:
    succ = result.get("successive")
    if not succ:
        return []
    lines = ["## Successive requests", "",
             "The deployment after each forget request of the forget set's history (cumulative). Reference: "
             + ("a retrain oracle per request." if succ["oracle_per_stage"] else
                "the one oracle trained without the final forget set (valid for the forgotten articles' metrics: it "
                "never saw them; biased low on what the later requests' sources state, see "
                "`evaluation/successive.py`)."), ""]
    rows = []
    for st in succ["stages"]:
        u, o = st.get("unlearned", {}), st.get("oracle", {})
        diff = u.get("unique_forget_accuracy_diff_vs_oracle")
        rows.append([str(st["request"]), str(st["num_forgotten"]), _fmt(u.get("unique_forget_accuracy"), 2),
                     _fmt(o.get("unique_forget_accuracy"), 2), _interval(diff, 2) if diff else "",
                     _fmt(u.get("shared_forget_via_retained_accuracy"), 2), _fmt(u.get("unique_related_accuracy"), 2),
                     _fmt(u.get("loss_retained")), _fmt(u.get("auc_min_k"), 2), _fmt(o.get("auc_min_k"), 2),
                     _fmt(u.get("worst_case_confident_accuracy"), 2), str(u.get("relearn_forget_text_steps")),
                     str(o.get("relearn_forget_text_steps")), f"{st['survivor_capacity']:.2f}"])
    lines += _table(["request", "forgotten", "unique acc", "oracle", "diff vs oracle", "shared via retained",
                     "related unique", "retained loss", "Min-K AUC", "oracle Min-K AUC", "worst-case confident",
                     "relearn steps", "oracle relearn steps", "survivor sinks kept"], rows)
    return lines + ["", "![successive](successive.png)", ""]


def markdown(result: dict, sections: Sequence[ReportSection] = ()) -> str:
    secs = result.get("seconds", {})
    lines = ["# Unlearning audit", "",
             f"Forgotten sources: {len(result['forget_ids'])} {result['forget_ids']}; related retained sources: "
             f"{len(result['related_ids'])}; holdout sources: {result['num_holdout']}; probes: {result['num_probes']}"
             + (f"; not used: {result['probes_unused']}" if result.get("probes_unused") else "")
             + (f". Time per part (s): {', '.join(f'{k} {v:.0f}' for k, v in secs.items())}" if secs else "") + ".", ""]
    lines += _findings(result) + _probes(result) + _membership(result) + _worst_case(result) + _quantization(result)
    lines += _relearning(result) + _successive(result)
    for s in sections:
        lines += [f"## {s.title}", "", s.markdown, ""]
    return "\n".join(lines)


def write_report(result: dict, out_dir: str | Path, sections: Sequence[ReportSection] = ()) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = all_plots(result, out_dir, PROBE_GROUPS)
    for s in sections:
        if s.data is not None:
            result.setdefault("sections", {})[s.key] = s.data
        if s.plots is not None:
            files += s.plots(out_dir)
    atomic.write_json(out_dir / "report.json", result)
    atomic.write_text(out_dir / "report.md", markdown(result, sections))
    return {"json": str(out_dir / "report.json"), "markdown": str(out_dir / "report.md"), "plots": files}
