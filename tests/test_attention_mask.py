"""The same-source causal attention mask: the vectorized builder against a naive loop, and the model's
packed-context isolation (a token never sees another source, past or future)."""
import pytest
import torch

from nulls_dist.config import NullConfig
from nulls_dist.model import NullTransformer, same_source_causal_mask


def naive_mask(source_ids, key_source_ids=None, query_pos=None):
    """Loop-by-loop definition: query t (at position query_pos[t]) may attend key j iff j <= query_pos[t]
    and both tokens carry the same source id."""
    key_source_ids = source_ids if key_source_ids is None else key_source_ids
    num_rows, num_queries = source_ids.shape
    num_keys = key_source_ids.shape[1]
    if query_pos is None:
        query_pos = list(range(num_keys - num_queries, num_keys))
    out = torch.zeros(num_rows, 1, num_queries, num_keys, dtype=torch.bool)
    for b in range(num_rows):
        for t in range(num_queries):
            for j in range(num_keys):
                out[b, 0, t, j] = j <= int(query_pos[t]) and int(source_ids[b, t]) == int(key_source_ids[b, j])
    return out


def random_packed_ids(gen, num_rows, length, num_sources):
    """(B, T) source ids made of random-length runs; sources may repeat (also non-adjacently in a row)."""
    rows = []
    for _ in range(num_rows):
        row = []
        while len(row) < length:
            run = int(torch.randint(1, 6, (1,), generator=gen))
            row += [int(torch.randint(0, num_sources, (1,), generator=gen))] * run
        rows.append(row[:length])
    return torch.tensor(rows)


@pytest.mark.parametrize("seed", range(4))
def test_mask_matches_naive_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    source_ids = random_packed_ids(gen, 3, 23, 4)  # (3, 23)
    assert torch.equal(same_source_causal_mask(source_ids), naive_mask(source_ids))


def test_mask_with_cached_keys_matches_naive_loop():
    gen = torch.Generator().manual_seed(7)
    key_source_ids = random_packed_ids(gen, 2, 19, 3)  # (2, 19)
    for query_pos in (torch.tensor([18]), torch.arange(12, 19), torch.tensor([3, 9, 15])):
        queries = key_source_ids[:, query_pos]
        got = same_source_causal_mask(queries, key_source_ids, query_pos)
        assert torch.equal(got, naive_mask(queries, key_source_ids, query_pos.tolist()))


def test_other_sources_future_tokens_are_hidden():
    # The bug docs/nulls_facts.md notes in the upstream copy: source 1 must not see source 2's *future* tokens either.
    source_ids = torch.tensor([[1, 1, 2, 2, 1, 1]])
    mask = same_source_causal_mask(source_ids)[0, 0]
    assert not mask[1, 2] and not mask[3, 4] and not mask[4, 2]
    assert mask[4, 0] and mask[4, 1] and mask[5, 4] and mask[3, 2]


@pytest.mark.parametrize("sink_path", ["gathered", "masked"])
def test_packed_sources_do_not_interact(sink_path):
    """A source's logits inside a packed row equal its logits when it runs alone (RoPE is relative)."""
    torch.manual_seed(0)
    model = NullTransformer(NullConfig.from_preset("debug", sink_path=sink_path)).eval()
    input_ids = torch.randint(0, 4096, (1, 24))
    source_ids = torch.tensor([[11] * 9 + [12] * 15])
    with torch.no_grad():
        packed = model(input_ids, source_ids)  # (1, 24, V)
        alone = model(input_ids[:, 9:], source_ids[:, 9:])  # (1, 15, V)
        other = input_ids.clone()
        other[:, :9] = torch.randint(0, 4096, (1, 9))
        changed_first = model(other, source_ids)
    torch.testing.assert_close(packed[:, 9:], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(changed_first[:, 9:], packed[:, 9:], rtol=0, atol=0)
    assert not torch.allclose(changed_first[:, :9], packed[:, :9])
