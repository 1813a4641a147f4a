"""Successive forget requests on one deployment (MUSE's "sustainability"): a forget set is cumulative, each
`nulls-unlearn` request appending its sources and the resulting hash to `history` (formats/forget_set.py), so
one forget-set document holds every state the deployment went through. `stages` replays that history;
`stage_summary` condenses each stage's audit into the per-request curves of the report.

The reference for each stage is the retrain oracle without that stage's forgotten sources. Training one per
stage is what `--full` does; by default every stage is compared with the one oracle trained without the final
(largest) forget set. For the metrics of the forgotten articles that oracle is a valid retrain-without: it never
saw them (nor the holdout), and whatever else it lacks -- the sources forgotten at later requests -- reaches
those metrics only through what the later sources share with them and through general language-model quality.
It is biased where the stage's deployment still knows the later sources: their facts, and the shared and related
facts they state (its `shared_forget_via_retained` / `unique_related` levels are lower than a per-stage oracle's
when later sources state them), and its retained utility is that of a model trained on less data. The report
names the oracle each stage used.
"""
from __future__ import annotations

import math

import numpy as np

from nulls_dist.formats.forget_set import forget_set_hash


def stages(doc: dict) -> list[dict]:
    """The forget-set states after each request of a (checked) forget-set document, oldest first:
    [{"request": i, "added": [...], "source_ids": [cumulative], "sha256", "time_utc", "method"}]."""
    out, ids = [], set()
    for i, entry in enumerate(doc["history"]):
        ids |= {int(s) for s in entry.get("added", [])}
        digest = forget_set_hash(ids, doc["checkpoint_sha256"], doc["manifest_sha256"])
        if digest != entry.get("sha256"):  # load_forget_set checked this already; a caller may pass a raw dict
            raise ValueError(f"forget set history[{i}] does not recompute")
        out.append({"request": i + 1, "added": sorted(int(s) for s in entry.get("added", [])),
                    "source_ids": sorted(ids), "sha256": digest, "time_utc": entry.get("time_utc"),
                    "method": entry.get("method")})
    return out


def _get(d: dict | None, *keys, default=float("nan")):
    for k in keys:
        if not isinstance(d, dict) or k not in d or d[k] is None:
            return default
        d = d[k]
    return d


def stage_summary(result: dict, deployment: str = "unlearned", oracle: str = "oracle") -> dict:
    """The per-request numbers of one stage's audit (`run_evaluation` output) for the curves."""
    deps = result["deployments"]
    out = {"num_forgotten": len(result["forget_ids"])}
    for name in (deployment, oracle, "original"):
        d = deps.get(name)
        if d is None:
            continue
        row = {f"{g}_accuracy": _get(d, "probes", g, "accuracy") for g in
               ("unique_forget", "shared_forget", "shared_forget_via_retained", "unique_related", "unique_retained")}
        row |= {f"loss_{g}": _get(d, "loss", g) for g in ("forget", "retained", "holdout")}
        row["unique_forget_truth_ratio"] = _get(d, "probes", "unique_forget", "truth_ratio_gmean")
        for attack in ("min_k", "ref_oracle_loss", "loss"):
            row[f"auc_{attack}"] = _get(d, "membership", "attacks", attack, "auc")
        row["priv_leak_min_k"] = _get(d, "membership", "attacks", "min_k", "priv_leak")
        row["exact_match_len"] = _get(d, "verbatim", "exact_match_len")
        wc = _get(result, "worst_case", "deployments", name, "groups", "unique_forget", "summary", default=None)
        if wc:
            row["worst_case_any_correct"] = wc["any_correct"]
            row["worst_case_confident_accuracy"] = wc["confident_accuracy"]
        rl = _get(result, "relearning", "conditions", default=None)
        if rl:
            for cond, res in rl.items():
                s = _get(res, "deployments", name, "steps_to_threshold", default=None)
                row[f"relearn_{cond}_steps"] = s
        vs = _get(d, "probes_vs_oracle", "unique_forget", "accuracy_diff", default=None)
        if vs is not None and name != oracle:
            row["unique_forget_accuracy_diff_vs_oracle"] = vs
        out[name] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    return out


def survivor_capacity(model, survivors, forget_ids) -> float:
    """Mean fraction of its sink rows a surviving source keeps under the forget set (layer 0; the forget budget
    of docs/nulls_facts.md: about exp(-F k / P) after F forgets)."""
    assignment = model.sink_assignment
    if assignment is None or not len(survivors):
        return float("nan")
    import torch

    rows = assignment.rows(torch.as_tensor(np.asarray(survivors, dtype=np.int64))).numpy()  # (S, K)
    gone = assignment.rows(torch.as_tensor(np.asarray(sorted(forget_ids), dtype=np.int64))).numpy() \
        if len(forget_ids) else np.zeros((0, 1), np.int64)
    kept = (rows >= 0) & ~np.isin(rows, gone[gone >= 0])
    return float((kept.sum(1) / np.maximum((rows >= 0).sum(1), 1)).mean())
