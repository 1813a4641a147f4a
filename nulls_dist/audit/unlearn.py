"""Forget sets, the two unlearning methods and their audit certificates.

- `resolve_sources`: ids and titles -> manifest records; every unknown one is reported at once (ValueError),
  before anything is written.
- A forget set (JSON) is cumulative: each request adds sources and appends its resulting hash to `history`,
  so successive requests compose and an older certificate still verifies against a later forget set.
- `mask` (the paper's method) changes no weight: deployment activates the routed source's sinks minus the
  union of the forgotten sources' sinks. `hard` writes a new deployed checkpoint whose forgotten sink rows are
  zero in every layer (gate, up and down tables); every source sharing such a row loses capacity. A run trained
  with sharded sink tables is copied block by block and its rows' optimizer state is zeroed too (`hard.py`).
- The certificate lists the request's sources and their sink indices, the checkpoint / manifest / forget-set
  digests, the method, the UTC time and the collateral of the cumulative forget set: every other trained
  source that shares a forgotten sink, in a Parquet sidecar beside the certificate (`collateral.py`) that the
  certificate pins by sha256 and row count, with an inline summary. `verify` re-checks all of it.
- Certificate version 3 follows manifest version 2: when every layer uses the same mask the certificate says
  `layers_share_sinks: true` and each source's `sinks` and the `forgotten_rows` are one list of pool units
  that holds in every layer (layer-specific: one list per layer, as before). `verify` expands them to every
  layer and checks each layer against the checkpoint's assignment.
- Certificate version 4 adds `survivors_retained_share`: the survivors' mean, worst and 1st-percentile share of
  their sinks that the cumulative forget set leaves them (`retained.py`), which `verify` recomputes.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from nulls_dist.audit.hard import write_hard_lazy
from nulls_dist.deploy.checkpoint_io import LoadedCheckpoint, save_deployed, sink_table_keys
from nulls_dist.deploy.forget import base_checkpoint_sha256
from nulls_dist.formats.weights import state_dict_digest
from nulls_dist.audit.collateral import forget_sinks, sidecar_path, write_collateral
from nulls_dist.audit.retained import RetainedShareOptions, survivors_retained_share
from nulls_dist.formats import atomic
from nulls_dist.formats.digests import canonical_json, json_sha256
from nulls_dist.formats.documents import read_json_object
from nulls_dist.formats.forget_set import (FORGET_SET_FORMAT, FORGET_SET_VERSION, check_forget_set,
                                          forget_set_hash, load_forget_set)
from nulls_dist.audit.manifest import iter_manifest, manifest_digest, read_index, read_records

CERTIFICATE_FORMAT = "nulls-unlearning-certificate"
# 2: collateral in a Parquet sidecar; 3: shared sink lists stored once (+ the flag); 4: survivors' retained share
CERTIFICATE_VERSION = 4
METHODS = ("mask", "hard")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class SourceRecord:
    source_id: int
    title: str
    trained: bool
    tokens: int
    sinks: list  # ascending pool units (every layer), or one such list per layer when layer-specific
    sink_digest: str  # hex


# --------------------------------------------------------------------------------------------- resolution
def parse_requests(items: Iterable[str], file: str | Path | None = None) -> list[str]:
    """Request strings from the command line and/or a file (one per line, `#` comments, blanks skipped)."""
    out = [str(x).strip() for x in items if str(x).strip()]
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"sources file not found: {path}")
        out += [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not out:
        raise ValueError("no sources given: pass source ids, titles or a file of them")
    return out


def _split_request(item: str) -> tuple[str, Any]:
    """`id:123` / `title:Foo` force a kind; a bare integer is an id, anything else a title."""
    if item.startswith("id:"):
        return "id", int(item[3:])
    if item.startswith("title:"):
        return "title", item[6:]
    return ("id", int(item)) if item.lstrip("-").isdigit() else ("title", item)


def resolve_sources(manifest_dir: str | Path, requests: list[str]) -> list[SourceRecord]:
    """Manifest records for every request; ValueError listing every unknown or untrained one."""
    wanted_ids, wanted_titles = set(), set()
    for item in requests:
        kind, value = _split_request(item)
        (wanted_ids if kind == "id" else wanted_titles).add(value)
    # pass 1 over the two small columns; pass 2 reads the full records of the hits only
    seen_ids, seen_titles = set(), set()
    for batch in iter_manifest(manifest_dir, columns=["source_id", "title"]):
        hit = pc.or_(pc.is_in(batch.column("source_id"), pa.array(sorted(wanted_ids), pa.int64())),
                     pc.is_in(batch.column("title"), pa.array(sorted(wanted_titles), pa.string())))
        sub = batch.filter(hit)
        seen_ids.update(sub.column("source_id").to_pylist())
        seen_titles.update(sub.column("title").to_pylist())
    cols = ["title", "trained", "tokens", "sinks", "sink_digest"]
    found = {row["source_id"]: SourceRecord(row["source_id"], row["title"], row["trained"], row["tokens"],
                                            row["sinks"], row["sink_digest"].hex())
             for row in read_records(manifest_dir, seen_ids, cols).to_pylist()}
    unknown = sorted(f"id:{i}" for i in wanted_ids - seen_ids) + sorted(f"title:{t}" for t in wanted_titles - seen_titles)
    untrained = sorted(f"{r.source_id} ({r.title})" for r in found.values() if not r.trained)
    problems = []
    if unknown:
        problems.append(f"unknown source(s) not in the manifest {manifest_dir}: {unknown}")
    if untrained:
        problems.append(f"source(s) never trained on (holdout or excluded), nothing to unlearn: {untrained}")
    if problems:  # every problem of the request in one error, before anything is written
        raise ValueError("; ".join(problems))
    return [found[k] for k in sorted(found)]


# --------------------------------------------------------------------------------------------- forget sets
def load_json_document(path: str | Path, expected_format: str, what: str) -> dict[str, Any]:
    """Read a JSON document of ours (forget set, certificate), checking its `format` field."""
    path = Path(path)
    doc = read_json_object(path, what)
    if doc.get("format") != expected_format:
        raise ValueError(f"{path}: not {what} (format {doc.get('format')!r})")
    return doc


def compose_forget_set(existing: dict[str, Any] | None, records: list[SourceRecord], checkpoint_sha256: str,
                       manifest_sha256: str, method: str) -> dict[str, Any]:
    """The forget set after adding `records` (a new document; the caller writes it)."""
    if existing is not None:
        for field, value in (("checkpoint_sha256", checkpoint_sha256), ("manifest_sha256", manifest_sha256)):
            if existing[field] != value:
                raise ValueError(f"forget set {field}={existing[field]} differs from this request's {value}")
    ids = dict(existing["sources"]) if existing else {}
    ids = {int(k): v for k, v in ids.items()}
    added = [r.source_id for r in records if r.source_id not in ids]
    ids.update({r.source_id: r.title for r in records})
    digest = forget_set_hash(ids, checkpoint_sha256, manifest_sha256)
    history = list(existing["history"]) if existing else []
    history.append({"time_utc": _now(), "method": method, "added": added, "sha256": digest})
    return check_forget_set({"format": FORGET_SET_FORMAT, "version": FORGET_SET_VERSION,
                             "checkpoint_sha256": checkpoint_sha256, "manifest_sha256": manifest_sha256,
                             "source_ids": sorted(ids), "sources": {str(k): ids[k] for k in sorted(ids)},
                             "sha256": digest, "history": history})


# --------------------------------------------------------------------------------------------- rows
def forgotten_rows(manifest_dir: str | Path, source_ids: Iterable[int]) -> np.ndarray:
    """(L, P) bool: the union of the given sources' sink rows in every layer (from the manifest)."""
    return forget_sinks(manifest_dir, source_ids).union


def zero_rows(state_dict: dict[str, torch.Tensor], union: np.ndarray) -> dict[str, torch.Tensor]:
    """A copy of the state dict with the union's rows zeroed in every layer's three sink tables."""
    out = dict(state_dict)
    for layer in range(union.shape[0]):
        rows = torch.from_numpy(np.nonzero(union[layer])[0])
        for key in sink_table_keys(layer):
            table = state_dict[key].clone()
            table[rows] = 0
            out[key] = table
    return out


# --------------------------------------------------------------------------------------------- paths
def protected_paths(ckpt: LoadedCheckpoint, manifest_dir: Path) -> dict[str, Path]:
    """What an unlearning request must never write into: the input checkpoint (its training run's checkpoints
    directory, for a training checkpoint) and the manifest."""
    out = {"the input checkpoint": ckpt.path.resolve(), "the manifest": manifest_dir.resolve()}
    if ckpt.kind == "training":
        out["the training run's checkpoints"] = ckpt.path.resolve().parent
        out["the training run directory"] = ckpt.path.resolve().parent.parent
    return out


def check_output_paths(ckpt: LoadedCheckpoint, manifest_dir: Path, forget_set_path: Path, certificate_path: Path,
                       output_checkpoint: Path | None) -> None:
    """ValueError naming the option when an output would clobber another output, the checkpoint or the
    manifest, or overwrite an earlier certificate (certificates are never rewritten: one per request)."""
    outputs = {"--forget-set": forget_set_path.resolve(), "--certificate": certificate_path.resolve(),
               "the collateral sidecar": sidecar_path(certificate_path).resolve()}
    if output_checkpoint is not None:
        outputs["--output"] = output_checkpoint.resolve()
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if outputs[a] == outputs[b] or outputs[b] in outputs[a].parents or outputs[a] in outputs[b].parents:
                raise ValueError(f"{a} {outputs[a]} and {b} {outputs[b]} would overwrite each other")
    for name, path in outputs.items():
        for what, guarded in protected_paths(ckpt, manifest_dir).items():
            inside = path == guarded or guarded in path.parents
            # the run directory itself may hold the forget set and certificates, never a checkpoint directory
            if what == "the training run directory":
                inside = name == "--output" and (path == guarded or path in guarded.parents)
            if inside:
                raise ValueError(f"{name} {path} would write into {what} ({guarded}); choose a path outside it")
    for name in ("--certificate", "the collateral sidecar"):
        if outputs[name].exists():
            raise ValueError(f"{name} {outputs[name]} exists: certificates are never overwritten (one per request); "
                             "choose a new path")
    out = outputs.get("--output")
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--output {out} exists and is not an empty directory; nothing is overwritten")


# --------------------------------------------------------------------------------------------- signing
SIGNATURE_ALG = "HMAC-SHA256"


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"nulls-key-id:" + key).hexdigest()[:16]


def sign(cert: dict[str, Any], key: bytes) -> dict[str, str]:
    """An HMAC-SHA256 signature over the certificate's canonical JSON (every field but the signature)."""
    body = {k: v for k, v in cert.items() if k != "signature"}
    return {"alg": SIGNATURE_ALG, "key_id": key_id(key),
            "value": hmac.new(key, canonical_json(body), hashlib.sha256).hexdigest()}


def seal(cert: dict[str, Any], signing_key: bytes | None) -> None:
    """Seal a certificate in place: its `certificate_sha256`, then (with a key) its HMAC signature."""
    cert["certificate_sha256"] = json_sha256(cert)
    if signing_key is not None:
        cert["signature"] = sign(cert, signing_key)


def read_signing_key(path: str | Path) -> bytes:
    """A signing key file (raw bytes; at least 16). Keep it away from the people whose requests it signs."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"signing key file not found: {path}")
    key = path.read_bytes().strip()
    if len(key) < 16:
        raise ValueError(f"signing key {path} holds {len(key)} bytes; use at least 16 random bytes")
    return key


# --------------------------------------------------------------------------------------------- unlearn
def unlearn(ckpt: LoadedCheckpoint, manifest_dir: str | Path, requests: list[str], method: str,
            forget_set_path: str | Path, certificate_path: str | Path,
            output_checkpoint: str | Path | None = None, signing_key: bytes | None = None,
            retained_opts: RetainedShareOptions | None = None) -> dict[str, Any]:
    """Resolve, compose the forget set, (hard: write the zeroed checkpoint), write the certificate (signed
    with `signing_key` when given). Nothing is written unless every check passes."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "hard" and output_checkpoint is None:
        raise ValueError("method 'hard' needs output_checkpoint (the directory of the new deployed checkpoint)")
    manifest_dir, forget_set_path, certificate_path = Path(manifest_dir), Path(forget_set_path), Path(certificate_path)
    check_output_paths(ckpt, manifest_dir, forget_set_path, certificate_path,
                       Path(output_checkpoint) if output_checkpoint is not None else None)
    index = read_index(manifest_dir)
    manifest_sha = manifest_digest(manifest_dir)
    digest = state_dict_digest(ckpt.state_dict)
    base = base_checkpoint_sha256(ckpt)
    if base != index["checkpoint_sha256"]:
        raise ValueError(f"checkpoint {ckpt.path} (base sha256 {base}) is not the checkpoint the manifest "
                         f"{manifest_dir} was built from ({index['checkpoint_sha256']})")
    records = resolve_sources(manifest_dir, requests)
    existing = load_forget_set(forget_set_path) if forget_set_path.exists() else None
    forget = compose_forget_set(existing, records, base, manifest_sha, method)
    forget_tables = forget_sinks(manifest_dir, forget["source_ids"])
    union = forget_tables.union
    shared = bool(index["layers_share_sinks"])
    forgotten = [np.nonzero(layer)[0].tolist() for layer in (union[:1] if shared else union)]
    cert: dict[str, Any] = {
        "format": CERTIFICATE_FORMAT, "version": CERTIFICATE_VERSION, "method": method, "time_utc": _now(),
        "layers_share_sinks": shared, "n_layer": int(index["n_layer"]),
        "sources": [{"source_id": r.source_id, "title": r.title, "tokens": r.tokens, "sinks": r.sinks,
                     "sink_digest": r.sink_digest} for r in records],
        "forget_set": {"path": str(forget_set_path), "sha256": forget["sha256"], "source_ids": forget["source_ids"]},
        "checkpoint": {"path": str(ckpt.path), "sha256": digest, "base_sha256": base},
        "manifest": {"path": str(manifest_dir), "sha256": manifest_sha},
        "strategy": index["strategy"],
        "forgotten_rows": forgotten[0] if shared else forgotten,
        "survivors_retained_share": survivors_retained_share(manifest_dir, forget_tables, retained_opts),
    }
    sidecar = sidecar_path(certificate_path)
    tmp_sidecar, summary = write_collateral(manifest_dir, forget_tables, sidecar)
    try:
        cert["collateral"] = {
            "meaning": "trained sources outside the (cumulative) forget set sharing >= 1 forgotten sink; one row "
                       "each in the Parquet sidecar `file` (beside this certificate), `top` by shared rows",
            **summary}
        if method == "hard":
            meta = {**ckpt.meta, "unlearning": {"method": "hard", "base_checkpoint_sha256": base,
                                                "forget_set_sha256": forget["sha256"], "time_utc": cert["time_utc"]}}
            if ckpt.lazy:  # sharded-table run: streamed copy; rows and their optimizer state zeroed (hard.py)
                output_sha = write_hard_lazy(ckpt, union, output_checkpoint, meta)
            else:
                state = zero_rows(ckpt.state_dict, union)
                save_deployed(output_checkpoint, state, meta)
                output_sha = state_dict_digest(state)
            cert["output_checkpoint"] = {"path": str(output_checkpoint), "sha256": output_sha}
            cert["collateral"]["meaning"] += " (hard: each loses `shared_rows` sink rows of capacity)"
        seal(cert, signing_key)
        # the sidecar, forget set and certificate land only after every check above passed
        atomic.commit(tmp_sidecar, sidecar)
    finally:
        tmp_sidecar.unlink(missing_ok=True)
    atomic.write_json(forget_set_path, forget)
    atomic.write_json(certificate_path, cert)
    return cert
