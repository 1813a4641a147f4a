"""Shared by the purge and checkpoint-comparison tests: real `nulls-train` runs (2 gloo ranks), their manifest
and a mask forget set made by the real `nulls-unlearn` code, and DeepSpeed's OWN readers of its checkpoints
(zero_to_fp32's consolidation, ds_to_universal's per-parameter files) to check purged files independently of
`train.checkpoint_rows`, which wrote them."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from train_helpers import nulls_train

FORGET = (49152, 49160)  # two SynthWiki articles (the bundled data numbers its sources from 49152)


def train_run(data_dir: Path, run_dir: Path, stage: int, steps: int, ranks: int = 2) -> Path:
    nulls_train(data_dir, run_dir, ranks, f"deepspeed.zero_stage={stage}", f"train.max_steps={steps}",
                "checkpoint.every_n_steps=1", "deepspeed.micro_batch=2")
    return run_dir


def make_manifest(run_dir: Path, registry: Path, out: Path) -> Path:
    from nulls_dist.audit.manifest import build_manifest
    from nulls_dist.deploy.checkpoint_io import load_checkpoint
    from nulls_dist.formats.weights import state_dict_digest

    ckpt = load_checkpoint(run_dir)
    build_manifest(out, state_dict=ckpt.state_dict, model_cfg=ckpt.model_config,
                   registry_path=registry, checkpoint_sha256=state_dict_digest(ckpt.state_dict))
    return out


def mask_forget(run_dir: Path, manifest: Path, root: Path, ids=FORGET, name: str = "forget") -> Path:
    """A forget set of `ids` by the real mask unlearning (its certificate beside it)."""
    from nulls_dist.audit.unlearn import unlearn
    from nulls_dist.deploy.checkpoint_io import load_checkpoint

    unlearn(load_checkpoint(run_dir), manifest, [str(i) for i in ids], "mask", root / f"{name}.json",
            root / f"{name}-mask-cert.json")
    return root / f"{name}.json"


def union_rows(run_dir: Path, ids=FORGET) -> np.ndarray:
    """(L, P) bool forgotten rows computed here from the sink assignment (not by the code under test)."""
    from nulls_dist.deploy.checkpoint_io import load_checkpoint
    from nulls_dist.sinks import SinkAssignment

    cfg = load_checkpoint(run_dir).model_config
    assignment = SinkAssignment(cfg.sink_assignment_config())
    out = np.zeros((cfg.n_layer, cfg.n_sink), dtype=bool)
    for layer in range(cfg.n_layer):
        for sid in ids:
            rows = assignment.rows(torch.tensor([sid]), layer)[0]
            out[layer, rows[rows >= 0].numpy()] = True
    return out


def sink_keys(n_layer: int) -> list[tuple[int, str]]:
    return [(layer, f"transformer.h.{layer}.mlp.sink_{part}") for layer in range(n_layer)
            for part in ("gate", "up", "down")]


def deepspeed_consolidated(tag_dir: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own zero_to_fp32 reconstruction of the fp32 master weights (ZeRO 1-3) of a tag."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from nulls_dist.train.checkpoint import weights_only_loads

    with weights_only_loads():
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k: (v.contiguous() if hasattr(v, "contiguous") else v) for k, v in state.items()}


def deepspeed_universal(tag_dir: Path, out: Path) -> dict[tuple[str, str], torch.Tensor]:
    """DeepSpeed's ds_to_universal of a tag: {(param, fp32 | exp_avg | exp_avg_sq): full tensor}."""
    from nulls_dist.train.checkpoint import convert_to_universal, weights_only_loads

    convert_to_universal(tag_dir, out)
    tensors = {}
    with weights_only_loads():
        for path in sorted((out / "zero").glob("*/*.pt")):
            if path.stem in ("fp32", "exp_avg", "exp_avg_sq"):
                tensors[(path.parent.name, path.stem)] = torch.load(path, weights_only=True)["param"].detach()
    return tensors


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, symlinks=True)
    return dest
