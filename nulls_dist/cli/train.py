"""`nulls-train`: the Hydra entry point (conf/nulls_train.yaml). Hydra stops here: the resolved config becomes a
typed `TrainConfig`, rank 0's copy is shared with every rank (so `${now:}` in run_dir agrees), and the trainer
gets plain values. Launch with one process (world size 1), `torchrun`, the `deepspeed` launcher or SLURM `srun`.

Exit codes: 0 finished; 75 (`REQUEUE_EXIT_CODE`) checkpointed after SIGTERM/SIGUSR1, resumable; 2 bad input (a
config field, a data file, a checkpoint that does not match the run: one line on stderr, `cli.errors`); 1 failed.
`nulls-train --cfg job` prints the config the run will really use, without training: Hydra's resolved config
with the data fields the trainer takes from an existing dataset manifest replaced by the manifest's values, and
an `effective:` section (the model's full config, the step's layout on this world size, the resume point).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from nulls_dist.cli.errors import report_errors
from nulls_dist.formats import dataset as schema
from nulls_dist.data_pipeline.pipeline import data_config_from_dict, run_stages
from nulls_dist.train.config import DataSection, train_config_from_dict
from nulls_dist.train.distributed import (dist_env_from_environ, resolve_device, setup_distributed,
                                          teardown_distributed)
from nulls_dist.train.signals import StopFlag

log = logging.getLogger("nulls_dist.train")


def _share_from_rank0(raw: dict[str, Any], world_size: int) -> dict[str, Any]:
    if world_size == 1:
        return raw
    import torch.distributed as dist

    box = [raw]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def prepare_data(section: DataSection, is_main: bool):
    """Rank 0 runs the data pipeline's stages when the manifest is missing (the others wait at a barrier);
    every rank then opens the shards, with `exclude_sources` (ids, titles, @files) resolved to source ids."""
    import torch.distributed as dist

    from nulls_dist.train.data import open_data

    pipeline_cfg = data_config_from_dict(section.pipeline)
    data_dir = Path(pipeline_cfg.output_dir)
    manifest = data_dir / schema.MANIFEST_NAME
    if is_main and not manifest.is_file():
        if not section.prepare_if_missing:
            raise ValueError(f"data: no dataset manifest at {manifest} and data_loader.prepare_if_missing is false; "
                             "run `nulls-data` first")
        log.info("preparing data into %s (no manifest yet)", data_dir)
        run_stages(pipeline_cfg, ["all"])
    if dist.is_initialized():
        dist.barrier()
    if is_main:
        for keys, configured, value in data_fields_from_manifest(section.pipeline, schema.read_manifest(manifest)):
            log.warning("data.%s=%r, but the prepared dataset %s has %r: training uses the dataset as prepared "
                        "(rerun nulls-data to rebuild it)", ".".join(keys), configured, data_dir, value)
    exclude: tuple[int, ...] = ()
    if section.exclude_sources:
        from nulls_dist.data_pipeline.registry import SourceRegistry
        from nulls_dist.data_pipeline.selection import resolve_exclude_sources

        registry = SourceRegistry.open(data_dir / schema.REGISTRY_NAME)
        exclude = tuple(sorted(resolve_exclude_sources(section.exclude_sources, registry)))
    return open_data(data_dir, exclude)


def run(raw: dict[str, Any]) -> int:
    """Train from a resolved config given as plain containers; sets up and tears down the process group."""
    from nulls_dist.train.trainer import train

    cfg = train_config_from_dict(raw)  # fail on bad config before any process group exists
    stop = StopFlag().install()  # before the slow start-up, so an early pre-emption warning is not fatal
    env = dist_env_from_environ()
    logging.getLogger().setLevel(logging.INFO if env.is_main else logging.WARNING)
    device = resolve_device(cfg.device)
    setup_distributed(env, device)
    try:
        raw = _share_from_rank0(raw, env.world_size)
        cfg = train_config_from_dict(raw)
        return train(cfg, raw, env, device, prepare_data(cfg.data, env.is_main), stop)
    finally:
        stop.restore()
        teardown_distributed()


def data_fields_from_manifest(data: dict[str, Any], manifest: dict[str, Any]) -> list[tuple[tuple, Any, Any]]:
    """(keys, configured value, prepared value) of the data fields a prepared dataset fixes and the config
    contradicts: the trainer trains on the dataset as prepared."""
    prepared = {("packing", "context_length"): manifest["context_length"],
                ("packing", "mode"): manifest.get("packing", {}).get("mode"),
                ("tokenizer", "vocab_size"): manifest["tokenizer"]["vocab_size"],
                ("id_offset",): manifest.get("id_offset")}
    out = []
    for keys, value in prepared.items():
        node: Any = data
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if value is not None and node is not None and node != value:
            out.append((keys, node, value))
    return out


def effective_config(raw: dict[str, Any]) -> dict[str, Any]:
    """What `--cfg job` shows: the values this run would train with (see the module docstring)."""
    import copy

    from nulls_dist.train.checkpoint import find_resume_point

    cfg = train_config_from_dict(raw)
    out = copy.deepcopy(raw)
    effective: dict[str, Any] = {}
    data_dir = Path(data_config_from_dict(cfg.data.pipeline).output_dir)
    manifest_path = data_dir / schema.MANIFEST_NAME
    world = dist_env_from_environ().world_size
    if manifest_path.is_file():
        manifest = schema.read_manifest(manifest_path)
        replaced = []
        for keys, configured, value in data_fields_from_manifest(out["data"], manifest):
            node = out["data"]
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            replaced.append(f"data.{'.'.join(keys)}: config {configured!r} -> manifest {value!r}")
            node[keys[-1]] = value
        effective["data"] = {"manifest": str(manifest_path), "prepared": True, "from_manifest": replaced,
                             "train_shards": len(manifest["shards"])}
        from nulls_dist.data.loader import StreamLayout, default_num_streams
        from nulls_dist.model import NullTransformer  # noqa: F401 - validates the model config below
        from nulls_dist.train.trainer import build_model_config
        from nulls_dist.train.data import open_data

        handle = open_data(data_dir)
        ds = cfg.deepspeed
        global_batch = ds.global_batch or ds.micro_batch * ds.grad_accum * world
        streams = cfg.data.num_streams or default_num_streams(global_batch, handle.num_train_shards, world)
        layout = StreamLayout(streams, global_batch, ds.micro_batch, world, 0, cfg.data.num_workers)
        effective["step"] = {"world_size": world, "global_batch": global_batch, "num_streams": streams,
                             "grad_accum": layout.grad_accum, "micro_batch": ds.micro_batch}
        model_cfg = build_model_config(cfg, handle)
        effective["model"] = model_cfg.to_dict()
        from nulls_dist.train.table_sinks import uses_sharded_tables

        sharded = uses_sharded_tables(cfg, model_cfg)
        effective["sink_tables"] = {"mode": "sharded" if sharded else "dense", "rows_per_layer": model_cfg.n_sink,
                                    "table_bytes": model_cfg.n_layer * model_cfg.n_sink * 3 * model_cfg.n_embd * 4}
    else:
        effective["data"] = {"manifest": str(manifest_path), "prepared": False,
                             "note": "no dataset yet: the pipeline will prepare it with the data.* values above"}
    point = find_resume_point(cfg.checkpoint.resume, cfg.run_dir, cfg.checkpoint.start_over)
    effective["resume"] = str(point.tag_dir) if point else None
    out["effective"] = effective
    return out


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local-rank N`, which the deepspeed launcher appends (LOCAL_RANK is in the
    environment too) and which Hydra would reject as an override."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        elif not arg.startswith(("--local_rank=", "--local-rank=")):
            out.append(arg)
    return out


# A RuntimeError that nulls_dist raises itself is a resume mismatch (a checkpoint that does not fit this run):
# the user's to fix. torch's own RuntimeErrors keep their traceback (cli.errors).
_report_errors = report_errors("nulls-train", hydra=True, deliberate=(RuntimeError,))


@_report_errors
def main() -> None:
    result: dict[str, int] = {}  # Hydra's main returns nothing: the exit code comes back through here
    argv = strip_launcher_args(sys.argv[1:])
    show = "--cfg" in argv and argv[argv.index("--cfg") + 1:argv.index("--cfg") + 2] == ["job"]
    if show:  # our own `--cfg job`: Hydra's would print data.* values the trainer replaces by the manifest's
        cut = argv.index("--cfg")
        argv = argv[:cut] + [a for a in argv[cut + 2:] if a != "--resolve"]
    sys.argv = [sys.argv[0], *argv]

    @hydra.main(config_path="pkg://nulls_dist.conf", config_name="nulls_train", version_base="1.3")
    @_report_errors
    def _hydra_main(cfg: DictConfig) -> None:
        raw = OmegaConf.to_container(cfg, resolve=True)
        if show:
            print(OmegaConf.to_yaml(OmegaConf.create(effective_config(raw))), end="")
            result["code"] = 0
            return
        result["code"] = run(raw)

    _hydra_main()
    sys.exit(result.get("code", 0))


if __name__ == "__main__":
    main()
