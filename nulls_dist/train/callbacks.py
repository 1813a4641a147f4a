"""Training extras as small callbacks (OLMo-core style): each one sees the trainer at fixed points and adds
metrics to the step's dict or writes them somewhere. Producers (speed, sink statistics, evaluation) run before
writers (JSONL, wandb, console); the trainer calls them in list order.

Hooks: `on_train_start(trainer)`, `on_step_end(trainer, step, metrics)`, `on_train_end(trainer)`.
`metrics` is the dict of the finished optimizer step; writers only write on log steps (`trainer.is_log_step`).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from nulls_dist.model import SinkMode, flops_per_token

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s (no sparsity) from the vendors' data sheets, keyed by a substring of
# torch.cuda.get_device_name(). Checked in order: the more specific name first. Unknown devices get no MFU.
PEAK_BF16_FLOPS = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM / HBM3
    ("A100", 312e12),
    ("L40S", 362e12),
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def device_peak_flops(device: torch.device) -> float | None:
    """The device's known bf16 peak, or None (CPU, unknown cards): MFU is never computed from a guess."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    return None


class Callback:
    def on_train_start(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass


class SpeedMonitor(Callback):
    """tokens/s, step time, memory, FLOP/s of the gathered model and of the dense-equivalent masked model, MFU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = device_peak_flops(device)

    def on_step_end(self, trainer, step, metrics):
        seq_len = trainer.seq_len
        step_time = metrics["train/step_time_s"]
        tokens_per_s = metrics["train/tokens_per_step"] / step_time
        sinks = metrics.get("sinks/active_per_source")
        gathered = flops_per_token(trainer.model_cfg, seq_len, gathered=True, mean_sinks_per_source=sinks)
        masked = flops_per_token(trainer.model_cfg, seq_len, gathered=False)
        world = trainer.env.world_size
        metrics["speed/tokens_per_s"] = tokens_per_s
        metrics["speed/tokens_per_s_per_device"] = tokens_per_s / world
        metrics["speed/flops_per_s_gathered"] = gathered * tokens_per_s
        metrics["speed/flops_per_s_masked_equiv"] = masked * tokens_per_s
        if self.peak is not None:
            metrics["speed/mfu"] = gathered * tokens_per_s / world / self.peak
            metrics["speed/mfu_masked_equiv"] = masked * tokens_per_s / world / self.peak
        if self.device.type == "cuda":
            metrics["mem/max_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            metrics["mem/reserved_gib"] = torch.cuda.memory_reserved(self.device) / 2**30
        else:
            import resource

            metrics["mem/max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sink_statistics(assignment, sources: torch.Tensor) -> dict[str, float]:
    """Distinct sources of a micro-batch (host tensor, from its sink plan), mean active sinks per source, pool
    units shared by >= 2 sources."""
    sources = torch.unique(sources.to(torch.int64).cpu())  # (U,) on the host: no device read
    rows = assignment.rows(sources, layer=0)  # (U, K), -1 padded
    active = rows >= 0
    # counts of the touched units only: a bincount over the pool would allocate P counters (2**24 and more)
    _, load = torch.unique(rows[active], return_counts=True)  # (units touched,)
    return {
        "sinks/distinct_sources": float(sources.numel()),
        "sinks/active_per_source": float(active.sum(1).float().mean()),
        "sinks/shared_units": float((load >= 2).sum()),
        "sinks/units_touched": float(load.numel()),
    }


class SinkStats(Callback):
    """Sink statistics of the last step's first micro-batch (this rank's), on log steps."""

    def on_step_end(self, trainer, step, metrics):
        if trainer.is_log_step(step) and trainer.model_cfg.n_sink > 0 and trainer.last_sources is not None:
            metrics.update(sink_statistics(trainer.sink_assignment, trainer.last_sources))


class Evaluator(Callback):
    """Every N steps: loss on held-out sources (backbone_only; sink_off routed to a trained source with the
    held-out sources forgotten) and on trained sources (train = each token's own sink_on mask; backbone_only).

    There is no embedding router at training time, so sink_off routes every held-out token to the first
    trained source of the evaluation batches; it measures what a forgotten article's text costs once its own
    sinks can never be reached.
    """

    def __init__(self, every_n_steps: int, trained_batches, heldout_batches):
        self.every_n_steps = every_n_steps
        self.trained = trained_batches  # a list of fixed batches (dicts), the same at every evaluation
        self.heldout = heldout_batches

    def on_step_end(self, trainer, step, metrics):
        if step % self.every_n_steps and step != trainer.cfg.max_steps:
            return
        metrics.update(self.evaluate(trainer))

    def evaluate(self, trainer) -> dict[str, float]:
        results = {}
        if self.trained:
            results["eval/trained_sink_on_loss"] = trainer.eval_loss(self.trained, lambda b: SinkMode.train())
            results["eval/trained_backbone_only_loss"] = trainer.eval_loss(self.trained,
                                                                           lambda b: SinkMode.backbone_only())
        if self.heldout:
            results["eval/heldout_backbone_only_loss"] = trainer.eval_loss(self.heldout,
                                                                           lambda b: SinkMode.backbone_only())
            if self.trained:
                route = int(self.trained[0]["source_ids"][0, 0])
                results["eval/heldout_sink_off_loss"] = trainer.eval_loss(
                    self.heldout, lambda b: SinkMode.sink_off(route, torch.unique(b["source_ids"]).tolist()))
        return results


class JsonlWriter(Callback):
    """One JSON object per log step in `<run_dir>/metrics.jsonl` (rank 0; appended across resumes)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def on_train_start(self, trainer):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")

    def on_step_end(self, trainer, step, metrics):
        if trainer.is_log_step(step) or any(k.startswith("eval/") for k in metrics):
            self._file.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
            self._file.flush()

    def on_train_end(self, trainer):
        if self._file is not None:
            self._file.close()
            self._file = None


class WandbLogger(Callback):
    """wandb (offline unless configured or WANDB_MODE says otherwise). The run id lives in
    `<run_dir>/wandb_run_id` so a resumed run continues the same wandb run (`resume="allow"`)."""

    def __init__(self, run_dir: Path, mode: str, project: str, entity: str | None, config: dict[str, Any]):
        self.run_dir, self.mode, self.project, self.entity, self.config = run_dir, mode, project, entity, config
        self.run = None

    def on_train_start(self, trainer):
        import os
        import secrets

        import wandb

        id_path = self.run_dir / "wandb_run_id"
        if id_path.is_file():
            run_id = id_path.read_text().strip()
        else:
            run_id = secrets.token_hex(8)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            id_path.write_text(run_id + "\n")
        mode = os.environ.get("WANDB_MODE", self.mode)
        self.run = wandb.init(project=self.project, entity=self.entity, id=run_id, resume="allow", mode=mode,
                              dir=str(self.run_dir), config=self.config, name=self.run_dir.name)

    def on_step_end(self, trainer, step, metrics):
        if self.run is not None and (trainer.is_log_step(step) or any(k.startswith("eval/") for k in metrics)):
            self.run.log(metrics, step=step)

    def on_train_end(self, trainer):
        if self.run is not None:
            self.run.finish()
            self.run = None


class ConsoleProgress(Callback):
    """A log line per log step on rank 0: step, loss, lr, grad norm, tokens/s, eval losses."""

    def __init__(self):
        self.start = None

    def on_train_start(self, trainer):
        self.start = time.perf_counter()

    def on_step_end(self, trainer, step, metrics):
        if not (trainer.is_log_step(step) or any(k.startswith("eval/") for k in metrics)):
            return
        parts = [f"step {step}/{trainer.cfg.max_steps}", f"loss {metrics['train/loss']:.4f}",
                 f"lr {metrics['train/lr']:.2e}", f"grad_norm {metrics['train/grad_norm']:.3f}",
                 f"{metrics.get('speed/tokens_per_s', 0):.0f} tok/s",
                 f"elapsed {time.perf_counter() - self.start:.0f}s"]
        parts += [f"{k[5:]} {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("eval/")]
        log.info(" | ".join(parts))
