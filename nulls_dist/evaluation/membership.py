"""Membership inference as the literature runs it now: per-text scores from a deployed model, a
reference-calibrated attack, and the statistics papers report (AUC, TPR at low FPR, bootstrap intervals over
sources, MUSE's PrivLeak, ROC points).

Every score is oriented so that HIGHER = MORE MEMBER-LIKE. With lp_i = log p(t_i | t_<i) (natural log) over
the T-1 predicted tokens of a text (`metrics.token_logprobs`, block_size windows):
- `loss`: mean lp_i = -(mean NLL), the LOSS attack (Yeom et al. 2018, "Privacy Risk in Machine Learning").
- `zlib`: mean lp_i / zlib(x), zlib(x) = byte length of `zlib.compress` (level 6) of the text's UTF-8 bytes.
  Carlini et al. 2021 ("Extracting Training Data from Large Language Models", USENIX Security) rank by the
  ratio of the log-perplexity (mean NLL) to the zlib entropy; MUSE and the Min-K% code divide the mean NLL
  by the compressed byte length, as here, with the sign flipped to keep "higher = member".
- `min_k`: mean of the lowest k% of lp_i (Shi et al. 2024, "Detecting Pretraining Data from Large Language
  Models", ICLR); `metrics.min_k_prob`, which keeps max(1, ceil(k n)) values (the papers' code: int(k n)).
- `min_k_pp`: Min-K%++ (Zhang et al. 2024, "Min-K%++: Improved Baseline for Detecting Pre-Training Data from
  Large Language Models", arXiv 2404.02936): per position z_i = (lp_i - mu_i) / sigma_i with mu_i = E_{v~p}[log
  p(v)] and sigma_i^2 = E_{v~p}[(log p(v) - mu_i)^2] under the model's own next-token distribution p = p(. |
  t_<i), over the full (padded) vocabulary; the score is the mean of the lowest k% of z_i (same count as
  `min_k`). sigma is floored at `MIN_K_PP_STD_FLOOR` (a one-hot p has sigma 0).
- reference-calibrated (`ref_<score>` = target score - reference score on the same text): the difficulty
  calibration of Watson et al. 2022 ("On the Importance of Difficulty Calibration in Membership Inference
  Attacks", ICLR). `ref_loss` = L_ref(x) - L_target(x) (mean NLLs) is also the ranking of offline LiRA (Carlini
  et al. 2022, "Membership Inference Attacks From First Principles", S&P) with a single OUT reference model and
  one global variance, and the "reference model" attack of Carlini et al. 2021 as a difference instead of a
  ratio. The reference must not have seen the sources under test: the retrain oracle is one (then the oracle
  scored against itself is all zeros, AUC 0.5 by construction), a model trained on a disjoint split another.

Statistics over member scores (m of them) and non-member scores (n):
- AUC = P(member > non-member) + 0.5 P(tie) (Mann-Whitney U / (m n)); 1 = perfect separation, 0.5 = chance.
- TPR at FPR alpha: the classifier "member iff score > tau" with tau the (f+1)-th highest non-member score,
  f = floor(alpha n) (tau = -inf when f >= n): the highest TPR of any such threshold whose empirical FPR is <=
  alpha (the ROC step, never interpolated). The empirical FPR takes the values k/n only: the smallest
  positive FPR resolvable with n non-members is 1/n, and for alpha < 1/n the value reported is the TPR at FPR
  0 (tau = the highest non-member score), flagged `resolvable: false`. E.g. 8 holdout sources resolve 12.5%
  at best: TPR@1% and TPR@5% are both TPR@0 there; 1% needs >= 100 non-members.
- bootstrap intervals: members and non-members are resampled with replacement independently (stratified, so
  both classes keep their sizes), `num_resamples` times from a seeded numpy Generator; the interval is the
  percentile one. For PrivLeak the same resampled sources are used for both models (paired).
- PrivLeak (MUSE, Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models"):
  (AUC_unlearned - AUC_retrain) / AUC_retrain * 100 with MUSE's AUC, which is the AUC of telling D_forget from
  D_holdout with the *forget* set as the negative class (their code labels forget 0, holdout 1 and scores
  -loss), i.e. 1 - the AUC above (OpenUnlearning's `privleak` converts the same way). In this module's
  convention that is PrivLeak = ((1 - A_u) - (1 - A_r)) / (1 - A_r) * 100: about 0 for a model that leaks as
  much as the retrained one, -100 for a model that separates forget from holdout perfectly (under-unlearning:
  MUSE's target models score ~-99), large positive for over-unlearning (forgotten text scored *less*
  member-like than never-seen text). NaN when A_r = 1.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from nulls_dist.evaluation.metrics import min_k_prob, window_log_softmax
from nulls_dist.model import SinkMode

SCORES = ("loss", "zlib", "min_k", "min_k_pp")
ZLIB_LEVEL = 6  # zlib's default, what `zlib.compress(data)` uses in the papers' code
MIN_K_PP_STD_FLOOR = 1e-6  # sigma floor; OpenUnlearning floors the variance at 1e-6, i.e. sigma at 1e-3 (same order)


# ------------------------------------------------------------------------------------------------ per-text scores
@dataclass
class TokenStats:
    """Per predicted token of one text (T-1 of them): its log-prob, and the mean and standard deviation of the
    log-probs under the model's own next-token distribution at that position (float64 numpy arrays)."""

    logprobs: np.ndarray  # (T-1,)
    mean: np.ndarray  # (T-1,) E_{v~p}[log p(v)] = -entropy
    std: np.ndarray  # (T-1,)


@torch.no_grad()
def token_stats(model, tokens: np.ndarray | torch.Tensor, mode: SinkMode) -> TokenStats:
    """(T,) token ids -> TokenStats over the T-1 next-token predictions in `mode` (block_size windows, as
    `metrics.token_logprobs`, whose values `logprobs` equals)."""
    lps, means, stds = [], [], []
    for logp, targets in window_log_softmax(model, tokens, mode):  # (w, V), (w,)
        p = logp.exp()
        mean = (p * logp).sum(-1)  # (w,)
        var = (p * (logp - mean[:, None]).square()).sum(-1)  # (w,) centred: no cancellation
        lps.append(logp.gather(1, targets[:, None])[:, 0])
        means.append(mean)
        stds.append(var.sqrt())
    if not lps:
        empty = np.zeros(0)
        return TokenStats(empty, empty, empty)
    as_np = lambda xs: torch.cat(xs).double().numpy()  # noqa: E731
    return TokenStats(as_np(lps), as_np(means), as_np(stds))


def zlib_bytes(text: str | bytes) -> int:
    """Length in bytes of the zlib-compressed UTF-8 text (level `ZLIB_LEVEL`)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return len(zlib.compress(data, ZLIB_LEVEL))


def loss_score(logprobs: np.ndarray) -> float:
    """-(mean NLL) of a text; higher = more member-like."""
    return float(np.mean(logprobs)) if len(logprobs) else float("nan")


def zlib_score(logprobs: np.ndarray, text: str | bytes) -> float:
    """-(mean NLL) / zlib_bytes(text); higher = more member-like."""
    return loss_score(logprobs) / zlib_bytes(text)


def min_k_score(logprobs: np.ndarray, k: float = 0.2) -> float:
    """Min-K% prob: mean of the lowest k% token log-probs; higher = more member-like."""
    return min_k_prob(np.asarray(logprobs), k)


def min_k_pp_score(stats: TokenStats, k: float = 0.2) -> float:
    """Min-K%++: mean of the lowest k% standardised log-probs (lp - mean) / std; higher = more member-like."""
    z = (stats.logprobs - stats.mean) / np.maximum(stats.std, MIN_K_PP_STD_FLOOR)
    return min_k_prob(z, k)


def text_scores(stats: TokenStats, text: str | bytes | None = None, k: float = 0.2) -> dict[str, float]:
    """Every score of one text: loss, min_k, min_k_pp, and zlib when the text itself is given."""
    out = {"loss": loss_score(stats.logprobs), "min_k": min_k_score(stats.logprobs, k),
           "min_k_pp": min_k_pp_score(stats, k)}
    if text is not None:
        out["zlib"] = zlib_score(stats.logprobs, text)
    return out


def score_texts(model, tokens: Sequence, modes: Sequence[SinkMode], texts: Sequence[str | bytes] | None = None,
                k: float = 0.2) -> dict[str, np.ndarray]:
    """Scores of several texts, each in its own mode: {score name: (num_texts,) float64}. `texts` (the decoded
    texts, for zlib) is optional."""
    if len(modes) != len(tokens) or (texts is not None and len(texts) != len(tokens)):
        raise ValueError(f"score_texts: {len(tokens)} token arrays, {len(modes)} modes, "
                         f"{'no' if texts is None else len(texts)} texts: give one mode (and text) per token array")
    rows = [text_scores(token_stats(model, t, m), None if texts is None else texts[i], k)
            for i, (t, m) in enumerate(zip(tokens, modes))]
    names = [s for s in SCORES if rows and s in rows[0]]
    return {s: np.array([r[s] for r in rows], dtype=np.float64) for s in names}


def reference_calibrated(target: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{f"ref_{name}": target[name] - reference[name]} for every score both hold, on the same texts in the same
    order (difficulty calibration, Watson et al. 2022; `ref_loss` = L_ref - L_target)."""
    out = {}
    for name in target:
        if name in reference:
            a, b = np.asarray(target[name], np.float64), np.asarray(reference[name], np.float64)
            if a.shape != b.shape:
                raise ValueError(f"reference_calibrated: score {name!r} has {a.shape} target and {b.shape} "
                                 f"reference values; both must score the same texts")
            out[f"ref_{name}"] = a - b
    return out


# ------------------------------------------------------------------------------------------------ statistics
def _scores(values, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: every score must be finite, got {int((~np.isfinite(x)).sum())} NaN/inf")
    return x


def auc(members, non_members) -> float:
    """P(member score > non-member score) + 0.5 P(tie); NaN when either side is empty."""
    pos, neg = _scores(members, "members"), np.sort(_scores(non_members, "non_members"))
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    below = np.searchsorted(neg, pos, side="left")  # non-members strictly below each member
    at_or_below = np.searchsorted(neg, pos, side="right")
    return float((below + 0.5 * (at_or_below - below)).sum() / (pos.size * neg.size))


def tpr_at_fpr(members, non_members, fpr: float) -> dict:
    """TPR of "member iff score > threshold" at the largest empirical FPR <= `fpr` (module docstring):
    {tpr, threshold (None for -inf), achieved_fpr, resolvable (fpr >= 1/n)}."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must lie in [0, 1], got {fpr}")
    pos, neg = _scores(members, "members"), np.sort(_scores(non_members, "non_members"))[::-1]
    if pos.size == 0 or neg.size == 0:
        nan = float("nan")
        return {"tpr": nan, "threshold": None, "achieved_fpr": nan, "resolvable": False}
    allowed = int(math.floor(fpr * neg.size + 1e-9))  # false positives allowed; 1e-9: 0.29 * 100 = 28.999999999999996
    threshold = neg[allowed] if allowed < neg.size else -np.inf
    return {"tpr": float((pos > threshold).mean()), "threshold": None if np.isinf(threshold) else float(threshold),
            "achieved_fpr": float((neg > threshold).mean()), "resolvable": bool(fpr >= 1.0 / neg.size)}


def roc_curve(members, non_members, zero_fpr_as: float | None = None) -> dict:
    """ROC points of "member iff score >= t" for t over the distinct scores, descending: {fpr, tpr, thresholds}
    (lists; the first point (0, 0) has threshold None, the last is (1, 1)), plus `min_positive_fpr` = 1/n.
    The trapezoidal area under the points equals `auc` (a tie moves the curve diagonally). FPR takes the values
    k/n, so FPR 0 cannot be drawn on a log axis: pass e.g. `zero_fpr_as=0.5 / n` to report it there."""
    pos, neg = _scores(members, "members"), _scores(non_members, "non_members")
    if pos.size == 0 or neg.size == 0:
        return {"fpr": [], "tpr": [], "thresholds": [], "min_positive_fpr": float("nan")}
    values = np.unique(np.concatenate([pos, neg]))[::-1]  # distinct scores, descending
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    tpr = (pos.size - np.searchsorted(pos_sorted, values, side="left")) / pos.size  # P(member >= t)
    fpr = (neg.size - np.searchsorted(neg_sorted, values, side="left")) / neg.size
    fpr = np.concatenate([[0.0], fpr])
    if zero_fpr_as is not None:
        fpr = np.where(fpr == 0.0, zero_fpr_as, fpr)
    return {"fpr": fpr.tolist(), "tpr": np.concatenate([[0.0], tpr]).tolist(),
            "thresholds": [None] + values.tolist(), "min_positive_fpr": 1.0 / neg.size}


def priv_leak_muse(auc_unlearned: float, auc_retrain: float) -> float:
    """MUSE's PrivLeak in percent from two AUCs in this module's convention (member = forget set positive):
    ((1 - A_u) - (1 - A_r)) / (1 - A_r) * 100. ~0 leaks like the retrained model, -100 perfectly separable
    (under-unlearning), > 0 over-unlearning; NaN when A_r = 1 or either AUC is NaN."""
    if not (auc_retrain < 1.0) or math.isnan(auc_unlearned):
        return float("nan")
    return float(((1.0 - auc_unlearned) - (1.0 - auc_retrain)) / (1.0 - auc_retrain) * 100.0)


def _interval(samples: np.ndarray, confidence: float) -> list[float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [float("nan"), float("nan")]
    tail = (1.0 - confidence) / 2.0
    return [float(np.quantile(samples, tail)), float(np.quantile(samples, 1.0 - tail))]


BOOTSTRAP_CHUNK = 1 << 22  # member x non-member comparisons per vectorised block of resamples (~4 MB of bools)


def _resampled_auc(pos: np.ndarray, neg: np.ndarray, picks_pos: np.ndarray, picks_neg: np.ndarray) -> np.ndarray:
    """`auc` of every resample (row) of the picks: (R,), the same values `auc` gives one row at a time, in
    vectorised blocks of resamples."""
    R, m, n = picks_pos.shape[0], picks_pos.shape[1], picks_neg.shape[1]
    if m == 0 or n == 0:
        return np.full(R, np.nan)
    out = np.empty(R)
    step = max(1, BOOTSTRAP_CHUNK // (m * n))
    for start in range(0, R, step):
        P = pos[picks_pos[start:start + step]][:, :, None]  # (r, m, 1)
        N = neg[picks_neg[start:start + step]][:, None, :]  # (r, 1, n)
        out[start:start + step] = ((P > N).sum(axis=(1, 2)) + 0.5 * (P == N).sum(axis=(1, 2))) / (m * n)
    return out


def _resampled_tpr(pos: np.ndarray, neg: np.ndarray, picks_pos: np.ndarray, picks_neg: np.ndarray,
                   fpr: float) -> np.ndarray:
    """`tpr_at_fpr(...)["tpr"]` of every resample: (R,)."""
    R, n = picks_neg.shape
    if picks_pos.shape[1] == 0 or n == 0:
        return np.full(R, np.nan)
    allowed = int(math.floor(fpr * n + 1e-9))  # as tpr_at_fpr
    desc = -np.sort(-neg[picks_neg], axis=1)  # (R, n) each resample's non-member scores, descending
    threshold = desc[:, allowed] if allowed < n else np.full(R, -np.inf)  # (R,)
    return (pos[picks_pos] > threshold[:, None]).mean(axis=1)


def membership_summary(members: dict[str, Sequence[float]], non_members: dict[str, Sequence[float]],
                       retrain_members: dict[str, Sequence[float]] | None = None,
                       retrain_non_members: dict[str, Sequence[float]] | None = None,
                       fprs: Sequence[float] = (0.01, 0.05), num_resamples: int = 1000, seed: int = 0,
                       confidence: float = 0.95, roc: bool = True) -> dict:
    """One JSON-ready dict per attack (score name) of the model under test, from its member (e.g. forgotten
    sources) and non-member (never-trained sources) scores:

        {attack: {num_members, num_non_members, min_positive_fpr, auc, auc_ci,
                  tpr_at_fpr: {"0.01": {tpr, threshold, achieved_fpr, resolvable, tpr_ci}, ...},
                  [auc_retrain, priv_leak, priv_leak_ci,]  [roc: roc_curve(...)]}}

    With the retrain oracle's scores of the SAME sources in the same order (`retrain_*`), each attack the
    oracle also has gets MUSE's PrivLeak and a paired bootstrap interval of it. Intervals: `confidence`
    percentile bootstrap over sources, `num_resamples` stratified resamples from numpy's Generator(`seed`),
    the same resampled sources for every attack of equal size (so their intervals are comparable)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if (retrain_members is None) != (retrain_non_members is None):
        raise ValueError("give both retrain_members and retrain_non_members, or neither")
    out = {}
    for name in members:
        if name not in non_members:
            raise ValueError(f"attack {name!r} has member scores but no non-member scores")
        pos, neg = _scores(members[name], f"{name} members"), _scores(non_members[name], f"{name} non-members")
        res: dict = {"num_members": int(pos.size), "num_non_members": int(neg.size),
                     "min_positive_fpr": 1.0 / neg.size if neg.size else float("nan"), "auc": auc(pos, neg)}
        rng = np.random.default_rng(seed)
        picks_pos = rng.integers(0, max(pos.size, 1), size=(num_resamples, pos.size))  # (R, m)
        picks_neg = rng.integers(0, max(neg.size, 1), size=(num_resamples, neg.size))  # (R, n)
        boot_auc = _resampled_auc(pos, neg, picks_pos, picks_neg)  # (R,)
        res["auc_ci"] = _interval(boot_auc, confidence)
        res["tpr_at_fpr"] = {}
        for alpha in fprs:
            point = tpr_at_fpr(pos, neg, alpha)
            boot = _resampled_tpr(pos, neg, picks_pos, picks_neg, alpha)  # (R,)
            res["tpr_at_fpr"][f"{alpha:g}"] = point | {"tpr_ci": _interval(boot, confidence)}
        if retrain_members is not None and name in retrain_members and name in retrain_non_members:
            rpos = _scores(retrain_members[name], f"{name} retrain members")
            rneg = _scores(retrain_non_members[name], f"{name} retrain non-members")
            if rpos.shape != pos.shape or rneg.shape != neg.shape:
                raise ValueError(f"attack {name!r}: the retrain scores must cover the same sources in the same "
                                 f"order ({pos.size}+{neg.size}), got {rpos.size}+{rneg.size}")
            res["auc_retrain"] = auc(rpos, rneg)
            res["priv_leak"] = priv_leak_muse(res["auc"], res["auc_retrain"])
            boot_leak = np.array([priv_leak_muse(a, r) for a, r in
                                  zip(boot_auc, _resampled_auc(rpos, rneg, picks_pos, picks_neg))])
            res["priv_leak_ci"] = _interval(boot_leak, confidence)
        if roc:
            res["roc"] = roc_curve(pos, neg)
        out[name] = res
    return out
