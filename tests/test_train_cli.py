"""`nulls-train` as users run it (one process, no torchrun: world size 1): `--cfg job`, configuration errors,
and SIGTERM -> checkpoint at the next step boundary -> exit code 75 -> a rerun resumes in the same wandb run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import TINY, prepare_synthwiki

REPO = Path(__file__).resolve().parent.parent
REQUEUE_EXIT_CODE = 75


def nulls_train(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "nulls-train"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "nulls_dist.cli.train", *args]


def test_cfg_job_prints_the_resolved_config():
    out = subprocess.run(nulls_train("--cfg", "job", "deepspeed=zero2", "model=paper_wiki_1b", "optim.lr=1e-3"),
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "zero_stage: 2" in out.stdout and "preset: paper_wiki_1b" in out.stdout and "lr: 0.001" in out.stdout
    assert "output_dir: data/synthwiki" in out.stdout  # the data group reuses conf/data/synthwiki.yaml


@pytest.mark.parametrize("override,field", [("deepspeed.zero_stage=5", "deepspeed.zero_stage"),
                                            ("train.device=tpu", "train.device"),
                                            ("+train.bogus=1", "train.bogus")])
def test_bad_config_fails_naming_the_field(override, field):
    out = subprocess.run(nulls_train(override), capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("nulls-train: error: "), out.stderr
    assert field in lines[0] and "Traceback" not in out.stderr + out.stdout


def _wait_for_steps(path: Path, count: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nulls-train exited early with {proc.returncode}: {proc.stderr.read()[-4000:]}")
        if path.is_file() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"no {count} metric lines in {path} after {timeout}s")


@pytest.mark.distributed
def test_sigterm_checkpoints_exits_75_and_resumes(tmp_path):
    data_dir = prepare_synthwiki(tmp_path / "data")
    run_dir = tmp_path / "run"
    common = TINY + [f"data.output_dir={data_dir}", f"train.run_dir={run_dir}", "checkpoint.every_n_steps=1000",
                     "eval.every_n_steps=1000", "logging.wandb_mode=offline"]
    env = {**os.environ, "WANDB_SILENT": "true"}
    proc = subprocess.Popen(nulls_train(*common, "train.max_steps=500"), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(run_dir / "metrics.jsonl", 2, proc, timeout=300)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == REQUEUE_EXIT_CODE, stderr[-4000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stopped = steps[-1]
    assert 2 <= stopped < 500
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{stopped:08d}"
    meta = json.loads((ckpt / f"step_{stopped:08d}" / "nulls_meta.json").read_text())
    assert meta["step"] == stopped and meta["world_size"] == 1 and len(meta["data_manifest_sha256"]) == 64
    assert meta["sinks"]["strategy"] == "reference" and meta["model"]["n_layer"] == 2
    run_id = (run_dir / "wandb_run_id").read_text().strip()

    out = subprocess.run(nulls_train(*common, f"train.max_steps={stopped + 2}"), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [stopped + 1, stopped + 2]
    assert (ckpt / "latest").read_text().strip() == f"step_{stopped + 2:08d}"
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # both invocations, one run id


def test_prepare_data_resolves_exclude_sources_by_title_and_id(tmp_path):
    import pyarrow.parquet as pq

    from nulls_dist.cli.train import prepare_data
    from nulls_dist.train.config import train_config_from_dict
    from train_helpers import compose_raw

    raw = compose_raw([f"data.output_dir={tmp_path / 'data'}"])
    raw["train"]["exclude_sources"] = []
    handle = prepare_data(train_config_from_dict(raw).data, is_main=True)  # prepares: no manifest yet
    assert handle.exclude_source_ids == () and (tmp_path / "data" / "manifest.json").is_file()
    registry = pq.read_table(tmp_path / "data" / "registry.parquet").to_pydict()
    title, other_id = registry["title"][0], registry["source_id"][1]
    raw["train"]["exclude_sources"] = [title, other_id]
    handle = prepare_data(train_config_from_dict(raw).data, is_main=True)
    assert handle.exclude_source_ids == tuple(sorted([registry["source_id"][0], other_id]))
    assert handle.context_length == 256 and handle.vocab_size == 2048 and len(handle.holdout_source_ids) == 8
    raw["train"]["exclude_sources"] = ["No Such Article Title"]
    with pytest.raises(ValueError, match="No Such Article Title"):
        prepare_data(train_config_from_dict(raw).data, is_main=True)


def test_cfg_job_shows_what_a_prepared_dataset_fixes(tmp_path):
    from train_helpers import prepare_synthwiki

    data_dir = prepare_synthwiki(tmp_path / "data")
    out = subprocess.run(nulls_train("--cfg", "job", f"data.output_dir={data_dir}", "data.packing.context_length=128",
                                     f"train.run_dir={tmp_path / 'run'}", "deepspeed.micro_batch=2",
                                     "deepspeed.grad_accum=3"),
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    import yaml

    doc = yaml.safe_load(out.stdout)
    assert doc["data"]["packing"]["context_length"] == 256  # the dataset's, not the overridden 128
    assert doc["effective"]["data"]["from_manifest"] == ["data.packing.context_length: config 128 -> manifest 256"]
    assert doc["effective"]["step"]["grad_accum"] == 3 and doc["effective"]["step"]["global_batch"] == 6
    assert doc["effective"]["model"]["vocab_size"] == 4096 and doc["effective"]["resume"] is None
    assert doc["effective"]["sink_tables"]["mode"] == "dense"  # mode auto: 448 rows per layer, below 2**20
