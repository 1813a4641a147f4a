"""SLURM submission of nulls-train runs: sbatch scripts (`slurm`; the `nulls-launch` entry point is
`nulls_dist.cli.launch`), the SLURM -> torch.distributed mapping of one task (`rendezvous`, for the launcher
and the trainer alike), the per-task exec wrapper (`task`), submitit sweeps (`submitit_task`), a local test
cluster (`local_cluster`) and the capacity plan of a training run (`capacity_plan`). Forwards arguments; sets
no hyperparameters."""
