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


def test_legacy_attn_key_name_loads(tmp_path):
    write_checkpoint(tmp_path, litgpt_config(), p_gen=0.25, p_mem=0.1)
    state = torch.load(tmp_path / LIT_WEIGHTS)
    legacy = {k.replace("attn.qkv.weight", "attn.attn.weight"): v for k, v in state.items()}
    torch.save(legacy, tmp_path / LIT_WEIGHTS)
    model = load_litgpt_checkpoint(tmp_path)
    assert torch.equal(model.transformer.h[1].attn.qkv.weight, state["transformer.h.1.attn.qkv.weight"])


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
