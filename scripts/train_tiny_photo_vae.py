"""Train the tiny SD3-layout VAE used by the learning test (tests/test_train_learning.py).

A randomly initialised VAE reconstructs nothing (~10 dB PSNR) and loses part of the evidence that tells a
clean crop from a degraded one (JPEG artefacts most of all). This script trains a tiny diffusers
`AutoencoderKL` (16 latent channels, downsampling factor 4, no quant convs, as in SD3) on random crops
of the training photos of `dinalrm.data.photo_pairs` -- clean and, with probability `--degrade_prob`,
degraded, so that degraded images are reconstructed faithfully rather than cleaned up.

An L1-only tiny VAE still cleans them up: it cannot reproduce pixel noise exactly, so the loss-optimal
reconstruction is the clean image and the noise barely reaches the latents (latents of a noised crop moved by
13% of their norm; the reward model then told noised from clean crops 74% of the time). Real VAEs keep grain
and texture through perceptual and adversarial losses; here a cheap stand-in, `--texture_weight`, asks the
reconstruction to match the input's local amount of fine detail (`detail_energy`), not its exact pattern.
With it the same noise moves the latents by 71% and the reward model detects it 98% of the time, for 1.5 dB
less PSNR. Training crops are
32x32 by default (the network is convolutional; a step costs a quarter of a 64x64 one) while the final
PSNR is measured on 64x64 crops of the held-out photos, which are used for nothing else.
`shift_factor` and `scaling_factor` are set from the measured latent statistics so that SD3-style
scaled latents `(z - shift_factor) * scaling_factor` have zero mean and unit variance on training crops.

    python scripts/train_tiny_photo_vae.py --threads 1   # ~4 CPU minutes, writes tests/fixtures/tiny-photo-vae
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from dinalrm.data.photo_pairs import (
    DEGRADATIONS,
    TINY_VAE_CONFIG,
    images_to_tensor,
    load_photos,
    split_photos,
    textured_crop,
)


logger = logging.getLogger("train_tiny_photo_vae")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (`argv` defaults to `sys.argv[1:]`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="tests/fixtures/tiny-photo-vae")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=32, help="side of the square training crops")
    parser.add_argument("--eval_resolution", type=int, default=64, help="side of the held-out crops for the PSNR")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2, help="peak AdamW learning rate (warm-up, cosine decay)")
    parser.add_argument("--kl_weight", type=float, default=1e-6, help="KL weight relative to the L1 term")
    parser.add_argument(
        "--texture_weight",
        type=float,
        default=1.0,
        help="weight of the local detail-energy term (see detail_energy); 0 trains on L1 + KL only",
    )
    parser.add_argument("--degrade_prob", type=float, default=0.5, help="fraction of training crops degraded")
    parser.add_argument("--eval_crops", type=int, default=64, help="held-out crops for the final PSNR")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: leave torch's setting)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    return parser.parse_args(argv)


def sample_batch(
    photos: Sequence[tuple[str, Image.Image]],
    size: int,
    batch_size: int,
    degrade_prob: float,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Random textured crops (random flips), a `degrade_prob` share degraded by a random kind."""
    kinds = list(DEGRADATIONS)
    crops = []
    for _ in range(batch_size):
        _, img = photos[int(rng.integers(len(photos)))]
        crop = textured_crop(img, size, rng)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < degrade_prob:
            crop = DEGRADATIONS[kinds[int(rng.integers(len(kinds)))]](crop, rng)
        crops.append(crop)
    return images_to_tensor(crops)


def detail_energy(images: torch.Tensor, window: int = 4) -> torch.Tensor:
    """Local mean of the absolute Laplacian per channel, over `window` x `window` cells: how much fine detail
    (texture, grain, blocking) each part of an image holds, whatever its exact pattern."""
    kernel = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]], dtype=images.dtype)
    kernel = kernel.expand(images.shape[1], 1, 3, 3)
    laplacian = torch.nn.functional.conv2d(images, kernel, padding=1, groups=images.shape[1])
    return torch.nn.functional.avg_pool2d(laplacian.abs(), window)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean PSNR (dB) over images in [-1, 1], computed on the 0-255 scale after clamping."""
    mse = ((reconstruction.clamp(-1, 1) - target) * 127.5).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))).mean())


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """PSNR of decode(posterior mode) against the input, as the reward model's latents are posterior modes."""
    vae.eval()
    return psnr(vae.decode(vae.encode(images).latent_dist.mode()).sample, images)


def train(args: argparse.Namespace) -> tuple[AutoencoderKL, dict]:
    """Train, calibrate shift/scale and measure held-out PSNR; returns the VAE and a summary."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    photos = load_photos()
    train_names, held_out_names = split_photos([n for n, _ in photos])
    train_photos = [(n, img) for n, img in photos if n in train_names]
    held_out_photos = [(n, img) for n, img in photos if n in held_out_names]
    logger.info("training photos: %s; held out: %s", train_names, held_out_names)

    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    n_params = sum(p.numel() for p in vae.parameters())
    logger.info("AutoencoderKL with %d parameters", n_params)
    eval_rng = np.random.default_rng(args.seed + 1)
    eval_images = images_to_tensor(
        [
            textured_crop(held_out_photos[i % len(held_out_photos)][1], args.eval_resolution, eval_rng)
            for i in range(args.eval_crops)
        ]
    )
    psnr_random_init = reconstruction_psnr(vae, eval_images)

    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))
        ),
    )
    start, start_cpu = time.perf_counter(), time.process_time()
    vae.train()
    for step in range(1, args.steps + 1):
        images = sample_batch(train_photos, args.resolution, args.batch_size, args.degrade_prob, rng)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # Both terms per input element, i.e. the LDM recipe's per-image sums up to a common factor.
        l1 = (reconstruction - images).abs().mean()
        kl = posterior.kl().mean() / images[0].numel()
        texture = (detail_energy(reconstruction) - detail_energy(images)).abs().mean()
        loss = l1 + args.kl_weight * kl + args.texture_weight * texture
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps:
            logger.info(
                "step %d/%d  l1 %.4f  kl %.2f  %.0fs",
                step,
                args.steps,
                l1.item(),
                kl.item(),
                time.perf_counter() - start,
            )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu

    # SD3 pipelines feed the transformer (z - shift_factor) * scaling_factor: make that ~N(0, 1) on clean crops.
    vae.eval()
    stats_rng = np.random.default_rng(args.seed + 2)
    with torch.no_grad():
        latents = torch.cat(
            [
                vae.encode(sample_batch(train_photos, args.resolution, 32, 0.0, stats_rng)).latent_dist.mode()
                for _ in range(8)
            ]
        )
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(scale, 4))

    psnr_trained = reconstruction_psnr(vae, eval_images)
    logger.info(
        "held-out PSNR: trained %.2f dB, random init %.2f dB; training took %.0fs (%.0f CPU s)",
        psnr_trained,
        psnr_random_init,
        seconds,
        cpu_seconds,
    )
    return vae, {
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "seed": args.seed,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "degrade_prob": args.degrade_prob,
        "kl_weight": args.kl_weight,
        "texture_weight": args.texture_weight,
        "parameters": n_params,
        "train_photos": train_names,
        "held_out_photos": held_out_names,
        "held_out_crops": f"{args.eval_crops} crops of {args.eval_resolution}x{args.eval_resolution}",
        "held_out_psnr_db": round(psnr_trained, 2),
        "random_init_psnr_db": round(psnr_random_init, 2),
        "shift_factor": round(shift, 4),
        "scaling_factor": round(scale, 4),
    }


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, refuse to clobber an existing asset, train, save config + safetensors + summary."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        raise SystemExit(f"{output_dir} exists and is not empty; pass --overwrite to replace it")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    vae, summary = train(args)
    command = ["python", "scripts/train_tiny_photo_vae.py", *(sys.argv[1:] if argv is None else argv)]
    summary = {"command": shlex.join(command), **summary}
    output_dir.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(output_dir, safe_serialization=True)
    (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("saved to %s", output_dir)


if __name__ == "__main__":
    main()
