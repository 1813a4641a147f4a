"""`nulls-unlearn verify`: check a deployed checkpoint and a forget set against an unlearning certificate.

Checks (each reported with ok/detail; the verdict is their conjunction):
- the certificate's own sha256;
- the forget set's hash recomputes, the certificate's forget-set hash is in its history (later requests may
  have added sources) and it contains every certified source;
- the checkpoint's content digest: the certified input checkpoint (mask) or the certified output (hard);
- the certified sink indices of every source are what the checkpoint's sink assignment gives;
- hard: every forgotten row is zero in every layer's gate/up/down tables;
- the collateral sidecar (beside the certificate): its sha256 and row count are the certified ones, its
  columns are the schema's, its summary (count, total, top-N) recomputes from its rows, no row is a forgotten
  source, shares nothing, repeats an id or names an overlap outside the forget set;
- with a manifest: the manifest digest, and the collateral recomputed from the manifest equals the sidecar's
  rows (content sha256), i.e. it is exactly the cumulative forget set's collateral.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nulls_dist.sinks import SinkAssignment
from nulls_dist.deploy.checkpoint_io import LoadedCheckpoint, sink_table_keys
from nulls_dist.formats.weights import state_dict_digest
from nulls_dist.formats.digests import file_sha256, json_sha256
from nulls_dist.audit.collateral import COLLATERAL_SCHEMA, read_sidecar, recompute_digest
from nulls_dist.audit.manifest import manifest_digest
from nulls_dist.audit.unlearn import (CERTIFICATE_FORMAT, forget_set_hash, load_forget_set,
                                        load_json_document)


def load_certificate(path: str | Path) -> dict[str, Any]:
    return load_json_document(path, CERTIFICATE_FORMAT, "an unlearning certificate")


def _check(checks: list[dict], name: str, ok: bool, detail: str = "") -> None:
    checks.append({"check": name, "ok": bool(ok), "detail": detail})


def _check_collateral(checks: list[dict], cert: dict[str, Any], certificate_dir: Path,
                      manifest_dir: str | Path | None) -> None:
    summary = cert["collateral"]
    if "file" not in summary:
        _check(checks, "collateral_sidecar", False, f"no sidecar (certificate version {cert.get('version')})")
        return
    path = certificate_dir / summary["file"]
    if not path.is_file():
        _check(checks, "collateral_sidecar", False, f"missing {path}")
        return
    got = file_sha256(path)
    _check(checks, "collateral_sha256", got == summary["sha256"], f"got {got}, certified {summary['sha256']}")
    try:
        pf = pq.ParquetFile(path)
        schema_ok = pf.schema_arrow.names == COLLATERAL_SCHEMA.names
        rows = pf.metadata.num_rows
        content = read_sidecar(path, cert["forget_set"]["source_ids"]) if schema_ok else None
    except (pa.ArrowException, OSError) as exc:
        _check(checks, "collateral_readable", False, str(exc))
        return
    _check(checks, "collateral_schema", schema_ok, f"columns {pf.schema_arrow.names}")
    _check(checks, "collateral_rows", rows == summary["num_rows"] == summary["num_sources"],
           f"{rows} rows, certified {summary['num_rows']}")
    if content is None:
        return
    recounted = {k: summary.get(k) for k in content["summary"]}
    _check(checks, "collateral_summary", content["summary"] == recounted, "count, total and top-N from the rows")
    bad = {k: v for k, v in content["invalid_rows"].items() if v}
    _check(checks, "collateral_rows_valid", not bad, f"invalid rows {bad}" if bad else "")
    _check(checks, "collateral_content_sha256", content["content_sha256"] == summary["content_sha256"])
    if manifest_dir is not None:
        expected = recompute_digest(manifest_dir, cert["forget_set"]["source_ids"])
        _check(checks, "collateral_matches_manifest", expected == content["content_sha256"],
               "recomputed from the manifest for the certified forget set")


def verify(cert: dict[str, Any], ckpt: LoadedCheckpoint, forget: dict[str, Any],
           manifest_dir: str | Path | None = None, certificate_dir: str | Path = ".") -> dict[str, Any]:
    """All checks; `certificate_dir` is where the certificate (and so its collateral sidecar) lies."""
    checks: list[dict] = []
    body = {k: v for k, v in cert.items() if k != "certificate_sha256"}
    _check(checks, "certificate_sha256", json_sha256(body) == cert.get("certificate_sha256"))

    recomputed = forget_set_hash(forget["source_ids"], forget["checkpoint_sha256"], forget["manifest_sha256"])
    _check(checks, "forget_set_sha256", recomputed == forget["sha256"], f"recomputed {recomputed}")
    history = {h["sha256"] for h in forget.get("history", [])}
    _check(checks, "forget_set_history", cert["forget_set"]["sha256"] in history,
           "the certified forget set is this forget set or an earlier state of it")
    certified = {s["source_id"] for s in cert["sources"]} | set(cert["forget_set"]["source_ids"])
    missing = sorted(certified - set(forget["source_ids"]))
    _check(checks, "forget_set_contains_sources", not missing, f"missing {missing}" if missing else "")
    _check(checks, "forget_set_checkpoint", forget["checkpoint_sha256"] == cert["checkpoint"]["base_sha256"])

    digest = state_dict_digest(ckpt.state_dict)
    expected = cert["output_checkpoint"]["sha256"] if cert["method"] == "hard" else cert["checkpoint"]["sha256"]
    _check(checks, "checkpoint_sha256", digest == expected, f"got {digest}, certified {expected}")

    cfg = ckpt.model_config
    assignment = SinkAssignment(cfg.sink_assignment_config())
    wrong = []
    for src in cert["sources"]:
        for layer in range(cfg.n_layer):
            rows = assignment.rows(torch.tensor([src["source_id"]]), layer)[0]
            if rows[rows >= 0].tolist() != src["sinks"][layer]:
                wrong.append((src["source_id"], layer))
    _check(checks, "certified_sinks_match_assignment", not wrong, f"mismatch at {wrong[:5]}" if wrong else "")

    if cert["method"] == "hard":
        nonzero = []
        for layer, rows in enumerate(cert["forgotten_rows"]):
            index = torch.tensor(rows, dtype=torch.int64)
            for key in sink_table_keys(layer):
                if index.numel() and ckpt.state_dict[key][index].abs().sum() != 0:
                    nonzero.append(key)
        _check(checks, "forgotten_rows_zero", not nonzero, f"non-zero rows in {nonzero}" if nonzero else "")
        union = {(layer, r) for layer in range(cfg.n_layer) for s in cert["sources"] for r in s["sinks"][layer]}
        covered = all(r in set(cert["forgotten_rows"][layer]) for layer, r in union)
        _check(checks, "forgotten_rows_cover_sources", covered)
    if manifest_dir is not None:
        got = manifest_digest(manifest_dir)
        _check(checks, "manifest_sha256", got == cert["manifest"]["sha256"], f"got {got}")
    _check_collateral(checks, cert, Path(certificate_dir), manifest_dir)
    return {"ok": all(c["ok"] for c in checks), "method": cert["method"], "checks": checks}


def verify_paths(certificate: str | Path, checkpoint: LoadedCheckpoint, forget_set: str | Path,
                 manifest_dir: str | Path | None = None) -> dict[str, Any]:
    return verify(load_certificate(certificate), checkpoint, load_forget_set(forget_set), manifest_dir,
                  Path(certificate).parent)
