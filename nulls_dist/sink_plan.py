"""The sink plan: everything every layer's MLP needs for one forward -- which sink rows each token uses -- built
ONCE per batch, on the host, from numpy: by the data loader's workers for training batches (`plan_for_batch`),
and once per request for deployment modes (`plan_for_mode`, reused across decode steps). The model's forward
then issues no host-device synchronisation for the sinks: the plan's tensors move to the device with the batch
(pinned, `non_blocking`) and index there. Validation (source-id ranges) happens here, once, not in the layers.

A packed batch (B, T) is flattened to N = B*T tokens. A segment is a maximal run of equal source ids inside one
row; `offsets` (S+1,) bound them, `seg_source` (S,) indexes `sources` (U,) (ascending distinct ids), and
`token_source` (N,) is each token's index into `sources`. The kernels' tile plan (`kernels/tiles.py`) is built
here too, for the block size the kernels use.

Compact plans (`compact=True`) are for models whose sink rows live outside them (row-sharded training tables,
memory-mapped deployments: docs/sink_tables.md): they also carry, per layer, the distinct pool rows the batch
uses (`table_rows`, what a caller looks up) and each source's rows as indices into them (`local_rows`), so the
sink-MLP op runs on the (R_l, 3D) rows the caller gathered instead of on (P, D) tables.

Also here: `SinkMode`, which deployment mode a forward runs in (docs/nulls_facts.md, "Deployment modes").

Shape legend:
    B rows   T tokens per row   N = B*T   S segments   U distinct sources   K rows per source (-1 padded)
    L' layers with their own rows (n_layer when the assignment is layer-specific, else 1)   P pool rows
    R_l distinct pool rows of a layer in a compact plan
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Iterable

import numpy as np
import torch

from nulls_dist.config import NullConfig
from nulls_dist.kernels.tiles import TilePlan, tile_plan_numpy

MODE_KINDS = ("train", "sink_on", "sink_off", "backbone_only", "expected")
PLAN_KINDS = ("none", "dense", "masked", "gathered")
# Tokens per tile of the kernels' plan: the Triton kernels' default block_m (kernels/sink_mlp_triton.py) and the
# torch reference's, so one plan serves both.
PLAN_BLOCK_M = 64
MIN_BLOCK_M = 16  # the smallest tile the Triton kernels take (tl.dot needs 16 rows)


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


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class SinkPlan:
    """One forward's sinks. Tensors are int64 (masks bool) and live together on the host or on the device."""

    kind: str  # "none" (backbone only) | "dense" (every sink, scaled) | "masked" | "gathered"
    num_rows: int  # B
    row_len: int  # T
    backbone_scale: float = 1.0
    sink_scale: float = 1.0
    single_source_rows: bool = False  # every row is one source: attention is plain causal
    offsets: torch.Tensor | None = None  # (S+1,)
    seg_source: torch.Tensor | None = None  # (S,)
    sources: torch.Tensor | None = None  # (U,) source ids
    token_source: torch.Tensor | None = None  # (N,) index into `sources` (masked path)
    rows: torch.Tensor | None = None  # (L', U, K) active pool rows, -1 padded (gathered path)
    masks: torch.Tensor | None = None  # (L', U, P) bool (masked path)
    tiles: TilePlan | None = None  # the kernels' tile plan (gathered path)
    forget_applied: tuple[int, ...] = ()  # the forget set this plan was built under (its rows are never active)
    table_rows: tuple[torch.Tensor, ...] = ()  # compact: per L', the distinct pool rows used (R_l,), ascending
    local_rows: torch.Tensor | None = None  # compact, gathered: (L', U, K) indices into table_rows[l'], -1 padded

    def __post_init__(self) -> None:
        assert self.kind in PLAN_KINDS, self.kind

    @property
    def num_tokens(self) -> int:
        return self.num_rows * self.row_len

    def layer_rows(self, layer: int) -> torch.Tensor:  # (U, K)
        return self.rows[layer if self.rows.shape[0] > 1 else 0]

    def layer_mask(self, layer: int) -> torch.Tensor:  # (U, P)
        return self.masks[layer if self.masks.shape[0] > 1 else 0]

    @property
    def compact(self) -> bool:
        return bool(self.table_rows)

    def layer_table_rows(self, layer: int) -> torch.Tensor:  # (R_l,) the pool rows a compact plan looks up
        return self.table_rows[layer if len(self.table_rows) > 1 else 0]

    def layer_local_rows(self, layer: int) -> torch.Tensor:  # (U, K) indices into layer_table_rows(layer)
        return self.local_rows[layer if self.local_rows.shape[0] > 1 else 0]

    def _map(self, fn) -> "SinkPlan":
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = fn(value)
            elif f.name == "table_rows":
                changes[f.name] = tuple(fn(t) for t in value)
            elif isinstance(value, TilePlan):
                changes[f.name] = TilePlan(*(fn(t) for t in value.tensors()), value.block_m)
        return replace(self, **changes)

    def to(self, device, non_blocking: bool = False) -> "SinkPlan":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "SinkPlan":
        """Page-locked host copies (the DataLoader's pin thread calls this), so `to(cuda, non_blocking=True)` is
        a real asynchronous copy."""
        return self._map(lambda t: t.pin_memory())

    def check(self, num_pool: int) -> None:
        """Debug-mode consistency checks of a plan against the model (reads the indices back: a host sync)."""
        if self.kind not in ("gathered", "masked"):
            return
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != self.num_tokens:
            raise ValueError(f"sink plan offsets must span [0, {self.num_tokens}]")
        if bool((self.offsets[1:] < self.offsets[:-1]).any()):
            raise ValueError("sink plan offsets must be non-decreasing")
        if bool(((self.seg_source < 0) | (self.seg_source >= self.sources.numel())).any()):
            raise ValueError("sink plan seg_source indexes outside `sources`")
        if self.rows is not None and bool(((self.rows < -1) | (self.rows >= num_pool)).any()):
            raise ValueError(f"sink plan rows must lie in [-1, {num_pool})")
        for layer, rows in enumerate(self.table_rows):
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_pool
                                 or bool((rows[1:] <= rows[:-1]).any())):
                raise ValueError(f"sink plan table_rows[{layer}] must be ascending distinct rows in [0, {num_pool})")
        if self.local_rows is not None:
            for layer in range(self.local_rows.shape[0]):
                local, rows = self.local_rows[layer], self.table_rows[layer if len(self.table_rows) > 1 else 0]
                if bool(((local < -1) | (local >= rows.numel())).any()):
                    raise ValueError(f"sink plan local_rows[{layer}] index outside its {rows.numel()} table rows")
                pool = self.rows[layer if self.rows.shape[0] > 1 else 0]
                if not torch.equal(torch.where(local >= 0, rows[local.clamp(min=0)], -1), pool):
                    raise ValueError(f"sink plan local_rows[{layer}] do not name the plan's pool rows")


# ------------------------------------------------------------------------------------------------ builders
def check_source_ids(ids: np.ndarray, cfg: NullConfig, what: str = "source id") -> None:
    """ValueError naming the first id outside what the model accepts (host-side, once per batch or request)."""
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0:
        raise ValueError(f"{what} {lo} is negative")
    if cfg.num_sources is not None:
        end = cfg.min_source_id + cfg.num_sources
        bad = lo if lo < cfg.min_source_id else hi if hi >= end else None
        if bad is not None:
            raise ValueError(f"{what} {bad} is out of range [min_source_id={cfg.min_source_id}, "
                             f"min_source_id + num_sources={end})")


def segments_numpy(source_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(B, T) ids -> offsets (S+1,), seg_source (S,), sources (U,), token_source (N,); a segment never crosses a
    row boundary, even when the next row starts with the same source."""
    num_rows, row_len = source_ids.shape
    flat = np.ascontiguousarray(source_ids, dtype=np.int64).reshape(-1)  # (N,)
    is_start = np.ones(flat.shape[0], dtype=bool)
    is_start[1:] = flat[1:] != flat[:-1]
    is_start[::max(row_len, 1)] = True
    starts = np.flatnonzero(is_start)  # (S,)
    offsets = np.append(starts, flat.shape[0]).astype(np.int64)  # (S+1,)
    sources, seg_source = np.unique(flat[starts], return_inverse=True)  # (U,), (S,)
    token_source = np.repeat(seg_source, np.diff(offsets))  # (N,)
    return offsets, seg_source.astype(np.int64), sources.astype(np.int64), token_source.astype(np.int64)


def _layers(cfg: NullConfig) -> range:
    return range(cfg.n_layer) if cfg.sink_layer_specific else range(1)


def _rows(assignment, sources: np.ndarray, cfg: NullConfig, forget: np.ndarray | None = None) -> np.ndarray:
    """(L', U, K) -1 padded rows of `sources`, with every row of a forgotten source removed."""
    ids = torch.from_numpy(sources)
    per_layer = []
    for layer in _layers(cfg):
        rows = assignment.rows(ids, layer=layer).numpy()  # (U, K)
        if forget is not None and forget.size:
            gone = assignment.rows(torch.from_numpy(forget), layer=layer).numpy()
            rows = remove_rows(rows, gone[gone >= 0])
        per_layer.append(rows)
    width = max((r.shape[1] for r in per_layer), default=0)
    return np.stack([np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=-1) for r in per_layer])


def remove_rows(rows: np.ndarray, forget_rows: np.ndarray) -> np.ndarray:
    """Drop every row index in `forget_rows` from `rows` (U, K); keep ascending, -1 right-padded."""
    keep = (rows >= 0) & ~np.isin(rows, forget_rows)
    big = np.iinfo(np.int64).max
    compact = np.sort(np.where(keep, rows, big), axis=1)
    return np.where(compact == big, -1, compact)


def compact_rows_numpy(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, K) pool rows, -1 padded -> (distinct rows (R,) ascending, local (U, K) indices into them, -1 padded)."""
    valid = rows >= 0
    distinct, inverse = np.unique(rows[valid], return_inverse=True)
    local = np.full(rows.shape, -1, dtype=np.int64)
    local[valid] = inverse
    return distinct.astype(np.int64), local


def _compact(rows: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """(L', U, K) pool rows -> per layer the distinct rows, and (L', U, K) local indices."""
    parts = [compact_rows_numpy(layer_rows) for layer_rows in rows]
    return tuple(p[0] for p in parts), np.stack([p[1] for p in parts]) if parts else rows.copy()


def _masks(rows: np.ndarray, num_pool: int) -> np.ndarray:
    """(L', U, K) rows -> (L', U, P) bool."""
    out = np.zeros(rows.shape[:2] + (num_pool + 1,), dtype=bool)
    np.put_along_axis(out, np.where(rows >= 0, rows, num_pool), True, axis=2)
    return out[..., :num_pool]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _every_row(cfg: NullConfig) -> tuple[torch.Tensor, ...]:
    """A compact plan of the dense or masked kind uses every pool row (a whole table: expected mode)."""
    return (torch.arange(cfg.n_sink, dtype=torch.int64),)


def _as_plan(kind: str, cfg: NullConfig, shape: tuple[int, int], offsets, seg_source, sources, token_source,
             rows: np.ndarray, single_source_rows: bool, block_m: int, forget_applied: tuple[int, ...] = (),
             compact: bool = False) -> SinkPlan:
    common = dict(num_rows=shape[0], row_len=shape[1], single_source_rows=single_source_rows, offsets=_t(offsets),
                  seg_source=_t(seg_source), sources=_t(sources), forget_applied=forget_applied)
    if kind == "masked":
        if compact:
            raise ValueError("sink_path 'masked' computes every pool unit: it needs the whole (P, D) tables, not "
                             "the compact rows of a model whose sink rows live outside it (use sink_path 'gathered')")
        return SinkPlan("masked", token_source=_t(token_source), masks=_t(_masks(rows, cfg.n_sink)), **common)
    extra = {}
    if compact:
        table_rows, local = _compact(rows)
        extra = dict(table_rows=tuple(_t(r) for r in table_rows), local_rows=_t(local))
    return SinkPlan("gathered", rows=_t(rows), tiles=tile_plan_numpy(offsets, seg_source, len(sources), block_m),
                    **common, **extra)


def plan_for_batch(source_ids: np.ndarray, cfg: NullConfig, assignment, block_m: int = PLAN_BLOCK_M,
                   compact: bool = False) -> SinkPlan:
    """Training mode: every token uses its own source's rows. `source_ids` (B, T) of the model's input tokens;
    `compact`: also the distinct rows per layer and the local indices (module docstring)."""
    source_ids = np.asarray(source_ids)
    if source_ids.ndim != 2:
        raise ValueError(f"source_ids must be (B, T), got shape {source_ids.shape}")
    check_source_ids(source_ids, cfg)
    if cfg.n_sink == 0:
        return SinkPlan("none", *source_ids.shape, single_source_rows=_single(source_ids))
    offsets, seg_source, sources, token_source = segments_numpy(source_ids)
    rows = _rows(assignment, sources, cfg)
    return _as_plan(cfg.sink_path, cfg, source_ids.shape, offsets, seg_source, sources, token_source, rows,
                    _single(source_ids), block_m, compact=compact)


def _single(source_ids: np.ndarray) -> bool:
    return bool(source_ids.size == 0 or (source_ids == source_ids[:, :1]).all())


def plan_for_mode(mode: SinkMode, shape: tuple[int, int], cfg: NullConfig, assignment,
                  block_m: int = PLAN_BLOCK_M, forgotten: Iterable[int] = (), compact: bool = False) -> SinkPlan:
    """A deployment mode (every token uses one source's rows, or none, or all) for a (B, T) batch; `compact` as
    in `plan_for_batch` (the dense and masked kinds of `expected` then name every pool row).

    `forgotten`: the deployment's forget set in force. Their sinks are never activated, whatever the mode asks:
    `sink_on` a forgotten source and `sink_off` routed to one are refused; `sink_off` removes their rows from the
    route's; `expected` leaves their rows out of the all-sinks mixture."""
    if mode.kind == "train":
        raise ValueError("mode 'train' needs per-token source ids: use plan_for_batch")
    forgotten = sorted({int(s) for s in forgotten})
    if mode.source_id is not None and mode.source_id in forgotten:
        raise ValueError(f"source {mode.source_id} is in the forget set in force: its sinks are never activated "
                         f"({mode.kind}); route to a surviving source (sink_off) instead")
    num_rows, row_len = shape
    if mode.kind == "backbone_only":
        return SinkPlan("none", num_rows, row_len, backbone_scale=cfg.backbone_only_scale, single_source_rows=True,
                        forget_applied=tuple(forgotten))
    if cfg.n_sink == 0:
        return SinkPlan("none", num_rows, row_len, single_source_rows=True, forget_applied=tuple(forgotten))
    if mode.kind == "expected":
        every = _every_row(cfg) if compact else ()
        if not forgotten:
            return SinkPlan("dense", num_rows, row_len, sink_scale=cfg.p_mem, single_source_rows=True,
                            table_rows=every)
        gone = _rows(assignment, np.asarray(forgotten, dtype=np.int64), cfg)  # (L', F, K)
        keep = ~_masks(gone, cfg.n_sink).any(axis=1, keepdims=True)  # (L', 1, P): every row but the forgotten
        return SinkPlan("masked", num_rows, row_len, sink_scale=cfg.p_mem, single_source_rows=True,
                        offsets=_t(np.arange(num_rows + 1, dtype=np.int64) * row_len),
                        seg_source=_t(np.zeros(num_rows, dtype=np.int64)), sources=_t(np.zeros(1, dtype=np.int64)),
                        token_source=_t(np.zeros(num_rows * row_len, dtype=np.int64)), masks=_t(keep),
                        forget_applied=tuple(forgotten), table_rows=every)
    ids = np.array([mode.source_id, *mode.forget_ids], dtype=np.int64)
    check_source_ids(ids, cfg)
    forget = np.asarray(sorted(set(mode.forget_ids) | set(forgotten)), dtype=np.int64)
    sources = np.array([mode.source_id], dtype=np.int64)
    offsets = np.arange(num_rows + 1, dtype=np.int64) * row_len
    seg_source = np.zeros(num_rows, dtype=np.int64)
    token_source = np.zeros(num_rows * row_len, dtype=np.int64)
    rows = _rows(assignment, sources, cfg, forget)
    return _as_plan("gathered" if compact else cfg.sink_path, cfg, shape, offsets, seg_source, sources,
                    token_source, rows, True, block_m, tuple(forgotten), compact=compact)


def plan_for_routes(route_ids, rows_per_route: int, row_len: int, cfg: NullConfig, assignment,
                    block_m: int | None = None, forgotten: Iterable[int] = (), compact: bool = False) -> SinkPlan:
    """Sink-Off on several routes in ONE batch: route r's `rows_per_route` consecutive rows use r's rows minus every
    forgotten source's rows (what `plan_for_mode(SinkMode.sink_off(r, forgotten))` gives each of them alone), for
    a (len(route_ids) * rows_per_route, row_len) batch. One segment per route spans its rows: the MLP is per
    token, and attention stays per row (plain causal: every row is one source). The worst-case routing attack
    scores a probe under every surviving route this way (evaluation/worst_case.py).

    `forgotten`: the forget set in force (plus the deployment's own); a forgotten route is refused, as in
    `plan_for_mode`. Without a forget set every route is its own Sink-On. `block_m` (default: the segment's
    length rounded up to a power of two in [MIN_BLOCK_M, PLAN_BLOCK_M]): a tile never spans two segments, so
    64-token tiles over 6-token segments would compute ten times what they keep. `compact` as in `plan_for_batch`
    (an external-storage model's plans)."""
    routes = np.asarray(route_ids, dtype=np.int64).reshape(-1)  # (R,)
    if rows_per_route < 1 or row_len < 0:
        raise ValueError(f"rows_per_route must be >= 1 and row_len >= 0, got {rows_per_route}, {row_len}")
    forgotten = sorted({int(s) for s in forgotten})
    refused = sorted(set(routes.tolist()) & set(forgotten))
    if refused:
        raise ValueError(f"route(s) {refused[:5]} are in the forget set in force: their sinks are never activated")
    check_source_ids(routes, cfg, "route source id")
    shape = (len(routes) * rows_per_route, row_len)
    if cfg.n_sink == 0 or len(routes) == 0:
        return SinkPlan("none", *shape, single_source_rows=True, forget_applied=tuple(forgotten))
    if block_m is None:
        block_m = int(min(PLAN_BLOCK_M, max(MIN_BLOCK_M, 1 << max(0, rows_per_route * row_len - 1).bit_length())))
    sources, seg_source = np.unique(routes, return_inverse=True)  # (U,), (R,)
    offsets = np.arange(len(routes) + 1, dtype=np.int64) * rows_per_route * row_len  # (R+1,)
    token_source = np.repeat(seg_source, rows_per_route * row_len)  # (N,)
    rows = _rows(assignment, sources, cfg, np.asarray(forgotten, dtype=np.int64))  # (L', U, K)
    return _as_plan(cfg.sink_path, cfg, shape, offsets, seg_source.astype(np.int64), sources, token_source, rows,
                    True, block_m, tuple(forgotten), compact=compact)


def active_rows(plan: SinkPlan, layer: int = 0, num_pool: int | None = None) -> set[int]:
    """The sink rows a plan really activates in `layer` for its first source (for routing checks and tests)."""
    if plan.kind == "gathered":
        rows = plan.layer_rows(layer)[0]
        return {int(r) for r in rows[rows >= 0]}
    if plan.kind == "masked":
        return {int(r) for r in torch.nonzero(plan.layer_mask(layer)[0]).flatten()}
    if plan.kind == "dense":
        return set(range(num_pool or 0))
    return set()
