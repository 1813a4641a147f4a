"""One SLURM task -> one torch.distributed rank: exports the torchrun-style variables of this task (the mapping
is `launch.rendezvous`), then execs the training command in place (same PID, so SLURM's signals reach the
trainer directly).

    srun python -m nulls_dist.launch.task nulls-train experiment=demo
"""
from __future__ import annotations

import os
import socket
import sys

from nulls_dist.launch.rendezvous import slurm_rendezvous


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise SystemExit("usage: python -m nulls_dist.launch.task COMMAND [ARGS...]")
    try:
        rdv = slurm_rendezvous(os.environ)
    except ValueError as exc:
        raise SystemExit(f"launch.task: error: {exc}") from None
    os.environ.update(rdv.torch_env())
    # One line per rank in its srun log: which rank landed where (the first thing to read on a hung job).
    print(f"[launch.task] rank {rdv.rank}/{rdv.world_size} local {rdv.local_rank}/{rdv.local_world_size} "
          f"node {rdv.node_rank}/{rdv.num_nodes} host {socket.gethostname()} "
          f"master {rdv.master_addr}:{rdv.master_port} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}",
          file=sys.stderr, flush=True)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
