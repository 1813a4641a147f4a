"""`nulls-manifest`: the Hydra entry point (conf/unlearn/manifest.yaml) that post-processes a training
checkpoint into its per-source sink manifest. Hydra stops here: the config becomes plain arguments of
`build_manifest`. Stdout is the JSON summary (logs go to stderr); bad input is one line on stderr, exit code 2."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
import pyarrow.compute as pc
import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from nulls_dist.cli.errors import keep_stdout_for_output, report_errors
from nulls_dist.formats.dataset import REGISTRY_NAME, read_manifest
from nulls_dist.deploy.checkpoint_io import load_checkpoint
from nulls_dist.formats.weights import state_dict_digest
from nulls_dist.formats.digests import file_sha256
from nulls_dist.audit.manifest import ManifestOptions, build_manifest, iter_registry

log = logging.getLogger("nulls_dist.audit")


def resolve_registry_ids(registry: Path, items: list[Any]) -> list[int]:
    """Ids for a mixed list of ids and titles (as the trainer's `exclude_sources`); unknown -> ValueError."""
    ids = {int(x) for x in items if isinstance(x, int) or str(x).isdigit()}
    titles = {str(x) for x in items if not (isinstance(x, int) or str(x).isdigit())}
    found_ids, found_titles = set(), set()
    for batch in iter_registry(registry, 65_536):
        sid = batch.column("source_id")
        found_ids |= set(sid.filter(pc.is_in(sid, pa.array(sorted(ids), pa.int64()))).to_pylist())
        hit = pc.is_in(batch.column("title"), pa.array(sorted(titles), pa.string()))
        for s, t in zip(sid.filter(hit).to_pylist(), batch.column("title").filter(hit).to_pylist()):
            found_ids.add(s)
            found_titles.add(t)
    unknown = sorted(str(i) for i in ids - found_ids) + sorted(titles - found_titles)
    if unknown:
        raise ValueError(f"exclude_sources: not in the registry {registry}: {unknown}")
    return sorted(found_ids)


def check_data_belongs(ckpt, data_manifest: str | Path | None, registry: Path) -> str | None:
    """ValueError unless the data manifest and registry are the ones the checkpoint was trained on (digests
    recorded at training time), naming what differs: a dataset rebuilt after training may give a title another
    source id, and forgetting that id would forget the wrong article. Returns the data manifest's sha256."""
    meta = ckpt.meta
    trained_data, trained_registry = meta.get("data_manifest_sha256"), meta.get("registry_sha256")
    data_sha = None
    if data_manifest and Path(data_manifest).is_file():
        data_sha = file_sha256(data_manifest)
        if trained_data and data_sha != trained_data:
            raise ValueError(f"data manifest {data_manifest} (sha256 {data_sha[:16]}...) is not the one checkpoint "
                             f"{ckpt.path} was trained on ({trained_data[:16]}...): the dataset was rebuilt or "
                             "changed after training, so titles may map to other source ids")
        recorded = (read_manifest(data_manifest).get("registry") or {}).get("sha256")
        if recorded and file_sha256(registry) != recorded:
            raise ValueError(f"registry {registry} does not match the one data manifest {data_manifest} records "
                             f"({recorded[:16]}...)")
    if trained_registry and file_sha256(registry) != trained_registry:
        raise ValueError(f"registry {registry} is not the one checkpoint {ckpt.path} was trained with "
                         f"({trained_registry[:16]}...)")
    if not (trained_data or trained_registry):
        log.warning("checkpoint %s records no data digests: the registry cannot be checked against it", ckpt.path)
    return data_sha or trained_data


def run(raw: dict[str, Any]) -> dict[str, Any]:
    ckpt = load_checkpoint(raw["checkpoint"], raw.get("tag"))
    meta = ckpt.meta
    data_manifest = raw.get("data_manifest") or meta.get("data_manifest_path")
    registry = raw.get("registry")
    if registry is None:
        if not data_manifest:
            raise ValueError("registry: not given and the checkpoint meta names no data_manifest_path")
        doc = read_manifest(data_manifest)
        registry = Path(data_manifest).parent / (doc.get("registry") or {}).get("path", REGISTRY_NAME)
    registry = Path(registry)
    data_sha = check_data_belongs(ckpt, data_manifest, registry)
    exclude = raw.get("exclude_sources")
    exclude = list(meta.get("exclude_sources") or []) if exclude is None else list(exclude)
    opts = ManifestOptions(shard_rows=raw["shard_rows"], chunk_rows=raw["chunk_rows"], overlap=raw["overlap"],
                           overlap_sample=raw["overlap_sample"], exact_budget=raw["exact_budget"],
                           seed=raw["seed"], exclude_source_ids=resolve_registry_ids(registry, exclude),
                           workers=raw["workers"])
    if opts.workers > 1:
        torch.set_num_threads(1)  # the workers are the parallelism; intra-op threads in each would oversubscribe
    index = build_manifest(raw["out"], state_dict=ckpt.state_dict, model_cfg=ckpt.model_config,
                           registry_path=registry, checkpoint_sha256=state_dict_digest(ckpt.state_dict),
                           data_manifest_sha256=data_sha, checkpoint_path=str(ckpt.path), opts=opts)
    summary = {k: index[k] for k in ("num_sources", "num_trained", "checkpoint_sha256", "overlap")}
    summary["out"] = str(raw["out"])
    summary["shards"] = len(index["shards"])
    return summary


@hydra.main(config_path="pkg://nulls_dist.conf", config_name="unlearn/manifest", version_base="1.3")
@report_errors("nulls-manifest", hydra=True)
def _hydra_main(cfg: DictConfig) -> None:
    logging.getLogger().setLevel(logging.INFO)
    print(json.dumps(run(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)), indent=2))


@report_errors("nulls-manifest", hydra=True)
def main() -> None:
    keep_stdout_for_output()
    _hydra_main()


if __name__ == "__main__":
    main()
