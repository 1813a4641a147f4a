"""DeepSpeed training of NULL models: typed config, DeepSpeed config generation, distributed set-up, the loop,
checkpoints, callbacks and the `nulls-train` entry point. The only package that uses torch.distributed,
DeepSpeed or wandb. Import submodules directly (this file imports nothing, so `import nulls_dist.train` is cheap).
"""
