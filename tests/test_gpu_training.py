"""GPU checks of the training hot path (`gpu` marker: skipped without CUDA; run by
nulls_dist/bench/device_check.sh): FlexAttention's gradients against the dense same-source causal mask, a model
step given its sink plan under torch.cuda.set_sync_debug_mode("error"), and whole nulls-train steps under the
trainer's own `train.sync_debug` switch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nulls_dist.attention import AttentionMask, attend, flex_block_mask, same_source_causal_mask

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.gpu


def _packed(rows, length, device):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(rows):
        row = []
        while len(row) < length:
            row += [100 + int(torch.randint(4, (1,), generator=gen))] * int(torch.randint(1, 40, (1,), generator=gen))
        out.append(row[:length])
    return torch.tensor(out, device=device)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_flex_gradients_match_the_dense_mask(dtype, tol):
    device = torch.device("cuda")
    source_ids = _packed(2, 256, device)
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(2, 6, 256, 64, device=device, dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, 256, 64, device=device, dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, 256, 64, device=device, dtype=dtype, generator=gen, requires_grad=True)
    dy = torch.randn(2, 6, 256, 64, device=device, dtype=dtype, generator=gen)
    grads = []
    for mask in (AttentionMask("flex", flex_block_mask(source_ids)),
                 AttentionMask("dense", same_source_causal_mask(source_ids))):
        y = attend(q, k, v, mask)
        grads.append([y] + list(torch.autograd.grad(y, (q, k, v), dy)))
    for name, a, b in zip(("y", "dq", "dk", "dv"), *grads):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= tol * scale, name


@pytest.mark.parametrize("sink_path", ["gathered", "masked"])
def test_model_step_given_a_plan_never_syncs(sink_path):
    from nulls_dist.config import NullConfig
    from nulls_dist.model import IGNORE_INDEX, NullTransformer
    from nulls_dist.sink_plan import plan_for_batch

    device = torch.device("cuda")
    cfg = NullConfig.from_preset("debug", sink_path=sink_path)
    model = NullTransformer(cfg).to(device).to(torch.bfloat16)
    source_ids = _packed(4, 128, "cpu") + cfg.vocab_size
    input_ids = torch.randint(0, cfg.vocab_size, (4, 128))
    labels = torch.where(torch.rand(4, 128) < 0.1, IGNORE_INDEX, torch.randint(0, cfg.vocab_size, (4, 128)))
    plan = plan_for_batch(source_ids.numpy(), cfg, model.sink_assignment).pin_memory().to(device, non_blocking=True)
    batch = [t.pin_memory().to(device, non_blocking=True) for t in (input_ids, source_ids, labels)]
    model(*batch[:2], plan=plan, labels=batch[2]).backward()  # warm-up: compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = model(*batch[:2], plan=plan, labels=batch[2])
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def test_nulls_train_steps_never_sync_between_log_steps(tmp_path):
    """Whole training steps (loader, plan, forward, backward, DeepSpeed's optimizer step) with train.sync_debug:
    any host-device synchronisation in a step that does not end with a log reduction raises."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "nulls_dist.cli.train", "experiment=demo", "train.device=cuda",
           f"train.run_dir={run_dir}", f"data.output_dir={tmp_path / 'data'}", "train.max_steps=8",
           "logging.log_every=4", "checkpoint.every_n_steps=8", "eval.num_batches=0", "optim.warmup_steps=1",
           "logging.wandb_mode=disabled", "train.sync_debug=true", "train.skip_nonfinite_steps=false",
           "deepspeed.zero_stage=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8]
