"""The audit's attacks on real small models (tests/audit_helpers.py: a debug NULL that memorised random-token
articles, and one trained without the forgotten ones): batched routes equal one Sink-Off forward per route,
worst-case routing finds a planted route, the hard checkpoint gives the unlearned model's attack numbers bit for
bit, membership inference separates a memorised model's members (AUC ~1, PrivLeak ~-100 against the oracle) and
not a random model's, relearning counts steps to a threshold, successive stages replay a forget set's history,
and the plain-language findings follow the numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from audit_helpers import BASE, VOCAB, articles, decode, encode, fact_probes, train_tiny_null
from nulls_dist.config import NullConfig
from nulls_dist.deploy.routing import ModelEmbedder, SourceIndex
from nulls_dist.evaluation import membership as MI
from nulls_dist.evaluation.evaluate import (Deployment, EvalConfig, EvalData, MembershipConfig, gold_deployment,
                                            routed_deployment, run_evaluation)
from nulls_dist.evaluation.findings import findings
from nulls_dist.evaluation.membership_audit import deployment_scores, membership_audit, small_holdout_spread
from nulls_dist.evaluation.metrics import candidate_logprobs, encode_probe, score_probe, score_probes
from nulls_dist.evaluation.relearning import RelearnConfig, steps_to_threshold
from nulls_dist.evaluation.report import ReportSection, write_report
from nulls_dist.evaluation.worst_case import RouteSpace, route_logprobs, worst_case_routing
from nulls_dist.model import NullTransformer, SinkMode

TRAINED = list(range(BASE, BASE + 24))
FORGET = TRAINED[:8]
HOLDOUT = list(range(BASE + 24, BASE + 36))


@pytest.fixture(scope="module")
def world():
    texts = articles()
    original = train_tiny_null(texts, TRAINED)
    oracle = train_tiny_null(texts, [s for s in TRAINED if s not in FORGET], seed=1)
    return texts, original, oracle


def _copy(model: NullTransformer) -> NullTransformer:
    out = NullTransformer(model.cfg)
    out.load_state_dict(model.state_dict())
    return out.eval()


def test_routes_plan_equals_one_sink_off_forward_per_route():
    torch.manual_seed(0)
    for path in ("gathered", "masked"):
        model = NullTransformer(NullConfig.from_preset("debug", sink_strategy="uniform", sink_path=path)).eval()
        model.enforce_forget_set([BASE + 4])
        x = torch.randint(0, 4000, (3, 7))  # (3, 7)
        routes = [BASE, BASE + 1, BASE + 3]
        with torch.no_grad():
            batched = model(x.repeat(3, 1), None, plan=model.make_routes_plan(routes, 3, 7, forget_ids=[BASE + 5]))
            for i, r in enumerate(routes):
                alone = model(x, None, mode=SinkMode.sink_off(r, [BASE + 5]))
                assert torch.equal(batched[3 * i:3 * i + 3], alone), (path, r)
        with pytest.raises(ValueError, match="forget set in force"):
            model.make_routes_plan([BASE, BASE + 4], 1, 7)


def test_route_logprobs_equal_candidate_logprobs(world):
    texts, original, _ = world
    model = _copy(original)
    model.enforce_forget_set(FORGET)
    space = RouteSpace(np.array(TRAINED[8:14]), ())
    probes = fact_probes(texts, FORGET[:3], per_source=3)  # prompts of three lengths, several per length
    encoded = [encode_probe(p, encode, None) for p in probes]
    encoded[0] = (encoded[0][0], [[5, 6, 7], [8], [9, 10]])  # candidates of unequal length
    tables = route_logprobs(model, encoded, space, max_batch=2)
    for (prompt, cands), table in zip(encoded, tables):
        assert table.shape == (len(space.names()), len(cands))
        for i, name in enumerate(space.names()):
            mode = space.special_mode(name) if name in space.special else SinkMode.sink_off(int(name), FORGET)
            np.testing.assert_allclose(table[i], candidate_logprobs(model, prompt, cands, mode), atol=2e-5)


def _unlearned(original, forget=FORGET):
    model = _copy(original)
    model.enforce_forget_set(forget)
    return model


def _write_fact_into_sinks(model, rows: torch.Tensor, answer: int, scale: float = 40.0) -> None:
    """Make `rows` of the last layer push the residual towards the LM head's row of `answer`: with equal gate and
    up rows v, each unit's activation silu(v.x) (v.x) = (v.x)^2 sigmoid(v.x) is >= 0 for every x."""
    mlp = model.transformer.h[-1].mlp
    g = torch.Generator().manual_seed(int(rows[0]))
    with torch.no_grad():
        v = torch.randn(len(rows), model.cfg.n_embd, generator=g)
        mlp.sink_gate[rows] = v
        mlp.sink_up[rows] = v
        mlp.sink_down[rows] = scale * model.lm_head.weight[answer] / len(rows)


def test_worst_case_routing_finds_a_planted_route():
    torch.manual_seed(0)
    model = NullTransformer(NullConfig.from_preset("debug", sink_strategy="uniform", vocab_size=VOCAB)).eval()
    forgotten = BASE
    probes = [{"probe_id": f"q{i}", "kind": "unique", "prompt": f"w{10 + i} w{20 + i} w{30 + i}", "answer": "w7",
               "distractors": ["w8", "w9", "w11", "w12"], "source_ids": [forgotten]} for i in range(3)]
    items = {"unique_forget": [(p, forgotten) for p in probes]}
    assign = model.sink_assignment
    rows = lambda s: set(assign.rows(torch.tensor([int(s)]))[0].tolist())  # noqa: E731
    own = assign.rows(torch.tensor([forgotten]))[0]
    # the host shares no sink with the forgotten source, and no other route shares one with the host (a route that
    # held some planted rows would get part of the fact too)
    host = next(s for s in range(BASE + 1, BASE + 200) if not rows(s) & set(own.tolist()))
    survivors = np.array([host] + [s for s in range(BASE + 1, BASE + 200) if s != host and not rows(s) & rows(host)][:12])
    _write_fact_into_sinks(model, own, answer=7)  # only the forgotten source's sinks know the fact
    sink_on = [candidate_logprobs(model, *encode_probe(p, encode, None), SinkMode.sink_on(forgotten)) for p in probes]
    assert all(lp[0] > lp[1:].max() + 0.5 for lp in sink_on)  # a random model's logits span ~1: margin ~1
    space = RouteSpace(survivors, (), special=("backbone_only",))  # `expected` holds every row, the planted too
    before = worst_case_routing(_unlearned(model, [forgotten]), items, space, encode, None)
    assert before["groups"]["unique_forget"]["summary"]["best_truth_ratio_gmean"] > 0.05  # no route knows it
    planted = _unlearned(model, [forgotten])  # the host survivor gets the forgotten source's sink rows
    host_rows = assign.rows(torch.tensor([host]))[0]
    with torch.no_grad():
        for block in planted.transformer.h:
            for table in (block.mlp.sink_gate, block.mlp.sink_up, block.mlp.sink_down):
                table[host_rows] = table[own].clone()
    after = worst_case_routing(planted, items, space, encode, None)
    for fact, lp in zip(after["groups"]["unique_forget"]["facts"], sink_on):
        assert fact["best_route"] == str(host) and fact["any_correct"] and fact["confident_route"] == str(host)
        # the planted route reproduces the forgotten source's own Sink-On (same rows, same weights)
        assert fact["best_log_truth_ratio"] == pytest.approx(np.log(np.mean(np.exp(lp[1:] - lp[0]))), abs=1e-3)
    assert after["groups"]["unique_forget"]["summary"]["confident_accuracy"] == 1.0


def test_hard_checkpoint_gives_the_unlearned_attack_numbers_bit_for_bit(world):
    texts, original, _ = world
    hard = _unlearned(original)
    gone = torch.tensor(sorted(set(original.sink_assignment.rows(torch.tensor(FORGET)).flatten().tolist()) - {-1}))
    with torch.no_grad():
        for block in hard.transformer.h:
            for table in (block.mlp.sink_gate, block.mlp.sink_up, block.mlp.sink_down):
                table[gone] = 0.0
    space = RouteSpace(np.array(TRAINED[8:]), ())
    encoded = [encode_probe(p, encode, None) for p in fact_probes(texts, FORGET[:2])]
    for a, b in zip(route_logprobs(_unlearned(original), encoded, space), route_logprobs(hard, encoded, space)):
        assert np.array_equal(a, b)


def _data(texts, probes, forget=FORGET) -> EvalData:
    retained = [s for s in TRAINED if s not in forget]
    return EvalData(forget_ids=list(forget), retained_ids=retained, related_ids=retained[:4], holdout_ids=HOLDOUT,
                    titles={s: f"article {s}" for s in texts}, tokens=texts, probes=probes, encode=encode,
                    bos_id=None, decode=decode)


def test_membership_separates_a_memorised_model_and_not_a_random_one(world):
    texts, original, oracle = world
    data = _data(texts, [])
    gold = lambda model: gold_deployment("x", model, set(TRAINED), lambda s: SinkMode.backbone_only())  # noqa: E731
    raw = {"original": deployment_scores(gold(original), data, 0.2, decode),
           "oracle": deployment_scores(gold(oracle), data, 0.2, decode)}
    out = membership_audit(raw, num_resamples=200, small_holdout=4)
    for attack in ("loss", "zlib", "min_k", "min_k_pp"):
        mem = out["original"]["attacks"][attack]
        assert mem["auc"] > 0.95 and mem["tpr_at_fpr"]["0.05"]["tpr"] > 0.5, attack
        assert mem["priv_leak"] < -80  # MUSE: -100 = perfectly separable, the oracle ~ 0
        assert out["oracle"]["attacks"][attack]["priv_leak"] == pytest.approx(0.0)
    calibrated = out["original"]["attacks"]["ref_oracle_loss"]
    assert calibrated["auc"] > 0.95 and out["oracle"]["attacks"]["ref_oracle_loss"]["auc"] == 0.5
    # a model that saw none of 60 texts: "members" and "non-members" are alike
    rng = np.random.default_rng(5)
    unseen = {BASE + 100 + i: rng.integers(4, VOCAB, size=24) for i in range(60)}
    random_data = EvalData(forget_ids=list(unseen)[:30], retained_ids=[], related_ids=[], holdout_ids=list(unseen)[30:],
                           titles={}, tokens=unseen, probes=[], encode=encode, bos_id=None, decode=decode)
    random_model = NullTransformer(original.cfg).eval()
    scores = deployment_scores(Deployment("random", random_model, lambda s: SinkMode.sink_on(s)), random_data, 0.2,
                               decode)
    for attack, summary in membership_audit({"random": scores}, oracle=None, num_resamples=200)["random"][
            "attacks"].items():
        assert 0.25 < summary["auc"] < 0.75 and summary["auc_ci"][0] < 0.5 < summary["auc_ci"][1], attack
    spread = small_holdout_spread(scores["forget"]["loss"], scores["holdout"]["loss"], n=4)
    lo, hi = spread["auc_subsets"][1:]
    assert hi - lo > 0.2 and spread["auc_all"] == pytest.approx(MI.auc(scores["forget"]["loss"],
                                                                       scores["holdout"]["loss"]))


def test_steps_to_threshold():
    curve = {"steps": [0, 1, 2, 4, 8], "accuracy": [0.1, 0.2, 0.45, 0.5, 0.9]}
    assert steps_to_threshold(curve, 0.5) == 4 and steps_to_threshold(curve, 0.1) == 0
    assert steps_to_threshold(curve, 0.95) is None
    with pytest.raises(ValueError, match="conditions"):
        RelearnConfig(conditions=("forget_text", "bogus"))


def test_full_audit_of_a_memorised_model(world, tmp_path):
    texts, original, oracle = world
    probes = fact_probes(texts, TRAINED) + fact_probes(texts, HOLDOUT, per_source=1)
    probes.append({"probe_id": "s0", "kind": "shared", "prompt": "w5 w6", "answer": "w7", "distractors": ["w8"],
                   "source_ids": [FORGET[0], TRAINED[9]]})
    data = _data(texts, probes)
    data.related_ids = [TRAINED[9]]
    embedder = ModelEmbedder(original.transformer.wte.weight, lambda t: [sum(map(ord, w)) % VOCAB for w in t.split()])
    index = SourceIndex.build(TRAINED, [data.titles[s] for s in TRAINED], embedder)
    route_all = routed_deployment("routed", original, index, embedder, [], data.titles).mode_for
    oracle_own = [s for s in TRAINED if s not in FORGET]
    oracle_index = SourceIndex(np.asarray(oracle_own), index.embeddings[np.isin(index.source_ids, oracle_own)])
    deployments = [gold_deployment("original", original, set(TRAINED), route_all),
                   routed_deployment("unlearned", _unlearned(original), index, embedder, FORGET, data.titles),
                   routed_deployment("oracle", oracle, oracle_index, embedder, [], data.titles)]
    cfg = EvalConfig(baselines=(), membership=MembershipConfig(num_resamples=100, small_holdout=4),
                     quantize_bits=(4,), relearn=RelearnConfig(steps=4, eval_at=(0, 2, 4), num_sources=2))
    result = run_evaluation(deployments, data, cfg)
    deps = result["deployments"]
    assert deps["original"]["probes"]["unique_forget"]["accuracy"] > 0.9
    assert set(result["quantization"]["deployments"]) == {"unlearned@int4", "oracle@int4"}
    assert "probes_vs_oracle" in result["quantization"]["deployments"]["unlearned@int4"]
    wc = result["worst_case"]["deployments"]
    assert wc["unlearned"]["num_routes"] == len(TRAINED) - len(FORGET) + 2 and "vs_oracle" in wc["unlearned"]
    rl = result["relearning"]
    assert rl["threshold"] == pytest.approx((rl["level_original"] + rl["level_oracle"]) / 2)
    assert set(rl["conditions"]["forget_text"]["deployments"]) == {"unlearned", "oracle"}
    assert rl["conditions"]["related_text"]["num_texts"] == 1
    topics = {f["topic"]: f for f in findings(result)}
    assert "membership of the forgotten text" in topics and "unique facts of the forgotten sources" in topics
    extra = ReportSection("residue", "Residue study", "A hook for other studies.", {"value": 1},
                          plots=lambda out: [_empty_png(out / "residue.png")])
    files = write_report(result, tmp_path, [extra])
    assert {"probes.png", "roc.png", "worst_case.png", "quantization.png", "relearning.png",
            "residue.png"} <= set(files["plots"])
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["sections"]["residue"] == {"value": 1}
    md = (tmp_path / "report.md").read_text()
    assert "## What NULLs do and do not remove" in md and "## Residue study" in md and "## Worst-case routing" in md


def _empty_png(path) -> str:
    from nulls_dist.evaluation.report_plots import pyplot, save_png

    fig, _ = pyplot().subplots()
    return save_png(fig, path)


def _probe_summary(correct: list[bool]) -> dict:
    from nulls_dist.evaluation import metrics as M

    return M.summarise_probes([M.ProbeResult(f"p{i}", "unique", 0.1 if c else 2.0, c) for i, c in enumerate(correct)])


def test_findings_follow_the_numbers():
    from nulls_dist.evaluation import metrics as M

    known, unknown = [True] * 18 + [False] * 2, [True] * 4 + [False] * 16

    def result(unlearned_correct):
        deps = {}
        for name, correct in (("original", known), ("unlearned", unlearned_correct), ("oracle", unknown)):
            groups = {g: _probe_summary(correct if g == "unique_forget" else known) for g in
                      ("unique_forget", "shared_forget_via_retained", "unique_related")}
            deps[name] = {"probes": groups, "loss": {"retained": 0.1}}
        deps["unlearned"]["probes_vs_oracle"] = {"unique_forget": M.compare_probes(
            deps["unlearned"]["probes"]["unique_forget"], deps["oracle"]["probes"]["unique_forget"])}
        return {"deployments": deps}

    removed = {f["topic"]: f for f in findings(result(unknown))}
    kept = {f["topic"]: f for f in findings(result(known))}
    assert removed["unique facts of the forgotten sources"]["verdict"] == "removed"
    assert kept["unique facts of the forgotten sources"]["verdict"] == "not removed"
    assert "0.90 before -> 0.90 unlearned, oracle 0.20" in kept["unique facts of the forgotten sources"]["text"]
    assert removed["facts the forgotten sources share with surviving ones"]["verdict"] == "kept"
    # relearning: fewer steps than the oracle is "not removed"; a condition with no text to fine-tune on is not
    # measured (and never reported as removed)
    runs = lambda u, o: {"unlearned": {"steps_to_threshold": u}, "oracle": {"steps_to_threshold": o}}  # noqa: E731
    relearn = {"threshold": 0.5, "level_oracle": 0.1, "level_original": 0.9, "num_probes": 8, "config": {"steps": 64},
               "attacked_sources": [1, 2], "conditions": {"forget_text": {"deployments": runs(4, None), "num_tokens": 300},
                                                          "related_text": {"deployments": runs(None, None), "num_tokens": 0}}}
    topics = {f["topic"]: f for f in findings({**result(unknown), "relearning": relearn})}
    assert topics["relearning on forget text"]["verdict"] == "not removed"
    assert topics["relearning on related text"]["verdict"] == "not measured"


def test_batched_probe_scores_equal_one_probe_at_a_time(world):
    texts, original, _ = world
    probes = fact_probes(texts, TRAINED[:6])
    items = [(p, SinkMode.sink_on(p["source_ids"][0]) if i % 3 else SinkMode.backbone_only())
             for i, p in enumerate(probes)]
    for batched, (probe, mode) in zip(score_probes(original, items, encode, None), items):
        alone = score_probe(original, probe, mode, encode, None)
        assert batched.correct == alone.correct and batched.probe_id == alone.probe_id
        assert batched.truth_ratio == pytest.approx(alone.truth_ratio, rel=1e-4)
