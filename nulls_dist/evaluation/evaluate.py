"""The unlearning evaluation: several deployments (the original model, the unlearned one, optionally the hard
checkpoint, the retrain oracle and post-hoc GA/NPO baselines) measured on the same sources and probes.

A deployment is a model plus the sink mode it uses for a query about a source:
- `gold`: Sink-On with the source itself when the model trained on it (the original, GA, NPO);
- `routed`: the nearest surviving source by title embedding, minus the forget set (`routing.Router`); used by
  the unlearned models and the oracle (whose survivors are its own trained sources).

Metrics per deployment (see `metrics`): loss on forgotten / related / retained / holdout text; fact probes
(unique facts of forgotten sources, shared facts of forgotten sources, unique facts of related retained
sources); verbatim extraction on forgotten text; Min-K% membership AUC forgotten vs holdout and PrivLeak
against the oracle; relearning (fine-tune on the first half of a forgotten source, loss on the second half).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from nulls_dist.model import SinkMode
from nulls_dist.evaluation import metrics as M
from nulls_dist.evaluation.posthoc import FinetuneConfig, finetune
from nulls_dist.deploy.routing import Embedder, Router, SourceIndex

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    prefix_len: int = 16
    cont_len: int = 16
    num_prefixes: int = 2
    min_k: float = 0.2
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # the GA / NPO baselines
    # the relearning attack: a fine-tuning lr near the training run's final lr, so recovery is measurable
    relearn_finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(steps=20, lr=3e-4))
    baselines: tuple[str, ...] = ("ga", "npo")
    relearn_sources: int = 2
    relearn_points: int = 4  # losses recorded at this many evenly spaced steps
    max_retained: int = 32
    max_probes_per_group: int | None = 64  # caps the retained-article groups (the forgotten ones are never capped)


@dataclass
class EvalData:
    forget_ids: list[int]
    retained_ids: list[int]  # trained, not forgotten (utility)
    related_ids: list[int]  # retained sources sharing a fact with a forgotten one
    holdout_ids: list[int]  # never trained on (membership inference)
    titles: dict[int, str]
    tokens: dict[int, np.ndarray]  # every source above -> its token ids (BOS ... EOS)
    probes: list[dict]
    encode: Callable[[str], list[int]]
    bos_id: int | None


@dataclass
class Deployment:
    name: str
    model: object
    mode_for: Callable[[int], SinkMode]


def gold_deployment(name: str, model, trained: set[int], fallback: Callable[[int], SinkMode]) -> Deployment:
    return Deployment(name, model, lambda sid: SinkMode.sink_on(sid) if sid in trained else fallback(sid))


def routed_deployment(name: str, model, index: SourceIndex, embedder: Embedder, forget_ids, titles) -> Deployment:
    router = Router(index, embedder, forget_ids)
    cache: dict[int, SinkMode] = {}

    def mode_for(sid: int) -> SinkMode:
        if sid not in cache:
            cache[sid] = router.route(titles[sid])[0]
        return cache[sid]

    return Deployment(name, model, mode_for)


# ------------------------------------------------------------------------------------------------ probes
PROBE_GROUPS = ("unique_forget", "shared_forget", "shared_forget_via_retained", "unique_related",
                "unique_retained", "shared_retained", "unique_holdout")


def select_probes(data: EvalData, max_per_group: int | None = None) -> tuple[dict[str, list[tuple[dict, int]]],
                                                                             dict[str, int]]:
    """(probe, the source the query is about) per probe group, and the count of probes used by no group, per
    reason. Groups: the forgotten articles' unique and shared facts (asked about the forgotten article); the same
    shared facts asked about a retained article that states them (`shared_forget_via_retained`: they must stay);
    unique facts of retained articles related to a forgotten one and of the other retained ones; shared facts
    among retained articles only; and unique facts of never-trained (holdout) articles: the level of a fact the
    model never saw. `max_per_group` caps the large retained groups (the first ones, in probe order)."""
    forget, related, holdout = set(data.forget_ids), set(data.related_ids), set(data.holdout_ids)
    retained = set(data.retained_ids)
    groups: dict[str, list[tuple[dict, int]]] = {name: [] for name in PROBE_GROUPS}
    unused = {"source outside the evaluation (neither forgotten, retained nor held out)": 0}
    for p in data.probes:
        ids = [int(s) for s in p["source_ids"]]
        hit = [s for s in ids if s in forget]
        if p["kind"] == "unique" and hit:
            groups["unique_forget"].append((p, hit[0]))
        elif p["kind"] == "shared" and hit:
            groups["shared_forget"].append((p, hit[0]))
            kept = [s for s in ids if s not in forget and s in related]
            if kept:  # the same fact asked about a surviving article that states it: it must stay
                groups["shared_forget_via_retained"].append((p, kept[0]))
        elif p["kind"] == "unique" and ids[0] in related:
            groups["unique_related"].append((p, ids[0]))
        elif p["kind"] == "unique" and ids[0] in retained:
            groups["unique_retained"].append((p, ids[0]))
        elif p["kind"] == "shared" and ids and all(s in retained for s in ids):
            groups["shared_retained"].append((p, ids[0]))
        elif p["kind"] == "unique" and ids[0] in holdout:
            groups["unique_holdout"].append((p, ids[0]))
        else:
            unused["source outside the evaluation (neither forgotten, retained nor held out)"] += 1
    if max_per_group is not None:
        for name in ("unique_retained", "shared_retained"):
            dropped = len(groups[name]) - max_per_group
            if dropped > 0:
                unused[f"{name} beyond max_probes_per_group={max_per_group}"] = dropped
                groups[name] = groups[name][:max_per_group]
    return groups, {reason: n for reason, n in unused.items() if n}


def eval_probes(dep: Deployment, groups, data: EvalData) -> dict:
    return {name: M.summarise_probes([M.score_probe(dep.model, p, dep.mode_for(sid), data.encode, data.bos_id)
                                      for p, sid in items]) for name, items in groups.items()}


# ------------------------------------------------------------------------------------------------ one deployment
def _mean_loss(dep: Deployment, ids, data: EvalData) -> float:
    losses = [M.text_loss(dep.model, data.tokens[s], dep.mode_for(s)) for s in ids if s in data.tokens]
    return float(np.mean(losses)) if losses else float("nan")


def membership(dep: Deployment, data: EvalData, k: float) -> dict:
    score = lambda s: M.min_k_prob(M.token_logprobs(dep.model, data.tokens[s], dep.mode_for(s)), k)  # noqa: E731
    forget = [score(s) for s in data.forget_ids if s in data.tokens]
    holdout = [score(s) for s in data.holdout_ids if s in data.tokens]
    return {"min_k": k, "auc_forget_vs_holdout": M.rank_auc(forget, holdout),
            "mean_score_forget": float(np.mean(forget)) if forget else float("nan"),
            "mean_score_holdout": float(np.mean(holdout)) if holdout else float("nan")}


def relearn(dep: Deployment, data: EvalData, cfg: EvalConfig) -> dict:
    """Fine-tune on the first half of each forgotten source (its deployment mode), loss on the second half."""
    sources = [s for s in data.forget_ids if s in data.tokens][: cfg.relearn_sources]
    steps = cfg.relearn_finetune.steps
    points = sorted({0, *np.linspace(0, steps, cfg.relearn_points).astype(int).tolist()})
    curve = {p: [] for p in points}
    for sid in sources:
        tokens = data.tokens[sid]
        half = len(tokens) // 2
        train, test, mode = tokens[:half], tokens[half:], dep.mode_for(sid)
        curve[0].append(M.text_loss(dep.model, test, mode))

        def record(step, model, test=test, mode=mode):
            if step in curve and step > 0:
                curve[step].append(M.text_loss(model, test, mode))

        finetune(dep.model, [train], [mode], "nll", cfg.relearn_finetune, on_step=record)
    return {"steps": points, "loss_rest": [float(np.mean(curve[p])) if curve[p] else float("nan") for p in points],
            "sources": sources}


def evaluate_deployment(dep: Deployment, data: EvalData, cfg: EvalConfig, groups) -> dict:
    log.info("evaluating deployment %s", dep.name)
    out = {
        "loss": {"forget": _mean_loss(dep, data.forget_ids, data), "related": _mean_loss(dep, data.related_ids, data),
                 "retained": _mean_loss(dep, data.retained_ids[: cfg.max_retained], data),
                 "holdout": _mean_loss(dep, data.holdout_ids, data)},
        "probes": eval_probes(dep, groups, data),
        "membership": membership(dep, data, cfg.min_k),
        "relearning": relearn(dep, data, cfg),
    }
    ver = [M.verbatim_extraction(dep.model, data.tokens[s], dep.mode_for(s), cfg.prefix_len, cfg.cont_len,
                                 cfg.num_prefixes) for s in data.forget_ids if s in data.tokens]
    out["verbatim"] = {"exact_match_len": float(np.nanmean([v["exact_match_len"] for v in ver])) if ver else float("nan"),
                       "rouge_l": float(np.nanmean([v["rouge_l"] for v in ver])) if ver else float("nan"),
                       "num_prefixes": int(sum(v["num"] for v in ver))}
    return out


def baseline_deployments(original: Deployment, data: EvalData, cfg: EvalConfig) -> list[Deployment]:
    """GA / NPO fine-tuned from the original model on the forgotten text (Sink-On, as it was trained)."""
    texts = [data.tokens[s] for s in data.forget_ids if s in data.tokens]
    modes = [original.mode_for(s) for s in data.forget_ids if s in data.tokens]
    out = []
    for loss in cfg.baselines:
        tuned = finetune(original.model, texts, modes, loss, cfg.finetune)
        out.append(Deployment(loss, tuned, original.mode_for))
    return out


def run_evaluation(deployments: list[Deployment], data: EvalData, cfg: EvalConfig) -> dict:
    groups, unused = select_probes(data, cfg.max_probes_per_group)
    results = {d.name: evaluate_deployment(d, data, cfg, groups) for d in deployments}
    if "oracle" in results:
        oracle = results["oracle"]
        oracle_auc = oracle["membership"]["auc_forget_vs_holdout"]
        for res in results.values():
            res["membership"]["priv_leak_vs_oracle"] = M.priv_leak(res["membership"]["auc_forget_vs_holdout"],
                                                                   oracle_auc)
            res["probes_vs_oracle"] = {g: M.compare_probes(res["probes"][g], oracle["probes"][g]) for g in groups}
    return {"config": asdict(cfg), "forget_ids": data.forget_ids, "related_ids": data.related_ids,
            "num_probes": {k: len(v) for k, v in groups.items()}, "probes_unused": unused,
            "num_holdout": len(data.holdout_ids),
            "chance_accuracy": float(np.mean([1 / (1 + len(p["distractors"])) for p in data.probes]))
            if data.probes else float("nan"),
            "deployments": results}
