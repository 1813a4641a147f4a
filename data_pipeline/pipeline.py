"""The data pipeline's typed configuration (`DataConfig`) and its stage runner (`run_stages`), shared by the
`nulls-data` Hydra app and the trainer (which prepares missing demo data through it).

Layout of `output_dir`:
  ingest/articles/part-*.parquet, ingest/ingest_report.json   (stage ingest)
  tokenizer.model, tokenizer.json                              (stage tokenizer; json = how it was made)
  shard-*.tar, holdout/shard-*.tar, registry.parquet, manifest.json, .work/ (stage shard)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from nulls_dist.data_pipeline import synthwiki
from nulls_dist.data_pipeline.ingest import (
    IngestConfig,
    iter_articles,
    read_report,
    run_ingest,
    verify_ingest,
)
from nulls_dist.data_pipeline.manifest import (
    build_manifest,
    write_dataset_registry,
    write_manifest,
)
from nulls_dist.data_pipeline.packing import PackingConfig
from nulls_dist.data_pipeline.registry import SourceRegistry
from nulls_dist.data_pipeline.selection import random_holdouts, select_holdouts
from nulls_dist.data_pipeline.shards import ShardConfig, write_shards
from nulls_dist.data_pipeline.tokenizer import (
    MODEL_FILE,
    TokenizerConfig,
    describe_tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from nulls_dist.formats import atomic
from nulls_dist.formats.digests import file_sha256

log = logging.getLogger(__name__)

STAGES = ("ingest", "tokenizer", "shard")
BUNDLED_PREFIX = "bundled:"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
INGEST_SUBDIR = "ingest"
TOKENIZER_INFO = "tokenizer.json"


@dataclass
class IngestSettings:
    """Inputs: files, directories or globs; `bundled:<name>` is a dataset shipped in data_pipeline/bundled;
    `synthwiki:<key=value,...>` a SynthWiki corpus generated on demand into the output directory."""

    inputs: list[str] = field(default_factory=list)
    format: str = "auto"
    rows_per_part: int = 50_000
    batch_rows: int = 2_048
    num_workers: int = 1  # processes converting MediaWiki XML wikitext


@dataclass
class HoldoutConfig:
    """Sources never trained on: explicit `sources` (ids, titles, @file) plus a seeded `fraction` or `count`."""

    sources: list = field(default_factory=list)
    fraction: float = 0.0
    count: int = 0
    seed: int = 0


@dataclass
class DataConfig:
    output_dir: str = "data/out"
    id_offset: int | None = None  # None: the tokenizer's vocabulary size (the paper: 49152)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig)

    @property
    def ingest_dir(self) -> Path:
        return Path(self.output_dir) / INGEST_SUBDIR

    def resolved_id_offset(self) -> int:
        if self.id_offset is not None:
            if self.id_offset < 0:
                raise ValueError(f"id_offset must be >= 0, got {self.id_offset}")
            return self.id_offset
        if self.tokenizer.model_path:
            return load_tokenizer(self.tokenizer.model_path).get_piece_size()
        return self.tokenizer.vocab_size


def _fits(value, hint) -> bool:
    """Does a config value have the field's type? (int for float is fine; bool is not an int here.)"""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is list or origin is list:
        args = typing.get_args(hint)
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    return True  # a type this check does not know: the dataclass validates it


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        sub = _NESTED.get((cls, name))
        if sub is None and not _fits(value, hints[name]):
            raise ValueError(f"{where}.{name}: expected {_type_name(hints[name])}, got {value!r}")
        kwargs[name] = _build(sub, value, f"{where}.{name}") if sub else value
    return cls(**kwargs)


def _type_name(hint) -> str:
    return str(hint) if typing.get_origin(hint) is not None else getattr(hint, "__name__", str(hint))


_NESTED = {(DataConfig, "ingest"): IngestSettings, (DataConfig, "tokenizer"): TokenizerConfig,
           (DataConfig, "packing"): PackingConfig, (DataConfig, "shard"): ShardConfig,
           (DataConfig, "holdout"): HoldoutConfig}


def data_config_from_dict(d: dict) -> DataConfig:
    """A plain dict (e.g. `OmegaConf.to_container(cfg.data)`) -> DataConfig; ValueError names unknown fields."""
    cfg = _build(DataConfig, dict(d), "data")
    cfg.ingest.inputs = list(cfg.ingest.inputs)
    cfg.holdout.sources = list(cfg.holdout.sources or [])
    return cfg


def resolve_input(item: str, output_dir: str | Path | None = None) -> str:
    """An ingest input as a path: `bundled:<name>` in data_pipeline/bundled, `synthwiki:<spec>` generated on
    demand under `output_dir` (synthwiki.materialize), anything else as given."""
    if item.startswith(synthwiki.SPEC_PREFIX):
        if output_dir is None:
            raise ValueError(f"ingest.inputs: {item!r} is generated into the output directory; none was given")
        return str(synthwiki.materialize(item, output_dir))
    if item.startswith(BUNDLED_PREFIX):
        path = BUNDLED_DIR / item.removeprefix(BUNDLED_PREFIX)
        if not path.exists():
            raise ValueError(f"ingest.inputs: no bundled dataset {item!r} (looked in {path})")
        return str(path)
    return item


# ---- stages ------------------------------------------------------------------------------------------------


def run_ingest_stage(cfg: DataConfig) -> dict:
    inputs = [resolve_input(i, cfg.output_dir) for i in cfg.ingest.inputs]
    ingest = IngestConfig(inputs=inputs, format=cfg.ingest.format,
                          output_dir=str(cfg.ingest_dir), id_offset=cfg.resolved_id_offset(),
                          rows_per_part=cfg.ingest.rows_per_part, batch_rows=cfg.ingest.batch_rows,
                          num_workers=cfg.ingest.num_workers)
    return run_ingest(ingest)


def tokenizer_path(cfg: DataConfig) -> Path:
    return Path(cfg.tokenizer.model_path) if cfg.tokenizer.model_path else Path(cfg.output_dir) / MODEL_FILE


def run_tokenizer_stage(cfg: DataConfig) -> Path:
    """Adopt `tokenizer.model_path`, or train; an existing model trained with the same settings on the same
    ingest output is kept."""
    if cfg.tokenizer.model_path:
        describe_tokenizer(cfg.tokenizer.model_path)  # checks the special ids
        return Path(cfg.tokenizer.model_path)
    report = read_report(cfg.ingest_dir)
    if report is None:
        raise ValueError(f"output_dir {cfg.output_dir}: no ingest output (run the ingest stage first)")
    info = {"config": asdict(cfg.tokenizer), "ingest_fingerprint": report["fingerprint"]}
    path, info_path = tokenizer_path(cfg), Path(cfg.output_dir) / TOKENIZER_INFO
    if path.exists() and info_path.exists() and _tokenizer_is_current(path, info_path, info):
        log.info("tokenizer: %s is up to date, keeping it", path)
        return path
    texts = tqdm((t for batch in iter_articles(cfg.ingest_dir, columns=["text"]) for t in batch.column(0).to_pylist()),
                 total=report["num_written"], desc="tokenizer sample", unit="article")
    path = train_tokenizer(texts, cfg.tokenizer, cfg.output_dir, num_texts=report["num_written"])
    atomic.write_text(info_path, json.dumps({**info, "sha256": file_sha256(path)}, indent=1, sort_keys=True))
    return path


def _tokenizer_is_current(path: Path, info_path: Path, info: dict) -> bool:
    """The model was trained with these settings on this ingest output and is byte for byte the one its record
    describes (a damaged model is trained again, with a warning)."""
    try:
        old = json.loads(info_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("tokenizer: %s is not valid JSON (%s); training the tokenizer again", info_path, exc)
        return False
    if not isinstance(old, dict) or {k: old.get(k) for k in info} != info:
        return False
    digest = file_sha256(path)
    if old.get("sha256") != digest:
        log.warning("tokenizer: %s has sha256 %s, %s records %s; training it again", path, digest, info_path,
                    old.get("sha256"))
        return False
    return True


def _holdout_ids(cfg: DataConfig) -> list[int]:
    h = cfg.holdout
    if not h.sources and h.fraction == 0 and h.count == 0:
        return []
    if not h.sources:  # only source ids are needed: streamed, no title index over the corpus
        report = read_report(cfg.ingest_dir)
        ids = (b.column(0).to_numpy() for b in iter_articles(cfg.ingest_dir, columns=["source_id"], batch_rows=65536))
        return sorted(random_holdouts(ids, report["num_written"], fraction=h.fraction, count=h.count, seed=h.seed))
    # The ingested parts carry source_id and title, which is all a SourceRegistry lookup needs.
    registry = SourceRegistry.open(cfg.ingest_dir / "articles")
    return sorted(select_holdouts(registry, h.sources, fraction=h.fraction, count=h.count, seed=h.seed))


def _manifest_tokenizer(cfg: DataConfig, path: Path) -> dict:
    info = describe_tokenizer(path)
    out = Path(cfg.output_dir).resolve()
    full = Path(info["path"])
    info["path"] = str(full.relative_to(out)) if full.is_relative_to(out) else str(full)
    return info


def run_shard_stage(cfg: DataConfig, on_phase: Callable[[str], None] | None = None) -> tuple[dict, list[str]]:
    """Shards, registry and manifest; returns the manifest and the repairs (a line per shard task run again
    because a file no longer matched its record). `on_phase(name)`, if given, is called as each phase ends:
    "setup" (tokenizer check, holdout selection), "shards" (plan and every shard task), "registry", "manifest"
    (the benchmark records per-phase peak RSS with it)."""
    phase_done = on_phase or (lambda name: None)
    tok_path = tokenizer_path(cfg)
    if not tok_path.exists():
        raise ValueError(f"tokenizer {tok_path} not found (run the tokenizer stage first)")
    tokenizer = _manifest_tokenizer(cfg, tok_path)
    holdout_ids = _holdout_ids(cfg)
    phase_done("setup")
    plan, markers, repairs = write_shards(cfg.ingest_dir, cfg.output_dir, tok_path, cfg.packing, cfg.shard,
                                          holdout_ids, tokenizer["vocab_size"])
    phase_done("shards")
    registry = write_dataset_registry(cfg.ingest_dir, cfg.output_dir, plan, markers)
    phase_done("registry")
    report = read_report(cfg.ingest_dir)
    manifest = build_manifest(plan, markers, tokenizer, registry, report["id_offset"], holdout_ids)
    write_manifest(cfg.output_dir, manifest)
    phase_done("manifest")
    log.info("shard: %d train shards (%d samples, %d tokens), %d holdout shards -> %s", manifest["num_shards"],
             manifest["num_samples"], manifest["num_tokens"], len(manifest["holdout"]["shards"]), cfg.output_dir)
    if repairs:
        log.warning("shard: repaired %d shard task(s) whose files did not match their records", len(repairs))
    return manifest, repairs


def _make_output_dir(path: Path) -> None:
    """Create `output_dir`, or say (naming the field) why it cannot hold the dataset, before any stage starts."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"output_dir {path}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir {path}: not writable")


def run_stages(cfg: DataConfig, stages: list[str]) -> dict:
    """Run the named stages in pipeline order ("all" = every stage). Returns {stage: result}, and under
    "repaired" what the shard stage rewrote because it no longer matched its record. Stages that read an
    ingest output without running the ingest stage check it against its report first."""
    wanted = set(STAGES) if "all" in stages else set(stages)
    unknown = sorted(wanted - set(STAGES))
    if unknown:
        raise ValueError(f"stage: unknown {unknown}; choose from {[*STAGES, 'all']}")
    _make_output_dir(Path(cfg.output_dir))
    results: dict = {}
    if "ingest" in wanted:
        results["ingest"] = run_ingest_stage(cfg)
    elif wanted:
        verify_ingest(cfg.ingest_dir, cfg.shard.num_workers)
    if "tokenizer" in wanted:
        results["tokenizer"] = str(run_tokenizer_stage(cfg))
    if "shard" in wanted:
        results["shard"], results["repaired"] = run_shard_stage(cfg)
    return results
