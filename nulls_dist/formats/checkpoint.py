"""The checkpoint layouts on disk, their `latest` pointer and their meta file: written by the trainer and the
unlearning tools, read by every tool. Standard library only (the weights file itself is `formats.weights`).

Training run:

    <run_dir>/checkpoints/
        latest                      one line: the newest complete tag (written last, atomically)
        step_00000300/              one tag per saved step
            <DeepSpeed's files>     engine, optimizer and scheduler states (read back only by the trainer)
            model.safetensors       the consolidated fp32 weights: what every tool reads (no pickle)
            loader_state.json       the data position of every loader stream (world-size independent)
            rank_00000.json ...     per-rank RNG states
            sink_tables/            only for runs whose sink rows live in TorchRec tables (docs/sink_tables.md):
                .metadata               torch.distributed.checkpoint's index of every saved chunk
                __0_0.distcp ...        one file per rank at save time: its rows of every table and its rows'
                                        optimizer state, under the keys `tables/embeddings.<table>.weight` and
                                        `optimizer/state/embeddings.<table>.weight/<table>.momentum1`
                sink_tables.json        written last (by rank 0): layout, shape, optimizer, the world size at
                                        save time and the size of every file above, `.metadata` included
            nulls_meta.json         written LAST: config, model, sinks, data digests, step, and the size of
                                    every file above -- its presence and those sizes mark a complete tag
        .universal/<tag>/           only while a resume on another world size runs (or after it crashed):
                                    DeepSpeed's universal checkpoint of <tag>, `zero/<param>/{fp32,exp_avg,
                                    exp_avg_sq,step}.pt` + `mp_rank_00_model_states.pt`
    <run_dir>/checkpoints.old-<UTC time>/   a run's earlier checkpoints moved aside by `checkpoint.start_over`

The sink-table directory is read back by any world size: DCP reassembles each rank's row range from the saved
chunks (resharding), so `sink_tables.json`'s world size is a record, not a requirement. A tag that has one is
complete only when `sink_tables.json` is too (every file it lists has its size). The tag's `model.safetensors`
of such a run is still the whole model: the dense weights plus the sink tables under their parameter names,
written in place by every rank (the export below), so every tool reads it as any other checkpoint; the meta's
`sink_tables` record (`sharded_sink_tables`) tells the tools to read its tables row by row.

Table names and rows: layout `per_layer` keeps layer l's rows in table `layer_<l>` (row u = unit u), `shared`
keeps every layer in table `sinks` (row l * rows + u): `sink_table_name`, `sink_table_row`. DCP's keys are
`tables.embeddings.<table>.weight` and, for each optimizer state tensor of a table, a key under
`optimizer.state.embeddings.<table>.weight.` (`SINK_TABLES_*_KEY`). DCP's `.metadata` is a pickle: it is read
back only through a restricted unpickler that builds the classes of `DCP_METADATA_GLOBALS` and nothing else.

Sink-table export (`export_tables`): one safetensors file, `sink_tables.safetensors`, holding three float32
(R, D) tensors per layer under the model's own parameter names (`transformer.h.<i>.mlp.sink_gate`, `sink_up`,
`sink_down`; `sink_table_key`), so a deployment reads one source's rows through `formats.weights.RowReader`.

Deployed checkpoint (`nulls-unlearn --method hard`, exports): a directory holding `model.safetensors` and
`nulls_meta.json` (meta last).

A tag or deployed checkpoint that `nulls-unlearn purge` rewrote records it in its meta under `purge`
(`PURGE_KEY`): `source_ids` (every source purged so far), `original_sha256` (the weights' content digest before
the first purge: forget sets and manifests keep citing it), and `history`. A purged training checkpoint
resumes only with those sources in `train.exclude_sources` (`purged_sources`), so they are not trained again.

A tag is complete when its meta exists, parses, and every file it lists has the recorded size. `latest` must name
a tag of this very directory (`step_` + 8 digits, no path). `resolve_latest` falls back to the newest complete tag
when `latest` is missing, blank, foreign or names an incomplete tag, and says which and why.
"""
from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nulls_dist.formats import atomic, documents

CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
META_NAME = "nulls_meta.json"
WEIGHTS_NAME = "model.safetensors"
LOADER_STATE_NAME = "loader_state.json"
RANK_STATE_PATTERN = "rank_{rank:05d}.json"
TAG_RE = re.compile(r"^step_(\d{8})$")
META_FORMAT = "nulls-checkpoint"
SINK_TABLES_DIR = "sink_tables"
SINK_TABLES_META_NAME = "sink_tables.json"
SINK_TABLES_FORMAT = "nulls-sink-tables"
SINK_EXPORT_NAME = "sink_tables.safetensors"
SINK_PARTS = ("gate", "up", "down")  # the order of the three D-wide blocks of one table row
SINK_TABLES_WEIGHT_KEY = "tables.embeddings.{table}.weight"  # a table's rows in the DCP checkpoint
SINK_TABLES_STATE_PREFIX = "optimizer.state.embeddings.{table}.weight."  # + each optimizer state tensor's name
# The only globals DCP's `.metadata` pickle names (torch 2.13, listed with pickletools over the trainer's
# checkpoints): its metadata dataclasses, torch.Size, dtypes (any `torch.<dtype>`), layouts and memory formats
# by name, and the checkpoint path.
DCP_METADATA_GLOBALS = (
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
)
DCP_METADATA_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")
UNIVERSAL_DIR = ".universal"  # hidden from the tag listing: a temporary conversion, never a checkpoint
OLD_CHECKPOINTS_PREFIX = CHECKPOINTS_DIR + ".old-"  # checkpoint.start_over moves a run's checkpoints aside here
PURGE_KEY = "purge"


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, incomplete or malformed; the message names the file."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    match = TAG_RE.match(tag)
    if match is None:
        raise CheckpointError(f"{tag!r} is not a checkpoint tag (step_ followed by 8 digits)")
    return int(match.group(1))


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def rank_state_file(tag_dir: str | os.PathLike, rank: int) -> Path:
    return Path(tag_dir) / RANK_STATE_PATTERN.format(rank=rank)


def sink_tables_dir(tag_dir: str | os.PathLike) -> Path:
    return Path(tag_dir) / SINK_TABLES_DIR


def sink_table_key(layer: int, part: str) -> str:
    """The exported tensor of one layer's gate, up or down rows: the model's own parameter name."""
    if part not in SINK_PARTS:
        raise ValueError(f"part must be one of {SINK_PARTS}, got {part!r}")
    return f"transformer.h.{layer}.mlp.sink_{part}"


def sink_table_name(layout: str, layer: int) -> str:
    """The TorchRec table that holds `layer`'s rows."""
    return f"layer_{layer}" if layout == "per_layer" else "sinks"


def sink_table_row(layout: str, layer: int, unit, rows_per_layer: int):
    """The table row of pool unit `unit` (int or integer array) of `layer`."""
    return unit if layout == "per_layer" else unit + layer * rows_per_layer


def sharded_sink_tables(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The `sink_tables` record of a checkpoint's meta when its sink rows were trained in row-sharded tables
    (layout, num_layers, rows, dim, optimizer), else None."""
    record = meta.get("sink_tables")
    return record if isinstance(record, dict) and record.get("mode") == "sharded" else None
def purged_sources(meta: dict[str, Any]) -> list[int]:
    """The source ids `nulls-unlearn purge` removed from a checkpoint (its meta's `purge.source_ids`)."""
    return sorted(int(s) for s in (meta.get(PURGE_KEY) or {}).get("source_ids", []))


def run_checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoints directory of a run: `checkpoints/` and the `checkpoints.old-*` ones set aside."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and
                  (p.name == CHECKPOINTS_DIR or p.name.startswith(OLD_CHECKPOINTS_PREFIX)))


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
    """True when the run directory holds a `latest` pointer or any tag directory (complete or not)."""
    ckpt = checkpoints_dir(run_dir)
    return ckpt.is_dir() and ((ckpt / LATEST_NAME).exists() or bool(list_tags(ckpt)))


# ------------------------------------------------------------------------------------------------ meta
def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; CheckpointError naming the file when it is missing or not JSON."""
    return documents.read_json(path, what, CheckpointError)


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    return documents.read_json_object(Path(directory) / META_NAME, "checkpoint meta", CheckpointError)


def file_sizes(directory: str | os.PathLike, exclude: tuple[str, ...] = (META_NAME,)) -> dict[str, int]:
    """Relative path -> size of every file under `directory` (recursively), for the meta's completeness record."""
    directory = Path(directory)
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel not in exclude and not path.name.startswith("."):
            out[rel] = path.stat().st_size
    return out


def write_meta(directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Record every file's size in the meta and write it (atomically, last)."""
    directory = Path(directory)
    return atomic.write_json(directory / META_NAME, {**meta, "format": META_FORMAT,
                                                     "files": file_sizes(directory)})


def incomplete_reason(tag_dir: str | os.PathLike) -> str | None:
    """None when the tag directory is complete, else what is wrong (naming the file)."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        return f"{tag_dir} does not exist"
    try:
        meta = read_meta(tag_dir)
    except CheckpointError as exc:
        return str(exc)
    files = meta.get("files")
    if not isinstance(files, dict):
        return f"{tag_dir / META_NAME} lists no files (written by an older version, or not a checkpoint)"
    for rel, size in files.items():
        path = tag_dir / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the meta recorded {size}"
    if f"{SINK_TABLES_DIR}/{SINK_TABLES_META_NAME}" in files:
        try:
            read_sink_tables_meta(sink_tables_dir(tag_dir))  # its own list: DCP's hidden `.metadata` too
        except CheckpointError as exc:
            return str(exc)
    return None


def write_sink_tables_meta(directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """The sink-table directory's own meta, written last: every file's size (DCP's hidden `.metadata` too, which
    the tag-level `file_sizes` skips as a dot-file) plus `meta`."""
    directory = Path(directory)
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir())
             if p.is_file() and p.name != SINK_TABLES_META_NAME and not fnmatch.fnmatch(p.name, atomic.temp_glob())}
    return atomic.write_json(directory / SINK_TABLES_META_NAME, {**meta, "format": SINK_TABLES_FORMAT,
                                                                 "files": files})


def read_sink_tables_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The sink-table meta of a complete directory; CheckpointError naming the file that is missing, of the
    wrong size, or not a sink-table meta."""
    directory = Path(directory)
    meta = documents.read_json_object(directory / SINK_TABLES_META_NAME, "sink-table meta", CheckpointError)
    files = meta.get("files")
    if meta.get("format") != SINK_TABLES_FORMAT or not isinstance(files, dict):
        raise CheckpointError(f"{directory / SINK_TABLES_META_NAME} is not a sink-table meta "
                              f"(format {meta.get('format')!r})")
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path} has {path.stat().st_size} bytes, the meta recorded {size}")
    return meta


# ------------------------------------------------------------------------------------------------ latest
def list_tags(ckpt_dir: str | os.PathLike) -> list[str]:
    """Tag directories in step order (complete or not)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))


def read_latest(ckpt_dir: str | os.PathLike) -> str | None:
    """The tag `latest` names; None when there is no pointer; CheckpointError when it is blank or names anything
    but a tag of this directory (a path, `..`, another run's directory)."""
    path = Path(ckpt_dir) / LATEST_NAME
    if not path.exists():
        return None
    try:
        tag = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if not tag:
        raise CheckpointError(f"{path} is empty")
    if not TAG_RE.match(tag):
        raise CheckpointError(f"{path} names {tag!r}, which is not a tag of this run (step_ + 8 digits, no path)")
    return tag


def write_latest(ckpt_dir: str | os.PathLike, tag: str) -> Path:
    step_of(tag)
    return atomic.write_text(Path(ckpt_dir) / LATEST_NAME, tag + "\n")


@dataclass
class Resolved:
    """The tag to use and what was wrong on the way (for a warning that names each)."""

    tag: str | None
    problems: list[str] = field(default_factory=list)


def resolve_latest(ckpt_dir: str | os.PathLike) -> Resolved:
    """The newest complete tag: the one `latest` names when it is complete, else the newest complete tag by
    step (each skipped candidate is listed in `problems`). `tag` is None when no complete tag exists."""
    ckpt_dir = Path(ckpt_dir)
    problems: list[str] = []
    try:
        named = read_latest(ckpt_dir)
    except CheckpointError as exc:
        problems.append(str(exc))
        named = None
    if named is not None:
        reason = incomplete_reason(ckpt_dir / named)
        if reason is None:
            return Resolved(named, problems)
        problems.append(f"`latest` names {named}, which is incomplete: {reason}")
    for tag in reversed(list_tags(ckpt_dir)):
        if tag == named:
            continue
        reason = incomplete_reason(ckpt_dir / tag)
        if reason is None:
            return Resolved(tag, problems)
        problems.append(f"{tag} is incomplete: {reason}")
    return Resolved(None, problems)


def is_deployed(directory: str | os.PathLike) -> bool:
    """A deployed checkpoint: weights and meta directly in the directory, not a training tag."""
    directory = Path(directory)
    return (directory / WEIGHTS_NAME).is_file() and (directory / META_NAME).is_file() and \
        not TAG_RE.match(directory.name)
