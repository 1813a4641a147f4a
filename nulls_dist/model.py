"""The NULL transformer: a Llama-style decoder whose SwiGLU MLP is split into always-on backbone units and a
pool of per-source sink units; the attention mask is causal AND same-source; the deployment modes of docs/nulls_facts.md.
Single-device code: no parallelism, no config system, no logging backends.

Shape legend:
    B  batch rows            T  tokens per row (queries)      L  key length (T, or the cached length)
    D  n_embd                H  n_head                        G  n_query_groups        hs  head_size
    I  intermediate_size     F  n_backbone                    P  n_sink (pool rows)    V  padded_vocab_size
    N  B*T flattened tokens  U  distinct sources              K  active sink rows per source (-1 padded)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from nulls_dist.kernels.sink_mlp import sink_mlp
from nulls_dist.config import NullConfig
from nulls_dist.segments import Segments, source_segments
from nulls_dist.sinks import SinkAssignment

MODE_KINDS = ("train", "sink_on", "sink_off", "backbone_only", "expected")


# ------------------------------------------------------------------------------------------------ modes
@dataclass(frozen=True)
class SinkMode:
    """Which sink units are on. Build it with the constructors, not directly."""

    kind: str
    source_id: int | None = None
    forget_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in MODE_KINDS:
            raise ValueError(f"SinkMode kind must be one of {MODE_KINDS}, got {self.kind!r}")
        ids = ([self.source_id] if self.source_id is not None else []) + list(self.forget_ids)
        for sid in ids:
            if int(sid) < 0:
                raise ValueError(f"SinkMode source ids must be non-negative, got {sid}")

    @classmethod
    def train(cls) -> "SinkMode":
        """Each token uses its own source's mask (what training sees)."""
        return cls("train")

    @classmethod
    def sink_on(cls, source_id: int) -> "SinkMode":
        """Every token uses `source_id`'s mask."""
        return cls("sink_on", source_id=int(source_id))

    @classmethod
    def sink_off(cls, route_source_id: int, forget_ids) -> "SinkMode":
        """Every token uses the routed (surviving) source's mask minus the union of the forgotten masks."""
        return cls("sink_off", source_id=int(route_source_id), forget_ids=tuple(sorted({int(s) for s in forget_ids})))

    @classmethod
    def backbone_only(cls) -> "SinkMode":
        """No sinks; the backbone is scaled by (p_gen + p_mem) / p_gen."""
        return cls("backbone_only")

    @classmethod
    def expected(cls) -> "SinkMode":
        """Every sink on, scaled by p_mem (the expectation of a random mask)."""
        return cls("expected")


@dataclass
class SinkPlan:
    """What every layer's MLP needs for one forward; built once per forward from the mode and source ids."""

    kind: str  # "none" | "dense" | "masked" | "gathered"
    backbone_scale: float = 1.0
    sink_scale: float = 1.0
    segments: Segments | None = None
    layer_rows: list[torch.Tensor] = field(default_factory=list)  # gathered: per layer (U, K), or one shared
    layer_masks: list[torch.Tensor] = field(default_factory=list)  # masked: per layer (N, P) bool, or one shared

    def rows(self, layer: int) -> torch.Tensor:
        return self.layer_rows[layer if len(self.layer_rows) > 1 else 0]

    def mask(self, layer: int) -> torch.Tensor:
        return self.layer_masks[layer if len(self.layer_masks) > 1 else 0]


def remove_rows(rows: torch.Tensor, forget_rows: torch.Tensor) -> torch.Tensor:
    """Drop every row index that appears in `forget_rows` from `rows` (U, K); keep ascending, -1 right-padded."""
    forgotten = torch.isin(rows, forget_rows[forget_rows >= 0])  # (U, K)
    keep = (rows >= 0) & ~forgotten
    big = torch.iinfo(torch.int64).max
    compact = rows.masked_fill(~keep, big).sort(dim=1).values  # (U, K) kept rows first, ascending
    return compact.masked_fill(compact == big, -1)


# ------------------------------------------------------------------------------------------------ attention
def same_source_causal_mask(
    source_ids: torch.Tensor,  # (B, T) query tokens' source ids
    key_source_ids: torch.Tensor | None = None,  # (B, L) key tokens' source ids (default: the queries)
    query_pos: torch.Tensor | None = None,  # (T,) positions of the queries among the keys (default: the last T)
) -> torch.Tensor:  # (B, 1, T, L) bool, True = may attend
    """Causal AND same-source: token t sees key j iff j <= pos(t) and both carry the same source id."""
    if key_source_ids is None:
        key_source_ids = source_ids
    num_keys, num_queries = key_source_ids.shape[1], source_ids.shape[1]
    device = source_ids.device
    if query_pos is None:
        query_pos = torch.arange(num_keys - num_queries, num_keys, device=device)
    key_pos = torch.arange(num_keys, device=device)
    causal = key_pos[None, :] <= query_pos[:, None]  # (T, L)
    same = source_ids[:, :, None] == key_source_ids[:, None, :]  # (B, T, L)
    return (same & causal[None])[:, None]


def build_rope_cache(seq_len: int, n_elem: int, base: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (seq_len, n_elem) in fp32; the half-split (non-interleaved) layout litgpt uses."""
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, device=device).float() / n_elem))  # (n_elem/2,)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), theta).repeat(1, 2)  # (seq_len, n_elem)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, n), cos/sin (T, n) -> (B, H, T, n), computed in fp32 and cast back."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, H, T, n)
    return (x * cos + rotated * sin).to(x.dtype)


class LayerKVCache:
    """Keys and values of one layer for incremental decoding."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = k  # (B, G, Lmax, hs)
        self.v = v  # (B, G, Lmax, hs)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_keys: int):
        self.k[:, :, input_pos] = k.to(self.k.dtype)
        self.v[:, :, input_pos] = v.to(self.v.dtype)
        return self.k[:, :, :num_keys], self.v[:, :, :num_keys]  # (B, G, L, hs) each


class KVCache:
    """Per-layer key/value caches plus the cached tokens' source ids (the mask stays same-source)."""

    def __init__(self, cfg: NullConfig, batch_size: int, max_seq_length: int, device=None, dtype=None) -> None:
        if not 0 < max_seq_length <= cfg.block_size:
            raise ValueError(f"max_seq_length={max_seq_length} must lie in [1, block_size={cfg.block_size}]")
        shape = (batch_size, cfg.n_query_groups, max_seq_length, cfg.head_size)
        dtype = dtype or torch.get_default_dtype()
        self.layers = [
            LayerKVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(cfg.n_layer)
        ]
        self.source_ids = torch.zeros(batch_size, max_seq_length, dtype=torch.int64, device=device)  # (B, Lmax)
        self.max_seq_length = max_seq_length
        self.next_pos = 0  # positions [0, next_pos) are filled

    def update_sources(self, input_pos: torch.Tensor, source_ids: torch.Tensor, num_keys: int) -> torch.Tensor:
        self.source_ids[:, input_pos] = source_ids
        return self.source_ids[:, :num_keys]  # (B, L)


class CausalSelfAttention(nn.Module):
    """Grouped-query attention; qkv rows are [q (H*hs) ; k (G*hs) ; v (G*hs)] as in litgpt."""

    def __init__(self, cfg: NullConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_query_groups) * cfg.head_size, bias=False)
        self.proj = nn.Linear(cfg.n_head * cfg.head_size, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache: LayerKVCache | None = None, input_pos=None, num_keys: int = 0):
        cfg = self.cfg
        B, T, _ = x.shape
        H, G, hs, n = cfg.n_head, cfg.n_query_groups, cfg.head_size, cfg.rope_n_elem
        q, k, v = self.qkv(x).split((H * hs, G * hs, G * hs), dim=-1)  # (B, T, H*hs), (B, T, G*hs) x2
        q = q.view(B, T, H, hs).transpose(1, 2)  # (B, H, T, hs)
        k = k.view(B, T, G, hs).transpose(1, 2)  # (B, G, T, hs)
        v = v.view(B, T, G, hs).transpose(1, 2)  # (B, G, T, hs)
        q = torch.cat((apply_rope(q[..., :n], cos, sin), q[..., n:]), dim=-1)
        k = torch.cat((apply_rope(k[..., :n], cos, sin), k[..., n:]), dim=-1)
        if cache is not None:
            k, v = cache.update(input_pos, k, v, num_keys)  # (B, G, L, hs)
        if G != H:
            k = k.repeat_interleave(H // G, dim=1)  # (B, H, L, hs)
            v = v.repeat_interleave(H // G, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * hs))


# ------------------------------------------------------------------------------------------------ MLP
class NullMLP(nn.Module):
    """SwiGLU = backbone Linear units + a sink pool stored as three (P, D) row tables (design.md)."""

    def __init__(self, cfg: NullConfig) -> None:
        super().__init__()
        D, F_, P = cfg.n_embd, cfg.n_backbone, cfg.n_sink
        self.backbone_gate = nn.Linear(D, F_, bias=False)
        self.backbone_up = nn.Linear(D, F_, bias=False)
        self.backbone_down = nn.Linear(F_, D, bias=False)
        self.sink_gate = nn.Parameter(torch.empty(P, D))
        self.sink_up = nn.Parameter(torch.empty(P, D))
        self.sink_down = nn.Parameter(torch.empty(P, D))  # row j = column j of litgpt's proj.weight

    def forward(self, x: torch.Tensor, plan: SinkPlan, layer: int) -> torch.Tensor:
        B, T, D = x.shape
        xf = x.reshape(B * T, D)  # (N, D)
        y = self.backbone_down(F.silu(self.backbone_gate(xf)) * self.backbone_up(xf))  # (N, D)
        if plan.backbone_scale != 1.0:
            y = y * plan.backbone_scale
        if plan.kind in ("dense", "masked"):
            h = F.silu(xf @ self.sink_gate.t()) * (xf @ self.sink_up.t())  # (N, P)
            # where() keeps autograd's saved mask a bool, one tensor shared by all layers
            h = torch.where(plan.mask(layer), h, 0.0) if plan.kind == "masked" else h * plan.sink_scale
            y = y + h @ self.sink_down  # (N, D)
        elif plan.kind == "gathered":
            seg = plan.segments
            y = y + sink_mlp(
                xf, seg.offsets, seg.seg_source, plan.rows(layer), self.sink_gate, self.sink_up, self.sink_down,
                impl="auto",
            )
        return y.view(B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: NullConfig) -> None:
        super().__init__()
        self.norm_1 = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm_2 = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = NullMLP(cfg)

    def forward(self, x, cos, sin, mask, plan, layer, cache=None, input_pos=None, num_keys=0):
        x = x + self.attn(self.norm_1(x), cos, sin, mask, cache, input_pos, num_keys)
        return x + self.mlp(self.norm_2(x), plan, layer)


# ------------------------------------------------------------------------------------------------ model
class NullTransformer(nn.Module):
    """input_ids (B, T), source_ids (B, T) -> logits (B, T, V). Parameter names follow litgpt's GPT except the
    MLP (design.md, "Model weights"); `sink_assignment` is host-side index math, not a module."""

    def __init__(self, cfg: NullConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self._rope_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sink_assignment = None
        if cfg.n_sink > 0:
            with torch.device("cpu"):  # host-side index math, even under a meta/cuda default-device context
                self.sink_assignment = SinkAssignment(cfg.sink_assignment_config())
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """N(0, std) for every matrix and sink table (GPT-2 style), ones for the norms."""
        for param in self.parameters():
            if param.is_meta:
                continue
            with torch.no_grad():
                if param.dim() == 1:  # the RMSNorm weights are the only vectors
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, std)

    def rope(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos, sin (block_size, n) on `device`. Not buffers: `model.bfloat16()` would round the angles."""
        key = str(device)
        if key not in self._rope_cache:
            cfg = self.cfg
            self._rope_cache[key] = build_rope_cache(cfg.block_size, cfg.rope_n_elem, cfg.rope_base, device)
        return self._rope_cache[key]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_kv_cache(self, batch_size: int, max_seq_length: int | None = None, device=None, dtype=None) -> KVCache:
        device = device if device is not None else self.lm_head.weight.device
        dtype = dtype or self.lm_head.weight.dtype
        return KVCache(self.cfg, batch_size, max_seq_length or self.cfg.block_size, device, dtype)

    # ------------------------------------------------------------------ input checks and the sink plan
    def _check_ids(self, input_ids: torch.Tensor, source_ids: torch.Tensor | None, mode: SinkMode) -> None:
        cfg = self.cfg
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= cfg.padded_vocab_size:
            raise ValueError(f"input_ids out of range [0, {cfg.padded_vocab_size}): min {lo}, max {hi}")
        ids = [mode.source_id] if mode.source_id is not None else []
        ids += list(mode.forget_ids)
        if source_ids is not None:
            if source_ids.shape != input_ids.shape:
                raise ValueError(
                    f"source_ids shape {tuple(source_ids.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
            if source_ids.dtype.is_floating_point or source_ids.dtype == torch.bool:
                raise ValueError(f"source_ids must be an integer tensor, got {source_ids.dtype}")
            ids += [int(source_ids.min()), int(source_ids.max())]
        elif mode.kind == "train" and cfg.n_sink > 0:
            raise ValueError("source_ids is None but mode 'train' needs each token's source id")
        for sid in ids:
            if sid < 0:
                raise ValueError(f"source_ids must be non-negative, got source id {sid}")
            if cfg.num_sources is not None and not cfg.min_source_id <= sid < cfg.min_source_id + cfg.num_sources:
                raise ValueError(
                    f"source id {sid} is out of range [min_source_id={cfg.min_source_id}, "
                    f"min_source_id + num_sources={cfg.min_source_id + cfg.num_sources})"
                )

    def sink_plan(self, source_ids: torch.Tensor | None, mode: SinkMode, shape: tuple[int, int], device) -> SinkPlan:
        """Resolve the mode into per-layer active sinks for the configured sink path."""
        cfg = self.cfg
        if mode.kind == "backbone_only":
            return SinkPlan("none", backbone_scale=cfg.backbone_only_scale)
        if cfg.n_sink == 0:
            return SinkPlan("none")
        if mode.kind == "expected":
            return SinkPlan("dense", sink_scale=cfg.p_mem)
        if mode.kind == "train":
            if source_ids is None:
                raise ValueError("source_ids is None but mode 'train' needs each token's source id")
            sink_source_ids = source_ids.to(torch.int64)  # (B, T)
        else:
            sink_source_ids = torch.full(shape, mode.source_id, dtype=torch.int64, device=device)  # (B, T)
        segments = source_segments(sink_source_ids)
        sources = segments.sources.cpu()  # (U,)
        forget = torch.tensor(mode.forget_ids, dtype=torch.int64)  # (F,)
        layers = range(cfg.n_layer) if cfg.sink_layer_specific else range(1)
        assignment = self.sink_assignment
        if cfg.sink_path == "gathered":
            rows = []
            for layer in layers:
                layer_rows = assignment.rows(sources, layer=layer)  # (U, K)
                if forget.numel():
                    layer_rows = remove_rows(layer_rows, assignment.rows(forget, layer=layer))
                rows.append(layer_rows.to(device=device, dtype=torch.int64))
            return SinkPlan("gathered", segments=segments, layer_rows=rows)
        token_source = segments.token_source_index()  # (N,)
        masks = []
        for layer in layers:
            source_mask = assignment.mask(sources, layer=layer)  # (U, P) bool
            if forget.numel():
                source_mask = source_mask & ~assignment.mask(forget, layer=layer).any(dim=0)
            masks.append(source_mask.to(device)[token_source])  # (N, P)
        return SinkPlan("masked", segments=segments, layer_masks=masks)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        source_ids: torch.Tensor | None = None,  # (B, T)
        mode: SinkMode | None = None,
        kv_cache: KVCache | None = None,
        input_pos: torch.Tensor | None = None,  # (T,) positions, only with kv_cache
    ) -> torch.Tensor:  # (B, T, V)
        mode = mode or SinkMode.train()
        self._check_ids(input_ids, source_ids, mode)
        B, T = input_ids.shape
        device = input_ids.device
        # without source ids (deployment modes) the whole row is one source: plain causal attention
        attn_source_ids = (
            source_ids.to(torch.int64) if source_ids is not None else torch.zeros_like(input_ids, dtype=torch.int64)
        )  # (B, T)
        plan = self.sink_plan(source_ids, mode, (B, T), device)
        if kv_cache is None:
            if input_pos is not None:
                raise ValueError("input_pos is given without a kv_cache")
            if T > self.cfg.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size={self.cfg.block_size}")
            cos, sin = (c[:T] for c in self.rope(device))  # (T, n)
            mask = same_source_causal_mask(attn_source_ids)  # (B, 1, T, T)
            num_keys = T
        else:
            if input_pos is None:
                input_pos = torch.arange(kv_cache.next_pos, kv_cache.next_pos + T, device=device)
            num_keys = int(input_pos.max()) + 1
            if input_pos.shape != (T,) or num_keys > kv_cache.max_seq_length:
                raise ValueError(
                    f"input_pos must be (T={T},) with positions < max_seq_length={kv_cache.max_seq_length}, "
                    f"got shape {tuple(input_pos.shape)} and max position {num_keys - 1}"
                )
            cos, sin = (c[input_pos] for c in self.rope(device))  # (T, n)
            key_source_ids = kv_cache.update_sources(input_pos, attn_source_ids, num_keys)  # (B, L)
            mask = same_source_causal_mask(attn_source_ids, key_source_ids, input_pos)  # (B, 1, T, L)
            kv_cache.next_pos = num_keys
        x = self.transformer.wte(input_ids)  # (B, T, D)
        for layer, block in enumerate(self.transformer.h):
            cache = kv_cache.layers[layer] if kv_cache is not None else None
            x = block(x, cos, sin, mask, plan, layer, cache, input_pos, num_keys)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)


# ------------------------------------------------------------------------------------------------ cost model
def num_parameters_of(cfg: NullConfig) -> int:
    """Parameter count of `cfg` without allocating weights (the model is built on the meta device)."""
    with torch.device("meta"):
        return NullTransformer(cfg).num_parameters()


def flops_per_token(cfg: NullConfig, seq_len: int, gathered: bool, mean_sinks_per_source: float | None = None) -> float:
    """Forward+backward matmul FLOPs per token (3x the forward, as in 6N accounting).

    `gathered=True` counts the backbone plus each source's active sinks; False counts the dense-equivalent
    masked model (every one of the I units). Attention scores count the full T x T product (PaLM convention).
    """
    D, H, G, hs = cfg.n_embd, cfg.n_head, cfg.n_query_groups, cfg.head_size
    if mean_sinks_per_source is None:
        mean_sinks_per_source = cfg.sink_k if cfg.sink_k is not None else cfg.p_mem * cfg.n_sink
    attn_proj = 2 * D * (H + 2 * G) * hs + 2 * H * hs * D
    attn_scores = 2 * 2 * H * hs * seq_len
    mlp_units = cfg.n_backbone + mean_sinks_per_source if gathered else cfg.intermediate_size
    mlp = 2 * 3 * D * mlp_units
    lm_head = 2 * D * cfg.padded_vocab_size
    return 3.0 * (cfg.n_layer * (attn_proj + attn_scores + mlp) + lm_head)
