"""NullTransformer: shapes, the masked and gathered sink paths agreeing in outputs and every gradient,
bad-input errors, and the presets' parameter counts."""
import json

import numpy as np
import pytest
import torch

from nulls_dist.config import NullConfig
from nulls_dist.model import NullTransformer, SinkMode, flops_per_token, num_parameters_of, remove_rows
from nulls_dist.sink_plan import segments_numpy

VOCAB = 4096


def packed_batch(seed, num_rows=3, length=40):
    """Random tokens and packed source ids: several sources per row, one source in two rows, and one source
    re-appearing non-adjacently inside a row (two segments of the same source)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (num_rows, length), generator=gen)
    base = VOCAB + int(torch.randint(0, 10_000, (1,), generator=gen))
    a, b, c, d = base, base + 1, base + 17, base + 123
    rows = [
        [a] * 7 + [b] * 13 + [a] * 5 + [c] * 15,
        [c] * 22 + [d] * 18,
        [b] * 40,
    ]
    return input_ids, torch.tensor(rows[:num_rows])


def twin_models(**overrides):
    """A gathered and a masked model with identical weights."""
    torch.manual_seed(0)
    gathered = NullTransformer(NullConfig.from_preset("debug", sink_path="gathered", **overrides))
    masked = NullTransformer(NullConfig.from_preset("debug", sink_path="masked", **overrides))
    masked.load_state_dict(gathered.state_dict())
    return gathered, masked


def naive_segments(source_ids):
    """Loop definition: (start, end, source id) of each maximal equal-id run inside each row."""
    out = []
    length = source_ids.shape[1]
    for b, row in enumerate(source_ids.tolist()):
        start = 0
        for t in range(1, length + 1):
            if t == length or row[t] != row[start]:
                out.append((b * length + start, b * length + t, row[start]))
                start = t
    return out


@pytest.mark.parametrize("seed", range(3))
def test_source_segments_match_a_loop(seed):
    _, source_ids = packed_batch(seed)
    gen = torch.Generator().manual_seed(seed)
    source_ids = torch.cat([source_ids, torch.randint(0, 3, (2, 40), generator=gen)])  # short random runs
    offsets, seg_source, sources, token_source = segments_numpy(source_ids.numpy())
    got = [(int(offsets[s]), int(offsets[s + 1]), int(sources[seg_source[s]])) for s in range(len(seg_source))]
    assert got == naive_segments(source_ids)
    assert np.array_equal(sources, torch.unique(source_ids).numpy())
    assert np.array_equal(sources[token_source], source_ids.flatten().numpy())


def test_remove_rows_keeps_ascending_right_padded_rows():
    rows = np.array([[1, 4, 7, 9], [2, 4, -1, -1]])
    got = remove_rows(rows, np.array([4, 9, 0, 1, 3]))
    assert np.array_equal(got, np.array([[7, -1, -1, -1], [2, -1, -1, -1]]))


def test_forward_shape_and_dtype():
    model = NullTransformer(NullConfig.from_preset("debug"))
    input_ids, source_ids = packed_batch(0)
    logits = model(input_ids, source_ids)
    assert logits.shape == (3, 40, model.cfg.padded_vocab_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


STRATEGIES = [
    dict(sink_strategy="reference"),
    dict(sink_strategy="uniform", sink_k=40),
    dict(sink_strategy="uniform", sink_k=24, sink_layer_specific=True, sink_seed=3),
    dict(sink_strategy="code", sink_k=13, num_sources=20_000, min_source_id=VOCAB),
]


@pytest.mark.parametrize("overrides", STRATEGIES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
@pytest.mark.parametrize("mode", [SinkMode.train(), SinkMode.sink_off(VOCAB + 5, [VOCAB + 9, VOCAB + 11])],
                         ids=["train", "sink_off"])
def test_masked_and_gathered_agree_in_outputs_and_gradients(overrides, mode):
    gathered, masked = twin_models(**overrides)
    input_ids, source_ids = packed_batch(1)
    # the batch really has sources sharing sink rows (the case where table gradients accumulate)
    assignment = gathered.sink_assignment
    masks = assignment.mask(torch.unique(source_ids))  # (U, P)
    assert ((masks.float() @ masks.float().t()).triu(1) > 0).any()
    weight = torch.randn(3, 40, VOCAB, generator=torch.Generator().manual_seed(5))
    outputs = []
    for model in (gathered, masked):
        model.zero_grad()
        logits = model(input_ids, source_ids, mode)
        (logits * weight).sum().backward()
        outputs.append(logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=2e-5)
    with torch.no_grad():  # the sinks move the logits far more than the tolerance: a wrong row cannot pass
        assert (outputs[0] - gathered(input_ids, source_ids, SinkMode.backbone_only())).abs().max() > 1e-2
    grads_masked = dict(masked.named_parameters())
    for name, param in gathered.named_parameters():
        # fp32 with sums over ~120 tokens of O(1) terms: 1e-4 relative is ~1000x float eps and far below the
        # size of any real mistake (a missing or extra sink row changes these gradients by O(1)).
        torch.testing.assert_close(param.grad, grads_masked[name].grad, rtol=1e-4, atol=1e-4, msg=name)
    sink_grad = gathered.transformer.h[0].mlp.sink_gate.grad  # (P, D)
    touched = (sink_grad != 0).any(dim=1)
    assert 0 < int(touched.sum()) < sink_grad.shape[0]  # only the active rows receive gradient


def test_sink_rows_outside_the_batch_get_no_gradient():
    gathered, _ = twin_models(sink_strategy="uniform", sink_k=10)
    input_ids, source_ids = packed_batch(2)
    gathered(input_ids, source_ids).sum().backward()
    active = gathered.sink_assignment.mask(torch.unique(source_ids)).any(dim=0)  # (P,)
    for block in gathered.transformer.h:
        for table in (block.mlp.sink_gate, block.mlp.sink_up, block.mlp.sink_down):
            touched = (table.grad != 0).any(dim=1)
            assert torch.equal(touched, active)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(p_gen=0.1), "p_gen"),  # 512 * 0.1 = 51.2 units
        (dict(n_query_groups=3), "n_query_groups"),
        (dict(sink_k=449, sink_strategy="uniform"), "sink_k"),
        (dict(sink_path="sparse"), "sink_path"),
        (dict(sink_strategy="bloom"), "sink_strategy"),
        (dict(sink_layer_specific=True), "layer_specific"),  # not available for the published hash
        (dict(num_sources=0), "num_sources"),
        (dict(nonsense=1), "nonsense"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        NullConfig.from_preset("debug", **overrides)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="paper_wiki_7b"):
        NullConfig.from_preset("paper_wiki_7b")


def test_bad_inputs_raise_value_error():
    model = NullTransformer(NullConfig.from_preset("debug", num_sources=100, min_source_id=VOCAB))
    input_ids = torch.randint(0, VOCAB, (2, 8))
    ok = torch.full((2, 8), VOCAB + 3)
    with pytest.raises(ValueError, match="-2"):
        model(input_ids, torch.full((2, 8), -2))
    with pytest.raises(ValueError, match=str(VOCAB + 100)):
        model(input_ids, torch.full((2, 8), VOCAB + 100))
    with pytest.raises(ValueError, match="num_sources"):
        model(input_ids, ok, SinkMode.sink_on(VOCAB + 500))
    with pytest.raises(ValueError, match="source_ids shape"):
        model(input_ids, ok[:, :5])
    with pytest.raises(ValueError, match="source_ids is None"):
        model(input_ids, None)
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.full((2, 8), VOCAB), ok)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 257, dtype=torch.long), torch.full((1, 257), VOCAB))
    with pytest.raises(ValueError, match="-1"):
        SinkMode.sink_off(VOCAB, [-1])
    with pytest.raises(ValueError, match="-7"):
        SinkMode.sink_on(-7)


def test_preset_parameter_counts():
    def expected(cfg):
        D, units, V = cfg.n_embd, cfg.intermediate_size, cfg.padded_vocab_size
        attn = D * (cfg.n_head + 2 * cfg.n_query_groups) * cfg.head_size + cfg.n_head * cfg.head_size * D
        return 2 * V * D + D + cfg.n_layer * (attn + 3 * D * units + 2 * D)

    for name in ("debug", "paper_wiki_1b", "paper_hp"):
        cfg = NullConfig.from_preset(name)
        assert num_parameters_of(cfg) == expected(cfg), name
    paper = NullConfig.from_preset("paper_wiki_1b")
    assert num_parameters_of(paper) == 1_006_695_360  # "about 1.0B" (docs/nulls_facts.md)
    assert (paper.n_backbone, paper.n_sink) == (500, 7692)
    hp = NullConfig.from_preset("paper_hp")
    assert (hp.n_backbone, hp.n_sink) == (500, 2000)
    debug = NullConfig.from_preset("debug")
    assert NullTransformer(debug).num_parameters() == expected(debug)  # the real model, not only the meta one


def test_flops_per_token_gathered_vs_masked():
    cfg = NullConfig.from_preset("paper_wiki_1b")
    dense = flops_per_token(cfg, 1024, gathered=False)
    sparse = flops_per_token(cfg, 1024, gathered=True, mean_sinks_per_source=100)
    mlp_saved = 3 * cfg.n_layer * 2 * 3 * cfg.n_embd * (cfg.intermediate_size - 600)
    assert dense - sparse == pytest.approx(mlp_saved)
    assert dense == pytest.approx(3 * 2 * 1_006_695_360 - 3 * 2 * cfg.padded_vocab_size * cfg.n_embd
                                  + 3 * cfg.n_layer * 4 * cfg.n_head * cfg.head_size * 1024, rel=1e-4)


def test_smoke_cli_prints_agreeing_paths_and_preset_counts(capsys):
    from nulls_dist.cli.smoke import main

    assert main(["--seq-len", "48", "--strategy", "uniform"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["paths_agree"] and report["max_abs_diff"]["grads"] < 1e-4
    assert report["num_sources_in_batch"] == 5  # 2 rows x 3 runs, one source shared across the rows
    assert report["preset_parameters"]["paper_wiki_1b"] == 1_006_695_360
    assert report["sink_assignment"]["strategy"] == "uniform"
    assert all(report["modes_finite"].values())


@pytest.mark.gpu
def test_masked_and_gathered_agree_on_cuda():
    """The gathered path dispatches to the Triton kernel on CUDA. Its fp32 dots may run as TF32 (10-bit
    mantissa), hence 1e-2 relative; the sink contribution itself is > 1e-2 absolute (checked above)."""
    gathered, masked = (m.cuda() for m in twin_models(sink_strategy="uniform", sink_k=40))
    input_ids, source_ids = (t.cuda() for t in packed_batch(1))
    weight = torch.randn(3, 40, VOCAB, generator=torch.Generator().manual_seed(5)).cuda()
    outputs = []
    for model in (gathered, masked):
        logits = model(input_ids, source_ids)
        (logits * weight).sum().backward()
        outputs.append(logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-2, atol=1e-3)
    grads_masked = dict(masked.named_parameters())
    for name, param in gathered.named_parameters():
        ref = grads_masked[name].grad
        torch.testing.assert_close(param.grad, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()), msg=name)
