"""The unlearning audit of one forget-set state: several deployments (the original model, the unlearned one,
optionally the hard checkpoint, the retrain oracle and post-hoc GA/NPO baselines) measured on the same sources
and probes, and attacked the ways the literature attacks unlearning.

A deployment is a model plus the sink mode it uses for a query about a source:
- `gold`: Sink-On with the source itself when the model trained on it (the original, GA, NPO);
- `routed`: the nearest surviving source by title embedding, minus the forget set (`routing.Router`); used by
  the unlearned models and the oracle (whose survivors are its own trained sources). A routed deployment also
  carries its `RouteSpace`: every route an attacker may pick instead (worst-case routing).

Per deployment: loss on forgotten / related / retained / holdout text; fact probes (`PROBE_GROUPS`); verbatim
extraction on forgotten text; membership-inference scores of forgotten and holdout sources. Across deployments
(`run_evaluation`): paired comparisons with the oracle, the membership audit (`membership_audit`), worst-case
routing (`worst_case`), the quantization attack (int8 / int4 copies: `quantize`), relearning (`relearning`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from nulls_dist.model import SinkMode
from nulls_dist.evaluation import metrics as M
from nulls_dist.evaluation.membership_audit import deployment_scores, membership_audit
from nulls_dist.evaluation.posthoc import FinetuneConfig, finetune
from nulls_dist.evaluation.quantize import quantize_model
from nulls_dist.evaluation.relearning import RelearnConfig, relearning_audit
from nulls_dist.evaluation.worst_case import RouteSpace, compare_worst_case, worst_case_routing
from nulls_dist.deploy.routing import Embedder, Router, SourceIndex

log = logging.getLogger(__name__)

PARTS = ("loss", "probes", "verbatim", "membership")


@dataclass
class MembershipConfig:
    fprs: tuple[float, ...] = (0.01, 0.05)
    num_resamples: int = 1000
    seed: int = 0
    small_holdout: int | None = 8  # the holdout the demo had before this audit: what its AUC hides


@dataclass
class EvalConfig:
    prefix_len: int = 16
    cont_len: int = 16
    num_prefixes: int = 2
    min_k: float = 0.2  # k of Min-K% and Min-K%++
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # the GA / NPO baselines
    baselines: tuple[str, ...] = ("ga", "npo")
    max_retained: int = 32
    max_probes_per_group: int | None = 64  # caps CAPPED_GROUPS (the forgotten articles' groups are never capped)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    # `hard` is left out of the attacks below by default: every route, quantized copy and fine-tuning step of a
    # routed deployment leaves the forgotten rows out, so the hard checkpoint (those rows zeroed) gives the
    # unlearned model's numbers bit for bit (tests/test_audit_attacks.py); `--full` measures it anyway
    worst_case_groups: tuple[str, ...] = ("unique_forget",)
    worst_case_deployments: tuple[str, ...] = ("unlearned", "oracle")
    quantize_bits: tuple[int, ...] = (8, 4)
    quantize_group_size: int | None = 32  # int4 with groups of 32 input columns (int8 too: one setting for both)
    quantize_deployments: tuple[str, ...] = ("unlearned", "oracle", "ga", "npo")
    relearn: RelearnConfig | None = field(default_factory=RelearnConfig)
    relearn_deployments: tuple[str, ...] = ("unlearned", "oracle", "ga", "npo")


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
    decode: Callable[[list[int]], str] | None = None  # token ids -> text (the zlib membership score)


@dataclass
class Deployment:
    name: str
    model: object
    mode_for: Callable[[int], SinkMode]
    routes: RouteSpace | None = None  # every route an attacker may pick (routed deployments)
    parts: tuple[str, ...] = PARTS  # the per-deployment metrics it gets


def gold_deployment(name: str, model, trained: set[int], fallback: Callable[[int], SinkMode]) -> Deployment:
    return Deployment(name, model, lambda sid: SinkMode.sink_on(sid) if sid in trained else fallback(sid))


def routed_deployment(name: str, model, index: SourceIndex, embedder: Embedder, forget_ids, titles) -> Deployment:
    router = Router(index, embedder, forget_ids)
    cache: dict[int, SinkMode] = {}

    def mode_for(sid: int) -> SinkMode:
        if sid not in cache:
            cache[sid] = router.route(titles[sid])[0]
        return cache[sid]

    survivors = index.source_ids[~np.isin(index.source_ids, np.asarray(router.forget_ids, dtype=np.int64))]
    return Deployment(name, model, mode_for, RouteSpace(survivors, router.forget_ids))


# ------------------------------------------------------------------------------------------------ probes
PROBE_GROUPS = ("unique_forget", "shared_forget", "shared_forget_via_retained", "unique_related",
                "unique_retained", "shared_retained", "unique_holdout")
CAPPED_GROUPS = ("unique_related", "unique_retained", "shared_retained", "unique_holdout")


def select_probes(data: EvalData, max_per_group: int | None = None) -> tuple[dict[str, list[tuple[dict, int]]],
                                                                             dict[str, int]]:
    """(probe, the source the query is about) per probe group, and the count of probes used by no group, per
    reason. Groups: the forgotten articles' unique and shared facts (asked about the forgotten article); the same
    shared facts asked about a retained article that states them (`shared_forget_via_retained`: they must stay);
    unique facts of retained articles related to a forgotten one and of the other retained ones; shared facts
    among retained articles only; and unique facts of never-trained (holdout) articles: the level of a fact the
    model never saw. `max_per_group` caps the groups of retained and holdout articles (`CAPPED_GROUPS`, keeping the
    first ones in probe order); the forgotten articles' groups are never capped."""
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
        for name in CAPPED_GROUPS:
            dropped = len(groups[name]) - max_per_group
            if dropped > 0:
                unused[f"{name} beyond max_probes_per_group={max_per_group}"] = dropped
                groups[name] = groups[name][:max_per_group]
    return groups, {reason: n for reason, n in unused.items() if n}


def eval_probes(dep: Deployment, groups, data: EvalData) -> dict:
    return {name: M.summarise_probes(M.score_probes(dep.model, [(p, dep.mode_for(sid)) for p, sid in items],
                                                    data.encode, data.bos_id)) for name, items in groups.items()}


# ------------------------------------------------------------------------------------------------ one deployment
def _mean_loss(dep: Deployment, ids, data: EvalData) -> float:
    losses = [M.text_loss(dep.model, data.tokens[s], dep.mode_for(s)) for s in ids if s in data.tokens]
    return float(np.mean(losses)) if losses else float("nan")


def _verbatim(dep: Deployment, data: EvalData, cfg: EvalConfig) -> dict:
    ver = [M.verbatim_extraction(dep.model, data.tokens[s], dep.mode_for(s), cfg.prefix_len, cfg.cont_len,
                                 cfg.num_prefixes) for s in data.forget_ids if s in data.tokens]
    mean = lambda k: float(np.nanmean([v[k] for v in ver])) if ver else float("nan")  # noqa: E731
    return {"exact_match_len": mean("exact_match_len"), "rouge_l": mean("rouge_l"),
            "num_prefixes": int(sum(v["num"] for v in ver))}


def evaluate_deployment(dep: Deployment, data: EvalData, cfg: EvalConfig, groups, parts=PARTS) -> dict:
    """The per-deployment metrics of `parts`; `membership` holds the raw scores until `run_evaluation`
    replaces them by the audit's summary."""
    log.info("evaluating deployment %s", dep.name)
    out = {}
    if "loss" in parts:
        out["loss"] = {"forget": _mean_loss(dep, data.forget_ids, data),
                       "related": _mean_loss(dep, data.related_ids, data),
                       "retained": _mean_loss(dep, data.retained_ids[: cfg.max_retained], data),
                       "holdout": _mean_loss(dep, data.holdout_ids, data)}
    if "probes" in parts:
        out["probes"] = eval_probes(dep, groups, data)
    if "verbatim" in parts:
        out["verbatim"] = _verbatim(dep, data, cfg)
    if "membership" in parts:
        out["membership"] = deployment_scores(dep, data, cfg.min_k, data.decode)
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


def quantized_deployments(deployments: list[Deployment], cfg: EvalConfig) -> list[Deployment]:
    """int<b> fake-quantized copies (`quantize.quantize_model`) of the deployments `cfg` names, same modes."""
    return [Deployment(f"{d.name}@int{bits}", quantize_model(d.model, bits, cfg.quantize_group_size), d.mode_for,
                       d.routes)
            for bits in cfg.quantize_bits for d in deployments if d.name in cfg.quantize_deployments]


def oracle_of(name: str) -> str:
    """The oracle a deployment is compared with: `oracle`, or the oracle quantized the same way."""
    return "oracle" + name[name.index("@"):] if "@" in name else "oracle"


# ------------------------------------------------------------------------------------------------ the audit
def _compare_with_oracles(results: dict[str, dict], groups) -> None:
    for name, res in results.items():
        ref = results.get(oracle_of(name))
        if ref is not None and "probes" in res and "probes" in ref:
            res["probes_vs_oracle"] = {g: M.compare_probes(res["probes"][g], ref["probes"][g]) for g in groups}


def _membership(results: dict[str, dict], reference_scores: dict | None, cfg: EvalConfig) -> None:
    raw = {name: res["membership"] for name, res in results.items() if "membership" in res}
    summary = membership_audit(raw, reference=reference_scores, retrain_of=lambda n: oracle_of(n) if oracle_of(n) in raw
                               else None, fprs=cfg.membership.fprs, num_resamples=cfg.membership.num_resamples,
                               seed=cfg.membership.seed, small_holdout=cfg.membership.small_holdout)
    for name in raw:
        results[name]["membership"] = summary.get(name, {"attacks": {}, "retrain": None})


def _worst_case(deployments: list[Deployment], groups, data: EvalData, cfg: EvalConfig, cache: dict | None) -> dict:
    chosen = {g: groups[g] for g in cfg.worst_case_groups if g in groups}
    out: dict = {"groups": list(chosen), "deployments": {}}
    for dep in deployments:
        if dep.name not in cfg.worst_case_deployments or dep.routes is None:
            continue
        log.info("worst-case routing: %s over %d routes", dep.name, len(dep.routes.names()))
        out["deployments"][dep.name] = worst_case_routing(dep.model, chosen, dep.routes, data.encode, data.bos_id,
                                                          dep.mode_for, cache)
    oracle = out["deployments"].get("oracle")
    for name, res in out["deployments"].items():
        if oracle is not None and name != "oracle":
            res["vs_oracle"] = compare_worst_case(res, oracle, list(chosen))
    return out


def run_evaluation(deployments: list[Deployment], data: EvalData, cfg: EvalConfig,
                   reference: Deployment | None = None, worst_case_cache: dict | None = None) -> dict:
    """Every metric and attack of the audit for one forget-set state (`data.forget_ids`). `reference`: a
    separately trained model that saw neither the forgotten nor the holdout sources, used only to calibrate the
    membership scores (`ref_reference_*`)."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    groups, unused = select_probes(data, cfg.max_probes_per_group)
    results = {d.name: evaluate_deployment(d, data, cfg, groups, d.parts) for d in deployments}
    timings["deployments"] = time.perf_counter() - started
    t = time.perf_counter()
    quantized = quantized_deployments(deployments, cfg) if cfg.quantize_bits else []
    quant_results = {d.name: evaluate_deployment(d, data, cfg, groups, ("loss", "probes", "membership"))
                     for d in quantized}
    timings["quantization"] = time.perf_counter() - t
    t = time.perf_counter()
    reference_scores = deployment_scores(reference, data, cfg.min_k, data.decode) if reference is not None else None
    both = results | quant_results
    _membership(both, reference_scores, cfg)
    _compare_with_oracles(both, groups)
    timings["membership_and_comparisons"] = time.perf_counter() - t
    t = time.perf_counter()
    worst = _worst_case(deployments, groups, data, cfg, worst_case_cache) if cfg.worst_case_groups else None
    timings["worst_case_routing"] = time.perf_counter() - t
    t = time.perf_counter()
    attacked = [d for d in deployments if d.name in ("original", *cfg.relearn_deployments)]
    relearn = relearning_audit(attacked, data, groups["unique_forget"], cfg.relearn) \
        if cfg.relearn is not None and groups["unique_forget"] else None
    timings["relearning"] = time.perf_counter() - t
    return {"config": asdict(cfg), "forget_ids": data.forget_ids, "related_ids": data.related_ids,
            "num_probes": {k: len(v) for k, v in groups.items()}, "probes_unused": unused,
            "num_holdout": len(data.holdout_ids), "reference": None if reference is None else reference.name,
            "chance_accuracy": float(np.mean([1 / (1 + len(p["distractors"])) for p in data.probes]))
            if data.probes else float("nan"),
            "deployments": results,
            "quantization": {"bits": list(cfg.quantize_bits), "group_size": cfg.quantize_group_size,
                             "deployments": quant_results} if quantized else None,
            "worst_case": worst, "relearning": relearn, "seconds": timings}
