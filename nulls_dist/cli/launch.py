"""`nulls-launch`: submit `nulls-train` runs to SLURM from Hydra configs (`conf/nulls_launch.yaml` +
`conf/launcher/*.yaml`). Arguments after `--` are forwarded verbatim to `nulls-train`; this entry point sets
no hyperparameters.

    nulls-launch launcher=slurm_8gpu launcher.nodes=4 -- experiment=wiki6m_paper
    nulls-launch launcher=wiki6m_16x8 dry_run=true -- experiment=wiki6m_paper      # print, do not submit
    nulls-launch --multirun launcher=slurm_8gpu +train.optim.lr=3e-4,5e-4 -- experiment=demo   # one job each
    nulls-launch --multirun hydra/launcher=nulls_submitit +train.optim.lr=3e-4,5e-4 -- experiment=demo

Each submission gets a run directory (`sbatch.sh`, `launch.yaml`, `train_config.yaml` from
`nulls-train ... --cfg job`, `code_version.json`, `logs/`, `job_id`) that is also the trainer's run
directory, so a requeued job resumes there.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf

from nulls_dist.cli.errors import report_errors
from nulls_dist.launch.sbatch_values import sbatch_path, sbatch_value
from nulls_dist.launch.slurm import SlurmSpec, SubmitError, render_sbatch, submit, write_run_dir
from nulls_dist.launch.submitit_task import (PREEMPT_SIGNAL, PREEMPT_SIGNAL_ENV, in_submitit_slurm_job, run_dir_for_job,
                                             run_rank, submitit_parameters)

log = logging.getLogger("nulls-launch")
SPEC_FIELDS = {f.name for f in dataclasses.fields(SlurmSpec)}


def spec_from_config(launcher: dict[str, Any]) -> SlurmSpec:
    """`launcher` config group -> typed `SlurmSpec`, rejecting unknown fields by name."""
    unknown = sorted(set(launcher) - SPEC_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {[f'launcher.{k}' for k in unknown]}; known: {sorted(SPEC_FIELDS)}")
    return SlurmSpec(**launcher)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    return str(value)


def flatten_overrides(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """{'optim': {'lr': 3e-4}, 'experiment': 'demo'} -> ['optim.lr=0.0003', 'experiment=demo']."""
    out: list[str] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += flatten_overrides(value, f"{name}.")
        else:
            out.append(f"{name}={_format_value(value)}")
    return out


def resolved_train_config(spec: SlurmSpec, train_args: list[str]) -> str:
    """`nulls-train ARGS --cfg job --resolve`: the trainer's resolved config, and an early check of ARGS."""
    cmd = [*shlex.split(spec.train_command), *train_args, "--cfg", "job", "--resolve"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"the trainer rejected the forwarded arguments {train_args}: `{shlex.join(cmd)}` "
                         f"exited {result.returncode}:\n{result.stderr.strip()[-2000:]}")
    return result.stdout


def _run_dir(cfg: DictConfig, job_num: int | None) -> Path:
    """An explicit `run_dir` may be reused (a resubmitted run resumes there); generated names never collide."""
    if cfg.run_dir:
        base = Path(cfg.run_dir)
        return base / str(job_num) if job_num is not None else base
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = f"-{job_num}" if job_num is not None else ""
    path = Path(cfg.runs_root) / f"{cfg.name}-{stamp}{suffix}"
    for attempt in range(2, 1000):
        if not path.exists():
            break
        path = Path(cfg.runs_root) / f"{cfg.name}-{stamp}{suffix}.{attempt}"
    return path


def _job_num() -> int | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    return int(hydra_cfg.job.num) if hydra_cfg.mode == RunMode.MULTIRUN else None


def _train_args(cfg: DictConfig, run_dir: Path) -> list[str]:
    return [*cfg.train_args, *flatten_overrides(OmegaConf.to_container(cfg.train, resolve=True)),
            f"{cfg.train_run_dir_key}={run_dir}"]


def run_submitit_task(cfg: DictConfig) -> int:
    """Inside a job of `hydra/launcher=nulls_submitit`: this SLURM task is one nulls-train rank."""
    from hydra.core.hydra_config import HydraConfig

    spec = spec_from_config(OmegaConf.to_container(cfg.launcher, resolve=True))
    job = HydraConfig.get().job
    run_dir = run_dir_for_job(cfg.runs_root, cfg.name, cfg.run_dir, int(job.num), str(job.id)).resolve()
    if os.environ.get("SLURM_PROCID") == "0":
        launch_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        write_run_dir(run_dir, "# submitted by hydra/launcher=nulls_submitit; see .submitit/\n", launch_yaml, None)
    return run_rank(spec, _train_args(cfg, run_dir))


def launch(cfg: DictConfig) -> int | None:
    """Render (and unless `dry_run`, submit) one job; returns the job id."""
    spec = spec_from_config(OmegaConf.to_container(cfg.launcher, resolve=True))
    sbatch_value("name", cfg.name)
    source = "run_dir" if cfg.run_dir else "runs_root"  # errors name the field the run directory comes from
    sbatch_path(source, cfg[source])
    run_dir = _run_dir(cfg, _job_num()).resolve()
    sbatch_path(source, run_dir)
    train_args = _train_args(cfg, run_dir)
    script = render_sbatch(spec, str(cfg.name), run_dir, train_args)
    if cfg.dry_run:
        print(script, end="", flush=True)
        return None
    train_config = resolved_train_config(spec, train_args) if cfg.resolve_train_config else None
    script_path = write_run_dir(run_dir, script, OmegaConf.to_yaml(cfg, resolve=True), train_config)
    job_id = submit(script_path)
    (run_dir / "job_id").write_text(f"{job_id}\n")
    print(f"submitted job {job_id}: run directory {run_dir}", flush=True)
    return job_id


def _exit_with_error(exc: Exception, code: int) -> NoReturn:
    """One line on stderr, no traceback. SystemExit, unlike an Exception, passes through Hydra's handlers,
    which would print a traceback and exit 1."""
    print(f"nulls-launch: error: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def submitit_parameter(key: str, *, _root_: DictConfig) -> Any:
    """`${nulls_submitit:KEY}` in conf/hydra/launcher/nulls_submitit.yaml: submitit's parameter KEY, taken
    from the launcher group after SlurmSpec has checked it, so submitit's #SBATCH lines hold only checked
    values. Hydra resolves it while it builds its launcher, before anything is submitted."""
    try:
        spec = spec_from_config(OmegaConf.to_container(_root_.launcher, resolve=True))
        return submitit_parameters(spec, str(_root_.name), str(_root_.runs_root))[key]
    except ValueError as exc:
        _exit_with_error(exc, 2)


@hydra.main(config_path="pkg://nulls_dist.conf", config_name="nulls_launch", version_base="1.3")
@report_errors("nulls-launch", hydra=True)
def _hydra_main(cfg: DictConfig) -> int | None:
    if in_submitit_slurm_job():
        return run_submitit_task(cfg)  # inside the job an error goes to submitit, which reports it
    try:
        return launch(cfg)
    except ValueError as exc:  # bad config or forwarded arguments
        _exit_with_error(exc, 2)
    except SubmitError as exc:  # sbatch refused the job (unknown partition, over a limit, ...)
        _exit_with_error(exc, 1)


def _quote(arg: str) -> str:
    return "'" + arg.replace("\\", "\\\\").replace("'", "\\'") + "'"


def split_forwarded(argv: list[str]) -> tuple[list[str], list[str]]:
    """`[own args] -- [nulls-train args]` -> (own, forwarded)."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


@report_errors("nulls-launch", hydra=True)
def main() -> None:
    # Submitit reads these when it builds the sbatch script (and in the job): warn with the trainer's signal.
    os.environ.setdefault(PREEMPT_SIGNAL_ENV, PREEMPT_SIGNAL)
    if not OmegaConf.has_resolver("nulls_submitit"):
        OmegaConf.register_new_resolver("nulls_submitit", submitit_parameter)
    own, forwarded = split_forwarded(sys.argv[1:])
    if forwarded:
        own.append("train_args=[" + ",".join(_quote(arg) for arg in forwarded) + "]")
    sys.argv = [sys.argv[0], *own]
    _hydra_main()


if __name__ == "__main__":
    main()
