"""Benchmarks and offline compile checks for the kernels package (`python -m kernels.bench.sink_mlp_bench`)."""
