"""The capacity plan's sink tables: memory per GPU at R = 2^16 .. 2^24 rows per layer for the paper run, dense
ZeRO against TorchRec row-wise sharding, recomputed by hand, and the forget budget each R buys."""
from __future__ import annotations

import json
import math

import pytest

from nulls_dist.config import NullConfig
from nulls_dist.launch import capacity_plan

GIB = 2**30


def test_sink_tables_by_hand_at_2_20_rows():
    cfg = NullConfig.from_preset("paper_wiki_1b")
    rows = 2**20
    params = 32 * 3 * rows * 960
    got = capacity_plan.sink_table_gib(cfg, rows, 8)
    # dense: bf16 weights + bf16 grads on every GPU, fp32 master + m + v (12 B) sharded from ZeRO-1 on
    assert got["dense"]["zero0"] == pytest.approx(params * 16 / GIB)
    assert got["dense"]["zero1"] == pytest.approx(params * 4 / GIB + params * 12 / 8 / GIB)
    assert got["dense"]["zero3"] == pytest.approx(params * 16 / 8 / GIB)
    # sharded: 32 x 2^20 rows of 3 x 960 fp32 plus one float of row-wise Adagrad state, split over 8 GPUs
    assert got["sharded"]["rowwise_adagrad"] == pytest.approx(32 * rows * (2880 + 1) * 4 / 8 / GIB)
    assert got["sharded"]["adagrad"] == pytest.approx(32 * rows * 2880 * 2 * 4 / 8 / GIB)
    assert got["sharded"]["sgd"] == pytest.approx(32 * rows * 2880 * 4 / 8 / GIB)
    assert got["dense_comm_gb_per_step"] == pytest.approx(4 * params * 7 / 8 / 1e9)


def test_plan_covers_2_16_to_2_24_and_the_budget_grows_with_the_rows(capsys):
    capacity_plan.main([])
    tables = json.loads(capsys.readouterr().out)["sink_tables"]
    assert list(tables["rows"]) == [f"2^{e}" for e in range(16, 25)]
    assert tables["k"] == round(7692 * 0.013) == 100
    previous = None
    for name, entry in tables["rows"].items():
        rows = entry["rows_per_layer"]
        assert entry["params"] == 32 * 3 * rows * 960 and entry["fp32_gib"] == pytest.approx(entry["params"] * 4 / GIB)
        for forgets, share in entry["retained_share_after"].items():
            assert share == pytest.approx(math.exp(-int(forgets) * 100 / rows))
        per_gpu = entry["gib_per_gpu"]
        assert [per_gpu[n]["sharded"]["rowwise_adagrad"] for n in ("8", "32", "128")] == pytest.approx(
            [per_gpu["8"]["sharded"]["rowwise_adagrad"] * 8 / n for n in (8, 32, 128)])
        assert all(per_gpu[n]["sharded"]["rowwise_adagrad"] < per_gpu[n]["dense"]["zero3"] for n in per_gpu)
        if previous is not None:
            assert entry["retained_share_after"]["1000"] > previous["retained_share_after"]["1000"]
        previous = entry
    assert tables["rows"]["2^20"]["retained_share_after"]["1000"] == pytest.approx(0.909, abs=5e-4)
