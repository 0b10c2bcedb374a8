#!/usr/bin/env bash
# The noise-sharing measurements of the README (issue 13), on CPU, from scratch:
#   1. the photo world of tests/test_train_learning.py (tiny photo VAE, scikit-image photo pairs) and its reward model,
#      trained by train_dinalrm.py with that test's earlier flags (3000 pairs, 500 steps); 600 extra held-out pairs
#      for the accuracy table;
#   2. the tiny world's held-out pairs (make_pairs.py on the shipped generator; 434 pairs) for assets/dinalrm-tiny;
#   3. accuracy vs t with noise shared per prompt and per image (eval/noise_sweep.py --pairs), appendix A's Table 4
#      quantities under both (eval/uncertainty.py, 10 draws), and the learning test's 250 held-out pairs scored pair
#      by pair through pipe.compare (eval/noise_sharing.py);
#   4. ReFL on the tiny world with reward_fn's noise per sample vs per prompt (4 samples per prompt, 2 seeds).
#
#   OUT=/tmp/noise-sharing bash eval/noise_sharing.sh       # about 40 CPU minutes; results in eval/results/
# Stages whose output exists in $OUT are reused.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-/tmp/noise-sharing}"
RESULTS="$REPO/eval/results"
PY="${PYTHON:-python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false \
  TQDM_DISABLE=1
mkdir -p "$OUT" "$RESULTS"
cd "$REPO"

if [[ ! -d "$OUT/photo/train" ]]; then
  "$PY" - "$OUT/photo" <<'EOF'
import sys
from pathlib import Path

from diffusers import AutoencoderKL, StableDiffusion3Pipeline

from dinalrm.data.photo_pairs import load_photos, make_pairs, split_photos
from dinalrm.testing import get_tiny_sd3_components, write_canonical_pairs

root = Path(sys.argv[1])
components = get_tiny_sd3_components(seed=0)
components["vae"] = AutoencoderKL.from_pretrained("tests/fixtures/tiny-photo-vae")
StableDiffusion3Pipeline(**components).save_pretrained(root / "sd3")
photos = load_photos()
train_names, held_out_names = split_photos([name for name, _ in photos])
# The learning test's training pairs (3000, seed 0) and held-out pairs (250, seed 1), plus 600 more held-out pairs.
for folder, names, count, seed, split in (
    ("train", train_names, 3000, 0, "train"),
    ("held-out", held_out_names, 250, 1, "test"),
    ("held-out-600", held_out_names, 600, 2, "test"),
):
    pairs = make_pairs([(n, image) for n, image in photos if n in names], count, size=64, seed=seed)
    rows = [{key: pair[key] for key in ("prompt", "chosen", "rejected", "kind", "photo")} for pair in pairs]
    write_canonical_pairs(root / folder, rows, split)
EOF
fi
if [[ ! -d "$OUT/photo/pipe" ]]; then  # tests/test_train_learning.py's flags before it was cut to 200 steps
  "$PY" train_dinalrm.py --pretrained_model_name_or_path "$OUT/photo/sd3" --train_data_dir "$OUT/photo/train" \
    --validation_dataset_name "$OUT/photo/held-out" --output_dir "$OUT/photo/reward-model" \
    --num_backbone_layers 2 --visual_layers 1,2 --text_layers 1,2 --head_width 128 --head_num_heads 4 --lora_rank 0 \
    --resolution 64 --max_sequence_length 16 --train_batch_size 16 --max_train_steps 500 --learning_rate 2e-3 \
    --lr_scheduler cosine --lr_warmup_steps 0 --weighting_scheme logit_normal --logit_mean -1 --use_ema \
    --ema_decay 0.99 --validation_t 0.2,0.4,0.7 --validation_steps 100 --checkpointing_steps 100000 --seed 0 \
    --precompute_features
  "$PY" scripts/build_hub_repo.py --reward_model "$OUT/photo/reward-model" --base "$OUT/photo/sd3" \
    --output_dir "$OUT/photo/pipe"
  # Like the bundled demo model: no code copies, so the pipeline under test (this checkout's) scores it.
  rm "$OUT/photo/pipe/pipeline_dinalrm.py" "$OUT/photo/pipe/reward_model/modeling_dinalrm.py"
fi
if [[ ! -d "$OUT/tiny-pairs" ]]; then
  (cd examples/tiny_world && PYTHONPATH="$REPO/examples/tiny_world:$PYTHONPATH" "$PY" make_pairs.py \
    --generator "$REPO/assets/tiny-sd3" --output_dir "$OUT/tiny-pairs" --train_prompts 32 --test_prompts 720)
fi

# Accuracy vs t, noise shared per prompt vs per image: the evaluation runner's noise sweep (each image scored once).
for world in photo tiny-world; do
  if [[ $world == photo ]]; then model="$OUT/photo/pipe"; pairs="$OUT/photo/held-out-600"; else
    model=assets/dinalrm-tiny; pairs="$OUT/tiny-pairs"; fi
  "$PY" eval/noise_sweep.py --models "$model" --pairs "$pairs" --t_values 0.0,0.1,0.2,0.4,0.7 \
    --output_dir "$OUT/sweep-$world"
  cp "$OUT/sweep-$world/noise_sweep.csv" "$RESULTS/noise_sweep-$world.csv"
  "$PY" eval/uncertainty.py --model "$model" --pairs "$pairs" --num_draws 10 --t_values 0.2,0.4,0.6,0.8 \
    --output_dir "$OUT/uncertainty-$world"
  cp "$OUT/uncertainty-$world/uncertainty.csv" "$RESULTS/uncertainty-$world.csv"
done
# The learning test's held-out pairs scored pair by pair through pipe.compare, as users call it.
"$PY" eval/noise_sharing.py --model "$OUT/photo/pipe" --pairs "$OUT/photo/held-out" --t_values 0.4 \
  --output "$RESULTS/noise_sharing-photo-learning-test.json"
# Images of different sizes: a draw per latent shape (the pipeline) vs one draw centre-cropped (rejected at 3/4 height).
for how in crop resize; do
  "$PY" eval/noise_sharing.py --model "$OUT/photo/pipe" --pairs "$OUT/photo/held-out" --t_values 0.4,0.7 \
    --mismatch "$how" --output "$RESULTS/noise_sharing-photo-mismatch-$how.json"
done

for seed in 0 1; do
  for mode in none prompt; do
    [[ -f "$OUT/refl-$mode-$seed/refl_history.json" ]] && continue
    "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
      examples/refl/train_refl.py --pretrained_model_name_or_path assets/tiny-sd3 --reward_model assets/dinalrm-tiny \
      --prompts_file "$OUT/tiny-pairs/train_prompts.txt" --validation_prompts_file "$OUT/tiny-pairs/held_out_prompts.txt" \
      --golden_metric examples/tiny_world/domain.py:oracle_score --height 64 --width 64 --max_sequence_length 16 \
      --guidance_scale 4.0 --lora_rank 8 --learning_rate 2e-4 --train_batch_size 8 --samples_per_prompt 4 \
      --seed "$seed" --reward_noise_sharing "$mode" --max_train_steps 60 --validation_steps 10 \
      --num_inference_steps 12 --num_validation_prompts 32 --output_dir "$OUT/refl-$mode-$seed"
  done
done
"$PY" - "$OUT" "$RESULTS/refl-noise-sharing.json" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("refl-*-*/refl_history.json"))}
Path(sys.argv[2]).write_text(json.dumps(runs, indent=2) + "\n")
for name, history in runs.items():
    print(name, [(h["step"], round(h["proxy_reward"], 3), round(h["golden_metric"], 4)) for h in history])
EOF
"$PY" - "$RESULTS" <<'EOF'
"""eval/results/noise_sharing.md: the README's tables, from the files above."""
import csv
import json
import math
import sys
from pathlib import Path

results = Path(sys.argv[1])
lines = ["# Noise sharing, measured (eval/noise_sharing.sh)", ""]
for world, title in (("photo", "photo pairs (600 held-out)"), ("tiny-world", "tiny world (434 held-out)")):
    rows = list(csv.DictReader((results / f"noise_sweep-{world}.csv").open()))
    lines += [f"## Accuracy (%) vs t, {title}", "", "| t | shared (prompt) | independent (none) | gain |",
              "|---|---|---|---|"]
    by = {(r["noise_sharing"], float(r["t"])): r for r in rows}
    for t in sorted({float(r["t"]) for r in rows}):
        cells = []
        for mode in ("prompt", "none"):
            n, k = int(by[(mode, t)]["n_pairs"]), int(by[(mode, t)]["n_correct"])
            cells.append((k / n, math.sqrt(k / n * (1 - k / n) / n)))
        gain = 100 * (cells[0][0] - cells[1][0])
        lines.append(f"| {t:g} | " + " | ".join(f"{100 * a:.1f} ± {100 * e:.1f}" for a, e in cells) + f" | {gain:+.1f} |")
    lines += ["", f"## Table 4 quantities, {title} (10 draws)", "",
              "| t | noise | variation ratio | pairs flipping | mean margin | reward variance | accuracy of a draw |",
              "|---|---|---|---|---|---|---|"]
    for r in csv.DictReader((results / f"uncertainty-{world}.csv").open()):
        lines.append(f"| {float(r['t']):g} | {r['noise_sharing']} | {float(r['variation_ratio']):.3f} | "
                     f"{float(r['frac_pairs_flipping']):.3f} | {float(r['mean_margin']):.3f} | "
                     f"{float(r['mean_reward_variance']):.4f} | {float(r['mean_accuracy']):.3f} |")
    lines.append("")
learning = json.loads((results / "noise_sharing-photo-learning-test.json").read_text())["results"]
lines += ["## The learning test's 250 held-out pairs, pair by pair through pipe.compare (%)", ""]
lines += [f"- {mode}: " + ", ".join(f"{level} {100 * e['accuracy']:.1f} ± {100 * e['standard_error']:.1f}"
                                     for level, e in by_level.items()) for mode, by_level in learning.items()]
for how in ("crop", "resize"):
    mismatch = json.loads((results / f"noise_sharing-photo-mismatch-{how}.json").read_text())["results"]
    lines += ["", f"## Rejected image ({how}) at 3/4 height: a draw per image vs one centre-cropped draw (%)", ""]
    lines += [f"- {variant}: " + ", ".join(f"{level} {100 * e['accuracy']:.1f} ± {100 * e['standard_error']:.1f}"
                                            for level, e in by_level.items()) for variant, by_level in mismatch.items()]
refl = json.loads((results / "refl-noise-sharing.json").read_text())
lines += ["", "## Tiny-world ReFL: reward_fn noise per sample (none) vs per prompt (4 samples per prompt)", "",
          "| run | proxy reward, step 0 -> 60 | golden metric (oracle), step 0 -> 60 |", "|---|---|---|"]
for name, history in refl.items():
    lines.append(f"| {name} | {history[0]['proxy_reward']:.2f} -> {history[-1]['proxy_reward']:.2f} | "
                 f"{history[0]['golden_metric']:.4f} -> {history[-1]['golden_metric']:.4f} |")
(results / "noise_sharing.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "done; results in $RESULTS"
