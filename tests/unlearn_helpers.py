"""Test fixtures for the unlearning tools: a real DeepSpeed checkpoint of a debug NullTransformer (one gloo
process, a few AdamW steps, `save_checkpoint`, run in a subprocess so the process group never leaks into
pytest), a small registry.parquet, a built manifest, and the dataset manifest of hand-written shards."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ID_OFFSET = 4096  # the debug vocabulary size: source ids start right after the token ids
NUM_TRAIN = 40
NUM_HOLDOUT = 4

_TRAIN_SCRIPT = r"""
import json, os, sys, dataclasses
import torch, deepspeed
from nulls_dist.config import NullConfig
from nulls_dist.model import NullTransformer
out, stage, strategy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
overrides, extra_meta, seed = json.loads(sys.argv[4]), json.loads(sys.argv[5]), int(sys.argv[6])
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
torch.manual_seed(seed)
cfg = NullConfig.from_preset("debug", sink_strategy=strategy, **overrides)
model = NullTransformer(cfg)
ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
      "zero_optimization": {"stage": stage}, "bf16": {"enabled": False},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "steps_per_print": 10**9}
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
g = torch.Generator().manual_seed(1 + seed)
for step in range(3):
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=g)
    sources = torch.tensor([[4096 + step] * 20 + [4097 + step] * 13, [4100] * 33])
    logits = engine(tokens[:, :-1], sources[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    engine.backward(loss)
    engine.step()
from nulls_dist.train.checkpoint import Checkpointer  # the trainer's own checkpoint writer
meta = {"model": dataclasses.asdict(cfg), "sinks": model.sink_assignment.describe(),
        "data_manifest_sha256": "0" * 64, "tokens_seen": 3 * 2 * 32, "zero_stage": stage, **extra_meta}
Checkpointer(out, keep_last_k=2, rank=0, world_size=1).save(engine, 3, meta, {"rng": {}})
with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
    full = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
torch.save(full, os.path.join(out, "expected_state.pt"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
print("OK")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_ds_checkpoint(run_dir: Path, zero_stage: int = 2, strategy: str = "uniform", extra_meta: dict | None = None,
                       seed: int = 0, **overrides) -> Path:
    """Train a debug NullTransformer 3 steps with DeepSpeed (one gloo rank) and save a checkpoint; `extra_meta`
    goes into its nulls_meta.json (e.g. the `exclude_sources` of an oracle run), `seed` seeds weights and data."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, str(run_dir), str(zero_stage), strategy,
                           json.dumps(overrides), json.dumps(extra_meta or {}), str(seed)], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or "OK" not in proc.stdout:
        raise RuntimeError(f"checkpoint helper failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return run_dir


def make_registry(path: Path, num_train: int = NUM_TRAIN, num_holdout: int = NUM_HOLDOUT) -> Path:
    """registry.parquet with `num_train` train sources then `num_holdout` holdout sources."""
    n = num_train + num_holdout
    ids = np.arange(n, dtype=np.int64) + ID_OFFSET
    pq.write_table(pa.table({
        "source_id": ids, "title": [f"Article {i}" for i in range(n)], "page_id": ids, "url": [""] * n,
        "chars": np.full(n, 500), "tokens": np.arange(n, dtype=np.int64) * 10 + 100,
        "shards": [["shard-000000.tar"]] * n,
        "split": ["train"] * num_train + ["holdout"] * num_holdout,
    }), path)
    return path


def make_checkpoint_with_manifest(root: Path, zero_stage: int, shard_rows: int):
    """A real DeepSpeed checkpoint in `root/run`, its registry and its manifest in `root/manifest`; returns the
    loaded checkpoint."""
    from nulls_dist.deploy.checkpoint_io import load_checkpoint
    from nulls_dist.formats.weights import state_dict_digest
    from nulls_dist.audit.manifest import ManifestOptions, build_manifest

    make_ds_checkpoint(root / "run", zero_stage=zero_stage)
    make_registry(root / "registry.parquet")
    ckpt = load_checkpoint(root / "run")
    build_manifest(root / "manifest", state_dict=ckpt.state_dict, model_cfg=ckpt.model_config,
                   registry_path=root / "registry.parquet", checkpoint_sha256=state_dict_digest(ckpt.state_dict),
                   opts=ManifestOptions(shard_rows=shard_rows))
    return ckpt


def write_dataset_manifest(data_dir: Path, train: list[str], holdout: list[str], **fields) -> Path:
    """`data_dir/manifest.json` listing hand-written shards (paths relative to `data_dir`) with their samples
    (distinct member keys), bytes and sha256, as the pipeline records them; `fields` are added at the top."""
    import hashlib

    def entry(name: str) -> dict:
        path = data_dir / name
        with tarfile.open(path) as tar:
            samples = len({m.name.split(".", 1)[0] for m in tar if m.isfile()})
        data = path.read_bytes()
        return {"name": name, "samples": samples, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    manifest = {"schema_version": 1, "shards": [entry(n) for n in train],
                "holdout": {"shards": [entry(n) for n in holdout]}, **fields}
    path = data_dir / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path
