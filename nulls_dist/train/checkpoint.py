"""Training checkpoints: saving, pruning, choosing what to resume from, and restoring (layout:
`nulls_dist.formats.checkpoint`).

A save writes DeepSpeed's engine states, the consolidated fp32 weights (`model.safetensors`, the only thing any
tool reads), every rank's RNG state and the loader state (JSON), then -- after a barrier -- the meta, which lists
every file with its size, and finally `latest`. A crash at any point leaves the previous complete tag in
charge; pruning removes only complete tags older than the newest `keep_last_k`.

Resume rules (docs/reliability.md): a run directory that holds checkpoints is never silently restarted or
overwritten. `resume=auto` continues from the newest complete tag (falling back past a broken one, with a
warning naming it); if the directory holds checkpoints but none is complete, or `resume=never`, or `resume`
points elsewhere while the directory has checkpoints of its own, the run refuses to start unless
`checkpoint.start_over=true`, which moves the old checkpoints aside (nothing is deleted).

A checkpoint that `nulls-unlearn purge` rewrote (its meta lists `purge.source_ids`) resumes only when the run
excludes those sources too (`check_compatible`), so forgotten text is never trained again.

DeepSpeed's own files are pickles; the trainer reads them back only through `weights_only_loads()`, torch's
restricted unpickler with the few DeepSpeed classes those files hold allowed, so a crafted file cannot run code.
"""
from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
import pickle
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from nulls_dist.formats import atomic
from nulls_dist.formats import checkpoint as layout
from nulls_dist.formats.weights import save_weights

log = logging.getLogger(__name__)

# Keys of nulls_meta.json that must match for a resume (the weights' meaning, the data, and where the sink rows
# live: a dense run and a sharded-table run hold different optimizer states); the schedule, logging and the world
# size may change (docs/training.md, "Resuming").
COMPAT_KEYS = ("model", "sinks", "data_manifest_sha256", "exclude_sources", "sink_tables")
# Model fields that do not change the weights' meaning: the execution path and the preset's label.
MODEL_FIELDS_IGNORED = ("sink_path", "name", "extra")
# The only classes DeepSpeed's checkpoint pickles contain besides tensors and containers (listed with
# torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO 0-3 checkpoints of this trainer).
DEEPSPEED_CHECKPOINT_CLASSES = (
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)


# ------------------------------------------------------------------------------------------------ safe loading
def _resolve(qualname: str):
    import importlib

    module, _, name = qualname.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every `torch.load` (DeepSpeed's included) runs torch's restricted unpickler (weights_only=True),
    which builds only tensors, containers, primitives and the allowed DeepSpeed classes: a pickle that names any
    other callable fails to load instead of running it."""
    allowed = [c for c in map(_resolve, DEEPSPEED_CHECKPOINT_CLASSES) if c is not None]
    original = torch.load

    def restricted_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = restricted_load
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = original


# ------------------------------------------------------------------------------------------------ RNG state
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-ready values (python, numpy, torch CPU and CUDA)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss),
                                                                float(cached)],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ------------------------------------------------------------------------------------------------ compatibility
def model_compat_dict(model_cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model_cfg.items() if k not in MODEL_FIELDS_IGNORED}


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """RuntimeError listing every difference in model shape, sink assignment or data."""
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
        elif key == "exclude_sources" and layout.purged_sources(saved):
            # a purged checkpoint's forgotten sources must never be trained again: the run has to exclude them
            purged = layout.purged_sources(saved)
            wanted = sorted(set(old or []) | set(purged))
            if sorted(new or []) != wanted:
                diffs.append(f"exclude_sources: the checkpoint was purged of sources {purged} (nulls-unlearn purge) "
                             f"and excluded {sorted(old or [])}; resume with train.exclude_sources={wanted} so "
                             f"that they are not trained again (run: {sorted(new or [])})")
        elif old != new:
            diffs.append(f"{key}: checkpoint {old!r} != run {new!r}")
    if diffs:
        raise RuntimeError(f"cannot resume from {where}: the checkpoint differs from this run in " + "; ".join(diffs))


# ------------------------------------------------------------------------------------------------ what to resume
@dataclass(frozen=True)
class ResumePoint:
    load_dir: Path  # the `checkpoints/` directory DeepSpeed loads from
    tag: str

    @property
    def tag_dir(self) -> Path:
        return self.load_dir / self.tag


def _explicit_point(resume: str) -> ResumePoint:
    """`checkpoint.resume` as a path: a tag directory, a checkpoints directory or a run directory."""
    path = Path(resume)
    if layout.TAG_RE.match(path.name) and path.is_dir():
        reason = layout.incomplete_reason(path)
        if reason:
            raise ValueError(f"checkpoint.resume={resume!r}: that tag is incomplete: {reason}")
        return ResumePoint(path.parent, path.name)
    for candidate in (path, layout.checkpoints_dir(path)):
        if candidate.is_dir() and (layout.list_tags(candidate) or (candidate / layout.LATEST_NAME).exists()):
            found = layout.resolve_latest(candidate)
            for problem in found.problems:
                log.warning("resume: %s", problem)
            if found.tag is None:
                raise ValueError(f"checkpoint.resume={resume!r}: no complete checkpoint there "
                                 f"({'; '.join(found.problems)})")
            return ResumePoint(candidate, found.tag)
    raise ValueError(f"checkpoint.resume={resume!r} is neither 'auto', 'never', a checkpoint tag directory nor a "
                     "directory holding checkpoints")


def find_resume_point(resume: str, run_dir: str | Path, start_over: bool = False) -> ResumePoint | None:
    """Where this run continues from, by the resume rules of the module docstring (ValueError names the field)."""
    run_dir = Path(run_dir)
    own = layout.checkpoints_dir(run_dir)
    has_own = layout.has_checkpoints(run_dir)
    if start_over:
        return None if resume in ("auto", "never") else _explicit_point(resume)
    if resume == "auto":
        if not has_own:
            return None
        found = layout.resolve_latest(own)
        if found.tag is None:
            raise ValueError(f"train.run_dir={str(run_dir)!r} holds checkpoints but none is complete "
                             f"({'; '.join(found.problems)}); pass checkpoint.start_over=true to start this run "
                             "again (the old checkpoints are moved aside, not deleted)")
        for problem in found.problems:
            log.warning("resume: %s; falling back to %s", problem, found.tag)
        return ResumePoint(own, found.tag)
    if has_own:
        what = "resume=never" if resume == "never" else f"resume={resume!r} (another checkpoint)"
        raise ValueError(f"checkpoint.resume: {what} would overwrite the checkpoints already in "
                         f"train.run_dir={str(run_dir)!r}; resume it (resume=auto), choose another run_dir, or pass "
                         "checkpoint.start_over=true (the old checkpoints are moved aside, not deleted)")
    return None if resume == "never" else _explicit_point(resume)


def move_aside(run_dir: str | Path) -> Path | None:
    """`checkpoint.start_over`: rename the run's checkpoints directory to `checkpoints.old-<UTC time>`."""
    own = layout.checkpoints_dir(run_dir)
    if not own.exists():
        return None
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = own.with_name(f"{layout.OLD_CHECKPOINTS_PREFIX}{stamp}")
    own.rename(target)
    return target


# ------------------------------------------------------------------------------------------------ resharding
UNIVERSAL_DIR = layout.UNIVERSAL_DIR


def convert_to_universal(tag_dir: Path, out_dir: Path) -> Path:
    """DeepSpeed's ds_to_universal over one tag (in this process, through the restricted unpickler)."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out_dir), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # checkpoints of older versions lack the info
    log.info("resharding %s for another world size (DeepSpeed universal checkpoint)", tag_dir)
    with weights_only_loads(), contextlib.redirect_stdout(sys.stderr):
        ds_to_universal(args)
    return out_dir


# ------------------------------------------------------------------------------------------------ saving
def full_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """The module's weights in fp32 on the CPU, gathered from the optimizer's fp32 masters where ZeRO keeps them
    (a collective under ZeRO: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)  # None where the module parameter is itself the master
        out[name] = (full if full is not None else param.detach()).to("cpu", torch.float32).contiguous()
    return out


class Checkpointer:
    """Saves, prunes and restores checkpoints of one run; every rank calls `save`/`load` collectively."""

    def __init__(self, run_dir: str | Path, keep_last_k: int, rank: int, world_size: int):
        self.dir = layout.checkpoints_dir(run_dir)
        self.keep_last_k = keep_last_k
        self.rank = rank
        self.world_size = world_size

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def save(self, engine, step: int, meta: dict[str, Any], rank_state: dict[str, Any],
             loader_state: dict[str, Any] | None = None, sink_tables=None) -> Path:
        """Write tag `step`; `rank_state` is this rank's JSON-ready state, `loader_state` (rank 0's argument
        counts) the world-size independent loader position. `sink_tables` (train.table_sinks.TableSinks): the
        run's sharded sink tables, saved into the tag, and written with the dense weights as the tag's
        `model.safetensors` (a collective), before the meta and `latest`."""
        tag = layout.tag_for(step)
        tag_dir = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # only an incomplete one can be here (resume refuses to rewrite complete tags)
                reason = layout.incomplete_reason(tag_dir)
                if reason is None:
                    raise RuntimeError(f"refusing to overwrite the complete checkpoint {tag_dir}")
                log.warning("replacing the incomplete checkpoint %s (%s)", tag_dir, reason)
                shutil.rmtree(tag_dir)
        self._barrier()
        from deepspeed.checkpoint import constants as ds_constants

        # universal_checkpoint_info: what DeepSpeed's ds_to_universal needs to reshard this checkpoint later
        client = {"nulls_step": step, ds_constants.UNIVERSAL_CHECKPOINT_INFO: {
            ds_constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: ds_constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client, save_latest=False)
        weights = full_fp32_state_dict(engine)  # collective
        tag_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_json(layout.rank_state_file(tag_dir, self.rank), {**rank_state, "rank": self.rank,
                                                                       "step": step})
        if sink_tables is not None:
            sink_tables.save(tag_dir, weights if self.rank == 0 else None)
        elif self.rank == 0:
            save_weights(tag_dir / layout.WEIGHTS_NAME, weights)
        if self.rank == 0 and loader_state is not None:
            atomic.write_json(tag_dir / layout.LOADER_STATE_NAME, loader_state)
        self._barrier()  # every rank's files are on disk
        if self.rank == 0:
            layout.write_meta(tag_dir, {**meta, "step": step, "world_size": self.world_size})
            layout.write_latest(self.dir, tag)
            self._prune(keep=tag)
            log.info("saved checkpoint %s", tag_dir)
        self._barrier()
        return tag_dir

    def _prune(self, keep: str) -> None:
        """Remove complete tags beyond the newest `keep_last_k` (never `keep`, never an incomplete tag)."""
        complete = [t for t in layout.list_tags(self.dir) if layout.incomplete_reason(self.dir / t) is None]
        for tag in complete[: max(0, len(complete) - self.keep_last_k)]:
            if tag != keep:
                shutil.rmtree(self.dir / tag, ignore_errors=True)

    # -------------------------------------------------------------------------------------------- loading
    def load(self, engine, point: ResumePoint, current_meta: dict[str, Any]) -> tuple[dict[str, Any], dict | None]:
        """Check compatibility, restore the DeepSpeed states (restricted unpickler) and, on the same world size,
        this rank's RNG; returns (meta, this rank's saved state or None when the world size changed).

        On another world size a ZeRO checkpoint (whose optimizer state is partitioned per rank) is first
        converted by rank 0 into DeepSpeed's universal checkpoint (`ds_to_universal`: one file per parameter
        and state), which every rank then loads into its own partition (the engine was configured with
        `load_universal`); the conversion is temporary and removed afterwards. ZeRO 0 keeps whole states and
        loads on any world size as is."""
        saved = layout.read_meta(point.tag_dir)
        check_compatible(saved, current_meta, point.tag_dir)
        same_world = int(saved.get("world_size", -1)) == self.world_size
        load_dir, tag = point.load_dir, point.tag
        universal = None
        if not same_world and int(saved.get("zero_stage", 0)) > 0:
            universal = self.dir / UNIVERSAL_DIR / point.tag
            if self.rank == 0:
                convert_to_universal(point.tag_dir, universal)
            self._barrier()
            load_dir = universal.parent
        try:
            with weights_only_loads():
                load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
        except pickle.UnpicklingError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"cannot resume from {point.tag_dir}: a checkpoint file holds an object that "
                               f"DeepSpeed's checkpoints never hold; refused without running it ({reason})") from None
        self._barrier()
        if universal is not None and self.rank == 0:
            shutil.rmtree(universal.parent, ignore_errors=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint at {point.tag_dir}")
        if not same_world:
            return saved, None
        blob = layout.read_json(layout.rank_state_file(point.tag_dir, self.rank), f"rank {self.rank} state")
        set_rng_state(blob["rng"])
        return saved, blob
