"""Deployment modes (docs/nulls_facts.md) against an explicit dense-mask formulation, and KV-cache decoding.

The dense formulation rebuilds litgpt's full SwiGLU (fc_1, fc_2, proj over all I hidden units) from the
model's weights and multiplies the hidden activations by a per-token vector over all I units, written here
from the mode definitions: backbone units 1 (or (p_gen+p_mem)/p_gen), sink unit j = mask_j(source) etc.
"""
import pytest
import torch
import torch.nn.functional as F

from nulls_dist.config import NullConfig
from nulls_dist.attention import AttentionMask
from nulls_dist.model import NullTransformer, SinkMode, same_source_causal_mask

VOCAB = 4096
A, B, C, D = VOCAB + 3, VOCAB + 40, VOCAB + 41, VOCAB + 977


def dense_forward(model, input_ids, source_ids, hidden_scale):
    """hidden_scale (B, T, I): multiplies silu(fc_1 x) * fc_2 x before proj, in every layer."""
    cfg = model.cfg
    n = input_ids.shape[1]
    mask = AttentionMask("dense", same_source_causal_mask(source_ids))
    x = model.transformer.wte(input_ids)
    for block in model.transformer.h:
        cos, sin = model.rope(input_ids.device)
        x = x + block.attn(block.norm_1(x), cos[:n], sin[:n], mask)
        mlp = block.mlp
        fc_1 = torch.cat([mlp.backbone_gate.weight, mlp.sink_gate])  # (I, D)
        fc_2 = torch.cat([mlp.backbone_up.weight, mlp.sink_up])  # (I, D)
        proj = torch.cat([mlp.backbone_down.weight, mlp.sink_down.t()], dim=1)  # (D, I)
        h = block.norm_2(x)
        x = x + (F.silu(h @ fc_1.t()) * (h @ fc_2.t()) * hidden_scale) @ proj.t()
    assert fc_1.shape[0] == cfg.intermediate_size
    return model.lm_head(model.transformer.ln_f(x))


def unit_scale(model, sink_mask, backbone=1.0):
    """sink_mask (B, T, P) float -> (B, T, I): backbone units `backbone`, then the sink mask."""
    lead = torch.full(sink_mask.shape[:2] + (model.cfg.n_backbone,), backbone)
    return torch.cat([lead, sink_mask], dim=-1)


def source_mask(model, source_id):
    return model.sink_assignment.mask(torch.tensor([source_id]))[0].float()  # (P,)


@pytest.fixture(params=["gathered", "masked"])
def setup(request):
    torch.manual_seed(0)
    model = NullTransformer(NullConfig.from_preset("debug", sink_path=request.param)).eval()
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 20), generator=gen)
    source_ids = torch.tensor([[A] * 6 + [B] * 9 + [A] * 5, [C] * 12 + [D] * 8])
    return model, input_ids, source_ids


def check(model, input_ids, source_ids, mode, hidden_scale):
    with torch.no_grad():
        got = model(input_ids, source_ids, mode)
        want = dense_forward(model, input_ids, source_ids, hidden_scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_train_mode(setup):
    model, input_ids, source_ids = setup
    per_token = torch.stack([torch.stack([source_mask(model, int(s)) for s in row]) for row in source_ids])
    check(model, input_ids, source_ids, SinkMode.train(), unit_scale(model, per_token))


def test_sink_on(setup):
    model, input_ids, source_ids = setup
    sink = source_mask(model, D).expand(2, 20, -1)
    check(model, input_ids, source_ids, SinkMode.sink_on(D), unit_scale(model, sink))


def test_sink_off_removes_the_union_of_forgotten_masks(setup):
    model, input_ids, source_ids = setup
    forget = [B, C]
    removed = torch.clamp(source_mask(model, B) + source_mask(model, C), max=1)
    sink = source_mask(model, A) * (1 - removed)
    assert 0 < sink.sum() < source_mask(model, A).sum()  # the forget set really overlaps the routed mask
    check(model, input_ids, source_ids, SinkMode.sink_off(A, forget), unit_scale(model, sink.expand(2, 20, -1)))


def test_sink_off_forgetting_the_route_itself_leaves_only_the_backbone(setup):
    model, input_ids, source_ids = setup
    sink = torch.zeros(2, 20, model.cfg.n_sink)
    check(model, input_ids, source_ids, SinkMode.sink_off(A, [A]), unit_scale(model, sink))


def test_backbone_only(setup):
    model, input_ids, source_ids = setup
    scale = (model.cfg.p_gen + model.cfg.p_mem) / model.cfg.p_gen
    sink = torch.zeros(2, 20, model.cfg.n_sink)
    check(model, input_ids, source_ids, SinkMode.backbone_only(), unit_scale(model, sink, backbone=scale))


def test_expected(setup):
    model, input_ids, source_ids = setup
    sink = torch.full((2, 20, model.cfg.n_sink), model.cfg.p_mem)
    check(model, input_ids, source_ids, SinkMode.expected(), unit_scale(model, sink))


def test_modes_without_source_ids_use_plain_causal_attention(setup):
    model, input_ids, _ = setup
    one_source = torch.full_like(input_ids, A)
    with torch.no_grad():
        for mode in (SinkMode.sink_on(A), SinkMode.backbone_only(), SinkMode.expected()):
            torch.testing.assert_close(model(input_ids, None, mode), model(input_ids, one_source, mode))


@pytest.mark.parametrize("mode", [SinkMode.train(), SinkMode.sink_on(D), SinkMode.sink_off(A, [B])],
                         ids=["train", "sink_on", "sink_off"])
def test_kv_cache_decoding_matches_full_forward(setup, mode):
    model, input_ids, source_ids = setup
    with torch.no_grad():
        full = model(input_ids, source_ids, mode)  # (2, 20, V)
        cache = model.init_kv_cache(batch_size=2, max_seq_length=32)
        steps = [model(input_ids[:, :8], source_ids[:, :8], mode, kv_cache=cache)]  # prefill crosses a boundary
        for t in range(8, 20):
            steps.append(model(input_ids[:, t : t + 1], source_ids[:, t : t + 1], mode, kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.next_pos == 20


def test_kv_cache_rejects_overflow(setup):
    model, input_ids, source_ids = setup
    cache = model.init_kv_cache(batch_size=2, max_seq_length=10)
    with torch.no_grad(), pytest.raises(ValueError, match="max_seq_length"):
        model(input_ids[:, :12], source_ids[:, :12], kv_cache=cache)
