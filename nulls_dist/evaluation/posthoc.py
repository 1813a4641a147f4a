"""Weight-changing procedures the evaluation runs itself, with plain torch AdamW on one device:
- post-hoc unlearning baselines on the forgotten text: gradient ascent (maximise the NLL) and NPO
  (Zhang et al. 2024: loss = -(2/beta) log sigmoid(-beta (log pi(y) - log pi_ref(y))), pi_ref = the original);
- the relearning attack: fine-tune on part of a forgotten source (next-token NLL) in the deployment's own mode.

Each step takes one window of `window` tokens, cycling over the given texts in order (deterministic).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from nulls_dist.model import SinkMode
from nulls_dist.evaluation.metrics import seq_logprob

LOSSES = ("nll", "ga", "npo")


@dataclass
class FinetuneConfig:
    steps: int = 20
    lr: float = 1e-3
    window: int = 64
    beta: float = 0.1  # NPO temperature
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.window < 2:
            raise ValueError(f"bad finetune config: steps={self.steps}, lr={self.lr}, window={self.window}")


def windows(texts: list[np.ndarray], window: int) -> list[torch.Tensor]:
    """(1, <=window) token windows covering every text, in order."""
    out = []
    for tokens in texts:
        tokens = np.asarray(tokens, dtype=np.int64)
        for start in range(0, max(1, len(tokens) - 1), window - 1):
            piece = tokens[start:start + window]
            if len(piece) >= 2:
                out.append(torch.from_numpy(piece)[None])
    return out


def finetune(model, texts: list[np.ndarray], modes: list[SinkMode], loss: str, cfg: FinetuneConfig,
             on_step: Callable[[int, object], None] | None = None):
    """A fine-tuned copy of `model`; `modes[i]` is the sink mode used for `texts[i]`."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    torch.manual_seed(cfg.seed)
    tuned = copy.deepcopy(model)
    if getattr(tuned, "sink_store", None) is not None:
        # external sink rows (a sharded-table run): make_plan reads each mode's rows into the store now, so they
        # are parameters when the optimizer is built (a store in training mode refuses to read new rows)
        for mode in dict.fromkeys(modes):
            tuned.make_plan(None, mode, (1, 1))
    tuned.train()
    ref = model.eval() if loss == "npo" else None
    items = [(w, mode) for text, mode in zip(texts, modes) for w in windows([text], cfg.window)]
    if not items:
        raise ValueError("finetune: no text with at least 2 tokens")
    opt = torch.optim.AdamW(tuned.parameters(), lr=cfg.lr, weight_decay=0.0)
    for step in range(cfg.steps):
        tokens, mode = items[step % len(items)]
        if loss == "npo":
            logp = seq_logprob(tuned, tokens, mode)
            with torch.no_grad():
                ref_logp = seq_logprob(ref, tokens, mode)
            value = -(2.0 / cfg.beta) * F.logsigmoid(-cfg.beta * (logp - ref_logp))
        else:
            nll = -seq_logprob(tuned, tokens, mode) / (tokens.shape[1] - 1)
            value = -nll if loss == "ga" else nll
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(tuned.parameters(), 1.0)
        opt.step()
        if on_step is not None:
            on_step(step + 1, tuned)
    return tuned.eval()
