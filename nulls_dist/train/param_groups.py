"""What each parameter of a run trains at: the optimizer's param groups (weight decay, and a learning-rate scale
per part of the model, `optim.lr_scale`) and the token rows that get no gradient at all (`optim.freeze_rare_tokens`).

Groups. Matrices decay, except the sink tables (a source's rows must not shrink while it is absent); vectors
(the norms) never decay. Every group records `lr_scale` and `decay`; its `lr` is the config's lr times the scale,
and the schedule (`ds_config.WarmupCosine`, a multiplier of each group's initial lr) scales it from there. Without
scales there are exactly two groups, decayed then not, as before scales existed (checkpoints resume unchanged).

Frozen token rows. A token id that occurs in at most n training sources has rows in `transformer.wte` and
`lm_head` that only those sources train: per-source parameters outside the sinks, where the membership residue
of a forgotten source lives (docs/residue.md). A gradient hook on both tables zeroes those rows' gradients
before DeepSpeed accumulates them, so AdamW's moments stay 0 and its update is 0; the decoupled weight decay
still shrinks the rows by the same factor in every run of the same schedule (the original and its retrain
oracle start from the same seeded init, so their frozen rows stay bit-identical).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from nulls_dist.model import NullTransformer, parameter_kind


def param_groups(model: NullTransformer, weight_decay: float, lr: float | None = None,
                 lr_scale: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """The optimizer's param groups: decayed scale-1 parameters, non-decayed scale-1 parameters, then one group
    per (decay, scale) of the scaled kinds, in model order. `lr` (needed with scales) is the config's base lr."""
    lr_scale = dict(lr_scale or {})
    if any(s != 1.0 for s in lr_scale.values()) and lr is None:
        raise ValueError("param_groups: lr_scale needs the base lr")
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for name, param in model.named_parameters():
        kind = parameter_kind(name)
        key = (param.dim() >= 2 and kind != "sink", float(lr_scale.get(kind, 1.0)))
        groups.setdefault(key, []).append(param)
    out = []
    for (decay, scale), params in groups.items():
        if not params and scale != 1.0:
            continue
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale, "decay": decay}
        if scale != 1.0:
            group["lr"] = lr * scale
        out.append(group)
    return out


def group_lr_scales(groups: list[dict[str, Any]]) -> list[tuple[float, bool]]:
    """(lr_scale, decay) of each group, in order: what `ds_config.restore_schedule` re-applies on a resume."""
    return [(float(g.get("lr_scale", 1.0)), bool(g.get("decay", i == 0))) for i, g in enumerate(groups)]


def rare_token_ids(source_counts: np.ndarray, max_sources: int) -> np.ndarray:
    """Token ids occurring in at most `max_sources` training sources (`source_counts` (V,): sources per id)."""
    return np.flatnonzero(np.asarray(source_counts) <= max_sources).astype(np.int64)


def freeze_token_rows(model: NullTransformer, token_ids: np.ndarray) -> list[torch.utils.hooks.RemovableHandle]:
    """Zero the gradient rows of `token_ids` in the token embedding and the LM head (hooks on both weights;
    returns their handles)."""
    handles = []
    for weight in (model.transformer.wte.weight, model.lm_head.weight):
        keep = torch.ones(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)  # (V, 1)
        keep[torch.as_tensor(token_ids, dtype=torch.int64, device=weight.device)] = 0.0
        handles.append(weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.dtype)))
    return handles
