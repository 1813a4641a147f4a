"""Worst-case routing: a deployed NULL routes each query to its nearest surviving source, but whoever queries it
may craft the query so that it lands on any route, and whoever holds the weights may pick the mode outright. For
each forgotten fact this module scores the probe under EVERY route the deployment offers -- every surviving
source's Sink-Off (its sinks minus the forgotten ones), plus `backbone_only` and `expected` -- and reports the
best an attacker gets, against the retrain oracle's best over its own routes (a model that never saw the fact,
given the same freedom).

Per fact and route r: log P̄ of each candidate (answer first, then distractors) -> Truth Ratio TR_r and whether the
answer ranks first. Three attackers, from strongest to realistic:
- `best`: knows the answer (an upper bound on any route-choosing attack): min_r TR_r, and `any_correct` = some
  route ranks the answer first. With hundreds of routes and 5 candidates this is high even for the oracle, which
  is why it is only ever read against the oracle's own `best`;
- `confident`: answer-blind: takes the route whose top candidate is the most probable (softmax over the
  candidates) and answers with it;
- `routed`: what the deployment itself answers (the nearest surviving source by title), and `mean_route`: the
  accuracy of an average route.

Cost: per fact, routes x (prompt + candidates' tokens after their first) token positions. Per chunk of routes,
two batched forwards: the prompt once per route into a KV cache (its last position scores every candidate's
first token), then the cache repeated per candidate for the rest of the candidates' tokens; each route's rows
are one segment of a batched Sink-Off plan (`NullTransformer.make_routes_plan`, equal to one `sink_off` forward
per route: tested), and the LM head runs only where a candidate token is scored.

Shape legend:  R routes (a chunk)   C candidates   P prompt tokens   Lc longest candidate   D n_embd   V vocab
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from nulls_dist.evaluation.metrics import candidate_logprobs, encode_probe, paired_bootstrap, wilson_interval
from nulls_dist.model import SinkMode

SPECIAL_ROUTES = ("backbone_only", "expected")
TOKENS_PER_FORWARD = 16384  # rows x width per batched forward; at the demo's size larger chunks ran no faster


@dataclass
class RouteSpace:
    """Every route a deployment offers: Sink-Off on each of `sources` (surviving trained sources) minus
    `forget_ids`, plus the special modes. `forget_ids` come on top of the forget set in force on the model."""

    sources: np.ndarray  # (S,) int64
    forget_ids: tuple[int, ...] = ()
    special: tuple[str, ...] = SPECIAL_ROUTES

    def names(self) -> list[str]:
        return [str(int(s)) for s in self.sources] + list(self.special)

    def key(self) -> tuple:
        return self.sources.tobytes(), tuple(self.forget_ids), tuple(self.special)

    def special_mode(self, name: str) -> SinkMode:
        return SinkMode.backbone_only() if name == "backbone_only" else SinkMode.expected()


@torch.no_grad()
def _same_length_prompts(model, prompts: list[list[int]], candidates: list[list[list[int]]],
                         space: RouteSpace) -> list[np.ndarray]:
    """`route_logprobs` of Q probes whose prompts have one length P, batched together: [(S, C_q)] over the
    surviving sources of `space`."""
    Q, P = len(prompts), len(prompts[0])
    cands = [c for cs in candidates for c in cs]  # every probe's candidates, in order: C_total of them
    per_probe = [len(cs) for cs in candidates]
    tail = max(len(c) for c in cands) - 1  # candidate tokens after the first
    width = max(tail, 1)
    first = torch.tensor([c[0] for c in cands])  # (C_total,)
    owner = torch.repeat_interleave(torch.arange(Q), torch.tensor(per_probe))  # (C_total,) candidate -> probe
    rest = torch.zeros(len(cands), width, dtype=torch.int64)  # (C_total, Lc-1): inputs c[:-1], targets c[1:]
    target = torch.zeros(len(cands), width, dtype=torch.int64)
    valid = torch.zeros(len(cands), width, dtype=torch.bool)
    for i, c in enumerate(cands):
        rest[i, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.int64)
        target[i, :len(c) - 1] = torch.tensor(c[1:], dtype=torch.int64)
        valid[i, :len(c) - 1] = True
    lengths = torch.tensor([len(c) for c in cands], dtype=torch.float64)  # (C_total,)
    prompt_ids = torch.tensor(prompts, dtype=torch.int64)  # (Q, P)
    per_route = Q * P + len(cands) * tail
    chunk = max(1, TOKENS_PER_FORWARD // per_route)
    parts = []
    for start in range(0, len(space.sources), chunk):
        routes = space.sources[start:start + chunk]
        R = len(routes)
        cache = model.init_kv_cache(R * Q, P + tail)
        plan = model.make_routes_plan(routes, Q, P, space.forget_ids)
        hidden = model.hidden_states(prompt_ids.repeat(R, 1), None, plan=plan, kv_cache=cache)  # (R*Q, P, D)
        logp = torch.log_softmax(model.lm_head(hidden[:, -1]).float(), dim=-1).view(R, Q, -1)  # (R, Q, V)
        total = logp[:, owner, first].double()  # (R, C_total)
        if tail:
            # each probe's cached prompt once per candidate of that probe, in candidate order
            cache = cache.take_rows((torch.arange(R)[:, None] * Q + owner[None, :]).flatten())  # R*C_total rows
            plan = model.make_routes_plan(routes, len(cands), tail, space.forget_ids)
            hidden = model.hidden_states(rest[:, :tail].repeat(R, 1), None, plan=plan, kv_cache=cache)  # (R*C_total, Lc-1, D)
            lp = torch.log_softmax(model.lm_head(hidden).float(), dim=-1).view(R, len(cands), tail, -1)
            lp = lp.gather(-1, target[:, :tail].expand(R, -1, -1)[..., None])[..., 0]  # (R, C_total, Lc-1)
            total = total + (lp * valid[:, :tail]).sum(-1).double()
        parts.append((total / lengths).numpy())  # (R, C_total)
    table = np.concatenate(parts)  # (S, C_total)
    bounds = np.cumsum([0, *per_probe])
    return [table[:, bounds[q]:bounds[q + 1]] for q in range(Q)]


def route_logprobs(model, probes: list[tuple[list[int], list[list[int]]]], space: RouteSpace,
                   max_batch: int = 16) -> list[np.ndarray]:
    """[(R_total, C)] mean log-prob of each candidate after its prompt under every route of `space` (rows in
    `space.names()` order), for each (prompt, candidates) of `probes`. Probes whose prompts have the same length
    go through the model together (up to `max_batch`): per chunk of routes, the prompts once per route into a KV
    cache, whose last positions score every candidate's first token, then the cache rows repeated per candidate
    for the candidates' other tokens."""
    out: list[np.ndarray | None] = [None] * len(probes)
    by_length: dict[int, list[int]] = {}
    for i, (prompt, _) in enumerate(probes):
        by_length.setdefault(len(prompt), []).append(i)
    for idx in by_length.values():
        for start in range(0, len(idx), max_batch):
            batch = idx[start:start + max_batch]
            tables = _same_length_prompts(model, [probes[i][0] for i in batch], [probes[i][1] for i in batch], space) \
                if len(space.sources) else [np.zeros((0, len(probes[i][1]))) for i in batch]
            for i, table in zip(batch, tables):
                special = [candidate_logprobs(model, *probes[i], space.special_mode(n))[None] for n in space.special]
                out[i] = np.concatenate([table, *special]).astype(np.float64)
    return out


def fact_under_routes(mean_lp: np.ndarray, names: list[str], routed: str | None = None) -> dict:
    """One fact's per-route candidate log-probs (R, C), answer first -> the attackers' outcomes."""
    log_tr = np.log(np.mean(np.exp(mean_lp[:, 1:] - mean_lp[:, :1]), axis=1))  # (R,)
    correct = mean_lp[:, 0] > mean_lp[:, 1:].max(axis=1)  # (R,)
    cand_p = np.exp(mean_lp - mean_lp.max(axis=1, keepdims=True))
    confidence = (cand_p / cand_p.sum(axis=1, keepdims=True)).max(axis=1)  # (R,) top candidate's share
    best, sure = int(np.argmin(log_tr)), int(np.argmax(confidence))
    out = {"best_route": names[best], "best_log_truth_ratio": float(log_tr[best]),
           "any_correct": bool(correct.any()), "num_routes_correct": int(correct.sum()),
           "confident_route": names[sure], "confident_correct": bool(correct[sure]),
           "mean_route_accuracy": float(correct.mean())}
    if routed is not None and routed in names:
        r = names.index(routed)
        out |= {"routed_route": routed, "routed_log_truth_ratio": float(log_tr[r]), "routed_correct": bool(correct[r])}
    return out


def _summary(facts: list[dict]) -> dict:
    if not facts:
        nan = float("nan")
        return {"num": 0, "any_correct": nan, "any_correct_ci95": [nan, nan], "confident_accuracy": nan,
                "mean_route_accuracy": nan, "best_truth_ratio_gmean": nan, "best_route_kinds": {}}
    any_ok = [f["any_correct"] for f in facts]
    kinds: dict[str, int] = {}
    for f in facts:
        kind = f["best_route"] if f["best_route"] in SPECIAL_ROUTES else "a surviving source"
        kinds[kind] = kinds.get(kind, 0) + 1
    out = {"num": len(facts), "any_correct": float(np.mean(any_ok)), "any_correct_ci95": wilson_interval(sum(any_ok), len(any_ok)),
           "confident_accuracy": float(np.mean([f["confident_correct"] for f in facts])),
           "mean_route_accuracy": float(np.mean([f["mean_route_accuracy"] for f in facts])),
           "best_truth_ratio_gmean": float(np.exp(np.mean([f["best_log_truth_ratio"] for f in facts]))),
           "best_route_kinds": kinds}
    if all("routed_correct" in f for f in facts):
        out["routed_accuracy"] = float(np.mean([f["routed_correct"] for f in facts]))
    return out


def worst_case_routing(model, groups: dict[str, list[tuple[dict, int]]], space: RouteSpace,
                       encode: Callable[[str], list[int]], bos_id: int | None,
                       routed_for: Callable[[int], SinkMode] | None = None, cache: dict | None = None) -> dict:
    """Every probe of `groups` ({group: [(probe, source it is about)]}) under every route of `space`:
    {"groups": {group: {"summary", "facts": [per fact]}}, "num_routes", "seconds", "sequences"}. `routed_for`
    (the deployment's own mode per source) marks which route the deployment itself would take. `cache` (a dict
    kept by the caller) holds facts already scored with this model and route space, e.g. by the same oracle at an
    earlier request of a successive audit; `sequences` counts the ones scored by this call."""
    names = space.names()
    started = time.perf_counter()
    sequences = 0
    cache = {} if cache is None else cache
    out = {}
    for group, items in groups.items():
        keys = [(id(model), space.key(), probe["probe_id"], sid) for probe, sid in items]
        todo = [i for i, k in enumerate(keys) if k not in cache]
        tables = route_logprobs(model, [encode_probe(items[i][0], encode, bos_id) for i in todo], space)
        for i, lp in zip(todo, tables):  # lp: (R_total, C)
            probe, sid = items[i]
            sequences += lp.size
            routed = None
            if routed_for is not None:
                mode = routed_for(sid)
                routed = str(mode.source_id) if mode.kind == "sink_off" else mode.kind
            cache[keys[i]] = {"probe_id": probe["probe_id"], **fact_under_routes(lp, names, routed)}
        facts = [cache[k] for k in keys]
        out[group] = {"summary": _summary(facts), "facts": facts}
    return {"groups": out, "num_routes": len(names), "seconds": time.perf_counter() - started,
            "sequences": int(sequences)}


def compare_worst_case(result: dict, oracle: dict, groups: Sequence[str]) -> dict:
    """Paired bootstrap (same facts) of the attacker's outcome against the oracle's over its own routes:
    `any_correct`, `confident_correct`, the average route's accuracy and the best log Truth Ratio."""
    out = {}
    for g in groups:
        a, b = result["groups"][g]["facts"], oracle["groups"][g]["facts"]
        if [f["probe_id"] for f in a] != [f["probe_id"] for f in b]:
            raise ValueError(f"compare_worst_case: group {g!r} holds other facts in the oracle's result")
        col = lambda fs, k: np.array([float(f[k]) for f in fs])  # noqa: E731
        out[g] = {"any_correct_diff": paired_bootstrap(col(a, "any_correct"), col(b, "any_correct")),
                  "confident_accuracy_diff": paired_bootstrap(col(a, "confident_correct"), col(b, "confident_correct")),
                  "mean_route_accuracy_diff": paired_bootstrap(col(a, "mean_route_accuracy"),
                                                               col(b, "mean_route_accuracy")),
                  "best_log_truth_ratio_diff": paired_bootstrap(col(a, "best_log_truth_ratio"),
                                                                col(b, "best_log_truth_ratio"))}
    return out
