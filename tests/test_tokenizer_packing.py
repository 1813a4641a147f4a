"""The tokenizer stage (real sentencepiece training, special ids, byte fallback, determinism) and packing
(`pack` and `single`: source ids per token, splitting, padding, determinism)."""
from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm
from nulls_dist.data_pipeline.packing import (
    PackingConfig,
    pack_articles,
    pack_blocks,
    shuffled,
)
from nulls_dist.data_pipeline.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    TokenizerConfig,
    load_tokenizer,
    reservoir_sample,
    train_tokenizer,
)

from nulls_dist.formats.digests import file_sha256

TEXTS = [f"The river {w} flows past the old {v} of town number {i}.\nA second line about {w}."
         for i, (w, v) in enumerate(zip(["Ayla", "Borin", "Cedro", "Dunmar"] * 30, ["mill", "keep", "gate"] * 40))]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    cfg = TokenizerConfig(vocab_size=300, sample_articles=80, num_threads=1, character_coverage=1.0)
    return train_tokenizer(iter(TEXTS), cfg, tmp_path_factory.mktemp("tok"))


def test_trained_model_has_documented_special_ids_and_byte_fallback(model_path):
    sp = load_tokenizer(model_path)
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert sp.get_piece_size() == 300
    unseen = "Zürich € 東京"
    ids = sp.encode(unseen)
    assert UNK_ID not in ids  # byte fallback: unseen characters become byte pieces
    assert any(sp.id_to_piece(i).startswith("<0x") for i in ids)
    assert sp.decode(ids) == unseen


def test_training_is_deterministic(model_path, tmp_path):
    cfg = TokenizerConfig(vocab_size=300, sample_articles=80, num_threads=1, character_coverage=1.0)
    again = train_tokenizer(iter(TEXTS), cfg, tmp_path)
    assert file_sha256(again) == file_sha256(model_path)


def test_unigram_model_type_trains(tmp_path):
    cfg = TokenizerConfig(model_type="unigram", vocab_size=310, sample_articles=120, num_threads=1,
                          character_coverage=1.0)
    sp = load_tokenizer(train_tokenizer(iter(TEXTS), cfg, tmp_path))
    assert sp.get_piece_size() == 310 and sp.bos_id() == BOS_ID


def test_model_with_other_special_ids_is_rejected(tmp_path):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_prefix=str(tmp_path / "other"),
                                   vocab_size=60, minloglevel=2)  # sentencepiece defaults: unk 0, bos 1, eos 2
    with pytest.raises(ValueError, match="special ids"):
        load_tokenizer(tmp_path / "other.model")


def test_bad_tokenizer_config_names_the_field():
    with pytest.raises(ValueError, match="tokenizer.model_type"):
        TokenizerConfig(model_type="wordpiece")
    with pytest.raises(ValueError, match="tokenizer.vocab_size"):
        TokenizerConfig(vocab_size=100)


def test_reservoir_sample_is_bounded_and_seeded():
    stream = [f"text {i} " * 10 for i in range(1000)]
    a = reservoir_sample(iter(stream), 50, seed=1, max_chars=20)
    assert len(a) == 50 and all(len(t) <= 20 for t in a)
    assert a == reservoir_sample(iter(stream), 50, seed=1, max_chars=20)
    assert a != reservoir_sample(iter(stream), 50, seed=2, max_chars=20)
    assert len(reservoir_sample(iter(stream[:7]), 50, seed=1, max_chars=20)) == 7


def test_reservoir_sample_with_a_known_count_draws_the_same_sample():
    stream = [f"text {i} " * (1 + i % 5) for i in range(1000)]
    for k, seed in ((50, 1), (999, 0), (1000, 2), (5000, 3)):
        streamed = reservoir_sample(iter(stream), k, seed=seed, max_chars=20)
        assert reservoir_sample(iter(stream), k, seed=seed, max_chars=20, num_texts=len(stream)) == streamed
    with pytest.raises(ValueError, match="expected 999 texts"):
        reservoir_sample(iter(stream), 50, seed=1, max_chars=20, num_texts=999)


# ---- packing -----------------------------------------------------------------------------------------------

ARTICLES = [(100, np.arange(10, 15)), (101, np.arange(20, 43)), (102, np.arange(50, 53)), (103, np.arange(60, 61))]


def _specials(tokens):
    return [BOS_ID, *tokens, EOS_ID]


def test_pack_concatenates_articles_and_keeps_every_source_id():
    cfg = PackingConfig(mode="pack", context_length=9)  # 40 tokens: 4 full contexts and a padded one
    contexts = list(pack_articles(ARTICLES, cfg, BOS_ID, EOS_ID, PAD_ID))
    assert all(c.tokens.shape == (9,) and c.source_ids.dtype == np.uint32 for c in contexts)
    tokens = np.concatenate([c.tokens for c in contexts])
    sources = np.concatenate([c.source_ids for c in contexts])
    mask = np.concatenate([c.loss_mask for c in contexts]).astype(bool)
    expected = [t for _, a in ARTICLES for t in _specials(a)]
    expected_sources = [s for s, a in ARTICLES for _ in _specials(a)]
    assert tokens[mask].tolist() == expected
    assert sources[mask].tolist() == expected_sources
    assert len(contexts) == -(-len(expected) // 9) == 5
    # the 25-token article 101 spans several contexts, each piece still tagged 101
    assert sum(101 in c.source_ids[c.loss_mask.astype(bool)] for c in contexts) >= 3
    last = contexts[-1]
    pad = ~last.loss_mask.astype(bool)
    assert pad.any() and (last.tokens[pad] == PAD_ID).all() and (last.source_ids[pad] == 103).all()


def test_single_gives_one_source_per_context_padded_with_loss_mask_zero():
    cfg = PackingConfig(mode="single", context_length=8)
    contexts = list(pack_articles(ARTICLES, cfg, BOS_ID, EOS_ID, PAD_ID))
    assert [len(set(c.source_ids.tolist())) for c in contexts] == [1] * len(contexts)
    per_source = {}
    for c in contexts:
        per_source.setdefault(int(c.source_ids[0]), []).append(c)
    assert {s: len(v) for s, v in per_source.items()} == {100: 1, 101: 4, 102: 1, 103: 1}
    for source, tokens in ARTICLES:
        got = np.concatenate([c.tokens[c.loss_mask.astype(bool)] for c in per_source[source]])
        assert got.tolist() == _specials(tokens)
    short = per_source[103][0]
    assert short.loss_mask.tolist() == [1, 1, 1, 0, 0, 0, 0, 0] and short.tokens[3:].tolist() == [PAD_ID] * 5


@pytest.mark.parametrize("mode", ["pack", "single"])
def test_blocks_hold_the_same_contexts_in_the_shard_dtype(mode):
    cfg = PackingConfig(mode=mode, context_length=9)
    articles = [(s, t.astype(np.int32)) for s, t in ARTICLES * 3]
    contexts = list(pack_articles(articles, cfg, BOS_ID, EOS_ID, PAD_ID, block_tokens=16))
    blocks = list(pack_blocks(articles, cfg, BOS_ID, EOS_ID, PAD_ID, np.uint16, block_tokens=16))
    assert all(b.tokens.dtype == np.uint16 and b.tokens.flags.c_contiguous for b in blocks)
    for name in ("tokens", "source_ids", "loss_mask"):
        rows = np.concatenate([getattr(b, name) for b in blocks])  # (n, 9)
        assert rows.tolist() == [getattr(c, name).tolist() for c in contexts]


def test_exact_fit_emits_no_padding_context():
    cfg = PackingConfig(mode="pack", context_length=7)
    contexts = list(pack_articles([(5, np.arange(10, 15))], cfg, BOS_ID, EOS_ID, PAD_ID))
    assert len(contexts) == 1 and contexts[0].loss_mask.all()


def test_shuffle_is_deterministic_for_a_seed():
    items = list(range(50))
    assert shuffled(items, [3, 1]) == shuffled(items, [3, 1])
    assert shuffled(items, [3, 1]) != shuffled(items, [4, 1])
    assert sorted(shuffled(items, 7)) == items


def test_bad_packing_config_names_the_field():
    with pytest.raises(ValueError, match="packing.mode"):
        PackingConfig(mode="greedy")
    with pytest.raises(ValueError, match="packing.context_length"):
        PackingConfig(context_length=1)


def test_existing_model_is_adopted_and_gives_the_default_id_offset(model_path):
    from nulls_dist.data_pipeline.pipeline import (
        data_config_from_dict,
        run_tokenizer_stage,
    )

    cfg = data_config_from_dict({"tokenizer": {"model_path": str(model_path)}})
    assert run_tokenizer_stage(cfg) == model_path
    assert cfg.resolved_id_offset() == 300  # the paper's rule: source id = title index + vocabulary size
