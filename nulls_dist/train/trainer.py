"""The training loop: a NullTransformer inside a DeepSpeed engine, fed whole optimizer steps of micro-batches
whose sink plans the loader built; loss, checkpoints, signals and callbacks. `train(cfg, ...)` runs one job and
returns its exit code (0 finished, `REQUEUE_EXIT_CODE` stopped on a signal after checkpointing).

The step is GPU-shaped (docs/training.md, "The hot path"):
- the loss is the SUM of cross-entropy over the step's counted targets divided by their number over all
  micro-batches and all ranks (one all-reduce of a device scalar per step, issued before the first backward):
  thin micro-batches weigh what their tokens weigh, as in torchtitan;
- nothing is read back to the host between log steps: metrics accumulate as device tensors and go through ONE
  collective per log step (loss sum, token count, stop flag, non-finite-step streaks together);
- a step whose loss or gradient is not finite is counted (and, under ZeRO, skipped by DeepSpeed's overflow
  check); `train.nonfinite_steps_to_stop` consecutive ones end the run with an error, and no checkpoint is ever
  written of a state with non-finite weights or right after a bad step.

Large sink pools (`sink_tables`, docs/sink_tables.md) keep the sink rows in row-sharded TorchRec tables beside
the engine (`train/table_sinks.py`): each micro-batch looks up its compact plan's rows, the forward runs on them,
and the tables apply the step's summed gradients after the engine's step (skipped with it when the step is bad).

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

from nulls_dist.config import NullConfig
from nulls_dist.data.loader import StreamLayout, default_num_streams, merge_states, token_source_counts
from nulls_dist.formats import checkpoint as layout_fmt
from nulls_dist.model import NullTransformer, SinkMode
from nulls_dist.train import callbacks as cb
from nulls_dist.train.checkpoint import Checkpointer, ResumePoint, find_resume_point, move_aside, rng_state
from nulls_dist.train.config import TrainConfig
from nulls_dist.train.data import DataHandle, build_eval_batches, build_train_loader
from nulls_dist.train.distributed import DistEnv
from nulls_dist.train.ds_config import build_ds_config, lr_scheduler_factory, restore_schedule
from nulls_dist.train.param_groups import freeze_token_rows, group_lr_scales, param_groups, rare_token_ids
from nulls_dist.train.signals import REQUEUE_EXIT_CODE, StopFlag
from nulls_dist.train.table_sinks import TableSinks, uses_sharded_tables

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """The run produced non-finite losses or gradients for too many consecutive steps."""


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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A micro-batch on the device; pinned host tensors make `non_blocking` a real asynchronous copy."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) or hasattr(value, "to") and not isinstance(value, (int, float)):
            out[key] = value.to(device, non_blocking=True)
        else:
            out[key] = value
    return out


def plan_resume(cfg: TrainConfig, run_dir: Path) -> tuple[ResumePoint | None, dict[str, Any] | None]:
    """Where this run continues from and that checkpoint's meta (read before the engine exists: the world size,
    global batch and stream count of the checkpoint shape the new run)."""
    point = find_resume_point(cfg.checkpoint.resume, run_dir, cfg.checkpoint.start_over)
    return point, layout_fmt.read_meta(point.tag_dir) if point is not None else None


def stream_layout(cfg: TrainConfig, env: DistEnv, data: DataHandle, saved: dict[str, Any] | None) -> StreamLayout:
    """Global batch and stream count: the config's, else the checkpoint's (so a resume on another world size keeps
    the step's samples), else derived; validated by StreamLayout (errors name the field)."""
    ds = cfg.deepspeed
    saved_loader = (saved or {}).get("loader", {})
    if ds.global_batch is not None:
        global_batch = ds.global_batch
    elif saved is not None and saved.get("world_size") != env.world_size and saved_loader.get("global_batch"):
        global_batch = int(saved_loader["global_batch"])
    else:
        global_batch = ds.micro_batch * ds.grad_accum * env.world_size
    if global_batch % (ds.micro_batch * env.world_size):
        raise ValueError(f"deepspeed.global_batch={global_batch} is not a multiple of deepspeed.micro_batch="
                         f"{ds.micro_batch} x {env.world_size} ranks")
    if saved_loader.get("num_streams"):
        num_streams = int(saved_loader["num_streams"])
    elif cfg.data.num_streams is not None:
        num_streams = cfg.data.num_streams
    else:
        num_streams = default_num_streams(global_batch, data.num_train_shards, env.world_size)
    return StreamLayout(num_streams, global_batch, ds.micro_batch, env.world_size, env.rank, cfg.data.num_workers)


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
        self.resume_point, self.saved_meta = plan_resume(cfg, self.run_dir)
        self.layout = stream_layout(cfg, env, data, self.saved_meta)
        self.sharded = uses_sharded_tables(cfg, self.model_cfg)
        model = NullTransformer(self.model_cfg, sink_storage="external" if self.sharded else "dense").to(device)
        model.attention_impl = cfg.attention
        model.set_debug_checks(cfg.debug_checks)
        if cfg.deepspeed.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.sink_assignment = model.sink_assignment
        self.frozen_token_ids = self._freeze_rare_tokens(model)
        groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.lr_scale)
        self.group_specs = group_lr_scales(groups)
        world_changed = self.saved_meta is not None and self.saved_meta.get("world_size") != env.world_size
        self.ds_config = build_ds_config(cfg, env.world_size, on_gpu=device.type == "cuda",
                                         grad_accum=self.layout.grad_accum,
                                         load_universal=world_changed and cfg.deepspeed.zero_stage > 0)
        if env.is_main:
            log.info("model %s: %.2fM parameters", self.model_cfg.name, model.num_parameters() / 1e6)
            log.info("data: %d streams, %d samples per step (%d per rank = %d micro-batches of %d)",
                     self.layout.num_streams, self.layout.global_batch, self.layout.global_batch // env.world_size,
                     self.layout.grad_accum, self.layout.micro_batch)
            log.info("deepspeed config: %s", self.ds_config)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=self.ds_config,
            lr_scheduler=lr_scheduler_factory(cfg), dist_init_required=False)
        self.tables: TableSinks | None = None
        if self.sharded:  # beside the engine, not in it: the model holds no sink parameters
            self.tables = TableSinks(cfg, self.model_cfg, device, env.world_size, self.layout.grad_accum)
            if env.is_main:
                log.info("sink tables: %d layers x %d rows x 3 x %d, %.2f GB in all, row-wise sharded over %d "
                         "rank(s), %s lr %g (%s layout)", self.model_cfg.n_layer, self.model_cfg.n_sink,
                         self.model_cfg.n_embd, self.tables.table_bytes() / 1e9, env.world_size,
                         cfg.sink_tables.optimizer, cfg.sink_tables.lr, cfg.sink_tables.layout)
        if cfg.compile:
            self.engine.compile(compile_kwargs={"dynamic": True})
        self.loader = build_train_loader(self.data, cfg, self.layout, self.model_cfg, self.sink_assignment,
                                         pin_memory=device.type == "cuda", compact=self.sharded)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep_last_k, env.rank, env.world_size)
        self.step = 0
        self.tokens_seen = 0
        self.last_sources: torch.Tensor | None = None  # host copy: distinct sources of the last first micro-batch
        self._reset_window()
        self._bad_streak = torch.zeros((), device=device)  # consecutive non-finite steps, as a device scalar
        self._worst_streak = torch.zeros((), device=device)
        self.callbacks = self._callbacks()

    # ------------------------------------------------------------------ set-up helpers
    def _freeze_rare_tokens(self, model: NullTransformer) -> list[int]:
        """`optim.freeze_rare_tokens`: hook the token rows of ids in at most n of this run's training sources (the
        counts leave `exclude_sources` out: a retrain oracle freezes by its own data); returns the frozen ids."""
        limit = self.cfg.optim.freeze_rare_tokens
        if limit is None:
            return []
        counts = token_source_counts(self.data.shard_dir, self.data.exclude_source_ids, model.cfg.padded_vocab_size)
        ids = rare_token_ids(counts, limit)
        freeze_token_rows(model, ids)
        if self.env.is_main:
            log.info("optim.freeze_rare_tokens=%d: %d of %d token rows (embedding and LM head) get no gradient",
                     limit, len(ids), model.cfg.padded_vocab_size)
        return ids.tolist()

    def meta(self) -> dict[str, Any]:
        """What nulls_meta.json records; the COMPAT_KEYS of checkpoint.py are checked on resume."""
        return {
            "config": self.resolved,
            "model": dataclasses.asdict(self.model_cfg),
            "sinks": self.sink_assignment.describe() if self.sink_assignment is not None else None,
            "data_manifest_sha256": self.data.manifest_sha256,
            "data_manifest_path": str(self.data.manifest_path),
            "registry_sha256": self.data.registry_sha256,
            "exclude_sources": list(self.data.exclude_source_ids),
            "frozen_token_ids": self.frozen_token_ids,
            "world_size": self.env.world_size,
            "zero_stage": self.cfg.deepspeed.zero_stage,
            "tokens_seen": self.tokens_seen,
            "seq_len": self.seq_len,
            "loader": {"num_streams": self.layout.num_streams, "global_batch": self.layout.global_batch},
            "sink_tables": self.tables.describe() if self.tables is not None else None,
        }

    def _callbacks(self) -> list[cb.Callback]:
        cfg = self.cfg
        items: list[cb.Callback] = [cb.SinkStats(), cb.SpeedMonitor(self.device)]  # speed reads sink stats
        if cfg.eval.num_batches > 0:
            trained, heldout = build_eval_batches(self.data, cfg, self.model_cfg, self.sink_assignment,
                                                  compact=self.sharded)
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

    def _reset_window(self) -> None:
        self._window_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        self._window_tokens = 0  # counted targets (host: the loader counts them)
        self._window_steps = 0
        self._window_start = time.perf_counter()

    # ------------------------------------------------------------------ collectives
    def _global_count(self, local: int) -> torch.Tensor:
        """The step's counted targets over all ranks, as a device scalar (one all-reduce; no host read)."""
        count = torch.tensor(float(local), device=self.device)
        if self.env.world_size > 1:
            dist.all_reduce(count)
        return count

    def _reduce_window(self, stop_requested: bool) -> dict[str, float]:
        """The log step's ONE collective: every rank's (loss sum, counted targets, stop flag, current and worst
        non-finite streak) gathered on the device, combined here (sums, any, max) and read back once."""
        local = torch.stack([self._window_loss.to(torch.float64),
                             torch.tensor(float(self._window_tokens), device=self.device, dtype=torch.float64),
                             torch.tensor(float(stop_requested), device=self.device, dtype=torch.float64),
                             self._bad_streak.to(torch.float64), self._worst_streak.to(torch.float64)])
        if self.env.world_size > 1:
            flat = torch.empty(self.env.world_size * local.numel(), device=self.device, dtype=local.dtype)
            dist.all_gather_into_tensor(flat, local)
            gathered = flat.view(self.env.world_size, local.numel())
        else:
            gathered = local[None]
        loss, tokens, stop, streak, worst = gathered.sum(0)[:2].tolist() + gathered.max(0).values[2:].tolist()
        return {"loss_sum": loss, "tokens": tokens, "stop": stop > 0, "streak": int(streak), "worst": int(worst)}

    def _check_divergence(self, reduced: dict[str, float]) -> None:
        limit = self.cfg.nonfinite_steps_to_stop
        if reduced["worst"] >= limit:
            raise DivergenceError(
                f"training diverged: {reduced['worst']} consecutive steps (up to step {self.step}) had a non-finite "
                f"loss or gradient (train.nonfinite_steps_to_stop={limit}); no checkpoint of this state was written "
                f"and none was deleted; the newest good one is {layout_fmt.read_latest(self.checkpointer.dir)}")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_loss(self, batches: list[dict[str, Any]], mode_for) -> float:
        """Mean loss over fixed batches under the SinkMode `mode_for(batch)`; over all ranks (one collective)."""
        self.engine.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count = 0
        for batch in batches:
            mode = mode_for(batch)
            plan = batch["plan"] if mode.kind == "train" else self.engine.module.make_plan(
                None, mode, tuple(batch["input_ids"].shape))
            rows = self.tables.rows_for(plan) if self.tables is not None else None  # no grad: no update
            batch = to_device({**batch, "plan": plan}, self.device)
            total += self.engine(batch["input_ids"], source_ids=batch["source_ids"], mode=mode, plan=batch["plan"],
                                 labels=batch["labels"], sink_rows=rows).to(torch.float64)
            count += batch["num_targets"]
        self.engine.train()
        both = torch.stack([total, torch.tensor(float(count), device=self.device, dtype=torch.float64)])
        if self.env.world_size > 1:
            dist.all_reduce(both)
        total, count = both.tolist()
        return total / max(1.0, count)

    # ------------------------------------------------------------------ the loop
    def _resume(self) -> None:
        ckpt = self.cfg.checkpoint
        if ckpt.start_over and self.env.is_main:
            moved = move_aside(self.run_dir)
            if moved is not None:
                log.warning("checkpoint.start_over: moved the old checkpoints to %s", moved)
        if dist.is_initialized():
            dist.barrier()
        point = self.resume_point
        if point is None:
            return
        saved, blob = self.checkpointer.load(self.engine, point, self.meta())
        if self.tables is not None:  # rows and optimizer state, resharded onto this world size when it changed
            self.tables.load(point.tag_dir)
        loader_state = layout_fmt.read_json(point.tag_dir / layout_fmt.LOADER_STATE_NAME, "loader state")
        if layout_fmt.purged_sources(saved):
            # the checkpoint was purged and `load` checked that this run excludes exactly the saved exclusion plus
            # the purged sources; exclusion only removes labels (the sample order is the same), so the data
            # position carries over under this run's exclusion
            loader_state = {**loader_state, "exclude_sha256": self.loader.streams.identity()["exclude_sha256"]}
        self.loader.load_state_dict(loader_state)
        self.step, self.tokens_seen = int(saved["step"]), int(saved["tokens_seen"])
        if blob is None:  # another world size: no per-rank RNG to restore; reseed deterministically
            seed_everything(self.cfg.seed + 1000003 * self.step + self.env.rank)
        changes = restore_schedule(self.engine, self.cfg, self.step, saved.get("config", {}).get("optim", {}),
                                   saved.get("config", {}).get("train", {}).get("max_steps"), self.group_specs)
        if self.env.is_main:
            log.info("resumed from %s at step %d%s", point.tag_dir, self.step,
                     f" (world size {saved['world_size']} -> {self.env.world_size})" if blob is None else "")
            for change in changes:
                log.warning("resume: %s (applied from this step on)", change)

    def _weights_finite(self) -> bool:
        flags = torch.stack([torch.isfinite(p).all() for p in self.engine.module.parameters()])
        ok = flags.all().to(torch.float32)
        if self.env.world_size > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def _save(self, reduced: dict[str, float]) -> None:
        finite = self._weights_finite() and (self.tables is None or self.tables.all_finite())  # both collectives
        if reduced["streak"] > 0 or not finite:
            raise DivergenceError(f"refusing to checkpoint step {self.step}: the last step's loss or gradient was "
                                  "not finite, or the weights are not; no good checkpoint was touched")
        states = [self.loader.state_dict()]
        if self.env.world_size > 1:
            states = [None] * self.env.world_size
            dist.all_gather_object(states, self.loader.state_dict())
        self.checkpointer.save(self.engine, self.step, self.meta(), {"rng": rng_state()}, merge_states(states),
                               sink_tables=self.tables)

    def _train_step(self, micro_batches: list[dict[str, Any]]) -> None:
        engine = self.engine
        local = sum(mb["num_targets"] for mb in micro_batches)
        count = self._global_count(local)
        # DeepSpeed divides by the accumulation steps and averages over ranks: undo both, divide by the count
        scale = (self.env.world_size * len(micro_batches)) / count.clamp(min=1.0)
        self.last_sources = micro_batches[0]["plan"].sources if "plan" in micro_batches[0] else None
        if self.tables is not None:
            self.tables.begin_step(self.step)
        step_loss = torch.zeros((), device=self.device, dtype=torch.float32)
        for micro in micro_batches:
            batch = to_device(micro, self.device)
            rows = self.tables.rows_for(micro["plan"]) if self.tables is not None else None  # [(R_l, 3D)]
            loss_sum = engine(batch["input_ids"], source_ids=batch["source_ids"], mode=SinkMode.train(),
                              plan=batch.get("plan"), labels=batch["labels"], sink_rows=rows)
            engine.backward(loss_sum * scale)
            engine.step()
            step_loss = step_loss + loss_sum.detach()
        bad = ~torch.isfinite(step_loss)
        if getattr(engine.optimizer, "overflow", False):  # DeepSpeed skipped the step: a non-finite gradient
            bad = torch.ones_like(bad)
        if self.tables is not None:  # the rows' update, skipped on every rank when the step is bad on any
            bad = self.tables.end_step(bad)
        self._bad_streak = torch.where(bad, self._bad_streak + 1, torch.zeros_like(self._bad_streak))
        self._worst_streak = torch.maximum(self._worst_streak, self._bad_streak)
        self._window_loss += torch.where(bad, 0.0, step_loss.to(torch.float64))
        self._window_tokens += local
        self._window_steps += 1
        self.tokens_seen += self.layout.global_batch * self.seq_len

    def _sync_check(self):
        """train.sync_debug on CUDA: a host-device synchronisation inside the step raises, except on steps that
        end with a log reduction (which reads the metrics back by design)."""
        import contextlib

        if not (self.cfg.sync_debug and self.device.type == "cuda"):
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def checked():
            torch.cuda.set_sync_debug_mode("error")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return checked()

    def _base_lr(self) -> float:
        """The schedule's current lr (`optim.lr` x schedule): a group's lr divided by its `optim.lr_scale`."""
        for group in self.engine.optimizer.param_groups:
            if group.get("lr_scale", 1.0) > 0:
                return float(group["lr"]) / float(group.get("lr_scale", 1.0))
        return 0.0

    def _log_metrics(self, reduced: dict[str, float]) -> dict[str, Any]:
        elapsed = time.perf_counter() - self._window_start  # honest on a GPU: the reduction just synchronised
        steps = max(1, self._window_steps)
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {
            "train/loss": reduced["loss_sum"] / max(1.0, reduced["tokens"]),
            "train/lr": self._base_lr(),
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/step_time_s": elapsed / steps,
            "train/tokens_per_step": self.layout.global_batch * self.seq_len,
            "train/counted_targets_per_step": reduced["tokens"] / steps,
            "train/tokens_seen": self.tokens_seen,
            "train/nonfinite_streak": reduced["streak"],
        }
        if self.tables is not None:
            metrics["train/sink_lr"] = self.tables.lr
        self._reset_window()
        return metrics

    def fit(self, stop: StopFlag | None = None) -> int:
        cfg = self.cfg
        self._resume()
        owns_stop = stop is None
        stop = stop or StopFlag().install()
        for callback in self.callbacks:
            callback.on_train_start(self)
        steps = iter(self.loader)
        exit_code = 0
        try:
            last_step = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
            while self.step < last_step:
                batches = next(steps)  # the loader's host work stays outside the checked region
                with self._sync_check():
                    self._train_step(batches)
                self.step += 1
                save_now = self.step % cfg.checkpoint.every_n_steps == 0 or self.step == last_step
                eval_now = cfg.eval.num_batches > 0 and self.step % cfg.eval.every_n_steps == 0
                # a single process may look at its own flag every step; ranks agree on log and save steps
                local_stop = self.env.world_size == 1 and stop.requested
                if not (self.is_log_step(self.step) or save_now or eval_now or local_stop):
                    continue
                reduced = self._reduce_window(stop.requested)
                self._check_divergence(reduced)
                metrics = self._log_metrics(reduced)
                for callback in self.callbacks:
                    callback.on_step_end(self, self.step, metrics)
                if save_now or reduced["stop"]:
                    self._save(reduced)
                if reduced["stop"]:
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
