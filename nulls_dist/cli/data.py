"""`nulls-data`: the Hydra entry point of the data pipeline. Composes `conf/nulls_data.yaml` (+ a `data`
group), turns it into a typed `DataConfig`, resolves relative paths against the directory it was started
from, and runs the requested stage(s): `nulls-data stage=all data=synthwiki`."""
from __future__ import annotations

import json
import sys

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from nulls_dist.data_pipeline.pipeline import DataConfig, data_config_from_dict, run_stages


def _absolute_paths(cfg: DataConfig) -> DataConfig:
    cfg.output_dir = to_absolute_path(cfg.output_dir)
    cfg.ingest.inputs = [i if i.startswith("bundled:") else to_absolute_path(i) for i in cfg.ingest.inputs]
    if cfg.tokenizer.model_path:
        cfg.tokenizer.model_path = to_absolute_path(cfg.tokenizer.model_path)
    return cfg


@hydra.main(version_base="1.3", config_path="pkg://nulls_dist.conf", config_name="nulls_data")
def _app(cfg: DictConfig) -> None:
    try:
        data = _absolute_paths(data_config_from_dict(OmegaConf.to_container(cfg.data, resolve=True)))
        stage = cfg.stage
        stages = list(stage) if OmegaConf.is_list(stage) else [s for s in str(stage).split(",") if s]
        results = run_stages(data, stages)
    except ValueError as err:  # bad user input: one clear line, no traceback
        print(f"nulls-data: error: {err}", file=sys.stderr)
        sys.exit(2)
    manifest = results.get("shard")
    summary = {"output_dir": data.output_dir, "stages": stages}
    if manifest:
        summary.update({k: manifest[k] for k in ("num_shards", "num_samples", "num_tokens", "context_length")})
        summary["num_holdout_shards"] = len(manifest["holdout"]["shards"])
        summary["repaired"] = results["repaired"]
    print(json.dumps(summary))


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
