"""The measurements of the forget-budget study (docs/forget_budget.md), one model and one cumulative forget set
at a time:

- `retained_step`: the retained articles' unique facts (cloze probes: accuracy, Truth Ratio) and text loss in
  Sink-Off routed to the article itself, i.e. its own sinks minus the union of the forgotten sources' sinks:
  what the forget set leaves a survivor. Routing by the gold source (not by title embedding) keeps routing
  errors out of the capacity measurement; with no forget set it is Sink-On. `against_before` compares a step
  with the step before any forget on the same probes (paired bootstrap) and the same texts.
- `forgotten_step`: the forgotten articles' unique facts in each deployment of `evaluate.py` (the original in
  Sink-On, the unlearned model and the retrain oracle routed to the nearest surviving source by title), with
  the paired difference to the oracle (`metrics.compare_probes`);
- `dose_response`: the retained facts binned by each article's own retained share of its sinks (from the
  model's sink assignment), pooled over the steps: what a given share costs, whichever pool produced it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from nulls_dist.evaluation import metrics as M
from nulls_dist.forget_budget import retained_shares
from nulls_dist.evaluation.evaluate import Deployment
from nulls_dist.model import SinkMode


@dataclass
class StudyData:
    probes: list[dict]
    tokens: dict[int, np.ndarray]  # source id -> its trained tokens (BOS ... EOS)
    encode: Callable[[str], list[int]]
    bos_id: int | None


def unique_probes(probes: list[dict], source_ids) -> list[tuple[dict, int]]:
    """(probe, its article) for every unique-fact probe of the given articles, in probe order."""
    wanted = {int(s) for s in source_ids}
    return [(p, int(p["source_ids"][0])) for p in probes if p["kind"] == "unique" and int(p["source_ids"][0]) in wanted]


def _probe_summary(model, items: list[tuple[dict, int]], mode_for: Callable[[int], SinkMode], data: StudyData) -> dict:
    return M.summarise_probes([M.score_probe(model, p, mode_for(sid), data.encode, data.bos_id) for p, sid in items])


def retained_step(model, data: StudyData, retained_ids: list[int], forget_ids: list[int]) -> dict:
    """Unique-fact probes and per-article text loss of `retained_ids` with `forget_ids` forgotten (mask)."""
    forget = tuple(sorted(int(s) for s in forget_ids))
    mode_for = lambda sid: SinkMode.sink_off(sid, forget)  # noqa: E731  own sinks minus the forgotten union
    losses = {int(s): M.text_loss(model, data.tokens[s], mode_for(s)) for s in retained_ids if s in data.tokens}
    return {"num_forgotten": len(forget), "probes": _probe_summary(model, unique_probes(data.probes, retained_ids),
                                                                    mode_for, data),
            "loss": float(np.mean(list(losses.values()))) if losses else float("nan"),
            "loss_per_article": {str(k): v for k, v in losses.items()}}


def against_before(step: dict, before: dict) -> dict:
    """A retained step against the step before any forget: accuracy ratio and paired difference, loss change."""
    acc, acc0 = step["probes"]["accuracy"], before["probes"]["accuracy"]
    common = sorted(set(step["loss_per_article"]) & set(before["loss_per_article"]))
    delta = [step["loss_per_article"][k] - before["loss_per_article"][k] for k in common]
    return {"accuracy_ratio": acc / acc0 if acc0 else float("nan"),
            "accuracy_diff": M.compare_probes(step["probes"], before["probes"])["accuracy_diff"],
            "loss_diff": M.paired_bootstrap(np.asarray(delta), np.zeros(len(delta))) if delta else [float("nan")] * 3,
            "loss_ratio": step["loss"] / before["loss"] if before["loss"] else float("nan")}


def forgotten_step(deployments: list[Deployment], data: StudyData, forget_ids: list[int]) -> dict:
    """The forgotten articles' unique facts in every deployment; `probes_vs_oracle` when one is named oracle."""
    items = unique_probes(data.probes, forget_ids)
    out = {d.name: {"probes": _probe_summary(d.model, items, d.mode_for, data)} for d in deployments}
    if "oracle" in out:
        for name, res in out.items():
            if name != "oracle":
                res["probes_vs_oracle"] = M.compare_probes(res["probes"], out["oracle"]["probes"])
    return {"num_forgotten": len(forget_ids), "num_probes": len(items),
            "chance_accuracy": float(np.mean([1 / (1 + len(p["distractors"])) for p, _ in items])) if items
            else float("nan"), "deployments": out}


SHARE_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.0)  # bins of an article's retained share; 1.0 = untouched


def article_shares(assignment, article_ids: list[int], forget_ids: list[int], num_layers: int,
                   layer_specific: bool) -> dict[int, float]:
    """Each article's retained share of its sink rows (summed over layers) with `forget_ids` forgotten."""
    import torch

    layers = range(num_layers) if layer_specific else range(1)
    ids = torch.tensor(article_ids, dtype=torch.int64)
    gone = torch.tensor(forget_ids, dtype=torch.int64)
    sinks = np.stack([assignment.rows(ids, layer).numpy() for layer in layers], axis=1)  # (S, L', K)
    union = np.zeros((len(layers), assignment.cfg.pool_size), dtype=bool)  # (L', P)
    for i, layer in enumerate(layers):
        rows = assignment.rows(gone, layer).numpy() if len(forget_ids) else np.zeros((0, 1), np.int64)
        union[i, rows[rows >= 0]] = True
    shares, _ = retained_shares(sinks, union)
    return {int(s): float(v) for s, v in zip(article_ids, shares)}


def dose_response(steps: list[tuple[dict, dict[int, float]]], before: dict, probes: list[dict]) -> list[dict]:
    """Retained-fact accuracy by the article's own retained share, pooled over `steps` = [(retained step,
    {article: share})]: per bin, probes, accuracy after and before the forgets (the same probes)."""
    article = {p["probe_id"]: int(p["source_ids"][0]) for p in probes if p["kind"] == "unique"}
    was = dict(zip(before["probes"]["per_probe"]["probe_id"], before["probes"]["per_probe"]["correct"]))
    edges = np.asarray(SHARE_BINS)
    after_sum, before_sum, count = np.zeros(len(edges)), np.zeros(len(edges)), np.zeros(len(edges), np.int64)
    for step, shares in steps:
        for pid, correct in zip(step["probes"]["per_probe"]["probe_id"], step["probes"]["per_probe"]["correct"]):
            share = shares[article[pid]]
            b = len(edges) - 1 if share >= 1.0 else int(np.searchsorted(edges, share, side="right")) - 1
            after_sum[b] += correct
            before_sum[b] += was[pid]
            count[b] += 1
    out = []
    for b in range(len(edges)):
        if not count[b]:
            continue
        label = "1.0 (untouched)" if b == len(edges) - 1 else f"[{edges[b]:g}, {edges[b + 1]:g})"
        out.append({"share": label, "num_probes": int(count[b]), "accuracy": after_sum[b] / count[b],
                    "accuracy_before": before_sum[b] / count[b],
                    "ratio": after_sum[b] / before_sum[b] if before_sum[b] else float("nan")})
    return out
