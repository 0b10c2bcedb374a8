"""Shared pieces of the tiny-world scripts: configs, tensor conversions, encoding and the generator's sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from domain import IMAGE_SIZE, VOCABULARY, render
from PIL import Image

from dinalrm.alignment import decode_latents  # noqa: F401 (re-exported to the scripts)
from dinalrm.data.photo_pairs import TINY_VAE_CONFIG, images_to_tensor  # noqa: F401 (re-exported to the scripts)


# Run as `python examples/tiny_world/<script>.py`, a script has this folder on sys.path (so `domain` imports) and
# `dinalrm` comes from the installed package (`pip install -e .`).
REPO_ROOT = Path(__file__).resolve().parents[2]

ASSETS = REPO_ROOT / "assets"
TOKEN_LENGTH = 16  # CLIP and T5 prompt length of the tiny world (prompts have 11 words)

#: SD3's VAE layout at toy width: factor 4 (64x64 -> 16x16), 16 latent channels, no quant convs.
VAE_CONFIG: dict = TINY_VAE_CONFIG

#: A small SD3.5-style MMDiT: inner_dim 64, 4 blocks, patch 2, dual attention in block 0, RMS qk-norm.
TRANSFORMER_CONFIG: dict = {
    "sample_size": IMAGE_SIZE // 4,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "caption_projection_dim": 64,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 16,
    "dual_attention_layers": [0],
    "qk_norm": "rms_norm",
}


def report(result: dict, output: str | None) -> None:
    """Print a stage's metrics as JSON and, when `output` is given, write them there too."""
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if output:
        Path(output).write_text(text)


def set_threads(threads: int) -> None:
    torch.set_num_threads(max(1, threads))


def tensor_to_images(tensor: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [-1, 1] -> PIL images."""
    array = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def render_many(prompts: list[str], seed: int) -> list[Image.Image]:
    """One jittered render per prompt, reproducibly."""
    rng = np.random.default_rng(seed)
    return [render(p, rng) for p in prompts]


@torch.no_grad()
def encode_latents(vae, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
    """Scaled SD3 latents `(mode - shift) * scale` of PIL images."""
    out = []
    for i in range(0, len(images), batch_size):
        posterior = vae.encode(images_to_tensor(images[i : i + batch_size])).latent_dist
        out.append((posterior.mode() - vae.config.shift_factor) * vae.config.scaling_factor)
    return torch.cat(out)


def sd3_components(vae=None, seed: int = 0) -> dict:
    """The generator's nine SD3 components: frozen random text encoders over the world's vocabulary, a fresh
    transformer, and `vae` (or a fresh one)."""
    from dinalrm.testing import get_tiny_sd3_components

    components = get_tiny_sd3_components(
        seed=seed,
        transformer_config=dict(TRANSFORMER_CONFIG),
        size="tiny",
        words=VOCABULARY,
        model_max_length=TOKEN_LENGTH,
        vae_config=dict(VAE_CONFIG),
    )
    if vae is not None:
        components["vae"] = vae
    return components


def generate(
    pipe, prompts: list[str], seed: int, steps: int = 12, guidance_scale: float = 4.0, output_type: str = "pil"
):
    """Samples of the tiny SD3 generator, one per prompt, with per-sample generators derived from `seed`."""
    generators = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(prompts))]
    return pipe(
        prompt=prompts,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generators,
        max_sequence_length=TOKEN_LENGTH,
        output_type=output_type,
    ).images
