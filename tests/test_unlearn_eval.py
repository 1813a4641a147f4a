"""nulls-eval pieces: metric definitions against independent computations, post-hoc fine-tuning directions,
reading source tokens back from shards, and a small end-to-end evaluation + report."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from nulls_dist.config import NullConfig
from nulls_dist.model import NullTransformer, SinkMode
from nulls_dist.evaluation import metrics as M
from nulls_dist.evaluation.evaluate import (EvalConfig, EvalData, MembershipConfig, gold_deployment,
                                            routed_deployment, run_evaluation)
from nulls_dist.evaluation.relearning import RelearnConfig
from nulls_dist.evaluation.posthoc import FinetuneConfig, finetune
from nulls_dist.evaluation.report import write_report
from nulls_dist.deploy.routing import ModelEmbedder, SourceIndex
from nulls_dist.evaluation.source_text import read_source_tokens
from nulls_dist.formats.shards import ShardError
from unlearn_helpers import write_dataset_manifest

BASE = 4096


def _model() -> NullTransformer:
    torch.manual_seed(0)
    return NullTransformer(NullConfig.from_preset("debug", sink_strategy="uniform")).eval()


def test_metric_definitions():
    assert M.rank_auc([3, 4], [1, 2]) == 1.0 and M.rank_auc([1], [2]) == 0.0
    assert M.rank_auc([1, 2], [2, 0]) == pytest.approx((1 + 0.5 + 1 + 1) / 4 - 0.25)  # ties count half
    assert M.min_k_prob(np.array([-5.0, -1.0, -0.5, -0.1, -3.0]), k=0.4) == pytest.approx(-4.0)
    assert M.rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert M.rouge_l([1, 9, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    assert M.lcs_length([1, 2, 3, 4], [2, 4, 9]) == 2
    assert M.wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)  # textbook values
    assert M.wilson_interval(0, 20)[0] == pytest.approx(0.0, abs=1e-12) and M.wilson_interval(0, 20)[1] > 0.1
    assert M.paired_bootstrap(np.ones(9), np.ones(9)) == [0.0, 0.0, 0.0]
    mean, lo, hi = M.paired_bootstrap(np.array([1.0, 0, 1, 1, 0, 1]), np.zeros(6))
    assert mean == pytest.approx(4 / 6) and 0.0 <= lo < mean < hi <= 1.0


def test_probe_summaries_and_paired_comparison():
    results = [M.ProbeResult("p0", "unique", 0.5, True), M.ProbeResult("p1", "unique", 2.0, False)]
    summary = M.summarise_probes(results)
    assert summary["truth_ratio"] == pytest.approx(1.25) and summary["truth_ratio_gmean"] == pytest.approx(1.0)
    assert summary["accuracy"] == 0.5 and summary["accuracy_ci95"] == M.wilson_interval(1, 2)
    other = M.summarise_probes([M.ProbeResult("p0", "unique", 0.5, False), M.ProbeResult("p1", "unique", 0.5, False)])
    vs = M.compare_probes(summary, other)
    assert vs["accuracy_diff"][0] == pytest.approx(0.5)
    assert vs["log_truth_ratio_diff"][0] == pytest.approx((0 + np.log(4)) / 2)
    with pytest.raises(ValueError, match="same probes"):
        M.compare_probes(summary, M.summarise_probes(results[:1]))


def test_probe_scores_match_direct_log_probs():
    model = _model()
    mode = SinkMode.sink_on(BASE + 1)
    vocab = {w: i + 10 for i, w in enumerate("the capital of vokfu is gropa zeta tarn moss".split())}
    encode = lambda text: [vocab[w] for w in text.lower().split()]  # noqa: E731
    probe = {"probe_id": "p", "kind": "unique", "prompt": "The capital of Vokfu is", "answer": "gropa",
             "distractors": ["zeta tarn", "moss"], "source_ids": [BASE + 1]}
    res = M.score_probe(model, probe, mode, encode, bos_id=2)
    prompt = [2] + encode(probe["prompt"])

    def mean_lp(answer):  # independent: score the full sequence and average the answer's tokens
        lp = M.token_logprobs(model, np.array(prompt + encode(answer)), mode)
        return lp[len(prompt) - 1:].mean()

    a, d1, d2 = mean_lp("gropa"), mean_lp("zeta tarn"), mean_lp("moss")
    assert res.truth_ratio == pytest.approx((np.exp(d1 - a) + np.exp(d2 - a)) / 2, rel=1e-4)
    assert res.correct == bool(a > max(d1, d2))


def test_finetune_directions_and_verbatim_memorisation():
    model = _model()
    text = np.random.default_rng(0).integers(10, 4000, size=40)
    mode = SinkMode.sink_on(BASE + 3)
    before = M.text_loss(model, text, mode)
    cfg = FinetuneConfig(steps=40, lr=1e-2, window=40)
    learned = finetune(model, [text], [mode], "nll", cfg)
    after = M.text_loss(learned, text, mode)
    assert after < before - 2.0
    ver = M.verbatim_extraction(learned, text, mode, prefix_len=8, cont_len=8, num_prefixes=2)
    assert ver["num"] == 2 and ver["exact_match_len"] >= 4 and ver["rouge_l"] > 0.5
    assert M.verbatim_extraction(model, text, mode, 8, 8, 2)["exact_match_len"] < 1
    short = FinetuneConfig(steps=5, lr=1e-2, window=40)
    assert M.text_loss(finetune(learned, [text], [mode], "ga", short), text, mode) > after + 0.5
    assert M.text_loss(finetune(learned, [text], [mode], "npo", short), text, mode) > after + 0.5
    with pytest.raises(ValueError, match="loss"):
        finetune(model, [text], [mode], "bogus", short)


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for i, (tokens, sources, mask) in enumerate(samples):
            for suffix, arr in (("tokens.npy", tokens), ("source_ids.npy", sources), ("loss_mask.npy", mask)):
                buf = io.BytesIO()
                np.save(buf, arr)
                info = tarfile.TarInfo(f"000000-{i:08d}.{suffix}")
                info.size = buf.getbuffer().nbytes
                buf.seek(0)
                tar.addfile(info, buf)


def test_read_source_tokens(tmp_path):
    s = np.array([7, 7, 7, 8, 8, 8], dtype=np.uint32)
    _write_shard(tmp_path / "shard-000000.tar",
                 [(np.arange(6, dtype=np.uint16), s, np.ones(6, np.uint8)),
                  (np.arange(10, 16, dtype=np.uint16), np.array([8, 8, 9, 9, 9, 9], np.uint32),
                   np.array([1, 1, 1, 1, 0, 0], np.uint8))])
    (tmp_path / "holdout").mkdir()
    _write_shard(tmp_path / "holdout" / "shard-000000.tar",
                 [(np.arange(3, dtype=np.uint16) + 50, np.full(3, 11, np.uint32), np.ones(3, np.uint8))])
    write_dataset_manifest(tmp_path, ["shard-000000.tar"], ["holdout/shard-000000.tar"])
    out = read_source_tokens(tmp_path, [8, 9, 11])
    assert out[8].tolist() == [3, 4, 5, 10, 11] and out[9].tolist() == [12, 13] and out[11].tolist() == [50, 51, 52]
    assert 7 not in out
    with pytest.raises(ValueError, match="no dataset manifest"):
        read_source_tokens(tmp_path / "holdout" / "none", [1])


def test_read_source_tokens_refuses_a_shard_that_does_not_match_the_manifest(tmp_path):
    _write_shard(tmp_path / "shard-000000.tar", [(np.arange(4, dtype=np.uint16), np.full(4, 8, np.uint32),
                                                  np.ones(4, np.uint8))])
    (tmp_path / "holdout").mkdir()
    _write_shard(tmp_path / "holdout" / "shard-000000.tar", [(np.arange(3, dtype=np.uint16), np.full(3, 9, np.uint32),
                                                              np.ones(3, np.uint8))])
    write_dataset_manifest(tmp_path, ["shard-000000.tar"], ["holdout/shard-000000.tar"])
    held = tmp_path / "holdout" / "shard-000000.tar"
    data = bytearray(held.read_bytes())
    data[600] ^= 0x01  # a byte of the first member's payload: same size, other sha256
    held.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"holdout/shard-000000\.tar: sha256 .* does not match the manifest"):
        read_source_tokens(tmp_path, [8])
    held.write_bytes(bytes(data[:1024]))  # truncated
    with pytest.raises(ValueError, match=r"holdout/shard-000000\.tar: 1024 bytes, the manifest records"):
        read_source_tokens(tmp_path, [8])
    (tmp_path / "manifest.json").write_text('{"schema_version": 1, "shards": [')
    with pytest.raises(ValueError, match=r"manifest\.json: not valid JSON"):
        read_source_tokens(tmp_path, [8])


def test_end_to_end_evaluation_report(tmp_path):
    model = _model()
    rng = np.random.default_rng(1)
    ids = list(range(BASE, BASE + 8))
    titles = {s: f"alpha {s}" if s < BASE + 4 else f"beta {s}" for s in ids}
    tokens = {s: rng.integers(10, 4000, size=30) for s in ids}
    words = {w: i + 10 for i, w in enumerate("alpha beta q a b c d".split())}
    encode = lambda text: [words.get(w, 11) for w in text.lower().split()]  # noqa: E731
    probes = [{"probe_id": "u0", "kind": "unique", "prompt": "q", "answer": "a", "distractors": ["b", "c"],
               "source_ids": [BASE]},
              {"probe_id": "s0", "kind": "shared", "prompt": "q", "answer": "d", "distractors": ["b"],
               "source_ids": [BASE, BASE + 1]},
              {"probe_id": "u1", "kind": "unique", "prompt": "q", "answer": "c", "distractors": ["a"],
               "source_ids": [BASE + 1]},
              {"probe_id": "u2", "kind": "unique", "prompt": "q", "answer": "a", "distractors": ["c"],
               "source_ids": [BASE + 3]},  # a retained article not related to the forgotten one
              {"probe_id": "s1", "kind": "shared", "prompt": "q", "answer": "b", "distractors": ["c"],
               "source_ids": [BASE + 2, BASE + 3]},  # shared among retained articles only
              {"probe_id": "u6", "kind": "unique", "prompt": "q", "answer": "b", "distractors": ["d"],
               "source_ids": [BASE + 6]},  # never trained: the level of an unseen fact
              {"probe_id": "x", "kind": "unique", "prompt": "q", "answer": "b", "distractors": ["d"],
               "source_ids": [BASE + 99]}]  # in no group: reported, not dropped silently
    data = EvalData(forget_ids=[BASE], retained_ids=ids[1:6], related_ids=[BASE + 1], holdout_ids=[BASE + 6, BASE + 7],
                    titles=titles, tokens=tokens, probes=probes, encode=encode, bos_id=None)
    embedder = ModelEmbedder(model.transformer.wte.weight, lambda t: [words.get(w, 11) for w in t.split()])
    index = SourceIndex.build(ids[:6], [titles[s] for s in ids[:6]], embedder)
    unlearned = routed_deployment("unlearned", model, index, embedder, [BASE], titles)
    assert BASE not in (unlearned.mode_for(BASE).source_id, None)
    assert unlearned.mode_for(BASE).forget_ids == (BASE,)
    oracle = routed_deployment("oracle", model, index, embedder, [BASE], titles)  # the same model: differences 0
    deployments = [gold_deployment("original", model, set(ids[:6]), unlearned.mode_for), unlearned, oracle]
    cfg = EvalConfig(finetune=FinetuneConfig(steps=2, window=16), membership=MembershipConfig(num_resamples=50),
                     relearn=RelearnConfig(steps=2, window=16, eval_at=(0, 1, 2), num_sources=1), quantize_bits=(8,))
    result = run_evaluation(deployments, data, cfg)
    assert result["num_probes"] == {"unique_forget": 1, "shared_forget": 1, "shared_forget_via_retained": 1,
                                  "unique_related": 1, "unique_retained": 1, "shared_retained": 1,
                                  "unique_holdout": 1}
    assert sum(result["probes_unused"].values()) == 1
    orig = result["deployments"]["original"]
    assert orig["loss"]["forget"] == pytest.approx(M.text_loss(model, tokens[BASE], SinkMode.sink_on(BASE)))
    relearn = result["relearning"]["conditions"]["forget_text"]["deployments"]
    assert set(relearn) == {"unlearned", "oracle"} and relearn["unlearned"]["steps"] == [0, 1, 2]
    assert 0.0 <= orig["membership"]["attacks"]["min_k"]["auc"] <= 1.0
    assert orig["membership"]["attacks"]["min_k"]["num_non_members"] == 2
    files = write_report(result, tmp_path / "report")
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(doc["deployments"]) == {"original", "unlearned", "oracle"}
    vs = doc["deployments"]["unlearned"]["probes_vs_oracle"]
    assert vs["unique_forget"]["accuracy_diff"] == [0.0, 0.0, 0.0]
    orig_probes, oracle_probes = orig["probes"]["shared_forget"], result["deployments"]["oracle"]["probes"]["shared_forget"]
    assert doc["deployments"]["original"]["probes_vs_oracle"]["shared_forget"]["log_truth_ratio_diff"][0] == \
        pytest.approx(orig_probes["per_probe"]["log_truth_ratio"][0] - oracle_probes["per_probe"]["log_truth_ratio"][0])
    assert doc["chance_accuracy"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2 + 4 / 2) / 7)  # every probe: 3 candidates once, 2 six times
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| unlearned |" in md and "Truth Ratio" in md and "Against the retrain oracle" in md
    for png in files["plots"]:
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Req:
    def __init__(self, *args):
        self.args = args


def test_lm_eval_adapter_scores_match_direct_log_probs():
    from nulls_dist.deploy.lm_eval_adapter import NullsLM

    model = _model()
    words = "the cat sat on a mat dog ran".split()
    encode = lambda text: [words.index(w) + 10 for w in text.split()]  # noqa: E731
    decode = lambda ids: " ".join(words[i - 10] if 10 <= i < 18 else "?" for i in ids)  # noqa: E731
    mode = SinkMode.sink_on(BASE + 2)
    lm = NullsLM(model, encode, decode, mode_for=lambda _ctx: mode, bos_id=2)
    (score, greedy), = lm.loglikelihood([_Req("the cat sat", "on a mat")])
    direct = M.token_logprobs(model, np.array([2] + encode("the cat sat on a mat")), mode)
    assert score == pytest.approx(direct[-3:].sum(), rel=1e-5)
    assert isinstance(greedy, bool)
    (rolling,) = lm.loglikelihood_rolling([_Req("the dog ran on a mat")])
    assert rolling == pytest.approx(M.token_logprobs(model, np.array([2] + encode("the dog ran on a mat")), mode).sum(),
                                    rel=1e-5)
    (text,) = lm.generate_until([_Req("the cat", {"until": ["?"], "max_gen_toks": 5})])
    assert "?" not in text and len(text.split()) <= 5
