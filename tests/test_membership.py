"""Membership inference (nulls_dist/evaluation/membership.py): statistics against hand-computed values on small
inputs, the scores' definitions (zlib on known strings, Min-K%++ against a direct per-position computation from
a debug NullTransformer's full logits), reproducible bootstrap intervals and MUSE's PrivLeak sign."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch

from nulls_dist.config import NullConfig
from nulls_dist.evaluation import membership as MI
from nulls_dist.evaluation import metrics as M
from nulls_dist.model import NullTransformer, SinkMode

BASE = 4096


def _model() -> NullTransformer:
    torch.manual_seed(0)
    return NullTransformer(NullConfig.from_preset("debug", sink_strategy="uniform")).eval()


def test_auc_counts_ties_half():
    # pairs (member, non-member): (1,2) 0, (1,0) 1, (2,2) 0.5, (2,0) 1, (3,2) 1, (3,0) 1 -> 4.5 / 6
    assert MI.auc([1, 2, 3], [2, 0]) == pytest.approx(0.75)
    assert MI.auc([1, 1], [1, 1, 1]) == pytest.approx(0.5)
    assert MI.auc([5], [1, 2]) == 1.0 and MI.auc([0], [1, 2]) == 0.0
    rng = np.random.default_rng(3)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)  # many ties
    assert MI.auc(pos, neg) == pytest.approx(M.rank_auc(pos.tolist(), neg.tolist()))
    assert np.isnan(MI.auc([], [1.0]))
    with pytest.raises(ValueError, match="finite"):
        MI.auc([float("nan")], [1.0])


def test_tpr_at_fpr_with_few_non_members():
    neg = [0.1, 0.2, 0.3, 0.4, 0.5]  # n = 5: FPR resolves 0.2 at best
    pos = [0.35, 0.45, 0.6, 0.7]
    at20 = MI.tpr_at_fpr(pos, neg, 0.2)  # one false positive allowed: threshold = 2nd highest non-member, 0.4
    assert at20 == {"tpr": 0.75, "threshold": 0.4, "achieved_fpr": 0.2, "resolvable": True}
    at1 = MI.tpr_at_fpr(pos, neg, 0.01)  # below 1/n: TPR at FPR 0 (above the highest non-member), flagged
    assert at1 == {"tpr": 0.5, "threshold": 0.5, "achieved_fpr": 0.0, "resolvable": False}
    assert MI.tpr_at_fpr(pos, neg, 0.39) == MI.tpr_at_fpr(pos, neg, 0.2)  # steps, never interpolated
    everything = MI.tpr_at_fpr(pos, neg, 1.0)
    assert everything["tpr"] == 1.0 and everything["threshold"] is None and everything["achieved_fpr"] == 1.0
    # a tie at the threshold: neither tied non-member counts as a false positive (score > threshold)
    tied = MI.tpr_at_fpr([0.5, 0.6], [0.5, 0.5, 0.1, 0.2], 0.25)
    assert tied == {"tpr": 0.5, "threshold": 0.5, "achieved_fpr": 0.0, "resolvable": True}
    # floor(alpha n) despite float error: 0.29 * 100 = 28.999999999999996 still allows 29 false positives
    grid = np.arange(100, dtype=float)
    assert MI.tpr_at_fpr([1000.0], grid, 0.29)["achieved_fpr"] == pytest.approx(0.29)
    with pytest.raises(ValueError, match="fpr"):
        MI.tpr_at_fpr(pos, neg, 1.5)


def test_roc_curve_points_and_area():
    pos, neg = [1.0, 2.0, 3.0], [2.0, 0.0]
    curve = MI.roc_curve(pos, neg)
    assert curve["fpr"] == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert curve["tpr"] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    assert curve["thresholds"] == [None, 3.0, 2.0, 1.0, 0.0] and curve["min_positive_fpr"] == 0.5
    assert np.trapezoid(curve["tpr"], curve["fpr"]) == pytest.approx(MI.auc(pos, neg))
    rng = np.random.default_rng(0)
    p, n = rng.integers(0, 6, 50).astype(float), rng.integers(0, 6, 20).astype(float)
    c = MI.roc_curve(p, n)
    assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(MI.auc(p, n))
    log_axis = MI.roc_curve(pos, neg, zero_fpr_as=0.25)
    assert log_axis["fpr"][:2] == [0.25, 0.25] and min(log_axis["fpr"]) > 0


def test_perfect_separation():
    pos, neg = np.arange(10, 20, dtype=float), np.arange(0, 10, dtype=float)
    summary = MI.membership_summary({"s": pos}, {"s": neg}, num_resamples=50)["s"]
    assert summary["auc"] == 1.0 and summary["auc_ci"] == [1.0, 1.0]
    for alpha in ("0.01", "0.05"):
        assert summary["tpr_at_fpr"][alpha]["tpr"] == 1.0 and summary["tpr_at_fpr"][alpha]["tpr_ci"] == [1.0, 1.0]
    assert [0.0, 1.0] in [[f, t] for f, t in zip(summary["roc"]["fpr"], summary["roc"]["tpr"])]


def test_priv_leak_follows_muse():
    # MUSE's AUC is 1 - ours: a model separating forget from holdout perfectly (ours 1.0) against a retrained
    # model at chance gives -100 (MUSE's target models: about -99); matching the retrained model gives 0;
    # forgotten text scored less member-like than never-seen text (over-unlearning) gives a positive value.
    assert MI.priv_leak_muse(1.0, 0.5) == pytest.approx(-100.0)
    assert MI.priv_leak_muse(0.62, 0.62) == pytest.approx(0.0)
    assert MI.priv_leak_muse(0.25, 0.5) == pytest.approx(50.0)
    assert np.isnan(MI.priv_leak_muse(0.7, 1.0)) and np.isnan(MI.priv_leak_muse(float("nan"), 0.5))
    rng = np.random.default_rng(1)
    members, non_members = rng.normal(3.0, 0.1, 12), rng.normal(0.0, 0.1, 12)  # separable under the target
    retrain_members, retrain_non_members = rng.normal(0.0, 1.0, 12), rng.normal(0.0, 1.0, 12)
    res = MI.membership_summary({"loss": members}, {"loss": non_members}, {"loss": retrain_members},
                                {"loss": retrain_non_members}, num_resamples=200)["loss"]
    assert res["auc"] == 1.0
    assert res["priv_leak"] == pytest.approx(MI.priv_leak_muse(1.0, MI.auc(retrain_members, retrain_non_members)))
    assert res["priv_leak"] < -50 and res["priv_leak_ci"][1] <= 0.0
    with pytest.raises(ValueError, match="same sources"):
        MI.membership_summary({"loss": members}, {"loss": non_members}, {"loss": retrain_members[:5]},
                              {"loss": retrain_non_members})


def test_bootstrap_is_seeded_and_json_ready():
    rng = np.random.default_rng(2)
    members = {"loss": rng.normal(0.5, 1.0, 30), "min_k": rng.normal(0.2, 1.0, 30)}
    non_members = {"loss": rng.normal(0.0, 1.0, 40), "min_k": rng.normal(0.0, 1.0, 40)}
    a = MI.membership_summary(members, non_members, num_resamples=300, seed=7)
    assert a == MI.membership_summary(members, non_members, num_resamples=300, seed=7)
    b = MI.membership_summary(members, non_members, num_resamples=300, seed=8)
    assert a["loss"]["auc"] == b["loss"]["auc"] and a["loss"]["auc_ci"] != b["loss"]["auc_ci"]
    lo, hi = a["loss"]["auc_ci"]
    assert lo < a["loss"]["auc"] < hi
    assert a["loss"]["tpr_at_fpr"]["0.01"]["resolvable"] is False  # 40 non-members resolve 2.5%
    assert a["loss"]["tpr_at_fpr"]["0.05"]["resolvable"] is True
    assert a["loss"]["min_positive_fpr"] == pytest.approx(1 / 40)
    json.dumps(a, allow_nan=False)
    with pytest.raises(ValueError, match="non-member"):
        MI.membership_summary({"x": [1.0]}, {"y": [0.0]})


def test_zlib_definition():
    assert MI.zlib_bytes("") == 8  # 2-byte header + an empty final block (3 bytes: fixed Huffman) + Adler-32
    assert MI.zlib_bytes("é") == len(zlib.compress("é".encode("utf-8"), 6))
    text = "the cat sat on the mat " * 20
    assert MI.zlib_bytes(text) == len(zlib.compress(text.encode("utf-8")))
    assert MI.zlib_bytes(text) < len(text) // 4  # repetitive text compresses
    lp = np.array([-1.0, -3.0])
    assert MI.zlib_score(lp, text) == pytest.approx(-2.0 / MI.zlib_bytes(text))
    # the same loss on a less compressible text is closer to 0, i.e. more member-like
    varied = "".join(chr(97 + (i * 7919) % 26) for i in range(len(text)))
    assert MI.zlib_score(lp, varied) > MI.zlib_score(lp, text)


def test_min_k_pp_matches_direct_computation_from_full_logits():
    model = _model()
    mode = SinkMode.sink_on(BASE + 3)
    tokens = torch.randint(0, model.cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    stats = MI.token_stats(model, tokens, mode)
    with torch.no_grad():
        logits = model(tokens[None, :-1], None, mode=mode)[0].double()  # (T-1, V)
    z = []
    for i in range(len(tokens) - 1):  # independent, one position at a time, float64
        logp = torch.log_softmax(logits[i], dim=-1)
        p = logp.exp()
        mu = float((p * logp).sum())
        sigma = float(((p * (logp - mu) ** 2).sum()).sqrt())
        z.append((float(logp[tokens[i + 1]]) - mu) / sigma)
    k = 0.3
    lowest = np.sort(z)[: int(np.ceil(k * len(z)))]
    assert MI.min_k_pp_score(stats, k) == pytest.approx(lowest.mean(), rel=1e-5)
    assert stats.logprobs == pytest.approx(M.token_logprobs(model, tokens, mode), abs=1e-6)
    assert MI.min_k_score(stats.logprobs, k) == pytest.approx(M.min_k_prob(stats.logprobs, k))
    assert MI.loss_score(stats.logprobs) == pytest.approx(-M.text_loss(model, tokens, mode), rel=1e-6)


def test_scores_of_texts_longer_than_a_window_and_reference_calibration():
    model = _model()
    block = model.cfg.block_size
    gen = torch.Generator().manual_seed(1)
    texts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen) for n in (block + 30, 17)]
    modes = [SinkMode.sink_on(BASE + 1), SinkMode.backbone_only()]
    stats = MI.token_stats(model, texts[0], modes[0])
    assert stats.logprobs.shape == stats.mean.shape == stats.std.shape == (block + 29,)
    assert stats.logprobs == pytest.approx(M.token_logprobs(model, texts[0], modes[0]), abs=1e-6)
    assert np.all(stats.std > 0) and np.all(stats.mean <= 0)
    scores = MI.score_texts(model, texts, modes, texts=["some text", "other"])
    assert set(scores) == set(MI.SCORES) and all(v.shape == (2,) for v in scores.values())
    no_text = MI.score_texts(model, texts, modes)
    assert "zlib" not in no_text and no_text["loss"] == pytest.approx(scores["loss"])
    ref = MI.reference_calibrated(scores, {"loss": scores["loss"] - 1.0, "min_k": scores["min_k"]})
    assert set(ref) == {"ref_loss", "ref_min_k"}
    assert ref["ref_loss"] == pytest.approx([1.0, 1.0]) and ref["ref_min_k"] == pytest.approx([0.0, 0.0])
    with pytest.raises(ValueError, match="same texts"):
        MI.reference_calibrated({"loss": np.zeros(2)}, {"loss": np.zeros(3)})
    with pytest.raises(ValueError, match="one mode"):
        MI.score_texts(model, texts, modes[:1])


def test_vectorised_bootstrap_equals_one_resample_at_a_time():
    rng = np.random.default_rng(4)
    pos, neg = rng.integers(0, 6, 17).astype(float), rng.integers(0, 6, 23).astype(float)  # ties
    picks_pos, picks_neg = rng.integers(0, 17, (50, 17)), rng.integers(0, 23, (50, 23))
    assert MI._resampled_auc(pos, neg, picks_pos, picks_neg).tolist() == \
        [MI.auc(pos[i], neg[j]) for i, j in zip(picks_pos, picks_neg)]
    for alpha in (0.0, 0.01, 0.05, 0.3, 1.0):
        assert MI._resampled_tpr(pos, neg, picks_pos, picks_neg, alpha).tolist() == \
            [MI.tpr_at_fpr(pos[i], neg[j], alpha)["tpr"] for i, j in zip(picks_pos, picks_neg)]
