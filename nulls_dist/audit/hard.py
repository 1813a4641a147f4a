"""Hard unlearning of a checkpoint whose sink tables are read lazily (a sharded-table run, docs/sink_tables.md):
the deployed copy is written block by block, never holding a table whole. `unlearn.py` calls it for such
checkpoints (and zeroes an in-memory state dict for the others).

The output directory holds `model.safetensors` (every weight copied, the forgotten rows zero in every layer's
gate, up and down tables), `sink_tables/` when the input has one (the trainer's DCP checkpoint of the tables,
with the same rows AND their optimizer state zero: `deploy/sink_tables_dcp.py`), and `nulls_meta.json`, last.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nulls_dist.deploy.checkpoint_io import LoadedCheckpoint, sink_table_keys
from nulls_dist.deploy.sink_tables_dcp import zero_sink_table_rows
from nulls_dist.formats import checkpoint as layout
from nulls_dist.formats.weights import WeightsFile, copy_zeroing_rows


def write_hard_lazy(ckpt: LoadedCheckpoint, union: np.ndarray, out_dir: str | Path, meta: dict[str, Any]) -> str:
    """Write the hard-unlearned deployed checkpoint of a lazy `ckpt` into `out_dir` (union: (L, P) bool rows to
    zero per layer); returns its content digest (`state_dict_digest` of the new weights, streamed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    units = {layer: np.nonzero(union[layer])[0] for layer in range(union.shape[0])}
    zero = {key: units[layer] for layer in units for key in sink_table_keys(layer)}
    weights = copy_zeroing_rows(ckpt.state_dict, out_dir / layout.WEIGHTS_NAME, zero)
    tables = layout.sink_tables_dir(ckpt.path)
    if (tables / layout.SINK_TABLES_META_NAME).is_file():
        zero_sink_table_rows(tables, layout.sink_tables_dir(out_dir), units)
    layout.write_meta(out_dir, meta)  # last: it lists every file above with its size
    return WeightsFile(weights).digest()
