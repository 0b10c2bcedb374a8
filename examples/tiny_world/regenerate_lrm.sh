#!/usr/bin/env bash
# The LRM baseline in the tiny world, next to DiNa-LRM and the pixel baseline on the same held-out pairs:
#   oracle-labelled pairs (make_pairs.py, as regenerate.sh) -> SD1.5-topology UNet pretrained with DDPM
#   (lrm_baseline.py pretrain) -> LRM trained by train_dinalrm.py --reward_model lrm -> pixel baseline
#   -> evaluation of LRM, DiNa-LRM (assets/dinalrm-tiny) and the pixel baseline (lrm_baseline.py evaluate).
#
#   bash examples/tiny_world/regenerate_lrm.sh                   # writes $OUT (default outputs/) and the figures here
#   QUICK=1 OUT=/tmp/tw bash examples/tiny_world/regenerate_lrm.sh  # toy step counts
#   FROM=lrm bash examples/tiny_world/regenerate_lrm.sh          # resume at a stage (pairs, pretrain, lrm, pixel, evaluate)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-$HERE/outputs}"
QUICK="${QUICK:-0}"
FROM="${FROM:-pairs}"
PY="${PYTHON:-python}"
export PYTHONPATH="$REPO:$HERE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

if [[ "$QUICK" == 1 ]]; then
  PAIR_FLAGS=(--train_prompts 24 --test_prompts 12 --sample_steps 2 --margin 0.0)
  PRETRAIN_FLAGS=(--steps 2 --renders_per_prompt 1); LRM_STEPS=2; BASELINE_STEPS=4
else
  # make_pairs.py's defaults (1200 / 240 prompts: ~730 training, ~140 held-out pairs), a quarter of regenerate.sh's
  # training pairs: what a contended 2-core CPU allowed. DiNa-LRM (assets/dinalrm-tiny) is re-scored on these pairs.
  PAIR_FLAGS=(--train_prompts 1200 --test_prompts 240)
  PRETRAIN_FLAGS=(--steps 300); LRM_STEPS=1000; BASELINE_STEPS=1500
fi

mkdir -p "$OUT/metrics"
started=0
stage() {  # stage NAME COMMAND...: run it from stage $FROM on and print its wall seconds
  local name="$1"; shift
  [[ "$name" == "$FROM" ]] && started=1
  if [[ $started == 0 ]]; then echo "== $name (skipped, FROM=$FROM)"; return; fi
  local start=$SECONDS
  echo "== $name"
  "$@"
  echo "$name wall_s=$((SECONDS - start))" | tee -a "$OUT/timings_lrm.txt"
}

cd "$REPO"
stage pairs "$PY" "$HERE/make_pairs.py" --generator "$REPO/assets/tiny-sd3" --output_dir "$OUT/pairs" "${PAIR_FLAGS[@]}"
stage pretrain "$PY" "$HERE/lrm_baseline.py" pretrain --output_dir "$OUT/sd15-tiny" "${PRETRAIN_FLAGS[@]}"
train_lrm() {  # the official recipe (lr 1e-5, weight decay 0.3, ...) is for SD1.5 at scale; a from-scratch toy needs more
  rm -rf "$OUT/lrm-model"
  "$PY" "$REPO/train_dinalrm.py" --reward_model lrm \
    --pretrained_model_name_or_path "$OUT/sd15-tiny" --train_data_dir "$OUT/pairs" --data_format canonical \
    --lrm_text_projection "$REPO/assets/tiny-sd3/text_encoder/model.safetensors" --resolution 64 \
    --train_batch_size 16 --max_train_steps "$LRM_STEPS" --learning_rate 3e-4 --adam_weight_decay 1e-4 \
    --lr_warmup_steps 20 --validation_split test --validation_steps 250 --checkpointing_steps 100000 \
    --report_to tensorboard --seed 0 --output_dir "$OUT/lrm-model"
}
stage lrm train_lrm
stage pixel "$PY" "$HERE/pixel_baseline.py" --generator "$REPO/assets/tiny-sd3" --pairs "$OUT/pairs" \
  --steps "$BASELINE_STEPS" --output "$OUT/metrics/pixel_baseline.json"
stage evaluate "$PY" "$HERE/lrm_baseline.py" evaluate --lrm "$OUT/lrm-model" --pairs "$OUT/pairs" \
  --pixel_baseline "$OUT/metrics/pixel_baseline.json" --pretrain_metrics "$OUT/sd15-tiny/pretrain_metrics.json" \
  --lrm_training_summary "$OUT/lrm-model/training_summary.json" \
  --output "$OUT/metrics/lrm_comparison.json" --figure "$OUT/metrics/lrm_comparison.png"
if [[ "$QUICK" != 1 ]]; then
  cp "$OUT/metrics/lrm_comparison.json" "$HERE/results_lrm.json"
  cp "$OUT/metrics/lrm_comparison.png" "$HERE/lrm_comparison.png"
fi
echo "done"
