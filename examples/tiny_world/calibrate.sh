#!/usr/bin/env bash
# Calibrate the shipped tiny-world DiNa-LRM (assets/dinalrm-tiny) and measure it on held-out pairs (about 5 CPU min):
# two fresh sets of oracle-labelled pairs on held-out prompts (make_pairs.py, generator seeds 10 and 20, never seen in
# training), a logistic fit on the first (eval/calibrate.py), ECE and Brier before and after on the second, at
# t = 0.4 and for the ensemble. Writes examples/tiny_world/calibration/{t0.4,ensemble}/ (the committed figures).
#
#   bash examples/tiny_world/calibrate.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-examples/tiny_world/outputs/calibration}"  # relative to the repository root
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
cd "$REPO"

for seed in 10 20; do  # only the `test` split (held-out prompts) is used; 4 training prompts keep the rest cheap
  (cd "$HERE" && python make_pairs.py --generator "$REPO/assets/tiny-sd3" --output_dir "$REPO/$OUT/pairs-seed$seed" \
    --train_prompts 4 --test_prompts 480 --seed "$seed")
done
for setting in "t0.4 --t 0.4" "ensemble --ensemble"; do
  read -r name flags <<< "$setting"
  # shellcheck disable=SC2086
  python eval/calibrate.py --model assets/dinalrm-tiny --pairs "$OUT/pairs-seed10" --eval_pairs "$OUT/pairs-seed20" \
    $flags --output_dir "examples/tiny_world/calibration/$name"
done
