"""The quantization attack (nulls_dist/evaluation/quantize.py): the per-element error bound, idempotence bit for
bit, int8 close to fp32 and int4 further on a debug NullTransformer, which tensors are quantized, per-row sink
scales, and that quantization re-enables no forgotten sink (masks are not weights)."""
from __future__ import annotations

import pytest
import torch

from nulls_dist.config import NullConfig
from nulls_dist.evaluation.quantize import (fake_quantize, group_scales, quantize_model,
                                            quantized_parameters)
from nulls_dist.model import NullTransformer, SinkMode

BASE = 4096


def _model() -> NullTransformer:
    torch.manual_seed(0)
    return NullTransformer(NullConfig.from_preset("debug", sink_strategy="uniform", min_source_id=BASE,
                                                  num_sources=64)).eval()


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (4, 32), (4, 48), (3, 7), (8, 1000)])
def test_error_at_most_half_a_step_and_idempotent(bits, group_size):
    torch.manual_seed(bits)
    w = torch.randn(37, 101) * torch.logspace(-4, 1, 37)[:, None]  # rows of very different magnitudes
    w[5] = 0.0  # an all-zero row stays zero
    q = fake_quantize(w, bits, group_size)
    scale = group_scales(w, bits, group_size)  # (R, G)
    g = w.shape[1] if group_size is None else min(group_size, w.shape[1])
    per_element = scale.repeat_interleave(g, dim=1)[:, : w.shape[1]]  # (R, C)
    # one fp32 rounding of w / s can land on a .5 boundary: 1e-6 relative is that rounding, nothing looser
    assert torch.all((q - w).abs() <= per_element / 2 * (1 + 1e-6))
    padded = torch.nn.functional.pad(w, (0, (-w.shape[1]) % g)).view(w.shape[0], -1, g)
    amax = padded.abs().amax(-1)  # (R, G)
    qmax = 2 ** (bits - 1) - 1
    nonzero = amax > 0
    # no clipping, and a tight grid: amax / qmax <= s <= amax / qmax * (1 + 2^-16) (the 17-bit round-up)
    assert torch.all(scale[nonzero] >= amax[nonzero] / qmax)
    assert torch.all(scale[nonzero] <= amax[nonzero] / qmax * (1 + 2.0 ** -16))
    codes = q / per_element
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= qmax  # on the grid
    assert torch.equal(q[5], torch.zeros(101)) and q.dtype == w.dtype
    assert torch.equal(fake_quantize(q, bits, group_size), q)  # twice = once, bit for bit


def test_fewer_bits_are_coarser():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    err = {b: (fake_quantize(w, b) - w).abs().mean().item() for b in (8, 4, 3)}
    assert err[8] < err[4] < err[3]
    assert (fake_quantize(w, 4, 32) - w).abs().mean() < err[4]  # groups: smaller scales, smaller errors


def test_quantized_tensors_and_the_copy():
    model = _model()
    names = quantized_parameters(model)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    sinks = {f"transformer.h.{i}.mlp.{t}" for i in range(model.cfg.n_layer) for t in ("sink_gate", "sink_up", "sink_down")}
    assert set(names) == linears | sinks | {"transformer.wte.weight"} and len(names) == len(set(names))
    assert "transformer.wte.weight" not in quantized_parameters(model, embeddings=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_model(model, 4, 32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    qs = q.state_dict()
    for key in before:
        if key in names:
            assert not torch.equal(qs[key], before[key]), key
            assert torch.equal(qs[key], fake_quantize(before[key], 4, 32)), key
        else:  # the RMSNorm weights
            assert key.endswith("norm_1.weight") or key.endswith("norm_2.weight") or key == "transformer.ln_f.weight"
            assert torch.equal(qs[key], before[key])
    again = quantize_model(q, 4, 32).state_dict()
    assert all(torch.equal(again[k], qs[k]) for k in qs)  # idempotent on the whole model
    no_emb = quantize_model(model, 8, embeddings=False).state_dict()
    assert torch.equal(no_emb["transformer.wte.weight"], before["transformer.wte.weight"])


def test_int8_logits_close_to_fp32_and_int4_further():
    model = _model()
    x = torch.randint(0, model.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    modes = [SinkMode.sink_on(BASE + 3), SinkMode.sink_off(BASE + 3, [BASE + 5]), SinkMode.backbone_only()]
    with torch.no_grad():
        for mode in modes:
            ref = model(x, None, mode=mode)
            rel = {}
            for bits, g in ((8, None), (4, 32), (4, None)):
                out = quantize_model(model, bits, g)(x, None, mode=mode)
                rel[(bits, g)] = ((out - ref).norm() / ref.norm()).item()
            # measured on this model: int8 ~0.009, int4 g=32 ~0.16, int4 per channel ~0.18
            assert rel[(8, None)] < 0.02, (mode, rel)
            assert rel[(4, 32)] > 5 * rel[(8, None)] and rel[(4, None)] > 5 * rel[(8, None)], (mode, rel)


def test_sink_scales_are_per_row():
    """Changing one sink unit's row changes no other row's quantization (a forgotten source's rows never set a
    survivor's scale), and rows zeroed by hard unlearning stay exactly zero."""
    model = _model()
    forgotten = BASE + 5
    rows = model.sink_assignment.rows(torch.tensor([forgotten]))[0]
    rows = rows[rows >= 0]
    mlp = model.transformer.h[0].mlp
    q = quantize_model(model, 4, None).transformer.h[0].mlp
    with torch.no_grad():
        for table in ("sink_gate", "sink_up", "sink_down"):
            getattr(mlp, table)[rows] *= 1000.0
    bumped = quantize_model(model, 4, None).transformer.h[0].mlp
    others = torch.ones(model.cfg.n_sink, dtype=torch.bool)
    others[rows] = False
    for table in ("sink_gate", "sink_up", "sink_down"):
        assert torch.equal(getattr(q, table)[others], getattr(bumped, table)[others])
        assert not torch.equal(getattr(q, table)[rows], getattr(bumped, table)[rows])
    with torch.no_grad():
        for layer in model.transformer.h:  # hard unlearning: zero the forgotten rows in every table
            for table in ("sink_gate", "sink_up", "sink_down"):
                getattr(layer.mlp, table)[rows] = 0.0
    hard = quantize_model(model, 4, 32)
    for layer in hard.transformer.h:
        for table in ("sink_gate", "sink_up", "sink_down"):
            assert torch.equal(getattr(layer.mlp, table)[rows], torch.zeros(len(rows), model.cfg.n_embd))


def test_quantization_re_enables_no_forgotten_sink():
    """Masks are not weights: in sink_off the quantized model never reads a forgotten source's rows, whatever
    they hold (scrambled rows give the same logits bit for bit), while sink_on of that source does read them."""
    model = _model()
    forgotten, route = BASE + 5, BASE + 9
    x = torch.randint(0, model.cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(2))
    q = quantize_model(model, 4, 32)
    rows = model.sink_assignment.rows(torch.tensor([forgotten]))[0]
    rows = rows[rows >= 0]
    off, on = SinkMode.sink_off(route, [forgotten]), SinkMode.sink_on(forgotten)
    with torch.no_grad():
        before_off, before_on = q(x, None, mode=off), q(x, None, mode=on)
        for layer in q.transformer.h:
            for table in ("sink_gate", "sink_up", "sink_down"):
                getattr(layer.mlp, table)[rows] = torch.randn(len(rows), model.cfg.n_embd)
        assert torch.equal(q(x, None, mode=off), before_off)
        assert not torch.equal(q(x, None, mode=on), before_on)


def test_bad_arguments_name_the_field():
    w = torch.randn(4, 8)
    for bits in (1, 9, 4.0):
        with pytest.raises(ValueError, match="bits"):
            fake_quantize(w, bits)
    with pytest.raises(ValueError, match="group_size"):
        fake_quantize(w, 4, 0)
    with pytest.raises(ValueError, match="2-D"):
        fake_quantize(torch.randn(8), 4)
    with pytest.raises(ValueError, match="bits"):
        quantize_model(_model(), 16)


def test_same_values_as_torchao_for_a_given_scale():
    """torchao's affine primitives, given our scales (zero point 0, codes in [-qmax, qmax]), give the same
    dequantized values. Skipped where torchao is not installed (it is not a dependency)."""
    quant = pytest.importorskip("torchao.quantization.quant_primitives")
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    for bits, g in ((8, 64), (4, 16)):
        qmax = 2 ** (bits - 1) - 1
        scale = group_scales(w, bits, g).reshape(-1)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        codes = quant.quantize_affine(w, (1, g), scale, zero, torch.int8, -qmax, qmax)
        ours = quant.dequantize_affine(codes, (1, g), scale, zero, torch.int8, -qmax, qmax, output_dtype=torch.float32)
        assert torch.equal(ours, fake_quantize(w, bits, g))


def test_an_external_storage_model_quantizes_every_row_it_reads(tmp_path):
    """A deployment that reads its sink rows on demand (sharded-table runs, nulls_dist/sink_store.py): the
    quantized copy equals the whole model quantized, for rows resident before the copy and rows read after it,
    and the original store keeps full-precision rows."""
    from nulls_dist.formats.weights import RowReader, save_weights
    from nulls_dist.sink_store import SinkRowStore

    cfg = NullConfig.from_preset("debug", sink_strategy="uniform", sink_k=6, sink_pool_size=300)
    torch.manual_seed(0)
    dense = NullTransformer(cfg)
    save_weights(tmp_path / "model.safetensors", dense.state_dict())
    external = NullTransformer(cfg, sink_storage="external")
    external.load_state_dict({k: v for k, v in dense.state_dict().items() if ".sink_" not in k})
    external.attach_sink_store(SinkRowStore(cfg, RowReader(tmp_path / "model.safetensors")))
    external.eval()
    x = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3))
    first, later = SinkMode.sink_on(4096 + 1), SinkMode.sink_on(4096 + 7)
    with torch.no_grad():
        full = external(x, None, mode=first)  # its rows become resident before the copy
        for bits, g in ((8, None), (4, 32)):
            whole, lazy = quantize_model(dense, bits, g), quantize_model(external, bits, g)
            for mode in (first, later):
                assert torch.allclose(lazy(x, None, mode=mode), whole(x, None, mode=mode), atol=1e-5, rtol=1e-5)
        assert torch.equal(external(x, None, mode=first), full)  # the original is untouched
        assert not torch.allclose(quantize_model(external, 4, 32)(x, None, mode=first), full, atol=1e-3)
    with pytest.raises(ValueError, match="no sink row store attached"):
        quantize_model(NullTransformer(cfg, sink_storage="external"), 8)
