"""Released NULLs checkpoints in litgpt format (`lit_model.pth` + `model_config.yaml`) <-> NullTransformer.

litgpt stores the SwiGLU as three full matrices; the first n_backbone hidden units are the backbone, the rest
the sink pool (docs/nulls_facts.md). The mapping (design.md, "Model weights"):
    fc_1.weight (I, D) -> [backbone_gate ; sink_gate]      fc_2.weight (I, D) -> [backbone_up ; sink_up]
    proj.weight (D, I) -> [backbone_down | sink_down^T]
Attention keeps litgpt's fused `qkv.weight`: rows [q (n_head*hs) ; k (n_query_groups*hs) ; v (same)], which is
how litgpt 0.5.x splits it (no per-group interleave). Older litgpt names it `attn.attn.weight` and interleaves
the rows per query group, [q heads of group 0 ; k_0 ; v_0 ; q heads of group 1 ; k_1 ; v_1 ; ...]; such a
tensor is regrouped into [q ; k ; v] on load, as litgpt 0.5.13 does (`CausalSelfAttention._load_from_state_dict`
-> `qkv_reassemble`). The two layouts coincide only for n_query_groups == 1. litgpt maps no other legacy
name (`attn.proj` kept its name).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from nulls_dist.config import NullConfig
from nulls_dist.formats import atomic
from nulls_dist.model import NullTransformer

LIT_WEIGHTS = "lit_model.pth"
LIT_CONFIG = "model_config.yaml"

_LAYER_KEY = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_PLAIN_LAYER_KEYS = ("norm_1.weight", "attn.qkv.weight", "attn.proj.weight", "norm_2.weight")
_PLAIN_KEYS = ("transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight")


def litgpt_to_null_state_dict(state_dict: dict[str, torch.Tensor], cfg: NullConfig) -> dict[str, torch.Tensor]:
    """Convert litgpt keys/tensors to `NullTransformer.state_dict()` keys, regrouping a legacy `attn.attn.weight`;
    ValueError on missing/extra/duplicate keys and on a legacy qkv of the wrong shape."""
    nb = cfg.n_backbone
    out: dict[str, torch.Tensor] = {}
    seen = set()
    for key, value in state_dict.items():
        match = _LAYER_KEY.match(key)
        if match is not None and match.group(2) == "attn.attn.weight":
            value = _qkv_from_legacy(key, value, cfg)
            key = f"transformer.h.{match.group(1)}.attn.qkv.weight"
        if key in seen:  # a legacy and a current qkv for one layer: neither can be trusted to be the one meant
            raise ValueError(f"{key!r} appears twice in the litgpt state dict (attn.attn.weight and attn.qkv.weight)")
        seen.add(key)
        if key in _PLAIN_KEYS:
            out[key] = value
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            raise ValueError(f"unexpected key {key!r} in the litgpt state dict")
        prefix, name = f"transformer.h.{match.group(1)}", match.group(2)
        if int(match.group(1)) >= cfg.n_layer:
            raise ValueError(f"key {key!r} names layer {match.group(1)} but n_layer={cfg.n_layer}")
        if name in _PLAIN_LAYER_KEYS:
            out[key] = value
        elif name in ("mlp.fc_1.weight", "mlp.fc_2.weight"):
            _check_shape(key, value, (cfg.n_mlp_units, cfg.n_embd))
            part = "gate" if name == "mlp.fc_1.weight" else "up"
            out[f"{prefix}.mlp.backbone_{part}.weight"] = value[:nb]  # (F, D)
            out[f"{prefix}.mlp.sink_{part}"] = value[nb:]  # (P, D)
        elif name == "mlp.proj.weight":
            _check_shape(key, value, (cfg.n_embd, cfg.n_mlp_units))
            out[f"{prefix}.mlp.backbone_down.weight"] = value[:, :nb]  # (D, F)
            out[f"{prefix}.mlp.sink_down"] = value[:, nb:].t()  # (P, D)
        else:
            raise ValueError(f"unexpected key {key!r} in the litgpt state dict")
    expected = set(_PLAIN_KEYS) | {
        f"transformer.h.{i}.{name}"
        for i in range(cfg.n_layer)
        for name in _PLAIN_LAYER_KEYS + ("mlp.fc_1.weight", "mlp.fc_2.weight", "mlp.proj.weight")
    }
    missing = sorted(expected - seen)
    if missing:
        raise ValueError(f"litgpt state dict is missing {len(missing)} key(s), first {missing[0]!r}")
    return {k: v.contiguous() for k, v in out.items()}


def null_to_litgpt_state_dict(state_dict: dict[str, torch.Tensor], cfg: NullConfig) -> dict[str, torch.Tensor]:
    """Inverse of `litgpt_to_null_state_dict`."""
    out = {k: v for k, v in state_dict.items() if k in _PLAIN_KEYS}
    for i in range(cfg.n_layer):
        prefix = f"transformer.h.{i}"
        for name in _PLAIN_LAYER_KEYS:
            out[f"{prefix}.{name}"] = state_dict[f"{prefix}.{name}"]
        mlp = f"{prefix}.mlp"
        out[f"{mlp}.fc_1.weight"] = torch.cat(
            [state_dict[f"{mlp}.backbone_gate.weight"], state_dict[f"{mlp}.sink_gate"]]
        )  # (I, D)
        out[f"{mlp}.fc_2.weight"] = torch.cat([state_dict[f"{mlp}.backbone_up.weight"], state_dict[f"{mlp}.sink_up"]])
        out[f"{mlp}.proj.weight"] = torch.cat(
            [state_dict[f"{mlp}.backbone_down.weight"], state_dict[f"{mlp}.sink_down"].t()], dim=1
        )  # (D, I)
    return out


def load_litgpt_checkpoint(checkpoint_dir: str | Path, **overrides: Any) -> NullTransformer:
    """Build a NullTransformer from a litgpt NULLs checkpoint directory. `overrides` replace config fields
    (e.g. sink_path="masked"); the released config has no sink fields, so the strategy is 'reference'."""
    checkpoint_dir = Path(checkpoint_dir)
    cfg = NullConfig.from_litgpt_yaml(checkpoint_dir / LIT_CONFIG)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    weights = checkpoint_dir / LIT_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"checkpoint weights not found: {weights}")
    state_dict = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    if "model" in state_dict and isinstance(state_dict["model"], dict):  # litgpt training-state wrapper
        state_dict = state_dict["model"]
    model = NullTransformer(cfg)
    try:
        model.load_state_dict(litgpt_to_null_state_dict(state_dict, cfg))
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{weights}: weights do not match {checkpoint_dir / LIT_CONFIG}: {exc}") from exc
    return model


def save_litgpt_checkpoint(model: NullTransformer, checkpoint_dir: str | Path) -> Path:
    """Write `lit_model.pth` and `model_config.yaml` (each to a temp name, then renamed)."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    state_dict = null_to_litgpt_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, model.cfg)
    with atomic.atomic_path(checkpoint_dir / LIT_WEIGHTS) as tmp:
        torch.save(state_dict, tmp)  # litgpt's own format: a plain tensor dict, read with weights_only=True
    atomic.write_text(checkpoint_dir / LIT_CONFIG, yaml.safe_dump(model.cfg.to_litgpt_dict(), sort_keys=False))
    return checkpoint_dir


def _qkv_from_legacy(key: str, value: torch.Tensor, cfg: NullConfig) -> torch.Tensor:
    """Legacy `attn.attn.weight`, rows grouped per query group, -> the fused [q ; k ; v] rows of `attn.qkv`."""
    D, H, G, hs = cfg.n_embd, cfg.n_head, cfg.n_query_groups, cfg.head_size
    # The same shape as the current layout, so only the order of the rows tells them apart.
    _check_shape(key, value, ((H + 2 * G) * hs, D))
    groups = value.reshape(G, H // G + 2, hs, D)  # (G, H/G + 2, hs, D): per group, its q heads, then its k, its v
    q = groups[:, : H // G].reshape(H * hs, D)  # (H*hs, D): group g holds q heads g*H/G .. (g+1)*H/G - 1
    k = groups[:, H // G].reshape(G * hs, D)  # (G*hs, D)
    v = groups[:, H // G + 1].reshape(G * hs, D)  # (G*hs, D)
    return torch.cat((q, k, v))  # ((H + 2G)*hs, D)


def _check_shape(key: str, value: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != shape:
        raise ValueError(f"{key} has shape {tuple(value.shape)}, expected {shape} from the model config")
