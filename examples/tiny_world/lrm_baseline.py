"""The LRM baseline in the tiny world: an SD1.5-topology UNet pretrained with DDPM, then an LRM trained on it.

Two stages (the LRM itself is trained in between by the repository's `train_dinalrm.py --reward_model lrm`, see
`regenerate_lrm.sh`):

* `pretrain`: a diffusers `StableDiffusionPipeline` folder whose `UNet2DConditionModel` has SD1.5's topology (three
  cross-attention down blocks and a plain one, two layers each, a cross-attention mid block) at toy width, trained
  from scratch with the DDPM epsilon-prediction objective (SD1.5's scaled-linear schedule, 10% empty prompts) on
  renders of the training prompts. It reuses the tiny world's own VAE (16 latent channels: the UNet is built with
  16 input channels, the topology is unchanged) and its first CLIP text encoder (frozen, as the generator's), so
  LRM and DiNa-LRM read the same latents.
* `evaluate`: held-out pairwise accuracy of the LRM, of DiNa-LRM (`assets/dinalrm-tiny`) and of the pixel
  baseline's metrics on the same held-out pairs, at the official LRM validation timestep (1) and over a noise
  sweep; writes the JSON and the figure.

    python examples/tiny_world/lrm_baseline.py pretrain --output_dir outputs/sd15-tiny
    python examples/tiny_world/lrm_baseline.py evaluate --lrm outputs/lrm-model --pairs outputs/pairs ...
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from domain import IMAGE_SIZE, split_prompts
from tiny_world_common import ASSETS, TOKEN_LENGTH, render_many, report, set_threads
from transformers import CLIPTextModel, CLIPTokenizer


#: SD1.5's UNet topology at toy width, on the tiny world's 16-channel latents (64x64 images -> 16x16).
UNET_CONFIG: dict = {
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": 16,
    "out_channels": 16,
    "layers_per_block": 2,
    "block_out_channels": (16, 32, 32, 32),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
#: SD1.5's DDPM schedule (scaled-linear betas 0.00085 -> 0.012 over 1000 steps).
SCHEDULER_CONFIG: dict = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
SWEEP_TIMESTEPS = [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    pretrain = sub.add_parser("pretrain", help="build and pretrain the SD1.5-topology pipeline")
    pretrain.add_argument("--generator", default=str(ASSETS / "tiny-sd3"), help="tiny world SD3 folder (VAE, CLIP)")
    pretrain.add_argument("--output_dir", required=True)
    pretrain.add_argument("--steps", type=int, default=600)
    pretrain.add_argument("--batch_size", type=int, default=16)
    pretrain.add_argument("--lr", type=float, default=1e-3)
    pretrain.add_argument("--renders_per_prompt", type=int, default=4)
    pretrain.add_argument("--cfg_dropout", type=float, default=0.1)
    pretrain.add_argument("--ema_decay", type=float, default=0.99)
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("--threads", type=int, default=1)
    evaluate = sub.add_parser("evaluate", help="held-out accuracy of LRM, DiNa-LRM and the pixel baseline")
    evaluate.add_argument("--lrm", required=True, help="LRMPipeline folder (train_dinalrm.py --reward_model lrm)")
    evaluate.add_argument("--dinalrm", default=str(ASSETS / "dinalrm-tiny"), help="DiNaLRMPipeline folder")
    evaluate.add_argument("--pairs", required=True, help="folder with test.parquet (canonical pairs)")
    evaluate.add_argument("--pixel_baseline", default=None, help="pixel_baseline.py's metrics JSON")
    evaluate.add_argument("--pretrain_metrics", default=None, help="this script's pretrain metrics JSON")
    evaluate.add_argument("--lrm_training_summary", default=None, help="train_dinalrm.py's training_summary.json")
    evaluate.add_argument("--output", required=True, help="metrics JSON")
    evaluate.add_argument("--figure", default=None, help="accuracy-vs-noise figure (PNG)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------------ pretrain
def build_pipeline(generator_dir: str, seed: int) -> StableDiffusionPipeline:
    """The SD1.5-topology pipeline: a fresh UNet, the tiny world's VAE, first CLIP text encoder and tokenizer."""
    torch.manual_seed(seed)
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(generator_dir, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(generator_dir, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(generator_dir, subfolder="tokenizer"),
        unet=UNet2DConditionModel(**UNET_CONFIG),
        scheduler=DDPMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=TOKEN_LENGTH, truncation=True, return_tensors="pt")
    return pipe.text_encoder(ids.input_ids)[0]


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images, generator: torch.Generator | None = None) -> torch.Tensor:
    """`latent_dist.sample() * scaling_factor` (the SD1.5 convention the LRM reads), 64 images at a time."""
    from dinalrm.data.photo_pairs import images_to_tensor

    out = []
    for i in range(0, len(images), 64):
        posterior = vae.encode(images_to_tensor(images[i : i + 64])).latent_dist
        out.append(posterior.sample(generator) * vae.config.scaling_factor)
    return torch.cat(out)


def pretrain(args: argparse.Namespace) -> dict:
    """DDPM epsilon-prediction training of the UNet on renders of the training prompts (EMA weights saved)."""
    start = time.time()
    pipe = build_pipeline(args.generator, args.seed)
    pipe.vae.requires_grad_(False).eval()
    pipe.text_encoder.requires_grad_(False).eval()
    train_prompts, _ = split_prompts()
    embeds, empty = encode_prompts(pipe, train_prompts), encode_prompts(pipe, [""])
    prompt_index = torch.arange(len(train_prompts)).repeat(args.renders_per_prompt)
    generator = torch.Generator().manual_seed(args.seed)
    latents = encode_images(pipe.vae, render_many([train_prompts[i] for i in prompt_index], args.seed), generator)
    unet, scheduler = pipe.unet.train(), pipe.scheduler
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    losses = []
    for step in range(args.steps):
        index = torch.randint(0, len(latents), (args.batch_size,), generator=generator)
        context = embeds[prompt_index[index]]
        drop = torch.rand(args.batch_size, generator=generator) < args.cfg_dropout
        context = torch.where(drop[:, None, None], empty, context)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        noise = torch.randn(latents[index].shape, generator=generator)
        prediction = unet(scheduler.add_noise(latents[index], noise, timesteps), timesteps, context).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        with torch.no_grad():
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == args.steps - 1:
            print(f"unet step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    pipe.unet = ema
    pipe.save_pretrained(args.output_dir)
    window = max(1, args.steps // 10)
    return {
        "unet_parameters": sum(p.numel() for p in ema.parameters()),
        "latents": len(latents),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "loss_first_10pct": sum(losses[:window]) / window,
        "loss_last_10pct": sum(losses[-window:]) / window,
        "seconds": time.time() - start,
    }


# ------------------------------------------------------------------------------------------------------ evaluate
def noise_fraction(alpha_bar: float) -> float:
    """The rectified-flow level `t` with the same signal-to-noise ratio as DDPM's `alpha_bar`, for one x-axis:
    `(1 - t) / t = sqrt(alpha_bar / (1 - alpha_bar))`."""
    return math.sqrt(1 - alpha_bar) / (math.sqrt(alpha_bar) + math.sqrt(1 - alpha_bar))


@torch.no_grad()
def lrm_accuracy(pipe, prompts, chosen, rejected, timesteps: list[int], seed: int, batch_size: int = 64) -> dict:
    """Accuracy per timestep: each image's VAE posterior sample and one noise per pair shared by its two images
    (the protocol `evaluate_reward.py` uses for DiNa-LRM), drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    chosen_latents = pipe.encode_images(chosen, generator=generator)
    rejected_latents = pipe.encode_images(rejected, generator=generator)
    model = pipe.reward_model
    noise = torch.randn(chosen_latents.shape, generator=generator)
    result = {}
    for timestep in timesteps:
        wins = []
        for i in range(0, len(prompts), batch_size):
            embeds = pipe.encode_prompt(prompts[i : i + batch_size])
            both = torch.cat([chosen_latents[i : i + batch_size], rejected_latents[i : i + batch_size]])
            shared = noise[i : i + batch_size].repeat(2, 1, 1, 1)
            rewards = model.score_latents(both, prompt_embeds=embeds, t=timestep, noise=shared)
            r_chosen, r_rejected = rewards.chunk(2)
            wins.append(r_chosen > r_rejected)
        result[str(timestep)] = float(torch.cat(wins).float().mean())
    return result


def evaluate(args: argparse.Namespace) -> dict:
    from evaluate_reward import evaluate as evaluate_dinalrm
    from evaluate_reward import load_pairs

    from pipeline_dinalrm import DiNaLRMPipeline
    from pipeline_lrm import LRMPipeline

    start = time.time()
    prompts, chosen, rejected = load_pairs(args.pairs, "test")
    lrm = LRMPipeline.from_pretrained(args.lrm)
    lrm.set_progress_bar_config(disable=True)
    sweep = lrm_accuracy(lrm, prompts, chosen, rejected, SWEEP_TIMESTEPS, args.seed)
    alpha_bar = lrm.reward_model.noise_scheduler.alphas_cumprod
    dinalrm = DiNaLRMPipeline.from_pretrained(args.dinalrm)
    dinalrm.set_progress_bar_config(disable=True)
    dinalrm_metrics = evaluate_dinalrm(dinalrm, prompts, chosen, rejected, args.seed)
    result = {
        "pairs": len(prompts),
        "lrm": {
            "accuracy_timestep1": sweep["1"],
            "timestep_sweep": sweep,
            "noise_fraction_of_timestep": {str(t): noise_fraction(float(alpha_bar[t])) for t in SWEEP_TIMESTEPS},
        },
        "dinalrm": dinalrm_metrics,
    }
    for key, path in (
        ("pixel_baseline", args.pixel_baseline),
        ("lrm_pretrain", args.pretrain_metrics),
        ("lrm_training", args.lrm_training_summary),
    ):
        if path:
            result[key] = json.loads(Path(path).read_text())
    result["seconds"] = time.time() - start
    if args.figure:
        plot(result, args.figure)
    return result


def plot(result: dict, path: str) -> None:
    """Held-out accuracy against the noise level (LRM timesteps mapped to the flow level of equal SNR)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    dinalrm_sweep = result["dinalrm"]["noise_sweep"]
    axis.plot([float(t) for t in dinalrm_sweep], [100 * a for a in dinalrm_sweep.values()], "o-", label="DiNa-LRM")
    lrm = result["lrm"]
    levels = [lrm["noise_fraction_of_timestep"][t] for t in lrm["timestep_sweep"]]
    axis.plot(levels, [100 * a for a in lrm["timestep_sweep"].values()], "s-", label="LRM (SD1.5 topology)")
    if "pixel_baseline" in result:
        axis.axhline(100 * result["pixel_baseline"]["accuracy"], color="gray", ls="--", label="pixel CNN")
    axis.set_xlabel("noise level t (LRM: DDPM timestep at equal SNR)")
    axis.set_ylabel(f"held-out pairwise accuracy, % ({result['pairs']} pairs)")
    axis.set_title("Tiny world: latent reward models vs the oracle")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(args: argparse.Namespace) -> dict:
    set_threads(args.threads)
    if args.stage == "pretrain":
        result = pretrain(args)
        report(result, str(Path(args.output_dir) / "pretrain_metrics.json"))
    else:
        result = evaluate(args)
        report(result, args.output)
    return result


if __name__ == "__main__":
    main(parse_args())
