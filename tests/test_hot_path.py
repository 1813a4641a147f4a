"""The training hot path on the CPU: given a precomputed sink plan, one forward + backward of the model issues no
host-device synchronisation (counted with a TorchDispatchMode: nulls_dist/bench/syncs.py), FlexAttention's forward equals
the dense same-source causal mask (packed rows with non-adjacent runs of one source, one-token segments,
KV-cache decoding), and a planless forward -- which must read the ids back -- is seen by the counter (so the
count can fail)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from nulls_dist.attention import AttentionMask, attend, build_mask, flex_block_mask, same_source_causal_mask
from nulls_dist.config import NullConfig
from nulls_dist.model import IGNORE_INDEX, NullTransformer, SinkMode
from nulls_dist.sink_plan import plan_for_batch
from nulls_dist.bench.syncs import SyncCounter

CONFIGS = {
    "debug": dict(preset="debug"),
    "debug-masked": dict(preset="debug", sink_path="masked"),
    "debug-layer-specific": dict(preset="debug", sink_strategy="uniform", sink_layer_specific=True, sink_k=9),
    # the paper's shape at a CPU-sized width: 4 layers, GQA 15/5 heads, 500 backbone + 7692 sink units
    "paper-shape-4-layers": dict(preset="paper_wiki_1b", n_layer=4, n_embd=120, head_size=16, vocab_size=512,
                                 padded_vocab_size=512, block_size=64),
}


def packed_source_ids(gen: torch.Generator, rows: int, length: int, base: int, num_sources: int) -> torch.Tensor:
    """(B, T) runs of random length; a source may recur later in the same row (non-adjacent runs)."""
    out = []
    for _ in range(rows):
        row: list[int] = []
        while len(row) < length:
            run = int(torch.randint(1, 9, (1,), generator=gen))
            row += [base + int(torch.randint(num_sources, (1,), generator=gen))] * run
        out.append(row[:length])
    return torch.tensor(out)


def batch_for(cfg: NullConfig, seed: int = 0, rows: int = 3, length: int = 40):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, cfg.vocab_size, (rows, length), generator=gen)
    source_ids = packed_source_ids(gen, rows, length, cfg.vocab_size, 6)
    labels = torch.randint(0, cfg.vocab_size, (rows, length), generator=gen)
    labels[:, ::7] = IGNORE_INDEX
    return input_ids, source_ids, labels


def make_model(name: str) -> NullTransformer:
    spec = dict(CONFIGS[name])
    preset = spec.pop("preset")
    torch.manual_seed(0)
    return NullTransformer(NullConfig.from_preset(preset, **spec))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_backward_with_a_plan_has_no_host_sync(name):
    model = make_model(name)
    input_ids, source_ids, labels = batch_for(model.cfg)
    plan = plan_for_batch(source_ids.numpy(), model.cfg, model.sink_assignment)  # as the loader's workers do
    with SyncCounter() as counter:
        loss = model(input_ids, source_ids, plan=plan, labels=labels)
        loss.backward()
    assert counter.total == 0, dict(counter.counts)
    # the same loss and gradients as the planless forward (which builds its plan itself)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with SyncCounter() as planless:
        again = model(input_ids, source_ids, labels=labels)
        again.backward()
    assert planless.total > 0  # the counter sees the planless path's reads: the zero above can fail
    torch.testing.assert_close(loss, again, rtol=0, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7)  # CPU scatter-add order


def test_plan_and_loss_need_no_sync_under_activation_checkpointing():
    from nulls_dist.train.trainer import enable_activation_checkpointing

    model = make_model("debug")
    enable_activation_checkpointing(model)
    input_ids, source_ids, labels = batch_for(model.cfg, seed=3)
    plan = plan_for_batch(source_ids.numpy(), model.cfg, model.sink_assignment)
    with SyncCounter() as counter:
        model(input_ids, source_ids, plan=plan, labels=labels).backward()
    assert counter.total == 0, dict(counter.counts)


def test_single_source_rows_use_plain_causal_attention():
    model = make_model("debug")
    source_ids = torch.full((2, 16), model.cfg.vocab_size + 5)
    plan = plan_for_batch(source_ids.numpy(), model.cfg, model.sink_assignment)
    assert plan.single_source_rows
    assert build_mask("auto", source_ids, plan.single_source_rows, 16, 16, 0).kind == "causal"
    packed = plan_for_batch(batch_for(model.cfg)[1].numpy(), model.cfg, model.sink_assignment)
    assert not packed.single_source_rows


# ------------------------------------------------------------------------------------------------ FlexAttention
def _qkv(gen, rows, heads, groups, queries, keys, hs=16):
    q = torch.randn(rows, heads, queries, hs, generator=gen)
    k = torch.randn(rows, groups, keys, hs, generator=gen)
    v = torch.randn(rows, groups, keys, hs, generator=gen)
    return q, k, v


@pytest.fixture(autouse=True)
def _quiet_flex():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


@pytest.mark.parametrize("seed", range(3))
def test_flex_forward_equals_the_dense_mask_on_packed_rows(seed):
    gen = torch.Generator().manual_seed(seed)
    source_ids = packed_source_ids(gen, 3, 45, 100, 4)  # non-adjacent runs and one-token segments
    source_ids[0, 10] = 999  # a one-token segment
    q, k, v = _qkv(gen, 3, 6, 2, 45, 45)
    dense = attend(q, k, v, AttentionMask("dense", same_source_causal_mask(source_ids)))
    flex = attend(q, k, v, AttentionMask("flex", flex_block_mask(source_ids)))
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-6)
    # no K/V repetition: the reference with repeated heads is the same
    rep = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=same_source_causal_mask(source_ids))
    torch.testing.assert_close(dense, rep, rtol=1e-5, atol=1e-6)


def test_flex_forward_with_a_kv_cache_equals_the_dense_mask():
    gen = torch.Generator().manual_seed(4)
    keys = packed_source_ids(gen, 2, 30, 100, 3)
    for first, count in ((29, 1), (20, 10), (0, 30)):
        queries = keys[:, first:first + count]
        q, k, v = _qkv(gen, 2, 4, 4, count, 30)
        pos = torch.arange(first, first + count)
        dense = attend(q, k, v, AttentionMask("dense", same_source_causal_mask(queries, keys, pos)))
        flex = attend(q, k, v, AttentionMask("flex", flex_block_mask(queries, keys, first)))
        torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sink_path", ["gathered", "masked"])
def test_model_forward_and_decoding_with_flex_equal_sdpa(sink_path):
    torch.manual_seed(0)
    model = NullTransformer(NullConfig.from_preset("debug", sink_path=sink_path)).eval()
    input_ids, source_ids, _ = batch_for(model.cfg, seed=5, rows=2, length=24)
    with torch.no_grad():
        model.attention_impl = "sdpa"
        want = model(input_ids, source_ids)
        model.attention_impl = "flex"
        got = model(input_ids, source_ids)
        cache = model.init_kv_cache(batch_size=2, max_seq_length=24)
        steps = [model(input_ids[:, :10], source_ids[:, :10], kv_cache=cache)]
        for t in range(10, 24):
            steps.append(model(input_ids[:, t:t + 1], source_ids[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), want, rtol=1e-5, atol=1e-5)


def test_decoding_reuses_one_plan_per_shape():
    """Generation builds a plan for the prompt and one for the decode steps, and reuses it every step."""
    from nulls_dist.deploy.generate import SamplingConfig, generate

    model = make_model("debug").eval()
    calls = []
    original = model.make_plan

    def counting(*args, **kwargs):
        calls.append(args[2] if len(args) > 2 else kwargs.get("shape"))
        return original(*args, **kwargs)

    model.make_plan = counting
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 7))
    generate(model, prompt, SinkMode.sink_on(model.cfg.vocab_size + 3), SamplingConfig(max_new_tokens=12))
    assert sorted(calls) == [(1, 1), (1, 7)]


def test_counted_targets_match_labels():
    cfg = NullConfig.from_preset("debug")
    _, source_ids, labels = batch_for(cfg)
    assert int((labels != IGNORE_INDEX).sum()) == labels.numel() - int(np.ceil(40 / 7)) * 3
