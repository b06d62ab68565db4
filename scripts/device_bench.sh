#!/usr/bin/env bash
# The GPU half of issue 6 in one call to a lent GPU machine (at most BUDGET_S=540 s of steps):
# environment, embedding throughput (forward vs JPEG files end to end), training throughput
# (MMFL-Net, M3-Net, global vs plain ResNet-50). Each step has its own time limit, so what ran
# comes back in $OUT even when a later step runs out of time.
#
#   bash scripts/device_pack.sh                                   # here: wheels into carry/
#   then the device tool's run: command 'bash scripts/device_bench.sh', carry ["carry"], timeout_s 560
#   DEVICE=cpu QUICK=1 OUT=runs/device_smoke bash scripts/device_bench.sh   # a smoke run here (2 min)
#
# Then copy the JSON files into docs/performance.md's GPU tables.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device_bench}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1

# The machine's Python has PyTorch but not every import of ours: add the carried wheels beside
# it, not into it, and use the source tree as it is (no install, so no torch pin is checked).
if ! "$PY" -c "import pydantic, pytorch_metric_learning" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/fr_site carry/wheels/*.whl
fi
export PYTHONPATH=$PWD/src:/tmp/fr_site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [[ ${QUICK:-0} == 1 ]]; then   # the same steps at toy sizes, to check the script itself
  FAST=(); EMBED=(--batch 8 --workers 2 --n 32 --forward-steps 2 --warmup 1 --size 64 64)
  TRAIN=(--batch 8 --steps 2 --warmup 1 --size 64 64 --same-process)
else
  FAST=(--amp --channels-last --compile --cudnn-benchmark)
  EMBED=(--batch 256 --workers 16 --n 20000 --forward-steps 50 --warmup 10)
  TRAIN=(--batch 128 --steps 50 --warmup 10)
fi
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
step() {  # step NAME LIMIT_S COMMAND...: at most LIMIT_S, never past the deadline
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  (( left < limit )) && limit=$left
  if (( limit < 30 )); then echo "== $name: skipped, ${left}s left"; return; fi
  echo "== $name ($(date -u +%H:%M:%S), at most ${limit}s)"
  timeout "$limit" "$@" || echo "== $name: exit $?"
}

echo "== environment"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" | tee "$OUT/environment.txt"

# In order of what the targets need most; torch.compile costs a minute or two per model.
step embedding 200 "$PY" benchmarks/embed_throughput.py --device "$DEVICE" "${FAST[@]}" "${EMBED[@]}" --generate \
  --json "$OUT/embed_throughput_gpu.json"
for model in reference mmfl_net global_net m3_net; do
  step "training $model" 150 "$PY" benchmarks/train_throughput.py --device "$DEVICE" "${FAST[@]}" "${TRAIN[@]}" \
    --models "$model" --json "$OUT/train_throughput_gpu_$model.json"
done
echo "== done ($(date -u +%H:%M:%S)); files in $OUT"
ls -la "$OUT"
