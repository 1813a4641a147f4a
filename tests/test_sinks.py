"""Tests of nulls_dist.sinks (the three sink-assignment strategies), the `nulls-sinks` command and the sink
assignment benchmark script."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nulls_dist import sink_hash, sinks
from nulls_dist.bench.sink_assignment import main as bench_main
from nulls_dist.cli.sinks import collision_stats
from nulls_dist.cli.sinks import main as cli_main
from nulls_dist.sinks import SinkAssignment, SinkAssignmentConfig, mask_to_rows, rows_to_mask

PAPER = dict(pool_size=7692, p_mem=0.013)
PAPER_CODE = dict(num_sources=6_407_814, min_source_id=49152)
NULLS_SINKS = Path(sys.executable).parent / "nulls-sinks"


def _golden_cases() -> list[dict]:
    path = Path(__file__).resolve().parent / "data" / "reference_sink_masks.json"
    return json.loads(path.read_text())["cases"]


def _naive_reference_mask(source_ids: torch.Tensor, pool: int, p_mem: float, id_dtype: str) -> torch.Tensor:
    """The published formula written out literally: torch int64 pow/products, float32 division, `< p`."""
    a, m = sink_hash.REF_A, sink_hash.REF_M
    aj = torch.pow(torch.tensor(a, dtype=torch.int64), torch.arange(pool, dtype=torch.int64))
    sid = source_ids.to(getattr(torch, id_dtype))
    h = ((sid * 2**16)[:, None] * (aj % m)) % m
    return (h.to(torch.float32) / torch.tensor(m, dtype=torch.float32)) < torch.tensor(p_mem, dtype=torch.float32)


def _pairwise_shared(mask: torch.Tensor) -> torch.Tensor:
    """(S, P) bool -> (S, S) shared-sink counts with the diagonal set to -1."""
    x = mask.to(torch.float32)
    shared = (x @ x.T).to(torch.int64)
    shared.fill_diagonal_(-1)
    return shared


# ------------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("case", _golden_cases(), ids=lambda c: f"{c['source_id']}-{c['id_dtype']}-{c['num_sinks']}")
def test_reference_matches_golden(case):
    cfg = SinkAssignmentConfig("reference", case["num_sinks"], case["p_mem"], id_dtype=case["id_dtype"])
    assign = SinkAssignment(cfg)
    ids = torch.tensor([case["source_id"]])
    rows = assign.rows(ids)[0]
    assert rows[rows >= 0].tolist() == case["active"]
    assert assign.mask(ids)[0].nonzero().flatten().tolist() == case["active"]


def test_golden_covers_both_dtypes_and_three_pools():
    cases = _golden_cases()
    assert {c["id_dtype"] for c in cases} == {"int64", "int32"}
    assert len({(c["num_sinks"], c["p_mem"]) for c in cases}) == 3


@pytest.mark.parametrize("pool,p_mem", [(7692, 0.013), (2000, 0.1), (64, 0.3), (301, 0.999)])
@pytest.mark.parametrize("id_dtype", ["int64", "int32"])
def test_reference_equals_literal_formula_on_random_ids(pool, p_mem, id_dtype):
    gen = torch.Generator().manual_seed(pool)
    high = 2**31 - 1 if id_dtype == "int32" else 2**62
    ids = torch.randint(0, high, (300,), generator=gen)
    ids[:4] = torch.tensor([0, 1, 49152, 2**31 - 1])
    assign = SinkAssignment(SinkAssignmentConfig("reference", pool, p_mem, id_dtype=id_dtype))
    expected = _naive_reference_mask(ids, pool, p_mem, id_dtype)
    assert torch.equal(assign.mask(ids), expected)
    assert torch.equal(rows_to_mask(assign.rows(ids), pool), expected)


def test_reference_source_zero_is_all_sinks_and_rows_pad_to_widest():
    assign = SinkAssignment(SinkAssignmentConfig("reference", **PAPER))
    rows = assign.rows(torch.tensor([0, 49152, 1]))  # (3, 7692)
    assert rows.shape == (3, 7692)
    assert rows[0].tolist() == list(range(7692))
    for row in rows[1:]:
        valid = row[row >= 0]
        assert (row[valid.numel():] == -1).all() and (valid[1:] > valid[:-1]).all()


def test_reference_chunking_does_not_change_rows(monkeypatch):
    ids = torch.arange(49152, 49152 + 50)
    whole = SinkAssignment(SinkAssignmentConfig("reference", **PAPER)).rows(ids)
    monkeypatch.setattr(sinks, "CHUNK_ELEMENTS", 7692 * 3)  # 3 ids per chunk, widths differ per chunk
    assert torch.equal(SinkAssignment(SinkAssignmentConfig("reference", **PAPER)).rows(ids), whole)


def test_reference_threshold_is_exact_boundary():
    for p_mem in (0.013, 0.1, 0.3, 1.0):
        t = sink_hash.reference_threshold(p_mem)
        below, at = torch.tensor([t - 1]), torch.tensor([t])
        assert bool(sink_hash._reference_hit(below, p_mem)[0]) or t == 0
        assert t == sink_hash.REF_M or not bool(sink_hash._reference_hit(at, p_mem)[0])


# ------------------------------------------------------------------------------------------------ uniform
@pytest.mark.parametrize("pool,k", [(7692, 100), (2000, 200), (64, 32), (64, 64), (97, 1), (500, 30)])
def test_uniform_exactly_k_distinct_ascending(pool, k):
    assign = SinkAssignment(SinkAssignmentConfig("uniform", pool, 0.5, k=k))
    rows = assign.rows(torch.arange(49152, 49152 + 3000))
    assert rows.shape == (3000, k)
    assert (rows >= 0).all() and (rows < pool).all()
    assert (rows[:, 1:] > rows[:, :-1]).all()


def test_uniform_k_from_p_mem_and_balanced_load():
    assign = SinkAssignment(SinkAssignmentConfig("uniform", **PAPER))
    assert assign.k == 100
    stats = collision_stats(assign, torch.arange(49152, 49152 + 20000), pair_ids=500)
    load = stats["unit_load"]
    # 20000 ids: binomial std ~16.0; a uniform k-subset is binomial per unit, so the observed std is close
    assert abs(load["std"] - load["binomial_std"]) < 0.15 * load["binomial_std"]
    assert abs(stats["pairwise_overlap"]["mean"] - stats["pairwise_overlap"]["ideal_mean"]) < 0.02


def test_uniform_retry_path_is_first_k_distinct_of_each_attempt():
    pool, k = 300, 40
    state = sink_hash._source_state(np.arange(400), seed=5, layer_key=0)
    got = sink_hash._first_distinct(state, k, pool, draws=k)  # k draws: most sources need a retry
    for i in range(state.shape[0]):
        draws = k
        while True:
            seq = sink_hash._draws(state[i : i + 1], draws, pool)[0].tolist()
            distinct = list(dict.fromkeys(v for v in seq if v < pool))  # out-of-range draws are rejected
            if len(distinct) >= k:
                break
            draws *= 2
        assert got[i].tolist() == sorted(distinct[:k]), i


def test_uniform_seed_and_layer_specific():
    ids = torch.arange(1000, 1200)
    base = SinkAssignment(SinkAssignmentConfig("uniform", **PAPER))
    assert torch.equal(base.rows(ids, layer=0), base.rows(ids, layer=7))  # not layer-specific
    other_seed = SinkAssignment(SinkAssignmentConfig("uniform", **PAPER, seed=1))
    assert not torch.equal(base.rows(ids), other_seed.rows(ids))
    per_layer = SinkAssignment(SinkAssignmentConfig("uniform", **PAPER, layer_specific=True))
    r0, r1 = per_layer.rows(ids, layer=0), per_layer.rows(ids, layer=1)
    assert not torch.equal(r0, r1)
    shared = rows_to_mask(r0, 7692) & rows_to_mask(r1, 7692)
    assert shared.sum(dim=1).float().mean() < 3  # unrelated draws: ~1.3 expected


def test_uniform_and_code_chunking_do_not_change_rows(monkeypatch):
    ids = torch.arange(49152, 49152 + 700)
    for strategy in ("uniform", "code"):
        cfg = SinkAssignmentConfig(strategy, **PAPER, **PAPER_CODE)
        whole = SinkAssignment(cfg).rows(ids)
        with monkeypatch.context() as m:
            m.setattr(sinks, "CHUNK_ELEMENTS", 1000)
            assert torch.equal(SinkAssignment(cfg).rows(ids), whole)
        singles = torch.cat([SinkAssignment(cfg).rows(ids[i : i + 1]) for i in range(0, 700, 97)])
        assert torch.equal(singles, whole[::97])


# ------------------------------------------------------------------------------------------------ code
def test_code_paper_parameters():
    assign = SinkAssignment(SinkAssignmentConfig("code", **PAPER, **PAPER_CODE))
    info = assign.describe()
    assert (info["q"], info["r"], info["k"], info["capacity"]) == (83, 4, 83, 83**4)
    rows = assign.rows(torch.tensor([49152, 49152 + 6_407_813]))
    assert rows.shape == (2, 83)
    assert torch.equal(rows // 83, torch.arange(83).expand(2, 83))  # one sink per column x
    assert (rows < 83 * 83).all()


def _code_sample_ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    spread = torch.randint(49152, 49152 + 6_407_814, (600,), generator=gen)
    # structured ids: consecutive, and differing in one higher digit only
    structured = torch.cat([torch.arange(49152, 49152 + 300), 49152 + 83 * torch.arange(150),
                            49152 + 83**2 * torch.arange(80), 49152 + 83**3 * torch.arange(70)])
    return torch.unique(torch.cat([spread, structured]))


@pytest.mark.parametrize("layer_specific,seed,layer", [(False, 0, 0), (True, 3, 0), (True, 3, 5), (False, 9, 0)])
def test_code_pairwise_overlap_at_most_r_minus_1(layer_specific, seed, layer):
    cfg = SinkAssignmentConfig("code", **PAPER, **PAPER_CODE, layer_specific=layer_specific, seed=seed)
    assign = SinkAssignment(cfg)
    shared = _pairwise_shared(assign.mask(_code_sample_ids(), layer))
    assert shared.max() <= assign.r - 1 == 3
    assert shared.max() == 3  # the bound is reached in this sample: the check can fail


def test_code_small_exhaustive_and_fewer_evaluation_points():
    # pool 130 -> q = 11; 121 sources -> r = 2: every pair shares at most one sink, all sets distinct
    for k in (None, 5):
        assign = SinkAssignment(SinkAssignmentConfig("code", 130, 0.1, k=k, num_sources=121))
        assert (assign.q, assign.r, assign.k) == (11, 2, k or 11)
        mask = assign.mask(torch.arange(121))
        assert (mask.sum(dim=1) == (k or 11)).all()
        assert _pairwise_shared(mask).max() == 1
        assert not mask[:, 11 * (k or 11) :].any()


def test_code_layer_specific_changes_the_colliding_pairs():
    cfg = SinkAssignmentConfig("code", **PAPER, **PAPER_CODE, layer_specific=True, seed=1)
    assign = SinkAssignment(cfg)
    ids = _code_sample_ids()
    assert not torch.equal(assign.rows(ids, 0), assign.rows(ids, 1))
    s0, s1 = _pairwise_shared(assign.mask(ids, 0)), _pairwise_shared(assign.mask(ids, 1))
    assert not torch.equal(s0 == 3, s1 == 3)


def test_code_capacity_refusal_and_out_of_range_ids():
    with pytest.raises(ValueError, match="num_sources=10000000000.*capacity"):
        SinkAssignment(SinkAssignmentConfig("code", 64, 0.1, num_sources=10**10))  # q=7: 7**7 < 1e10
    assign = SinkAssignment(SinkAssignmentConfig("code", 130, 0.1, num_sources=100, min_source_id=10))
    assert assign.capacity == 121
    assign.rows(torch.tensor([10, 130]))  # index 120 < capacity: fine
    with pytest.raises(ValueError, match="source id 131 is beyond the code's capacity"):
        assign.rows(torch.tensor([10, 131]))
    with pytest.raises(ValueError, match="source id 9 is below min_source_id=10"):
        assign.rows(torch.tensor([9]))
    with pytest.raises(ValueError, match="k=12 exceeds q=11"):
        SinkAssignment(SinkAssignmentConfig("code", 130, 0.1, k=12))


# ------------------------------------------------------------------------------------------------ common
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(strategy="hashy"), "strategy.*'hashy'"),
        (dict(k=7693), "k=7693 is larger than the sink pool"),
        (dict(p_mem=0.0), "p_mem.*0.0"),
        (dict(p_mem=1.5), "p_mem.*1.5"),
        (dict(p_mem=-0.1), "p_mem.*-0.1"),
        (dict(id_dtype="int16"), "id_dtype.*'int16'"),
        (dict(pool_size=0), "pool_size.*0"),
        (dict(k=0), "k must be.*0"),
        (dict(num_sources=0), "num_sources.*0"),
        (dict(layer_specific=True), "layer_specific=True is not available for strategy 'reference'"),
    ],
)
def test_bad_config_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SinkAssignmentConfig(**{**PAPER, **kwargs})


@pytest.mark.parametrize("strategy", ["reference", "uniform", "code"])
def test_bad_source_ids_raise_value_error(strategy):
    assign = SinkAssignment(SinkAssignmentConfig(strategy, **PAPER, num_sources=1000))
    with pytest.raises(ValueError, match="non-negative, got source id -3"):
        assign.rows(torch.tensor([5, -3]))
    with pytest.raises(ValueError, match="1-D"):
        assign.rows(torch.tensor([[5]]))
    with pytest.raises(ValueError, match="integer tensor"):
        assign.mask(torch.tensor([5.0]))
    int32 = SinkAssignment(SinkAssignmentConfig(strategy, **PAPER, id_dtype="int32"))
    with pytest.raises(ValueError, match="source id 2147483648 does not fit id_dtype='int32'"):
        int32.rows(torch.tensor([2**31]))


@pytest.mark.parametrize("strategy", ["reference", "uniform", "code"])
def test_mask_rows_roundtrip_and_describe(strategy):
    assign = SinkAssignment(SinkAssignmentConfig(strategy, **PAPER, **PAPER_CODE))
    ids = torch.arange(49152, 49252)
    rows, mask = assign.rows(ids), assign.mask(ids)
    assert mask.shape == (100, 7692) and mask.dtype == torch.bool
    assert torch.equal(rows_to_mask(rows, 7692), mask)
    assert torch.equal(mask_to_rows(mask), rows)
    assert assign.rows(ids[:0]).shape[0] == 0
    info = json.loads(json.dumps(assign.describe()))
    assert {"strategy", "version", "k", "q", "r", "capacity"} <= set(info) and info["strategy"] == strategy


def test_deterministic_across_processes():
    ids = [0, 1, 49152, 1_000_000, 6_456_965, 2**31 - 1]
    configs = [
        ("reference", {}),
        ("uniform", {}),
        ("uniform", {"layer_specific": True, "seed": 11}),
        ("code", {"layer_specific": True, "seed": 4, "num_sources": 2**31}),
    ]
    script = (
        "import json, sys, torch\n"
        "from nulls_dist.sinks import SinkAssignment, SinkAssignmentConfig\n"
        "ids, configs = json.loads(sys.argv[1])\n"
        "out = [SinkAssignment(SinkAssignmentConfig(s, 7692, 0.013, **kw)).rows(torch.tensor(ids), layer=3).tolist()\n"
        "       for s, kw in configs]\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([ids, configs])], capture_output=True,
                          text=True, check=True)
    theirs = json.loads(proc.stdout)
    ours = [SinkAssignment(SinkAssignmentConfig(s, 7692, 0.013, **kw)).rows(torch.tensor(ids), layer=3).tolist()
            for s, kw in configs]
    assert theirs == ours


def test_collision_stats_match_brute_force():
    assign = SinkAssignment(SinkAssignmentConfig("reference", 500, 0.05))
    ids = torch.arange(1, 301)
    stats = collision_stats(assign, ids, pair_ids=300)
    shared = _pairwise_shared(assign.mask(ids))
    upper = shared[torch.triu(torch.ones(300, 300, dtype=torch.bool), diagonal=1)]
    assert stats["pairwise_overlap"]["mean"] == pytest.approx(upper.double().mean().item(), rel=1e-12)
    assert stats["pairwise_overlap"]["max"] == int(upper.max())
    a, b = stats["pairwise_overlap"]["max_pair"]
    assert int(shared[a - 1, b - 1]) == int(upper.max())
    loads = assign.mask(ids).sum(dim=0)
    assert (stats["unit_load"]["min"], stats["unit_load"]["max"]) == (int(loads.min()), int(loads.max()))


# ------------------------------------------------------------------------------------------------ CLI, bench
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(NULLS_SINKS), *args], capture_output=True, text=True)


def test_cli_prints_reference_sinks_as_json():
    proc = _cli("--strategy", "reference", "--pool", "7692", "--p-mem", "0.013", "--source-id", "49152", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    golden = next(c for c in _golden_cases()
                  if (c["source_id"], c["id_dtype"], c["num_sinks"]) == (49152, "int64", 7692))
    assert out["sinks"] == golden["active"]


def test_cli_stats_and_histogram(tmp_path):
    png = tmp_path / "load.png"
    proc = _cli("--strategy", "code", "--num-sources", "6407814", "--min-source-id", "49152", "--sample", "3000",
                "--pair-ids", "800", "--json", "--histogram", str(png))
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)["stats"]
    assert stats["num_ids"] == 3000
    assert stats["sinks_per_source"] == {"mean": 83.0, "min": 83, "max": 83, "std": 0.0}
    assert stats["pairwise_overlap"]["max"] <= 3
    assert stats["unit_load"]["usable_units"] == 83 * 83
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_text_output(capsys):
    assert cli_main(["--strategy", "uniform", "--range", "100:400", "--source-id", "7"]) == 0
    out = capsys.readouterr().out
    assert "source 7 (layer 0): 100 sinks" in out
    assert "sinks per source: mean 100.00 min 100 max 100" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--strategy", "uniform", "--k", "9000", "--source-id", "1"], "k=9000 is larger than the sink pool"),
        (["--range", "10:5"], "--range must be A:B with 0 <= A < B, got '10:5'"),
        (["--range", "10:x"], "--range must be A:B"),
        (["--range", "0:10", "--sample", "11"], "--sample must be in [2, 10]"),
        (["--source-id", "-4"], "non-negative, got source id -4"),
        (["--source-id", "4", "--histogram", "x.png"], "--histogram needs --range or --sample"),
    ],
)
def test_cli_bad_input_exits_with_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("strategy", ["uniform", "code", "reference"])
def test_benchmark_worker_reports(capsys, strategy):
    threads = torch.get_num_threads()
    try:
        assert bench_main(["--worker", strategy, "--num-ids", "300", "--chunk-ids", "128"]) == 0
    finally:
        torch.set_num_threads(threads)  # the worker pins one thread; keep the test process as it was
    result = json.loads(capsys.readouterr().out)
    assert result["strategy"] == strategy and result["num_ids"] == 300
    if strategy == "reference":
        assert 90 < result["mean_sinks_per_source"] < 110  # ~p_mem * pool = 100 on average
    else:
        assert result["mean_sinks_per_source"] == {"uniform": 100, "code": 83}[strategy]
    assert result["peak_rss_mib"] > 0 and result["seconds"] > 0 and result["threads"] == 1
