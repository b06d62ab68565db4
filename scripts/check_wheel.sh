#!/usr/bin/env bash
# Build the wheel, install it into a fresh venv and use it from an empty folder: --version, the
# shipped recipes, and a short training run of a shipped recipe found by name.
#
#   bash scripts/check_wheel.sh [DATA_ROOT]     (default: ../shared/data)
#
# The fresh venv gets only the wheel; its dependencies (torch, faiss, ...) are borrowed from this
# checkout's .venv through a .pth file, so nothing is downloaded. With network access, drop
# BORROW=1 to let pip install them instead: BORROW=0 bash scripts/check_wheel.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
data_root=$(realpath "${1:-$repo/../shared/data}")
python=${PYTHON:-$repo/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== building the wheel"
mkdir "$work/source"
for name in src configs pyproject.toml setup.py LICENSE README.md; do cp -r "$repo/$name" "$work/source/"; done
"$python" -m pip wheel --no-deps --no-build-isolation -q -w "$work/wheel" "$work/source"
wheel=$(ls "$work"/wheel/fashion_retrieval-*.whl)
echo "$wheel: $(unzip -l "$wheel" | grep -c 'fashion_retrieval/configs/.*\.yaml') recipes"

echo "== a fresh venv with only the wheel"
"$python" -m venv "$work/venv"
if [ "${BORROW:-1}" = 1 ]; then
  "$work/venv/bin/python" -m pip install -q --no-deps "$wheel"
  site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # appended after the fresh venv's own site-packages: the wheel's package wins over any editable install
  "$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
    | xargs -I{} sh -c "echo '$site' > {}/borrowed-dependencies.pth"
else
  "$work/venv/bin/python" -m pip install -q "$wheel"
fi

mkdir "$work/empty" && cd "$work/empty"
cli="$work/venv/bin/fashion-retrieval"
"$work/venv/bin/python" -c 'import fashion_retrieval, sys; assert "/venv/" in fashion_retrieval.__file__, fashion_retrieval.__file__; print("package:", fashion_retrieval.__file__)'
"$cli" --version
"$cli" recipes | tail -n 3
echo "== training a shipped recipe by name (two steps of a small backbone from scratch, no evaluation)"
"$cli" train --config viton_global_ce --data-root "$data_root" --out "$work/run" \
  model.kwargs.backbone=resnet18 model.kwargs.pretrained=false data.image_size=[64,48] data.num_workers=0 \
  data.sampler.p=4 train.epochs=1 train.max_steps_per_epoch=2 train.progress=false train.compile=false \
  eval.benchmark=null
ls -l "$work/run/model.safetensors" "$work/run/meta.json"
echo "wheel check passed"
