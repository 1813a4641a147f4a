"""The training loop: a NullTransformer inside a DeepSpeed engine, fed packed batches whose per-token source ids
reach every sink layer; loss, checkpoints, signals and callbacks. `train(cfg, ...)` runs one job and returns
its exit code (0 finished, `REQUEUE_EXIT_CODE` stopped on a signal after checkpointing).

Shape legend: B micro-batch rows, T context length from the data (the model sees T-1 inputs), V vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nulls_dist.config import NullConfig
from nulls_dist.model import NullTransformer, SinkMode
from nulls_dist.train import callbacks as cb
from nulls_dist.train.checkpoint import Checkpointer, find_resume_point, move_aside, rng_state
from nulls_dist.train.config import TrainConfig
from nulls_dist.train.data import DataHandle, build_train_loader, fixed_batches
from nulls_dist.train.distributed import DistEnv
from nulls_dist.train.ds_config import build_ds_config, lr_scheduler_factory, restore_schedule
from nulls_dist.train.signals import REQUEUE_EXIT_CODE, StopFlag

log = logging.getLogger(__name__)


def next_token_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over counted targets, and their number.

    A target tokens[:, t+1] counts iff its loss_mask is set and it has the same source as input token t
    (design.md: no prediction across an article boundary, no loss on padding).
    """
    tokens, source_ids = batch["tokens"], batch["source_ids"]  # (B, T)
    targets = tokens[:, 1:]  # (B, T-1)
    counted = batch["loss_mask"][:, 1:] & (source_ids[:, 1:] == source_ids[:, :-1])  # (B, T-1) bool
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # (B*(T-1),)
    num = counted.sum()
    loss = (per_token * counted.flatten()).sum() / num.clamp(min=1)
    return loss, num


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model_config(cfg: TrainConfig, data: DataHandle) -> NullConfig:
    model_cfg = NullConfig.from_preset(cfg.model.preset, **{**cfg.model.overrides, "sink_path": cfg.sink_path})
    if data.vocab_size > model_cfg.padded_vocab_size:
        raise ValueError(f"model.overrides.vocab_size: the model's vocabulary ({model_cfg.padded_vocab_size}) is "
                         f"smaller than the data's tokenizer vocabulary ({data.vocab_size})")
    if data.context_length - 1 > model_cfg.block_size:
        raise ValueError(f"model.overrides.block_size={model_cfg.block_size} is shorter than the data's context "
                         f"length - 1 = {data.context_length - 1}")
    return model_cfg


def enable_activation_checkpointing(model: NullTransformer) -> None:
    """Recompute each block in backward. Wraps `forward` per instance so state_dict keys stay unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in model.transformer.h:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def param_groups(model: NullTransformer, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; never norms, nor sink tables: a source's rows must not shrink while it is absent."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() >= 2 and ".sink_" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """Owns the engine, the loader, the checkpointer and the callbacks of one run on this rank."""

    def __init__(self, cfg: TrainConfig, resolved: dict[str, Any], env: DistEnv, device: torch.device,
                 data: DataHandle):
        import deepspeed

        self.cfg, self.resolved, self.env, self.device, self.data = cfg, resolved, env, device, data
        self.run_dir = Path(cfg.run_dir)
        self.seq_len = self.data.context_length - 1
        if device.type == "cpu" and cfg.cpu_threads is not None:
            torch.set_num_threads(cfg.cpu_threads)
        seed_everything(cfg.seed)
        self.model_cfg = build_model_config(cfg, self.data)
        model = NullTransformer(self.model_cfg).to(device)
        if cfg.deepspeed.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.sink_assignment = model.sink_assignment
        self.ds_config = build_ds_config(cfg, env.world_size, on_gpu=device.type == "cuda")
        if env.is_main:
            log.info("model %s: %.2fM parameters", self.model_cfg.name, model.num_parameters() / 1e6)
            log.info("deepspeed config: %s", self.ds_config)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=self.ds_config,
            lr_scheduler=lr_scheduler_factory(cfg), dist_init_required=False)
        self.loader = build_train_loader(self.data, cfg, env)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep_last_k, env.rank, env.world_size)
        self.step = 0
        self.tokens_seen = 0
        self.last_source_ids: torch.Tensor | None = None
        self.callbacks = self._callbacks()

    # ------------------------------------------------------------------ set-up helpers
    def meta(self) -> dict[str, Any]:
        """What nulls_meta.json records; the COMPAT_KEYS of checkpoint.py are checked on resume."""
        return {
            "config": self.resolved,
            "model": dataclasses.asdict(self.model_cfg),
            "sinks": self.sink_assignment.describe() if self.sink_assignment is not None else None,
            "data_manifest_sha256": self.data.manifest_sha256,
            "data_manifest_path": str(self.data.manifest_path),
            "exclude_sources": list(self.data.exclude_source_ids),
            "world_size": self.env.world_size,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "tokens_seen": self.tokens_seen,
            "seq_len": self.seq_len,
        }

    def _callbacks(self) -> list[cb.Callback]:
        cfg = self.cfg
        items: list[cb.Callback] = [cb.SinkStats(), cb.SpeedMonitor(self.device)]  # speed reads sink stats
        if cfg.eval.num_batches > 0:
            trained, heldout = fixed_batches(self.data, cfg, self.env)
            items.append(cb.Evaluator(cfg.eval.every_n_steps, trained, heldout))
        if self.env.is_main:
            if cfg.logging.jsonl:
                items.append(cb.JsonlWriter(self.run_dir / "metrics.jsonl"))
            if cfg.logging.wandb_mode != "disabled":
                items.append(cb.WandbLogger(self.run_dir, cfg.logging.wandb_mode, cfg.logging.project,
                                            cfg.logging.entity, self.resolved))
            items.append(cb.ConsoleProgress())
        return items

    def is_log_step(self, step: int) -> bool:
        return step % self.cfg.logging.log_every == 0 or step == self.cfg.max_steps

    def _all_mean(self, value: float) -> float:
        if self.env.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.env.world_size

    def _any(self, flag: bool) -> bool:
        if self.env.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_loss(self, batches: list[dict[str, torch.Tensor]], mode_for) -> float:
        """Mean loss over fixed batches under the SinkMode `mode_for(batch)`; averaged over ranks."""
        self.engine.eval()
        total, count = 0.0, 0
        for batch in batches:
            batch = self._to_device(batch)
            logits = self.engine(batch["tokens"][:, :-1], source_ids=batch["source_ids"][:, :-1],
                                 mode=mode_for(batch))  # (B, T-1, V)
            loss, num = next_token_loss(logits, batch)
            total += float(loss) * int(num)
            count += int(num)
        self.engine.train()
        return self._all_mean(total / max(1, count))

    # ------------------------------------------------------------------ the loop
    def _resume(self) -> None:
        ckpt = self.cfg.checkpoint
        point = find_resume_point(ckpt.resume, self.run_dir, ckpt.start_over)
        if ckpt.start_over and self.env.is_main:
            moved = move_aside(self.run_dir)
            if moved is not None:
                log.warning("checkpoint.start_over: moved the old checkpoints to %s", moved)
        if dist.is_initialized():
            dist.barrier()
        if point is None:
            return
        saved, blob = self.checkpointer.load(self.engine, point, self.meta())
        if blob is None:
            raise RuntimeError(f"cannot resume from {point.tag_dir}: rank {self.env.rank} has no saved state")
        self.loader.load_state_dict(blob["loader"])
        self.step, self.tokens_seen = int(saved["step"]), int(saved["tokens_seen"])
        changes = restore_schedule(self.engine, self.cfg, self.step, saved.get("config", {}).get("optim", {}),
                                   saved.get("config", {}).get("train", {}).get("max_steps"))
        if self.env.is_main:
            log.info("resumed from %s at step %d", point.tag_dir, self.step)
            for change in changes:
                log.warning("resume: %s (applied from this step on)", change)

    def _save(self) -> None:
        self.checkpointer.save(self.engine, self.step, self.meta(),
                               {"loader": self.loader.state_dict(), "rng": rng_state()})

    def _train_step(self, batches) -> dict[str, Any]:
        start = time.perf_counter()
        lr = self.engine.get_lr()[0]
        losses, num_tokens = [], 0
        for micro in range(self.cfg.deepspeed.grad_accum):
            batch = self._to_device(next(batches))
            if micro == 0:
                self.last_source_ids = batch["source_ids"]
            logits = self.engine(batch["tokens"][:, :-1], source_ids=batch["source_ids"][:, :-1],
                                 mode=SinkMode.train())  # (B, T-1, V)
            loss, _ = next_token_loss(logits, batch)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
            num_tokens += batch["tokens"][:, :-1].numel()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        step_time = time.perf_counter() - start
        tokens_per_step = num_tokens * self.env.world_size
        self.tokens_seen += tokens_per_step
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "train/loss": self._all_mean(float(torch.stack(losses).mean())),
            "train/lr": float(lr),
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/step_time_s": step_time,
            "train/tokens_per_step": tokens_per_step,
            "train/tokens_seen": self.tokens_seen,
        }

    def fit(self, stop: StopFlag | None = None) -> int:
        cfg = self.cfg
        self._resume()
        owns_stop = stop is None
        stop = stop or StopFlag().install()
        for callback in self.callbacks:
            callback.on_train_start(self)
        batches = iter(self.loader)
        exit_code = 0
        try:
            last_step = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
            while self.step < last_step:
                metrics = self._train_step(batches)
                self.step += 1
                for callback in self.callbacks:
                    callback.on_step_end(self, self.step, metrics)
                saved = False
                if self.step % cfg.checkpoint.every_n_steps == 0 or self.step == last_step:
                    self._save()
                    saved = True
                if self._any(stop.requested):
                    if not saved:
                        self._save()
                    if self.env.is_main:
                        log.warning("stop signal received: checkpointed step %d, exiting with code %d",
                                    self.step, REQUEUE_EXIT_CODE)
                    exit_code = REQUEUE_EXIT_CODE
                    break
        finally:
            if owns_stop:
                stop.restore()
            for callback in self.callbacks:
                callback.on_train_end(self)
        return exit_code


def train(cfg: TrainConfig, resolved: dict[str, Any], env: DistEnv, device: torch.device, data: DataHandle,
          stop: StopFlag | None = None) -> int:
    """Run one training job on this rank (process group up, data prepared); returns the exit code.

    `stop` is the entry point's already-installed signal flag, so a signal during start-up (DeepSpeed
    initialisation takes a minute on a small CPU) is not lost: it is honoured at the first step boundary.
    """
    return Trainer(cfg, resolved, env, device, data).fit(stop)
