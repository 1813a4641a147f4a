"""`nulls-unlearn verify` for purge certificates: every certified artifact is what the certificate says, and
every artifact of the run holds the forgotten rows as zeros.

Checks (each with ok/detail; the verdict is their conjunction):
- the certificate's sha256 and (with a key) its HMAC signature;
- the forget set: it recomputes, the certified state is in its history, it belongs to the certified checkpoint;
- per artifact, the forgotten rows recompute from the sink assignment of the model the certificate records for it
  (and for the manifest's assignment equal the certificate's `forgotten_rows`);
- per artifact: removed ones are gone; the others hold exactly the certified files, each with the certified new
  sha256, and every file's forgotten rows are zero: our safetensors, exports, and DeepSpeed's module weights,
  fp32 masters and Adam moments (re-parsed by `train.checkpoint_rows`, through the restricted unpickler); for a
  sharded-table run, the forgotten rows of `model.safetensors` (read through the memory map, nothing else), the
  same rows of every table and optimizer-state tensor of `sink_tables/` (DCP's index through the restricted
  unpickler, each chunk holding one through torch's weights-only loader), and DeepSpeed's files parsed as the
  engine of such a run (any sink-table element in them fails the check);
- the run directory, scanned again: an artifact the certificate does not list (a tag written since, by training
  resumed from a purged checkpoint) must hold the forgotten rows as zeros too;
- the collateral sidecar (as for unlearning certificates) and, with a manifest, its digest and the collateral
  recomputed from it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from nulls_dist.audit import lineage as L
from nulls_dist.audit.purge import (PURGE_CERTIFICATE_FORMAT, forgotten_union, export_row_map, nonzero_state_rows,
                                    read_export)
from nulls_dist.audit.unlearn import load_json_document
from nulls_dist.audit.verify import add_check, certified_state, check_collateral, check_signature
from nulls_dist.audit.manifest import manifest_digest
from nulls_dist.deploy.checkpoint_io import model_config_from_meta
from nulls_dist.formats.digests import file_sha256, json_sha256
from nulls_dist.deploy.sink_tables_dcp import nonzero_sink_table_rows
from nulls_dist.formats import checkpoint as layout
from nulls_dist.formats.weights import RowReader, load_weights
from nulls_dist.sinks import SinkAssignment


def load_purge_certificate(path: str | Path) -> dict[str, Any]:
    return load_json_document(path, PURGE_CERTIFICATE_FORMAT, "a purge certificate")


def _nonzero(art: L.Artifact, cfg, union: np.ndarray, deepspeed: L.DeepSpeedFiles) -> dict[str, Any]:
    """file -> non-zero elements in the forgotten rows (by tensor or role/param), for files where any are."""
    rows = {k: (0, v) for k, v in L.sink_rows(union).items()}
    out: dict[str, Any] = {}
    if art.kind == L.EXPORT:
        state, _ = read_export(art.path)
        found = nonzero_state_rows(state, export_row_map(list(state), cfg, union))
        return {art.path.name: found} if found else {}
    for rel in art.of_role("weights"):
        if art.sharded:  # only the forgotten rows are read, through the memory map
            reader = RowReader(art.path / rel)
            found = {key: n for key, (_, index) in rows.items() if len(index) and
                     (n := int(torch.count_nonzero(reader.rows(key, index))))}
        else:
            found = nonzero_state_rows(load_weights(art.path / rel), rows)
        if found:
            out[rel] = found
    if art.of_role("sink_tables"):
        units = {layer: np.nonzero(union[layer])[0] for layer in range(union.shape[0])}
        for name, tensors in nonzero_sink_table_rows(layout.sink_tables_dir(art.path), units).items():
            out[f"{layout.SINK_TABLES_DIR}/{name}"] = {key: counts["elements"] for key, counts in tensors.items()}
    if art.of_role("deepspeed"):  # a sharded-table run's engine: any sink-table element refuses the file
        out.update(deepspeed.nonzero(art.path, art.of_role("deepspeed"), L.sink_rows(union), cfg,
                                     external_sinks=art.sharded))
    return out


def _artifact_now(entry: dict[str, Any], deepspeed: L.DeepSpeedFiles) -> L.Artifact:
    path = Path(entry["path"])
    kinds = {L.TRAINING_TAG: L.classify_tag, L.UNIVERSAL_TAG: L.classify_universal}  # as purge saw it
    if entry["kind"] in kinds:
        return kinds[entry["kind"]](path, deepspeed)
    if entry["kind"] == L.DEPLOYED:
        return L.classify_deployed(path)
    return L.export_artifact(path)


def _check_artifact(checks: list[dict], entry: dict[str, Any], ids: list[int], deepspeed: L.DeepSpeedFiles) -> None:
    path, name = Path(entry["path"]), f"artifact {entry['path']}"
    if entry["action"] == "removed":
        add_check(checks, f"{name}: removed", not path.exists(), "" if not path.exists() else "it exists again")
        return
    if not path.exists():  # pruned by training resumed since, or deleted: it holds nothing any more
        add_check(checks, f"{name}: gone", True, "no longer on disk (pruned or deleted since the purge)")
        return
    certified = {f["file"]: f["new_sha256"] for f in entry["files"] if f["action"] != "removed"}
    root = path if path.is_dir() else path.parent
    on_disk = set(L.rel_files(path)) if path.is_dir() else {path.name}
    extra, missing = sorted(on_disk - set(certified)), sorted(set(certified) - on_disk)
    add_check(checks, f"{name}: files", not extra and not missing,
              f"not certified: {extra[:5]}; missing: {missing[:5]}" if extra or missing else f"{len(certified)} files")
    wrong = [rel for rel, sha in certified.items() if rel in on_disk and file_sha256(root / rel) != sha]
    add_check(checks, f"{name}: sha256", not wrong, f"differ: {wrong[:5]}" if wrong else "every file's new sha256")
    cfg = model_config_from_meta({"model": entry["model"]}, path)
    try:
        found = _nonzero(_artifact_now(entry, deepspeed), cfg, forgotten_union(cfg, ids), deepspeed)
    except ValueError as exc:
        add_check(checks, f"{name}: forgotten rows zero", False, str(exc))
        return
    add_check(checks, f"{name}: forgotten rows zero", not found, f"non-zero: {found}" if found else
              "module weights, fp32 masters, Adam moments, sink-table rows and their optimizer state in every file")


def verify_purge(cert: dict[str, Any], forget: dict[str, Any], deepspeed: L.DeepSpeedFiles,
                 manifest_dir: str | Path | None = None, certificate_dir: str | Path = ".",
                 signing_key: bytes | None = None) -> dict[str, Any]:
    """All checks of the module docstring; `certificate_dir` is where the certificate and its sidecar lie."""
    checks: list[dict] = []
    body = {k: v for k, v in cert.items() if k not in ("certificate_sha256", "signature")}
    add_check(checks, "certificate_sha256", json_sha256(body) == cert.get("certificate_sha256"))
    assurance = check_signature(checks, cert, signing_key)
    ids = sorted(int(s) for s in cert["forget_set"]["source_ids"])
    state = certified_state(forget, cert["forget_set"]["sha256"])
    add_check(checks, "forget_set_history", state is not None and state == ids,
              "the certified forget set is this forget set or an earlier state of it")
    add_check(checks, "forget_set_checkpoint", forget["checkpoint_sha256"] == cert["checkpoint"]["base_sha256"])

    shared, n_layer = bool(cert["layers_share_sinks"]), int(cert["n_layer"])
    certified_rows = [cert["forgotten_rows"]] * n_layer if shared else cert["forgotten_rows"]
    for entry in cert["artifacts"]:
        cfg = model_config_from_meta({"model": entry["model"]}, entry["path"])
        union = forgotten_union(cfg, ids)
        counts_ok = [int(n) for n in union.sum(axis=1)] == entry["forgotten_rows_per_layer"]
        if SinkAssignment(cfg.sink_assignment_config()).describe() == cert["strategy"]:
            counts_ok = counts_ok and len(certified_rows) == union.shape[0] and all(
                np.nonzero(union[layer])[0].tolist() == sorted(certified_rows[layer]) for layer in range(n_layer))
        add_check(checks, f"artifact {entry['path']}: forgotten rows recompute", counts_ok,
                  "the union of the forget set's sinks under the artifact's sink assignment")
        _check_artifact(checks, entry, ids, deepspeed)

    if cert.get("run_dir"):
        certified = {Path(e["path"]) for e in cert["artifacts"]}
        try:
            lineage = L.discover(cert["run_dir"], [], deepspeed)
        except ValueError as exc:
            add_check(checks, "run_rescan", False, str(exc))
        else:
            base = next((e["model"] for e in cert["artifacts"] if e["kind"] == L.TRAINING_TAG), None)
            dirty, new = {}, [a for a in lineage.artifacts if a.path not in certified]
            for art in new:
                cfg = L.artifact_model(art, {"model": base}) if (art.meta or base) else None
                try:
                    found = _nonzero(art, cfg, forgotten_union(cfg, ids), deepspeed) if cfg else {"model": "unknown"}
                except ValueError as exc:
                    found = {"error": str(exc)}
                if found:
                    dirty[str(art.path)] = found
            add_check(checks, "uncertified_artifacts_rows_zero", not dirty and not lineage.strays,
                      f"non-zero forgotten rows in {dirty}; unknown files {[str(p) for p in lineage.strays][:5]}"
                      if dirty or lineage.strays else
                      f"{len(new)} artifact(s) written since the purge: {[str(a.path) for a in new][:5]}")
    check_collateral(checks, cert, Path(certificate_dir), manifest_dir)
    unchecked = []
    if manifest_dir is not None:
        got = manifest_digest(manifest_dir)
        add_check(checks, "manifest_sha256", got == cert["manifest"]["sha256"], f"got {got}")
    else:
        unchecked.append("the manifest digest and the collateral against the manifest (no --manifest)")
    return {"ok": all(c["ok"] for c in checks), "kind": "purge", "assurance": assurance, "unchecked": unchecked,
            "checks": checks}
