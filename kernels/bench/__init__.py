"""Benchmarks and offline compile checks for the kernels package (`python -m nulls_dist.kernels.bench.sink_mlp_bench`)."""
