"""Pretrain the tiny world's VAE: a diffusers `AutoencoderKL` (16 latent channels, 64x64 -> 16x16) from scratch.

Stage 1 trains the whole VAE on random 32x32 crops of renders of training prompts (it is convolutional, so it
then works at 64x64). Stage 2 freezes the encoder (the latent space is then fixed) and fine-tunes the decoder
on full renders with foreground pixels weighted up, which fixes the colour drift of the small shapes that
background-dominated crops leave. PSNR is reported on full held-out-prompt renders. `shift_factor` / `scaling_factor` are
set from the measured latent statistics so that scaled latents have zero mean and unit variance.

    python examples/tiny_world/pretrain_vae.py --output_dir assets/tiny-world-vae
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from domain import attribute_accuracy, sample_prompts, split_prompts
from tiny_world_common import (
    VAE_CONFIG,
    images_to_tensor,
    render_many,
    set_threads,
    tensor_to_images,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/tiny-world/vae")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--kl_weight", type=float, default=1e-6)
    parser.add_argument("--decoder_steps", type=int, default=300, help="stage 2: decoder-only fine-tuning steps")
    parser.add_argument("--decoder_batch_size", type=int, default=8)
    parser.add_argument("--foreground_weight", type=float, default=5.0, help="stage 2 loss weight of shape pixels")
    parser.add_argument("--init_from", default=None, help="start from this stage-1 VAE folder (skips stage 1)")
    parser.add_argument("--num_images", type=int, default=1024, help="training renders")
    parser.add_argument("--eval_images", type=int, default=128, help="held-out renders for PSNR")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a contended CPU")
    return parser.parse_args(argv)


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(reconstruction.clamp(-1, 1), reference).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def train_autoencoder(
    vae: AutoencoderKL, train: torch.Tensor, args: argparse.Namespace, start: float
) -> AutoencoderKL:
    """Stage 1: L1 reconstruction + a tiny KL on random crops."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    size = train.shape[-1]
    vae.train()
    for step in range(args.steps):
        index = torch.randint(0, train.shape[0], (args.batch_size,), generator=generator)
        y, x = torch.randint(0, size - args.crop + 1, (2,), generator=generator).tolist()
        batch = train[index, :, y : y + args.crop, x : x + args.crop]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.l1_loss(reconstruction, batch) + args.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"vae step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    return vae


def finetune_decoder(vae: AutoencoderKL, train: torch.Tensor, args: argparse.Namespace, start: float) -> AutoencoderKL:
    """Stage 2: decoder-only, full images, shape pixels weighted `--foreground_weight` times the background."""
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(train[i : i + 128]).latent_dist.mode() for i in range(0, len(train), 128)])
    background = train[:, :, :1, :1]
    weights = 1.0 + (args.foreground_weight - 1.0) * ((train - background).abs().amax(1, keepdim=True) > 0.25).float()
    decoder = [p for name, p in vae.named_parameters() if name.startswith(("decoder.", "post_quant_conv."))]
    optimizer = torch.optim.AdamW(decoder, lr=args.lr / 5, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr / 5, total_steps=max(args.decoder_steps, 1), pct_start=0.1
    )
    generator = torch.Generator().manual_seed(args.seed + 1)
    vae.decoder.train()
    for step in range(args.decoder_steps):
        index = torch.randint(0, train.shape[0], (args.decoder_batch_size,), generator=generator)
        reconstruction = vae.decode(latents[index]).sample
        loss = (weights[index] * (reconstruction - train[index]).abs()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.decoder_steps - 1:
            print(f"decoder step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    return vae.eval()


def main(args: argparse.Namespace) -> dict:
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    train_prompts, held_out = split_prompts()
    train = images_to_tensor(render_many(sample_prompts(train_prompts, args.num_images, args.seed), args.seed))
    test_prompts = sample_prompts(held_out, args.eval_images, args.seed + 1)
    test = images_to_tensor(render_many(test_prompts, args.seed + 1))

    if args.init_from:
        vae = AutoencoderKL.from_pretrained(args.init_from)
    else:
        vae = train_autoencoder(AutoencoderKL(**VAE_CONFIG), train, args, start)
    vae = finetune_decoder(vae, train, args, start)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(train[i : i + 128]).latent_dist.mode() for i in range(0, min(512, len(train)), 128)]
        )
        shift, scale = latents.mean().item(), 1.0 / latents.std().item()
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        reconstruction = vae.decode(vae.encode(test).latent_dist.mode()).sample
    result = {
        "psnr_held_out_db": psnr(test, reconstruction),
        "oracle_attribute_accuracy_of_reconstructions": float(
            np.mean([attribute_accuracy(im, p) for im, p in zip(tensor_to_images(reconstruction), test_prompts)])
        ),
        "shift_factor": shift,
        "scaling_factor": scale,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "seconds": time.time() - start,
    }
    vae.save_pretrained(args.output_dir)
    (Path(args.output_dir) / "metrics.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(parse_args())
