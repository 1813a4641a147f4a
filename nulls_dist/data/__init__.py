"""Torch-side data loading over the pipeline's shards (`loader.py`); imports only `nulls_dist.formats.dataset`
from the pipeline."""
from nulls_dist.data.loader import ShardDataset, StatefulLoader, build_loader, load_manifest

__all__ = ["ShardDataset", "StatefulLoader", "build_loader", "load_manifest"]
