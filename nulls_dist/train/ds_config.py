"""The DeepSpeed config of a run, generated from the typed `TrainConfig` (never hand-written JSON, no "auto"),
and the learning-rate schedule handed to `deepspeed.initialize`.

Precision: bf16 on GPU, fp32 on CPU. Optimizer: torch AdamW (DeepSpeed `torch_adam`), which runs on every
device without building DeepSpeed's fused ops. Schedule: a torch `LambdaLR` over `WarmupCosine` (linear warmup
to `lr`, cosine decay to `min_lr` at `max_steps`); DeepSpeed saves and restores its state with the checkpoint,
so a resumed run continues on exactly the same learning rates.
"""
from __future__ import annotations

import math
from typing import Any

from nulls_dist.train.config import TrainConfig


def build_ds_config(cfg: TrainConfig, world_size: int, on_gpu: bool, grad_accum: int | None = None,
                    load_universal: bool = False) -> dict[str, Any]:
    """The complete DeepSpeed config dict for `world_size` data-parallel ranks. `grad_accum`: micro-batches per
    rank per step (the loader's layout; default the config's); `load_universal`: the resume reads a universal
    checkpoint (another world size)."""
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    ds = cfg.deepspeed
    accum = grad_accum if grad_accum is not None else ds.grad_accum
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        # overlap_comm off: on CPU/gloo it buys nothing and keeps reductions in one fixed order.
        zero.update({"overlap_comm": on_gpu, "contiguous_gradients": True, "reduce_scatter": True})
    if ds.zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False})
    return {
        "train_batch_size": ds.micro_batch * accum * world_size,
        "train_micro_batch_size_per_gpu": ds.micro_batch,
        "gradient_accumulation_steps": accum,
        "checkpoint": {"load_universal": bool(load_universal)},
        "gradient_clipping": float(ds.clip),
        # DeepSpeed's own overflow check skips a step whose gradient norm is not finite, at the cost of one host
        # read per step (train.skip_nonfinite_steps=false: no read; a bad step is then applied, and the run stops)
        "bf16": {"enabled": bool(on_gpu), "check_grad_overflow": bool(cfg.skip_nonfinite_steps)},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": float(cfg.optim.lr),
                "betas": [float(b) for b in cfg.optim.betas],
                "eps": float(cfg.optim.eps),
                "weight_decay": float(cfg.optim.weight_decay),
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


class WarmupCosine:
    """lr multiplier at optimizer step s (0-based): (s+1)/warmup during warmup, then cosine from 1 down to
    min_lr/lr at `max_steps`. A plain object (not a lambda) so `LambdaLR.state_dict()` can hold it."""

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float):
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler_factory(cfg: TrainConfig):
    """A callable optimizer -> LambdaLR, the form `deepspeed.initialize(lr_scheduler=...)` accepts."""
    from torch.optim.lr_scheduler import LambdaLR

    schedule = WarmupCosine(cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr / cfg.optim.lr)

    def make(optimizer):
        return LambdaLR(optimizer, schedule)

    return make


def restore_schedule(engine, cfg: TrainConfig, step: int, saved_optim: dict[str, Any],
                     saved_max_steps: int | None,
                     group_specs: list[tuple[float, bool]] | None = None) -> list[str]:
    """After a resume: put the optimizer and the schedule where THIS config says they are at `step`.

    DeepSpeed restores the optimizer's param groups (lr, betas, eps, weight decay) from the checkpoint; the
    schedule is a pure function of (config, step), so it is rebuilt rather than restored. A changed `optim.*` or
    `train.max_steps` therefore takes effect from the resumed step (docs/training.md, "Resuming"); returns one
    line per changed field for the log. `group_specs`: (lr_scale, decay) of each param group as this run built
    them (`param_groups.group_lr_scales`); None: two groups, decayed then not, unscaled."""
    scheduler, optimizer = engine.lr_scheduler, engine.optimizer
    schedule = WarmupCosine(cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr / cfg.optim.lr)
    groups = optimizer.param_groups
    specs = group_specs if group_specs is not None else [(1.0, i == 0) for i in range(len(groups))]
    if len(specs) != len(groups):
        raise RuntimeError(f"the checkpoint's optimizer has {len(groups)} param groups, this run builds "
                           f"{len(specs)}: optim.lr_scale changed which parts of the model share a learning rate")
    scheduler.lr_lambdas = [schedule for _ in scheduler.lr_lambdas]
    scheduler.base_lrs = [float(cfg.optim.lr) * scale for scale, _ in specs]
    scheduler.last_epoch = step
    for group, (scale, decay) in zip(groups, specs):
        group["initial_lr"] = float(cfg.optim.lr) * scale
        group["lr"] = float(cfg.optim.lr) * scale * schedule(step)
        group["lr_scale"], group["decay"] = scale, decay
        group["betas"] = tuple(float(b) for b in cfg.optim.betas)
        group["eps"] = float(cfg.optim.eps)
        group["weight_decay"] = float(cfg.optim.weight_decay) if decay else 0.0
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    changes = []
    current = {"lr": cfg.optim.lr, "min_lr": cfg.optim.min_lr, "warmup_steps": cfg.optim.warmup_steps,
               "weight_decay": cfg.optim.weight_decay, "eps": cfg.optim.eps, "betas": list(cfg.optim.betas),
               "lr_scale": dict(cfg.optim.lr_scale), "freeze_rare_tokens": cfg.optim.freeze_rare_tokens}
    for key, value in current.items():
        old = saved_optim.get(key)
        if old is not None and (list(old) if isinstance(old, (list, tuple)) else old) != value:
            changes.append(f"optim.{key} changed: checkpoint {old!r} -> run {value!r}")
    if saved_max_steps is not None and saved_max_steps != cfg.max_steps:
        changes.append(f"train.max_steps changed: checkpoint {saved_max_steps} -> run {cfg.max_steps}")
    return changes
