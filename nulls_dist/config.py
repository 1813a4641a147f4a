"""The NULL model's configuration: `NullConfig`, its named presets and validation.

Field names mirror litgpt's `Config` and the released NULLs `model_config.yaml` (so a released config loads
unchanged through `from_litgpt_yaml`); the `sink_*`, `num_sources` and `sink_path` fields are ours.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SINK_PATHS = ("gathered", "masked")
SINK_STRATEGIES = ("reference", "uniform", "code")
MAX_SINK_POOL_SIZE = 2**31 - 1  # sink indices are int32-ranged (SinkAssignmentConfig.pool_size)
# The parts of a NULL whose parameters train differently (per-kind learning-rate scales, `optim.lr_scale`): the
# token embedding, attention, the MLP's always-on backbone units, the per-source sink tables, the RMSNorm
# weights and the LM head (`nulls_dist.model.parameter_kind` maps a parameter name to its kind).
PARAMETER_KINDS = ("embedding", "attention", "backbone", "sink", "norm", "lm_head")

# litgpt fields whose value changes the computation: a released config must carry exactly these values
# (the NULL model is Llama-style with a non-parallel residual), otherwise loading it would silently differ.
_LITGPT_REQUIRED = {
    "norm_class_name": "RMSNorm",
    "mlp_class_name": "LLaMAMLP",
    "parallel_residual": False,
    "shared_attention_norm": False,
    "attn_bias": False,
    "lm_head_bias": False,
    "scale_embeddings": False,
    "norm_qk": False,
    "post_attention_norm": False,
    "post_mlp_norm": False,
    "sliding_window_size": None,
    "attention_logit_softcapping": None,
    "final_logit_softcapping": None,
    "attention_scores_scalar": None,
    "rope_adjustments": None,
    "rope_condense_ratio": 1,
    "rope_interleave": False,
    "n_expert": 0,
    "latent_attention": None,
}


@dataclass
class NullConfig:
    """One NULL transformer. `p_gen` of the SwiGLU hidden units are the backbone, the rest the sink pool."""

    name: str = "debug"
    block_size: int = 256
    vocab_size: int = 4096
    padded_vocab_size: int | None = None
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_query_groups: int = 2
    head_size: int | None = None
    intermediate_size: int = 512
    p_gen: float = 0.125
    p_mem: float = 0.05
    norm_eps: float = 1e-5
    rope_base: int = 10000
    rotary_percentage: float = 1.0
    bias: bool = False
    # ours: how sources map to sink units, and how the sink MLP is executed
    sink_strategy: str = "reference"
    sink_k: int | None = None
    sink_layer_specific: bool = False
    sink_seed: int = 0
    sink_id_dtype: str = "int64"
    # sink rows per layer for `uniform`/`code` when the pool outgrows intermediate_size (2**20..2**24 and beyond:
    # docs/sink_tables.md); None = the published split, intermediate_size - n_backbone (`reference` always)
    sink_pool_size: int | None = None
    num_sources: int | None = None  # when set, valid source ids are [min_source_id, min_source_id + num_sources)
    min_source_id: int = 0
    sink_path: str = "gathered"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
        if self.head_size is None:
            if self.n_head <= 0 or self.n_embd % self.n_head:
                raise ValueError(
                    f"head_size is unset and n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
                )
            self.head_size = self.n_embd // self.n_head
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot build a model."""
        for name in ("block_size", "vocab_size", "n_layer", "n_embd", "n_head", "n_query_groups", "head_size",
                     "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size={self.padded_vocab_size} is smaller than vocab_size={self.vocab_size}")
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_query_groups={self.n_query_groups}")
        if self.bias:
            raise ValueError("bias=True is not supported: the NULL model has no bias terms")
        if not 0.0 < self.p_gen <= 1.0:
            raise ValueError(f"p_gen must lie in (0, 1], got {self.p_gen}")
        if not 0.0 <= self.p_mem <= 1.0:
            raise ValueError(f"p_mem must lie in [0, 1], got {self.p_mem}")
        units = self.intermediate_size * self.p_gen
        if abs(units - round(units)) > 1e-6 or round(units) == 0:
            raise ValueError(
                f"intermediate_size * p_gen = {self.intermediate_size} * {self.p_gen} = {units} is not a whole, "
                "positive number of backbone units"
            )
        if not 0.0 < self.rotary_percentage <= 1.0 or int(self.rotary_percentage * self.head_size) % 2:
            raise ValueError(f"rotary_percentage={self.rotary_percentage} must give an even number of rotary dims")
        if self.sink_strategy not in SINK_STRATEGIES:
            raise ValueError(f"sink_strategy must be one of {SINK_STRATEGIES}, got {self.sink_strategy!r}")
        if self.sink_path not in SINK_PATHS:
            raise ValueError(f"sink_path must be one of {SINK_PATHS}, got {self.sink_path!r}")
        self._validate_pool_size()
        if self.sink_k is not None and not 0 < self.sink_k <= self.n_sink:
            raise ValueError(f"sink_k={self.sink_k} must lie in [1, pool size n_sink={self.n_sink}]")
        if self.num_sources is not None and self.num_sources <= 0:
            raise ValueError(f"num_sources must be positive, got {self.num_sources}")
        if self.sink_id_dtype not in ("int64", "int32"):
            raise ValueError(f"sink_id_dtype must be 'int64' or 'int32', got {self.sink_id_dtype!r}")
        if self.min_source_id < 0:
            raise ValueError(f"min_source_id must be non-negative, got {self.min_source_id}")
        if self.n_sink > 0:
            self.sink_assignment_config()  # validates the sink fields (e.g. layer_specific with 'reference')

    def _validate_pool_size(self) -> None:
        """`sink_pool_size`: a pool decoupled from intermediate_size, for the strategies that scale to it."""
        size = self.sink_pool_size
        if size is None:
            return
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SINK_POOL_SIZE:
            raise ValueError(f"sink_pool_size must be an integer in [1, 2**31 - 1] (the sink hash's index range), "
                             f"got {size!r}")
        if self.sink_strategy == "reference":
            raise ValueError(f"sink_pool_size={size} is for sink_strategy 'uniform' or 'code': 'reference' (the "
                             f"published hash) keeps its pool, intermediate_size - int(intermediate_size * p_gen) = "
                             f"{self.intermediate_size - self.n_backbone}")
        if self.sink_k is None:
            raise ValueError(f"sink_k must be set with sink_pool_size={size}: the default k (p_mem * pool for "
                             "'uniform', q for 'code') grows with the pool")

    # ---------------------------------------------------------------- derived sizes
    @property
    def n_backbone(self) -> int:
        """Always-on SwiGLU units per layer: the first int(intermediate_size * p_gen)."""
        return int(round(self.intermediate_size * self.p_gen))

    @property
    def n_sink(self) -> int:
        """Sink pool units per layer: `sink_pool_size`, else the rest of intermediate_size (0 when p_gen = 1)."""
        if self.sink_pool_size is not None:
            return self.sink_pool_size
        return self.intermediate_size - self.n_backbone

    @property
    def n_mlp_units(self) -> int:
        """Every SwiGLU unit of a layer, backbone and pool: the width of litgpt's fc_1 / fc_2 / proj, and what the
        dense masked form computes per token (intermediate_size unless `sink_pool_size` is set)."""
        return self.n_backbone + self.n_sink

    @property
    def rope_n_elem(self) -> int:
        return int(self.rotary_percentage * self.head_size)

    @property
    def backbone_only_scale(self) -> float:
        """Backbone-only mode rescales the backbone by (p_gen + p_mem) / p_gen (docs/nulls_facts.md)."""
        return (self.p_gen + self.p_mem) / self.p_gen

    def sink_assignment_config(self):
        """The `SinkAssignmentConfig` of this model's pool (pool_size = n_sink)."""
        from nulls_dist.sink_config import SinkAssignmentConfig

        return SinkAssignmentConfig(
            strategy=self.sink_strategy,
            pool_size=self.n_sink,
            p_mem=self.p_mem,
            k=self.sink_k,
            layer_specific=self.sink_layer_specific,
            seed=self.sink_seed,
            num_sources=self.num_sources,
            id_dtype=self.sink_id_dtype,
            min_source_id=self.min_source_id,
        )

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "NullConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        fields = {**PRESETS[name], **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown NullConfig field(s) {unknown} in overrides of preset {name!r}")
        return cls(**fields)

    @classmethod
    def from_litgpt_dict(cls, values: dict[str, Any], source: str = "config") -> "NullConfig":
        """Build from a litgpt-style dict (e.g. a released model_config.yaml). Fields we do not model must
        hold the Llama-style values of `_LITGPT_REQUIRED`; other litgpt-only keys are kept in `extra`."""
        for key, required in _LITGPT_REQUIRED.items():
            if key in values and values[key] != required and not (required is None and values[key] in ({}, [])):
                raise ValueError(
                    f"{source}: {key}={values[key]!r} is not supported (the NULL model needs {required!r})"
                )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in values.items() if k in known}
        if kwargs.get("n_query_groups") is None:
            kwargs["n_query_groups"] = values.get("n_head", cls.n_head)
        kwargs["extra"] = {k: v for k, v in values.items() if k not in known}
        missing = [k for k in ("p_gen", "p_mem") if k not in values]
        if missing:
            raise ValueError(f"{source}: missing NULL field(s) {missing}")
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ValueError(f"{source}: {exc}") from exc

    @classmethod
    def from_litgpt_yaml(cls, path: str | Path) -> "NullConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"model config file not found: {path}")
        values = yaml.safe_load(path.read_text())
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(values).__name__}")
        return cls.from_litgpt_dict(values, source=str(path))

    def to_litgpt_dict(self) -> dict[str, Any]:
        """The litgpt-style dict written beside a saved checkpoint (litgpt keys + p_gen/p_mem + ours)."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        values.update(self.extra)
        values.update({k: v for k, v in _LITGPT_REQUIRED.items() if k not in values})
        return values

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # Tiny: seconds on CPU. 64 backbone units, a 448-unit pool (~22 sinks per source under p_mem 0.05).
    "debug": dict(
        name="debug", block_size=256, vocab_size=4096, n_layer=2, n_embd=64, n_head=4, n_query_groups=2,
        head_size=16, intermediate_size=512, p_gen=0.125, p_mem=0.05, rope_base=10000,
    ),
    # The published 1B Wikipedia model (docs/nulls_facts.md): 500 backbone units, a 7692-unit pool, ~100 sinks per source.
    "paper_wiki_1b": dict(
        name="paper_wiki_1b", block_size=1024, vocab_size=49152, padded_vocab_size=49152, n_layer=32, n_embd=960,
        n_head=15, n_query_groups=5, head_size=128, intermediate_size=8192, p_gen=0.06103515625, p_mem=0.013,
        norm_eps=1e-5, rope_base=100000, bias=False,
    ),
    # Harry Potter model: only intermediate/p_gen/p_mem are published; the rest follows paper_wiki_1b.
    "paper_hp": dict(
        name="paper_hp", block_size=1024, vocab_size=49152, padded_vocab_size=49152, n_layer=32, n_embd=960,
        n_head=15, n_query_groups=5, head_size=128, intermediate_size=2500, p_gen=0.2, p_mem=0.1,
        norm_eps=1e-5, rope_base=100000, bias=False,
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)
