"""Torch-side data loading over the pipeline's shards (`loader.py`); reads them through `nulls_dist.formats`."""
from nulls_dist.data.loader import StepLoader, StreamLayout, build_step_loader, fixed_batches, load_manifest

__all__ = ["StepLoader", "StreamLayout", "build_step_loader", "fixed_batches", "load_manifest"]
