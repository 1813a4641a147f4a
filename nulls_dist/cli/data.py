"""`nulls-data`: the Hydra entry point of the data pipeline. Composes `conf/nulls_data.yaml` (+ a `data`
group), turns it into a typed `DataConfig`, resolves relative paths against the directory it was started
from, and runs the requested stage(s): `nulls-data stage=all data=synthwiki`. Stdout is one JSON summary (logs go
to stderr); bad input is one line on stderr and exit code 2 (`cli.errors`)."""
from __future__ import annotations

import json

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from nulls_dist.cli.errors import keep_stdout_for_output, report_errors
from nulls_dist.data_pipeline.pipeline import DataConfig, data_config_from_dict, run_stages


def _absolute_paths(cfg: DataConfig) -> DataConfig:
    cfg.output_dir = to_absolute_path(cfg.output_dir)
    cfg.ingest.inputs = [i if i.startswith(("bundled:", "synthwiki:")) else to_absolute_path(i)
                         for i in cfg.ingest.inputs]
    if cfg.tokenizer.model_path:
        cfg.tokenizer.model_path = to_absolute_path(cfg.tokenizer.model_path)
    return cfg


@hydra.main(version_base="1.3", config_path="pkg://nulls_dist.conf", config_name="nulls_data")
@report_errors("nulls-data", hydra=True)
def _app(cfg: DictConfig) -> None:
    data = _absolute_paths(data_config_from_dict(OmegaConf.to_container(cfg.data, resolve=True)))
    stage = cfg.stage
    stages = list(stage) if OmegaConf.is_list(stage) else [s for s in str(stage).split(",") if s]
    if not stages:
        raise ValueError("stage: no stage given; choose from ingest, tokenizer, shard, all (or a comma list)")
    results = run_stages(data, stages)
    manifest = results.get("shard")
    summary = {"output_dir": data.output_dir, "stages": stages}
    if manifest:
        summary.update({k: manifest[k] for k in ("num_shards", "num_samples", "num_tokens", "context_length")})
        summary["num_holdout_shards"] = len(manifest["holdout"]["shards"])
        summary["repaired"] = results["repaired"]
    print(json.dumps(summary))


@report_errors("nulls-data", hydra=True)
def main() -> None:
    keep_stdout_for_output()
    _app()


if __name__ == "__main__":
    main()
