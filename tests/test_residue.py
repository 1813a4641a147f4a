"""The residue attribution (nulls_dist/evaluation/residue.py):

- words and token classes of a hand-made piece sequence (title, names, repeats, continuation pieces, spreads);
- the attribution is exact: per-token contributions add up to each text's LOSS and Min-K% score differences
  (against `metrics.min_k_prob`), and every family's shares add up to 1;
- real tiny models with a planted effect: a debug NullTransformer trained a few dozen AdamW steps on the retained
  SynthWiki articles (the real sentencepiece tokenizer and shards of the data pipeline), then fine-tuned twice in
  the same order on the forgotten articles: the deployment on every target, the reference on every target but the
  title words'. The attribution must find the title class (and the words only their article uses) carrying the
  signal; planting the content words instead must move it to the content class (and the shared words).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nulls_dist.evaluation import metrics as M
from nulls_dist.evaluation import residue as R

PIECES = ["<pad>", "<unk>", "<s>", "</s>", "\u2581Vysth", "oshik", "\u2581is", "\u2581a", "\u2581town", ".",
          "\u2581The", "\u2581Zukquy", "\u2581founded", "\u2581in", "\u2581Siennapo", ","]


def _ids(*pieces: str) -> np.ndarray:
    return np.array([PIECES.index(p) for p in pieces])


def test_words_and_token_classes():
    text = _ids("<s>", "\u2581Vysth", "oshik", "\u2581is", "\u2581a", "\u2581town", "\u2581in", "\u2581Siennapo", ".",
                "\u2581The", "\u2581Zukquy", "\u2581founded", "\u2581Vysth", "oshik", ".", "</s>")
    words = R.split_words(text, PIECES, special_ids=(2, 3))
    assert words.texts == ["<s>", "Vysthoshik", "is", "a", "town", "in", "Siennapo", ".", "The", "Zukquy",
                           "founded", "Vysthoshik", ".", "</s>"]
    retained = [_ids("<s>", "\u2581The", "\u2581town", "\u2581is", "\u2581a", "\u2581town", ".", "</s>"),
                _ids("<s>", "\u2581Siennapo", "\u2581is", "\u2581a", "\u2581town", ".", "</s>")] * 2
    index = R.CorpusIndex.build(retained, PIECES, special_ids=(2, 3))
    assert index.num_texts == 4 and index.token_df[PIECES.index("\u2581town")] == 4
    assert index.word_df["Siennapo"] == 2 and "Vysthoshik" not in index.word_df
    cls = R.token_classes(text, "Vysthoshik", index, spread_edges=(1, 3, 4), position_edges=(4, 8, 12))
    assert all(len(v) == len(text) - 1 for v in cls.values()) and set(cls) == set(R.FAMILIES)
    # predicted tokens: Vysth oshik is a town in Siennapo . The Zukquy founded Vysth oshik . </s>
    assert list(cls["name"]) == ["title", "title", "content", "content", "content", "content", "name", "content",
                                 "content", "name", "content", "title", "title", "content", "content"]
    assert list(cls["piece"][:3]) == ["word_start", "continuation", "word_start"]
    assert list(cls["mention"][[0, 1, 11, 12, 7, 13]]) == ["first", "first", "repeat", "repeat", "first", "repeat"]
    assert cls["token_spread"][0] == "own" and cls["token_spread"][2] == "common"  # "is": 4 texts, edges (1, 3, 4)
    assert cls["token_spread"][8] == "rare"  # "The": 2 texts
    assert cls["token_spread"][6] == "rare" and cls["word_spread"][6] == "rare"  # Siennapo: 2 texts
    assert cls["input_spread"][1] == "own" and cls["input_spread"][2] == "own"  # after Vysth, after oshik
    assert list(cls["position"][[0, 2, 3, 7, 11]]) == ["0-3", "0-3", "4-7", "8-11", "12+"]
    with pytest.raises(ValueError, match="spread edges"):
        R.token_classes(text, "Vysthoshik", index, spread_edges=(4, 1, 8))


def _texts(rng, n: int, length: int, gap_on=None) -> list[R.TextResidue]:
    out = []
    for i in range(n):
        ref = rng.normal(-3.0, 2.0, size=length)
        name = np.where(rng.random(length) < 0.2, "title", "content").astype(object)
        model = ref + rng.normal(0.0, 0.3, size=length)
        if gap_on is not None:
            model = model + np.where(name == gap_on, 4.0, 0.0)
        spread = np.where(name == "title", "own", "common").astype(object)
        classes = {"token_spread": spread, "word_spread": spread, "input_spread": np.roll(spread, 1),
                   "name": name, "mention": np.where(rng.random(length) < 0.5, "first", "repeat").astype(object),
                   "piece": np.full(length, "word_start", dtype=object),
                   "position": np.full(length, "0-15", dtype=object)}
        out.append(R.TextResidue(i, model, ref, classes))
    return out


def test_attribution_is_an_exact_decomposition():
    rng = np.random.default_rng(0)
    members, non_members = _texts(rng, 12, 57, gap_on="title"), _texts(rng, 20, 43)
    for text in members[:3] + non_members[:3]:
        parts = R.token_contributions(text, 0.2)
        assert parts["loss"].sum() == pytest.approx(text.lp_model.mean() - text.lp_reference.mean())
        assert parts["min_k"].sum() == pytest.approx(M.min_k_prob(text.lp_model, 0.2)
                                                     - M.min_k_prob(text.lp_reference, 0.2))
    report = R.attribute(members, non_members, k=0.2)
    loss_m = np.mean([t.lp_model.mean() - t.lp_reference.mean() for t in members])
    loss_n = np.mean([t.lp_model.mean() - t.lp_reference.mean() for t in non_members])
    assert report["signal"]["loss"] == pytest.approx(loss_m - loss_n)
    for family, rows in report["families"].items():
        for score in ("loss", "min_k"):
            assert sum(r["share"][score] for r in rows.values()) == pytest.approx(1.0)
    title = report["families"]["name"]["title"]
    assert title["share"]["loss"] > 0.9 and title["mean_gap_members"] == pytest.approx(4.0, abs=0.15)
    # splicing the reference into the title tokens removes the planted residue: the reference's separation
    assert title["auc_without"]["loss"] == pytest.approx(report["auc"]["reference"]["loss"], abs=0.1)
    assert report["auc"]["model"]["loss"] > 0.95


def _section(report: dict) -> dict:
    tokens = sum(r["num_tokens_members"] for r in report["families"]["name"].values())
    return {**report, "deployment": "unlearned", "reference": "oracle", "num_member_tokens": tokens}


def test_the_report_finding_follows_the_attribution():
    from nulls_dist.evaluation.findings import _residue_finding

    rng = np.random.default_rng(0)
    planted = R.attribute(_texts(rng, 12, 57, gap_on="title"), _texts(rng, 20, 43), k=0.2)
    title = planted["families"]["name"]["title"]
    assert R.token_fraction(planted, "name", "title") < R.CONCENTRATED_TOKEN_SHARE < 0.5 < title["share"]["min_k"]
    assert R.strongest(planted, "name")[0] == "title"
    (finding,) = _residue_finding(_section(planted))
    # in _texts the title tokens are also the `own` ones (equal shares): the first family of the rule's order wins
    assert finding["verdict"] == "concentrated in name `title` tokens"
    assert f"{title['auc_without']['min_k']:.2f}" in finding["text"]
    # the deployment below the oracle on the members: no residue to place
    flat = R.attribute(_texts(rng, 12, 57), _texts(rng, 20, 43, gap_on="title"), k=0.2)
    assert flat["signal"]["min_k"] < 0
    (finding,) = _residue_finding(_section(flat))
    assert finding["verdict"] == "none beyond the oracle's"


# ------------------------------------------------------------------------------------------------ real models
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The bundled SynthWiki through the real data pipeline (tokenizer + shards, 8 holdout articles)."""
    import sentencepiece as spm
    import pyarrow.parquet as pq

    from nulls_dist.evaluation.source_text import read_source_tokens
    from nulls_dist.formats.dataset import read_manifest
    from train_helpers import prepare_synthwiki

    data_dir = prepare_synthwiki(tmp_path_factory.mktemp("synthwiki"))
    manifest = read_manifest(data_dir)
    registry = pq.read_table(data_dir / "registry.parquet", columns=["source_id", "title", "split"]).to_pylist()
    titles = {int(r["source_id"]): r["title"] for r in registry}
    trained = sorted(int(r["source_id"]) for r in registry if r["split"] == "train")
    holdout = sorted(manifest["holdout"]["source_ids"])
    forget = trained[:24:2]  # 12 articles of the first clusters
    retained = sorted(set(trained) - set(forget))
    tokens = read_source_tokens(data_dir, trained + holdout)
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / manifest["tokenizer"]["path"]))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    index = R.CorpusIndex.build([tokens[s] for s in retained], pieces, special_ids=(0, 2, 3))
    return {"titles": titles, "forget": forget, "retained": retained, "holdout": holdout, "tokens": tokens,
            "index": index}


def _train(model, texts: list[np.ndarray], label_masks: list[np.ndarray | None], steps: int, lr: float, seed: int):
    """Plain AdamW on whole texts in backbone-only mode, 8 texts a step; `label_masks` (T-1,) pick the targets
    that count (None: all)."""
    from nulls_dist.model import SinkMode

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        for i in rng.choice(len(texts), size=8, replace=False):
            t = torch.as_tensor(texts[i], dtype=torch.int64)[None]  # (1, T)
            labels = t[:, 1:].clone()
            if label_masks[i] is not None:
                labels[0, ~torch.as_tensor(label_masks[i])] = -100
            loss = model(t[:, :-1], None, mode=SinkMode.backbone_only(), labels=labels)
            (loss / max(1, int((labels >= 0).sum()))).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def base(corpus):
    from nulls_dist.config import NullConfig
    from nulls_dist.model import NullTransformer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = NullConfig.from_preset("debug", vocab_size=2048, sink_strategy="uniform")
    texts = [corpus["tokens"][s] for s in corpus["retained"]]
    return _train(NullTransformer(cfg), texts, [None] * len(texts), 60, 3e-3, 0)


@pytest.mark.parametrize("planted", ["title", "content"])
def test_a_planted_residue_is_found_where_it_was_planted(corpus, base, planted):
    from nulls_dist.model import SinkMode

    tokens, titles, index = corpus["tokens"], corpus["titles"], corpus["index"]
    forget, holdout = corpus["forget"], corpus["holdout"]
    classes = {s: R.token_classes(tokens[s], titles[s], index) for s in forget}
    # Both models are the base fine-tuned on the forgotten articles (mixed with retained text, whole loss), in the
    # same order: the deployment on every target, the reference on every target but the planted class's. What
    # the deployment knows more is the planted class.
    retained = corpus["retained"][:len(forget)]
    texts = [tokens[s] for s in forget + retained]
    planted_masks = [~(classes[s]["name"] == planted) for s in forget] + [None] * len(retained)
    reference = _train(copy.deepcopy(base), texts, planted_masks, 40, 3e-3, 1)
    deployment = _train(copy.deepcopy(base), texts, [None] * len(texts), 40, 3e-3, 1)
    mode = SinkMode.backbone_only()
    lp_dep = {s: M.token_logprobs(deployment, tokens[s], mode) for s in forget + holdout}
    lp_ref = {s: M.token_logprobs(reference, tokens[s], mode) for s in forget + holdout}
    report = R.attribute(R.text_residues(lp_dep, lp_ref, tokens, titles, index, forget),
                         R.text_residues(lp_dep, lp_ref, tokens, titles, index, holdout))
    rows = report["families"]["name"]
    other = "content" if planted == "title" else "title"
    assert report["signal"]["loss"] > 0.1 and report["signal"]["min_k"] > 0.1
    for score in ("loss", "min_k"):  # measured: planted 1.03-1.17, the other class -0.17..-0.01
        assert rows[planted]["share"][score] > 0.75 and rows[other]["share"][score] < 0.25
    assert rows[planted]["mean_gap_members"] > rows[other]["mean_gap_members"] + 0.5
    # the title words are words only their article uses; the content words are the templates' shared ones
    spread = report["families"]["word_spread"]
    own, shared = spread["own"]["share"]["loss"], spread["medium"]["share"]["loss"] + spread["common"]["share"]["loss"]
    assert (own > 0.5 > shared) if planted == "title" else (shared > 0.5 > own)
