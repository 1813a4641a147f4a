#!/usr/bin/env bash
# The project's prepared GPU script for one device session (at most ~8 minutes on one H100/H200), results into
# $OUT (the device tool's folder) or ./device_out:
#   1. the kernel checks (kernels/bench/device_check.sh: the card, kernel + model `gpu` tests in fp32/bf16, the
#      sink-MLP benchmark JSON);
#   2. the training `gpu` tests (FlexAttention gradients, a sync-free model step, whole nulls-train steps under
#      torch.cuda.set_sync_debug_mode("error"));
#   3. the one-GPU training benchmark of paper_wiki_1b (bf16, ZeRO 0, context 1024, the largest micro-batch that
#      fits), gathered vs masked: tokens/s, MFU, step-time breakdown, peak memory, syncs per step.
# The device image lacks DeepSpeed, Hydra and WebDataset: `bash nulls_dist/bench/fetch_device_wheels.sh` here
# puts their wheels into .whl/ (git-ignored), which the device call must carry (`carry: [".whl"]`).
# On a machine without CUDA it stops after printing what it would run (a dry run: DRY_RUN=1 forces that).
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mkdir -p "${OUT:-$repo/device_out}" && cd "${OUT:-$repo/device_out}" && pwd)
py=${PYTHON:-python3}
dry=${DRY_RUN:-}
$py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || dry=1
run() { echo "+ $*"; [ -n "$dry" ] || "$@"; }
status=0
if [ -d "$repo/.whl" ] && ls "$repo"/.whl/*.whl >/dev/null 2>&1; then
  run $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$repo"/.whl/*.whl || status=1
fi
run $py -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/nulls "$repo" || status=1
export PYTHONPATH=/tmp/nulls:/tmp/site${PYTHONPATH:+:$PYTHONPATH} NULLS_INSTALLED=1 PYTHONUNBUFFERED=1
export WANDB_MODE=disabled DS_ACCELERATOR=cuda
cd /tmp
run env OUT="$out" bash "$repo/kernels/bench/device_check.sh" || status=1
run $py -m pytest -q -rs -p no:cacheprovider -m gpu "$repo/tests/test_hot_path.py" "$repo/tests/test_gpu_training.py" \
    2>&1 | tee "$out/gpu_training_tests.log" || status=1
run $py -m nulls_dist.bench.train_throughput --preset paper_wiki_1b --micro-batch auto --seq-len 1024 --segment 512 \
    --steps 6 --warmup 2 --out "$out/train_bench.json" 2>&1 | tee "$out/train_bench.log" || status=1
[ -n "$dry" ] && echo "dry run: no CUDA device here; nothing was run"
exit $status
