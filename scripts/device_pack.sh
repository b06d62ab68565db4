#!/usr/bin/env bash
# Pack what scripts/device_bench.sh needs on a lent GPU machine into carry/ (git-ignored).
#
# That machine has no network and its own Python 3.12 with PyTorch, torchvision, numpy, PIL,
# typer, rich, tqdm, safetensors, scikit-learn (docs/performance.md, "On a lent GPU"); this adds
# the project's other pure imports as Python 3.12 wheels (about 3 MB). Run it here, then:
#
#   bash scripts/device_pack.sh
#   then the device tool's run: command 'bash scripts/device_bench.sh', carry ["carry"], timeout_s 560
#
# The benchmarks use generated tensors and generated JPEGs, so no dataset travels (the shared
# data is larger than the 64 MiB a call can carry).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
mkdir -p carry/wheels
FLAGS=(--quiet --only-binary=:all: --dest carry/wheels --python-version 3.12 --implementation cp --abi cp312
       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
"$PIP" download "${FLAGS[@]}" "pydantic>=2.6"              # with its own small dependencies
"$PIP" download "${FLAGS[@]}" --no-deps "pytorch-metric-learning>=2.5"   # its are there already
du -sh carry
ls carry/wheels
