"""`nulls-unlearn verify`: check a deployed checkpoint and a forget set against an unlearning certificate.

Checks (each reported with ok/detail; the verdict is their conjunction):
- the certificate's own sha256;
- the forget set's hash recomputes, the certificate's forget-set hash is in its history (later requests may
  have added sources) and it contains every certified source;
- the checkpoint's content digest: the certified input checkpoint (mask) or the certified output (hard);
- the certificate's sink layout matches the model (`layers_share_sinks` iff the assignment is not
  layer-specific; per-layer lists have one list per layer), and the certified sink indices of every source are
  what the checkpoint's sink assignment gives in every layer (a shared list is checked against each layer);
- mask, on the checkpoint the manifest was built from: each source's certified `sink_digest` recomputes from
  the checkpoint's rows (`sink_digests.py`, the manifest's definition);
- hard: every forgotten row is zero in every layer's gate/up/down tables and covers every certified sink;
- the collateral sidecar (beside the certificate): its sha256 and row count are the certified ones, its
  columns are the schema's, its summary (count, total, top-N) recomputes from its rows, no row is a forgotten
  source, shares nothing, repeats an id or names an overlap outside the forget set;
- with a manifest: the manifest digest, and the collateral recomputed from the manifest equals the sidecar's
  rows (content sha256), i.e. it is exactly the cumulative forget set's collateral;
- with a manifest, certificates of version 4: the survivors' retained share recomputes (same method, and for a
  sampled one the same sample size and seed).

Certificates of version 2 (per-layer lists, no `layers_share_sinks`) are read as layer-by-layer lists; their
manifests (version 1) are refused by the manifest reader, so `--manifest` checks need a rebuilt manifest.
"""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nulls_dist.sinks import SinkAssignment
from nulls_dist.deploy.checkpoint_io import LoadedCheckpoint, sink_table_keys
from nulls_dist.formats.weights import read_rows, state_dict_digest
from nulls_dist.formats.digests import file_sha256, json_sha256
from nulls_dist.audit.collateral import COLLATERAL_SCHEMA, forget_sinks, read_sidecar, recompute_digest
from nulls_dist.audit.retained import RetainedShareOptions, survivors_retained_share
from nulls_dist.audit import sink_digests
from nulls_dist.audit.manifest import manifest_digest
from nulls_dist.audit.manifest import read_records
from nulls_dist.audit.unlearn import CERTIFICATE_FORMAT, key_id, load_json_document, sign
from nulls_dist.formats.forget_set import forget_set_hash, load_forget_set


def load_certificate(path: str | Path) -> dict[str, Any]:
    return load_json_document(path, CERTIFICATE_FORMAT, "an unlearning certificate")


def _per_layer(lists: list, shared: bool, n_layer: int) -> list[list[int]] | None:
    """A certificate's sink list(s) -> one list per layer; None when per-layer lists do not number n_layer."""
    if shared:
        return [list(lists)] * n_layer
    if len(lists) != n_layer or not all(isinstance(x, list) for x in lists):
        return None
    return lists


def add_check(checks: list[dict], name: str, ok: bool, detail: str = "") -> None:
    checks.append({"check": name, "ok": bool(ok), "detail": detail})


def check_collateral(checks: list[dict], cert: dict[str, Any], certificate_dir: Path,
                      manifest_dir: str | Path | None) -> None:
    summary = cert["collateral"]
    if "file" not in summary:
        add_check(checks, "collateral_sidecar", False, f"no sidecar (certificate version {cert.get('version')})")
        return
    path = certificate_dir / summary["file"]
    if not path.is_file():
        add_check(checks, "collateral_sidecar", False, f"missing {path}")
        return
    got = file_sha256(path)
    add_check(checks, "collateral_sha256", got == summary["sha256"], f"got {got}, certified {summary['sha256']}")
    try:
        pf = pq.ParquetFile(path)
        schema_ok = pf.schema_arrow.names == COLLATERAL_SCHEMA.names
        rows = pf.metadata.num_rows
        content = read_sidecar(path, cert["forget_set"]["source_ids"]) if schema_ok else None
    except (pa.ArrowException, OSError) as exc:
        add_check(checks, "collateral_readable", False, str(exc))
        return
    add_check(checks, "collateral_schema", schema_ok, f"columns {pf.schema_arrow.names}")
    add_check(checks, "collateral_rows", rows == summary["num_rows"] == summary["num_sources"],
           f"{rows} rows, certified {summary['num_rows']}")
    if content is None:
        return
    recounted = {k: summary.get(k) for k in content["summary"]}
    add_check(checks, "collateral_summary", content["summary"] == recounted, "count, total and top-N from the rows")
    bad = {k: v for k, v in content["invalid_rows"].items() if v}
    add_check(checks, "collateral_rows_valid", not bad, f"invalid rows {bad}" if bad else "")
    add_check(checks, "collateral_content_sha256", content["content_sha256"] == summary["content_sha256"])
    if manifest_dir is not None:
        expected = recompute_digest(manifest_dir, cert["forget_set"]["source_ids"])
        add_check(checks, "collateral_matches_manifest", expected == content["content_sha256"],
               "recomputed from the manifest for the certified forget set")


def _check_retained_share(checks: list[dict], cert: dict[str, Any], manifest_dir: str | Path | None,
                          unchecked: list[str]) -> None:
    """Version 4: the survivors' retained share is present and, with the manifest, recomputes exactly."""
    certified = cert.get("survivors_retained_share")
    if cert.get("version", 0) < 4:
        unchecked.append(f"survivors' retained share (certificate version {cert.get('version')} predates it)")
        return
    if not isinstance(certified, dict) or certified.get("method") not in ("exact", "sampled"):
        add_check(checks, "survivors_retained_share", False, "missing or without a method")
        return
    if manifest_dir is None:
        unchecked.append("the survivors' retained share (no --manifest)")
        return
    if certified["method"] == "exact":
        opts = RetainedShareOptions(exact_budget=2**62)
    else:
        opts = RetainedShareOptions(exact_budget=int(certified.get("exact_budget", 1)),
                                    sample_size=int(certified.get("sample_size", 1)), seed=int(certified.get("seed", 0)))
    got = survivors_retained_share(manifest_dir, forget_sinks(manifest_dir, cert["forget_set"]["source_ids"]), opts)
    wrong = sorted(k for k in set(got) | set(certified) if got.get(k) != certified.get(k))
    add_check(checks, "survivors_retained_share", not wrong,
           f"differs in {wrong}: recomputed {[got.get(k) for k in wrong]}" if wrong else
           f"{certified['method']}, recomputed from the manifest for the certified forget set")


def check_signature(checks: list[dict], cert: dict[str, Any], signing_key: bytes | None) -> str:
    """Check the signature when a key is given; returns what the verdict assures."""
    signature = cert.get("signature")
    if signing_key is None:
        if signature is None:
            return ("unsigned: the certificate_sha256 seal detects accidental changes only; anyone can edit a "
                    "certificate and reseal it (sign certificates with --signing-key)")
        return f"signed ({signature.get('alg')}, key {signature.get('key_id')}) but not checked: no key given"
    if signature is None:
        add_check(checks, "signature", False, "the certificate is not signed")
        return "unsigned"
    want = sign(cert, signing_key)
    add_check(checks, "signature", hmac.compare_digest(str(signature.get("value", "")), want["value"]) and
           signature.get("key_id") == key_id(signing_key), f"{signature.get('alg')}, key {signature.get('key_id')}")
    return f"signed ({want['alg']}, key {want['key_id']}) and checked with the key"


def certified_state(forget: dict[str, Any], certified_sha: str) -> list[int] | None:
    """The forget set's sources after the history entry whose hash is the certified one (None if absent)."""
    replay: set[int] = set()
    for entry in forget["history"]:
        replay |= {int(s) for s in entry["added"]}
        if entry["sha256"] == certified_sha:
            return sorted(replay)
    return None


def verify(cert: dict[str, Any], ckpt: LoadedCheckpoint, forget: dict[str, Any],
           manifest_dir: str | Path | None = None, certificate_dir: str | Path = ".",
           signing_key: bytes | None = None) -> dict[str, Any]:
    """All checks; `certificate_dir` is where the certificate (and so its collateral sidecar) lies. Every field
    of the certificate that can be derived is derived again (from the forget set's history, the sink assignment,
    the checkpoint's rows and, with `manifest_dir`, the manifest's records) and compared."""
    checks: list[dict] = []
    body = {k: v for k, v in cert.items() if k not in ("certificate_sha256", "signature")}
    add_check(checks, "certificate_sha256", json_sha256(body) == cert.get("certificate_sha256"))
    assurance = check_signature(checks, cert, signing_key)

    recomputed = forget_set_hash(forget["source_ids"], forget["checkpoint_sha256"], forget["manifest_sha256"])
    add_check(checks, "forget_set_sha256", recomputed == forget["sha256"], f"recomputed {recomputed}")
    state = certified_state(forget, cert["forget_set"]["sha256"])
    add_check(checks, "forget_set_history", state is not None,
           "the certified forget set is this forget set or an earlier state of it")
    add_check(checks, "certified_forget_set_recomputes", state == sorted(cert["forget_set"]["source_ids"]),
           "the certified source_ids are the forget set's state at the certified hash")
    certified = {s["source_id"] for s in cert["sources"]} | set(cert["forget_set"]["source_ids"])
    missing = sorted(certified - set(forget["source_ids"]))
    add_check(checks, "forget_set_contains_sources", not missing, f"missing {missing}" if missing else "")
    add_check(checks, "forget_set_checkpoint", forget["checkpoint_sha256"] == cert["checkpoint"]["base_sha256"])

    digest = state_dict_digest(ckpt.state_dict)
    expected = cert["output_checkpoint"]["sha256"] if cert["method"] == "hard" else cert["checkpoint"]["sha256"]
    add_check(checks, "checkpoint_sha256", digest == expected, f"got {digest}, certified {expected}")

    cfg = ckpt.model_config
    shared = bool(cert.get("layers_share_sinks", False))
    n_layer = cert.get("n_layer", cfg.n_layer)  # version 2 certificates do not name it
    add_check(checks, "sink_layout_matches_model", shared == (not cfg.sink_layer_specific) and n_layer == cfg.n_layer,
           f"certificate layers_share_sinks={shared}, n_layer={n_layer}; model sink_layer_specific="
           f"{cfg.sink_layer_specific}, n_layer={cfg.n_layer}")
    per_layer = {s["source_id"]: _per_layer(s["sinks"], shared, cfg.n_layer) for s in cert["sources"]}
    assignment = SinkAssignment(cfg.sink_assignment_config())
    wrong = []
    for sid, lists in per_layer.items():
        for layer in range(cfg.n_layer):
            rows = assignment.rows(torch.tensor([sid]), layer)[0]
            if lists is None or rows[rows >= 0].tolist() != lists[layer]:
                wrong.append((sid, layer))
    add_check(checks, "certified_sinks_match_assignment", not wrong, f"mismatch at {wrong[:5]}" if wrong else "")
    if cert["method"] == "mask" and digest == cert["checkpoint"]["base_sha256"] and not wrong:
        got = sink_digests.recompute_hex(ckpt.state_dict, cfg.n_layer, cfg.n_sink, shared,
                                         [s["sinks"] for s in cert["sources"]])
        bad = [s["source_id"] for s, h in zip(cert["sources"], got) if h != s["sink_digest"]]
        add_check(checks, "certified_sink_digest", not bad, f"differs for {bad[:5]}" if bad else
               f"{len(got)} sources, recomputed from the checkpoint ({sink_digests.DEFINITION})")

    if cert["method"] == "hard":
        forgotten = _per_layer(cert["forgotten_rows"], shared, cfg.n_layer)
        add_check(checks, "forgotten_rows_layout", forgotten is not None, f"{cfg.n_layer} layers")
        forgotten = forgotten or [[] for _ in range(cfg.n_layer)]
        nonzero = []
        for layer, rows in enumerate(forgotten):
            for key in sink_table_keys(layer):
                if rows and read_rows(ckpt.state_dict, key, rows).abs().sum() != 0:  # those rows only
                    nonzero.append(key)
        add_check(checks, "forgotten_rows_zero", not nonzero, f"non-zero rows in {nonzero}" if nonzero else "")
        covered = all(set(lists[layer]) <= set(forgotten[layer]) for lists in per_layer.values() if lists
                      for layer in range(cfg.n_layer))
        add_check(checks, "forgotten_rows_cover_sources", covered)
    add_check(checks, "strategy_recomputes", cert.get("strategy") == assignment.describe(),
           "the certified strategy is the checkpoint's sink assignment")
    union = [set() for _ in range(cfg.n_layer)]
    for sid in cert["forget_set"]["source_ids"]:
        for layer in range(cfg.n_layer):
            rows = assignment.rows(torch.tensor([int(sid)]), layer)[0]
            union[layer] |= set(rows[rows >= 0].tolist())
    certified_union = _per_layer(cert["forgotten_rows"], shared, cfg.n_layer)
    add_check(checks, "forgotten_rows_recompute", certified_union is not None and all(
        sorted(union[layer]) == sorted(certified_union[layer]) for layer in range(cfg.n_layer)),
        "the union of the certified forget set's sinks in every layer, from the assignment")
    unchecked = []
    if manifest_dir is not None:
        got = manifest_digest(manifest_dir)
        add_check(checks, "manifest_sha256", got == cert["manifest"]["sha256"], f"got {got}")
        records = {r["source_id"]: r for r in read_records(manifest_dir, [s["source_id"] for s in cert["sources"]],
                                                           ["title", "tokens", "sink_digest"]).to_pylist()}
        wrong = [s["source_id"] for s in cert["sources"] if s["source_id"] not in records or
                 (records[s["source_id"]]["title"], records[s["source_id"]]["tokens"],
                  records[s["source_id"]]["sink_digest"].hex()) != (s["title"], s["tokens"], s["sink_digest"])]
        add_check(checks, "sources_match_manifest", not wrong,
               f"title, tokens or sink digest differ for {wrong[:5]}" if wrong else "titles, tokens, sink digests")
    else:
        unchecked.append("titles, tokens and the manifest digest (no --manifest)")
    check_collateral(checks, cert, Path(certificate_dir), manifest_dir)
    _check_retained_share(checks, cert, manifest_dir, unchecked)
    return {"ok": all(c["ok"] for c in checks), "method": cert["method"], "assurance": assurance,
            "unchecked": unchecked, "checks": checks}


def verify_paths(certificate: str | Path, checkpoint: LoadedCheckpoint, forget_set: str | Path,
                 manifest_dir: str | Path | None = None, signing_key: bytes | None = None) -> dict[str, Any]:
    return verify(load_certificate(certificate), checkpoint, load_forget_set(forget_set), manifest_dir,
                  Path(certificate).parent, signing_key)
