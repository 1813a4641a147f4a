"""Multi-process DeepSpeed training over gloo, on the real model, data pipeline, loader and configs: one
torchrun launch of tests/train_dist_worker.py (2 ranks) checks exact resume at ZeRO 2 and 1, resume mismatch
errors, ZeRO 0 and 3 runs and checkpoint consolidation; each rank leaves a success marker."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import TINY, compose_raw, prepare_synthwiki

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    from nulls_dist.train.distributed import free_port

    data_dir = prepare_synthwiki(tmp_path_factory.mktemp("synthwiki"))
    out = tmp_path_factory.mktemp("dist")
    base = compose_raw(TINY + [f"data.output_dir={data_dir}", "data_loader.prepare_if_missing=false"])
    (out / "base.json").write_text(json.dumps(base))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "tests" / "train_dist_worker.py"), str(out / "base.json"),
           str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    markers = {r: out / f"rank{r}.json" for r in (0, 1)}
    results = {r: json.loads(p.read_text()) for r, p in markers.items() if p.is_file()}
    assert proc.returncode == 0 and len(results) == 2, (
        f"torchrun exited {proc.returncode}; markers {sorted(results)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return results


@pytest.mark.distributed
def test_every_rank_finished(worker_results):
    for rank, result in worker_results.items():
        assert result["ok"] is True and result["world_size"] == 2, result.get("error")


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 1])
def test_resume_is_bit_identical(worker_results, stage):
    result = worker_results[0][f"zero{stage}"]
    assert result["steps_straight"] == result["steps_resumed"] == [1, 2, 3, 4, 5, 6]
    assert result["losses_straight"] == result["losses_resumed"]  # exact float equality, every step
    assert result["identical"]  # grad norms, learning rates and evaluation losses too
    losses = result["losses_straight"]
    assert losses[-1] < losses[0]


@pytest.mark.distributed
def test_resume_mismatches_say_what_differs(worker_results):
    result = worker_results[0]
    assert "model.n_layer: checkpoint 2 != run 3" in result["mismatch_model"]
    assert "sinks.strategy: checkpoint 'reference' != run 'uniform'" in result["mismatch_sinks"]
    assert "data_manifest_sha256" in result["mismatch_data"] and "0000000000" in result["mismatch_data"]


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 3])
def test_other_zero_stages_train_and_checkpoint(worker_results, stage):
    result = worker_results[0][f"zero{stage}_short"]
    assert result["code"] == 0 and result["latest"] == "step_00000002"
    assert len(result["losses"]) == 2 and all(0 < loss < 20 for loss in result["losses"])


@pytest.mark.distributed
def test_zero_checkpoint_consolidates_to_model_keys(worker_results):
    result = worker_results[0]["consolidated"]
    assert result["safetensors_equal"]  # model.safetensors == DeepSpeed's own fp32 consolidation
    assert result["missing"] == [] and result["unexpected"] == []
    assert result["num_tensors"] > 0 and result["finite"] and result["step"] == 6


@pytest.mark.distributed
def test_collectives_of_a_step_are_on_the_device_and_counted(worker_results):
    """One count all-reduce per step from our code, one metrics collective per LOG step (steps 2 and 4) and none
    on the others; every collective's tensors on the training device (CPU here; CUDA on a GPU run, where a CPU
    tensor in an NCCL-only group would crash)."""
    result = worker_results[0]["collectives"]
    assert result["code"] == 0
    records = result["records"]
    assert records and all(r["devices"] in ([], ["cpu"]) for r in records), records
    for step in (1, 2, 3, 4):
        ours = [r for r in records if r["by"] == "ours" and r["phase"] == "step" and r["step"] == step]
        assert [r["op"] for r in ours] == ["all_reduce"], (step, ours)  # the step's global target count
        deepspeed = [r for r in records if r["by"] == "deepspeed" and r["phase"] == "step" and r["step"] == step]
        assert deepspeed  # gradient reduction, ZeRO-1 partition gathers
        logged = [r for r in records if r["phase"] == "log" and r["step"] == step]
        assert [r["op"] for r in logged] == (["all_gather_into_tensor"] if step in (2, 4) else []), (step, logged)


@pytest.mark.distributed
def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoint(worker_results):
    result = worker_results[0]["diverged"]
    assert result["error"] is not None and "diverged" in result["error"], result
    assert "2 consecutive steps" in result["error"] and "step_00000002" in result["error"]
    assert result["tags"] == ["step_00000002"] and result["latest"] == "step_00000002"  # nothing of steps 3+
    assert result["steps"] == [1, 2, 3]  # stopped at step 4's check, before anything was logged or saved


@pytest.mark.distributed
def test_one_bad_step_is_skipped_and_the_run_goes_on(worker_results):
    result = worker_results[0]["transient"]
    assert result["error"] is None, result
    assert result["tags"] == ["step_00000006"] and result["steps"] == [1, 2, 3, 4, 5, 6]
