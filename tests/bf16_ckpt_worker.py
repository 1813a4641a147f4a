"""bf16 DeepSpeed checkpoints on the CPU, for tests/test_purge.py: the trainer uses bf16 only on GPUs, whose
files differ from the fp32 ones (bf16 module weights; ZeRO-0: DeepSpeed's bf16 optimizer wrapper with
`fp32_groups`; ZeRO-1: `bf16_zero_pp_rank_*` files). One gloo process builds the debug NULL with the trainer's
parameter groups in a bf16 engine per stage.

    python tests/bf16_ckpt_worker.py save OUT      # train 2 steps at ZeRO 0 and 1, save OUT/zero<s>/checkpoints/<tag>
    python tests/bf16_ckpt_worker.py load OUT ROWS # load each back into a fresh engine and report, from the
                                                   # engine's own objects, non-zero elements in the ROWS (JSON)
"""
import json
import sys
from pathlib import Path

import torch

from nulls_dist.config import NullConfig
from nulls_dist.train.distributed import DistEnv, resolve_device, setup_distributed, teardown_distributed

TAG = "step_00000002"


def engine_for(stage: int):
    import deepspeed

    from nulls_dist.model import NullTransformer
    from nulls_dist.train.trainer import param_groups

    torch.manual_seed(0)
    model = NullTransformer(NullConfig.from_preset("debug"))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=config)
    return engine


def step(engine, seed: int) -> None:
    cfg = engine.module.cfg
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=g)
    sources = torch.tensor([[4096 + seed] * 17, [4100 + seed] * 17])
    logits = engine(tokens[:, :-1], sources[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    engine.backward(loss)
    engine.step()


def save(out: Path) -> dict:
    import dataclasses

    from nulls_dist.train.checkpoint import Checkpointer

    result = {}
    for stage in (0, 1):
        engine = engine_for(stage)
        for seed in range(2):
            step(engine, seed)
        cfg = NullConfig.from_preset("debug")
        meta = {"model": dataclasses.asdict(cfg), "sinks": engine.module.sink_assignment.describe(),
                "data_manifest_sha256": "0" * 64, "tokens_seen": 0, "zero_stage": stage}
        tag = Checkpointer(out / f"zero{stage}", keep_last_k=2, rank=0, world_size=1).save(engine, 2, meta,
                                                                                          {"rng": {}})
        result[stage] = sorted(p.name for p in tag.iterdir())
    return result


def _nonzero(tensor: torch.Tensor, rows: list[int]) -> int:
    return int(torch.count_nonzero(tensor.detach().float().reshape(tensor.shape[0], -1)[rows])) if rows else 0


def _engine_view(engine, param):
    """(fp32 master, exp_avg, exp_avg_sq) of a module parameter, as the loaded engine holds them."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1-2: links states on the first step
        optimizer._lazy_init_hp_params_optimizer_state()
        return (safe_get_full_fp32_param(param), safe_get_full_optimizer_state(param, "exp_avg"),
                safe_get_full_optimizer_state(param, "exp_avg_sq"))
    for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups):  # ZeRO 0: the unfused bf16 wrapper
        for lp, hp in zip(low, high):
            if lp is param:
                state = optimizer.optimizer.state[hp]
                return hp, state["exp_avg"], state["exp_avg_sq"]
    raise AssertionError("parameter not found in the optimizer")


def load(out: Path, rows: dict[str, list[int]]) -> dict:
    from nulls_dist.train.checkpoint import weights_only_loads

    result = {}
    for stage in (0, 1):
        engine = engine_for(stage)
        with weights_only_loads():
            path, _ = engine.load_checkpoint(str(out / f"zero{stage}" / "checkpoints"), tag=TAG)
        assert path is not None
        found = {}
        for name, param in engine.module.named_parameters():
            if name in rows:  # the engine's own view: module weight, fp32 master, both Adam moments
                master, exp_avg, exp_avg_sq = _engine_view(engine, param)
                pieces = {"module": param, "master": master, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
                for role, tensor in pieces.items():
                    found[f"{role}/{name}"] = None if tensor is None else _nonzero(tensor, rows[name])
        step(engine, 7)  # a step after loading: the zero rows stay zero (no gradient reaches them)
        found["after_a_step"] = sum(_nonzero(p, rows[n]) for n, p in engine.module.named_parameters() if n in rows)
        result[stage] = found
    return result


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    setup_distributed(DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                              master_port=int(sys.argv[-1]), launcher="single"), resolve_device("cpu"))
    try:
        result = save(out) if mode == "save" else load(out, json.loads(sys.argv[3]))
    finally:
        teardown_distributed()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
