""""What NULLs do and do not remove": plain-language statements derived from an audit's measured numbers (the
`run_evaluation` result), one per question, each with a verdict the numbers decide -- never canned text.

Decision rules (95% intervals throughout):
- "at the oracle's level": the paired bootstrap interval of (deployment - oracle) contains 0; "above"/"below"
  when it lies entirely on one side;
- membership: an attack "still detects" the forgotten sources when its AUC interval lies above 0.5 (and the
  oracle's does not);
- extraction: within one token of the oracle's exact-match length;
- relearning: "no faster than the oracle" when the deployment needs at least as many steps to reach the
  threshold as the oracle (or neither reaches it);
- two checkpoints (the report's `checkpoint_diff` section): the pair "names the forget set" when ranking sources
  by the share of their sinks that changed gives AUC >= `NAMES_AUC`, and "restores the forgotten rows" when
  grafting the diff back into the after checkpoint gives the before checkpoint's sink tables bit for bit (the
  text gives the forgotten facts' accuracy before, after and grafted);
- the residue (the `residue` section): "concentrated" when a token class holding under
  `residue.CONCENTRATED_TOKEN_SHARE` of the forgotten tokens carries over half of the Min-K% signal;
  "none beyond the oracle's" when the signal is not positive.
"""
from __future__ import annotations

import math

from nulls_dist.evaluation import metrics as M
from nulls_dist.evaluation import residue as R

NAMES_AUC = 0.9
RESIDUE_FAMILIES = ("name", "word_spread", "token_spread", "input_spread", "mention", "piece", "position")


def _ok(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _side(interval) -> str:
    """'0' when [mean, lo, hi] contains 0, '+' / '-' when it lies above / below."""
    _, lo, hi = interval
    return "+" if lo > 0 else "-" if hi < 0 else "0"


def _fmt_ci(interval, digits: int = 2) -> str:
    mean, lo, hi = interval
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _level(side: str) -> str:
    return {"0": "at the retrain oracle's level", "+": "above the retrain oracle", "-": "below the retrain oracle"}[side]


def _probes_finding(deps: dict) -> list[dict]:
    out = []
    u, o, orig = deps.get("unlearned"), deps.get("oracle"), deps.get("original")
    if u and o and "probes_vs_oracle" in u and u["probes"]["unique_forget"]["num"]:
        vs = u["probes_vs_oracle"]["unique_forget"]["accuracy_diff"]
        side = _side(vs)
        acc = lambda d: d["probes"]["unique_forget"]["accuracy"]  # noqa: E731
        out.append({"topic": "unique facts of the forgotten sources", "verdict": "removed" if side != "+" else
                    "not removed", "text": f"accuracy {acc(orig):.2f} before -> {acc(u):.2f} unlearned, oracle "
                    f"{acc(o):.2f}: {_level(side)} (paired difference {_fmt_ci(vs)}, "
                    f"{u['probes']['unique_forget']['num']} facts)."})
    if u and orig and u["probes"]["shared_forget_via_retained"]["num"]:
        vs = M.compare_probes(u["probes"]["shared_forget_via_retained"],
                              orig["probes"]["shared_forget_via_retained"])["accuracy_diff"]
        side = _side(vs)
        a = lambda d: d["probes"]["shared_forget_via_retained"]["accuracy"]  # noqa: E731
        out.append({"topic": "facts the forgotten sources share with surviving ones", "verdict": "kept" if side != "-"
                    else "damaged", "text": f"asked about a surviving source that states them: accuracy {a(u):.2f} "
                    f"unlearned vs {a(orig):.2f} before (paired difference {_fmt_ci(vs)})."})
    if u and orig and u["probes"]["unique_related"]["num"]:
        vs = M.compare_probes(u["probes"]["unique_related"], orig["probes"]["unique_related"])["accuracy_diff"]
        out.append({"topic": "related surviving sources' own facts", "verdict": "kept" if _side(vs) != "-" else
                    "damaged", "text": f"accuracy {u['probes']['unique_related']['accuracy']:.2f} unlearned vs "
                    f"{orig['probes']['unique_related']['accuracy']:.2f} before (paired difference {_fmt_ci(vs)}); "
                    f"retained loss {orig['loss']['retained']:.3f} -> {u['loss']['retained']:.3f} nats/token."})
    return out


def _membership_finding(deps: dict) -> list[dict]:
    out = []
    u, o = deps.get("unlearned"), deps.get("oracle")
    if not (u and o and u.get("membership", {}).get("attacks")):
        return out
    att_u, att_o = u["membership"]["attacks"], o["membership"]["attacks"]
    detected = [a for a in att_u if att_u[a]["auc_ci"][0] > 0.5 and a in att_o
                and not att_o[a]["auc_ci"][0] > 0.5 and not a.startswith("ref_oracle")]
    best = max((a for a in att_u if not a.startswith("ref_oracle")), key=lambda a: att_u[a]["auc"])
    mk = att_u.get("min_k")
    text = (f"the strongest attack, {best}, has AUC {att_u[best]['auc']:.2f} [{att_u[best]['auc_ci'][0]:.2f}, "
            f"{att_u[best]['auc_ci'][1]:.2f}] on the unlearned model vs {att_o[best]['auc']:.2f} on the oracle "
            f"({att_u[best]['num_members']} forgotten vs {att_u[best]['num_non_members']} never-trained sources)")
    if mk is not None and _ok(mk.get("priv_leak")):
        text += f"; MUSE PrivLeak (Min-K%) {mk['priv_leak']:+.1f}% (0 = like the oracle, -100 = fully separable)"
    if "ref_oracle_loss" in att_u:
        r = att_u["ref_oracle_loss"]
        text += (f"; calibrated by the oracle (ref_oracle_loss) AUC {r['auc']:.2f} [{r['auc_ci'][0]:.2f}, "
                 f"{r['auc_ci'][1]:.2f}], TPR at 5% FPR {r['tpr_at_fpr']['0.05']['tpr']:.2f}")
    verdict = "not removed" if detected else "removed"
    reason = (" The text stays detectable as trained on: the embeddings, attention and LM head are shared by every "
              "mode and were trained on it; NULLs isolate only the MLP's sinks.") if detected else ""
    out.append({"topic": "membership of the forgotten text", "verdict": verdict,
                "text": text + f". Attacks that still detect it (AUC interval above 0.5, the oracle's not): "
                        f"{', '.join(detected) if detected else 'none'}." + reason})
    return out


def _worst_case_finding(wc: dict | None) -> list[dict]:
    if not wc or "unlearned" not in wc["deployments"] or "oracle" not in wc["deployments"]:
        return []
    g = "unique_forget"
    u, o = wc["deployments"]["unlearned"], wc["deployments"]["oracle"]
    if g not in u["groups"] or not u["groups"][g]["summary"]["num"]:
        return []
    su, so, vs = u["groups"][g]["summary"], o["groups"][g]["summary"], u["vs_oracle"][g]
    blind = _side(vs["confident_accuracy_diff"])
    knowing = "+" in (_side(vs["any_correct_diff"]), _side(vs["mean_route_accuracy_diff"]))
    verdict = ("not removed" if blind == "+" else
               "partly: at the oracle's level for an attacker who cannot check answers, above it for one who can"
               if knowing else "removed")
    return [{"topic": "worst-case routing (the attacker picks the route)", "verdict": verdict,
             "text": f"over all {u['num_routes']} routes (every surviving source, backbone_only, expected): the "
             f"answer-blind attacker's most confident route answers {su['confident_accuracy']:.2f} of the forgotten "
             f"unique facts (oracle over its routes {so['confident_accuracy']:.2f}, difference "
             f"{_fmt_ci(vs['confident_accuracy_diff'])}); the average route {su['mean_route_accuracy']:.2f} (oracle "
             f"{so['mean_route_accuracy']:.2f}, {_fmt_ci(vs['mean_route_accuracy_diff'])}); some route ranks the answer "
             f"first for {su['any_correct']:.2f} (oracle {so['any_correct']:.2f}, {_fmt_ci(vs['any_correct_diff'])}); "
             f"best Truth Ratio {su['best_truth_ratio_gmean']:.3f} vs {so['best_truth_ratio_gmean']:.3f}. Routes hold "
             "what the shared parameters keep of the forgotten text, not the forgotten sinks (no route reaches them)."}]


def _quantization_finding(q: dict | None) -> list[dict]:
    if not q:
        return []
    deps, out = q["deployments"], []
    for bits in q["bits"]:
        u, o = deps.get(f"unlearned@int{bits}"), deps.get(f"oracle@int{bits}")
        if not (u and o and "probes_vs_oracle" in u):
            continue
        vs = u["probes_vs_oracle"]["unique_forget"]["accuracy_diff"]
        side = _side(vs)
        text = (f"int{bits}: forgotten unique-fact accuracy {u['probes']['unique_forget']['accuracy']:.2f} vs the "
                f"oracle at int{bits} {o['probes']['unique_forget']['accuracy']:.2f} ({_level(side)}, {_fmt_ci(vs)})")
        for base in ("ga", "npo"):
            b = deps.get(f"{base}@int{bits}")
            if b:
                text += f"; {base.upper()} at int{bits} {b['probes']['unique_forget']['accuracy']:.2f}"
        out.append({"topic": f"quantization attack, int{bits}", "verdict": "removed" if side != "+" else
                    "not removed", "text": text + "."})
    return out


def _relearning_finding(rl: dict | None) -> list[dict]:
    if not rl or not _ok(rl.get("threshold")):
        return []
    out = []
    for cond, res in rl["conditions"].items():
        runs = res["deployments"]
        if "unlearned" not in runs or "oracle" not in runs:
            continue
        if not res.get("num_tokens"):  # e.g. no retained article is related to the attacked ones
            out.append({"topic": f"relearning on {cond.replace('_', ' ')}", "verdict": "not measured",
                        "text": "no text to fine-tune on (0 tokens): nothing was attacked."})
            continue
        steps = {n: r["steps_to_threshold"] for n, r in runs.items()}
        inf = float("inf")
        su, so = (inf if steps[n] is None else steps[n] for n in ("unlearned", "oracle"))
        fmt = lambda s: f"> {rl['config']['steps']}" if s is None else str(s)  # noqa: E731
        others = ", ".join(f"{n.upper()} {fmt(steps[n])}" for n in runs if n not in ("unlearned", "oracle", "hard"))
        out.append({"topic": f"relearning on {cond.replace('_', ' ')}", "verdict": "removed" if su >= so else
                    "not removed", "text": f"steps to threshold (accuracy {rl['threshold']:.2f}, midway between "
                    f"oracle {rl['level_oracle']:.2f} and original {rl['level_original']:.2f}): unlearned "
                    f"{fmt(steps['unlearned'])}, oracle {fmt(steps['oracle'])}" + (f", {others}" if others else "")
                    + f" ({rl['num_probes']} facts of {len(rl['attacked_sources'])} articles, {res['num_tokens']} "
                    f"tokens of text)."})
    return out


def _weights_finding(deps: dict) -> list[dict]:
    hard, o = deps.get("hard_sinks_on"), deps.get("oracle")
    orig = deps.get("original")
    text = ("mask unlearning changes no weight: whoever holds the checkpoint re-enables the forgotten sinks and gets "
            "the original model back" + (f" (unique-fact accuracy {orig['probes']['unique_forget']['accuracy']:.2f})"
                                         if orig else ""))
    verdict = "not removed (mask)"
    if hard and o and "probes_vs_oracle" in hard:
        vs = hard["probes_vs_oracle"]["unique_forget"]["accuracy_diff"]
        text += (f"; from the hard checkpoint, re-enabling the zeroed sinks gives "
                 f"{hard['probes']['unique_forget']['accuracy']:.2f} ({_level(_side(vs))}, {_fmt_ci(vs)})")
        verdict += ", removed (hard)" if _side(vs) != "+" else ", not removed (hard)"
    return [{"topic": "the stored weights", "verdict": verdict, "text": text + "."}]


def _extraction_finding(deps: dict) -> list[dict]:
    u, o, orig = deps.get("unlearned"), deps.get("oracle"), deps.get("original")
    if not (u and o and orig and "verbatim" in u):
        return []
    em = lambda d: d["verbatim"]["exact_match_len"]  # noqa: E731
    return [{"topic": "verbatim extraction", "verdict": "removed" if em(u) <= em(o) + 1.0 else "not removed",
             "text": f"greedy continuations of forgotten text match {em(orig):.1f} tokens before, {em(u):.1f} "
                     f"unlearned, {em(o):.1f} oracle (rule: within one token of the oracle)."}]


def _successive_finding(succ: dict | None) -> list[dict]:
    if not succ or not succ.get("stages"):
        return []
    parts, bad = [], []
    for st in succ["stages"]:
        u = st.get("unlearned", {})
        diff = u.get("unique_forget_accuracy_diff_vs_oracle")
        parts.append(f"after request {st['request']} ({st['num_forgotten']} forgotten): unique {u.get('unique_forget_accuracy', float('nan')):.2f} "
                     f"vs oracle {st.get('oracle', {}).get('unique_forget_accuracy', float('nan')):.2f}, retained loss "
                     f"{u.get('loss_retained', float('nan')):.3f}, survivors keep {st['survivor_capacity']:.0%} of their sinks")
        if diff is not None and _side(diff) == "+":
            bad.append(st["request"])
    return [{"topic": "successive requests", "verdict": "removed at every request" if not bad else
             f"not removed at request(s) {bad}", "text": "; ".join(parts) + "."}]


def _comparison_finding(diff: dict | None) -> list[dict]:
    if not diff or not {"rows", "identification"} <= set(diff):  # another study's section under the same key
        return []
    rows, ident = diff["rows"], diff["identification"]["diff"]
    pair = f"`{diff['before']['path']}` and `{diff['after']['path']}`"
    if rows["changed_total"] == 0 and not rows["other_elements_changed"]:
        return [{"topic": "two checkpoints (before and after)", "verdict": "nothing beyond either checkpoint",
                 "text": f"{pair} hold the same weights (the mask method): the forgotten rows are in both."}]
    auc = ident.get("auc")
    names = auc is not None and not math.isnan(auc) and auc >= NAMES_AUC
    text = (f"an attacker holding {pair} sees {rows['changed_total']} changed sink rows"
            + (f" ({'exactly' if rows['exact'] else 'not exactly'} the forget set's {rows['forgotten_total']})"
               if "exact" in rows else "")
            + (f" and ranks the forget set with AUC {auc:.3f} (precision at |F| "
               f"{ident['precision_at_num_forgotten']:.2f}); the after checkpoint alone with AUC "
               f"{diff['identification']['after_only']['auc']:.3f}" if auc is not None else ""))
    verdict = "names the forget set" if names else "does not name the forget set"
    k = diff.get("knowledge")
    if k:
        acc = {n: v["accuracy"] for n, v in k["sink_on_unique_forget"].items()}
        text += (f"; grafting the diff back into the after checkpoint answers {acc['after_with_diff_grafted']:.2f} "
                 f"of the forgotten unique facts Sink-On (before {acc['before']:.2f}, after {acc['after']:.2f})")
        verdict += (" and restores the forgotten rows" if k["grafted_equals_before"] else
                    ", does not restore the forgotten rows")
    return [{"topic": "two checkpoints (before and after)", "verdict": verdict,
             "text": text + ". Whoever keeps the before checkpoint keeps what was forgotten."}]


def _residue_finding(res: dict | None) -> list[dict]:
    if not res or not {"auc", "signal", "families"} <= set(res):  # another study's section under the same key
        return []
    auc_u, auc_o, signal = res["auc"]["model"]["min_k"], res["auc"]["reference"]["min_k"], res["signal"]["min_k"]
    text = (f"Min-K% AUC {auc_u:.2f} on the {res['deployment']} deployment vs {auc_o:.2f} on the {res['reference']}, "
            f"signal {signal:+.3f} nats (LOSS {res['signal']['loss']:+.3f})")
    if not signal > 0:
        return [{"topic": "where the membership residue lives", "verdict": "none beyond the oracle's",
                 "text": text + "."}]
    candidates = []
    for family in RESIDUE_FAMILIES:
        for cls, r in res["families"].get(family, {}).items():
            fraction = R.token_fraction(res, family, cls)
            if fraction < R.CONCENTRATED_TOKEN_SHARE and r["share"]["min_k"] > 0.5:
                candidates.append((r["share"]["min_k"], family, cls, fraction, r))
    tops = [(f, R.strongest(res, f)) for f in ("name", "word_spread", "input_spread")]
    text += "; largest share per family: " + "; ".join(
        f"{f} `{c}` {r['share']['min_k']:.2f} of the Min-K% signal on {R.token_fraction(res, f, c):.2f} "
        f"of the tokens (Min-K AUC without it {r['auc_without']['min_k']:.2f})" for f, top in tops if top
        for c, r in [top])
    if candidates:
        share, family, cls, fraction, r = max(candidates, key=lambda c: c[0])
        verdict = f"concentrated in {family} `{cls}` tokens"
        text += (f". {fraction:.0%} of the forgotten tokens ({family} `{cls}`) carry {share:.0%} of it; with the "
                 f"oracle's log-probs on them the Min-K% AUC is {r['auc_without']['min_k']:.2f}")
    else:
        verdict = "spread over the text"
    return [{"topic": "where the membership residue lives", "verdict": verdict, "text": text + "."}]


def findings(result: dict) -> list[dict]:
    """[{topic, verdict, text}] from an audit result (empty topics are left out); the report's extra sections
    (`result["sections"]`: the two-checkpoint comparison, the residue) add theirs."""
    deps, sections = result["deployments"], result.get("sections") or {}
    return (_probes_finding(deps) + _weights_finding(deps) + _comparison_finding(sections.get("checkpoint_diff"))
            + _extraction_finding(deps) + _membership_finding(deps) + _residue_finding(sections.get("residue"))
            + _worst_case_finding(result.get("worst_case")) + _quantization_finding(result.get("quantization"))
            + _relearning_finding(result.get("relearning")) + _successive_finding(result.get("successive")))
