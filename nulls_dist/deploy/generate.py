"""Decoding from a NULL model in a deployment mode: KV-cache incremental decoding (greedy, temperature,
top-p, seeded) and the no-cache reference that recomputes the whole prefix every step (used by the test that
the two agree token for token and logit for logit).

Shape legend:  B batch   T prompt length   n new tokens   V vocabulary
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nulls_dist.model import SinkMode


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    eos_id: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, T + n) prompt followed by the generated tokens
    logits: torch.Tensor  # (B, n, V) the logits each new token was chosen from


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) -> (B, V) with every token outside the smallest nucleus of mass >= top_p set to -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V) mass of strictly more likely tokens
    drop_sorted = mass_before >= top_p  # the most likely token is always kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, V) -> (B,) chosen tokens."""
    if cfg.temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(top_p_filter(logits.float() / cfg.temperature, cfg.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(model, prompt: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty (T,) or (B, T) tensor of token ids, got {tuple(prompt.shape)}")
    total = prompt.shape[1] + cfg.max_new_tokens
    if total > model.cfg.block_size:
        raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({cfg.max_new_tokens}) exceeds "
                         f"block_size={model.cfg.block_size}")
    return prompt.to(torch.int64)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, mode: SinkMode, cfg: SamplingConfig, use_cache: bool = True) -> Generation:
    """Decode `cfg.max_new_tokens` tokens after `prompt` in `mode` (a deployment mode, never `train`)."""
    if mode.kind == "train":
        raise ValueError("mode 'train' needs per-token source ids; deploy with sink_on / sink_off / "
                         "backbone_only / expected")
    prompt = _check(model, prompt, cfg)
    device = model.lm_head.weight.device
    prompt = prompt.to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    tokens, steps = prompt, []
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=device)
    cache = model.init_kv_cache(prompt.shape[0], prompt.shape[1] + cfg.max_new_tokens) if use_cache else None
    # the sink plan is built (and the mode's ids validated) once per shape and reused for every decoded token
    plans: dict[tuple[int, int], object] = {}

    def plan_for(shape: tuple[int, int]):
        if shape not in plans:
            plans[shape] = model.make_plan(None, mode, shape, device)
        return plans[shape]

    if prompt.numel() and (int(prompt.min()) < 0 or int(prompt.max()) >= model.cfg.padded_vocab_size):
        raise ValueError(f"prompt token ids must lie in [0, {model.cfg.padded_vocab_size})")
    step_input = prompt
    for _ in range(cfg.max_new_tokens):
        if use_cache:
            shape = tuple(step_input.shape)
            logits = model(step_input, None, mode=mode, kv_cache=cache, plan=plan_for(shape))[:, -1]  # (B, V)
        else:
            logits = model(tokens, None, mode=mode, plan=plan_for(tuple(tokens.shape)))[:, -1]  # whole prefix
        steps.append(logits)
        token = next_token(logits, cfg, generator)  # (B,)
        if cfg.eos_id is not None:
            token = torch.where(finished, torch.full_like(token, cfg.eos_id), token)
            finished |= token == cfg.eos_id
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        step_input = token[:, None]  # (B, 1)
        if cfg.eos_id is not None and bool(finished.all()):
            break
    logits = torch.stack(steps, dim=1) if steps else torch.zeros(prompt.shape[0], 0, model.cfg.padded_vocab_size)
    return Generation(tokens=tokens, logits=logits)
