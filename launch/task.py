"""One SLURM task -> one torch.distributed rank: maps SLURM's variables to the torchrun-style environment,
then execs the training command in place (same PID, so SLURM's signals reach the trainer directly).

    srun python -m nulls_dist.launch.task nulls-train experiment=demo

SLURM_PROCID -> RANK, SLURM_NTASKS -> WORLD_SIZE, SLURM_LOCALID -> LOCAL_RANK, tasks on this node ->
LOCAL_WORLD_SIZE, SLURM_NODEID -> NODE_RANK; MASTER_ADDR = first host of SLURM_JOB_NODELIST and
MASTER_PORT = derived from SLURM_JOB_ID, unless the batch script already exported them.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping

PORT_BASE = 20000
PORT_SPAN = 10000  # ports 20000..29999: above the usual services, below Linux's ephemeral range (32768+)


def master_port(job_id: int) -> int:
    """The rendezvous port of a job: stable across requeues (same job id) and across nodes."""
    return PORT_BASE + job_id % PORT_SPAN


def first_hostname(nodelist: str) -> str:
    """First host of a SLURM node list (`node[01-04,07]` -> `node01`), as `scontrol show hostnames` says."""
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                            check=True)
    return result.stdout.split()[0]


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node `node_id` from SLURM_TASKS_PER_NODE, e.g. `8(x2),4` -> [8, 8, 4]."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"SLURM_TASKS_PER_NODE: cannot parse {tasks_per_node!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id]


def rendezvous_env(slurm: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables for the task described by `slurm` (a SLURM task's environment)."""
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST"):
        if name not in slurm:
            raise ValueError(f"{name} is not set: launch.task must run inside an srun step")
    node_id = int(slurm.get("SLURM_NODEID", "0"))
    env = {
        "RANK": slurm["SLURM_PROCID"],
        "WORLD_SIZE": slurm["SLURM_NTASKS"],
        "LOCAL_RANK": slurm["SLURM_LOCALID"],
        "NODE_RANK": str(node_id),
        "LOCAL_WORLD_SIZE": str(tasks_on_node(slurm.get("SLURM_TASKS_PER_NODE", slurm["SLURM_NTASKS"]), node_id)),
        "MASTER_ADDR": slurm.get("MASTER_ADDR") or first_hostname(slurm["SLURM_JOB_NODELIST"]),
        "MASTER_PORT": slurm.get("MASTER_PORT") or str(master_port(int(slurm["SLURM_JOB_ID"]))),
    }
    return env


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise SystemExit("usage: python -m nulls_dist.launch.task COMMAND [ARGS...]")
    env = rendezvous_env(os.environ)
    os.environ.update(env)
    # One line per rank in its srun log: which rank landed where (the first thing to read on a hung job).
    print(f"[launch.task] rank {env['RANK']}/{env['WORLD_SIZE']} local {env['LOCAL_RANK']} node {env['NODE_RANK']} "
          f"host {socket.gethostname()} master {env['MASTER_ADDR']}:{env['MASTER_PORT']} "
          f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')}", file=sys.stderr, flush=True)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
