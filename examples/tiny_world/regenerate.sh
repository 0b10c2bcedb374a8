#!/usr/bin/env bash
# Regenerate the whole tiny world from scratch with fixed seeds:
#   VAE -> SD3 generator -> oracle-labelled pairs -> DiNa-LRM (train_dinalrm.py) -> Hub repo
#   -> evaluation (evaluate_reward.py, then eval/run_eval.py + eval/noise_sweep.py) -> pixel baseline
#   -> ReFL (examples/refl/train_refl.py) -> Flow-GRPO (flow_grpo.py, DiNa-LRM and pixel-baseline rewards)
#   -> LPO vs ReFL vs Flow-GRPO with DiNa-LRM and ReFL with the pixel CNN side by side (compare_optimisers.py),
#   then copy the shipped artefacts.
#
#   bash examples/tiny_world/regenerate.sh                 # full run, writes examples/tiny_world/outputs and assets/
#   QUICK=1 OUT=/tmp/tw bash examples/tiny_world/regenerate.sh   # toy step counts, one warm interpreter, assets untouched
#   FROM=pairs bash examples/tiny_world/regenerate.sh       # resume at a stage, reusing $OUT's earlier outputs
#
# CPU time of the full run is written to $OUT/timings.txt (see examples/tiny_world/README.md for measured numbers).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-$HERE/outputs}"
QUICK="${QUICK:-0}"
FROM="${FROM:-vae}"
PY="${PYTHON:-python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

if [[ "$QUICK" == 1 ]]; then
  VAE_FLAGS=(--steps 2 --decoder_steps 2 --num_images 32 --eval_images 8)
  GEN_FLAGS=(--steps 4 --renders_per_prompt 1 --eval_prompts 8 --sample_steps 2)
  PAIR_FLAGS=(--train_prompts 24 --test_prompts 12 --sample_steps 2 --margin 0.0)
  RM_STEPS=4; BASELINE_STEPS=4; SWEEP_FLAGS=(--t_values 0.0,0.4)
  REFL_FLAGS=(--max_train_steps 2 --validation_steps 1 --num_inference_steps 2 --num_validation_prompts 4)
  GRPO_FLAGS=(--max_train_steps 1 --validation_steps 1 --num_inference_steps 3 --sde_window_range 2
    --prompts_per_step 2 --group_size 2 --num_validation_prompts 4)
  OPTIMISER_FLAGS=(--quick --lpo_seeds 0 --num_validation_prompts 4)
  # At toy step counts the run is mostly interpreter start-up (~10 CPU s per process to import torch and diffusers):
  # every Python process of it, the scripts' own children included, is a fork of one interpreter that imported them
  # once (dinalrm/testing/warm_python.py), with the same command line. The full run starts each process afresh.
  WARM="$(mktemp -d)"
  "$PY" -m dinalrm.testing.warm_python serve "$WARM" &
  WARM_SERVER=$!
  trap 'kill "$WARM_SERVER" && wait "$WARM_SERVER"; rm -rf "$WARM"' EXIT
  until [[ -x "$WARM/python" ]]; do kill -0 "$WARM_SERVER"; sleep 0.2; done  # written once the server listens
  PY="$WARM/python"
else
  VAE_FLAGS=()
  GEN_FLAGS=()
  PAIR_FLAGS=(--train_prompts 4800 --test_prompts 720)  # ~2750 training / ~430 test pairs
  RM_STEPS=1500; BASELINE_STEPS=1500; SWEEP_FLAGS=()
  REFL_FLAGS=(--max_train_steps 60 --validation_steps 10 --num_inference_steps 12 --num_validation_prompts 32)
  GRPO_FLAGS=(--max_train_steps 40 --validation_steps 10)  # 8 prompts x 4 samples, SDE window 2 of the first 6 steps
  OPTIMISER_FLAGS=(--num_validation_prompts 72)  # LPO on 3 seeds, ReFL 40 steps (both rewards), Flow-GRPO 20 steps
fi

mkdir -p "$OUT/metrics"
[[ "$FROM" == vae ]] && : > "$OUT/timings.txt"
started=0
cpu_ticks() {  # this shell's and its reaped children's (with the warm server: the forks it reaped too)
  awk '{ticks += $14 + $15 + $16 + $17} END {print ticks}' /proc/$$/stat ${WARM_SERVER:+/proc/$WARM_SERVER/stat}
}
stage() {  # stage NAME COMMAND...: run it (from stage $FROM on) and record its wall and CPU seconds
  local name="$1"; shift
  [[ "$name" == "$FROM" ]] && started=1
  if [[ $started == 0 ]]; then echo "== $name (skipped, FROM=$FROM)"; return; fi
  local start=$SECONDS
  local cpu_before; cpu_before=$(cpu_ticks)
  echo "== $name"
  "$@"
  local cpu_after; cpu_after=$(cpu_ticks)
  sed -i "/^$name /d" "$OUT/timings.txt"
  printf '%s wall_s=%d cpu_s=%d\n' "$name" $((SECONDS - start)) $(((cpu_after - cpu_before) / $(getconf CLK_TCK))) \
    | tee -a "$OUT/timings.txt"
}

cd "$REPO"
stage vae "$PY" "$HERE/pretrain_vae.py" --output_dir "$OUT/vae" "${VAE_FLAGS[@]}"
stage generator "$PY" "$HERE/pretrain_generator.py" --vae_path "$OUT/vae" --output_dir "$OUT/tiny-sd3" "${GEN_FLAGS[@]}"
stage pairs "$PY" "$HERE/make_pairs.py" --generator "$OUT/tiny-sd3" --output_dir "$OUT/pairs" "${PAIR_FLAGS[@]}"
train_reward_model() {
  rm -rf "$OUT/dinalrm-model" "$OUT/cache"
  "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no \
    --dynamo_backend no "$REPO/train_dinalrm.py" \
    --pretrained_model_name_or_path "$OUT/tiny-sd3" --train_data_dir "$OUT/pairs" --data_format canonical \
    --precompute_features --cache_dir "$OUT/cache" --resolution 64 --max_sequence_length 16 \
    --num_backbone_layers 3 --visual_layers 1,2,3 --text_layers 1,2,3 --head_num_heads 4 --lora_rank 8 --lora_alpha 16 \
    --train_batch_size 16 --max_train_steps "$RM_STEPS" --learning_rate 1e-3 --lr_warmup_steps 20 \
    --use_ema --ema_decay 0.99 --validation_split test --validation_steps 500 --checkpointing_steps 100000 \
    --report_to tensorboard --seed 0 --output_dir "$OUT/dinalrm-model"
}
stage dinalrm train_reward_model
stage hub_repo "$PY" "$REPO/scripts/build_hub_repo.py" --reward_model "$OUT/dinalrm-model" --base "$OUT/tiny-sd3" \
  --output_dir "$OUT/dinalrm-tiny" --overwrite
stage evaluate "$PY" "$HERE/evaluate_reward.py" --model "$OUT/dinalrm-tiny" --pairs "$OUT/pairs" \
  --output "$OUT/metrics/dinalrm.json"
run_eval() {  # the repository's evaluation scripts on the same held-out pairs (one seeded noise per image)
  rm -rf "$OUT/metrics/run_eval"
  "$PY" "$REPO/eval/run_eval.py" --model "$OUT/dinalrm-tiny" --pairs "$OUT/pairs" --t 0.4 --ensemble \
    --output_dir "$OUT/metrics/run_eval"
  "$PY" "$REPO/eval/noise_sweep.py" --models "$OUT/dinalrm-tiny" --pairs "$OUT/pairs" \
    --output_dir "$OUT/metrics/run_eval" "${SWEEP_FLAGS[@]}"
}
stage run_eval run_eval
stage pixel_baseline "$PY" "$HERE/pixel_baseline.py" --generator "$OUT/tiny-sd3" --pairs "$OUT/pairs" \
  --steps "$BASELINE_STEPS" --output "$OUT/metrics/pixel_baseline.json" --save_model "$OUT/metrics/pixel_baseline.safetensors"
align_generator() {  # align_generator LEARNING_RATE OUTPUT_NAME
  rm -rf "$OUT/$2"
  "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no \
    --dynamo_backend no "$REPO/examples/refl/train_refl.py" \
    --pretrained_model_name_or_path "$OUT/tiny-sd3" --reward_model "$OUT/dinalrm-tiny" \
    --prompts_file "$OUT/pairs/train_prompts.txt" --validation_prompts_file "$OUT/pairs/held_out_prompts.txt" \
    --golden_metric "$HERE/domain.py:oracle_score" --height 64 --width 64 --max_sequence_length 16 \
    --guidance_scale 4.0 --lora_rank 8 --learning_rate "$1" --train_batch_size 8 --seed 0 \
    --output_dir "$OUT/$2" "${REFL_FLAGS[@]}"
}
stage refl align_generator 2e-4 refl
stage refl_fast align_generator 1e-3 refl-fast  # 5x the learning rate: shows reward hacking early
flow_grpo() {  # flow_grpo OUTPUT_NAME REWARD_FLAG REWARD_PATH
  rm -rf "$OUT/$1"
  "$PY" "$HERE/flow_grpo.py" train --generator "$OUT/tiny-sd3" "$2" "$3" --seed 0 --output_dir "$OUT/$1" "${GRPO_FLAGS[@]}"
}
stage flow_grpo flow_grpo flow-grpo --reward_model "$OUT/dinalrm-tiny"
stage flow_grpo_pixel flow_grpo flow-grpo-pixel --pixel_reward "$OUT/metrics/pixel_baseline.safetensors"
"$PY" "$HERE/flow_grpo.py" summarize --run "DiNa-LRM=$OUT/flow-grpo" --run "pixel CNN=$OUT/flow-grpo-pixel" \
  --output "$OUT/results_flow_grpo.json" --plot "$OUT/flow_grpo_curves.png" > /dev/null
stage optimisers "$PY" "$HERE/compare_optimisers.py" --generator "$OUT/tiny-sd3" --reward_model "$OUT/dinalrm-tiny" \
  --pixel_reward "$OUT/metrics/pixel_baseline.safetensors" --output_dir "$OUT/optimisers" \
  --results "$OUT/results_optimisers.json" --plot "$OUT/optimiser_comparison.png" \
  "${OPTIMISER_FLAGS[@]}" > /dev/null

"$PY" "$HERE/summarize.py" --out "$OUT" --output "$OUT/results.json" > /dev/null
if [[ "$QUICK" != 1 ]]; then
  cp "$OUT/results.json" "$HERE/results.json"
  rm -rf "$REPO/assets/tiny-sd3" "$REPO/assets/dinalrm-tiny"
  mkdir -p "$REPO/assets"
  cp -r "$OUT/tiny-sd3" "$REPO/assets/tiny-sd3"
  # The demo model ships no code: it loads with the installed pipeline_dinalrm / modeling_dinalrm (no copies to drift).
  cp -r "$OUT/dinalrm-tiny" "$REPO/assets/dinalrm-tiny"
  rm "$REPO/assets/dinalrm-tiny/pipeline_dinalrm.py" "$REPO/assets/dinalrm-tiny/reward_model/modeling_dinalrm.py"
  cp "$OUT/refl/refl_curves.png" "$HERE/refl_curves.png"
  cp "$OUT/refl-fast/refl_curves.png" "$HERE/refl_curves_fast.png"
  cp "$OUT/results_flow_grpo.json" "$OUT/flow_grpo_curves.png" "$HERE/"
  cp "$OUT/results_optimisers.json" "$OUT/optimiser_comparison.png" "$HERE/"
fi
echo "done; timings in $OUT/timings.txt"
