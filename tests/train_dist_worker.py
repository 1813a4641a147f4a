"""One torchrun launch (2 gloo ranks) that runs every multi-process trainer check, to pay DeepSpeed's start-up
once: exact resume at ZeRO 2 and 1 (2N straight == N, resume, N), resume mismatches (model shape, sink
assignment, data manifest), short ZeRO 0 and 3 runs, and consolidation of a ZeRO checkpoint into
NullTransformer keys. Each rank writes `rank<r>.json` (its results) as its success marker, then meets the other
at a barrier before `destroy_process_group`. Run by tests/test_train_distributed.py, not collected itself.

usage: python -m torch.distributed.run --nproc_per_node 2 tests/train_dist_worker.py BASE_CONFIG.json OUT_DIR
"""
import copy
import json
import shutil
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from nulls_dist.cli.train import prepare_data
from nulls_dist.train.config import train_config_from_dict
from nulls_dist.train.distributed import dist_env_from_environ, resolve_device, setup_distributed, teardown_distributed
from nulls_dist.train.trainer import train

N = 3  # steps before the interruption; the straight run does 2N


def config(base: dict, run_dir: Path, **changes) -> dict:
    raw = copy.deepcopy(base)
    raw["train"]["run_dir"] = str(run_dir)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return raw


def run(raw: dict, env, device) -> int:
    cfg = train_config_from_dict(raw)
    return train(cfg, raw, env, device, prepare_data(cfg.data, env.is_main))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def resume_equality(base: dict, out: Path, stage: int, env, device) -> dict:
    straight, resumed = out / f"zero{stage}_straight", out / f"zero{stage}_resumed"
    assert run(config(base, straight, deepspeed__zero_stage=stage, train__max_steps=2 * N), env, device) == 0
    assert run(config(base, resumed, deepspeed__zero_stage=stage, train__max_steps=2 * N, train__stop_at_step=N),
               env, device) == 0
    assert run(config(base, resumed, deepspeed__zero_stage=stage, train__max_steps=2 * N), env, device) == 0
    result = {}
    if env.is_main:
        a, b = read_metrics(straight), read_metrics(resumed)
        keys = ("step", "train/loss", "train/grad_norm", "train/lr", "eval/trained_sink_on_loss",
                "eval/heldout_backbone_only_loss")
        result = {
            "steps_straight": [m["step"] for m in a], "steps_resumed": [m["step"] for m in b],
            "losses_straight": [m["train/loss"] for m in a], "losses_resumed": [m["train/loss"] for m in b],
            "identical": [{k: m.get(k) for k in keys} for m in a] == [{k: m.get(k) for k in keys} for m in b],
        }
    return result


def mismatch(raw: dict, env, device) -> str:
    try:
        run(raw, env, device)
    except RuntimeError as err:
        return str(err)
    return "no error"


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "all_to_all_single", "all_gather_object", "broadcast_object_list", "barrier", "reduce",
               "gather", "scatter")


def collectives(base: dict, out: Path, env, device) -> dict:
    """Record every torch.distributed collective of a 4-step run (logging every 2nd step): which code issued
    it (ours or DeepSpeed's), during which phase (step k's forward/backward/optimizer, the log reduction, a
    checkpoint), and on which device its tensors live."""
    import traceback as tb

    from nulls_dist.train import trainer as trainer_mod

    records: list[dict] = []
    phase = {"name": "setup", "step": 0}
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def issuer() -> str:
        for frame in reversed(tb.extract_stack()[:-2]):
            path = frame.filename
            if "/deepspeed/comm/" in path or "/torch/distributed/" in path:
                continue
            if "nulls_dist" in path or "/deepspeed/" in path:
                return "ours" if "nulls_dist" in path else "deepspeed"
        return "other"

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            records.append({"op": name, "by": issuer(), "phase": phase["name"], "step": phase["step"],
                            "devices": sorted({str(t.device) for t in tensors})})
            return fn(*args, **kwargs)
        return recorded

    original_step, original_reduce = trainer_mod.Trainer._train_step, trainer_mod.Trainer._reduce_window
    original_save = trainer_mod.Trainer._save

    def train_step(self, batches):
        phase.update(name="step", step=self.step + 1)
        return original_step(self, batches)

    def reduce_window(self, stop):
        phase.update(name="log", step=self.step)
        return original_reduce(self, stop)

    def save(self, reduced):
        phase.update(name="save", step=self.step)
        return original_save(self, reduced)

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    trainer_mod.Trainer._train_step, trainer_mod.Trainer._reduce_window = train_step, reduce_window
    trainer_mod.Trainer._save = save
    try:
        code = run(config(base, out / "collectives", train__max_steps=4, logging__log_every=2,
                          checkpoint__every_n_steps=4, eval__num_batches=0), env, device)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        trainer_mod.Trainer._train_step, trainer_mod.Trainer._reduce_window = original_step, original_reduce
        trainer_mod.Trainer._save = original_save
    return {"code": code, "records": records}


def divergence(base: dict, out: Path, env, device, bad_calls) -> dict:
    """Train with the loss of some micro-batches replaced by NaN (`bad_calls(i)` for the i-th loss computed on
    this rank): what ran, what was saved, what the error said."""
    import nulls_dist.model as model_mod

    original = model_mod.chunked_cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        value = original(*args, **kwargs)
        calls["n"] += 1
        return value * float("nan") if bad_calls(calls["n"] - 1) else value

    model_mod.chunked_cross_entropy = poisoned
    run_dir = out / f"diverge{len(list(out.glob('diverge*')))}"
    if env.is_main:
        run_dir.mkdir(parents=True)
    dist.barrier()
    error = None
    try:
        run(config(base, run_dir, train__max_steps=6, train__nonfinite_steps_to_stop=2, checkpoint__every_n_steps=2,
                   checkpoint__keep_last_k=1, eval__num_batches=0), env, device)
    except RuntimeError as exc:
        error = str(exc)
    finally:
        model_mod.chunked_cross_entropy = original
    dist.barrier()
    ckpt = run_dir / "checkpoints"
    return {"error": error, "tags": sorted(p.name for p in ckpt.glob("step_*")),
            "latest": (ckpt / "latest").read_text().strip() if (ckpt / "latest").exists() else None,
            "steps": [m["step"] for m in read_metrics(run_dir)] if (run_dir / "metrics.jsonl").exists() else []}


def main() -> None:
    base = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    env = dist_env_from_environ()
    device = resolve_device("cpu")
    setup_distributed(env, device)
    results: dict = {"world_size": env.world_size}
    try:
        for stage in (2, 1):
            results[f"zero{stage}"] = resume_equality(base, out, stage, env, device)
        source = out / "zero1_resumed"  # holds step 2N; `resume` points at it from fresh run dirs
        results["mismatch_model"] = mismatch(config(base, out / "m1", checkpoint__resume=str(source),
                                                    model__overrides={"n_layer": 3}), env, device)
        results["mismatch_sinks"] = mismatch(config(base, out / "m2", checkpoint__resume=str(source),
                                                    model__overrides={"sink_strategy": "uniform"}), env, device)
        tampered = out / "other_data" / "checkpoints" / f"step_{2 * N:08d}"
        if env.is_main:  # a checkpoint as if trained on another dataset: only its manifest hash differs
            shutil.copytree(source / "checkpoints" / f"step_{2 * N:08d}", tampered)
            meta = json.loads((tampered / "nulls_meta.json").read_text())
            meta["data_manifest_sha256"] = "0" * 64
            (tampered / "nulls_meta.json").write_text(json.dumps(meta))
        dist.barrier()
        results["mismatch_data"] = mismatch(config(base, out / "m3", checkpoint__resume=str(tampered)), env, device)
        for stage in (0, 3):
            run_dir = out / f"zero{stage}_short"
            code = run(config(base, run_dir, deepspeed__zero_stage=stage, train__max_steps=2), env, device)
            if env.is_main:
                losses = [m["train/loss"] for m in read_metrics(run_dir)]
                results[f"zero{stage}_short"] = {"code": code, "losses": losses,
                                                 "latest": (run_dir / "checkpoints" / "latest").read_text().strip()}
        if env.is_main:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            from nulls_dist.config import NullConfig
            from nulls_dist.model import NullTransformer

            state = get_fp32_state_dict_from_zero_checkpoint(str(out / "zero2_straight" / "checkpoints"),
                                                             tag=f"step_{2 * N:08d}")
            meta = json.loads((out / "zero2_straight" / "checkpoints" / f"step_{2 * N:08d}" /
                               "nulls_meta.json").read_text())
            model = NullTransformer(NullConfig(**meta["model"]))
            missing, unexpected = model.load_state_dict(state, strict=False)
            from nulls_dist.formats.weights import load_weights  # the trainer's own consolidated copy

            ours = load_weights(out / "zero2_straight" / "checkpoints" / f"step_{2 * N:08d}" / "model.safetensors")
            results["consolidated"] = {"missing": list(missing), "unexpected": list(unexpected),
                                       "num_tensors": len(state), "step": meta["step"],
                                       "finite": all(torch.isfinite(v).all().item() for v in state.values()),
                                       "safetensors_equal": sorted(ours) == sorted(state) and all(
                                           torch.equal(ours[k], state[k].float()) for k in state)}
        results["collectives"] = collectives(base, out, env, device)
        accum = 2  # TINY: micro_batch 2, grad_accum 2 -> 2 micro-batches per rank per step
        results["diverged"] = divergence(base, out, env, device, lambda i: i >= 2 * accum)  # steps 3.. are NaN
        results["transient"] = divergence(base, out, env, device, lambda i: 2 * accum <= i < 3 * accum)  # step 3
        results["ok"] = True
    except Exception:  # noqa: BLE001 - the marker must carry the failure to the test
        results["ok"] = False
        results["error"] = traceback.format_exc()
        raise
    finally:
        (out / f"rank{env.rank}.json").write_text(json.dumps(results, indent=1))
        teardown_distributed()


if __name__ == "__main__":
    main()
