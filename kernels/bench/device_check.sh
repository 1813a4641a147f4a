#!/usr/bin/env bash
# The GPU checks of the Triton sink kernels, as one prepared script for one device session (docs/kernels.md):
# the card, the `gpu`-marked tests (kernels in fp32 and bf16, the model's auto dispatch) and the whole-layer
# benchmark JSON (the training-step benchmark, which needs DeepSpeed, is
# nulls_dist/bench/train_throughput.py, docs/training.md). Everything lands under $OUT (the device tool's folder) or
# ./device_out. Needs only torch, triton, numpy and pytest, which the device image has.
#
#     bash kernels/bench/device_check.sh            # about 3-5 minutes on an H100
#     SHAPES=paper bash kernels/bench/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-device_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
py=${PYTHON:-python3}  # the device image's python3 holds torch and triton
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$out/gpu.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$out/gpu.txt"
$py -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_sink_mlp_kernels.py tests/test_model.py 2>&1 \
    | tee "$out/gpu_tests.log" || status=1
$py -m nulls_dist.kernels.bench.sink_mlp_bench --shapes "${SHAPES:-paper,large}" --out "$out/sink_mlp_bench.json" 2>&1 \
    | tee "$out/sink_mlp_bench.log" || status=1
exit $status
