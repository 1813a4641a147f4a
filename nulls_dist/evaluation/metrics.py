"""Unlearning metrics on one deployed model: per-token log-probabilities in a deployment mode, text loss,
cloze fact probes (Truth Ratio, accuracy), verbatim extraction (exact-match length, ROUGE-L), Min-K% prob
membership scores and a rank AUC.

Definitions (docs/unlearning.md):
- P̄(a | q) = exp(mean log-prob of the answer tokens after the prompt) (length-normalised probability);
- Truth Ratio R = mean over distractors d of P̄(d | q) / P̄(a | q) (TOFU's R_truth with the gold answer in
  place of the paraphrase): ~0 when the fact is known, ~1 when the answer is no likelier than distractors;
- accuracy: P̄(a | q) is the largest among the answer and its distractors (chance = 1 / candidates), with a
  Wilson 95% interval; the Truth Ratio is summarised by its mean and its geometric mean (robust to the
  heavy tail of unknown facts);
- paired bootstrap: a deployment against another (the retrain oracle) on the same probes, 95% interval of the
  mean difference of accuracy and of log Truth Ratio;
- Min-K% prob: mean of the lowest k% token log-probs of a text (higher = more member-like);
- AUC: P(score of a member > score of a non-member), ties counted half (Mann-Whitney).

Shape legend:  T tokens of a text   C candidates of a probe   V vocabulary
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from nulls_dist.model import SinkMode
from nulls_dist.deploy.generate import SamplingConfig, generate


@torch.no_grad()
def window_log_softmax(model, tokens: np.ndarray | torch.Tensor, mode: SinkMode):
    """Yield (log_softmax (w, V) fp32, targets (w,) int64) for consecutive block_size windows of a (T,) text in
    `mode` (no context across windows); the targets of all windows together are tokens[1:]. One window's
    (w, V) fp32 table at a time (paper_wiki_1b: 1024 x 49152 x 4 B = 0.2 GB)."""
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.int64)
    block = model.cfg.block_size
    for start in range(0, max(1, len(tokens) - 1), block):
        window = tokens[start:start + block + 1]
        if len(window) < 2:
            break
        logits = model(window[None, :-1], None, mode=mode)[0]  # (w, V)
        yield torch.log_softmax(logits.float(), dim=-1), window[1:]


def token_logprobs(model, tokens: np.ndarray | torch.Tensor, mode: SinkMode) -> np.ndarray:
    """(T,) token ids -> (T-1,) log p(t_i | t_<i) in `mode`, in block_size windows (no context across them)."""
    out = [logp.gather(1, targets[:, None])[:, 0] for logp, targets in window_log_softmax(model, tokens, mode)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def text_loss(model, tokens, mode: SinkMode) -> float:
    """Mean next-token NLL (nats) of a text."""
    lp = token_logprobs(model, tokens, mode)
    return float(-lp.mean()) if len(lp) else float("nan")


@torch.no_grad()
def candidate_logprobs_batch(model, queries: list[tuple[list[int], list[list[int]]]], mode: SinkMode) -> list[np.ndarray]:
    """Mean log-prob of each candidate's tokens after its prompt, for several (prompt, candidates) queries in one
    mode: [(C_q,)]. One right-padded batch of every candidate sequence (causal, so the padding never influences
    the scored positions); the log-softmax is taken only where a candidate token is scored."""
    pairs = [(prompt, cand) for prompt, cands in queries for cand in cands]  # one per candidate sequence
    width = max(len(prompt) + len(cand) for prompt, cand in pairs)
    batch = torch.zeros(len(pairs), width, dtype=torch.int64)  # (S, W)
    rows, cols, targets = [], [], []  # every scored position: its sequence, its column, the token it predicts
    for i, (prompt, cand) in enumerate(pairs):
        batch[i, :len(prompt) + len(cand)] = torch.tensor(prompt + cand)
        rows += [i] * len(cand)
        cols += range(len(prompt) - 1, len(prompt) - 1 + len(cand))
        targets += cand
    hidden = model.hidden_states(batch, None, mode=mode)  # (S, W, D)
    logp = torch.log_softmax(model.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)]).float(), dim=-1)  # (n, V)
    picked = logp[torch.arange(len(targets)), torch.tensor(targets)].double()  # (n,)
    sums = torch.zeros(len(pairs), dtype=torch.float64).index_add_(0, torch.tensor(rows), picked)  # (S,)
    lengths = torch.tensor([len(cand) for _, cand in pairs], dtype=torch.float64)
    means = (sums / lengths).numpy()
    bounds = np.cumsum([0, *(len(cands) for _, cands in queries)])
    return [means[bounds[q]:bounds[q + 1]] for q in range(len(queries))]


def candidate_logprobs(model, prompt: list[int], candidates: list[list[int]], mode: SinkMode) -> np.ndarray:
    """Mean log-prob of each candidate's tokens after `prompt`: (C,)."""
    return candidate_logprobs_batch(model, [(prompt, candidates)], mode)[0]


@dataclass
class ProbeResult:
    probe_id: str
    kind: str
    truth_ratio: float
    correct: bool


def encode_probe(probe: dict, encode: Callable[[str], list[int]], bos_id: int | None) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, candidate ids: the answer first, then the distractors) of a cloze probe."""
    prompt = ([bos_id] if bos_id is not None else []) + encode(probe["prompt"])
    return prompt, [encode(" " + probe["answer"])] + [encode(" " + d) for d in probe["distractors"]]


def _result(probe: dict, mean_lp: np.ndarray) -> ProbeResult:
    ratio = float(np.mean(np.exp(mean_lp[1:] - mean_lp[0])))
    return ProbeResult(probe["probe_id"], probe["kind"], ratio, bool(mean_lp[0] > mean_lp[1:].max()))


def score_probe(model, probe: dict, mode: SinkMode, encode: Callable[[str], list[int]], bos_id: int | None) -> ProbeResult:
    return _result(probe, candidate_logprobs(model, *encode_probe(probe, encode, bos_id), mode))  # (C,) log P̄


PROBE_BATCH_ROWS = 256  # candidate sequences per forward in `score_probes` (~0.03 GB of fp32 logits at V = 2048)


def score_probes(model, items: list[tuple[dict, SinkMode]], encode: Callable[[str], list[int]],
                 bos_id: int | None) -> list[ProbeResult]:
    """`score_probe` of many (probe, mode) pairs, in input order: the probes of one mode go through the model
    together (a source's probes share its mode), up to PROBE_BATCH_ROWS candidate sequences per forward."""
    out: list[ProbeResult | None] = [None] * len(items)
    by_mode: dict[SinkMode, list[int]] = {}
    for i, (_, mode) in enumerate(items):
        by_mode.setdefault(mode, []).append(i)
    for mode, idx in by_mode.items():
        queries = [encode_probe(items[i][0], encode, bos_id) for i in idx]
        start = 0
        while start < len(idx):
            end, rows = start, 0
            while end < len(idx) and (end == start or rows + len(queries[end][1]) <= PROBE_BATCH_ROWS):
                rows += len(queries[end][1])
                end += 1
            for i, lp in zip(idx[start:end], candidate_logprobs_batch(model, queries[start:end], mode)):
                out[i] = _result(items[i][0], lp)
            start = end
    return out


def wilson_interval(successes: int, num: int, z: float = 1.96) -> list[float]:
    """Wilson score interval of a proportion (95% for z = 1.96); [nan, nan] for no trials."""
    if num == 0:
        return [float("nan"), float("nan")]
    p = successes / num
    centre = (p + z * z / (2 * num)) / (1 + z * z / num)
    half = z * np.sqrt(p * (1 - p) / num + z * z / (4 * num * num)) / (1 + z * z / num)
    return [float(centre - half), float(centre + half)]


def paired_bootstrap(a: np.ndarray, b: np.ndarray, num_resamples: int = 4000, seed: int = 0) -> list[float]:
    """[mean(a - b), 2.5%, 97.5%] of the mean paired difference, resampling the pairs (a, b: (n,))."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.size == 0:
        return [float("nan")] * 3
    picks = np.random.default_rng(seed).integers(0, diff.size, size=(num_resamples, diff.size))
    means = diff[picks].mean(axis=1)  # (num_resamples,)
    return [float(diff.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def summarise_probes(results: list[ProbeResult]) -> dict:
    """Means over a probe group, plus the per-probe values (for paired comparisons between deployments)."""
    if not results:
        nan = float("nan")
        return {"num": 0, "truth_ratio": nan, "truth_ratio_gmean": nan, "accuracy": nan, "accuracy_ci95": [nan, nan],
                "per_probe": {"probe_id": [], "log_truth_ratio": [], "correct": []}}
    log_tr = np.log([r.truth_ratio for r in results])
    correct = [bool(r.correct) for r in results]
    return {"num": len(results), "truth_ratio": float(np.mean([r.truth_ratio for r in results])),
            "truth_ratio_gmean": float(np.exp(log_tr.mean())), "accuracy": float(np.mean(correct)),
            "accuracy_ci95": wilson_interval(sum(correct), len(correct)),
            "per_probe": {"probe_id": [r.probe_id for r in results], "log_truth_ratio": log_tr.tolist(),
                          "correct": correct}}


def compare_probes(summary: dict, reference: dict) -> dict:
    """A probe group of one deployment against the same group of a reference deployment (same probes, same
    order): paired bootstrap of the accuracy difference and of the log Truth Ratio difference."""
    a, b = summary["per_probe"], reference["per_probe"]
    if a["probe_id"] != b["probe_id"]:
        raise ValueError("compare_probes needs the same probes in the same order in both deployments")
    return {"accuracy_diff": paired_bootstrap(np.array(a["correct"], float), np.array(b["correct"], float)),
            "log_truth_ratio_diff": paired_bootstrap(np.array(a["log_truth_ratio"]), np.array(b["log_truth_ratio"]))}


def lcs_length(a: list, b: list) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: list[int], ref: list[int]) -> float:
    """ROUGE-L F1 on token ids (rouge-score's formula; ids sidestep its English word tokenizer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_IdTokenizer())
    return scorer.score(" ".join(map(str, ref)), " ".join(map(str, pred)))["rougeL"].fmeasure


class _IdTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return text.split()


def verbatim_extraction(model, tokens: np.ndarray, mode: SinkMode, prefix_len: int, cont_len: int,
                        num_prefixes: int) -> dict:
    """Greedy continuations of `num_prefixes` evenly spaced prefixes: mean exact-match length and ROUGE-L."""
    tokens = np.asarray(tokens, dtype=np.int64)
    span = prefix_len + cont_len
    if len(tokens) < span:
        prefix_len, cont_len = max(1, len(tokens) // 2), len(tokens) - max(1, len(tokens) // 2)
        span = len(tokens)
    if cont_len <= 0:
        return {"num": 0, "exact_match_len": float("nan"), "rouge_l": float("nan")}
    starts = np.unique(np.linspace(0, len(tokens) - span, num=num_prefixes).astype(int))
    matches, rouges = [], []
    for s in starts:
        prefix = torch.from_numpy(tokens[s:s + prefix_len])
        truth = tokens[s + prefix_len:s + span].tolist()
        gen = generate(model, prefix, mode, SamplingConfig(max_new_tokens=cont_len)).tokens[0, prefix_len:].tolist()
        first_miss = next((i for i, (g, t) in enumerate(zip(gen, truth)) if g != t), len(truth))
        matches.append(first_miss)
        rouges.append(rouge_l(gen, truth))
    return {"num": len(starts), "exact_match_len": float(np.mean(matches)), "rouge_l": float(np.mean(rouges))}


def min_k_prob(logprobs: np.ndarray, k: float = 0.2) -> float:
    if len(logprobs) == 0:
        return float("nan")
    n = max(1, int(np.ceil(k * len(logprobs))))
    return float(np.sort(logprobs)[:n].mean())


def rank_auc(members: list[float], non_members: list[float]) -> float:
    """P(member score > non-member score) + 0.5 P(tie)."""
    pos, neg = np.asarray(members, float), np.asarray(non_members, float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def seq_logprob(model, tokens: torch.Tensor, mode: SinkMode) -> torch.Tensor:
    """Differentiable sum of log p over a (1, T) sequence's next tokens -> scalar."""
    logits = model(tokens[:, :-1], None, mode=mode)  # (1, T-1, V)
    return -F.cross_entropy(logits[0].float(), tokens[0, 1:], reduction="sum")
