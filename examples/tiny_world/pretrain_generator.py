"""Pretrain the tiny world's text-to-image generator: an SD3 pipeline whose MMDiT learns rectified flow from scratch.

Components: the pretrained tiny VAE; SD3's three text encoders (two CLIP, one T5) at tiny size with offline
tokenizers over the grammar's vocabulary, left FROZEN AT RANDOM INIT (the MMDiT learns to read their
features, which still tell every token and position apart); and a small `SD3Transformer2DModel` trained
with the rectified-flow objective as in diffusers' SD3 training: `t` from a logit-normal density mapped to
the shift-3 `FlowMatchEulerDiscreteScheduler` table, `x_t = (1 - sigma) x0 + sigma * noise`, velocity
target `noise - x0`, and 10% of prompts replaced by the empty prompt for classifier-free guidance.
The result is a `StableDiffusion3Pipeline` folder; samples for held-out prompts are rated by the oracle.

    python examples/tiny_world/pretrain_generator.py --vae_path assets/tiny-world-vae --output_dir assets/tiny-sd3
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from domain import attribute_accuracy, oracle_score, sample_prompts, split_prompts
from PIL import Image
from tiny_world_common import (
    TOKEN_LENGTH,
    encode_latents,
    generate,
    render_many,
    sd3_components,
    set_threads,
)

from dinalrm.hub import drop_local_paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae_path", required=True)
    parser.add_argument("--output_dir", default="outputs/tiny-world/tiny-sd3")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema_decay", type=float, default=0.995)
    parser.add_argument("--renders_per_prompt", type=int, default=6)
    parser.add_argument("--cfg_dropout", type=float, default=0.1)
    parser.add_argument("--eval_prompts", type=int, default=64, help="held-out prompts sampled for the report")
    parser.add_argument("--sample_steps", type=int, default=12)
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--evaluate_only", action="store_true", help="only rate the existing --output_dir pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a contended CPU")
    return parser.parse_args(argv)


@torch.no_grad()
def encode_prompts(pipe: StableDiffusion3Pipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=False,
        max_sequence_length=TOKEN_LENGTH,
    )
    return embeds, pooled


def evaluate_generator(
    pipe: StableDiffusion3Pipeline, prompts: list[str], seed: int, steps: int, guidance_scale: float
) -> dict:
    """Oracle ratings of samples vs. renders of random other prompts (chance) and true renders (ceiling)."""
    samples = generate(pipe, prompts, seed, steps, guidance_scale)
    shuffled = list(np.random.default_rng(seed).permutation(prompts))
    random_renders = render_many(shuffled, seed)
    true_renders = render_many(prompts, seed + 1)

    def rate(images: list) -> dict:
        return {
            "attribute_accuracy": float(np.mean([attribute_accuracy(im, p) for im, p in zip(images, prompts)])),
            "oracle_score": float(np.mean([oracle_score(im, p) for im, p in zip(images, prompts)])),
        }

    beats = np.mean([oracle_score(s, p) > oracle_score(r, p) for s, r, p in zip(samples, random_renders, prompts)])
    return {
        "samples": rate(samples),
        "random_prompt_renders": rate(random_renders),
        "true_renders": rate(true_renders),
        "samples_beat_random_render": float(beats),
        "images": samples,
    }


def train(args: argparse.Namespace) -> float:
    """Train and save the pipeline; returns the seconds taken."""
    start = time.time()
    vae = AutoencoderKL.from_pretrained(args.vae_path).eval()
    pipe = StableDiffusion3Pipeline(**sd3_components(vae=vae, seed=args.seed))
    pipe.set_progress_bar_config(disable=True)
    train_prompts, _ = split_prompts()

    prompt_embeds, pooled = encode_prompts(pipe, train_prompts)
    empty_embeds, empty_pooled = encode_prompts(pipe, [""])
    prompt_index = torch.arange(len(train_prompts)).repeat(args.renders_per_prompt)
    latents = encode_latents(vae, render_many([train_prompts[i] for i in prompt_index], args.seed))
    print(f"bank: {len(latents)} latents of {len(train_prompts)} prompts ({time.time() - start:.0f}s)", flush=True)

    transformer = pipe.transformer
    transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    scheduler = copy.deepcopy(pipe.scheduler)
    table_sigmas, table_timesteps = scheduler.sigmas[:-1], scheduler.timesteps
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        index = torch.randint(0, len(latents), (args.batch_size,), generator=generator)
        x0 = latents[index]
        embeds, pooled_batch = prompt_embeds[prompt_index[index]], pooled[prompt_index[index]]
        drop = torch.rand(args.batch_size, generator=generator) < args.cfg_dropout
        embeds = torch.where(drop[:, None, None], empty_embeds, embeds)
        pooled_batch = torch.where(drop[:, None], empty_pooled, pooled_batch)
        u = compute_density_for_timestep_sampling("logit_normal", args.batch_size, logit_mean=0.0, logit_std=1.0)
        table_index = (u * scheduler.config.num_train_timesteps).long().clamp_max(len(table_timesteps) - 1)
        sigma = table_sigmas[table_index].view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1.0 - sigma) * x0 + sigma * noise
        prediction = transformer(
            hidden_states=noisy,
            timestep=table_timesteps[table_index],
            encoder_hidden_states=embeds,
            pooled_projections=pooled_batch,
            return_dict=False,
        )[0]
        loss = F.mse_loss(prediction, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), transformer.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if step % 200 == 0 or step == args.steps - 1:
            print(f"generator step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    pipe.transformer = ema
    drop_local_paths(pipe)
    pipe.save_pretrained(args.output_dir)
    return time.time() - start


def report(args: argparse.Namespace, train_seconds: float | None) -> dict:
    """Oracle ratings of the saved pipeline's samples for held-out prompts, plus a sample grid PNG."""
    start = time.time()
    _, held_out = split_prompts()
    reloaded = StableDiffusion3Pipeline.from_pretrained(args.output_dir)
    reloaded.set_progress_bar_config(disable=True)
    metrics = evaluate_generator(
        reloaded,
        sample_prompts(held_out, args.eval_prompts, args.seed + 7),
        args.seed + 7,
        args.sample_steps,
        args.guidance_scale,
    )
    images = metrics.pop("images")
    grid = np.concatenate(
        [
            np.concatenate([np.asarray(im) for im in images[r * 8 : r * 8 + 8]], axis=1)
            for r in range(min(4, len(images) // 8))
        ],
        axis=0,
    )
    if grid.size:
        Image.fromarray(grid).save(Path(args.output_dir).with_suffix(".samples.png"))
    metrics.update(
        train_seconds=train_seconds,
        eval_seconds=time.time() - start,
        held_out=True,
        transformer_parameters=sum(p.numel() for p in reloaded.transformer.parameters()),
    )
    Path(args.output_dir).with_suffix(".metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics), flush=True)
    return metrics


def main(args: argparse.Namespace) -> dict:
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    return report(args, None if args.evaluate_only else train(args))


if __name__ == "__main__":
    main(parse_args())
