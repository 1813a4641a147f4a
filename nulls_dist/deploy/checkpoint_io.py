"""Reading trained NULL checkpoints and writing deployed ones (layouts: `nulls_dist.formats.checkpoint`).

- a training checkpoint: a run directory, its `checkpoints/` directory or one tag directory; without a tag the
  newest complete one (`latest`, or the newest complete tag when `latest` is broken, with a warning). The weights
  come from the tag's `model.safetensors` (the trainer's consolidated fp32 copy); DeepSpeed's own files are
  pickles and are never opened here, so a crafted checkpoint cannot run code in a tool;
- a deployed checkpoint: a directory holding `model.safetensors` and `nulls_meta.json` (written last).

`state_dict_digest` (in `formats.weights`) is the content digest every certificate refers to: a training
checkpoint and its deployed copy have the same digest.

A checkpoint of a run whose sink rows were trained in row-sharded tables (its meta's `sink_tables` record,
docs/sink_tables.md) is opened lazily: `state_dict` is a `formats.weights.WeightsFile` (tensors read on demand,
rows through a memory map, the digest streamed), and `build_model` builds the model with external sink storage
whose `SinkRowStore` reads only the rows the requests use: generating for one source reads that source's rows,
never the whole tables.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nulls_dist.config import NullConfig
from nulls_dist.formats import checkpoint as layout
from nulls_dist.formats.weights import WeightsError, WeightsFile, load_weights, save_weights

log = logging.getLogger(__name__)


@dataclass
class LoadedCheckpoint:
    """A consolidated checkpoint: fp32 weights, its meta and where it came from."""

    state_dict: Mapping[str, torch.Tensor]  # a dict, or a lazy WeightsFile (sharded-table runs)
    meta: dict[str, Any]
    path: Path
    kind: str  # "training" | "deployed"

    @property
    def model_config(self) -> NullConfig:
        return model_config_from_meta(self.meta, self.path)

    @property
    def lazy(self) -> bool:
        """The weights are read on demand (a sharded-table run's checkpoint): see the module docstring."""
        return isinstance(self.state_dict, WeightsFile)


def model_config_from_meta(meta: dict[str, Any], where: Path | str = layout.META_NAME) -> NullConfig:
    """The NullConfig recorded in a checkpoint's meta (`model_config`, or `model` as the trainer writes it)."""
    values = meta.get("model_config", meta.get("model"))
    if not isinstance(values, dict):
        raise ValueError(f"{where}: {layout.META_NAME} has no `model` mapping")
    known = {f.name for f in dataclasses.fields(NullConfig)}
    return NullConfig(**{k: v for k, v in values.items() if k in known})


def training_tag_dir(path: str | Path, tag: str | None = None) -> Path:
    """The tag directory `path` (+ `tag`) designates: complete, or ValueError naming what is wrong."""
    path = Path(path)
    if layout.TAG_RE.match(path.name) and tag is None:
        tag_dir = path
    else:
        if (path / layout.CHECKPOINTS_DIR).is_dir():
            path = path / layout.CHECKPOINTS_DIR
        if not path.is_dir():
            raise ValueError(f"checkpoint path does not exist: {path}")
        if tag is None:
            found = layout.resolve_latest(path)
            if found.tag is None:  # the error lists every problem: no warnings before it
                raise ValueError(f"no complete checkpoint in {path}" +
                                 (f" ({'; '.join(found.problems)})" if found.problems else ""))
            for problem in found.problems:
                log.warning("%s", problem)
            if found.problems:
                log.warning("using %s, the newest complete checkpoint in %s", found.tag, path)
            tag = found.tag
        layout.step_of(tag)
        tag_dir = path / tag
    reason = layout.incomplete_reason(tag_dir)
    if reason is not None:
        raise ValueError(f"checkpoint {tag_dir} is incomplete: {reason}")
    return tag_dir


def load_checkpoint(path: str | Path, tag: str | None = None) -> LoadedCheckpoint:
    """Load a deployed checkpoint directory, or a training checkpoint (run dir, `checkpoints/` dir or tag dir)."""
    path = Path(path)
    if layout.is_deployed(path):
        meta = layout.read_meta(path)
        return LoadedCheckpoint(_weights(path / layout.WEIGHTS_NAME, meta), meta, path, "deployed")
    tag_dir = training_tag_dir(path, tag)
    meta = layout.read_meta(tag_dir)
    weights = tag_dir / layout.WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{tag_dir} has no {layout.WEIGHTS_NAME} (not written by this version of nulls-train): "
                         "nulls_dist tools never unpickle DeepSpeed's files, which could run code")
    state = _weights(weights, meta)
    log.info("%s %s (%d tensors)", "opened" if isinstance(state, WeightsFile) else "loaded", tag_dir, len(state))
    return LoadedCheckpoint(state, meta, tag_dir, "training")


def _weights(path: Path, meta: dict[str, Any]) -> Mapping[str, torch.Tensor]:
    """The weights of a checkpoint: lazily for a sharded-table run (float32 on disk, as the trainer writes), else
    loaded in float32."""
    if layout.sharded_sink_tables(meta) is not None:
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        return WeightsFile(path)
    return {k: v.to(torch.float32) for k, v in load_weights(path).items()}


def save_deployed(out_dir: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write `model.safetensors`, then `nulls_meta.json` (which lists the weights file and its size)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(out_dir / layout.WEIGHTS_NAME, state_dict)
    layout.write_meta(out_dir, meta)
    return out_dir


def sink_table_keys(layer: int) -> tuple[str, str, str]:
    """State-dict keys of one layer's three sink tables, each (n_sink, n_embd) (design.md)."""
    prefix = f"transformer.h.{layer}.mlp."
    return prefix + "sink_gate", prefix + "sink_up", prefix + "sink_down"


def build_model(ckpt: LoadedCheckpoint, device: str | torch.device = "cpu"):
    """A NullTransformer in eval mode holding the checkpoint's weights; for a lazy checkpoint, every weight but
    the sink tables, whose rows its `SinkRowStore` reads when a plan needs them."""
    from nulls_dist.model import NullTransformer
    from nulls_dist.sink_store import SinkRowStore

    if not ckpt.lazy:
        model = NullTransformer(ckpt.model_config)
        model.load_state_dict(ckpt.state_dict)
        return model.to(device).eval()
    cfg = ckpt.model_config
    model = NullTransformer(cfg, sink_storage="external")
    model.load_state_dict({key: ckpt.state_dict[key] for key in model.state_dict()})
    model.attach_sink_store(SinkRowStore(cfg, ckpt.state_dict))
    return model.to(device).eval()
