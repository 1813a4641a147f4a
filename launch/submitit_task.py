"""Sweeps through Hydra's submitit SLURM launcher (`hydra/launcher=nulls_submitit`): submitit submits one
SLURM job per sweep point and runs the `nulls-launch` task function once per SLURM task; here each of those
calls becomes one `nulls-train` rank.

Signals: `SUBMITIT_PREEMPT_SIGNAL=USR1` makes submitit ask for `--signal=USR1@<launcher.signal_warning_s>`,
which reaches every process of the step, the trainers included. Submitit's own handler would requeue the
job at once and kill the trainers mid-checkpoint, so the task ignores USR1 (the child inherits SIG_IGN until
the trainer installs its handler), waits for its trainer, and, when the trainer exits with the
"checkpointed on signal" code, rank 0 runs `scontrol requeue` -- the same protocol as the sbatch script.
The run directory is a function of the job id, which a requeue keeps, so the resumed trainer finds it.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from nulls_dist.launch.rendezvous import slurm_rendezvous
from nulls_dist.launch.sbatch_values import sbatch_path, sbatch_value
from nulls_dist.launch.slurm import SlurmSpec

PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"
PREEMPT_SIGNAL = "USR1"  # what nulls-train checkpoints on


def in_submitit_slurm_job() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_PROCID" in os.environ


def slurm_minutes(time_spec: str) -> int:
    """SLURM time (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`) -> whole minutes, for submitit's `timeout_min`."""
    days, sep, clock = str(time_spec).partition("-") if "-" in str(time_spec) else ("0", "", str(time_spec))
    parts = [int(p) for p in clock.split(":")]
    if sep:
        hours, mins, secs = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, mins, secs = parts
    elif len(parts) == 2:
        hours, (mins, secs) = 0, parts
    else:
        hours, mins, secs = 0, parts[0], 0
    return int(days) * 24 * 60 + hours * 60 + mins + (1 if secs else 0)


def submitit_parameters(spec: SlurmSpec, name: str, runs_root: str) -> dict[str, object]:
    """The hydra-submitit-launcher parameters that come from the launcher group (nulls_submitit.yaml reads them
    through `${nulls_submitit:KEY}`); `spec` is already checked, and the job name and folder are checked here."""
    if not isinstance(spec.nodes, int):
        raise ValueError(f"launcher.nodes={spec.nodes!r}: a node range needs an sbatch submission (no "
                         "hydra/launcher=nulls_submitit); submitit asks for a fixed number of nodes")
    return {
        "name": sbatch_value("name", name),
        "submitit_folder": f"{sbatch_path('runs_root', runs_root)}/.submitit/%j",
        "nodes": spec.nodes,
        "tasks_per_node": spec.tasks_per_node,
        "gpus_per_node": spec.gpus_per_node,
        "cpus_per_task": spec.cpus_per_task,
        "timeout_min": slurm_minutes(spec.time),
        "partition": spec.partition,
        "account": spec.account,
        "qos": spec.qos,
        "constraint": spec.constraint,
        "signal_delay_s": spec.signal_warning_s,
    }


def run_rank(spec: SlurmSpec, train_args: list[str]) -> int:
    """Run this task's nulls-train rank; on the requeue code, rank 0 requeues the job and both wait for it."""
    env = {**os.environ, **{k: str(v) for k, v in spec.env.items()}}
    env.update(slurm_rendezvous(env).torch_env())  # after launcher.env, so a MASTER_PORT set there wins
    signal.signal(getattr(signal, f"SIG{PREEMPT_SIGNAL}"), signal.SIG_IGN)
    command = [*shlex.split(spec.train_command), *train_args]
    print(f"[nulls-launch] rank {env['RANK']}/{env['WORLD_SIZE']} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}"
          f" master {env['MASTER_ADDR']}:{env['MASTER_PORT']}", file=sys.stderr, flush=True)
    code = subprocess.run(command, env=env).returncode
    if code == 0:
        return 0
    if code != spec.requeue_exit_code:
        raise RuntimeError(f"nulls-train (rank {env['RANK']}) exited with {code}")
    if env["RANK"] == "0":
        job_id = os.environ["SLURM_JOB_ID"]
        print(f"[nulls-launch] nulls-train checkpointed on signal; requeueing job {job_id}", flush=True)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
    # Returning would let submitit record a result for a job that is about to restart: wait for the requeue.
    time.sleep(600)
    raise RuntimeError("the job was not requeued within 600 s of the checkpoint")


def run_dir_for_job(runs_root: str, name: str, run_dir: str | None, job_num: int, job_id: str) -> Path:
    """Stable across requeues: `<run_dir>/<sweep job num>` or `<runs_root>/<name>-<submitit job id>`."""
    if run_dir:
        return Path(run_dir) / str(job_num)
    return Path(runs_root) / f"{name}-{job_id}"
