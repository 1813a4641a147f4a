"""The residue study driver (nulls_dist/bench/residue_study.py) end to end on a shrunken model: it prepares
SynthWiki with 48 holdout articles, trains the calibration reference and one (original, oracle) pair through the
real `nulls-train` (3 steps of a 1-layer NULL via --train-override), measures the pair (membership with the
reference- and oracle-calibrated attacks, probes, losses, the residue) and writes results.json and the plots; a
second call trains nothing and reuses the cached measurement. Plus the forget set's rule and the goal check."""
from __future__ import annotations

import json

import pytest

from nulls_dist.bench import residue_study as S

TINY = ["train.max_steps=3", "optim.warmup_steps=1", "checkpoint.every_n_steps=3", "eval.num_batches=0",
        "logging.log_every=1", "model.overrides.n_layer=1", "model.overrides.n_embd=32", "model.overrides.n_head=2",
        "model.overrides.n_query_groups=1", "model.overrides.head_size=16", "model.overrides.intermediate_size=512"]


def test_forget_set_skips_held_out_articles():
    held = {S.ID_OFFSET + 0, S.ID_OFFSET + 7}  # cluster 0's first pick and cluster 1's
    got = S.forget_set(held, 240)
    assert len(got) == S.NUM_FORGET and not set(got) & held
    assert got[:3] == [S.ID_OFFSET + 1, S.ID_OFFSET + 8, S.ID_OFFSET + 12 + 2]


def _eval(min_k, calibrated, facts, retained):
    return {"membership": {"plain": {"min_k": {"auc": min_k[0], "auc_retrain": min_k[1]}},
                           "reference_calibrated": {S.CALIBRATED_ATTACK: {"auc": calibrated[0],
                                                                          "auc_retrain": calibrated[1]}}},
            "probes_vs_oracle": {"unlearned": {"unique_forget": {"accuracy_diff": facts}}},
            "loss": {"unlearned": {"retained": retained}}}


def test_goal_checks_each_condition():
    base = _eval((0.9, 0.5), (0.9, 0.5), [0.0, -0.1, 0.1], 0.10)
    assert not S.goal(base, base)["reached"]
    good = _eval((0.55, 0.48), (0.6, 0.51), [0.02, -0.08, 0.11], 0.104)
    assert S.goal(good, base)["reached"]
    for bad, check in ((_eval((0.62, 0.48), (0.6, 0.51), [0.02, -0.08, 0.11], 0.1), "min_k_auc_within_0.1"),
                       (_eval((0.55, 0.48), (0.7, 0.51), [0.02, -0.08, 0.11], 0.1), "calibrated_auc_within_0.1"),
                       (_eval((0.55, 0.48), (0.6, 0.51), [0.2, 0.05, 0.3], 0.1), "unique_facts_at_oracle_level"),
                       (_eval((0.55, 0.48), (0.6, 0.51), [0.02, -0.08, 0.11], 0.106), "retained_loss_within_5pct")):
        result = S.goal(bad, base)
        assert not result["reached"] and [k for k, ok in result["checks"].items() if not ok] == [check]


def test_the_study_end_to_end_on_a_tiny_model(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--workdir", str(work), "--out", str(out), "--only", "s250_pgen32",
            *[a for o in TINY for a in ("--train-override", o)]]
    results = S.main(args)
    pair = results["pairs"]["s250_pgen32"]
    assert {"membership", "probes", "probes_vs_oracle", "loss", "residue", "goal", "example"} <= set(pair)
    plain, calibrated = pair["membership"]["plain"], pair["membership"]["reference_calibrated"]
    assert set(plain) == {"loss", "zlib", "min_k", "min_k_pp"} and "ref_loss" in calibrated
    assert plain["min_k"]["num_members"] == 24 and plain["min_k"]["num_non_members"] == 48
    assert 0.0 <= plain["min_k"]["auc"] <= 1.0 and 0.0 <= calibrated["ref_loss"]["auc_retrain"] <= 1.0
    assert pair["membership"]["oracle_calibrated"]["ref_min_k"]["num_members"] == 24
    assert pair["probes"]["unlearned"]["unique_forget"]["num"] == 96  # 24 articles x 4 unique facts
    assert pair["goal"]["checks"]["retained_loss_within_5pct"]  # its own baseline
    families = pair["residue"]["families"]
    for family in ("name", "word_spread", "mention"):
        assert sum(r["share"]["loss"] for r in families[family].values()) == pytest.approx(1.0)
    assert sorted(results["plots"]) == ["residue_scan.png", "token_gaps.png"]
    for name in results["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((out / "results.json").read_text())
    assert written["forget_ids"] == results["forget_ids"] and not set(written["forget_ids"]) & set(
        written["holdout_ids"])
    cached = (work / "runs" / "s250_pgen32" / "eval.json").stat().st_mtime_ns
    capsys.readouterr()
    again = S.main([*args, "--no-train"])
    assert (work / "runs" / "s250_pgen32" / "eval.json").stat().st_mtime_ns == cached
    assert again["pairs"]["s250_pgen32"]["membership"] == pair["membership"]
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"]["s250_pgen32"]["goal_reached"] is not None
    with pytest.raises(RuntimeError, match="train.max_steps"):  # a trained run that is not the study's
        S.main([*args, "--train-override", "train.max_steps=4"])
