"""Unit tests of the trainer's pieces that need no process group: typed config and its errors, the generated
DeepSpeed config, the lr schedule, launcher environment parsing, checkpoint compatibility, the loss mask,
sink statistics and the device peak table."""
import json
import math

import pytest
import torch

from nulls_dist.config import NullConfig
from nulls_dist.sinks import SinkAssignment
from nulls_dist.train import callbacks as cb
from nulls_dist.formats import checkpoint as layout
from nulls_dist.formats.atomic import write_bytes as write_atomic
from nulls_dist.train.checkpoint import check_compatible, find_resume_point
from nulls_dist.train.config import train_config_from_dict
from nulls_dist.launch.rendezvous import slurm_rendezvous
from nulls_dist.train.distributed import dist_env_from_environ
from nulls_dist.train.ds_config import WarmupCosine, build_ds_config
from nulls_dist.train.trainer import param_groups

BASE = {
    "train": {"max_steps": 10, "seed": 0, "run_dir": "runs/x", "device": "cpu", "sink_path": "gathered",
              "exclude_sources": []},
    "model": {"preset": "debug", "overrides": {}},
    "data": {"name": "synthwiki"},
    "data_loader": {"num_workers": 0, "prepare_if_missing": True},
    "optim": {"lr": 1e-3, "min_lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
              "warmup_steps": 2},
    "deepspeed": {"zero_stage": 2, "micro_batch": 4, "grad_accum": 3, "clip": 1.0,
                  "activation_checkpointing": False, "offload": "no"},
    "logging": {"wandb_mode": "disabled", "project": "p", "entity": None, "log_every": 1, "jsonl": True},
    "checkpoint": {"every_n_steps": 5, "keep_last_k": 2, "resume": "auto"},
    "eval": {"every_n_steps": 5, "num_batches": 1},
}


def with_change(section, key, value):
    raw = json.loads(json.dumps(BASE))
    raw[section][key] = value
    return raw


def test_valid_config_round_trips():
    cfg = train_config_from_dict(BASE)
    assert cfg.deepspeed.zero_stage == 2 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.data.pipeline == {"name": "synthwiki"} and cfg.data.exclude_sources == []


@pytest.mark.parametrize("section,key,value,field", [
    ("deepspeed", "zero_stage", 4, "deepspeed.zero_stage"),
    ("deepspeed", "micro_batch", 0, "deepspeed.micro_batch"),
    ("deepspeed", "offload", "cpu", "deepspeed.offload"),
    ("optim", "lr", -1.0, "optim.lr"),
    ("optim", "min_lr", 1.0, "optim.min_lr"),
    ("optim", "warmup_steps", 11, "optim.warmup_steps"),
    ("logging", "wandb_mode", "sometimes", "logging.wandb_mode"),
    ("checkpoint", "keep_last_k", 0, "checkpoint.keep_last_k"),
    ("train", "device", "tpu", "train.device"),
    ("train", "sink_path", "dense", "train.sink_path"),
    ("train", "max_steps", 0, "train.max_steps"),
    ("train", "bogus", 1, "train.bogus"),
    ("optim", "momentum", 0.9, "optim.momentum"),
])
def test_bad_config_names_the_field(section, key, value, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        train_config_from_dict(with_change(section, key, value))


def test_unknown_top_level_key():
    with pytest.raises(ValueError, match="optimizer"):
        train_config_from_dict({**BASE, "optimizer": {}})


def test_ds_config_has_no_auto_and_matches_the_typed_config():
    cfg = train_config_from_dict(BASE)
    ds = build_ds_config(cfg, world_size=2, on_gpu=False)
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == 4 * 3 * 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert build_ds_config(cfg, world_size=1, on_gpu=True)["bf16"]["enabled"] is True


def test_warmup_cosine_schedule():
    sched = WarmupCosine(warmup_steps=4, max_steps=14, min_ratio=0.1)
    assert [sched(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert sched(4) == pytest.approx(1.0)
    assert sched(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert sched(14) == pytest.approx(0.1) and sched(100) == pytest.approx(0.1)


def test_dist_env_torchrun_and_single():
    env = dist_env_from_environ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0",
                                 "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == \
        (3, 8, 1, "h0", 1234, "torchrun")
    single = dist_env_from_environ({})
    assert (single.rank, single.world_size, single.launcher) == (0, 1, "single") and single.master_port > 0
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        dist_env_from_environ({"RANK": "0", "WORLD_SIZE": "two"})


def test_dist_env_slurm_is_the_launch_rendezvous():
    """`srun nulls-train` (no launch.task): the SLURM mapping is nulls_dist.launch.rendezvous's, the one the
    launcher uses; checked on an uneven job (8, 8, 4 tasks) and on its requeue onto 2 nodes (same job id)."""
    uneven = {"SLURM_PROCID": "17", "SLURM_NTASKS": "20", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
              "SLURM_TASKS_PER_NODE": "8(x2),4", "SLURM_JOB_NODELIST": "gpu[07-08],cpu3", "SLURM_JOB_ID": "123456"}
    requeued = {**uneven, "SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_NODEID": "1",
                "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "gpu[11-12]", "SLURM_RESTART_COUNT": "1"}
    for environ in (uneven, requeued):
        env, rdv = dist_env_from_environ(environ), slurm_rendezvous(environ)
        assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
            rdv.rank, rdv.world_size, rdv.local_rank, rdv.master_addr, rdv.master_port, "slurm")
    assert [(e.rank, e.world_size, e.master_addr, e.master_port) for e in map(dist_env_from_environ,
            (uneven, requeued))] == [(17, 20, "gpu07", 23456), (9, 16, "gpu11", 23456)]
    assert dist_env_from_environ({**uneven, "MASTER_PORT": "29400"}).master_port == 29400  # the batch script's
    with pytest.raises(ValueError, match="SLURM_LOCALID"):
        dist_env_from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "x"})


def test_check_compatible_lists_every_difference():
    model = NullConfig.from_preset("debug").to_dict()
    sinks = SinkAssignment(NullConfig.from_preset("debug").sink_assignment_config()).describe()
    saved = {"model": model, "sinks": sinks, "data_manifest_sha256": "aa", "exclude_sources": [],
             "world_size": 2}
    check_compatible(saved, {**saved, "model": {**model, "sink_path": "masked"}}, where="ck")  # path may change
    other_model = {**model, "n_embd": 128}
    other_sinks = SinkAssignment(NullConfig.from_preset("debug", sink_strategy="uniform").sink_assignment_config())
    with pytest.raises(RuntimeError) as err:
        check_compatible(saved, {**saved, "model": other_model, "sinks": other_sinks.describe(),
                                 "data_manifest_sha256": "bb"}, where="ck")
    msg = str(err.value)
    assert "model.n_embd: checkpoint 64 != run 128" in msg and "sinks.strategy" in msg
    assert "data_manifest_sha256: checkpoint 'aa' != run 'bb'" in msg


def test_find_resume_point_and_atomic_write(tmp_path):
    assert find_resume_point("auto", tmp_path) is None and find_resume_point("never", tmp_path) is None
    ck = tmp_path / "checkpoints"
    (ck / "step_00000004").mkdir(parents=True)
    (ck / "step_00000004" / "model.safetensors").write_bytes(b"w")
    layout.write_meta(ck / "step_00000004", {})
    write_atomic(ck / "latest", b"step_00000004\n")
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]  # no temporary left behind
    point = find_resume_point("auto", tmp_path)
    assert point.tag == "step_00000004" and point.load_dir == ck
    assert find_resume_point(str(ck / "step_00000004"), "elsewhere") == point
    assert find_resume_point(str(tmp_path), "elsewhere") == point
    with pytest.raises(ValueError, match="checkpoint.resume"):
        find_resume_point(str(tmp_path / "nothing"), tmp_path)


def test_loss_is_the_sum_over_counted_labels_and_never_holds_all_logits():
    """The model's labelled forward returns the SUM of cross-entropy over labels != -100, computed in chunks
    (the loader puts -100 on padding and on targets of another source than their input token)."""
    from nulls_dist.model import IGNORE_INDEX, NullTransformer, chunked_cross_entropy

    torch.manual_seed(0)
    cfg = NullConfig.from_preset("debug")
    model = NullTransformer(cfg)
    model.loss_chunk_tokens = 5  # several chunks, one of them short
    input_ids = torch.randint(0, cfg.vocab_size, (2, 7))
    source_ids = torch.tensor([[4096] * 3 + [4097] * 4, [4098] * 7])
    labels = torch.randint(0, cfg.vocab_size, (2, 7))
    labels[0, 2] = labels[1, 5:] = IGNORE_INDEX
    total = model(input_ids, source_ids, labels=labels)
    logits = model(input_ids, source_ids)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    assert torch.allclose(total, want, atol=1e-4)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want.backward()
    for name, param in model.named_parameters():
        assert torch.allclose(grads[name], param.grad, atol=1e-5, rtol=1e-4), name
    hidden = torch.randn(11, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    y = torch.randint(0, 9, (11,))
    for chunk in (1, 3, 11, 64):
        assert torch.allclose(chunked_cross_entropy(hidden, weight, y, chunk),
                              torch.nn.functional.cross_entropy(hidden @ weight.T, y, reduction="sum"), atol=1e-5)


def test_sink_statistics_and_param_groups():
    from nulls_dist.model import NullTransformer

    model = NullTransformer(NullConfig.from_preset("debug"))
    source_ids = torch.tensor([[4096, 4096, 4097], [4098, 4098, 4098]])
    stats = cb.sink_statistics(model.sink_assignment, torch.unique(source_ids))
    rows = model.sink_assignment.rows(torch.tensor([4096, 4097, 4098]))
    sets = [set(r[r >= 0].tolist()) for r in rows]
    shared = len((sets[0] & sets[1]) | (sets[0] & sets[2]) | (sets[1] & sets[2]))
    assert stats["sinks/distinct_sources"] == 3
    assert stats["sinks/active_per_source"] == pytest.approx(sum(map(len, sets)) / 3)
    assert stats["sinks/shared_units"] == shared
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    sink_ids = {id(b.mlp.sink_gate) for b in model.transformer.h}
    assert sink_ids <= {id(p) for p in no_decay["params"]} and no_decay["weight_decay"] == 0.0


def test_no_mfu_without_a_known_peak():
    assert cb.device_peak_flops(torch.device("cpu")) is None


def test_real_conf_composes_into_typed_config():
    from hydra import compose, initialize_config_module

    from nulls_dist.train.config import train_config_from_omegaconf

    with initialize_config_module(config_module="nulls_dist.conf", version_base="1.3"):
        demo = compose(config_name="nulls_train", overrides=["experiment=demo"])
        zero3 = compose(config_name="nulls_train", overrides=["deepspeed=zero3", "model=paper_hp"])
    cfg = train_config_from_omegaconf(demo)
    assert cfg.max_steps == 300 and cfg.device == "cpu" and cfg.cpu_threads == 1 and cfg.model.overrides == {"vocab_size": 2048}
    assert cfg.data.pipeline["output_dir"] == "data/synthwiki" and cfg.checkpoint.resume == "auto"
    cfg = train_config_from_omegaconf(zero3)
    assert cfg.deepspeed.zero_stage == 3 and cfg.model.preset == "paper_hp" and cfg.logging.wandb_mode == "offline"


def test_activation_checkpointing_keeps_loss_gradients_and_keys():
    from nulls_dist.model import NullTransformer
    from nulls_dist.train.trainer import enable_activation_checkpointing

    cfg = NullConfig.from_preset("debug")
    torch.manual_seed(0)
    plain = NullTransformer(cfg)
    recompute = NullTransformer(cfg)
    recompute.load_state_dict(plain.state_dict())
    enable_activation_checkpointing(recompute)
    assert list(recompute.state_dict()) == list(plain.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    source_ids = torch.tensor([[4096] * 9 + [4100] * 8, [4101] * 17])
    losses = []
    for model in (plain, recompute):
        loss = model(tokens[:, :-1], source_ids[:, :-1], labels=tokens[:, 1:])
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), recompute.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), name


def test_deepspeed_launcher_local_rank_argument_is_dropped():
    from nulls_dist.cli.train import strip_launcher_args

    assert strip_launcher_args(["--local_rank=3", "deepspeed=zero2", "--local-rank", "1", "train.seed=2"]) == \
        ["deepspeed=zero2", "train.seed=2"]
