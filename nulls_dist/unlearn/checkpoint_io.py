"""Reading trained NULL checkpoints and writing deployed ones.

Two on-disk forms are understood:
- a training checkpoint: `<run_dir>/checkpoints/<tag>/` written by DeepSpeed (any ZeRO stage) with
  `<tag>/nulls_meta.json` beside it (design.md); consolidated through DeepSpeed's own
  `get_fp32_state_dict_from_zero_checkpoint` (ZeRO 1-3) or the stage-0 model-states file;
- a deployed checkpoint: a directory holding `model.pt` (a plain `NullTransformer.state_dict()`) and
  `nulls_meta.json`; both files are written to a temporary name and renamed, the meta last (its presence marks
  a complete checkpoint).

`state_dict_digest` is the content digest every certificate refers to: it depends only on key names, dtypes,
shapes and values, so a training checkpoint and its deployed copy have the same digest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nulls_dist.config import NullConfig

log = logging.getLogger(__name__)

META_NAME = "nulls_meta.json"
DEPLOYED_WEIGHTS = "model.pt"
LATEST_NAME = "latest"
_STAGE0_STATES = "mp_rank_00_model_states.pt"


@dataclass
class LoadedCheckpoint:
    """A consolidated checkpoint: fp32 weights, its meta and where it came from."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path
    kind: str  # "training" | "deployed"

    @property
    def model_config(self) -> NullConfig:
        return model_config_from_meta(self.meta, self.path)


def model_config_from_meta(meta: dict[str, Any], where: Path | str = "nulls_meta.json") -> NullConfig:
    """The NullConfig recorded in a checkpoint's meta (`model_config`, or `model` for older writers)."""
    values = meta.get("model_config", meta.get("model"))
    if not isinstance(values, dict):
        raise ValueError(f"{where}: nulls_meta.json has no `model_config` mapping")
    known = {f.name for f in dataclasses.fields(NullConfig)}
    return NullConfig(**{k: v for k, v in values.items() if k in known})


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """Write JSON to `path` through a temporary name and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def resolve_training_tag(checkpoints_dir: Path, tag: str | None) -> str:
    """`tag`, or the one named by `<checkpoints_dir>/latest`."""
    if tag:
        return tag
    latest = checkpoints_dir / LATEST_NAME
    if not latest.is_file():
        raise ValueError(f"no tag given and no `latest` file in {checkpoints_dir}")
    return latest.read_text().strip()


def _consolidate(checkpoints_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 state dict of a DeepSpeed checkpoint. ZeRO 1-3 go through DeepSpeed's consolidation; stage 0
    writes no ZeRO optimizer partitions, its model-states file already holds the full module."""
    tag_dir = checkpoints_dir / tag
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints progress; keep stdout for our JSON
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints_dir), tag=tag)
    else:
        states_file = tag_dir / _STAGE0_STATES
        if not states_file.is_file():
            raise ValueError(f"{tag_dir}: neither ZeRO optimizer partitions nor {_STAGE0_STATES} found")
        state = torch.load(states_file, map_location="cpu", weights_only=False)["module"]
    return {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}


def load_checkpoint(path: str | Path, tag: str | None = None) -> LoadedCheckpoint:
    """Load a deployed checkpoint directory, a training tag directory, or a training `checkpoints/` dir
    (+ optional tag, else `latest`), or a run directory holding `checkpoints/`."""
    path = Path(path)
    if (path / DEPLOYED_WEIGHTS).is_file():
        meta = _read_json(path / META_NAME)
        state = torch.load(path / DEPLOYED_WEIGHTS, map_location="cpu", weights_only=True)
        return LoadedCheckpoint(state, meta, path, "deployed")
    if (path / META_NAME).is_file() and tag is None:  # a tag directory itself
        checkpoints_dir, tag = path.parent, path.name
    elif (path / "checkpoints").is_dir():
        checkpoints_dir = path / "checkpoints"
    elif path.is_dir():
        checkpoints_dir = path
    else:
        raise ValueError(f"checkpoint path does not exist: {path}")
    tag = resolve_training_tag(checkpoints_dir, tag)
    tag_dir = checkpoints_dir / tag
    if not tag_dir.is_dir():
        raise ValueError(f"checkpoint tag {tag!r} not found in {checkpoints_dir}")
    meta = _read_json(tag_dir / META_NAME)
    state = _consolidate(checkpoints_dir, tag)
    log.info("consolidated %s (%d tensors)", tag_dir, len(state))
    return LoadedCheckpoint(state, meta, tag_dir, "training")


def save_deployed(out_dir: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write `model.pt` then `nulls_meta.json`, each via a temporary name and `os.replace`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{DEPLOYED_WEIGHTS}.tmp-{os.getpid()}"
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp)
    os.replace(tmp, out_dir / DEPLOYED_WEIGHTS)
    write_json_atomic(out_dir / META_NAME, meta)
    return out_dir


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over (key, dtype, shape, bytes) of every tensor, keys sorted."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            h.update(block)
    return h.hexdigest()


def sink_table_keys(layer: int) -> tuple[str, str, str]:
    """State-dict keys of one layer's three sink tables, each (n_sink, n_embd) (design.md)."""
    prefix = f"transformer.h.{layer}.mlp."
    return prefix + "sink_gate", prefix + "sink_up", prefix + "sink_down"


def build_model(ckpt: LoadedCheckpoint, device: str | torch.device = "cpu"):
    """A NullTransformer in eval mode holding the checkpoint's weights."""
    from nulls_dist.model import NullTransformer

    model = NullTransformer(ckpt.model_config)
    model.load_state_dict(ckpt.state_dict)
    return model.to(device).eval()
