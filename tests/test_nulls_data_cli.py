"""`nulls-data` (the installed console script, a Hydra app) end to end on a tiny JSONL corpus, run the way a
user runs it: relative paths against the start directory, stage selection, a clean error for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from nulls_dist.formats import dataset as schema
from nulls_data_fixtures import write_corpus

NULLS_DATA = str(Path(sys.executable).parent / "nulls-data")
TINY = ["data.id_offset=1000", "data.tokenizer.vocab_size=300", "data.tokenizer.num_threads=1",
        "data.tokenizer.character_coverage=1.0", "data.packing.context_length=32", "data.shard.target_samples=4",
        "data.shard.articles_per_shard=8", "data.holdout.count=2"]


def _run(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([NULLS_DATA, *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_nulls_data_runs_all_stages_on_a_tiny_corpus(tmp_path):
    write_corpus(tmp_path / "corpus.jsonl", 24)
    proc = _run(tmp_path, "data.output_dir=out", "data.ingest.inputs=[corpus.jsonl]", *TINY)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # stdout is the summary alone: logs go to stderr
    out = tmp_path / "out"  # relative to where nulls-data was started
    assert summary["output_dir"] == str(out) and summary["context_length"] == 32
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert manifest["num_shards"] == summary["num_shards"] == len(list(out.glob("shard-*.tar"))) >= 3
    assert manifest["holdout"]["num_sources"] == 2 and summary["num_holdout_shards"] >= 1
    assert pq.read_table(out / schema.REGISTRY_NAME).num_rows == 24
    assert not list(tmp_path.glob("outputs"))  # Hydra leaves no run directory behind

    # a rerun checks what it reuses: a shard damaged since is written again, and the run says so
    damaged = out / manifest["shards"][0]["name"]
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"x")
    again = _run(tmp_path, "stage=shard", "data.output_dir=out", "data.ingest.inputs=[corpus.jsonl]", *TINY)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / schema.MANIFEST_NAME).read_text()) == manifest
    repaired = json.loads(again.stdout)["repaired"]
    assert len(repaired) == 1 and damaged.name in repaired[0] and damaged.name in again.stderr


def test_bad_config_value_is_a_one_line_error_naming_the_field(tmp_path):
    write_corpus(tmp_path / "corpus.jsonl", 5)
    proc = _run(tmp_path, "data.output_dir=out", "data.ingest.inputs=[corpus.jsonl]", "data.packing.mode=greedy")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("nulls-data: error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "packing.mode" in proc.stderr and "greedy" in proc.stderr and "Traceback" not in proc.stderr
