#!/usr/bin/env bash
# The GPU checks of the Triton sink kernels, as one prepared script for one device session (docs/kernels.md):
# the card, the `gpu`-marked kernel and model tests (fp32 and bf16, the model's auto dispatch) and the
# whole-layer benchmark JSON. The project's full device script (this, plus training) is
# nulls_dist/bench/device_check.sh. Everything lands under $OUT (the device tool's folder) or ./device_out.
# Needs torch, triton, numpy, pytest and setuptools, which the device image has: the repository is installed
# into /tmp/nulls (its folders map into the `nulls_dist` package, so the checkout itself is not importable) and
# everything runs from a neutral directory.
#
#     bash kernels/bench/device_check.sh            # about 3-5 minutes on an H100
#     SHAPES=paper bash kernels/bench/device_check.sh
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mkdir -p "${OUT:-$repo/device_out}" && cd "${OUT:-$repo/device_out}" && pwd)
py=${PYTHON:-python3}  # the device image's python3 holds torch and triton
if [ -z "${NULLS_INSTALLED:-}" ]; then
  $py -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/nulls "$repo" || exit 1
  export PYTHONPATH=/tmp/nulls${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
cd /tmp
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$out/gpu.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
git -C "$repo" rev-parse HEAD 2>/dev/null | tee -a "$out/gpu.txt"
$py -m pytest -q -rs -p no:cacheprovider -m gpu "$repo/tests/test_sink_mlp_kernels.py" "$repo/tests/test_model.py" 2>&1 \
    | tee "$out/gpu_tests.log" || status=1
$py -m nulls_dist.kernels.bench.sink_mlp_bench --shapes "${SHAPES:-paper,large}" --out "$out/sink_mlp_bench.json" 2>&1 \
    | tee "$out/sink_mlp_bench.log" || status=1
exit $status
