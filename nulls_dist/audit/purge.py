"""`nulls-unlearn purge`: rewrite (or remove) every artifact of a run that holds the forgotten sources' sink rows,
so that those rows and their optimizer state are zero in every file, and certify it.

The mask method changes no weight, and training checkpoints hold the rows with their fp32 masters and Adam
moments (docs/reliability.md, "The threat model"). Purge takes the cumulative forget set (every source of it:
the forgotten rows are the union of their sinks, shared rows included -- the same rows the mask never activates,
so survivors lose in their Sink-On capacity exactly what they already lose in Sink-Off) and, for every artifact
`lineage.discover` finds:

- a directory artifact (training tag, universal tag, deployed checkpoint) is staged complete in a hidden sibling
  (unchanged files hard-linked, rewritten files written new, `nulls_meta.json` last with the `purge` record) and
  swapped in by renames (`atomic.replace_directory`): the old bytes stay until the new directory is in place, and
  a rerun finishes an interrupted swap;
- an export file is rewritten through a temporary name and renamed;
- with `remove=True` each artifact is removed instead (`atomic.remove_path`), and `latest` is repointed at the
  newest remaining complete tag (or removed with the last one).

A run trained with sharded sink tables (the meta's `sink_tables` record) has a `sink_tables/` DCP directory in
every tag (and in a hard-deployed copy): it is staged with the forgotten rows and their optimizer state zero
(`deploy.sink_tables_dcp.zero_sink_table_rows`, through its restricted readers); its `model.safetensors` (the
whole model) is rewritten streaming, never loaded whole (`formats.weights.copy_zeroing_rows`); its DeepSpeed files
hold no sink rows (the engine has external sink storage), which is checked by parsing them as that engine's, and
they are kept with the reason in the certificate.

Nothing is written until every artifact has been parsed and every problem (an unknown file, a file of
`sink_tables/` its index does not list, an artifact of another dataset) is known: problems stop the purge,
listing each by name, unless `remove_unrewritable=True` removes them. The certificate (`nulls-purge-certificate`) lists every artifact and
every file of it with its sha256 before and after, the elements zeroed per role (module weights, fp32 master,
exp_avg, exp_avg_sq; table_rows, table_state for sink-table files), the forgotten rows, the collateral (a Parquet sidecar as in unlearning certificates) and
its own sha256 (HMAC-signed with a key when given); `purge_verify.verify_purge` re-checks all of it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nulls_dist.audit import lineage as L
from nulls_dist.audit.collateral import forget_sinks, sidecar_path, write_collateral
from nulls_dist.audit.manifest import manifest_digest, read_index
from nulls_dist.audit.unlearn import seal
from nulls_dist.config import NullConfig
from nulls_dist.deploy.checkpoint_io import sink_table_keys
from nulls_dist.formats import atomic
from nulls_dist.formats import checkpoint as layout
from nulls_dist.formats.digests import file_sha256
from nulls_dist.formats.forget_set import check_belongs_to, load_forget_set
from nulls_dist.deploy.sink_tables_dcp import check_sink_tables, tensor_role, zero_sink_table_rows
from nulls_dist.formats.weights import (WeightsError, WeightsFile, copy_zeroing_rows, load_weights, save_weights,
                                        state_dict_digest)
from nulls_dist.sinks import SinkAssignment

log = logging.getLogger(__name__)

PURGE_CERTIFICATE_FORMAT = "nulls-purge-certificate"
PURGE_CERTIFICATE_VERSION = 1
TABLE_ROLES = {"rows": "table_rows", "state": "table_state"}  # a sink-table tensor's role in the certificate


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------ rows
def forgotten_union(model_cfg: NullConfig, source_ids: list[int]) -> np.ndarray:
    """(L, P) bool: the union of the sources' sink rows in every layer under this model's sink assignment."""
    assignment = SinkAssignment(model_cfg.sink_assignment_config())
    union = np.zeros((model_cfg.n_layer, model_cfg.n_sink), dtype=bool)
    ids = torch.tensor(sorted(source_ids), dtype=torch.int64)
    for layer in range(model_cfg.n_layer):
        rows = assignment.rows(ids, layer).numpy()  # (F, K), -1 padded
        union[layer, rows[rows >= 0]] = True
    return union


def _known_keys(cfg: NullConfig) -> tuple[set[str], set[str]]:
    """NullTransformer state-dict keys and litgpt keys of this model (shapes on the meta device: no memory)."""
    from nulls_dist.litgpt_io import null_to_litgpt_state_dict
    from nulls_dist.model import NullTransformer

    with torch.device("meta"):
        state = NullTransformer(cfg).state_dict()
    return set(state), set(null_to_litgpt_state_dict(state, cfg))


def export_row_map(keys: list[str], cfg: NullConfig, union: np.ndarray) -> dict[str, tuple[int, np.ndarray]]:
    """{key: (dim, indices)} of the forgotten rows in a state dict keyed by NullTransformer or litgpt names;
    ValueError naming the first key that is neither (an export purge cannot read for sure)."""
    ours, litgpt = _known_keys(cfg)
    unknown = [k for k in keys if k not in ours and k not in litgpt]
    if unknown:
        raise ValueError(f"tensor(s) {unknown[:5]} are neither NullTransformer nor litgpt names of this model")
    rows = {k: (0, v) for k, v in L.sink_rows(union).items()}
    rows.update(L.litgpt_rows(union, cfg.n_backbone))
    return {k: rows[k] for k in keys if k in rows}


def zero_state_rows(state: dict[str, torch.Tensor], row_map: dict[str, tuple[int, np.ndarray]]) -> dict[str, int]:
    """Zero the mapped rows (or columns) in place; returns key -> elements that were non-zero."""
    out = {}
    for key, (dim, index) in row_map.items():
        if not len(index):
            continue
        picked = torch.as_tensor(index, dtype=torch.int64)
        count = int(torch.count_nonzero(state[key].index_select(dim, picked)))
        if count:
            state[key].index_fill_(dim, picked, 0)
            out[key] = count
    return out


def nonzero_state_rows(state: dict[str, torch.Tensor], row_map: dict[str, tuple[int, np.ndarray]]) -> dict[str, int]:
    out = {}
    for key, (dim, index) in row_map.items():
        if len(index):
            count = int(torch.count_nonzero(state[key].index_select(dim, torch.as_tensor(index, dtype=torch.int64))))
            if count:
                out[key] = count
    return out


# ------------------------------------------------------------------------------------------------ exports
def read_export(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """(tensors, safetensors metadata) of an export file; a torch-saved file is read with the restricted
    unpickler (weights_only) and must be a flat dict of tensors."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        state = load_weights(path)
        with safe_open(str(path), framework="pt") as f:
            return state, f.metadata()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure of the restricted unpickler means "not a weights dict"
        raise WeightsError(f"{path}: not a torch-saved dict of tensors the restricted unpickler reads ({exc})") \
            from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise WeightsError(f"{path}: not a flat dict of tensors (a state dict) that purge can rewrite")
    return state, None


def write_export(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    if path.suffix == ".safetensors":
        save_weights(path, state, metadata)
    else:
        with atomic.atomic_path(path) as tmp:
            torch.save(state, tmp)


# ------------------------------------------------------------------------------------------------ checks
def _binding(forget: dict[str, Any], manifest_dir: Path, forget_path: Path) -> dict[str, Any]:
    index = read_index(manifest_dir)
    check_belongs_to(forget, index["checkpoint_sha256"], manifest_digest(manifest_dir), where=forget_path)
    return index


def _foreign(art: L.Artifact, index: dict[str, Any]) -> str | None:
    """Why an artifact's source ids may not name the manifest's sources (None when they do)."""
    if art.meta is None:
        return None
    want, have = index.get("data_manifest_sha256"), art.meta.get("data_manifest_sha256")
    if want and have and want != have:
        return (f"trained on another dataset (data_manifest_sha256 {have[:16]}... != the manifest's "
                f"{want[:16]}...): its source ids name other articles; purge it with its own forget set")
    return None


def _base_meta(lineage: L.Lineage, index: dict[str, Any]) -> dict[str, Any] | None:
    """The meta whose model and sink assignment the manifest describes (for artifacts without a meta)."""
    for art in lineage.artifacts:
        if art.meta is not None and art.meta.get("sinks") == index["strategy"] and _foreign(art, index) is None:
            return art.meta
    return None


def _check_outputs(certificate_path: Path, lineage: L.Lineage) -> None:
    for path in (certificate_path, sidecar_path(certificate_path)):
        if path.exists():
            raise ValueError(f"{path} exists: certificates are never overwritten (one per request); choose a new path")
    resolved = certificate_path.resolve()
    guarded = [a.path for a in lineage.artifacts]
    guarded += layout.run_checkpoint_dirs(lineage.run_dir) if lineage.run_dir is not None else []
    for path in guarded:
        if resolved == path or path in resolved.parents:
            raise ValueError(f"--certificate {resolved} would be written into {path}, an artifact purge rewrites; "
                             "choose a path outside it")


# ------------------------------------------------------------------------------------------------ rewriting
def _file_entries(directory: Path, rels: list[str]) -> dict[str, str]:
    return {rel: file_sha256(directory / rel) for rel in rels}


def _purge_record(meta: dict[str, Any], forget: dict[str, Any], weights_sha: str | None) -> dict[str, Any]:
    old = meta.get(layout.PURGE_KEY) or {}
    ids = sorted(set(layout.purged_sources(meta)) | set(forget["source_ids"]))
    history = list(old.get("history", []))
    history.append({"time_utc": _now(), "forget_set_sha256": forget["sha256"],
                    "added": sorted(set(ids) - set(layout.purged_sources(meta)))})
    original = old.get("original_sha256") or (meta.get("unlearning") or {}).get("base_checkpoint_sha256") \
        or weights_sha
    return {"source_ids": ids, "original_sha256": original, "history": history}


def _rewrite_directory(art: L.Artifact, cfg: NullConfig, union: np.ndarray, forget: dict[str, Any],
                       deepspeed: L.DeepSpeedFiles, drop: list[str]) -> dict[str, Any]:
    """Stage the purged copy of a directory artifact, then swap it in; returns its certificate entry."""
    before = _file_entries(art.path, sorted(set(art.files) | set(drop)))
    staged = atomic.temp_sibling(art.path)
    staged.mkdir()
    files: dict[str, dict[str, Any]] = {}
    weights_sha: dict[str, str] = {}
    try:
        if art.of_role("sink_tables"):
            log.info("purging the sink tables of %s (rows and optimizer state)", art.path)
            files.update(_rewrite_sink_tables(art, union, staged))
        ds_files = art.of_role("deepspeed")
        if ds_files and art.sharded:
            files.update(_keep_sharded_deepspeed(art, cfg, deepspeed))
        elif ds_files:
            log.info("purging %d DeepSpeed files of %s", len(ds_files), art.path)
            for rel, result in deepspeed.rewrite(art.path, ds_files, L.sink_rows(union), cfg, staged).items():
                files[rel] = {"zeroed": result["zeroed"], "roles": result["roles"]}
        for rel in art.of_role("weights"):
            if art.sharded:  # a sharded-table run's whole model: streamed, never loaded whole
                files[rel] = _rewrite_weights_streamed(art.path / rel, staged / rel, L.sink_rows(union), weights_sha)
                continue
            state = load_weights(art.path / rel)
            weights_sha["old"] = state_dict_digest(state)
            zeroed = zero_state_rows(state, {k: (0, v) for k, v in L.sink_rows(union).items()})
            weights_sha["new"] = state_dict_digest(state)
            if zeroed:
                save_weights(staged / rel, state)
            files[rel] = {"zeroed": {"module": sum(zeroed.values())} if zeroed else {}, "roles": ["module"]}
        for rel, role in art.files.items():
            if role != "meta" and not (staged / rel).exists():
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                try:
                    (staged / rel).hardlink_to(art.path / rel)  # unchanged: the same bytes, no copy
                except OSError:
                    shutil.copy2(art.path / rel, staged / rel)
            files.setdefault(rel, {"zeroed": {}, "roles": []})
        if art.meta is not None:
            meta = {k: v for k, v in art.meta.items() if k not in ("format", "files")}
            meta[layout.PURGE_KEY] = _purge_record(art.meta, forget, weights_sha.get("old"))
            layout.write_meta(staged, meta)
            files[layout.META_NAME] = {"zeroed": {}, "roles": []}
        written = {rel for rel in files if files[rel]["zeroed"] or rel == layout.META_NAME or
                   art.files.get(rel) == "sink_tables"}  # the sink-table copy is written whole (copied, edited)
        after = {rel: file_sha256(staged / rel) if rel in written else before[rel] for rel in files}
        atomic.replace_directory(staged, art.path)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    entries = []
    for rel, info in sorted(files.items()):
        changed = rel == layout.META_NAME or after[rel] != before.get(rel)
        entry = {"file": rel, "old_sha256": before.get(rel), "new_sha256": after[rel],
                 "action": "rewritten" if info["zeroed"] else ("updated" if changed else "kept"),
                 "zeroed": info["zeroed"], "roles": info["roles"]}
        entries.append({**entry, **{k: info[k] for k in ("tensors", "reason") if k in info}})
    entries += [{"file": rel, "old_sha256": before[rel], "new_sha256": None, "action": "removed", "zeroed": {},
                 "roles": [], "reason": art.problems.get(rel, "")} for rel in sorted(drop)]
    out = {"files": entries, "zeroed": _totals(entries)}
    if weights_sha:
        out["weights_state_sha256"] = weights_sha
    return out


def _rewrite_sink_tables(art: L.Artifact, union: np.ndarray, staged: Path) -> dict[str, dict[str, Any]]:
    """The staged copy of the artifact's `sink_tables/` with the forgotten rows zero in every table and every
    optimizer-state tensor (`deploy.sink_tables_dcp.zero_sink_table_rows`); its certificate lines per file: the
    elements zeroed per role (`table_rows`, `table_state`) and per tensor the rows and elements."""
    units = {layer: np.nonzero(union[layer])[0] for layer in range(union.shape[0])}
    zeroed = zero_sink_table_rows(layout.sink_tables_dir(art.path), layout.sink_tables_dir(staged), units)
    out = {}
    for rel in art.of_role("sink_tables"):
        tensors = zeroed.get(rel.split("/", 1)[1], {})
        totals: dict[str, int] = {}
        for key, counts in tensors.items():
            role = TABLE_ROLES[tensor_role(key)]
            totals[role] = totals.get(role, 0) + counts["elements"]
        out[rel] = {"zeroed": totals, "roles": sorted(totals), "tensors": tensors} if tensors else \
            {"zeroed": {}, "roles": []}
    return out


def _keep_sharded_deepspeed(art: L.Artifact, cfg: NullConfig, deepspeed: L.DeepSpeedFiles) -> dict[str, Any]:
    """A sharded-table run's DeepSpeed files hold no sink rows (the engine is built with external sink storage):
    confirmed by parsing every file completely as that engine's (any sink-table element refuses the file by
    name), then kept as they are."""
    files = art.of_role("deepspeed")
    params = deepspeed.params(art.path, files, cfg, external_sinks=True)
    sinks = sorted(set(params) & {key for layer in range(cfg.n_layer) for key in sink_table_keys(layer)})
    if sinks:  # the engine's table excludes them, so parsing refused them already; stated for the reader
        raise ValueError(f"{art.path}: DeepSpeed's files hold the sink tables {sinks[:3]} in a sharded-table run")
    reason = (f"a sharded-table run's DeepSpeed engine holds no sink rows: every file parsed (restricted "
              f"unpickler) holds elements of {len(params)} parameters, none a sink table (those are in "
              f"{layout.SINK_TABLES_DIR}/)")
    log.info("keeping the %d DeepSpeed files of %s: %s", len(files), art.path, reason)
    return {rel: {"zeroed": {}, "roles": [], "reason": reason} for rel in files}


def _rewrite_weights_streamed(source: Path, target: Path, rows: dict[str, np.ndarray],
                              weights_sha: dict[str, str]) -> dict[str, Any]:
    """Our `model.safetensors` of a sharded-table run: the forgotten rows counted through the memory map, the
    copy written block by block (`formats.weights.copy_zeroing_rows`) only when any was non-zero; both content
    digests streamed into `weights_sha`."""
    from safetensors import safe_open

    weights = WeightsFile(source)
    zeroed = {key: n for key, index in rows.items() if len(index) and
              (n := int(torch.count_nonzero(weights.rows(key, index))))}
    weights_sha["old"] = weights.digest()
    if zeroed:
        with safe_open(str(source), framework="pt") as f:
            metadata = f.metadata()
        copy_zeroing_rows(weights, target, rows, metadata=metadata)
        weights_sha["new"] = WeightsFile(target).digest()
    else:
        weights_sha["new"] = weights_sha["old"]
    return {"zeroed": {"module": sum(zeroed.values())} if zeroed else {}, "roles": ["module"]}


def _rewrite_export(art: L.Artifact, cfg: NullConfig, union: np.ndarray) -> dict[str, Any]:
    old = file_sha256(art.path)
    state, metadata = read_export(art.path)
    zeroed = zero_state_rows(state, export_row_map(list(state), cfg, union))
    if zeroed:
        write_export(art.path, state, metadata)
    entry = {"file": art.path.name, "old_sha256": old, "new_sha256": file_sha256(art.path) if zeroed else old,
             "action": "rewritten" if zeroed else "kept", "zeroed": {"module": sum(zeroed.values())} if zeroed else {},
             "roles": ["module"]}
    return {"files": [entry], "zeroed": _totals([entry])}


def _totals(entries: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for entry in entries:
        for role, count in entry["zeroed"].items():
            out[role] = out.get(role, 0) + int(count)
    return out


def _validate(art: L.Artifact, cfg: NullConfig, union: np.ndarray, deepspeed: L.DeepSpeedFiles) -> None:
    """Parse everything purge will rewrite, writing nothing (errors name the file)."""
    if art.kind == L.EXPORT:
        state, _ = read_export(art.path)
        try:
            export_row_map(list(state), cfg, union)
        except ValueError as exc:
            raise ValueError(f"{art.path}: {exc}") from None
        return
    for rel in art.of_role("weights"):
        weights = WeightsFile(art.path / rel)  # parses and checks the header only
        missing = [k for k in L.sink_rows(union) if k not in weights]
        if missing:
            raise ValueError(f"{art.path / rel}: lacks the sink tables {missing[:3]} of its model")
        wrong = [k for k in weights if weights.dtype(k) != torch.float32]
        if art.sharded and wrong:
            raise ValueError(f"{art.path / rel}: {wrong[:3]} are not float32; a sharded-table run's weights are "
                             "rewritten streaming, which keeps float32 (as the trainer writes them) only")
    if art.of_role("sink_tables"):
        check_sink_tables(layout.sink_tables_dir(art.path), cfg.n_layer, cfg.n_sink)
    if art.of_role("deepspeed"):
        deepspeed.check(art.path, art.of_role("deepspeed"), cfg, external_sinks=art.sharded)


def _repoint_latest(ckpt_dirs: list[Path]) -> list[dict[str, Any]]:
    """After removals: `latest` names the newest complete remaining tag, or is removed with the last one."""
    out = []
    for ckpt_dir in ckpt_dirs:
        if not ckpt_dir.is_dir():
            continue
        named = None
        try:
            named = layout.read_latest(ckpt_dir)
        except layout.CheckpointError:
            pass
        if named is None or (ckpt_dir / named).is_dir():
            continue
        found = layout.resolve_latest(ckpt_dir).tag
        if found is None:
            atomic.remove_path(ckpt_dir / layout.LATEST_NAME)
        else:
            layout.write_latest(ckpt_dir, found)
        out.append({"dir": str(ckpt_dir), "before": named, "after": found})
    return out


# ------------------------------------------------------------------------------------------------ purge
@dataclasses.dataclass
class _Step:
    """What purge will do to one artifact (planned before anything is written)."""

    art: L.Artifact
    cfg: NullConfig
    union: np.ndarray  # (L, P) bool: its forgotten rows
    remove: bool  # the whole artifact goes
    drop: list[str]  # files of it that go (unrewritable, --remove-unrewritable)


def _plan(lineage: L.Lineage, index: dict[str, Any], manifest_dir: Path, manifest_union: np.ndarray,
          ids: list[int], deepspeed: L.DeepSpeedFiles, remove: bool, remove_unrewritable: bool) -> list[_Step]:
    """Every artifact's step, each parsed as it will be rewritten; ValueError (nothing written) for problems."""
    for art in lineage.artifacts:
        art.whole = art.whole or _foreign(art, index)
    base = _base_meta(lineage, index)
    if base is None and any(a.meta is None for a in lineage.artifacts):
        raise ValueError(f"no training tag or deployed checkpoint with the sink assignment of the manifest "
                         f"{manifest_dir} among the artifacts: the model of "
                         f"{[str(a.path) for a in lineage.artifacts if a.meta is None][:3]} is unknown; pass --run")
    problems = lineage.problems()
    if problems and not remove_unrewritable:
        raise ValueError(f"{len(problems)} thing(s) purge cannot rewrite (nothing was written; pass "
                         f"--remove-unrewritable to remove them): " + "; ".join(problems))
    steps = []
    for art in lineage.artifacts:
        cfg = L.artifact_model(art, base)
        union = forgotten_union(cfg, ids)
        if art.meta is not None and art.meta.get("sinks") == index["strategy"] and \
                not np.array_equal(union, manifest_union):
            raise ValueError(f"{art.path}: the forgotten rows under its sink assignment differ from the manifest's "
                             f"({manifest_dir}); the manifest does not describe this checkpoint")
        whole = remove or art.whole is not None
        if not whole:
            _validate(art, cfg, union, deepspeed)
        steps.append(_Step(art, cfg, union, whole, [] if whole else sorted(art.problems)))
    return steps


def _apply(step: _Step, forget: dict[str, Any], deepspeed: L.DeepSpeedFiles) -> dict[str, Any]:
    """Carry out one step; returns the artifact's certificate entry."""
    art = step.art
    entry = {"path": str(art.path), "kind": art.kind, "model": dataclasses.asdict(step.cfg),
             "forgotten_rows_per_layer": [int(n) for n in step.union.sum(axis=1)]}
    if step.remove:
        rels = sorted(set(art.files) | set(art.problems)) if art.path.is_dir() else [art.path.name]
        root = art.path if art.path.is_dir() else art.path.parent
        entry.update(action="removed", reason=art.whole or "--remove", zeroed={},
                     files=[{"file": rel, "old_sha256": file_sha256(root / rel), "new_sha256": None,
                             "action": "removed", "zeroed": {}, "roles": []} for rel in rels])
        log.info("removing %s (%s)", art.path, entry["reason"])
        atomic.remove_path(art.path)
        return entry
    for rel in step.drop:
        log.warning("removing %s: %s", art.path / rel, art.problems[rel])
    log.info("purging %s (%s)", art.path, art.kind)
    body = _rewrite_export(art, step.cfg, step.union) if art.kind == L.EXPORT else \
        _rewrite_directory(art, step.cfg, step.union, forget, deepspeed, step.drop)
    entry.update(action="rewritten" if body["zeroed"] else "unchanged", **body)
    return entry


def _remove_strays(lineage: L.Lineage) -> list[dict[str, Any]]:
    out = []
    for path in sorted(lineage.strays):
        out.append({"path": str(path), "reason": lineage.strays[path],
                    "old_sha256": file_sha256(path) if path.is_file() else None})
        log.warning("removing %s: %s", path, lineage.strays[path])
        atomic.remove_path(path)
    return out


def purge(run_dir: str | Path | None, paths: list[str | Path], manifest_dir: str | Path,
          forget_set_path: str | Path, certificate_path: str | Path, deepspeed: L.DeepSpeedFiles,
          remove: bool = False, remove_unrewritable: bool = False, signing_key: bytes | None = None) -> dict[str, Any]:
    """Purge (or with `remove`, delete) every artifact of the run and of `paths`; write the certificate."""
    manifest_dir, forget_set_path, certificate_path = Path(manifest_dir), Path(forget_set_path), Path(certificate_path)
    forget = load_forget_set(forget_set_path)
    index = _binding(forget, manifest_dir, forget_set_path)
    recovered = L.recover(Path(run_dir).resolve() if run_dir is not None else None,
                          [Path(p).resolve() for p in paths])
    for line in recovered:
        log.warning("%s", line)
    lineage = L.discover(run_dir, paths, deepspeed)
    if not lineage.artifacts:
        raise ValueError("no artifact to purge: pass --run RUN_DIR and/or artifact paths")
    _check_outputs(certificate_path, lineage)
    ids = forget["source_ids"]
    manifest_union = forget_sinks(manifest_dir, ids).union
    steps = _plan(lineage, index, manifest_dir, manifest_union, ids, deepspeed, remove, remove_unrewritable)

    shared = bool(index["layers_share_sinks"])
    forgotten = [np.nonzero(layer)[0].tolist() for layer in (manifest_union[:1] if shared else manifest_union)]
    sidecar = sidecar_path(certificate_path)
    tmp_sidecar, collateral = write_collateral(manifest_dir, forget_sinks(manifest_dir, ids), sidecar)
    try:
        entries = [_apply(step, forget, deepspeed) for step in steps]
        removed_strays = _remove_strays(lineage) if remove_unrewritable else []
        latest = _repoint_latest(layout.run_checkpoint_dirs(lineage.run_dir)) if lineage.run_dir else []
        cert: dict[str, Any] = {
            "format": PURGE_CERTIFICATE_FORMAT, "version": PURGE_CERTIFICATE_VERSION, "time_utc": _now(),
            "mode": "remove" if remove else "rewrite",
            "run_dir": str(lineage.run_dir) if lineage.run_dir else None,
            "forget_set": {"path": str(forget_set_path), "sha256": forget["sha256"], "source_ids": ids},
            "manifest": {"path": str(manifest_dir), "sha256": forget["manifest_sha256"]},
            "checkpoint": {"base_sha256": forget["checkpoint_sha256"]},
            "strategy": index["strategy"], "layers_share_sinks": shared, "n_layer": int(index["n_layer"]),
            "forgotten_rows": forgotten[0] if shared else forgotten,
            "collateral": {"meaning": "trained sources outside the forget set sharing >= 1 forgotten sink: purge "
                                      "zeroes those rows too (each loses `shared_rows` rows of Sink-On capacity, "
                                      "rows its Sink-Off mode never used); one row each in the sidecar `file`",
                           **collateral},
            "artifacts": entries, "removed_strays": removed_strays, "latest": latest, "recovered": recovered,
        }
        seal(cert, signing_key)
        atomic.commit(tmp_sidecar, sidecar)
    finally:
        tmp_sidecar.unlink(missing_ok=True)
    atomic.write_json(certificate_path, cert, replace=False)
    return cert
