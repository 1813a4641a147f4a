"""Typed configuration of a training run: one dataclass per Hydra config group plus `TrainConfig`, and
`train_config_from_omegaconf`, the single place a Hydra/OmegaConf object becomes typed values.

Nothing below the entry point reads OmegaConf; every section validates itself and raises `ValueError`
naming the field (`deepspeed.zero_stage`, `optim.lr`, ...) and its value.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from nulls_dist.config import PARAMETER_KINDS

WANDB_MODES = ("offline", "online", "disabled")
DEVICES = ("auto", "cpu", "cuda")
SINK_PATHS = ("gathered", "masked")
RESUME_KEYWORDS = ("auto", "never")
ATTENTION_IMPLS = ("auto", "sdpa", "flex")
SINK_TABLE_MODES = ("dense", "sharded", "auto")
SINK_TABLE_LAYOUTS = ("per_layer", "shared")  # train/sink_tables.py explains both
SINK_TABLE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")  # what fbgemm-gpu-cpu runs exactly on the CPU
# sink_tables.mode=auto shards a pool of at least this many rows per layer: the forget budget's range starts at
# 2**20 (docs/nulls_facts.md), and there dense ZeRO already spends 4.3x the table per rank and ~200x the sparse
# step time on the 2-core box (docs/sink_tables.md, "Benchmark")
SINK_TABLES_AUTO_MIN_ROWS = 2**20


def _check(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value, "a positive integer")


def _finite(name: str, value: Any, lo: float, hi: float, what: str) -> None:
    """A real number in [lo, hi] (rejects inf, nan, booleans and strings)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and lo <= value <= hi
    _check(ok, name, value, what)


@dataclass
class ModelSection:
    """A `NullConfig` preset plus field overrides (`conf/model/*.yaml`)."""

    preset: str = "debug"
    overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _check(isinstance(self.preset, str) and bool(self.preset), "model.preset", self.preset, "a preset name")
        _check(isinstance(self.overrides, dict), "model.overrides", self.overrides, "a mapping")


@dataclass
class DataSection:
    """The data pipeline's config (`conf/data/*.yaml`, owned by data_pipeline) and loader settings."""

    pipeline: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 0
    num_streams: int | None = None  # None: the most a later resume on another world size can use (loader.py)
    verify_shards: bool | None = None  # sha256 of every shard at start-up; None: for datasets up to 256 shards
    prepare_if_missing: bool = True
    exclude_sources: list[Any] = field(default_factory=list)

    def validate(self) -> None:
        _check(isinstance(self.pipeline, dict) and bool(self.pipeline), "data", self.pipeline,
               "a non-empty data pipeline config")
        _check(isinstance(self.num_workers, int) and self.num_workers >= 0, "data_loader.num_workers",
               self.num_workers, "a non-negative integer")
        if self.num_streams is not None:
            _positive_int("data_loader.num_streams", self.num_streams)
        _check(self.verify_shards in (None, True, False), "data_loader.verify_shards", self.verify_shards,
               "true, false or null")
        _check(isinstance(self.exclude_sources, list), "train.exclude_sources", self.exclude_sources,
               "a list of source ids or titles")


@dataclass
class OptimConfig:
    """AdamW with linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`.

    `lr_scale` multiplies the learning rate (and so the schedule) of one part of the model, by kind
    (`nulls_dist.config.PARAMETER_KINDS`: embedding, attention, backbone, sink, norm, lm_head), e.g.
    {backbone: 0.1} for a slower backbone; each distinct scale is its own optimizer param group.
    `freeze_rare_tokens` = n: the rows of the token embedding and the LM head of every token id that occurs in
    at most n of the run's training sources get no gradient (docs/residue.md: their per-source knowledge then
    has only the sinks to live in); None trains every row."""

    lr: float = 5e-4
    min_lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    lr_scale: dict[str, float] = field(default_factory=dict)
    freeze_rare_tokens: int | None = None

    def validate(self) -> None:
        # AdamW moves every weight by about lr per step: an lr above 1 diverges on any model (and inf/nan never
        # trains), so both are refused here rather than discovered as NaN losses.
        _finite("optim.lr", self.lr, 1e-12, 1.0, "a finite number in (0, 1]")
        _finite("optim.min_lr", self.min_lr, 0.0, self.lr, f"a finite number in [0, optim.lr={self.lr}]")
        _check(len(self.betas) == 2 and all(isinstance(b, (int, float)) and math.isfinite(b) and 0 <= b < 1
                                            for b in self.betas), "optim.betas", self.betas, "two numbers in [0, 1)")
        _finite("optim.eps", self.eps, 1e-30, 1.0, "a finite number in (0, 1]")
        _finite("optim.weight_decay", self.weight_decay, 0.0, 10.0, "a finite number in [0, 10]")
        _check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "optim.warmup_steps",
               self.warmup_steps, "a non-negative integer")
        _check(isinstance(self.lr_scale, dict), "optim.lr_scale", self.lr_scale,
               f"a mapping of parameter kinds {PARAMETER_KINDS} to scales")
        for kind, scale in self.lr_scale.items():
            _check(kind in PARAMETER_KINDS, "optim.lr_scale", kind, f"keyed by the parameter kinds {PARAMETER_KINDS}")
            # 0 freezes a kind (weight decay scales with the lr, so it stops too); above 10 no lr stays sane
            _finite(f"optim.lr_scale.{kind}", scale, 0.0, 10.0, "a finite number in [0, 10]")
        if self.freeze_rare_tokens is not None:
            _check(isinstance(self.freeze_rare_tokens, int) and not isinstance(self.freeze_rare_tokens, bool)
                   and self.freeze_rare_tokens >= 0, "optim.freeze_rare_tokens", self.freeze_rare_tokens,
                   "null or a non-negative integer (a number of training sources)")


@dataclass
class DeepSpeedSection:
    """ZeRO stage and batch geometry; the DeepSpeed JSON is generated from this (`ds_config.py`)."""

    zero_stage: int = 1
    micro_batch: int = 8
    grad_accum: int = 1
    global_batch: int | None = None  # samples per step over all ranks; set: grad_accum = global / (micro x ranks)
    clip: float = 1.0
    activation_checkpointing: bool = False
    offload: str = "no"

    def validate(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", self.zero_stage, "one of 0, 1, 2, 3")
        _positive_int("deepspeed.micro_batch", self.micro_batch)
        _positive_int("deepspeed.grad_accum", self.grad_accum)
        if self.global_batch is not None:
            _positive_int("deepspeed.global_batch", self.global_batch)
        _finite("deepspeed.clip", self.clip, 0.0, 1e6, "a finite non-negative number (0 disables clipping)")
        _check(self.offload == "no", "deepspeed.offload", self.offload, "'no' (offload is not supported)")


@dataclass
class SinkTablesSection:
    """Where the sink rows live (docs/sink_tables.md): `dense` = model parameters in the DeepSpeed engine (AdamW,
    like every other weight); `sharded` = TorchRec tables row-wise sharded over the ranks beside the engine,
    updated by fbgemm's exact sparse `optimizer` at `lr` (times the dense schedule's warmup/cosine multiplier
    when `follow_schedule`); `auto` = sharded when the pool has at least `auto_min_rows` rows per layer."""

    mode: str = "auto"
    auto_min_rows: int = SINK_TABLES_AUTO_MIN_ROWS
    layout: str = "per_layer"
    optimizer: str = "rowwise_adagrad"
    lr: float = 0.01
    follow_schedule: bool = True
    eps: float = 1e-8
    init_std: float = 0.02

    def validate(self) -> None:
        _check(self.mode in SINK_TABLE_MODES, "sink_tables.mode", self.mode, f"one of {SINK_TABLE_MODES}")
        _positive_int("sink_tables.auto_min_rows", self.auto_min_rows)
        _check(self.layout in SINK_TABLE_LAYOUTS, "sink_tables.layout", self.layout, f"one of {SINK_TABLE_LAYOUTS}")
        _check(self.optimizer in SINK_TABLE_OPTIMIZERS, "sink_tables.optimizer", self.optimizer,
               f"one of {SINK_TABLE_OPTIMIZERS}")
        # row-wise Adagrad's first step moves a row by about lr (docs/sink_tables.md): above 1 nothing trains
        _finite("sink_tables.lr", self.lr, 1e-12, 1.0, "a finite number in (0, 1]")
        _check(isinstance(self.follow_schedule, bool), "sink_tables.follow_schedule", self.follow_schedule,
               "true or false")
        _finite("sink_tables.eps", self.eps, 1e-30, 1.0, "a finite number in (0, 1]")
        _finite("sink_tables.init_std", self.init_std, 0.0, 1.0, "a finite number in [0, 1]")

    def sharded(self, rows_per_layer: int) -> bool:
        """Whether a pool of `rows_per_layer` rows lives in sharded tables under this section."""
        return self.mode == "sharded" or (self.mode == "auto" and rows_per_layer >= self.auto_min_rows)


@dataclass
class LoggingConfig:
    """Where metrics go: wandb (offline by default), the run's JSONL file, the console."""

    wandb_mode: str = "offline"
    project: str = "nulls_dist"
    entity: str | None = None
    log_every: int = 10
    jsonl: bool = True

    def validate(self) -> None:
        _check(self.wandb_mode in WANDB_MODES, "logging.wandb_mode", self.wandb_mode, f"one of {WANDB_MODES}")
        _positive_int("logging.log_every", self.log_every)


@dataclass
class CheckpointConfig:
    """Save every N steps and at the end, keep the newest K; `resume` is auto | never | a checkpoint path;
    `start_over` is the explicit permission to start a run directory that holds checkpoints again (they are
    moved aside, never deleted)."""

    every_n_steps: int = 500
    keep_last_k: int = 3
    resume: str = "auto"
    start_over: bool = False

    def validate(self) -> None:
        _positive_int("checkpoint.every_n_steps", self.every_n_steps)
        _positive_int("checkpoint.keep_last_k", self.keep_last_k)
        _check(isinstance(self.start_over, bool), "checkpoint.start_over", self.start_over, "true or false")
        _check(isinstance(self.resume, str) and bool(self.resume), "checkpoint.resume", self.resume,
               "'auto', 'never' or a checkpoint path")


@dataclass
class EvalConfig:
    """Periodic evaluation: `num_batches` micro-batches each of held-out and trained sources (0 = off)."""

    every_n_steps: int = 200
    num_batches: int = 2

    def validate(self) -> None:
        _positive_int("eval.every_n_steps", self.every_n_steps)
        _check(isinstance(self.num_batches, int) and self.num_batches >= 0, "eval.num_batches", self.num_batches,
               "a non-negative integer")


@dataclass
class TrainConfig:
    """Everything one run needs, fully typed."""

    max_steps: int = 1000
    stop_at_step: int | None = None  # end this invocation after that step (checkpointed); the schedule keeps max_steps
    seed: int = 0
    run_dir: str = "runs/default"
    device: str = "auto"
    cpu_threads: int | None = None  # torch intra-op threads on CPU (None: torch's default, one per core)
    sink_path: str = "gathered"
    attention: str = "auto"  # auto (FlexAttention on CUDA for packed rows, SDPA otherwise) | sdpa | flex
    compile: bool = False  # torch.compile the model (the engine's module)
    debug_checks: bool = False  # validate every sink plan and kernel launch (host syncs)
    nonfinite_steps_to_stop: int = 3  # consecutive steps with a non-finite loss or gradient that end the run
    skip_nonfinite_steps: bool = True  # DeepSpeed skips a step with a non-finite gradient (one host read per step)
    sync_debug: bool = False  # CUDA: torch.cuda.set_sync_debug_mode("error") over every step between log steps
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sink_tables: SinkTablesSection = field(default_factory=SinkTablesSection)

    def validate(self) -> None:
        _positive_int("train.max_steps", self.max_steps)
        if self.stop_at_step is not None:
            _positive_int("train.stop_at_step", self.stop_at_step)
        _check(isinstance(self.seed, int) and self.seed >= 0, "train.seed", self.seed, "a non-negative integer")
        _check(isinstance(self.run_dir, str) and bool(self.run_dir), "train.run_dir", self.run_dir, "a path")
        _check(self.device in DEVICES, "train.device", self.device, f"one of {DEVICES}")
        if self.cpu_threads is not None:
            _positive_int("train.cpu_threads", self.cpu_threads)
        _check(self.sink_path in SINK_PATHS, "train.sink_path", self.sink_path, f"one of {SINK_PATHS}")
        _check(self.attention in ATTENTION_IMPLS, "train.attention", self.attention, f"one of {ATTENTION_IMPLS}")
        _check(isinstance(self.compile, bool), "train.compile", self.compile, "true or false")
        _check(isinstance(self.debug_checks, bool), "train.debug_checks", self.debug_checks, "true or false")
        _positive_int("train.nonfinite_steps_to_stop", self.nonfinite_steps_to_stop)
        _check(isinstance(self.skip_nonfinite_steps, bool), "train.skip_nonfinite_steps", self.skip_nonfinite_steps,
               "true or false")
        _check(isinstance(self.sync_debug, bool), "train.sync_debug", self.sync_debug, "true or false")
        for section in (self.model, self.data, self.optim, self.deepspeed, self.logging, self.checkpoint, self.eval,
                        self.sink_tables):
            section.validate()
        _check(self.optim.warmup_steps <= self.max_steps, "optim.warmup_steps", self.optim.warmup_steps,
               f"at most train.max_steps={self.max_steps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section(cls: type, values: Any, name: str):
    """Build dataclass `cls` from a plain mapping, rejecting unknown keys by name."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ValueError(f"{name} must be a mapping, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown field(s) {[f'{name}.{k}' for k in unknown]}; known: {sorted(known)}")
    values = dict(values)
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return cls(**values)


def train_config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Typed, validated `TrainConfig` from the resolved root config as plain containers.

    Layout (conf/nulls_train.yaml): `train` (run fields), `model`, `data` (pipeline config), `data_loader`,
    `optim`, `deepspeed`, `logging`, `checkpoint`, `eval`, `sink_tables`.
    """
    known = {"train", "model", "data", "data_loader", "optim", "deepspeed", "logging", "checkpoint", "eval",
             "sink_tables", "experiment"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown top-level config key(s) {unknown}; known: {sorted(known)}")
    train = dict(raw.get("train") or {})
    loader = dict(raw.get("data_loader") or {})
    if "exclude_sources" in train:
        loader["exclude_sources"] = list(train.pop("exclude_sources") or [])
    run_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {
        "model", "data", "optim", "deepspeed", "logging", "checkpoint", "eval", "sink_tables"}
    unknown = sorted(set(train) - run_fields)
    if unknown:
        raise ValueError(f"unknown field(s) {[f'train.{k}' for k in unknown]}; known: {sorted(run_fields)}")
    cfg = TrainConfig(
        **train,
        model=_section(ModelSection, raw.get("model"), "model"),
        data=_section(DataSection, {"pipeline": dict(raw.get("data") or {}), **loader}, "data_loader"),
        optim=_section(OptimConfig, raw.get("optim"), "optim"),
        deepspeed=_section(DeepSpeedSection, raw.get("deepspeed"), "deepspeed"),
        logging=_section(LoggingConfig, raw.get("logging"), "logging"),
        checkpoint=_section(CheckpointConfig, raw.get("checkpoint"), "checkpoint"),
        eval=_section(EvalConfig, raw.get("eval"), "eval"),
        sink_tables=_section(SinkTablesSection, raw.get("sink_tables"), "sink_tables"),
    )
    cfg.validate()
    return cfg


def train_config_from_omegaconf(cfg: Any) -> TrainConfig:
    """Resolve an OmegaConf/Hydra config and build the typed `TrainConfig` (the entry point's only job)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(raw, dict):
        raise ValueError(f"the training config must be a mapping, got {type(raw).__name__}")
    return train_config_from_dict(raw)
