"""Shared by the trainer tests: compose the real `nulls-train` config (conf/) with overrides, and prepare the
bundled SynthWiki shards once into a directory through the data pipeline."""
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from nulls_dist.data_pipeline.pipeline import data_config_from_dict, run_stages

# Small and fast: 2 x 2 x 255-token micro-batches per step, every evaluation on 1 batch per split.
TINY = ["deepspeed.micro_batch=2", "deepspeed.grad_accum=2", "optim.warmup_steps=2", "train.device=cpu",
        "logging.wandb_mode=disabled", "logging.log_every=1", "checkpoint.every_n_steps=3", "eval.every_n_steps=3",
        "eval.num_batches=1", "train.max_steps=6", "train.cpu_threads=1"]


def compose_raw(overrides: list[str]) -> dict:
    with initialize_config_module(config_module="nulls_dist.conf", version_base="1.3"):
        cfg = compose(config_name="nulls_train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def prepare_synthwiki(out_dir: Path) -> Path:
    raw = compose_raw([f"data.output_dir={out_dir}"])
    run_stages(data_config_from_dict(raw["data"]), ["all"])
    return out_dir
