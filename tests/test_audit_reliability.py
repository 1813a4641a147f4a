"""Reliability and security of the unlearning tools (docs/reliability.md): checkpoint, data manifest and registry
must belong together; forget sets and certificates cannot clobber each other or a checkpoint and are never
overwritten; a forget set's hash and history recompute; `verify` recomputes every derivable field of a
certificate and checks an HMAC signature; a deployment with a forget set in force never activates a forgotten
source's sinks, whatever the mode or the caller."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from unlearn_helpers import ID_OFFSET, NUM_TRAIN, make_checkpoint_with_manifest  # noqa: E402

from nulls_dist.audit.unlearn import resolve_sources, sign, unlearn  # noqa: E402
from nulls_dist.audit.verify import load_certificate, verify_paths  # noqa: E402
from nulls_dist.cli.manifest import check_data_belongs  # noqa: E402
from nulls_dist.deploy.checkpoint_io import build_model  # noqa: E402
from nulls_dist.deploy.forget import apply_forget_set  # noqa: E402
from nulls_dist.formats.digests import file_sha256, json_sha256  # noqa: E402
from nulls_dist.formats.forget_set import forget_set_hash, load_forget_set  # noqa: E402
from nulls_dist.model import SinkMode  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    ckpt = make_checkpoint_with_manifest(root, zero_stage=0, shard_rows=20)
    out = root / "requests"
    out.mkdir()
    cert = unlearn(ckpt, root / "manifest", [str(ID_OFFSET + 3)], "mask", out / "forget.json", out / "cert-1.json")
    return {"root": root, "ckpt": ckpt, "manifest": root / "manifest", "out": out, "cert": cert}


def _failed(report):
    return {c["check"] for c in report["checks"] if not c["ok"]}


def _reseal(doc: dict) -> dict:
    body = {k: v for k, v in doc.items() if k not in ("certificate_sha256", "signature")}
    return {**body, "certificate_sha256": json_sha256(body)}


# ------------------------------------------------------------------------------------------------ belonging
def test_a_rebuilt_dataset_or_a_foreign_registry_is_refused(tmp_path):
    registry, other = tmp_path / "registry.parquet", tmp_path / "other.parquet"
    registry.write_bytes(b"registry as trained")
    other.write_bytes(b"a registry rebuilt later")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"schema_version": 1, "registry": {"sha256": file_sha256(registry)}}))
    ckpt = SimpleNamespace(path=tmp_path / "ckpt", meta={"data_manifest_sha256": file_sha256(manifest),
                                                         "registry_sha256": file_sha256(registry)})
    assert check_data_belongs(ckpt, manifest, registry) == file_sha256(manifest)
    with pytest.raises(ValueError, match="does not match the one data manifest"):
        check_data_belongs(ckpt, manifest, other)
    with pytest.raises(ValueError, match="not the one checkpoint .* was trained with"):
        check_data_belongs(ckpt, None, other)
    rebuilt = tmp_path / "rebuilt.json"
    rebuilt.write_text(json.dumps({"schema_version": 1, "registry": {"sha256": file_sha256(registry)}, "x": 1}))
    with pytest.raises(ValueError, match="rebuilt or changed after training"):
        check_data_belongs(ckpt, rebuilt, registry)


def test_unknown_and_never_trained_sources_are_reported_together(env):
    with pytest.raises(ValueError) as err:
        resolve_sources(env["manifest"], ["No such title", str(ID_OFFSET + NUM_TRAIN + 1)])
    assert "title:No such title" in str(err.value) and "never trained" in str(err.value)


# ------------------------------------------------------------------------------------------------ paths
@pytest.mark.parametrize("case", ["same-file", "certificate-exists", "output-is-the-run", "inside-manifest",
                                  "output-not-empty"])
def test_outputs_that_would_clobber_are_refused_and_nothing_is_written(env, tmp_path, case):
    ckpt, manifest = env["ckpt"], env["manifest"]
    forget, cert, output, method = tmp_path / "f.json", tmp_path / "c.json", None, "mask"
    if case == "same-file":
        cert = forget
    elif case == "certificate-exists":
        cert = env["out"] / "cert-1.json"
    elif case == "output-is-the-run":
        method, output = "hard", ckpt.path.parent.parent
    elif case == "inside-manifest":
        forget = manifest / "forget.json"
    elif case == "output-not-empty":
        method, output = "hard", tmp_path / "busy"
        output.mkdir()
        (output / "keep.txt").write_text("mine")
    before = {p: p.stat().st_mtime_ns for p in env["root"].rglob("*") if p.is_file()}
    with pytest.raises(ValueError):
        unlearn(ckpt, manifest, [str(ID_OFFSET + 5)], method, forget, cert, output)
    after = {p: p.stat().st_mtime_ns for p in env["root"].rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing changed
    assert not (tmp_path / "f.json").exists() or case == "certificate-exists"


# ------------------------------------------------------------------------------------------------ forget sets
@pytest.mark.parametrize("edit", ["add-id", "rehash", "drop-history", "edit-history"])
def test_an_edited_forget_set_is_refused(env, tmp_path, edit):
    doc = json.loads((env["out"] / "forget.json").read_text())
    if edit in ("add-id", "rehash"):
        doc["source_ids"] = sorted(doc["source_ids"] + [ID_OFFSET + 9])
        doc["sources"][str(ID_OFFSET + 9)] = "Article 9"
        if edit == "rehash":  # an attacker who recomputes the hash still cannot fix the history
            doc["sha256"] = forget_set_hash(doc["source_ids"], doc["checkpoint_sha256"], doc["manifest_sha256"])
    elif edit == "drop-history":
        doc["history"] = []
    else:
        doc["history"][0]["added"] = [ID_OFFSET + 4]
    path = tmp_path / "forget.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=str(path)):
        load_forget_set(path)


# ------------------------------------------------------------------------------------------------ certificates
def test_verify_recomputes_forgotten_rows_titles_and_tokens(env, tmp_path):
    ckpt = env["ckpt"]
    good = verify_paths(env["out"] / "cert-1.json", ckpt, env["out"] / "forget.json", env["manifest"])
    assert good["ok"] and "unsigned" in good["assurance"], _failed(good)
    doc = load_certificate(env["out"] / "cert-1.json")
    for field, change in (("forgotten_rows", lambda d: d["forgotten_rows"][:-1]),
                          ("title", None), ("tokens", None)):
        forged = json.loads(json.dumps(doc))
        if field == "forgotten_rows":
            forged["forgotten_rows"] = change(forged)
        else:
            forged["sources"][0][field] = "Someone else" if field == "title" else 123
        path = tmp_path / f"{field}.json"
        path.write_text(json.dumps(_reseal(forged)))
        (tmp_path / f"{field}.collateral.parquet").write_bytes((env["out"] / "cert-1.collateral.parquet").read_bytes())
        report = verify_paths(path, ckpt, env["out"] / "forget.json", env["manifest"])
        assert not report["ok"]
        want = "forgotten_rows_recompute" if field == "forgotten_rows" else "sources_match_manifest"
        assert want in _failed(report), (field, _failed(report))


def test_signed_certificates_verify_only_with_their_key(env, tmp_path):
    key, other = b"k" * 32, b"z" * 32
    forget, cert = tmp_path / "forget.json", tmp_path / "cert.json"
    unlearn(env["ckpt"], env["manifest"], [str(ID_OFFSET + 7)], "mask", forget, cert, signing_key=key)
    assert verify_paths(cert, env["ckpt"], forget, env["manifest"], signing_key=key)["ok"]
    assert "signature" in _failed(verify_paths(cert, env["ckpt"], forget, signing_key=other))
    no_key = verify_paths(cert, env["ckpt"], forget)
    assert no_key["ok"] and "not checked" in no_key["assurance"]
    doc = load_certificate(cert)
    doc["sources"][0]["title"] = "Forged"
    forged = _reseal(doc)
    forged["signature"] = doc["signature"]  # the seal recomputes; the signature cannot without the key
    cert.write_text(json.dumps(forged))
    assert "signature" in _failed(verify_paths(cert, env["ckpt"], forget, signing_key=key))
    assert sign(forged, key)["value"] != doc["signature"]["value"]


# ------------------------------------------------------------------------------------------------ deployment
def test_a_forget_set_in_force_closes_every_path_to_forgotten_sinks(env):
    ckpt = env["ckpt"]
    model = build_model(ckpt)
    forgotten = ID_OFFSET + 3
    apply_forget_set(model, ckpt, env["out"] / "forget.json")
    cfg = model.cfg
    with pytest.raises(ValueError, match="forget set in force"):
        model.make_plan(None, SinkMode.sink_on(forgotten), (1, 4))
    with pytest.raises(ValueError, match="forget set in force"):
        model.make_plan(None, SinkMode.sink_off(forgotten, []), (1, 4))
    with pytest.raises(ValueError, match="deployment modes only"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), ID_OFFSET + 1))
    gone = set(model.sink_assignment.rows(torch.tensor([forgotten]))[0].tolist()) - {-1}
    survivor = ID_OFFSET + 11
    routed = model.make_plan(None, SinkMode.sink_off(survivor, []), (1, 4))
    assert not gone & set(routed.layer_rows(0)[0].tolist())  # the forgotten rows are removed even unasked
    expected = model.make_plan(None, SinkMode.expected(), (1, 4))
    assert expected.kind == "masked" and not expected.layer_mask(0)[0, sorted(gone)].any()
    assert int(expected.layer_mask(0)[0].sum()) == cfg.n_sink - len(gone)
    stale = build_model(ckpt).make_plan(None, SinkMode.sink_off(survivor, []), (1, 4))  # built without it
    with pytest.raises(ValueError, match="not built under the forget set"):
        model(torch.zeros(1, 4, dtype=torch.long), plan=stale, mode=SinkMode.sink_off(survivor, []))
    from nulls_dist.deploy.lm_eval_adapter import NullsLM

    lm = NullsLM(model, lambda s: [1, 2, 3], lambda ids: "x", mode_for=lambda c: SinkMode.sink_on(forgotten),
                 bos_id=0)
    with pytest.raises(ValueError, match="forget set in force"):
        lm.loglikelihood([SimpleNamespace(args=("a context", " an answer"))])


def test_a_forget_set_of_another_checkpoint_is_refused(env, tmp_path):
    doc = json.loads((env["out"] / "forget.json").read_text())
    doc["checkpoint_sha256"] = "f" * 64
    replay = set()
    for entry in doc["history"]:
        replay |= set(entry["added"])
        entry["sha256"] = forget_set_hash(replay, doc["checkpoint_sha256"], doc["manifest_sha256"])
    doc["sha256"] = forget_set_hash(doc["source_ids"], doc["checkpoint_sha256"], doc["manifest_sha256"])
    path = tmp_path / "forget.json"
    path.write_text(json.dumps(doc))
    load_forget_set(path)  # a valid document...
    with pytest.raises(ValueError, match="belongs to checkpoint"):
        apply_forget_set(build_model(env["ckpt"]), env["ckpt"], path)  # ... of another checkpoint


def test_nulls_generate_refuses_a_forgotten_source_in_one_line(env, tmp_path):
    tokenizer = env["root"] / "tok.model"
    if not tokenizer.exists():
        from nulls_dist.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer

        rng = np.random.default_rng(0)
        texts = [" ".join("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(rng.integers(2, 7))))
                          for _ in range(40)) for _ in range(200)]
        train_tokenizer(iter(texts), TokenizerConfig(vocab_size=400, num_threads=1), env["root"],
                        num_texts=len(texts)).rename(tokenizer)
    proc = subprocess.run([str(BIN / "nulls-generate"), "--checkpoint", str(env["root"] / "run"), "--manifest",
                           str(env["manifest"]), "--forget-set", str(env["out"] / "forget.json"), "--tokenizer",
                           str(tokenizer), "--mode", "sink_on", "--source", str(ID_OFFSET + 3), "--prompt", "a"],
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "forget set in force" in lines[0], proc.stderr
    assert np.all([not line.startswith("{") for line in proc.stdout.splitlines()])
