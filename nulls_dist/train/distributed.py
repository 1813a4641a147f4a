"""Process-group set-up and tear-down: the only module of the trainer that reads launcher environment variables.

Supported launchers: `torchrun` / the `deepspeed` launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), SLURM `srun` with one task per GPU (the SLURM -> torch.distributed mapping is
`nulls_dist.launch.rendezvous`, shared with the launcher), and a plain single process (world size 1 on
127.0.0.1 and a free port).
Backend: gloo on CPU; on GPU one group with gloo for CPU tensors and NCCL for CUDA tensors.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Mapping

from nulls_dist.launch.rendezvous import in_slurm_task, slurm_rendezvous


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dist_env_from_environ(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables. torchrun's win over SLURM's (torchrun inside an sbatch allocation, or
    `launch.task`, which exports them from SLURM's)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=_int_env(environ, "RANK"),
            world_size=_int_env(environ, "WORLD_SIZE"),
            local_rank=_int_env(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 29500,
            launcher="torchrun",
        )
    if in_slurm_task(environ):
        rdv = slurm_rendezvous(environ)
        return DistEnv(rank=rdv.rank, world_size=rdv.world_size, local_rank=rdv.local_rank,
                       master_addr=rdv.master_addr, master_port=rdv.master_port, launcher="slurm")
    return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port(),
                   launcher="single")


def resolve_device(requested: str):
    """torch.device for `train.device` (auto | cpu | cuda)."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def process_group_backend(device) -> str:
    """gloo for CPU tensors, plus NCCL for CUDA tensors on GPU runs: one process group serves both, so a
    collective on a CPU tensor (an object broadcast, a barrier) never meets an NCCL-only group."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def skip_op_builds() -> None:
    """Tell DeepSpeed that none of its compiled ops is available, before it probes for them.

    The trainer uses none (torch's AdamW, torch.distributed collectives), but DeepSpeed's first look at its op
    table compiles test programs with gcc (the async-I/O probe) and its comm backend then JIT-compiles a CPU
    shared-memory all-reduce for CPU inference, at every start-up."""
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    ops = sys.modules["deepspeed.ops"]
    if "__compatible_ops__" not in vars(ops):  # not probed yet: the probe is lazy (module __getattr__)
        ops.__compatible_ops__ = dict.fromkeys(ALL_OPS, False)


def setup_distributed(env: DistEnv, device) -> str:
    """Export the torch.distributed variables for `env` and start the process group; returns the backend."""
    import torch

    # DeepSpeed picks its accelerator at import: say which, instead of a warning that it guessed
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed
    import torch.distributed as dist

    for name, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank),
                        ("MASTER_ADDR", env.master_addr), ("MASTER_PORT", env.master_port)):
        os.environ[name] = str(value)
    backend = process_group_backend(device)
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        # our own init: DeepSpeed's would pass a single backend name; DeepSpeed then reuses this group
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                device_id=torch.device("cuda", env.local_rank) if device.type == "cuda" else None)
    skip_op_builds()
    deepspeed.init_distributed(dist_backend=backend.split(",")[-1].split(":")[-1], auto_mpi_discovery=False,
                               rank=env.rank, world_size=env.world_size)
    return backend


def teardown_distributed() -> None:
    """Barrier, then destroy the process group (no rank leaves while another still talks to it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
