"""Training checkpoints (layout: docs/design.md "Training checkpoints").

`<run_dir>/checkpoints/step_XXXXXXXX/` holds the DeepSpeed checkpoint (model, optimizer and scheduler states,
every ZeRO partition), `nulls_meta.json` (resolved config, model config, sink `describe()`, data-manifest
sha256, step, tokens seen, world size) and one `nulls_rank_XXXXX.pt` per rank (that rank's loader state and
RNG states: python, numpy, torch CPU and CUDA). `<run_dir>/checkpoints/latest` names the newest complete tag;
it is written last, atomically, so a crash mid-save leaves the previous checkpoint in charge.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
META_NAME = "nulls_meta.json"
TAG_RE = re.compile(r"^step_(\d{8})$")
# Keys of nulls_meta.json that must match for a resume; anything else (lr, steps, logging) may change.
COMPAT_KEYS = ("model", "sinks", "data_manifest_sha256", "exclude_sources", "world_size")
# Model fields that do not change the weights' meaning: the execution path and the preset's label.
MODEL_FIELDS_IGNORED = ("sink_path", "name", "extra")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"nulls_rank_{rank:05d}.pt"


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, then os.replace: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_compat_dict(model_cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model_cfg.items() if k not in MODEL_FIELDS_IGNORED}


def read_latest(run_dir: str | Path) -> str | None:
    path = checkpoints_dir(run_dir) / LATEST_NAME
    return path.read_text().strip() if path.is_file() else None


@dataclass(frozen=True)
class ResumePoint:
    load_dir: Path  # the `checkpoints/` directory DeepSpeed loads from
    tag: str

    @property
    def tag_dir(self) -> Path:
        return self.load_dir / self.tag


def find_resume_point(resume: str, run_dir: str | Path) -> ResumePoint | None:
    """`auto`: this run's latest checkpoint if any; `never`: none; otherwise a tag dir or a checkpoints dir."""
    if resume == "never":
        return None
    if resume == "auto":
        tag = read_latest(run_dir)
        return ResumePoint(checkpoints_dir(run_dir), tag) if tag else None
    path = Path(resume)
    if (path / META_NAME).is_file():
        return ResumePoint(path.parent, path.name)
    for candidate in (path, checkpoints_dir(path)):
        latest = candidate / LATEST_NAME
        if latest.is_file():
            return ResumePoint(candidate, latest.read_text().strip())
    raise ValueError(f"checkpoint.resume={resume!r} is neither 'auto', 'never', a checkpoint tag directory "
                     f"(with {META_NAME}) nor a directory holding a '{LATEST_NAME}' pointer")


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """RuntimeError listing every difference in model shape, sink assignment, data or world size."""
    diffs = []
    for key in COMPAT_KEYS:
        old, new = saved.get(key), current.get(key)
        if key == "model":
            old, new = model_compat_dict(old or {}), model_compat_dict(new or {})
            diffs += [f"model.{f}: checkpoint {old.get(f)!r} != run {new.get(f)!r}"
                      for f in sorted(set(old) | set(new)) if old.get(f) != new.get(f)]
        elif key == "sinks" and old != new:
            diffs += [f"sinks.{f}: checkpoint {(old or {}).get(f)!r} != run {(new or {}).get(f)!r}"
                      for f in sorted(set(old or {}) | set(new or {})) if (old or {}).get(f) != (new or {}).get(f)]
        elif old != new:
            diffs.append(f"{key}: checkpoint {old!r} != run {new!r}")
    if diffs:
        raise RuntimeError(f"cannot resume from {where}: the checkpoint differs from this run in " + "; ".join(diffs))


class Checkpointer:
    """Saves, prunes and restores checkpoints of one run; every rank calls `save`/`load` collectively."""

    def __init__(self, run_dir: str | Path, keep_last_k: int, rank: int, world_size: int):
        self.dir = checkpoints_dir(run_dir)
        self.keep_last_k = keep_last_k
        self.rank = rank
        self.world_size = world_size

    def save(self, engine, step: int, meta: dict[str, Any], loader_state: dict[str, Any]) -> Path:
        tag = tag_for(step)
        tag_dir = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={"nulls_step": step}, save_latest=False)
        tag_dir.mkdir(parents=True, exist_ok=True)
        rank_blob = {"loader": loader_state, "rng": rng_state(), "step": step}
        tmp = rank_file(tag_dir, self.rank).with_suffix(".pt.tmp")
        torch.save(rank_blob, tmp)
        os.replace(tmp, rank_file(tag_dir, self.rank))
        if self.rank == 0:
            write_atomic(tag_dir / META_NAME, json.dumps({**meta, "step": step}, indent=2, sort_keys=True).encode())
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            write_atomic(self.dir / LATEST_NAME, (tag + "\n").encode())
            self._prune(keep=tag)
            log.info("saved checkpoint %s", tag_dir)
        if dist.is_initialized():
            dist.barrier()
        return tag_dir

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in self.dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
        for tag in tags[: max(0, len(tags) - self.keep_last_k)]:
            if tag != keep:
                shutil.rmtree(self.dir / tag, ignore_errors=True)

    def load(self, engine, point: ResumePoint, current_meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check compatibility, restore the DeepSpeed states and this rank's RNG; return (meta, loader_state)."""
        meta_path = point.tag_dir / META_NAME
        if not meta_path.is_file():
            raise RuntimeError(f"cannot resume from {point.tag_dir}: {META_NAME} is missing")
        saved = json.loads(meta_path.read_text())
        check_compatible(saved, current_meta, point.tag_dir)
        blob_path = rank_file(point.tag_dir, self.rank)
        if not blob_path.is_file():
            raise RuntimeError(f"cannot resume from {point.tag_dir}: {blob_path.name} (rank {self.rank}) is missing")
        load_path, _ = engine.load_checkpoint(str(point.load_dir), tag=point.tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint at {point.tag_dir}")
        blob = torch.load(blob_path, map_location="cpu", weights_only=False)
        set_rng_state(blob["rng"])
        return saved, blob["loader"]
