"""SLURM submission of nulls-train runs: sbatch scripts and the nulls-launch entry point (`cli`), the SLURM ->
torch.distributed mapping of one task (`task`), submitit sweeps (`submitit_task`), a local test cluster
(`local_cluster`) and the capacity plan of a training run (`capacity_plan`). Forwards arguments; sets no
hyperparameters."""
