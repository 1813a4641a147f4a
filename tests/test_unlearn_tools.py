"""nulls-unlearn: source resolution, cumulative forget sets, mask/hard unlearning, certificates (the collateral
sidecar checked by brute force, uniform and layer-specific) and `verify`, including tampering that
verification must catch."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from unlearn_helpers import ID_OFFSET, NUM_TRAIN, make_checkpoint_with_manifest, make_registry  # noqa: E402

from nulls_dist.config import NullConfig  # noqa: E402
from nulls_dist.model import NullTransformer  # noqa: E402
from nulls_dist.sinks import SinkAssignment  # noqa: E402
from nulls_dist.deploy.checkpoint_io import load_checkpoint, save_deployed, sink_table_keys  # noqa: E402
from nulls_dist.formats.weights import state_dict_digest  # noqa: E402
from nulls_dist.audit.collateral import forget_sinks, iter_collateral, read_sidecar, sidecar_path  # noqa: E402
from nulls_dist.audit.manifest import ManifestOptions, build_manifest  # noqa: E402
from nulls_dist.formats.digests import file_sha256, json_sha256
from nulls_dist.formats.forget_set import load_forget_set
from nulls_dist.audit.unlearn import (  # noqa: E402
    parse_requests, resolve_sources, unlearn,
)
from nulls_dist.cli.unlearn import main as unlearn_main  # noqa: E402
from nulls_dist.audit.verify import load_certificate, verify_paths  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlearn")
    ckpt = make_checkpoint_with_manifest(root, zero_stage=1, shard_rows=20)
    return {"root": root, "ckpt": ckpt, "manifest": root / "manifest"}


def _rows(ckpt, sid, layer=0):
    a = ckpt.model_config.sink_assignment_config()
    rows = SinkAssignment(a).rows(torch.tensor([sid]), layer)[0]
    return set(rows[rows >= 0].tolist())


def _expected_collateral(ckpt, forget):
    """Brute force over sets: {source_id: (shared units, rows over all layers, overlapping forgotten ids)}."""
    n_layer = ckpt.model_config.n_layer
    units = {sid: _rows(ckpt, sid) for sid in range(ID_OFFSET, ID_OFFSET + NUM_TRAIN)}
    union = set().union(*(units[f] for f in forget))
    out = {}
    for sid, mine in units.items():
        shared = len(mine & union)
        if sid not in forget and shared:
            out[sid] = (shared, shared * n_layer, sorted(f for f in forget if mine & units[f]))
    return out


def _sidecar(cert_path):
    """The certificate's sidecar as {source_id: (shared_sinks, shared_rows, forgotten_overlapping)}."""
    rows = pq.read_table(sidecar_path(cert_path)).to_pylist()
    assert all(r["shared_per_layer"] is None for r in rows)  # uniform strategy: not layer-specific
    assert all(r["title"] == f"Article {r['source_id'] - ID_OFFSET}" for r in rows)
    return {r["source_id"]: (r["shared_sinks"], r["shared_rows"], r["forgotten_overlapping"]) for r in rows}


def _failed(report):
    return {c["check"] for c in report["checks"] if not c["ok"]}


def test_resolution_and_unknown_sources(env, tmp_path):
    recs = resolve_sources(env["manifest"], ["4099", "Article 7", "title:Article 8", "id:4100"])
    assert [r.source_id for r in recs] == [4099, 4100, 4103, 4104]
    with pytest.raises(ValueError) as err:
        resolve_sources(env["manifest"], ["4099", "No such article", "123456"])
    assert "title:No such article" in str(err.value) and "id:123456" in str(err.value)
    with pytest.raises(ValueError, match="never trained"):
        resolve_sources(env["manifest"], [str(ID_OFFSET + NUM_TRAIN + 1)])  # a holdout source
    (tmp_path / "list.txt").write_text("# forget these\n4097\n\nArticle 3\n")
    assert parse_requests(["4098"], tmp_path / "list.txt") == ["4098", "4097", "Article 3"]
    with pytest.raises(ValueError, match="no sources"):
        parse_requests([], None)
    # nothing is written when a request is bad
    with pytest.raises(ValueError, match="unknown"):
        unlearn(env["ckpt"], env["manifest"], ["4099", "Nope"], "mask", tmp_path / "fs.json", tmp_path / "c.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.txt"]  # no forget set, certificate or sidecar


def test_mask_certificates_compose_and_verify(env, tmp_path):
    fs, c1, c2 = tmp_path / "fs.json", tmp_path / "c1.json", tmp_path / "c2.json"
    ckpt = env["ckpt"]
    cert1 = unlearn(ckpt, env["manifest"], ["4100", "Article 11"], "mask", fs, c1)
    assert [s["source_id"] for s in cert1["sources"]] == [4100, 4107]
    assert cert1["layers_share_sinks"] is True and cert1["version"] == 4
    assert cert1["sources"][0]["sinks"] == sorted(_rows(ckpt, 4100, 0)) == sorted(_rows(ckpt, 4100, 1))
    assert cert1["checkpoint"]["sha256"] == state_dict_digest(ckpt.state_dict)
    expected1 = _expected_collateral(ckpt, {4100, 4107})
    assert _sidecar(c1) == expected1 and len(expected1) > 0
    summary = cert1["collateral"]
    assert summary["file"] == "c1.collateral.parquet"
    assert summary["num_sources"] == summary["num_rows"] == len(expected1)
    assert summary["total_shared_rows"] == sum(v[1] for v in expected1.values())
    best = sorted(expected1, key=lambda sid: (-expected1[sid][1], sid))[:summary["top_n"]]
    assert [t["source_id"] for t in summary["top"]] == best
    assert "output_checkpoint" not in cert1 and "sources" not in summary  # nothing inline but the summary
    # a second request: its sidecar is the collateral of the union {4100, 4107, 4120}
    cert2 = unlearn(ckpt, env["manifest"], ["4120"], "mask", fs, c2)
    forget = load_forget_set(fs)
    assert forget["source_ids"] == [4100, 4107, 4120] and len(forget["history"]) == 2
    assert cert2["forget_set"]["source_ids"] == [4100, 4107, 4120]
    expected2 = _expected_collateral(ckpt, {4100, 4107, 4120})
    assert _sidecar(c2) == expected2 and _sidecar(c1) == expected1  # the first sidecar is untouched
    assert any(4120 in v[2] for v in expected2.values()) and set(expected2) != set(expected1)
    for cert in (c1, c2):  # the first certificate still verifies against the grown forget set
        report = verify_paths(cert, ckpt, fs, env["manifest"])
        assert report["ok"], report
        assert {"collateral_sha256", "collateral_rows", "collateral_matches_manifest"} <= {
            c["check"] for c in report["checks"]}
    # a forget set that lacks the certified sources fails
    other_fs, other_c = tmp_path / "other.json", tmp_path / "other_c.json"
    unlearn(ckpt, env["manifest"], ["4130"], "mask", other_fs, other_c)
    report = verify_paths(c1, ckpt, other_fs)
    assert not report["ok"] and {"forget_set_contains_sources", "forget_set_history"} <= _failed(report)
    assert "certified_sink_digest" in {c["check"] for c in verify_paths(c1, ckpt, fs)["checks"]}
    # a re-hashed certificate with a wrong sink digest, or with its shared list made per-layer, is caught
    for name, edit in (("certified_sink_digest", lambda d: d["sources"][0].update(sink_digest="0" * 64)),
                       ("sink_layout_matches_model", lambda d: d.update(layers_share_sinks=False))):
        doc = json.loads(c1.read_text())
        edit(doc)
        doc.pop("certificate_sha256")
        doc["certificate_sha256"] = json_sha256(doc)
        (tmp_path / "forged.json").write_text(json.dumps(doc))
        (tmp_path / "forged.collateral.parquet").write_bytes(sidecar_path(c1).read_bytes())
        assert name in _failed(verify_paths(tmp_path / "forged.json", ckpt, fs))
    # a tampered certificate fails its own hash
    doc = json.loads(c1.read_text())
    doc["collateral"]["num_sources"] -= 1
    (tmp_path / "tampered.json").write_text(json.dumps(doc))
    report = verify_paths(tmp_path / "tampered.json", ckpt, fs)
    assert {"certificate_sha256", "collateral_rows", "collateral_summary"} == _failed(report)


def test_collateral_sidecar_tampering(env, tmp_path):
    fs, cert_path = tmp_path / "fs.json", tmp_path / "cert.json"
    ckpt = env["ckpt"]
    cert = unlearn(ckpt, env["manifest"], ["4105"], "mask", fs, cert_path)
    sidecar = sidecar_path(cert_path)
    original = sidecar.read_bytes()
    assert verify_paths(cert_path, ckpt, fs, env["manifest"])["ok"]
    # drop one collateral row: hash, row count, summary and content all disagree
    table = pq.read_table(sidecar)
    pq.write_table(table.slice(1), sidecar)
    report = verify_paths(cert_path, ckpt, fs)
    assert {"collateral_sha256", "collateral_rows", "collateral_content_sha256"} <= _failed(report)
    # change one count, same number of rows
    counts = table.column("shared_sinks").to_pylist()
    pq.write_table(table.set_column(2, "shared_sinks", pa.array([counts[0] + 1] + counts[1:], pa.int32())), sidecar)
    assert {"collateral_sha256", "collateral_content_sha256"} <= _failed(verify_paths(cert_path, ckpt, fs))
    sidecar.unlink()
    assert _failed(verify_paths(cert_path, ckpt, fs)) == {"collateral_sidecar"}
    # a forger who rewrites the sidecar and every hash in the certificate is caught against the manifest
    sub = table.slice(1)
    pq.write_table(sub, sidecar)
    content = read_sidecar(sidecar, cert["forget_set"]["source_ids"])
    doc = json.loads(cert_path.read_text())
    doc["collateral"].update(content["summary"], num_rows=sub.num_rows, sha256=file_sha256(sidecar),
                             content_sha256=content["content_sha256"])
    doc.pop("certificate_sha256")
    doc["certificate_sha256"] = json_sha256(doc)
    cert_path.write_text(json.dumps(doc))
    assert verify_paths(cert_path, ckpt, fs)["ok"]  # self-consistent without the manifest
    assert _failed(verify_paths(cert_path, ckpt, fs, env["manifest"])) == {"collateral_matches_manifest"}
    sidecar.write_bytes(original)


def test_collateral_layer_specific(tmp_path):
    """Layer-specific sinks: counts per layer and the overlapping forgotten sources, against brute force."""
    cfg = NullConfig.from_preset("debug", sink_strategy="uniform", sink_layer_specific=True)
    torch.manual_seed(0)
    state = NullTransformer(cfg).state_dict()
    make_registry(tmp_path / "registry.parquet")
    build_manifest(tmp_path / "m", state_dict=state, model_cfg=cfg, registry_path=tmp_path / "registry.parquet",
                   checkpoint_sha256="0" * 64, opts=ManifestOptions(shard_rows=16, chunk_rows=8))
    assignment = SinkAssignment(cfg.sink_assignment_config())

    def rows(sid, layer):
        r = assignment.rows(torch.tensor([sid]), layer)[0]
        return set(r[r >= 0].tolist())

    forget = [ID_OFFSET + 2, ID_OFFSET + 9, ID_OFFSET + 31]
    got = {t["source_id"]: t for table in iter_collateral(tmp_path / "m", forget_sinks(tmp_path / "m", forget))
           for t in table.to_pylist()}
    expected = {}
    for sid in range(ID_OFFSET, ID_OFFSET + NUM_TRAIN):
        per_layer = [len(rows(sid, layer) & set().union(*(rows(f, layer) for f in forget))) for layer in range(2)]
        overlapping = [f for f in forget if any(rows(sid, layer) & rows(f, layer) for layer in range(2))]
        if sid not in forget and sum(per_layer):
            expected[sid] = (sum(per_layer), sum(per_layer), per_layer, overlapping)
    assert len(expected) > 0
    assert {sid: (t["shared_sinks"], t["shared_rows"], t["shared_per_layer"], t["forgotten_overlapping"])
            for sid, t in got.items()} == expected
    assert any(e[2][0] != e[2][1] for e in expected.values())  # the layers really differ


def test_layer_specific_certificate_keeps_per_layer_lists(tmp_path):
    """A layer-specific model: the certificate lists each source's sinks and the forgotten rows per layer, and
    verify checks every layer (and that hard zeroed each layer's own rows)."""
    cfg = NullConfig.from_preset("debug", sink_strategy="uniform", sink_layer_specific=True)
    torch.manual_seed(0)
    state = NullTransformer(cfg).state_dict()
    save_deployed(tmp_path / "ckpt", state, {"model_config": dataclasses.asdict(cfg)})
    ckpt = load_checkpoint(tmp_path / "ckpt")
    make_registry(tmp_path / "registry.parquet")
    build_manifest(tmp_path / "m", state_dict=ckpt.state_dict, model_cfg=cfg,
                   registry_path=tmp_path / "registry.parquet", checkpoint_sha256=state_dict_digest(ckpt.state_dict))
    a = SinkAssignment(cfg.sink_assignment_config())
    per_layer = [sorted(a.rows(torch.tensor([4103]), layer)[0].tolist()) for layer in range(cfg.n_layer)]
    assert per_layer[0] != per_layer[1]
    fs = tmp_path / "fs.json"
    cert = unlearn(ckpt, tmp_path / "m", ["4103"], "mask", fs, tmp_path / "c1.json")
    assert cert["layers_share_sinks"] is False and cert["sources"][0]["sinks"] == per_layer
    assert cert["forgotten_rows"] == per_layer
    report = verify_paths(tmp_path / "c1.json", ckpt, fs, tmp_path / "m")
    assert report["ok"] and "certified_sink_digest" in {c["check"] for c in report["checks"]}, report
    cert = unlearn(ckpt, tmp_path / "m", ["4103"], "hard", fs, tmp_path / "c2.json", tmp_path / "dep")
    dep = load_checkpoint(tmp_path / "dep")
    for layer in range(cfg.n_layer):
        assert torch.count_nonzero(dep.state_dict[sink_table_keys(layer)[0]][per_layer[layer]]) == 0
        other = sorted(set(per_layer[1 - layer]) - set(per_layer[layer]))
        assert torch.equal(dep.state_dict[sink_table_keys(layer)[0]][other], state[sink_table_keys(layer)[0]][other])
    assert verify_paths(tmp_path / "c2.json", dep, fs, tmp_path / "m")["ok"]
    # one layer's list missing is a layout failure, not a crash
    doc = json.loads((tmp_path / "c2.json").read_text())
    doc["sources"][0]["sinks"] = doc["sources"][0]["sinks"][:1]
    doc["forgotten_rows"] = doc["forgotten_rows"][:1]
    doc.pop("certificate_sha256")
    doc["certificate_sha256"] = json_sha256(doc)
    (tmp_path / "c3.json").write_text(json.dumps(doc))
    (tmp_path / "c3.collateral.parquet").write_bytes(sidecar_path(tmp_path / "c2.json").read_bytes())
    assert {"certified_sinks_match_assignment", "forgotten_rows_layout"} <= _failed(
        verify_paths(tmp_path / "c3.json", dep, fs))


def test_hard_zeroes_rows_composes_and_verifies(env, tmp_path):
    fs = tmp_path / "fs.json"
    ckpt = env["ckpt"]
    cert = unlearn(ckpt, env["manifest"], ["4101"], "hard", fs, tmp_path / "c1.json", tmp_path / "dep1")
    dep1 = load_checkpoint(tmp_path / "dep1")
    rows1 = sorted(_rows(ckpt, 4101))
    assert cert["forgotten_rows"] == rows1  # one list, zero in every layer
    for layer in range(2):
        for key in sink_table_keys(layer):
            assert torch.count_nonzero(dep1.state_dict[key][rows1]) == 0
            keep = [r for r in range(dep1.state_dict[key].shape[0]) if r not in rows1]
            assert torch.equal(dep1.state_dict[key][keep], ckpt.state_dict[key][keep])
    untouched = [k for k in ckpt.state_dict if ".sink_" not in k]
    assert all(torch.equal(dep1.state_dict[k], ckpt.state_dict[k]) for k in untouched)
    assert _sidecar(tmp_path / "c1.json") == _expected_collateral(ckpt, {4101})
    assert verify_paths(tmp_path / "c1.json", dep1, fs)["ok"]
    # the original (un-zeroed) weights do not pass as the certified hard deployment
    report = verify_paths(tmp_path / "c1.json", ckpt, fs)
    assert not report["ok"] and {"checkpoint_sha256", "forgotten_rows_zero"} <= {
        c["check"] for c in report["checks"] if not c["ok"]}
    # compose: hard-unlearn another source starting from the deployed checkpoint
    cert2 = unlearn(dep1, env["manifest"], ["Article 30"], "hard", fs, tmp_path / "c2.json", tmp_path / "dep2")
    dep2 = load_checkpoint(tmp_path / "dep2")
    both = sorted(_rows(ckpt, 4101) | _rows(ckpt, 4126))
    assert cert2["forgotten_rows"] == both and cert2["checkpoint"]["base_sha256"] == cert["checkpoint"]["sha256"]
    assert torch.count_nonzero(dep2.state_dict["transformer.h.1.mlp.sink_up"][both]) == 0
    assert verify_paths(tmp_path / "c2.json", dep2, fs, env["manifest"])["ok"]
    assert _sidecar(tmp_path / "c2.json") == _expected_collateral(ckpt, {4101, 4126})
    # re-enabling one zeroed row is caught
    state = dict(dep2.state_dict)
    state["transformer.h.0.mlp.sink_down"] = state["transformer.h.0.mlp.sink_down"].clone()
    state["transformer.h.0.mlp.sink_down"][both[0]] = 1.0
    save_deployed(tmp_path / "evil", state, dep2.meta)
    report = verify_paths(tmp_path / "c2.json", load_checkpoint(tmp_path / "evil"), fs)
    assert not report["ok"] and "forgotten_rows_zero" in {c["check"] for c in report["checks"] if not c["ok"]}


def test_hard_requires_output_and_matching_manifest(env, tmp_path):
    with pytest.raises(ValueError, match="output_checkpoint"):
        unlearn(env["ckpt"], env["manifest"], ["4101"], "hard", tmp_path / "fs.json", tmp_path / "c.json")
    other = dict(env["ckpt"].state_dict)
    other["lm_head.weight"] = other["lm_head.weight"] + 1
    save_deployed(tmp_path / "other", other, env["ckpt"].meta)
    with pytest.raises(ValueError, match="not the checkpoint the manifest"):
        unlearn(load_checkpoint(tmp_path / "other"), env["manifest"], ["4101"], "mask", tmp_path / "fs.json",
                tmp_path / "c.json")
    assert not (tmp_path / "fs.json").exists()


def test_cli_exit_codes(env, tmp_path, capsys):
    base = ["--checkpoint", str(env["root"] / "run"), "--manifest", str(env["manifest"]),
            "--forget-set", str(tmp_path / "fs.json"), "--certificate", str(tmp_path / "c.json")]
    with pytest.raises(SystemExit) as exit_info:
        unlearn_main(base + ["4102", "Missing title"])
    assert exit_info.value.code == 2 and "Missing title" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()
    unlearn_main(base + ["--method", "mask", "4102"])
    out = json.loads(capsys.readouterr().out)
    assert out["sources"] == [4102] and load_certificate(tmp_path / "c.json")["method"] == "mask"
    with pytest.raises(SystemExit) as exit_info:
        unlearn_main(["verify", "--certificate", str(tmp_path / "c.json"), "--checkpoint", str(env["root"] / "run"),
                      "--forget-set", str(tmp_path / "fs.json")])
    assert exit_info.value.code == 0 and json.loads(capsys.readouterr().out)["ok"]


def test_generate_cli_modes(env, tmp_path, capsys):
    import sentencepiece as spm

    from nulls_dist.cli.generate import main as generate_main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Article {i} is a town in the north with a river and a tower" for i in range(40)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", bos_id=2, eos_id=3, pad_id=0, unk_id=1)
    fs = tmp_path / "fs.json"
    unlearn(env["ckpt"], env["manifest"], ["Article 3"], "mask", fs, tmp_path / "c.json")
    base = ["--checkpoint", str(env["root"] / "run"), "--manifest", str(env["manifest"]), "--tokenizer",
            str(tmp_path / "sp.model"), "--prompt", "Article 3 is a town", "--max-new-tokens", "5"]
    generate_main(base + ["--mode", "sink_on", "--source", "Article 3"])
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "sink_on" and out["mode_source"] == ID_OFFSET + 3 and len(out["tokens"]) == 5
    generate_main(base + ["--mode", "sink_off", "--forget-set", str(fs), "--embedder", "model"])
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "sink_off" and out["routed_source"] != ID_OFFSET + 3 and out["num_forgotten"] == 1
    generate_main(base + ["--mode", "backbone_only", "--temperature", "0.8", "--top-p", "0.9"])
    assert json.loads(capsys.readouterr().out)["mode"] == "backbone_only"
    with pytest.raises(SystemExit) as exit_info:
        generate_main(base + ["--mode", "sink_on", "--source", "No such article"])
    assert exit_info.value.code == 2
