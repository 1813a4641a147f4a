"""The membership-inference audit of several deployments: every score of `membership` (LOSS, zlib, Min-K%,
Min-K%++) for the forgotten (members) and never-trained holdout (non-members) sources of each deployment, each
text in the deployment's mode for its source; the reference-calibrated attacks against the retrain oracle
(`ref_oracle_<score>`) and against a separately trained reference model (`ref_reference_<score>`); and per attack
the AUC, TPR at low FPR, bootstrap intervals and MUSE's PrivLeak against the oracle (`membership_summary`).

`small_holdout_spread` answers what a small holdout hides: the AUC over random subsets of `n` holdout sources
(the demo used 8 until this audit) spreads over a range the full holdout's interval does not show.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from nulls_dist.evaluation import membership as MI

BASE_SCORES = MI.SCORES
HEADLINE_ATTACKS = ("loss", "zlib", "min_k", "min_k_pp", "ref_oracle_loss", "ref_reference_loss")


def deployment_scores(dep, data, k: float, decode: Callable[[list[int]], str] | None) -> dict:
    """{"forget": {score: (m,)}, "holdout": {score: (n,)}} of one deployment (zlib needs `decode`)."""
    out = {}
    for side, ids in (("forget", data.forget_ids), ("holdout", data.holdout_ids)):
        ids = [s for s in ids if s in data.tokens]
        tokens = [data.tokens[s] for s in ids]
        texts = [decode(t.tolist()) for t in tokens] if decode is not None else None
        out[side] = MI.score_texts(dep.model, tokens, [dep.mode_for(s) for s in ids], texts, k) if ids else {}
    return out


def calibrated(scores: dict, reference: dict, prefix: str) -> dict:
    """{side: {f"{prefix}_{score}": target - reference}} on the same texts."""
    return {side: {f"{prefix}_{name[len('ref_'):]}": v
                   for name, v in MI.reference_calibrated(scores[side], reference[side]).items()}
            for side in ("forget", "holdout")}


def attacks_of(scores: dict, oracle: dict | None, reference: dict | None) -> dict:
    """Every attack's member / non-member values for one deployment: the raw scores plus the calibrated ones."""
    out = {side: dict(scores[side]) for side in ("forget", "holdout")}
    for prefix, ref in (("ref_oracle", oracle), ("ref_reference", reference)):
        if ref is not None:
            extra = calibrated(scores, ref, prefix)
            for side in out:
                out[side].update(extra[side])
    return out


def small_holdout_spread(members, non_members, n: int, num_subsets: int = 2000, seed: int = 0) -> dict:
    """AUC of `members` against random size-`n` subsets of `non_members` (without replacement): mean and the
    2.5% / 97.5% quantiles over `num_subsets` subsets, next to the AUC on all of them."""
    members, non_members = np.asarray(members, float), np.asarray(non_members, float)
    if len(non_members) <= n or len(members) == 0:
        return {"n": n, "num_non_members": int(len(non_members)), "auc_all": MI.auc(members, non_members)
                if len(members) and len(non_members) else float("nan"), "auc_subsets": None}
    rng = np.random.default_rng(seed)
    aucs = np.array([MI.auc(members, non_members[rng.choice(len(non_members), n, replace=False)])
                     for _ in range(num_subsets)])
    return {"n": n, "num_non_members": int(len(non_members)), "auc_all": MI.auc(members, non_members),
            "auc_subsets": [float(aucs.mean()), float(np.quantile(aucs, 0.025)), float(np.quantile(aucs, 0.975))],
            "auc_subsets_min_max": [float(aucs.min()), float(aucs.max())]}


def membership_audit(raw: dict[str, dict], oracle: str | None = "oracle", reference: dict | None = None,
                     retrain_of: Callable[[str], str | None] | None = None, fprs=(0.01, 0.05),
                     num_resamples: int = 1000, seed: int = 0, small_holdout: int | None = 8,
                     spread_attacks=("min_k", "ref_oracle_loss")) -> dict:
    """Summaries per deployment name from `raw` ({name: deployment_scores}); `reference` is the separately trained
    reference model's deployment_scores. `retrain_of(name)` names the oracle a deployment is compared with
    (default: `oracle`; e.g. `oracle@int4` for `unlearned@int4`)."""
    retrain_of = retrain_of or (lambda name: oracle)
    attacks = {}
    for name, scores in raw.items():
        if not scores["forget"] or not scores["holdout"]:
            continue
        ref_name = retrain_of(name)
        attacks[name] = attacks_of(scores, raw.get(ref_name) if ref_name else None, reference)
    out = {}
    for name, att in attacks.items():
        ref_name = retrain_of(name)
        retrain = attacks.get(ref_name) if ref_name else None
        summary = MI.membership_summary(att["forget"], att["holdout"],
                                        retrain["forget"] if retrain else None,
                                        retrain["holdout"] if retrain else None,
                                        fprs=fprs, num_resamples=num_resamples, seed=seed)
        res = {"attacks": summary, "retrain": ref_name if retrain else None}
        if small_holdout:
            res["small_holdout"] = {a: small_holdout_spread(att["forget"][a], att["holdout"][a], small_holdout, seed=seed)
                                    for a in spread_attacks if a in att["forget"]}
        out[name] = res
    return out
