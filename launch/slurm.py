"""SLURM batch scripts for `nulls-train`: the typed job spec, the rendered sbatch script, the run directory
(launch config, code version, logs) and submission with `sbatch --parsable`.

Signal design: `#SBATCH --signal=USR1@<s>` (no `B:`) makes SLURM send SIGUSR1 to every task of the job's
steps -- every `nulls-train` rank -- `<s>` seconds before the time limit, and not to the batch shell (whose
default USR1 action would kill it). Each rank checkpoints collectively and exits with
`requeue_exit_code`; srun returns it, and the batch shell then runs `scontrol requeue $SLURM_JOB_ID`. The
requeued job keeps its id, so it reuses the run directory, the rendezvous port and the logs (appended), and
`nulls-train` resumes from `<run_dir>/checkpoints/latest` in the same wandb run. It may come back on another
number of nodes (`nodes="min-max"`): the script reads the node count from SLURM at every start. Preemption with
PreemptMode=REQUEUE sends SIGTERM instead; the trainer checkpoints on it too and SLURM requeues the job.
This module sets no hyperparameters: trainer arguments are forwarded verbatim.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from nulls_dist.launch.sbatch_values import sbatch_path, sbatch_safe, sbatch_value, shell_name

# fullmatch, not match with `$`: `$` also matches before a trailing newline.
TIME_RE = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}|\d+")
MEM_RE = re.compile(r"\d+[KMGT]?")
WORKDIR_FIELD = "the working directory (#SBATCH --chdir: where nulls-launch runs)"


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"launcher.{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"launcher.{name} must be {bounds}, got {value}")


def _nodes(value: object) -> int | str:
    """`launcher.nodes`: 4, "4" -> 4; "2-4" stays a range (min <= max, both >= 1)."""
    text = str(value)
    single, pair = re.fullmatch(r"\d+", text), re.fullmatch(r"(\d+)-(\d+)", text)
    if isinstance(value, (int, str)) and not isinstance(value, bool) and single and int(text) >= 1:
        return int(text)
    if isinstance(value, str) and pair and 1 <= int(pair.group(1)) <= int(pair.group(2)):
        return text
    raise ValueError(f"launcher.nodes must be a node count >= 1 (4) or a range min-max (2-4), got {value!r}")


@dataclass
class SlurmSpec:
    """Resources and behaviour of one SLURM job; one task per GPU (or `tasks_per_node` on CPU nodes)."""

    nodes: int | str = 1  # a count, or a range "min-max" from which SLURM picks at every start (requeues too)
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # None: one per GPU (1 when gpus_per_node is 0)
    cpus_per_task: int = 1
    mem: str | None = None  # per node, sbatch syntax ("480G"); None: the partition's default
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    signal_warning_s: int = 300  # USR1 this long before the time limit: must cover one checkpoint save
    requeue: bool = True
    requeue_exit_code: int = 75  # nulls-train's exit code after "checkpointed on signal" (EX_TEMPFAIL)
    train_command: str | None = None  # None: the nulls-train beside `python`, else `nulls-train` on PATH
    python: str | None = None  # runs `-m nulls_dist.launch.task` on every task; None: this interpreter
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, source venv)
    env: dict[str, str] = field(default_factory=dict)  # exported before srun (NCCL_*, WANDB_MODE, ...)
    sbatch_args: list[str] = field(default_factory=list)  # extra `#SBATCH` options, verbatim
    srun_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.nodes = _nodes(self.nodes)
        _check_int("cpus_per_task", self.cpus_per_task, 1)
        _check_int("gpus_per_node", self.gpus_per_node, 0)
        _check_int("signal_warning_s", self.signal_warning_s, 0, 65535)
        _check_int("requeue_exit_code", self.requeue_exit_code, 1, 255)
        for name in ("exclusive", "requeue"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"launcher.{name} must be true or false, got {getattr(self, name)!r}")
        if self.tasks_per_node is None:
            self.tasks_per_node = max(self.gpus_per_node, 1)
        _check_int("tasks_per_node", self.tasks_per_node, 1)
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(f"launcher.tasks_per_node must equal gpus_per_node ({self.gpus_per_node}) on GPU "
                             f"nodes (one rank per GPU), got {self.tasks_per_node}")
        if not TIME_RE.fullmatch(str(self.time)):
            raise ValueError(f"launcher.time must be SLURM time ([D-]HH:MM:SS or minutes), got {self.time!r}")
        if self.mem is not None and not MEM_RE.fullmatch(str(self.mem)):
            raise ValueError(f"launcher.mem must look like 480G or 64000M, got {self.mem!r}")
        for name in ("partition", "account", "qos", "constraint"):
            if getattr(self, name) is not None:
                sbatch_value(f"launcher.{name}", getattr(self, name))
        for name in ("setup", "sbatch_args", "srun_args"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"launcher.{name} must be a list of strings, got {values!r}")
        for i, option in enumerate(self.sbatch_args):
            sbatch_value(f"launcher.sbatch_args[{i}]", option)
            if not option.startswith("-"):
                raise ValueError(f"launcher.sbatch_args[{i}] must be an sbatch option (--name=value), got {option!r}")
        if not isinstance(self.env, dict):
            raise ValueError(f"launcher.env must be a mapping NAME: value, got {self.env!r}")
        for key in self.env:
            shell_name("launcher.env", key)
        if self.python is None:
            self.python = sys.executable
        if self.train_command is None:
            sibling = Path(self.python).parent / "nulls-train"
            self.train_command = str(sibling) if sibling.exists() else "nulls-train"
        for name in ("python", "train_command"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"launcher.{name} must be a string, got {getattr(self, name)!r}")
        try:
            words = shlex.split(self.train_command)
        except ValueError as exc:
            raise ValueError(f"launcher.train_command={self.train_command!r} is not a command line: {exc}") from None
        if not words:
            raise ValueError("launcher.train_command is empty")

    def directives(self, job_name: str, log_dir: Path, workdir: Path) -> list[str]:
        """The `#SBATCH` options, in a fixed order. ValueError naming the field when the job name, the run
        directory or the working directory cannot be written into an `#SBATCH` line."""
        sbatch_value("name", job_name)
        sbatch_path("run_dir", log_dir.parent)
        sbatch_path(WORKDIR_FIELD, workdir)
        opts = [
            f"--job-name={job_name}",
            f"--nodes={self.nodes}",
            f"--ntasks-per-node={self.tasks_per_node}",
            f"--cpus-per-task={self.cpus_per_task}",
            f"--time={self.time}",
        ]
        if self.gpus_per_node:
            opts.append(f"--gpus-per-node={self.gpus_per_node}")
        for name in ("mem", "partition", "account", "qos", "constraint"):
            value = getattr(self, name)
            if value is not None:
                opts.append(f"--{name}={value}")
        if self.exclusive:
            opts.append("--exclusive")
        if self.signal_warning_s:
            opts.append(f"--signal=USR1@{self.signal_warning_s}")
        opts.append("--requeue" if self.requeue else "--no-requeue")
        opts += ["--open-mode=append", f"--output={log_dir}/slurm-%j.out", f"--chdir={workdir}"]
        opts += self.sbatch_args
        # Every field above was checked (here and in __post_init__); this keeps a new option honest.
        assert all(sbatch_safe(opt) for opt in opts), opts
        return opts


def render_sbatch(spec: SlurmSpec, job_name: str, run_dir: Path, train_args: list[str],
                  workdir: Path | None = None) -> str:
    """The batch script: one srun step with one `nulls-train` task per GPU, requeue on the checkpoint code.
    The job runs in `workdir` (default: the current directory), where relative paths in the config resolve.
    `#SBATCH` values are checked (launch/sbatch_values.py); every value on a command line is shell-quoted, but
    `launcher.setup`, which is shell code by design."""
    # Checked before resolve(), which fails on a NUL byte without naming the field; again, resolved, below.
    sbatch_path("run_dir", run_dir)
    run_dir = Path(run_dir).resolve()
    workdir = Path.cwd() if workdir is None else Path(sbatch_path(WORKDIR_FIELD, workdir)).resolve()
    log_dir = run_dir / "logs"
    directives = spec.directives(job_name, log_dir, workdir)  # first: it checks run_dir for the line below
    lines = ["#!/bin/bash", f"# Generated by nulls-launch for run directory {run_dir}"]
    lines += [f"#SBATCH {opt}" for opt in directives]
    lines += [
        "",
        "set -uo pipefail",
        f"RUN_DIR={shlex.quote(str(run_dir))}",
        "# Each task derives its rank and rendezvous from SLURM (launch/rendezvous.py) when it starts. A",
        "# MASTER_ADDR/MASTER_PORT exported below (setup, env) wins; one inherited from the submitting shell does not.",
        "unset MASTER_ADDR MASTER_PORT",
        'echo "[nulls-launch] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} nodes $SLURM_JOB_NUM_NODES '
        '($SLURM_JOB_NODELIST) $(date -u +%FT%TZ)"',
    ]
    lines += list(spec.setup)
    lines += [f"export {key}={shlex.quote(str(value))}" for key, value in spec.env.items()]
    # The step spans the nodes this start was given, read from SLURM now: with `--nodes=min-max` a requeued
    # job may come back on another count, and a world size written into the script would be stale.
    allocation = f'--nodes="$SLURM_JOB_NUM_NODES" --ntasks="$(( SLURM_JOB_NUM_NODES * {spec.tasks_per_node} ))"'
    srun = [f"--ntasks-per-node={spec.tasks_per_node}", f"--cpus-per-task={spec.cpus_per_task}",
            "--open-mode=append", f"--output={log_dir}/rank%t-%j.out", *spec.srun_args]
    task = [spec.python, "-m", "nulls_dist.launch.task", *shlex.split(spec.train_command), *train_args]
    lines += [
        f"srun {allocation} " + " ".join(shlex.quote(part) for part in srun + task),
        "rc=$?",
        f"if [ \"$rc\" -eq {spec.requeue_exit_code} ]; then",
        '  echo "[nulls-launch] nulls-train checkpointed on signal; requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        'echo "[nulls-launch] srun exited with $rc"',
        "exit $rc",
    ]
    return "\n".join(lines) + "\n"


def code_version(repo: Path) -> dict[str, object]:
    """`git rev-parse HEAD` and `git status --porcelain` of the code being launched."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"repo": str(repo), "commit": None, "error": head.stderr.strip()}
    status = git("status", "--porcelain").stdout.splitlines()
    return {"repo": str(repo), "commit": head.stdout.strip(), "dirty": bool(status), "status": status}


def write_run_dir(run_dir: Path, script: str, launch_yaml: str, train_config: str | None) -> Path:
    """Create the run directory: sbatch script, launch config, resolved trainer config, code version."""
    run_dir = Path(run_dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parent.parent
    files = {
        "sbatch.sh": script,
        "launch.yaml": launch_yaml,
        "code_version.json": json.dumps(code_version(repo), indent=2) + "\n",
    }
    if train_config is not None:
        files["train_config.yaml"] = train_config
    for name, text in files.items():
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(run_dir / name)
    (run_dir / "sbatch.sh").chmod(0o755)
    return run_dir / "sbatch.sh"


class SubmitError(RuntimeError):
    """sbatch refused the script (or is not installed)."""


def submit(script_path: Path, env: dict[str, str] | None = None) -> int:
    """`sbatch --parsable SCRIPT` -> the job id."""
    try:
        result = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True, env=env)
    except OSError as exc:
        raise SubmitError(f"cannot run sbatch: {exc}") from None
    if result.returncode != 0:
        raise SubmitError(f"sbatch {script_path} failed ({result.returncode}): {result.stderr.strip()}")
    return int(result.stdout.strip().split(";")[0])
