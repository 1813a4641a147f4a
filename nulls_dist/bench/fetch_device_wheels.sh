#!/usr/bin/env bash
# Wheels of what the training checks need and the device image lacks (DeepSpeed, Hydra, OmegaConf, WebDataset
# and their pure-python requirements), for CPython 3.12 on x86-64, into .whl/ at the repository root. DeepSpeed
# and antlr4 publish no wheels: they are built here (pure python, no compiled ops). Run on this machine, then
# carry `.whl` in the device call (nulls_dist/bench/device_check.sh installs them into /tmp/site there).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
dest=$repo/.whl
mkdir -p "$dest"
grep -qx '/.whl/' "$repo/.git/info/exclude" 2>/dev/null || echo '/.whl/' >> "$repo/.git/info/exclude"
pin() { grep -i "^${1//-/[-_]}==" "$repo/constraints.txt" | head -1; }
binary=(hydra-core omegaconf webdataset braceexpand hjson py-cpuinfo msgpack pydantic pydantic-core annotated-types
        typing-inspection)
specs=()
for name in "${binary[@]}"; do specs+=("$(pin "$name")"); done
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "${specs[@]}"
DS_BUILD_OPS=0 $py -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$(pin deepspeed)" \
    "$(pin antlr4-python3-runtime)"
ls -la "$dest"
