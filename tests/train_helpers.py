"""Shared by the trainer tests: compose the real `nulls-train` config (conf/) with overrides, prepare the
bundled SynthWiki shards once into a directory through the data pipeline, and run the real `nulls-train` console
entry point (1 process, or 2 gloo ranks under torchrun)."""
import os
import subprocess
import sys
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


REPO = Path(__file__).resolve().parent.parent
# whole-run settings of the step tests: the demo model and data, ZeRO-1, one thread, a step of 8 samples
RUN_BASE = ["experiment=demo", "logging.wandb_mode=disabled", "logging.log_every=1", "eval.num_batches=0",
            "optim.warmup_steps=1", "train.cpu_threads=1", "data_loader.prepare_if_missing=false",
            "deepspeed.zero_stage=1", "data_loader.num_streams=4", "deepspeed.global_batch=8"]


def nulls_train_command(data_dir: Path, run_dir: Path, ranks: int, overrides, base) -> list[str]:
    """The `nulls-train` command line on `ranks` processes (torchrun for more than one)."""
    from nulls_dist.train.distributed import free_port

    args = [*base, f"data.output_dir={data_dir}", f"train.run_dir={run_dir}", *overrides]
    if ranks == 1:
        return [sys.executable, "-m", "nulls_dist.cli.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "-m", "nulls_dist.cli.train", *args]


def train_env() -> dict:
    """The environment of a test training run: one OpenMP thread per process."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def nulls_train(data_dir: Path, run_dir: Path, ranks: int, *overrides: str, check: bool = True,
                base: tuple[str, ...] = tuple(RUN_BASE)) -> subprocess.CompletedProcess:
    """`nulls-train` on `ranks` processes (torchrun for 2); asserts success unless `check=False`."""
    cmd = nulls_train_command(data_dir, run_dir, ranks, overrides, base)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=train_env())
    if check:
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def trained_sources(data_dir: Path, steps: int, first: int = 0) -> list[int]:
    """The sources whose tokens steps [first, steps) of a RUN_BASE run (4 streams, 8 samples a step, micro-batches
    of 2) train on. The loader's order is the same on any world size: one rank's view of the 4 streams is the
    whole step."""
    from nulls_dist.data.loader import StreamLayout, build_step_loader

    seen: set[int] = set()
    for index, step in zip(range(steps), build_step_loader(data_dir, StreamLayout(4, 8, 2), seed=0)):
        for micro in step:
            if index >= first:
                seen |= set(micro["source_ids"][micro["labels"] != -100].tolist())
    return sorted(seen)
