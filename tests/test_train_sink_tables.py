"""Training with sharded sink tables (`sink_tables.mode=sharded`), end to end: whole `nulls-train` runs (the real
entry point, DeepSpeed ZeRO-1 over gloo, TorchRec row-wise sharded tables, the bundled SynthWiki data) of the demo
model with a 2**16-row uniform pool, k = 16, and every downstream tool on the result.

- resume: 2 ranks from a checkpoint continue bit for bit as the uninterrupted run; 2 -> 1 -> 2 ranks continue
  within fp32 reordering (rel 2e-5, as tests/test_train_steps.py: DeepSpeed's universal checkpoint for the
  dense weights, DCP resharding for the tables);
- the step's gradient scale: with SGD tables (scale-sensitive, unlike row-wise Adagrad) one batch trained as
  1 rank x 1 micro-batch, 1 rank x 4 and 2 ranks x 2 moves the rows the same (a wrong 1/W or 1/G moves them by
  2-4x);
- checkpoints: every tag (periodic, final, signal) holds `sink_tables/` and a `model.safetensors` that is the
  whole model (sink rows under their parameter names); a dense checkpoint is not resumed with sharded tables;
- the tools: nulls-manifest (digests through row reads equal those of the in-memory weights), nulls-unlearn
  mask and hard (hard zeroes the rows in the weights AND the rows and their Adagrad state in the sharded
  checkpoint, read back through DCP), verify, nulls-generate (reads only the source's rows) and nulls-eval.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from train_helpers import nulls_train_command, prepare_synthwiki, train_env, trained_sources
from train_helpers import nulls_train as run_nulls_train

from nulls_dist.formats import checkpoint as layout

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parent.parent
ROWS, K = 2**16, 16
BASE = ["experiment=demo", "logging.wandb_mode=disabled", "logging.log_every=1", "optim.warmup_steps=1",
        "train.cpu_threads=1", "data_loader.prepare_if_missing=false", "deepspeed.zero_stage=1",
        "data_loader.num_streams=4", "deepspeed.global_batch=8", "deepspeed.micro_batch=2",
        "sink_tables.mode=sharded", "+model.overrides.sink_strategy=uniform",
        f"+model.overrides.sink_pool_size={ROWS}", f"+model.overrides.sink_k={K}"]
RTOL = 2e-5  # another world size reorders fp32 sums (tests/test_train_steps.py measured the dense part)


def nulls_train(data_dir: Path, run_dir: Path, ranks: int, *overrides: str, wait: bool = True):
    """A sharded-table `nulls-train` run (BASE); `wait=False` returns the running process."""
    if wait:
        return run_nulls_train(data_dir, run_dir, ranks, *overrides, check=False, base=tuple(BASE))
    return subprocess.Popen(nulls_train_command(data_dir, run_dir, ranks, overrides, BASE), cwd=REPO, env=train_env(),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(run_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def tag(run_dir: Path, step: int) -> Path:
    return layout.checkpoints_dir(run_dir) / layout.tag_for(step)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_synthwiki(tmp_path_factory.mktemp("synthwiki"))


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> Path:
    """2 ranks, 6 steps, a checkpoint every 2 and an evaluation every 2 (lookups without updates)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    ok(nulls_train(data_dir, run_dir, 2, "train.max_steps=6", "checkpoint.every_n_steps=2", "eval.every_n_steps=2",
                   "eval.num_batches=1"))
    return run_dir


# ------------------------------------------------------------------------------------------------ checkpoints
def test_every_tag_holds_the_tables_and_the_whole_model(straight):
    from nulls_dist.formats.weights import WeightsFile

    assert layout.read_latest(layout.checkpoints_dir(straight)) == "step_00000006"
    for step in (2, 4, 6):
        tag_dir = tag(straight, step)
        assert layout.incomplete_reason(tag_dir) is None
        meta = layout.read_meta(tag_dir)
        assert meta["sink_tables"] == {"mode": "sharded", "layout": "per_layer", "num_layers": 2, "rows": ROWS,
                                       "dim": 64, "optimizer": "rowwise_adagrad"}
        tables = layout.read_sink_tables_meta(layout.sink_tables_dir(tag_dir))
        assert tables["world_size"] == 2 and {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(tables["files"])
        assert f"{layout.SINK_TABLES_DIR}/{layout.SINK_TABLES_META_NAME}" in meta["files"]
        weights = WeightsFile(tag_dir / layout.WEIGHTS_NAME)
        for layer in range(2):
            for part in layout.SINK_PARTS:
                assert weights.shape(layout.sink_table_key(layer, part)) == (ROWS, 64)
        assert "transformer.wte.weight" in weights and "lm_head.weight" in weights
    history = metrics(straight)
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(history[s]["train/loss"]) and history[s]["train/sink_lr"] > 0 for s in history)
    assert history[6]["train/loss"] < history[1]["train/loss"]
    assert "eval/trained_sink_on_loss" in history[2] and "eval/heldout_sink_off_loss" in history[6]


def test_resume_on_the_same_world_size_is_exact(data_dir, straight, tmp_path):
    resumed = tmp_path / "resumed"
    ok(nulls_train(data_dir, resumed, 2, "train.max_steps=6", "checkpoint.every_n_steps=2", "eval.every_n_steps=2",
                   "eval.num_batches=1", f"checkpoint.resume={tag(straight, 2)}"))
    a, b = metrics(straight), metrics(resumed)
    assert sorted(b) == [3, 4, 5, 6]
    keys = ("train/loss", "train/grad_norm", "train/lr", "train/sink_lr", "eval/trained_sink_on_loss",
            "eval/heldout_sink_off_loss")
    assert [{k: b[s].get(k) for k in keys} for s in b] == [{k: a[s].get(k) for k in keys} for s in b]
    final = lambda run: (tag(run, 6) / layout.WEIGHTS_NAME).read_bytes()  # noqa: E731
    assert final(resumed) == final(straight)  # every weight and every sink row, bit for bit


def test_resume_on_one_rank_and_back_on_two(data_dir, straight, tmp_path):
    run_dir = tmp_path / "resharded"
    common = ("train.max_steps=6", "checkpoint.every_n_steps=2", "eval.num_batches=0")
    one = ok(nulls_train(data_dir, run_dir, 1, *common, "train.stop_at_step=4", f"checkpoint.resume={tag(straight, 2)}"))
    assert "(world size 2 -> 1)" in one.stdout + one.stderr
    assert layout.read_sink_tables_meta(layout.sink_tables_dir(tag(run_dir, 4)))["world_size"] == 1
    two = ok(nulls_train(data_dir, run_dir, 2, *common))
    assert "(world size 1 -> 2)" in two.stdout + two.stderr
    a, b = metrics(straight), metrics(run_dir)
    assert sorted(b) == [3, 4, 5, 6]
    for step in b:
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=RTOL), (step, a[step], b[step])
    refused = nulls_train(data_dir, run_dir, 1, *common, "train.max_steps=8", "sink_tables.mode=dense")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "sink_tables: checkpoint {" in refused.stderr and "!= run None" in refused.stderr


def test_sgd_tables_see_the_dense_gradient_scale_at_any_split_of_the_step(data_dir, tmp_path):
    from nulls_dist.formats.weights import load_weights
    from nulls_dist.train.sink_tables import SinkTablesConfig, init_rows

    common = ("train.max_steps=1", "checkpoint.every_n_steps=1", "eval.num_batches=0", "sink_tables.optimizer=sgd",
              "sink_tables.lr=1.0")
    splits = {"1x1": (1, "deepspeed.micro_batch=8"), "1x4": (1, "deepspeed.micro_batch=2"),
              "2x2": (2, "deepspeed.micro_batch=2")}
    for name, (ranks, micro) in splits.items():
        ok(nulls_train(data_dir, tmp_path / name, ranks, *common, micro))
    cfg = SinkTablesConfig(num_layers=2, rows=ROWS, dim=64, seed=0)
    moved = {}
    for name in splits:
        weights = load_weights(tag(tmp_path / name, 1) / layout.WEIGHTS_NAME)
        moved[name] = torch.cat([weights[layout.sink_table_key(layer, "gate")] - init_rows(cfg, layer, 0, ROWS)[:, :64]
                                 for layer in range(2)])
    scale = moved["1x1"].abs().max()
    assert scale > 1e-4  # the step moved the rows
    for name in ("1x4", "2x2"):
        assert (moved[name] - moved["1x1"]).abs().max() < 1e-3 * scale, name  # a wrong 1/W or 1/G: 50-75% off


def test_a_signal_checkpoints_the_tables_and_exits_resumable(data_dir, tmp_path):
    run_dir = tmp_path / "signalled"
    proc = nulls_train(data_dir, run_dir, 1, "train.max_steps=100000", "checkpoint.every_n_steps=100000",
                       "eval.num_batches=0", wait=False)
    history = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (history.exists() and history.read_text().count("\n") >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-3000:]
    latest = layout.read_latest(layout.checkpoints_dir(run_dir))
    tag_dir = layout.checkpoints_dir(run_dir) / latest
    assert layout.incomplete_reason(tag_dir) is None
    assert layout.read_sink_tables_meta(layout.sink_tables_dir(tag_dir))["world_size"] == 1


# ------------------------------------------------------------------------------------------------ the tools
@pytest.fixture(scope="module")
def tools(data_dir, straight, tmp_path_factory):
    """The straight run's manifest, a mask request and a hard request (two sources the run trained on) with their
    certificates."""
    from nulls_dist.cli.manifest import run as manifest_run
    from nulls_dist.cli.unlearn import main as unlearn_main

    out = tmp_path_factory.mktemp("tools")
    raw = {"checkpoint": str(straight), "tag": None, "out": str(out / "manifest"), "data_manifest": None,
           "registry": None, "exclude_sources": None, "shard_rows": 100, "chunk_rows": 64, "overlap": "exact",
           "overlap_sample": 64, "exact_budget": 10**8, "seed": 0, "workers": 1}
    manifest_run(raw)
    common = ["--checkpoint", str(straight), "--manifest", str(out / "manifest")]
    trained = trained_sources(data_dir, 6)
    unlearn_main([*common, "--method", "mask", "--forget-set", str(out / "mask.json"), "--certificate",
                  str(out / "mask_cert.json"), str(trained[0])])
    unlearn_main([*common, "--method", "hard", "--forget-set", str(out / "hard.json"), "--certificate",
                  str(out / "hard_cert.json"), "--output", str(out / "hard"), *map(str, trained[1:3])])
    return out


def test_manifest_digests_through_row_reads_equal_the_in_memory_weights(straight, tools, tmp_path):
    from nulls_dist.audit.manifest import ManifestOptions, build_manifest, read_index, read_records
    from nulls_dist.deploy.checkpoint_io import load_checkpoint
    from nulls_dist.formats.weights import load_weights, state_dict_digest

    ckpt = load_checkpoint(straight)
    assert ckpt.lazy
    state = load_weights(ckpt.path / layout.WEIGHTS_NAME)  # the same file, whole, in memory
    index = read_index(tools / "manifest")
    assert index["checkpoint_sha256"] == state_dict_digest(state) == state_dict_digest(ckpt.state_dict)
    registry = Path(layout.read_meta(ckpt.path)["data_manifest_path"]).parent / "registry.parquet"
    build_manifest(tmp_path / "dense", state_dict=state, model_cfg=ckpt.model_config, registry_path=registry,
                   checkpoint_sha256=index["checkpoint_sha256"], opts=ManifestOptions(shard_rows=100, chunk_rows=64))
    ids = list(range(49152, 49152 + 240))
    lazy = read_records(tools / "manifest", ids, ["sink_digest", "sinks"]).to_pylist()
    dense = read_records(tmp_path / "dense", ids, ["sink_digest", "sinks"]).to_pylist()
    assert lazy == dense and len(lazy) == 240 and all(len(r["sinks"]) == K for r in lazy)


def test_mask_and_hard_unlearning_verify(straight, tools):
    from nulls_dist.audit.verify import verify_paths
    from nulls_dist.deploy.checkpoint_io import load_checkpoint

    mask = verify_paths(tools / "mask_cert.json", load_checkpoint(straight), tools / "mask.json", tools / "manifest")
    hard = verify_paths(tools / "hard_cert.json", load_checkpoint(tools / "hard"), tools / "hard.json",
                        tools / "manifest")
    for report in (mask, hard):
        assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    assert "certified_sink_digest" in {c["check"] for c in mask["checks"]}
    assert "forgotten_rows_zero" in {c["check"] for c in hard["checks"]}


def test_hard_zeroes_the_rows_and_their_optimizer_state_in_the_sharded_checkpoint(straight, tools):
    import torch.distributed.checkpoint as dcp

    from nulls_dist.formats.weights import load_weights

    cert = json.loads((tools / "hard_cert.json").read_text())
    forgotten = torch.tensor(cert["forgotten_rows"])  # one list: the uniform assignment is not layer-specific
    assert forgotten.numel() == 2 * K or 0 < forgotten.numel() < 2 * K  # two sources' rows (may overlap)
    source_tag = tag(straight, 6)
    before, after = load_weights(source_tag / layout.WEIGHTS_NAME), load_weights(tools / "hard" / layout.WEIGHTS_NAME)
    kept = torch.ones(ROWS, dtype=torch.bool)
    kept[forgotten] = False
    for key in before:
        if ".sink_" in key:
            assert torch.all(after[key][forgotten] == 0) and torch.equal(after[key][kept], before[key][kept]), key
        else:
            assert torch.equal(after[key], before[key]), key

    def tables(directory: Path) -> dict[str, torch.Tensor]:
        state = {}
        for layer in range(2):
            table = layout.sink_table_name("per_layer", layer)
            state[layout.SINK_TABLES_WEIGHT_KEY.format(table=table)] = torch.empty(ROWS, 3 * 64)
            state[layout.SINK_TABLES_STATE_PREFIX.format(table=table) + f"{table}.momentum1"] = torch.empty(ROWS)
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)  # DCP itself reads the edited chunks back
        return state

    old, new = tables(layout.sink_tables_dir(source_tag)), tables(layout.sink_tables_dir(tools / "hard"))
    for key in old:
        assert torch.all(new[key][forgotten] == 0) and torch.equal(new[key][kept], old[key][kept]), key
        if key.endswith("momentum1"):
            assert torch.all(old[key][forgotten] > 0)  # they were trained: there was state to erase
    assert layout.incomplete_reason(source_tag) is None  # the input checkpoint is untouched


def test_generation_reads_only_the_source_rows_and_the_cli_runs(straight, tools, capsys):
    from nulls_dist.cli.generate import main as generate_main
    from nulls_dist.deploy.checkpoint_io import build_model, load_checkpoint
    from nulls_dist.deploy.generate import SamplingConfig, generate
    from nulls_dist.model import SinkMode

    ckpt = load_checkpoint(straight)
    model = build_model(ckpt)
    out = generate(model, torch.tensor([1, 5, 7]), SinkMode.sink_on(49155), SamplingConfig(max_new_tokens=6))
    assert out.tokens.shape == (1, 9) and ckpt.state_dict.rows_read == 3 * 2 * K  # of 2 x 3 x 2**16 rows
    generate_main(["--checkpoint", str(straight), "--manifest", str(tools / "manifest"), "--prompt", "The",
                   "--mode", "sink_on", "--source", "49155", "--max-new-tokens", "4"])
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "sink_on" and len(result["tokens"]) == 4


def test_evaluation_runs_on_the_lazy_checkpoints(straight, tools, data_dir, tmp_path):
    from nulls_dist.cli.eval import main as eval_main

    probes = REPO / "data_pipeline" / "bundled" / "synthwiki" / "probes.jsonl"
    eval_main(["--checkpoint", str(straight), "--manifest", str(tools / "manifest"), "--forget-set",
               str(tools / "hard.json"), "--hard", str(tools / "hard"), "--data", str(data_dir), "--probes",
               str(probes), "--out", str(tmp_path / "eval"), "--embedder", "model", "--steps", "2",
               "--relearn-steps", "2", "--max-retained", "4", "--max-holdout", "4", "--threads", "1"])
    report = json.loads(next((tmp_path / "eval").glob("*.json")).read_text())
    deployments = report["deployments"]
    assert {"original", "unlearned", "hard", "ga", "npo"} <= set(deployments)
    assert all(np.isfinite(d["loss"]["retained"]) for d in deployments.values())
