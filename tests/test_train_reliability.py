"""Reliability of training runs (docs/reliability.md): a run directory holding checkpoints is never silently
restarted or overwritten, a broken newest checkpoint falls back to the last complete one, `latest` stays inside
its run, hyperparameters must be finite, a changed schedule applies on resume, a crafted pickle in a checkpoint
cannot run code in the trainer, and Ctrl-C checkpoints like SIGTERM."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nulls_dist.formats import checkpoint as layout
from nulls_dist.train.checkpoint import find_resume_point, move_aside, weights_only_loads
from nulls_dist.train.config import train_config_from_dict
from nulls_dist.train.signals import StopFlag
from train_helpers import prepare_synthwiki

REPO = Path(__file__).resolve().parent.parent


def make_tag(ckpt: Path, step: int, complete: bool = True) -> Path:
    tag = ckpt / layout.tag_for(step)
    tag.mkdir(parents=True)
    (tag / "model.safetensors").write_bytes(b"x" * (100 + step))
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"y" * 10)
    layout.write_meta(tag, {"step": step})
    if not complete:  # a save that died after the meta: a file shorter than recorded
        (tag / "model.safetensors").write_bytes(b"x")
    return tag


# ------------------------------------------------------------------------------------------------ resume rules
def test_a_fresh_run_dir_starts_fresh(tmp_path):
    assert find_resume_point("auto", tmp_path) is None
    assert find_resume_point("never", tmp_path) is None


@pytest.mark.parametrize("latest", [None, "", "  \n", "../other_run/checkpoints/step_00000002", "/etc/passwd",
                                    "step_00000099"])
def test_a_missing_blank_or_foreign_latest_falls_back_to_the_newest_complete_tag(tmp_path, latest, caplog):
    ckpt = tmp_path / "checkpoints"
    make_tag(ckpt, 2)
    make_tag(ckpt, 4)
    if latest is not None:
        (ckpt / "latest").write_text(latest)
    point = find_resume_point("auto", tmp_path)
    assert point.tag == "step_00000004" and point.load_dir == ckpt
    if latest is not None:
        assert "latest" in caplog.text or "step_00000099" in caplog.text  # the warning names what was wrong


def test_a_partially_written_newest_tag_falls_back_with_a_warning_naming_it(tmp_path, caplog):
    ckpt = tmp_path / "checkpoints"
    make_tag(ckpt, 2)
    make_tag(ckpt, 4, complete=False)
    layout.write_latest(ckpt, "step_00000004")
    point = find_resume_point("auto", tmp_path)
    assert point.tag == "step_00000002"
    assert "step_00000004" in caplog.text and "model.safetensors" in caplog.text


def test_checkpoints_without_a_complete_tag_refuse_to_restart_silently(tmp_path):
    ckpt = tmp_path / "checkpoints"
    make_tag(ckpt, 4, complete=False)
    with pytest.raises(ValueError, match="none is complete.*start_over"):
        find_resume_point("auto", tmp_path)
    (ckpt / "step_00000004").rename(ckpt / "junk")
    (ckpt / "latest").write_text("")  # only an empty pointer: still a run that has checkpointed before
    with pytest.raises(ValueError, match="start_over"):
        find_resume_point("auto", tmp_path)


def test_resume_never_or_elsewhere_would_overwrite_and_is_refused(tmp_path):
    make_tag(tmp_path / "run" / "checkpoints", 2)
    other = make_tag(tmp_path / "other" / "checkpoints", 6)
    with pytest.raises(ValueError, match="checkpoint.resume.*resume=never.*start_over"):
        find_resume_point("never", tmp_path / "run")
    with pytest.raises(ValueError, match="another checkpoint"):
        find_resume_point(str(other), tmp_path / "run")
    assert find_resume_point(str(other), tmp_path / "fresh").tag == "step_00000006"  # fine into a fresh dir


def test_start_over_moves_the_old_checkpoints_aside_and_deletes_nothing(tmp_path):
    tag = make_tag(tmp_path / "checkpoints", 2)
    assert find_resume_point("auto", tmp_path, start_over=True) is None
    moved = move_aside(tmp_path)
    assert not (tmp_path / "checkpoints").exists() and (moved / tag.name / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ config
BASE = {"train": {"max_steps": 10, "device": "cpu"}, "data": {"name": "synthwiki"}}


@pytest.mark.parametrize("section,key,value", [
    ("optim", "lr", float("inf")), ("optim", "lr", float("nan")), ("optim", "lr", 1e6), ("optim", "lr", 0.0),
    ("optim", "min_lr", float("nan")), ("optim", "eps", float("inf")), ("optim", "weight_decay", float("nan")),
    ("optim", "betas", [0.9, float("nan")]), ("deepspeed", "clip", float("inf")),
    ("train", "nonfinite_steps_to_stop", 0),
])
def test_non_finite_or_absurd_hyperparameters_are_refused_naming_the_field(section, key, value):
    raw = json.loads(json.dumps(BASE))
    raw.setdefault(section, {})[key] = value
    field = f"{section}.{key}" if section != "train" else f"train.{key}"
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        train_config_from_dict(raw)


# ------------------------------------------------------------------------------------------------ schedule
def test_a_changed_schedule_is_applied_from_the_resumed_step():
    from types import SimpleNamespace

    from nulls_dist.train.ds_config import WarmupCosine, lr_scheduler_factory, restore_schedule

    old = train_config_from_dict({**BASE, "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2}})
    new = train_config_from_dict({"train": {"max_steps": 40, "device": "cpu"}, "data": {"name": "x"},
                                  "optim": {"lr": 5e-4, "min_lr": 5e-5, "warmup_steps": 2, "weight_decay": 0.2}})
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:],
                                                                                   "weight_decay": 0.0}], lr=1e-3)
    scheduler = lr_scheduler_factory(old)(optimizer)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    engine = SimpleNamespace(lr_scheduler=scheduler, optimizer=optimizer)
    changes = restore_schedule(engine, new, 6, {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2,
                                                "weight_decay": 0.1}, 10)
    assert any("optim.lr changed" in c for c in changes) and any("train.max_steps" in c for c in changes)
    want = 5e-4 * WarmupCosine(2, 40, 0.1)(6)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(want)
    assert optimizer.param_groups[0]["weight_decay"] == 0.2 and optimizer.param_groups[1]["weight_decay"] == 0.0
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * WarmupCosine(2, 40, 0.1)(7))


# ------------------------------------------------------------------------------------------------ no pickles
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_trainer_never_runs_code_from_a_checkpoint_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "payload": _Payload(marker)}, path)
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)  # what DeepSpeed's loader asks for: forced to the restricted one
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ signals
def test_first_ctrl_c_asks_for_a_checkpoint_the_second_stops_at_once():
    flag = StopFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested and flag.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.restore()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_synthwiki(tmp_path_factory.mktemp("synthwiki"))


def _train(data_dir: Path, run_dir: Path, *overrides: str, wait=True, **popen):
    cmd = [sys.executable, "-m", "nulls_dist.cli.train", "experiment=demo", f"data.output_dir={data_dir}",
           "data_loader.prepare_if_missing=false", f"train.run_dir={run_dir}", "logging.wandb_mode=disabled",
           "eval.num_batches=0", "optim.warmup_steps=1", *overrides]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
    return subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=600)


def test_ctrl_c_checkpoints_and_exits_resumable(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = _train(data_dir, run_dir, "train.max_steps=100000", "checkpoint.every_n_steps=100000", wait=False)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    tag = layout.read_latest(run_dir / "checkpoints")
    assert tag is not None and layout.incomplete_reason(run_dir / "checkpoints" / tag) is None


def test_rerunning_a_run_dir_with_resume_never_is_refused_and_start_over_keeps_the_old(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    first = _train(data_dir, run_dir, "train.max_steps=2", "checkpoint.every_n_steps=2")
    assert first.returncode == 0
    output = first.stdout + first.stderr
    assert "gcc " not in output and "built successfully" not in output  # no DeepSpeed op is compiled at start
    assert "Setting accelerator" not in output
    refused = _train(data_dir, run_dir, "train.max_steps=2", "checkpoint.resume=never")
    assert refused.returncode == 2 and "start_over" in refused.stderr and "Traceback" not in refused.stderr
    assert layout.read_latest(run_dir / "checkpoints") == "step_00000002"  # untouched
    again = _train(data_dir, run_dir, "train.max_steps=2", "checkpoint.start_over=true")
    assert again.returncode == 0, again.stderr[-3000:]
    moved = [p for p in run_dir.iterdir() if p.name.startswith("checkpoints.old-")]
    assert len(moved) == 1 and (moved[0] / "step_00000002" / "model.safetensors").is_file()


def test_a_crafted_pickle_in_a_checkpoint_is_refused_on_resume(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert _train(data_dir, run_dir, "train.max_steps=2", "checkpoint.every_n_steps=2").returncode == 0
    tag = run_dir / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    states = tag / "mp_rank_00_model_states.pt"
    with weights_only_loads():
        # our own restricted loader reads our file; the crafted one adds a payload and keeps the size bookkeeping
        state = torch.load(states, map_location="cpu")
    state["payload"] = _Payload(marker)
    torch.save(state, states)
    meta = json.loads((tag / layout.META_NAME).read_text())
    meta["files"]["mp_rank_00_model_states.pt"] = states.stat().st_size
    (tag / layout.META_NAME).write_text(json.dumps(meta))
    proc = _train(data_dir, run_dir, "train.max_steps=4")
    assert proc.returncode == 2 and not marker.exists(), proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nulls-train: error:")]
    assert len(errors) == 1 and "refused without running it" in errors[0] and "Traceback" not in proc.stderr
