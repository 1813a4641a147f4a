"""The forget-budget study: its measurements on a real (untrained) NULL model - a survivor sharing no sink with
the forget set is untouched, one sharing sinks is not -, the comparisons it reports, and the driver's wiring:
the seeded plan (`--plan-only`: real data preparation of the 1,002-article SynthWiki, no training), its refusal
of changed settings, the goal, and every config's overrides making a valid model."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from nulls_dist.cli import forget_budget_study as driver
from nulls_dist.config import NullConfig
from nulls_dist.evaluation import budget_study as study
from nulls_dist.evaluation import metrics as M
from nulls_dist.evaluation.evaluate import Deployment
from nulls_dist.model import NullTransformer, SinkMode

OFFSET = 4096


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = NullConfig.from_preset("debug", sink_strategy="uniform", sink_k=8, vocab_size=300, num_sources=64,
                                 min_source_id=OFFSET)
    return NullTransformer(cfg).eval()


def _data(num: int = 12) -> study.StudyData:
    rng = np.random.default_rng(0)
    probes = [{"probe_id": f"u{i:05d}", "kind": "unique", "prompt": f"fact {i} of article {i // 2} is",
               "answer": f"v{i % 7}", "distractors": [f"v{(i + j) % 7}" for j in range(1, 5)],
               "source_ids": [OFFSET + i // 2]} for i in range(2 * num)]
    tokens = {OFFSET + s: rng.integers(3, 300, size=40) for s in range(num)}
    encode = lambda text: [3 + (ord(c) % 290) for c in text]  # noqa: E731  a real (if crude) tokenization
    return study.StudyData(probes, tokens, encode, bos_id=1)


def test_retained_step_uses_own_sinks_minus_the_forgotten_ones(model):
    data = _data()
    assign = model.sink_assignment
    rows = {s: set(assign.rows(torch.tensor([s]))[0].tolist()) for s in data.tokens}
    forget = [OFFSET + 0, OFFSET + 1]
    union = rows[forget[0]] | rows[forget[1]]
    survivors = [s for s in data.tokens if s not in forget]
    clean = [s for s in survivors if not rows[s] & union]
    hit = [s for s in survivors if rows[s] & union]
    assert clean and hit  # the fixture has both kinds
    before = study.retained_step(model, data, survivors, [])
    after = study.retained_step(model, data, survivors, forget)
    for s in survivors:
        assert before["loss_per_article"][str(s)] == pytest.approx(M.text_loss(model, data.tokens[s],
                                                                               SinkMode.sink_on(s)), abs=0)
    for s in clean:  # nothing of its sinks is forgotten: bit for bit the same
        assert after["loss_per_article"][str(s)] == before["loss_per_article"][str(s)]
    for s in hit:
        assert after["loss_per_article"][str(s)] != before["loss_per_article"][str(s)]
    assert before["probes"]["num"] == after["probes"]["num"] == 2 * len(survivors)
    cmp = study.against_before(after, before)
    assert cmp["loss_ratio"] == pytest.approx(after["loss"] / before["loss"])
    assert cmp["accuracy_diff"][1] <= cmp["accuracy_diff"][0] <= cmp["accuracy_diff"][2]
    same = study.against_before(before, before)
    assert same["loss_diff"] == [0.0, 0.0, 0.0] and same["loss_ratio"] == 1.0


def test_forgotten_step_compares_with_the_oracle(model):
    data = _data()
    forget = [OFFSET + 0, OFFSET + 1]
    route = lambda sid: SinkMode.sink_off(OFFSET + 5, forget)  # noqa: E731
    deployments = [Deployment("original", model, SinkMode.sink_on), Deployment("unlearned", model, route),
                   Deployment("oracle", model, route)]
    out = study.forgotten_step(deployments, data, forget)
    assert out["num_probes"] == 4 and out["chance_accuracy"] == pytest.approx(0.2)
    assert "probes_vs_oracle" not in out["deployments"]["oracle"]
    assert out["deployments"]["unlearned"]["probes_vs_oracle"]["accuracy_diff"] == [0.0, 0.0, 0.0]  # same model


def test_article_shares_and_dose_response(model):
    data = _data()
    assign = model.sink_assignment
    rows = {s: set(assign.rows(torch.tensor([s]))[0].tolist()) for s in data.tokens}
    forget = [OFFSET + 0, OFFSET + 1]
    survivors = [s for s in data.tokens if s not in forget]
    union = rows[forget[0]] | rows[forget[1]]
    shares = study.article_shares(assign, survivors, forget, model.cfg.n_layer, False)
    assert shares == {s: len(rows[s] - union) / len(rows[s]) for s in survivors}
    assert set(study.article_shares(assign, survivors, [], model.cfg.n_layer, False).values()) == {1.0}
    before = study.retained_step(model, data, survivors, [])
    after = study.retained_step(model, data, survivors, forget)
    bins = study.dose_response([(after, shares), (before, {s: 1.0 for s in survivors})], before, data.probes)
    assert sum(b["num_probes"] for b in bins) == 2 * before["probes"]["num"]
    untouched = next(b for b in bins if b["share"].startswith("1.0"))
    clean = [s for s in survivors if shares[s] == 1.0]
    assert untouched["num_probes"] == 2 * len(survivors) + 2 * len(clean)  # every probe at F=0, the clean ones after
    assert all(0 <= b["accuracy"] <= 1 and 0 <= b["accuracy_before"] <= 1 for b in bins)


def test_goal_needs_both_halves():
    step = {"forgotten": 100, "against_before": {"accuracy_ratio": 0.97},
            "forgotten_unique_facts": {"unlearned": {"accuracy_diff_vs_oracle": [0.01, -0.03, 0.05]}}}
    assert driver.goal([step])["met"] is True
    step["against_before"]["accuracy_ratio"] = 0.9
    assert driver.goal([step])["met"] is False
    step["against_before"]["accuracy_ratio"] = 0.97
    step["forgotten_unique_facts"]["unlearned"]["accuracy_diff_vs_oracle"] = [0.2, 0.1, 0.3]
    assert driver.goal([step])["met"] is False and driver.goal([step])["forgotten_at_oracle_level"] is False
    assert driver.goal([])["met"] is None


def test_config_overrides_make_a_valid_model():
    for cfg in driver.CONFIGS.values():
        values = dict(NullConfig.from_preset("debug").to_dict(), intermediate_size=4096, p_gen=0.03125, p_mem=0.01)
        for item in cfg.overrides:
            if not item.lstrip("+").startswith("model.overrides."):
                assert item == "sink_tables.mode=sharded" and cfg.rows >= 2**20
                continue
            key, value = item.lstrip("+").removeprefix("model.overrides.").split("=")
            values[key] = int(value) if key in ("intermediate_size", "sink_k", "sink_pool_size") else (
                float(value) if key in ("p_gen", "p_mem") else value)
        model_cfg = NullConfig(**values)
        assert model_cfg.n_backbone == 128 and model_cfg.n_sink == cfg.rows
        if model_cfg.sink_k is not None:
            assert model_cfg.sink_k == cfg.k


def test_plan_and_refused_changes(tmp_path, capsys):
    work = tmp_path / "study"
    driver.main(["--workdir", str(work), "--plan-only", "--retained-articles", "50"])
    assert not (work / "results.json").exists() and not (work / "paper_pool").exists()  # nothing trained
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["forget_order"] == 100 and printed["retained"] == 50
    plan = json.loads((work / "plan.json").read_text())
    assert len(plan["forget_order"]) == 100 and len(set(plan["forget_order"])) == 100
    assert len(plan["retained_ids"]) == 50 and not set(plan["retained_ids"]) & set(plan["forget_order"])
    assert plan["num_trained"] == 1002 - 8  # the data config's 8 held-out articles are never drawn
    assert driver.make_plan(work, 0, 50) == plan  # seeded: the same plan again
    with pytest.raises(RuntimeError, match="other settings"):
        driver.make_plan(work, 1, 50)
    with pytest.raises(SystemExit) as exit_info:
        driver.main(["--workdir", str(work), "--configs", "no_such_config"])
    assert exit_info.value.code == 2 and "no_such_config" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
