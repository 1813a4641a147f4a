"""The SLURM -> torch.distributed mapping of one SLURM task: the one place that turns SLURM's task variables
into a rank, a world size and a rendezvous. `launch.task` (sbatch jobs), `launch.submitit_task` (submitit
sweeps) and `nulls_dist.train.distributed` (`srun nulls-train` without launch.task) all call it.

    SLURM_PROCID  -> RANK            SLURM_NTASKS  -> WORLD_SIZE        SLURM_LOCALID -> LOCAL_RANK
    SLURM_NODEID  -> NODE_RANK       this node's entry of SLURM_STEP_TASKS_PER_NODE -> LOCAL_WORLD_SIZE
    MASTER_ADDR   <- as exported by the batch script, else the first host of the step's node list
    MASTER_PORT   <- as exported by the batch script, else 20000 + SLURM_JOB_ID mod 10000

Everything is read when the task starts, never when the job is rendered: a requeued job keeps its id (so its
port) but may come back on a different number of nodes, and then gets the new world size.

What comes from submitit (pinned in requirements.txt): the node-list expansion is the parser behind
`submitit.JobEnvironment().hostnames` (pure Python, so no `scontrol` call and no slurm.conf on the task's
node). What does not, and why -- `submitit.helpers.TorchDistributedEnvironment` and `JobEnvironment` read
`os.environ` only and need `SUBMITIT_EXECUTOR` (unset in our sbatch jobs), and the helper:
- sets LOCAL_WORLD_SIZE to SLURM_NTASKS // SLURM_JOB_NUM_NODES, wrong on uneven nodes (`8(x2),4` -> 6 for all);
- ignores an exported MASTER_ADDR (a batch script that picks the InfiniBand name would be overridden);
- draws the port from 20000-60000 (seeded by the job id, so stable across requeues, but inside Linux's
  ephemeral range 32768-60999, where a client socket on the master node may already hold it);
- exports CUDA_VISIBLE_DEVICES=<local rank>, after which `torch.cuda.set_device(LOCAL_RANK)` fails.
Torch-free (tests/test_layering.py).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from submitit.slurm.slurm import _parse_node_list  # what SlurmJobEnvironment.hostnames calls

PORT_BASE = 20000
PORT_SPAN = 10000  # ports 20000..29999: above the usual services, below Linux's ephemeral range (32768+)


@dataclass(frozen=True)
class SlurmRendezvous:
    """Who this SLURM task is in torch.distributed terms, and where rank 0 listens."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int

    def torch_env(self) -> dict[str, str]:
        """The torchrun-style variables (what `init_process_group(init_method="env://")` reads)."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "NODE_RANK": str(self.node_rank),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def in_slurm_task(environ: Mapping[str, str]) -> bool:
    """True when SLURM describes this process as one task of a job (inside srun, and in the batch shell)."""
    return "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ


def master_port(job_id: int) -> int:
    """The rendezvous port of a job: a function of the job id alone, so the same on every node and after a
    requeue (which keeps the id)."""
    return PORT_BASE + job_id % PORT_SPAN


def hostnames(nodelist: str) -> list[str]:
    """A SLURM node list (`gpu[01-02,07],cpu3`) -> its hosts, in SLURM's order."""
    try:
        hosts = _parse_node_list(nodelist)
    except Exception as exc:  # submitit raises its own SlurmParseException
        raise ValueError(f"SLURM node list {nodelist!r} cannot be parsed: {exc}") from None
    if not hosts:
        raise ValueError(f"SLURM node list {nodelist!r} names no host")
    return hosts


def tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE (`8(x2),4`) -> tasks on each node of the step, in node order ([8, 8, 4])."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"SLURM_TASKS_PER_NODE: cannot parse {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _int(environ: Mapping[str, str], name: str) -> int:
    if name not in environ:
        raise ValueError(f"environment variable {name} is not set: not inside an srun step?")
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {environ[name]!r}") from None


def _first(environ: Mapping[str, str], *names: str) -> str | None:
    return next((environ[n] for n in names if environ.get(n)), None)


def slurm_rendezvous(environ: Mapping[str, str] | None = None) -> SlurmRendezvous:
    """The rendezvous of the SLURM task whose environment is `environ` (default: this process's)."""
    environ = os.environ if environ is None else environ
    rank, world_size, local_rank = (_int(environ, n) for n in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
    node_rank = _int(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
    # The step's own counts first: a step may run on fewer nodes or tasks than the job holds.
    per_node_spec = _first(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if per_node_spec is not None:
        per_node = tasks_per_node(per_node_spec)
    else:
        num_nodes = int(_first(environ, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES") or 1)
        per_node = [world_size // num_nodes] * num_nodes
    if not 0 <= node_rank < len(per_node):
        raise ValueError(f"SLURM_NODEID={node_rank} but the step has {len(per_node)} node(s) ({per_node_spec!r})")

    master_addr = environ.get("MASTER_ADDR")
    if not master_addr:
        nodelist = _first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST")
        if nodelist is None:
            raise ValueError("neither MASTER_ADDR nor SLURM_JOB_NODELIST is set: cannot find rank 0's host")
        master_addr = hostnames(nodelist)[0]  # SLURM places rank 0 on the step's first node
    port = _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else master_port(_int(environ, "SLURM_JOB_ID"))
    if not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT must be in [1, 65535], got {port}")
    return SlurmRendezvous(rank=rank, world_size=world_size, local_rank=local_rank,
                           local_world_size=per_node[node_rank], node_rank=node_rank, num_nodes=len(per_node),
                           master_addr=master_addr, master_port=port)
