"""The NULL transformer: a Llama-style decoder whose SwiGLU MLP is split into always-on backbone units and a
pool of per-source sink units; attention is causal AND same-source; the deployment modes of docs/nulls_facts.md.
Single-device code: no parallelism, no config system, no logging backends.

Sink storage. By default each layer holds its sink pool as three (P, D) parameters. A model built with
`sink_storage="external"` holds none: its sink rows live elsewhere (TorchRec tables row-sharded over the ranks
in training, a memory-mapped safetensors file in deployment: docs/sink_tables.md). It builds compact plans (the
distinct pool rows a batch uses per layer, and each source's rows as indices into them), and a forward takes
those rows as `sink_rows` [(R_l, 3D)] per layer, each row `[gate | up | down]`, or gathers them from an
attached row store (`attach_sink_store`, nulls_dist/sink_store.py). The sink-MLP op then runs on the gathered
rows exactly as on the whole tables.

The hot path takes a precomputed `SinkPlan` (nulls_dist/sink_plan.py: built on the host, once per batch, by the
loader's workers) and then reads nothing back from the device: the plan indexes the sink tables, the attention
mask is built once per forward from the source ids, and the loss is returned as a device scalar. Without a plan
the forward builds one itself (convenient, but it reads the source ids back: evaluation and tests only).

Shape legend:
    B  batch rows            T  tokens per row (queries)      L  key length (T, or the cached length)
    D  n_embd                H  n_head                        G  n_query_groups        hs  head_size
    I  intermediate_size     F  n_backbone                    P  n_sink (pool rows)    V  padded_vocab_size
    N  B*T flattened tokens  U  distinct sources              K  active sink rows per source (-1 padded)
    R_l  distinct pool rows layer l uses in a batch (compact plans)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nulls_dist.attention import AttentionMask, attend, build_mask, same_source_causal_mask
from nulls_dist.config import PARAMETER_KINDS, NullConfig
from nulls_dist.kernels.sink_mlp import sink_mlp
from nulls_dist.sink_plan import (MODE_KINDS, SinkMode, SinkPlan, plan_for_batch, plan_for_mode,
                                  plan_for_routes, remove_rows)
from nulls_dist.sinks import SinkAssignment

__all__ = ["MODE_KINDS", "PARAMETER_KINDS", "SINK_STORAGES", "KVCache", "NullTransformer", "SinkMode", "SinkPlan",
           "chunked_cross_entropy", "flops_per_token", "num_parameters_of", "parameter_kind", "remove_rows",
           "same_source_causal_mask", "split_sink_rows"]

IGNORE_INDEX = -100  # labels of tokens that count for no loss term (F.cross_entropy's default ignore_index)
SINK_STORAGES = ("dense", "external")


def split_sink_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, 3D) sink rows `[gate | up | down]` -> the gate, up and down (R, D) views (column slices: no copy;
    gradients flow back into `rows`)."""
    dim = rows.shape[1] // 3
    return rows[:, :dim], rows[:, dim: 2 * dim], rows[:, 2 * dim:]


# ------------------------------------------------------------------------------------------------ rope
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


# ------------------------------------------------------------------------------------------------ KV cache
class LayerKVCache:
    """Keys and values of one layer for incremental decoding."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = k  # (B, G, Lmax, hs)
        self.v = v  # (B, G, Lmax, hs)

    def update(self, first_pos: int, k: torch.Tensor, v: torch.Tensor):
        end = first_pos + k.shape[2]
        self.k[:, :, first_pos:end] = k.to(self.k.dtype)
        self.v[:, :, first_pos:end] = v.to(self.v.dtype)
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, G, L, hs) each


class KVCache:
    """Per-layer key/value caches plus the cached tokens' source ids (the mask stays same-source). Positions are
    host integers (`next_pos`), so decoding never reads a position back from the device."""

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

    def update_sources(self, first_pos: int, source_ids: torch.Tensor) -> torch.Tensor:
        end = first_pos + source_ids.shape[1]
        self.source_ids[:, first_pos:end] = source_ids
        return self.source_ids[:, :end]  # (B, L)

    def take_rows(self, index: torch.Tensor) -> "KVCache":
        """A new cache holding rows `index` (B',) of this one, in that order, repeats allowed: one cached prefix
        continued by several suffixes (the worst-case routing attack scores every candidate after one prompt)."""
        out = object.__new__(KVCache)
        out.layers = [LayerKVCache(c.k[index], c.v[index]) for c in self.layers]  # (B', G, Lmax, hs) each
        out.source_ids = self.source_ids[index]  # (B', Lmax)
        out.max_seq_length, out.next_pos = self.max_seq_length, self.next_pos
        return out


# ------------------------------------------------------------------------------------------------ attention
class CausalSelfAttention(nn.Module):
    """Grouped-query attention; qkv rows are [q (H*hs) ; k (G*hs) ; v (G*hs)] as in litgpt."""

    def __init__(self, cfg: NullConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_query_groups) * cfg.head_size, bias=False)
        self.proj = nn.Linear(cfg.n_head * cfg.head_size, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, mask: AttentionMask, cache: LayerKVCache | None = None, first_pos: int = 0):
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
            k, v = cache.update(first_pos, k, v)  # (B, G, L, hs)
        y = attend(q, k, v, mask)  # (B, H, T, hs): native GQA, K/V never repeated
        return self.proj(y.transpose(1, 2).reshape(B, T, H * hs))


# ------------------------------------------------------------------------------------------------ MLP
class NullMLP(nn.Module):
    """SwiGLU = backbone Linear units + a sink pool stored as three (P, D) row tables (design.md), or, with
    `dense_sinks=False`, no sink parameters: a forward then takes the compact rows (R_l, 3D) of its plan."""

    def __init__(self, cfg: NullConfig, dense_sinks: bool = True) -> None:
        super().__init__()
        D, F_, P = cfg.n_embd, cfg.n_backbone, cfg.n_sink
        self.backbone_gate = nn.Linear(D, F_, bias=False)
        self.backbone_up = nn.Linear(D, F_, bias=False)
        self.backbone_down = nn.Linear(F_, D, bias=False)
        self.dense_sinks = dense_sinks
        if dense_sinks:
            self.sink_gate = nn.Parameter(torch.empty(P, D))
            self.sink_up = nn.Parameter(torch.empty(P, D))
            self.sink_down = nn.Parameter(torch.empty(P, D))  # row j = column j of litgpt's proj.weight
        self.debug_checks = False

    def forward(self, x: torch.Tensor, plan: SinkPlan, layer: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`rows` (R_l, 3D): this layer's compact sink rows (the plan's `layer_table_rows`), for a model without
        dense sink tables; every row of the pool for the dense and masked kinds."""
        B, T, D = x.shape
        xf = x.reshape(B * T, D)  # (N, D)
        y = self.backbone_down(F.silu(self.backbone_gate(xf)) * self.backbone_up(xf))  # (N, D)
        if plan.backbone_scale != 1.0:
            y = y * plan.backbone_scale
        if plan.kind == "none":
            return y.view(B, T, D)
        if rows is None:
            gate, up, down, index = self.sink_gate, self.sink_up, self.sink_down, plan.rows
        else:
            gate, up, down = split_sink_rows(rows.to(xf.dtype))  # (R_l, D) each; the rows' own dtype in backward
            index = plan.local_rows
        if plan.kind in ("dense", "masked"):
            h = F.silu(xf @ gate.t()) * (xf @ up.t())  # (N, P)
            if plan.kind == "masked":
                # where() keeps autograd's saved mask a bool; one (N, P) gather per layer, on the device
                h = torch.where(plan.layer_mask(layer)[plan.token_source], h, 0.0)
            if plan.sink_scale != 1.0:
                h = h * plan.sink_scale
            y = y + h @ down  # (N, D)
        elif plan.kind == "gathered":
            source_rows = index[layer if index.shape[0] > 1 else 0]  # (U, K) pool rows, or indices into `rows`
            y = y + sink_mlp(xf, plan.offsets, plan.seg_source, source_rows, gate, up, down, impl="auto",
                             tiles=plan.tiles, validate=self.debug_checks)
        return y.view(B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: NullConfig, dense_sinks: bool = True) -> None:
        super().__init__()
        self.norm_1 = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm_2 = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = NullMLP(cfg, dense_sinks)

    def forward(self, x, cos, sin, mask, plan, layer, cache=None, first_pos: int = 0, rows=None):
        x = x + self.attn(self.norm_1(x), cos, sin, mask, cache, first_pos)
        return x + self.mlp(self.norm_2(x), plan, layer, rows)


# ------------------------------------------------------------------------------------------------ loss
def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()  # (c, V) fp32: one chunk at a time
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int) -> torch.Tensor:
    """Sum of next-token cross-entropy over labels != IGNORE_INDEX, from hidden (N, D) and the LM head (V, D),
    `chunk_tokens` rows at a time with each chunk recomputed in backward: the (N, V) logits never exist, in fp32
    or otherwise (paper_wiki_1b at B=16, T=1023: 3 GiB in fp32 at once; here chunk x V x 4 bytes, 0.4 GiB at 2048).
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss, hidden[part], weight, labels[part], use_reentrant=False)
        else:
            total = total + _chunk_loss(hidden[part], weight, labels[part])
    return total


# ------------------------------------------------------------------------------------------------ model
class NullTransformer(nn.Module):
    """input_ids (B, T), source_ids (B, T) -> logits (B, T, V), or with `labels` the summed loss. Parameter names
    follow litgpt's GPT except the MLP (design.md, "Model weights"); `sink_assignment` is host-side index math,
    not a module. `sink_storage`: "dense" (the sink tables are parameters) or "external" (module docstring)."""

    def __init__(self, cfg: NullConfig, sink_storage: str = "dense") -> None:
        super().__init__()
        if sink_storage not in SINK_STORAGES:
            raise ValueError(f"sink_storage must be one of {SINK_STORAGES}, got {sink_storage!r}")
        self.cfg = cfg
        self.sink_storage = sink_storage
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
                h=nn.ModuleList(Block(cfg, sink_storage == "dense") for _ in range(cfg.n_layer)),
                ln_f=nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self._rope_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sink_assignment = None
        if cfg.n_sink > 0:
            with torch.device("cpu"):  # host-side index math, even under a meta/cuda default-device context
                self.sink_assignment = SinkAssignment(cfg.sink_assignment_config())
        self.attention_impl = "auto"  # auto (flex on CUDA for packed rows, SDPA otherwise) | sdpa | flex
        self.forgotten: tuple[int, ...] = ()  # a deployment's forget set in force (enforce_forget_set)
        self.loss_chunk_tokens = 2048
        self.sink_store = None  # external storage: the rows a deployment reads on demand (attach_sink_store)
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

    def set_debug_checks(self, enabled: bool) -> None:
        """Validate every plan and every kernel launch's indices (host syncs: for debugging, not training)."""
        self.debug_checks = enabled
        for block in self.transformer.h:
            block.mlp.debug_checks = enabled

    debug_checks = False

    @property
    def external_sinks(self) -> bool:
        """The sink rows live outside this model (compact plans; rows passed in or read from the store)."""
        return self.sink_storage == "external" and self.cfg.n_sink > 0

    def attach_sink_store(self, store: nn.Module) -> None:
        """Deployment of an external-storage model: `store` (nulls_dist/sink_store.py) reads the rows every plan
        of `make_plan` needs when the plan is built, and hands them to the forward (`gather(layer, rows)`)."""
        if self.sink_storage != "external":
            raise ValueError("attach_sink_store needs a model built with sink_storage='external'")
        self.sink_store = store

    def enforce_forget_set(self, source_ids) -> None:
        """Deployment: these sources' sinks are never activated again, in any mode, by any caller of this model
        (generation, evaluation, the lm-eval adapter): `sink_on` / routing to them is refused, `sink_off` and
        `expected` leave their rows out, per-token training mode is refused."""
        self.forgotten = tuple(sorted({int(s) for s in source_ids}))

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

    # ------------------------------------------------------------------ plans
    def make_plan(self, source_ids: torch.Tensor | np.ndarray | None, mode: SinkMode,
                  shape: tuple[int, int], device=None) -> SinkPlan:
        """The sink plan of one forward, on `device` (reads `source_ids` back to the host: not for training)."""
        if mode.kind == "train" and self.forgotten:
            raise ValueError(f"a forget set of {len(self.forgotten)} source(s) is in force: this model runs "
                             "deployment modes only (sink_on, sink_off, backbone_only, expected)")
        if mode.kind == "train" and source_ids is None:
            if self.cfg.n_sink:
                raise ValueError("source_ids is None but mode 'train' needs each token's source id")
            plan = SinkPlan("none", *shape, single_source_rows=True)  # no sinks: nothing to route
        elif mode.kind == "train":
            ids = source_ids.detach().cpu().numpy() if isinstance(source_ids, torch.Tensor) else source_ids
            plan = plan_for_batch(np.asarray(ids, dtype=np.int64), self.cfg, self.sink_assignment,
                                  compact=self.external_sinks)
        else:
            plan = plan_for_mode(mode, shape, self.cfg, self.sink_assignment, forgotten=self.forgotten,
                                 compact=self.external_sinks)
        if self.sink_store is not None and plan.compact:
            self.sink_store.ensure(plan.table_rows)  # read now, on the host: the forward only gathers
        return plan if device is None else plan.to(device)

    def make_routes_plan(self, route_ids, rows_per_route: int, row_len: int, forget_ids=(), device=None) -> SinkPlan:
        """Sink-Off on many routes in one batch (`sink_plan.plan_for_routes`): route r's `rows_per_route` rows
        use r's sinks minus those of `forget_ids` and of the forget set in force; a forgotten route is refused."""
        plan = plan_for_routes(route_ids, rows_per_route, row_len, self.cfg, self.sink_assignment,
                               forgotten=set(self.forgotten) | {int(s) for s in forget_ids}, compact=self.external_sinks)
        if self.sink_store is not None and plan.compact:
            self.sink_store.ensure(plan.table_rows)  # read now, on the host: the forward only gathers
        return plan if device is None else plan.to(device)

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, input_ids: torch.Tensor, source_ids: torch.Tensor | None, plan: SinkPlan | None) -> None:
        """Shape checks only: host-side metadata, no value is read from the device."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if source_ids is not None:
            if source_ids.shape != input_ids.shape:
                raise ValueError(
                    f"source_ids shape {tuple(source_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
            if source_ids.dtype.is_floating_point or source_ids.dtype == torch.bool:
                raise ValueError(f"source_ids must be an integer tensor, got {source_ids.dtype}")
        if plan is not None and (plan.num_rows, plan.row_len) != tuple(input_ids.shape):
            raise ValueError(f"the sink plan is for a ({plan.num_rows}, {plan.row_len}) batch, input_ids are "
                             f"{tuple(input_ids.shape)}")

    def _check_values(self, input_ids: torch.Tensor) -> None:
        """Token-id range (reads back: the planless path and debug mode only)."""
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.cfg.padded_vocab_size:
            raise ValueError(f"input_ids out of range [0, {self.cfg.padded_vocab_size}): min {lo}, max {hi}")

    def hidden_states(
        self,
        input_ids: torch.Tensor,  # (B, T)
        source_ids: torch.Tensor | None = None,  # (B, T)
        mode: SinkMode | None = None,
        kv_cache: KVCache | None = None,
        plan: SinkPlan | None = None,
        sink_rows: list[torch.Tensor] | None = None,  # external storage: per layer (R_l, 3D) rows of plan.table_rows
    ) -> torch.Tensor:  # (B, T, D) after the final norm
        mode = mode or SinkMode.train()
        self._check_inputs(input_ids, source_ids, plan)
        B, T = input_ids.shape
        device = input_ids.device
        if plan is None:
            if input_ids.numel():
                self._check_values(input_ids)
            plan = self.make_plan(source_ids, mode, (B, T), device)
        elif self.forgotten and not set(self.forgotten) <= set(plan.forget_applied):
            raise ValueError("this sink plan was not built under the forget set in force (use model.make_plan)")
        elif self.debug_checks:
            self._check_values(input_ids)
            plan.check(self.cfg.n_sink)
        # Attention is same-source whenever source ids are given (whatever the sink mode); it is plain causal when
        # they are not, or when the plan knows every row is one source and no cache holds other tokens.
        attn_source_ids = source_ids.to(torch.int64) if source_ids is not None else None
        single = attn_source_ids is None or (kv_cache is None and mode.kind == "train" and plan.single_source_rows)
        first_pos = 0
        if kv_cache is None:
            if T > self.cfg.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size={self.cfg.block_size}")
            cos, sin = (c[:T] for c in self.rope(device))  # (T, n)
            mask = build_mask(self.attention_impl, attn_source_ids, single, T, T, 0)
        else:
            first_pos = kv_cache.next_pos
            if first_pos + T > kv_cache.max_seq_length:
                raise ValueError(f"the KV cache's max_seq_length={kv_cache.max_seq_length}: {first_pos} positions "
                                 f"are filled and {T} more do not fit")
            cos, sin = (c[first_pos:first_pos + T] for c in self.rope(device))  # (T, n)
            keys = None
            if attn_source_ids is not None:
                keys = kv_cache.update_sources(first_pos, attn_source_ids)  # (B, L)
            mask = build_mask(self.attention_impl, attn_source_ids, single, T, first_pos + T, first_pos, keys,
                              device)
            kv_cache.next_pos = first_pos + T
        sink_rows = self._sink_rows(plan, sink_rows)
        x = self.transformer.wte(input_ids)  # (B, T, D)
        for layer, block in enumerate(self.transformer.h):
            cache = kv_cache.layers[layer] if kv_cache is not None else None
            rows = sink_rows[layer] if sink_rows is not None else None
            x = block(x, cos, sin, mask, plan, layer, cache, first_pos, rows)
        return self.transformer.ln_f(x)

    def _sink_rows(self, plan: SinkPlan, sink_rows: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        """The per-layer rows an external-storage forward runs on: the caller's, or the attached store's."""
        if not self.external_sinks or plan.kind == "none":
            if sink_rows is not None and plan.kind != "none":
                raise ValueError("sink_rows are for a model built with sink_storage='external'")
            return None
        if not plan.compact:
            raise ValueError("a model with external sink storage needs a compact sink plan (model.make_plan, or "
                             "plan_for_batch(..., compact=True))")
        if sink_rows is None:
            if self.sink_store is None:
                raise ValueError("this model's sink rows live outside it: pass sink_rows (training) or "
                                 "attach_sink_store (deployment)")
            sink_rows = [self.sink_store.gather(layer, plan.layer_table_rows(layer))
                         for layer in range(self.cfg.n_layer)]
        if len(sink_rows) != self.cfg.n_layer:
            raise ValueError(f"sink_rows holds {len(sink_rows)} layers, the model has {self.cfg.n_layer}")
        return sink_rows

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        source_ids: torch.Tensor | None = None,  # (B, T)
        mode: SinkMode | None = None,
        kv_cache: KVCache | None = None,
        plan: SinkPlan | None = None,
        labels: torch.Tensor | None = None,  # (B, T) next-token targets, IGNORE_INDEX where nothing counts
        sink_rows: list[torch.Tensor] | None = None,  # external storage: per layer (R_l, 3D), see hidden_states
    ) -> torch.Tensor:
        """Logits (B, T, V); with `labels`, the SUM of the cross-entropy over the counted labels (fp32 scalar; the
        caller divides by its token count, e.g. the global count of a data-parallel step)."""
        hidden = self.hidden_states(input_ids, source_ids, mode, kv_cache, plan, sink_rows)  # (B, T, D)
        if labels is None:
            return self.lm_head(hidden)  # (B, T, V)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        return chunked_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, labels.reshape(-1),
                                     self.loss_chunk_tokens)


# ------------------------------------------------------------------------------------------------ parameter kinds
def parameter_kind(name: str) -> str:
    """The part of the NULL (one of `PARAMETER_KINDS`) that the `named_parameters()` entry `name` belongs to."""
    parts = name.split(".")
    if name == "transformer.wte.weight":
        return "embedding"
    if name == "lm_head.weight":
        return "lm_head"
    if parts[0] == "transformer" and (parts[1] == "ln_f" or len(parts) > 3 and parts[3].startswith("norm_")):
        return "norm"
    if len(parts) > 4 and parts[:2] == ["transformer", "h"] and parts[3] == "attn":
        return "attention"
    if len(parts) > 4 and parts[:2] == ["transformer", "h"] and parts[3] == "mlp":
        if parts[4].startswith("sink_"):
            return "sink"
        if parts[4].startswith("backbone_"):
            return "backbone"
    raise ValueError(f"parameter {name!r} belongs to none of the kinds {PARAMETER_KINDS}")


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
    mlp_units = cfg.n_backbone + mean_sinks_per_source if gathered else cfg.n_mlp_units
    mlp = 2 * 3 * D * mlp_units
    lm_head = 2 * D * cfg.padded_vocab_size
    return 3.0 * (cfg.n_layer * (attn_proj + attn_scores + mlp) + lm_head)
