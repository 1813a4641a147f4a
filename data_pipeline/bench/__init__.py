"""Benchmarks of the data pipeline; each prints JSON."""
