"""`nulls-train`: the Hydra entry point (conf/nulls_train.yaml). Hydra stops here: the resolved config becomes a
typed `TrainConfig`, rank 0's copy is shared with every rank (so `${now:}` in run_dir agrees), and the trainer
gets plain values. Launch with one process (world size 1), `torchrun`, the `deepspeed` launcher or SLURM `srun`.

Exit codes: 0 finished; 75 (`REQUEUE_EXIT_CODE`) checkpointed after SIGTERM/SIGUSR1, resumable; 2 bad input (a
config field, a data file, a checkpoint that does not match the run: one line on stderr, `cli.errors`); 1 failed.
`nulls-train --cfg job` prints the resolved config (Hydra's built-in) without training.
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
    sys.argv = [sys.argv[0], *strip_launcher_args(sys.argv[1:])]

    @hydra.main(config_path="pkg://nulls_dist.conf", config_name="nulls_train", version_base="1.3")
    @_report_errors
    def _hydra_main(cfg: DictConfig) -> None:
        result["code"] = run(OmegaConf.to_container(cfg, resolve=True))

    _hydra_main()
    sys.exit(result.get("code", 0))


if __name__ == "__main__":
    main()
