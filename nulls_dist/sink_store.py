"""The sink rows of a deployed external-storage model (`NullTransformer(cfg, sink_storage="external")`): read on
demand, row by row, from a reader of the checkpoint's tables, and kept resident once read. A deployment that
generates for one source reads that source's k rows per layer, never the whole (P, D) tables
(docs/sink_tables.md, "Deployment").

`SinkRowStore(cfg, reader)`: `reader.rows(key, rows)` returns rows of the safetensors tensor `key` (the model's
own names, `transformer.h.<l>.mlp.sink_{gate,up,down}`), e.g. `formats.weights.WeightsFile`.
- `ensure(table_rows)` (host side, when `model.make_plan` builds a plan): reads the rows not yet resident;
- `gather(layer, rows)` (in the forward, on the device): the (R, 3D) `[gate | up | down]` rows, with autograd to
  the resident rows, which are parameters: a fine-tuned copy (the evaluation's baselines and relearning attack)
  trains exactly the rows it uses. A row that was never ensured comes back NaN (a plan built around the model's
  `make_plan`), so a wrong answer is loud, and no forward reads an index back from the device.
While the module is in training mode it refuses to read new rows: an optimizer built over its parameters would
not see them (build a plan of every mode the fine-tuning uses first: `evaluation/posthoc.py`).

The resident rows are not part of the model's state_dict: they are a cache of the file, not weights of their own.

Shape legend: L layers, D n_embd, R rows asked for, n resident rows of a layer.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from nulls_dist.config import NullConfig
from nulls_dist.formats.checkpoint import SINK_PARTS, sink_table_key


class SinkRowStore(nn.Module):
    """Resident sink rows of every layer, read from `reader` when first needed (module docstring)."""

    def __init__(self, cfg: NullConfig, reader) -> None:
        super().__init__()
        self.num_layers, self.dim, self.num_pool = cfg.n_layer, cfg.n_embd, cfg.n_sink
        self.reader = reader
        for layer in range(cfg.n_layer):
            for part in SINK_PARTS:
                key = sink_table_key(layer, part)
                if tuple(reader.shape(key)) != (cfg.n_sink, cfg.n_embd):
                    raise ValueError(f"{getattr(reader, 'path', 'sink rows')}: {key} is {tuple(reader.shape(key))}, "
                                     f"the model needs ({cfg.n_sink}, {cfg.n_embd})")
        self.values = nn.ParameterList(nn.Parameter(torch.empty(0, 3 * cfg.n_embd)) for _ in range(cfg.n_layer))
        self.index: list[np.ndarray] = [np.zeros(0, dtype=np.int64) for _ in range(cfg.n_layer)]  # (n,) sorted
        self._device_index: list[torch.Tensor | None] = [None] * cfg.n_layer
        self.rows_read = 0  # rows copied out of the file so far, summed over layers (each row: gate, up, down)
        # applied to each part's (n, D) rows as they are read (e.g. the quantization attack's per-row fake
        # quantization): a row's value depends on that row alone, so reading on demand changes nothing
        self.row_transform = None

    # -------------------------------------------------------------------------------------------- host side
    def ensure(self, table_rows: tuple[torch.Tensor, ...]) -> None:
        """Make every row of a compact plan's `table_rows` (per L', or one tuple entry shared by all layers)
        resident, reading only the missing ones."""
        for layer in range(self.num_layers):
            wanted = table_rows[layer if len(table_rows) > 1 else 0].detach().cpu().numpy().astype(np.int64)
            missing = np.setdiff1d(wanted, self.index[layer], assume_unique=True)
            if missing.size:
                self._read(layer, missing)

    def _read(self, layer: int, missing: np.ndarray) -> None:
        if self.training:
            raise RuntimeError(f"sink rows {missing[:5].tolist()}... of layer {layer} are not resident and the store "
                               "is in training mode: an optimizer built over its parameters would not see them "
                               "(build every mode's plan before fine-tuning)")
        if missing.min() < 0 or missing.max() >= self.num_pool:
            raise ValueError(f"sink rows must lie in [0, {self.num_pool}) (layer {layer})")
        old = self.values[layer]
        parts = [self.reader.rows(sink_table_key(layer, part), missing) for part in SINK_PARTS]  # 3 x (n, D)
        if self.row_transform is not None:
            parts = [self.row_transform(rows) for rows in parts]
        new = torch.cat(parts, dim=1)  # (n, 3D)
        index = np.concatenate([self.index[layer], missing])
        order = np.argsort(index, kind="stable")
        merged = torch.cat([old.detach(), new.to(old.device, old.dtype)])[torch.from_numpy(order).to(old.device)]
        self.values[layer] = nn.Parameter(merged, requires_grad=old.requires_grad)  # (n, 3D)
        self.index[layer] = index[order]
        self._device_index[layer] = None
        self.rows_read += int(missing.size)

    def transform_rows(self, transform) -> None:
        """Apply `transform` ((n, D) -> (n, D), row by row) to every resident row and to every row read later."""
        with torch.no_grad():
            for layer in range(self.num_layers):
                values = self.values[layer]
                if values.numel():
                    parts = values.detach().split(self.dim, dim=1)  # gate, up, down: 3 x (n, D)
                    values.copy_(torch.cat([transform(part) for part in parts], dim=1))
        self.row_transform = transform

    # -------------------------------------------------------------------------------------------- forward
    def gather(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """(R,) pool rows on the model's device -> (R, 3D) resident rows; NaN where a row is not resident."""
        values = self.values[layer]  # (n, 3D)
        if self._device_index[layer] is None or self._device_index[layer].device != values.device:
            self._device_index[layer] = torch.from_numpy(self.index[layer]).to(values.device)
        index = self._device_index[layer]  # (n,)
        if index.numel() == 0:
            return torch.full((rows.numel(), values.shape[1]), float("nan"), device=values.device, dtype=values.dtype)
        at = torch.searchsorted(index, rows).clamp(max=index.numel() - 1)  # (R,)
        found = index[at] == rows
        return torch.where(found[:, None], values[at], float("nan"))

    # -------------------------------------------------------------------------------------------- not weights
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """A cache of the file: nothing of it belongs in the model's state_dict."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Nothing to load (see _save_to_state_dict)."""
