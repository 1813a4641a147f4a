"""The lineage of a training run: every artifact on disk that holds its sink rows, and what each file of it is.
`nulls-unlearn purge` (purge.py) rewrites what this finds; `verify` re-scans with it.

Artifacts (kinds):
- `training_tag`: `<run>/checkpoints*/step_XXXXXXXX/` (`checkpoints/` and every `checkpoints.old-*` set aside by
  `checkpoint.start_over`): our `model.safetensors`, DeepSpeed's files, `nulls_meta.json`, the JSON states;
- `universal_tag`: `<run>/checkpoints*/.universal/<tag>/`, DeepSpeed's universal checkpoint a resume on another
  world size writes and removes (one is left behind only by a crash);
- `deployed`: a directory with `model.safetensors` + `nulls_meta.json` (`nulls-unlearn --method hard`, copies),
  found inside the run directory or named by the user;
- `export`: a weights file named by the user or found in the run directory: safetensors, or a torch-saved dict of
  tensors read with the restricted unpickler (`lit_model.pth`, zero_to_fp32's `pytorch_model.bin`), keyed by
  NullTransformer or litgpt names (`sink_tables.safetensors`, zero_to_fp32's `model*.safetensors`, ...).

Every file of an artifact gets a role: `weights` (our safetensors), `deepspeed` (parsed by
`train.checkpoint_rows`), `sink_tables` (a file of the TorchRec tables' DCP directory `sink_tables/` of a
sharded-table run, in a tag or a hard-deployed copy: edited by `deploy.sink_tables_dcp`, whose restricted
unpickler reads DCP's `.metadata`), `meta`, `no_weights` (JSON states, `latest`, DeepSpeed's scripts) or a
*problem*: a file purge cannot rewrite (unknown; a file of `sink_tables/` its `sink_tables.json` does not list;
an incomplete `sink_tables/`, or one in a checkpoint whose meta records no sharded tables). Problems are reported
by name; they are removed only when the user asks (`--remove-unrewritable`), never left silently.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from nulls_dist.deploy.checkpoint_io import model_config_from_meta, sink_table_keys
from nulls_dist.formats import atomic
from nulls_dist.formats import checkpoint as layout

TRAINING_TAG, UNIVERSAL_TAG, DEPLOYED, EXPORT = "training_tag", "universal_tag", "deployed", "export"
TAG_NO_WEIGHTS = re.compile(r"^(loader_state\.json|rank_\d{5}\.json)$")
CHECKPOINTS_NO_WEIGHTS = ("latest", "zero_to_fp32.py", "zero_to_torch.py")  # pointer, DeepSpeed's own scripts
UNIVERSAL_NO_WEIGHTS = ("latest_universal",)
EXPORT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
EXPORT_SIDE_SUFFIXES = (".json", ".yaml", ".yml", ".txt", ".md")  # configs and indexes beside exported weights
# what may hold tensors: any such file outside an artifact is reported (never assumed harmless)
WEIGHT_SUFFIXES = EXPORT_SUFFIXES + (".ckpt", ".distcp", ".npy", ".npz", ".h5", ".gguf", ".onnx", ".msgpack")


class DeepSpeedFiles(Protocol):
    """What the lineage needs from the trainer's knowledge of DeepSpeed's files (train.checkpoint_rows)."""

    def owns(self, rel: str) -> bool: ...

    def check(self, directory: Path, rel_files: list[str], model_cfg, external_sinks: bool = False) -> None: ...

    def params(self, directory: Path, rel_files: list[str], model_cfg, external_sinks: bool = False) -> list[str]: ...

    def nonzero(self, directory: Path, rel_files: list[str], rows: dict[str, np.ndarray],
                model_cfg, external_sinks: bool = False) -> dict[str, dict[str, int]]: ...

    def rewrite(self, directory: Path, rel_files: list[str], rows: dict[str, np.ndarray], model_cfg,
                out_dir: Path) -> dict[str, dict[str, Any]]: ...


@dataclass
class Artifact:
    path: Path  # a directory, or the file of an export
    kind: str
    meta: dict[str, Any] | None
    files: dict[str, str] = field(default_factory=dict)  # relative path -> role
    problems: dict[str, str] = field(default_factory=dict)  # relative path -> why it cannot be rewritten
    whole: str | None = None  # set when the artifact as a whole cannot be rewritten (why)

    def of_role(self, role: str) -> list[str]:
        return sorted(rel for rel, r in self.files.items() if r == role)

    @property
    def sharded(self) -> bool:
        """Its sink rows were trained in sharded tables (meta): the weights are streamed, never loaded whole, and
        DeepSpeed's engine held every weight but the sink rows."""
        return self.meta is not None and layout.sharded_sink_tables(self.meta) is not None


@dataclass
class Lineage:
    run_dir: Path | None
    artifacts: list[Artifact]
    strays: dict[Path, str]  # files outside every artifact that may hold weights -> why reported

    def problems(self) -> list[str]:
        out = [f"{a.path}: {a.whole}" for a in self.artifacts if a.whole]
        out += [f"{a.path / rel}: {why}" for a in self.artifacts if not a.whole for rel, why in a.problems.items()]
        return out + [f"{path}: {why}" for path, why in self.strays.items()]


def rel_files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def _classify_sink_tables(art: Artifact, rels: list[str]) -> None:
    """The files of `<artifact>/sink_tables/`: role `sink_tables` for those its complete `sink_tables.json` lists
    (and itself), a problem for anything else."""
    if not art.sharded:
        art.problems.update({rel: f"a {layout.SINK_TABLES_DIR}/ directory in a checkpoint whose meta records no "
                                  "sharded sink tables" for rel in rels})
        return
    try:
        listed = set(layout.read_sink_tables_meta(layout.sink_tables_dir(art.path))["files"])
    except layout.CheckpointError as exc:
        art.problems.update({rel: f"part of an incomplete sink-table directory ({exc})" for rel in rels})
        return
    for rel in rels:
        name = rel.split("/", 1)[1]
        if name in listed | {layout.SINK_TABLES_META_NAME}:
            art.files[rel] = "sink_tables"
        else:
            art.problems[rel] = (f"a file of {layout.SINK_TABLES_DIR}/ that its {layout.SINK_TABLES_META_NAME} does "
                                 "not list; it may hold weights")


def _split_sink_tables(rels: list[str]) -> tuple[list[str], list[str]]:
    """(files of the sink-table directory, the others)."""
    inside = [rel for rel in rels if rel.split("/")[0] == layout.SINK_TABLES_DIR and "/" in rel]
    return inside, [rel for rel in rels if rel not in set(inside)]


def classify_tag(tag_dir: Path, deepspeed: DeepSpeedFiles) -> Artifact:
    art = Artifact(tag_dir, TRAINING_TAG, layout.read_meta(tag_dir))
    tables, rels = _split_sink_tables(rel_files(tag_dir))
    _classify_sink_tables(art, tables)
    for rel in rels:
        if rel == layout.WEIGHTS_NAME:
            art.files[rel] = "weights"
        elif rel == layout.META_NAME:
            art.files[rel] = "meta"
        elif TAG_NO_WEIGHTS.match(rel):
            art.files[rel] = "no_weights"
        elif deepspeed.owns(rel) and "/" not in rel:
            art.files[rel] = "deepspeed"
        else:
            art.problems[rel] = "a file purge does not know; it may hold weights"
    if layout.WEIGHTS_NAME not in art.files:
        art.whole = f"no {layout.WEIGHTS_NAME} (not written by this version of nulls-train)"
    return art


def classify_universal(tag_dir: Path, deepspeed: DeepSpeedFiles) -> Artifact:
    art = Artifact(tag_dir, UNIVERSAL_TAG, None)
    for rel in rel_files(tag_dir):
        if deepspeed.owns(rel):
            art.files[rel] = "deepspeed"
        else:
            art.problems[rel] = "a file of a universal checkpoint purge does not know; it may hold weights"
    return art


def classify_deployed(directory: Path) -> Artifact:
    art = Artifact(directory, DEPLOYED, layout.read_meta(directory))
    tables, rels = _split_sink_tables(rel_files(directory))
    _classify_sink_tables(art, tables)  # a hard-deployed copy of a sharded-table tag has them (audit/hard.py)
    for rel in rels:
        role = {layout.WEIGHTS_NAME: "weights", layout.META_NAME: "meta"}.get(rel)
        if role:
            art.files[rel] = role
        else:
            art.problems[rel] = "a file purge does not know inside a deployed checkpoint; it may hold weights"
    return art


def export_artifact(path: Path) -> Artifact:
    return Artifact(path, EXPORT, None, {path.name: "export"})


def _scan_checkpoints_dir(ckpt_dir: Path, deepspeed: DeepSpeedFiles, lineage: Lineage) -> None:
    for entry in sorted(ckpt_dir.iterdir()):
        if entry.is_dir() and layout.TAG_RE.match(entry.name):
            lineage.artifacts.append(classify_tag(entry, deepspeed))
        elif entry.is_dir() and entry.name == layout.UNIVERSAL_DIR:
            for sub in sorted(entry.iterdir()):
                if sub.is_dir() and layout.TAG_RE.match(sub.name):
                    lineage.artifacts.append(classify_universal(sub, deepspeed))
                elif sub.name not in UNIVERSAL_NO_WEIGHTS:
                    lineage.strays[sub] = "an entry of the universal-checkpoint directory purge does not know"
        elif entry.is_file() and entry.name in CHECKPOINTS_NO_WEIGHTS:
            continue
        else:
            lineage.strays[entry] = "an entry of a checkpoints directory purge does not know; it may hold weights"


def _scan_run_rest(run_dir: Path, skip: set[Path], lineage: Lineage) -> None:
    """Deployed checkpoints and weight files elsewhere in the run directory (not in a checkpoints directory)."""
    stack = [run_dir]
    while stack:
        directory = stack.pop()
        if directory != run_dir and layout.is_deployed(directory):
            lineage.artifacts.append(classify_deployed(directory))
            continue
        for entry in sorted(directory.iterdir()):
            if entry in skip:
                continue
            if entry.is_symlink():  # wandb's `latest-run`: a link inside the run is scanned at its target
                if run_dir not in entry.resolve().parents:
                    lineage.strays[entry] = "a symbolic link out of the run directory; purge does not follow it"
            elif entry.is_dir():
                stack.append(entry)
            elif entry.is_file() and entry.suffix in EXPORT_SUFFIXES:
                lineage.artifacts.append(export_artifact(entry))
            elif entry.is_file() and entry.suffix in WEIGHT_SUFFIXES:
                lineage.strays[entry] = f"a {entry.suffix} file in the run directory that purge cannot rewrite"


def _named(path: Path, deepspeed: DeepSpeedFiles) -> list[Artifact]:
    """The artifact(s) a path the user named designates."""
    if not path.exists():
        raise ValueError(f"artifact path not found: {path}")
    if path.is_file():
        if path.suffix not in EXPORT_SUFFIXES:
            raise ValueError(f"{path}: not a weights file purge can rewrite (suffix one of {EXPORT_SUFFIXES})")
        return [export_artifact(path)]
    if layout.TAG_RE.match(path.name):
        if path.parent.name == layout.UNIVERSAL_DIR:
            return [classify_universal(path, deepspeed)]
        return [classify_tag(path, deepspeed)]
    if layout.is_deployed(path):
        return [classify_deployed(path)]
    weights = [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix in EXPORT_SUFFIXES]
    others = [p for p in sorted(path.rglob("*")) if p.is_file() and p not in weights and
              not (p.parent == path and p.suffix in EXPORT_SIDE_SUFFIXES)]
    if not weights:
        raise ValueError(f"{path}: neither a checkpoint tag, a deployed checkpoint nor a directory of exported "
                         f"weights ({', '.join(EXPORT_SUFFIXES)})")
    if others:
        raise ValueError(f"{path}: an export directory holding files purge does not know: "
                         f"{[str(p.relative_to(path)) for p in others[:10]]}")
    return [export_artifact(p) for p in weights]


def recover(run_dir: Path | None, paths: list[Path]) -> list[str]:
    """Finish what an interrupted purge left (atomic.recover_directory for every hidden sibling it names)."""
    parents = set()
    if run_dir is not None:
        for ckpt_dir in layout.run_checkpoint_dirs(run_dir):
            parents |= {ckpt_dir, ckpt_dir / layout.UNIVERSAL_DIR}
    parents |= {p.parent for p in paths}
    done = []
    pattern = re.compile(r"^\.(?P<name>.+)\.(ready|replaced|removed)-\d+-[0-9a-f]{8}$")
    for parent in sorted(p for p in parents if p.is_dir()):
        targets = {m.group("name") for m in map(pattern.match, (e.name for e in parent.iterdir())) if m}
        for name in sorted(targets):
            done += atomic.recover_directory(parent / name)
    return done


def discover(run_dir: str | Path | None, paths: list[str | Path], deepspeed: DeepSpeedFiles) -> Lineage:
    """Every artifact of the run (when given) and of the named paths, each file classified."""
    run = Path(run_dir).resolve() if run_dir is not None else None
    lineage = Lineage(run, [], {})
    if run is not None:
        if not run.is_dir():
            raise ValueError(f"--run {run} is not a directory")
        ckpt_dirs = layout.run_checkpoint_dirs(run)
        if not ckpt_dirs:
            raise ValueError(f"--run {run} holds no checkpoints directory (checkpoints/ or checkpoints.old-*)")
        for ckpt_dir in ckpt_dirs:
            _scan_checkpoints_dir(ckpt_dir, deepspeed, lineage)
        _scan_run_rest(run, set(ckpt_dirs), lineage)
    seen = {a.path for a in lineage.artifacts}
    for path in paths:
        for art in _named(Path(path).resolve(), deepspeed):
            if art.path not in seen:
                lineage.artifacts.append(art)
                seen.add(art.path)
    return lineage


# ------------------------------------------------------------------------------------------------ rows
def sink_rows(union: np.ndarray) -> dict[str, np.ndarray]:
    """(L, P) bool forgotten rows -> {sink table parameter name: ascending row indices}."""
    return {key: np.nonzero(union[layer])[0] for layer in range(union.shape[0]) for key in sink_table_keys(layer)}


def litgpt_rows(union: np.ndarray, n_backbone: int) -> dict[str, tuple[int, np.ndarray]]:
    """The same rows in a litgpt state dict: {key: (dim, indices)} (fc_1 / fc_2 rows, proj columns)."""
    out = {}
    for layer in range(union.shape[0]):
        units = n_backbone + np.nonzero(union[layer])[0]
        prefix = f"transformer.h.{layer}.mlp."
        out.update({prefix + "fc_1.weight": (0, units), prefix + "fc_2.weight": (0, units),
                    prefix + "proj.weight": (1, units)})
    return out


def artifact_model(art: Artifact, fallback: dict[str, Any]) -> Any:
    """The NullConfig an artifact's rows follow: its own meta's, else the run's (universal tags, exports)."""
    return model_config_from_meta(art.meta if art.meta is not None else fallback, art.path)
