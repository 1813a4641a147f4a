"""The forget budget: the retained-share arithmetic against brute force over sets, `nulls-sinks --forget-budget`
(JSON, table, PNG) on the real assignment, and the certificate's `survivors_retained_share` (exact and sampled,
recomputed by verify, tampering caught) with the `nulls-unlearn --warn-retained-share` warning."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from unlearn_helpers import ID_OFFSET, NUM_TRAIN, make_checkpoint_with_manifest  # noqa: E402

from nulls_dist import forget_budget as budget  # noqa: E402
from nulls_dist.audit.collateral import forget_sinks  # noqa: E402
from nulls_dist.audit.retained import RetainedShareOptions, survivors_retained_share  # noqa: E402
from nulls_dist.audit.unlearn import unlearn  # noqa: E402
from nulls_dist.audit.verify import verify_paths  # noqa: E402
from nulls_dist.cli.sinks import main as sinks_main  # noqa: E402
from nulls_dist.cli.unlearn import main as unlearn_main  # noqa: E402
from nulls_dist.formats.digests import json_sha256  # noqa: E402
from nulls_dist.sinks import SinkAssignment, SinkAssignmentConfig  # noqa: E402


def _sets(assign: SinkAssignment, ids, layer=0) -> dict[int, set[int]]:
    rows = assign.rows(torch.tensor(list(ids)), layer)
    return {int(i): set(r[r >= 0].tolist()) for i, r in zip(ids, rows)}


# --------------------------------------------------------------------------------------------- arithmetic
def test_retained_shares_equal_brute_force_over_sets():
    assign = SinkAssignment(SinkAssignmentConfig(strategy="reference", pool_size=97, p_mem=0.13))
    ids = list(range(1000, 1060))
    sets = _sets(assign, ids)
    forgotten = ids[:7]
    union = set().union(*(sets[f] for f in forgotten))
    mask = np.zeros(97, dtype=bool)
    mask[sorted(union)] = True
    survivors = np.array(ids[7:])
    shares, has = budget.retained_shares(assign.rows(torch.from_numpy(survivors)).numpy(), mask)
    expected = [len(sets[s] - union) / len(sets[s]) if sets[s] else math.nan for s in survivors]
    np.testing.assert_array_equal(has, [bool(sets[s]) for s in survivors])
    np.testing.assert_allclose(shares, expected, rtol=0, atol=1e-15, equal_nan=True)
    summary = budget.share_summary(shares, survivors)
    finite = [e for e in expected if not math.isnan(e)]
    assert summary["mean"] == pytest.approx(sum(finite) / len(finite), abs=1e-15)
    assert summary["min"] == min(finite) and expected[list(survivors).index(summary["min_source_id"])] == min(finite)
    assert summary["num"] + summary["num_without_sinks"] == len(survivors)
    assert min(finite) <= summary["p1"] <= summary["mean"]


def test_layered_shares_sum_over_layers():
    sinks = np.array([[[0, 1, -1], [2, 3, 4]]])  # one source, 2 layers: 2 + 3 rows
    forgotten = np.zeros((2, 6), dtype=bool)
    forgotten[0, 1] = forgotten[1, 2] = forgotten[1, 3] = True  # 3 of its 5 rows gone
    shares, _ = budget.retained_shares(sinks, forgotten)
    assert shares.tolist() == [2 / 5]
    with pytest.raises(ValueError, match="layers"):
        budget.retained_shares(sinks, forgotten[:1])


def test_analytic_forms():
    assert budget.analytic_retained_share(100, 100, 7692) == pytest.approx(math.exp(-100 * 100 / 7692))
    assert budget.uniform_retained_share(1000, 100, 2**20) == pytest.approx((1 - 100 / 2**20) ** 1000)
    # the two agree closely when k/R is small, and the uniform form is the smaller one
    assert 0 < budget.analytic_retained_share(1000, 100, 2**20) - budget.uniform_retained_share(1000, 100, 2**20) < 1e-4


def test_sampled_budget_is_nested_and_matches_the_expectation():
    assign = SinkAssignment(SinkAssignmentConfig(strategy="uniform", pool_size=2048, k=20))
    rows_of = lambda ids: assign.rows(torch.from_numpy(ids)).numpy()  # noqa: E731
    out = budget.sampled_budget(rows_of, 2048, 5000, 50_000, (1, 10, 100), num_survivors=2000, seed=3)
    means = [p["sampled"]["mean"] for p in out["points"]]
    gone = [p["forgotten_rows"] for p in out["points"]]
    assert means == sorted(means, reverse=True) and gone == sorted(gone)  # nested forget sets
    assert out["mean_k"] == 20 and out["num_survivors"] == 2000
    for p in out["points"]:
        # survivors are uniform k-subsets independent of the union: their mean share is 1 - |U| / R up to the
        # sampling error of 40,000 sink draws (std <= 0.0025; 0.015 is 6 sigma)
        assert p["sampled"]["mean"] == pytest.approx(1 - p["forgotten_rows"] / 2048, abs=0.015)
        # |U| itself fluctuates around R (1 - (1 - k/R)^F): std ~ sqrt(R) / R ~ 0.011 of the share at F = 100
        assert p["sampled"]["mean"] == pytest.approx(budget.uniform_retained_share(p["forgotten"], 20, 2048), abs=0.05)
        assert p["sampled"]["min"] <= p["sampled"]["p1"] <= p["sampled"]["mean"]
    again = budget.sampled_budget(rows_of, 2048, 5000, 50_000, (100, 10, 1), num_survivors=2000, seed=3)
    assert again == out  # seeded, and the order of the counts does not matter
    with pytest.raises(ValueError, match="largest forget count"):
        budget.sampled_budget(rows_of, 2048, 5000, 100, (1, 100))


# --------------------------------------------------------------------------------------------- nulls-sinks
def test_cli_forget_budget_json_table_and_plot(tmp_path, capsys):
    args = ["--strategy", "uniform", "--pool", "4096", "--k", "40", "--forget-budget", "--forget-counts", "1,10,100",
            "--survivors", "500", "--range", "49152:69152"]
    sinks_main(args + ["--json", "--budget-plot", str(tmp_path / "budget.png")])
    out = json.loads(capsys.readouterr().out)["forget_budget"]
    assert [p["forgotten"] for p in out["points"]] == [1, 10, 100]
    assert out["rows"] == 4096 and out["mean_k"] == 40 and out["id_range"] == [49152, 69152]
    for p in out["points"]:
        assert p["analytic"] == pytest.approx(math.exp(-p["forgotten"] * 40 / 4096))
        assert p["sampled"]["mean"] == pytest.approx(p["analytic"], abs=0.05)
    assert (tmp_path / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sinks_main(args)
    text = capsys.readouterr().out
    assert "forget budget" in text and len([ln for ln in text.splitlines() if ln.split()[:1] == ["100"]]) == 1


def test_cli_forget_budget_code_uses_the_usable_units(capsys):
    sinks_main(["--strategy", "code", "--pool", "7692", "--num-sources", "6407814", "--min-source-id", "49152",
                "--forget-budget", "--forget-counts", "10", "--survivors", "300", "--json"])
    out = json.loads(capsys.readouterr().out)["forget_budget"]
    assert out["rows"] == 83 * 83 and out["mean_k"] == 83  # 6889 of the 7692 units are ever used


@pytest.mark.parametrize("argv, message", [
    (["--forget-budget", "--forget-counts", "0,10"], "--forget-counts"),
    (["--forget-budget", "--forget-counts", "ten"], "--forget-counts"),
    (["--budget-plot", "x.png"], "--budget-plot needs --forget-budget"),
    (["--forget-budget", "--range", "0:50", "--forget-counts", "100"], "largest forget count"),
])
def test_cli_forget_budget_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sinks_main(["--strategy", "uniform", "--pool", "512", "--k", "8", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------- certificates
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    ckpt = make_checkpoint_with_manifest(root, zero_stage=1, shard_rows=16)
    return {"root": root, "ckpt": ckpt, "manifest": root / "manifest"}


def _brute_force(ckpt, forget: set[int]) -> dict[int, float]:
    assign = SinkAssignment(ckpt.model_config.sink_assignment_config())
    sets = _sets(assign, range(ID_OFFSET, ID_OFFSET + NUM_TRAIN))
    union = set().union(*(sets[f] for f in forget))
    return {s: len(units - union) / len(units) for s, units in sets.items() if s not in forget}


def test_certificate_records_survivors_retained_share(env, tmp_path):
    ckpt, manifest = env["ckpt"], env["manifest"]
    fs, c1, c2 = tmp_path / "fs.json", tmp_path / "c1.json", tmp_path / "c2.json"
    cert1 = unlearn(ckpt, manifest, ["4100", "4107"], "mask", fs, c1)
    cert2 = unlearn(ckpt, manifest, ["4120", "4121", "4122"], "mask", fs, c2)
    for cert, forget in ((cert1, {4100, 4107}), (cert2, {4100, 4107, 4120, 4121, 4122})):
        kept, expected = cert["survivors_retained_share"], _brute_force(ckpt, forget)
        assert cert["version"] == 4 and kept["method"] == "exact" and kept["num_forgotten"] == len(forget)
        assert kept["num_survivors"] == kept["num"] == len(expected) == NUM_TRAIN - len(forget)
        assert kept["mean"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)
        assert kept["min"] == min(expected.values()) and expected[kept["min_source_id"]] == kept["min"]
        assert kept["p1"] == pytest.approx(np.percentile(list(expected.values()), 1), abs=1e-12)
    assert cert2["survivors_retained_share"]["mean"] < cert1["survivors_retained_share"]["mean"]  # cumulative
    report = verify_paths(c2, ckpt, fs, manifest)
    assert report["ok"] and "survivors_retained_share" in {c["check"] for c in report["checks"]}
    report = verify_paths(c2, ckpt, fs)  # without the manifest it cannot be recomputed: said, not failed
    assert report["ok"] and any("retained share" in u for u in report["unchecked"])
    # a re-hashed certificate claiming a better budget is caught by the recomputation
    doc = json.loads(c2.read_text())
    doc["survivors_retained_share"]["mean"] = 0.99
    doc.pop("certificate_sha256")
    doc["certificate_sha256"] = json_sha256(doc)
    (tmp_path / "forged.json").write_text(json.dumps(doc))
    (tmp_path / "forged.collateral.parquet").write_bytes((tmp_path / "c2.collateral.parquet").read_bytes())
    report = verify_paths(tmp_path / "forged.json", ckpt, fs, manifest)
    assert {c["check"] for c in report["checks"] if not c["ok"]} == {"survivors_retained_share"}


def test_sampled_retained_share_states_its_sample_and_recomputes(env):
    ckpt, manifest = env["ckpt"], env["manifest"]
    forget = forget_sinks(manifest, [4100, 4107, 4120])
    opts = RetainedShareOptions(exact_budget=10, sample_size=12, seed=5)
    got = survivors_retained_share(manifest, forget, opts)
    assert got["method"] == "sampled" and got["sample_size"] == got["num"] == 12 and got["seed"] == 5
    assert got["num_survivors"] == NUM_TRAIN - 3 and got["exact_budget"] == 10
    expected = _brute_force(ckpt, {4100, 4107, 4120})
    # the sample's worst is a real survivor's share, and the sampled mean lies within the exact range
    assert expected[got["min_source_id"]] == got["min"]
    assert min(expected.values()) <= got["mean"] <= max(expected.values())
    assert survivors_retained_share(manifest, forget, opts) == got  # seeded
    assert survivors_retained_share(manifest, forget, RetainedShareOptions(exact_budget=10, sample_size=12,
                                                                           seed=6))["min_source_id"] is not None


def _warnings(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "forget budget" in r.getMessage()]
    caplog.clear()
    return lines


def test_cli_warns_past_the_threshold(env, tmp_path, capsys, caplog):
    base = ["--checkpoint", str(env["root"] / "run"), "--manifest", str(env["manifest"]), "--method", "mask"]
    # one forget of 22 of 448 units leaves the survivors ~0.95: no warning at the default 0.9
    unlearn_main(base + ["--forget-set", str(tmp_path / "a.json"), "--certificate", str(tmp_path / "a1.json"), "4102"])
    captured = capsys.readouterr()
    mean = json.loads(captured.out)["survivors_retained_share"]["mean"]
    assert 0.9 < mean < 1 and not _warnings(caplog)
    unlearn_main(base + ["--forget-set", str(tmp_path / "a.json"), "--certificate", str(tmp_path / "a2.json"),
                         "--warn-retained-share", "0.999", "4103"])
    lines = _warnings(caplog)
    assert len(lines) == 1 and "\n" not in lines[0] and "2 forgotten sources" in lines[0] and "0.999" in lines[0]
    assert (tmp_path / "a2.json").is_file()  # a warning, not a refusal
    with pytest.raises(SystemExit) as exit_info:
        unlearn_main(base + ["--forget-set", str(tmp_path / "b.json"), "--certificate", str(tmp_path / "b.json"),
                             "--warn-retained-share", "1.5", "4104"])
    assert exit_info.value.code == 2 and "--warn-retained-share" in capsys.readouterr().err
