"""Benchmarks of nulls_dist components; each prints JSON (run with python -m nulls_dist.bench.<name>)."""
