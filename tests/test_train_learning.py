"""The trainer learns for real: preferences between real photos and their degraded copies.

Pairs come from scikit-image's bundled photographs (`dinalrm.data.photo_pairs`): the chosen image is a clean random crop,
the rejected one the same crop blurred, noised, JPEG-compressed, down-up scaled or colour-shifted. The held-out
photos are never seen in training (neither by the VAE nor by the reward model). The latent space is the tiny
16-channel VAE trained on the same kind of crops (`tests/fixtures/tiny-photo-vae`, made by
`scripts/train_tiny_photo_vae.py`); the reward model sits on a tiny random SD3 transformer. `train_dinalrm.py`
runs as users run it (features precomputed once, EMA, validation on the held-out pairs); everything is seeded and
single-threaded, so the figures below repeat exactly on one machine; another torch build or CPU gives other
figures of the same spread (the run recorded here earlier, elsewhere, gave 0.868 for seed 0; the machine below
gives 0.848), so the bounds come from the spread over seeds, not from one run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from conftest import REPO_ROOT
from diffusers import AutoencoderKL, StableDiffusion3Pipeline

from dinalrm.data import write_canonical_pairs
from dinalrm.data.photo_pairs import DEGRADATIONS, load_photos, make_pairs, split_photos
from dinalrm.testing import get_tiny_sd3_components
from modeling_dinalrm import DiNaLRMModel
from pipeline_dinalrm import DiNaLRMPipeline


pytestmark = pytest.mark.slow  # about 4-5 CPU minutes

VAE_ASSET = REPO_ROOT / "tests" / "fixtures" / "tiny-photo-vae"
IMAGE_SIZE = 64
TRAIN_PAIRS, HELD_OUT_PAIRS = 3000, 250
SCORE_T = 0.4
# Measured with these flags (single thread, this repository's VAE asset), about 4 CPU minutes per run, for the
# training --seed and the pair-draw seed p (training pairs drawn with seed 2p, held-out pairs with 2p + 1; the
# fixture uses p = 0). Final held-out accuracy at t=0.4 (EMA, the trainer's validation), then per degradation
# (50 pairs each) through the exported pipeline. The first 9 runs predate the removal of the training step's no-op
# left/right swap, which changes the forward's batch order and so, through float rounding, the trajectory; the last
# 3 runs are of the current code (seed 0 is what this test runs, deterministically):
#   seed p  final  | blur  colour  downscale  JPEG  noise
#   0    0  0.848  | 0.98  0.54    0.88       0.90  0.76
#   1    0  0.844  | 0.98  0.58    0.90       0.82  0.94
#   2    0  0.804  | 0.96  0.62    0.84       0.78  0.88
#   0    1  0.864  | 0.98  0.64    0.90       0.88  0.98
#   1    1  0.864  | 0.98  0.68    0.96       0.88  0.88
#   2    1  0.856  | 0.96  0.72    0.86       0.80  0.86
#   0    2  0.884  | 1.00  0.72    0.94       0.94  0.82
#   1    2  0.868  | 1.00  0.74    0.90       0.88  0.90
#   2    2  0.880  | 0.96  0.76    0.94       0.92  0.84
#   0    0  0.808  | 0.92  0.60    0.82       0.78  0.78   (current code)
#   1    0  0.872  | 0.98  0.62    0.92       0.88  0.98   (current code)
#   2    0  0.824  | 1.00  0.58    0.88       0.80  0.70   (current code)
# Final: mean 0.851, SD 0.027 over these 12 runs (the binomial SE of 250 pairs is 0.022, so the spread is mostly
# the draw of the held-out pairs and of the training trajectory), minimum 0.804; MIN_ACCURACY sits 3 SD below the
# mean. Per degradation the binomial SE of 50 pairs is 0.02-0.07, and the model's skill on noise and colour shift
# itself varies with the seed (noise 0.70-0.98, colour 0.54-0.76), so only blur, always 0.92-1.00, gets its own bound
# (a 50-pair draw falls below 0.88 with probability 0.004 at 0.96 and 0.2 at the lowest seen, 0.92). The other kinds
# that destroy detail are held together: blur, noise, down-up scaling and JPEG pooled (200 pairs, SE 0.021): mean
# 0.896, SD 0.038 over the 12 runs, minimum 0.825; MIN_DETAIL_ACCURACY sits 3 SD below that mean. Colour shift is
# weakly learnt at this size (mean 0.650) and, like every kind, only has to stay above MIN_ANY_KIND (about 4 SE below
# 0.650): no degradation may be preferred to the clean photo.
# The exported model and the trainer score the same pairs with other noise draws: their overall accuracies differed
# by at most 0.036 (mean 0.013) over the 12 runs, hence the 0.05 tolerance below.
MIN_ACCURACY = 0.77
MIN_BLUR_ACCURACY = 0.88
MIN_DETAIL_ACCURACY = 0.78
MIN_ANY_KIND = 0.40
FLAGS = [
    "--num_backbone_layers",
    "2",
    "--visual_layers",
    "1,2",
    "--text_layers",
    "1,2",
    "--head_width",
    "128",
    "--head_num_heads",
    "4",
    "--lora_rank",
    "0",
    "--resolution",
    str(IMAGE_SIZE),
    "--max_sequence_length",
    "16",
    "--train_batch_size",
    "16",
    "--max_train_steps",
    "500",
    "--learning_rate",
    "2e-3",
    "--lr_scheduler",
    "cosine",
    "--lr_warmup_steps",
    "0",
    "--weighting_scheme",
    "logit_normal",
    "--logit_mean",
    "-1",
    "--use_ema",
    "--ema_decay",
    "0.99",
    "--validation_t",
    "0.2,0.4,0.7",
    "--validation_steps",
    "100",
    "--checkpointing_steps",
    "100000",
    "--seed",
    "0",
    "--precompute_features",
]


@pytest.fixture(scope="module")
def photo_world(tmp_path_factory) -> Path:
    """An SD3 folder whose VAE is the tiny photo VAE, plus training and held-out photo pairs on disk."""
    if not (VAE_ASSET / "config.json").is_file():
        pytest.fail(f"missing test asset {VAE_ASSET}: run scripts/train_tiny_photo_vae.py")
    root = tmp_path_factory.mktemp("photos")
    components = get_tiny_sd3_components(seed=0)
    components["vae"] = AutoencoderKL.from_pretrained(VAE_ASSET)
    StableDiffusion3Pipeline(**components).save_pretrained(root / "sd3")
    photos = load_photos()
    train_names, held_out_names = split_photos([name for name, _ in photos])
    for folder, names, count, seed, split in (
        ("train", train_names, TRAIN_PAIRS, 0, "train"),
        ("held-out", held_out_names, HELD_OUT_PAIRS, 1, "test"),
    ):
        pairs = make_pairs([(n, image) for n, image in photos if n in names], count, size=IMAGE_SIZE, seed=seed)
        rows = [{key: pair[key] for key in ("prompt", "chosen", "rejected", "kind", "photo")} for pair in pairs]
        write_canonical_pairs(root / folder, rows, split)
    return root


def train(photo_world: Path, base: str, *extra: str) -> Path:
    """`train_dinalrm.py` with `FLAGS` on the photo pairs, on the pipeline folder `photo_world / base`."""
    output = photo_world / f"reward-model-{base}"
    command = [
        sys.executable,
        str(REPO_ROOT / "train_dinalrm.py"),
        "--pretrained_model_name_or_path",
        str(photo_world / base),
        "--train_data_dir",
        str(photo_world / "train"),
        "--validation_dataset_name",
        str(photo_world / "held-out"),
        "--output_dir",
        str(output),
        *FLAGS,
        *extra,
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=False)
    assert result.returncode == 0, result.stderr[-6000:]
    return output


@pytest.fixture(scope="module")
def trained(photo_world) -> Path:
    return train(photo_world, "sd3")


@torch.no_grad()
def accuracy_per_kind(photo_world: Path, model_dir: Path, t: float) -> dict[str, float]:
    """Held-out accuracy per degradation of the exported (EMA) model, through the pipeline's encoders."""
    model = DiNaLRMModel.from_pretrained(model_dir).eval()
    sd3 = StableDiffusion3Pipeline.from_pretrained(photo_world / "sd3", transformer=None)
    pipeline = DiNaLRMPipeline.from_sd3(sd3, model)
    rows = datasets.load_dataset(str(photo_world / "held-out"), split="test")
    generator = torch.Generator().manual_seed(1)
    wins: dict[str, list[bool]] = {}
    for start in range(0, len(rows), 50):
        batch = rows[start : start + 50]
        chosen = pipeline.encode_images(batch["chosen"], resolution=(IMAGE_SIZE, IMAGE_SIZE))
        rejected = pipeline.encode_images(batch["rejected"], resolution=(IMAGE_SIZE, IMAGE_SIZE))
        prompt_embeds, pooled = pipeline.encode_prompt(batch["prompt"], max_sequence_length=16)
        noise = torch.randn(chosen.shape, generator=generator)
        rewards = model.score_latents(
            torch.cat([chosen, rejected]),
            prompt_embeds.repeat(2, 1, 1),
            pooled.repeat(2, 1),
            t=t,
            noise=torch.cat([noise, noise]),
        )
        rewards_chosen, rewards_rejected = rewards.chunk(2)
        for kind, win in zip(batch["kind"], (rewards_chosen > rewards_rejected).tolist()):
            wins.setdefault(kind, []).append(win)
    return {kind: sum(v) / len(v) for kind, v in sorted(wins.items())}


def test_reward_model_learns_to_prefer_undegraded_photos(photo_world, trained):
    summary = json.loads((trained / "training_summary.json").read_text())
    curve = [
        (entry["step"], entry[f"val/accuracy_t{SCORE_T:g}"], entry["val/accuracy_ensemble"])
        for entry in summary["validation"]
    ]
    per_kind = accuracy_per_kind(photo_world, trained, SCORE_T)
    print(f"\nheld-out pairwise accuracy (EMA weights) by step: (step, t={SCORE_T}, ensemble) {curve}")
    print(f"held-out accuracy per degradation at t={SCORE_T}: {json.dumps(per_kind)}")

    assert summary["validation"][-1]["val/pairs"] == HELD_OUT_PAIRS
    final = curve[-1][1]
    assert final >= MIN_ACCURACY, f"held-out accuracy {final:.3f} < {MIN_ACCURACY} at t={SCORE_T}; curve {curve}"
    assert final > curve[0][1] or curve[0][1] >= MIN_ACCURACY, "accuracy did not improve with training"
    assert set(per_kind) == set(DEGRADATIONS)
    overall = sum(per_kind.values()) / len(per_kind)  # the kinds are balanced, so this is the pair accuracy
    assert abs(overall - final) < 0.05, "the exported model disagrees with the trainer's validation"
    assert per_kind["blur"] >= MIN_BLUR_ACCURACY, per_kind
    detail = sum(per_kind[kind] for kind in ("blur", "noise", "downscale", "jpeg")) / 4  # 200 pairs, balanced
    assert detail >= MIN_DETAIL_ACCURACY, f"blur/noise/downscale/JPEG pooled {detail:.3f}: {per_kind}"
    assert min(per_kind.values()) > MIN_ANY_KIND, f"a degradation is preferred to the clean photo: {per_kind}"
