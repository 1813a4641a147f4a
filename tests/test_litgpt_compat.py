"""Released-checkpoint compatibility: a litgpt-format checkpoint (lit_model.pth + model_config.yaml) loads
into NullTransformer and matches litgpt 0.5.13's own GPT, and our writer round-trips."""
import dataclasses

import pytest
import torch
import yaml
from litgpt.config import Config
from litgpt.model import GPT

from nulls_dist.litgpt_io import (
    LIT_CONFIG,
    LIT_WEIGHTS,
    load_litgpt_checkpoint,
    save_litgpt_checkpoint,
)
from nulls_dist.model import SinkMode


def litgpt_config(**overrides):
    # head_size * n_head != n_embd and GQA, so a wrong q/k/v split or head grouping cannot pass.
    fields = dict(
        name="nulls-tiny", block_size=64, vocab_size=100, padded_vocab_size=128, n_layer=2, n_embd=48, n_head=4,
        n_query_groups=2, head_size=16, intermediate_size=96, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
        bias=False, parallel_residual=False, rope_base=500, rotary_percentage=1.0, norm_eps=1e-5,
    )
    return Config(**{**fields, **overrides})


def write_checkpoint(path, config, p_gen, p_mem, seed=0):
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gpt = GPT(config).eval()
    with torch.no_grad():
        for param in gpt.parameters():
            param.normal_(0.0, 0.1)
    torch.save(gpt.state_dict(), path / LIT_WEIGHTS)
    values = {**dataclasses.asdict(config), "p_gen": p_gen, "p_mem": p_mem}
    (path / LIT_CONFIG).write_text(yaml.safe_dump(values))
    return gpt


def tokens(num_rows=2, length=24):
    return torch.randint(0, 100, (num_rows, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("rotary_percentage", [1.0, 0.5])
def test_backbone_matches_litgpt_with_sinks_disabled(tmp_path, rotary_percentage):
    config = litgpt_config(rotary_percentage=rotary_percentage)
    gpt = write_checkpoint(tmp_path, config, p_gen=1.0, p_mem=0.0)
    model = load_litgpt_checkpoint(tmp_path).eval()
    assert model.cfg.n_sink == 0 and model.cfg.n_backbone == 96
    input_ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids), gpt(input_ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sink_path", ["gathered", "masked"])
def test_sink_pool_layout_matches_litgpt(tmp_path, sink_path):
    """The published hash turns every sink on for source id 0, so the NULL model must equal litgpt's dense
    MLP: this checks the fc_1/fc_2/proj split into backbone units and sink rows."""
    gpt = write_checkpoint(tmp_path, litgpt_config(), p_gen=0.25, p_mem=0.1)
    model = load_litgpt_checkpoint(tmp_path, sink_path=sink_path).eval()
    assert (model.cfg.n_backbone, model.cfg.n_sink, model.cfg.sink_strategy) == (24, 72, "reference")
    input_ids = tokens()
    with torch.no_grad():
        ours = model(input_ids, torch.zeros_like(input_ids))
        other_source = model(input_ids, torch.full_like(input_ids, 49152))
        torch.testing.assert_close(ours, gpt(input_ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(other_source, ours, atol=1e-3)


def test_save_round_trip(tmp_path):
    write_checkpoint(tmp_path / "released", litgpt_config(), p_gen=0.25, p_mem=0.1)
    model = load_litgpt_checkpoint(tmp_path / "released").eval()
    save_litgpt_checkpoint(model, tmp_path / "saved")
    original = torch.load(tmp_path / "released" / LIT_WEIGHTS)
    saved = torch.load(tmp_path / "saved" / LIT_WEIGHTS)
    assert original.keys() == saved.keys()
    for key in original:
        assert torch.equal(original[key], saved[key]), key
    again = load_litgpt_checkpoint(tmp_path / "saved").eval()
    input_ids, source_ids = tokens(), torch.full((2, 24), 50_000)
    with torch.no_grad():
        for mode in (SinkMode.train(), SinkMode.sink_off(50_000, [50_001])):
            assert torch.equal(model(input_ids, source_ids, mode), again(input_ids, source_ids, mode))
    assert again.cfg == model.cfg


def to_legacy_qkv(qkv, config):
    """[q ; k ; v] rows -> the layout older litgpt wrote: per query group, its q heads, then its k, then its v.
    The inverse of litgpt's `qkv_reassemble`, written here so the test does not reuse the code it checks."""
    H, G, hs = config.n_head, config.n_query_groups, config.head_size
    q, k, v = qkv.split((H * hs, G * hs, G * hs))
    per_group = (G, -1, hs, qkv.shape[1])  # (G, heads of that kind in the group, hs, D)
    return torch.cat([q.reshape(per_group), k.reshape(per_group), v.reshape(per_group)], dim=1).reshape(qkv.shape)


def write_legacy_checkpoint(path, config, p_gen, p_mem):
    """A checkpoint as litgpt < 0.5 saved it: `attn.attn.weight` in the per-group interleaved layout."""
    gpt = write_checkpoint(path, config, p_gen, p_mem)
    legacy = {}
    for key, value in torch.load(path / LIT_WEIGHTS).items():
        if key.endswith(".attn.qkv.weight"):
            key, value = key.replace(".attn.qkv.weight", ".attn.attn.weight"), to_legacy_qkv(value, config)
        legacy[key] = value
    torch.save(legacy, path / LIT_WEIGHTS)
    return gpt, legacy


@pytest.mark.parametrize("n_query_groups", [2, 4, 1], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("p_gen,p_mem", [(1.0, 0.0), (0.25, 0.1)], ids=["sinks_off", "sinks_on"])
def test_legacy_interleaved_qkv_matches_litgpt(tmp_path, n_query_groups, p_gen, p_mem):
    config = litgpt_config(n_query_groups=n_query_groups)
    gpt, legacy = write_legacy_checkpoint(tmp_path, config, p_gen, p_mem)
    input_ids = tokens()
    with torch.no_grad():
        expected = gpt(input_ids)
        # The file is genuinely legacy: litgpt's own loader (GPT.load_state_dict, which regroups attn.attn.weight
        # in CausalSelfAttention._load_from_state_dict) accepts it strictly and rebuilds the original model.
        assert not any(".attn.qkv." in key for key in legacy)
        from_legacy = GPT(config).eval()
        from_legacy.load_state_dict(legacy)
        assert torch.equal(from_legacy(input_ids), expected)

        # Source id 0 turns every sink on under the published hash, so the NULL equals litgpt's dense MLP.
        model = load_litgpt_checkpoint(tmp_path).eval()
        torch.testing.assert_close(model(input_ids, torch.zeros_like(input_ids)), expected, rtol=1e-5, atol=1e-5)

        # The old loader only renamed the key; the test must tell that apart wherever the layouts differ.
        renamed = {key.replace(".attn.attn.weight", ".attn.qkv.weight"): value for key, value in legacy.items()}
        torch.save(renamed, tmp_path / LIT_WEIGHTS)
        rename_only = load_litgpt_checkpoint(tmp_path).eval()(input_ids, torch.zeros_like(input_ids))
    if n_query_groups == 1:  # one group: [q heads ; k ; v] is already [q ; k ; v], so the layouts coincide
        torch.testing.assert_close(rename_only, expected, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(rename_only, expected, atol=1e-3)


def test_legacy_qkv_bad_shape_or_duplicate_raises(tmp_path):
    _, legacy = write_legacy_checkpoint(tmp_path, litgpt_config(), p_gen=0.25, p_mem=0.1)
    key = "transformer.h.1.attn.attn.weight"
    torch.save({**legacy, key: legacy[key][:-16]}, tmp_path / LIT_WEIGHTS)  # one head's rows short
    with pytest.raises(ValueError, match=key):
        load_litgpt_checkpoint(tmp_path)
    duplicate = {**legacy, "transformer.h.1.attn.qkv.weight": legacy[key]}
    torch.save(duplicate, tmp_path / LIT_WEIGHTS)
    with pytest.raises(ValueError, match="transformer.h.1.attn.qkv.weight.*appears twice"):
        load_litgpt_checkpoint(tmp_path)


def test_bad_checkpoints_raise_value_error(tmp_path):
    write_checkpoint(tmp_path, litgpt_config(), p_gen=0.25, p_mem=0.1)
    state = torch.load(tmp_path / LIT_WEIGHTS)
    torch.save({k: v for k, v in state.items() if "h.1.mlp.proj" not in k}, tmp_path / LIT_WEIGHTS)
    with pytest.raises(ValueError, match="transformer.h.1.mlp.proj.weight"):
        load_litgpt_checkpoint(tmp_path)
    torch.save({**state, "transformer.h.0.mlp.extra.weight": torch.zeros(1)}, tmp_path / LIT_WEIGHTS)
    with pytest.raises(ValueError, match="mlp.extra"):
        load_litgpt_checkpoint(tmp_path)
    values = yaml.safe_load((tmp_path / LIT_CONFIG).read_text())
    (tmp_path / LIT_CONFIG).write_text(yaml.safe_dump({**values, "parallel_residual": True}))
    with pytest.raises(ValueError, match="parallel_residual"):
        load_litgpt_checkpoint(tmp_path)
    (tmp_path / LIT_CONFIG).write_text(yaml.safe_dump({**values, "p_gen": 0.3}))  # 96 * 0.3 = 28.8 units
    with pytest.raises(ValueError, match="p_gen"):
        load_litgpt_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="model_config.yaml"):
        load_litgpt_checkpoint(tmp_path / "missing")
