"""Tiny, real SD1.5- and SDXL-topology pipelines built offline from fixed seeds, for the LRM baseline.

The UNets keep the topologies the official LRM relies on (SD1.5: 3 cross-attention down blocks + 1 plain one;
SDXL: 1 plain + 2 cross-attention down blocks, `text_time` added condition; 2 layers per block), so the official
multi-scale feature indices address the same layers; only the widths are small.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from modeling_lrm import LRMModel

from .models import build_tiny_tokenizers


TEXT_MAX_LENGTH = 16


def tiny_unet_config(kind: str = "sd15") -> dict:
    """The UNet config of a tiny SD1.5- or SDXL-topology UNet (4 latent channels, 8x8 native latents)."""
    common = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 4,
        "attention_head_dim": 2,
    }
    if kind == "sd15":
        return {
            **common,
            "block_out_channels": (8, 16, 16, 32),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 16,
        }
    if kind == "sdxl":
        return {
            **common,
            "block_out_channels": (8, 16, 32),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "cross_attention_dim": 16 + 32,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 6 * 4 + 16,
            "transformer_layers_per_block": (1, 1, 1),
        }
    raise ValueError(f"kind={kind!r}: use 'sd15' or 'sdxl'.")


def _text_config(hidden_size: int, projection_dim: int, tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_MAX_LENGTH,
        vocab_size=len(tokenizer),
        projection_dim=projection_dim,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def save_tiny_sd_pipeline(output_dir: str | PathLike[str], kind: str = "sd15", seed: int = 0) -> str:
    """Writes a tiny `StableDiffusionPipeline` (`kind="sd15"`) or `StableDiffusionXLPipeline` (`"sdxl"`) folder."""
    tokenizer, tokenizer_2, _ = build_tiny_tokenizers(model_max_length=TEXT_MAX_LENGTH)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(kind))
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False
    )
    if kind == "sd15":
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(_text_config(16, 16, tokenizer)),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        pipeline = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(_text_config(16, 16, tokenizer)),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(32, 16, tokenizer_2)),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
        )
    pipeline.save_pretrained(output_dir)
    return str(Path(output_dir))


def get_tiny_lrm(base_dir: str | PathLike[str], kind: str = "sd15", seed: int = 0, **config_kwargs) -> LRMModel:
    """An LRM on a tiny pipeline folder written by `save_tiny_sd_pipeline(base_dir, kind)`, seeded projections."""
    torch.manual_seed(seed)
    config_kwargs.setdefault("projection_dim", 16)
    text_projection = torch.randn(config_kwargs["projection_dim"], 16) * 0.2 if kind == "sd15" else None
    return LRMModel.from_pipeline(base_dir, text_projection_weight=text_projection, **config_kwargs)
