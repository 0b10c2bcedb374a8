# Copyright 2026 The dinalrm authors. Licensed under the Apache License, Version 2.0.
"""DiNa-LRM: a diffusion-native latent reward model (arXiv 2602.11146).

The reward of a (noisy) VAE latent is read from the first blocks of a pretrained SD3 MMDiT and pooled into
one number by a small timestep-aware query head. This file is self-contained: it is the Hub's remote code
(`reward_model/modeling_dinalrm.py`) and must not import anything from the rest of the dinalrm repository.
"""

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed, get_2d_sincos_pos_embed
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging


logger = logging.get_logger(__name__)

SD35_MEDIUM_ID = "stabilityai/stable-diffusion-3.5-medium"

# diffusers' SD3Transformer2DModel config for stabilityai/stable-diffusion-3.5-medium (transformer/config.json).
SD35_MEDIUM_TRANSFORMER_CONFIG = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}

# Projection names that receive LoRA inside the backbone (peft matches them as name suffixes).
DEFAULT_LORA_TARGET_MODULES = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]
# diffusers' FluxTransformer2DModel config for black-forest-labs/FLUX.1-dev (transformer/config.json).
FLUX1_DEV_ID = "black-forest-labs/FLUX.1-dev"
FLUX1_DEV_TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
# diffusers' ZImageTransformer2DModel config for Tongyi-MAI/Z-Image-Turbo (transformer/config.json).
ZIMAGE_TURBO_ID = "Tongyi-MAI/Z-Image-Turbo"
ZIMAGE_TURBO_TRANSFORMER_CONFIG = {
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}
LOSS_TYPES = ("thurstone", "bradley_terry", "bradley_terry_margin", "fixed_variance")


def add_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    r"""Noises clean latents to level `sigma` on the rectified-flow path: `(1 - sigma) * latents + sigma * noise`.

    The one place where the objective's forward process is written: [`DiNaLRMModel.score_latents`] and the
    training step both noise latents through it.

    Args:
        latents (`torch.Tensor` of shape `(B, C, H, W)`): clean scaled latents `x0`.
        noise (`torch.Tensor` of shape `(B, C, H, W)`): the Gaussian noise `eps`.
        sigmas (`torch.Tensor` of shape `(B,)`): the (snapped) noise level of each sample, broadcast over C, H, W.

    Returns:
        `torch.Tensor` of the shape and dtype of `latents`: the noisy latents `x_t`.
    """
    sigmas = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - sigmas) * latents + sigmas * noise


def _join_levels(tokens: torch.Tensor, num_levels: int) -> torch.Tensor:
    """`(levels x B, N, W)` tokens of level-stacked samples as `(B, levels x N, W)`: each sample's levels joined along
    the token axis, in level order (the ensemble's token-level fusion)."""
    if num_levels == 1:
        return tokens
    return tokens.unflatten(0, (num_levels, -1)).transpose(0, 1).flatten(1, 2)


def _cat_padded_tokens(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`(B_i, N_i, W)` token batches concatenated along the batch, zero-padded to the longest `N_i` (Z-Image passes of
    captions of different lengths: the head masks the padding)."""
    length = max(t.shape[1] for t in tensors)
    return torch.cat([t if t.shape[1] == length else F.pad(t, (0, 0, 0, length - t.shape[1])) for t in tensors])


def _checks_values(check_finite: bool | None, tensor: torch.Tensor) -> bool:
    """Whether to look at `tensor`'s values: `check_finite` if given, else only for a CPU tensor outside compilation.

    Reading values back (`bool(tensor.all())`) waits for the device, which stalls every call on an accelerator, and
    is a data-dependent branch that breaks `torch.compile` graphs; on the CPU and in eager mode it costs nothing.
    """
    if check_finite is not None:
        return check_finite
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def _require_finite(tensor: torch.Tensor, message: str) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(message)


class DiNaLRMConfig(PretrainedConfig):
    r"""Configuration of a [`DiNaLRMModel`].

    Args:
        backbone (`str`, defaults to `"sd3"`): the backbone family, a key of [`FEATURE_EXTRACTORS`]: `"sd3"`
            (`SD3Transformer2DModel`), `"flux"` (`FluxTransformer2DModel`) or `"zimage"`
            (`ZImageTransformer2DModel`). Configs saved before families existed load as `"sd3"`.
        backbone_config (`dict`, *optional*):
            The diffusers transformer config of the backbone, kept inline so the model builds offline. Defaults to
            the family's reference model (SD3.5-Medium, FLUX.1-dev, Z-Image-Turbo).
        num_backbone_layers (`int`, defaults to 12): how many leading transformer blocks are kept and run (FLUX:
            double-stream blocks; Z-Image: main layers, after its noise and context refiners, which always run).
        visual_layers / text_layers (`list[int]`): 1-based block indices whose image / text stream outputs feed
            the head (0 = the embeddings before any block). Strictly increasing, at most `num_backbone_layers`.
        head_width (`int`, *optional*): head width `W`; `None` uses the backbone width.
        head_num_queries, head_num_heads, head_dropout, head_use_proj_in: query head hyper-parameters.
        loss_type (`str`): `"thurstone"` (noise-calibrated, default), `"bradley_terry"`, `"bradley_terry_margin"`
            (the reference's `bt-margin`: `-log sigmoid(r_c - r_r - bt_margin)`) or `"fixed_variance"`.
        thurstone_k, thurstone_v0, thurstone_eps: `var(t) = k * t**2 + v0`; `eps` stabilises both square roots.
            The defaults (2.0, 0.05, 1e-6) are the official code's; the paper states v0 = 0.01.
        fixed_variance (`float`): the comparison variance of the `"fixed_variance"` ablation (the reference's
            `thurstone-constant` uses 0.5).
        bt_margin (`float`): the margin of `"bradley_terry_margin"` (the reference's 1.0).
        use_logistic (`bool`): squash rewards as the reference's `use_logistic` does,
            `4 * sigmoid((r - logistic_eta3) / (|logistic_eta4| + 1e-6)) - 2`, a reward in (-2, 2).
        add_noise (`bool`): noise clean latents before scoring (default). `False` is the reference's
            `training.add_noise: false`: clean latents are read at the level's timestep.
        default_t (`float`): the noise level used to score clean latents. ensemble_t (`list[float]`): the levels
            of the multi-level ensemble.
        snap_t (`bool`): snap noise levels to the scheduler's table (as the reference does); the table is
            `FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift)`.
        guidance_scale (`float`, defaults to 3.5): the guidance input of guidance-distilled FLUX backbones
            (`guidance_embeds`; FLUX.1-dev's pipeline default); unused by other backbones.
        lora_rank / lora_alpha / lora_target_modules: LoRA on the backbone (rank 0 = none). Target names are
            suffixes of module paths inside the backbone, or full paths; the default is the family's attention
            projections.
        max_backbone_batch_size (`int`, *optional*): split backbone passes into chunks of at most this many samples.
        max_sequence_length (`int`): T5 prompt length used in training.
        base_model_name_or_path (`str`, *optional*): where the backbone weights came from (provenance); defaults to
            the family's reference model. A local path is kept as its folder name only, so a saved config carries
            no path of the machine that wrote it.
        calibration (`dict`, *optional*): a logistic calibration of reward differences to human preference, fitted
            by `eval/calibrate.py`: `P(a preferred) = sigmoid(slope * (r_a - r_b))` at the noise level(s) `t` it
            was fitted at, and `reference_reward` (the median reward of the fitting images) for calibrated scores
            `sigmoid(slope * (r - reference_reward))`; also what it was fitted on and its calibration errors.
        reward_statistics (`list[dict]`, *optional*): the reward distribution on a reference prompt/image set, one
            entry per noise setting (`t`: its level(s); `mean`, `std`, `quantiles`, `n`, what it was measured on),
            written by `eval/reward_stats.py`; `normalize="zscore"` returns `(r - mean) / std` from it.
    """

    model_type = "dinalrm"

    def __init__(
        self,
        backbone: str = "sd3",
        backbone_config: dict | None = None,
        num_backbone_layers: int = 12,
        visual_layers: Sequence[int] = (4, 8, 12),
        text_layers: Sequence[int] = (4, 8, 12),
        head_width: int | None = None,
        head_num_queries: int = 4,
        head_num_heads: int = 8,
        head_dropout: float = 0.0,
        head_use_proj_in: bool = False,
        loss_type: str = "thurstone",
        thurstone_k: float = 2.0,
        thurstone_v0: float = 0.05,
        thurstone_eps: float = 1e-6,
        fixed_variance: float = 0.5,
        bt_margin: float = 1.0,
        use_logistic: bool = False,
        logistic_eta3: float = 0.0,
        logistic_eta4: float = 0.15,
        add_noise: bool = True,
        default_t: float = 0.4,
        ensemble_t: Sequence[float] = (0.2, 0.5, 0.7),
        snap_t: bool = True,
        num_train_timesteps: int = 1000,
        scheduler_shift: float = 3.0,
        guidance_scale: float = 3.5,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] | None = None,
        max_backbone_batch_size: int | None = None,
        max_sequence_length: int = 128,
        base_model_name_or_path: str | None = None,
        calibration: dict | None = None,
        reward_statistics: list[dict] | None = None,
        **kwargs,
    ):
        if backbone not in FEATURE_EXTRACTORS:
            raise ValueError(
                f"backbone={backbone!r} is not one of the supported families {sorted(FEATURE_EXTRACTORS)}."
            )
        extractor = FEATURE_EXTRACTORS[backbone]
        self.backbone = backbone
        self.backbone_config = dict(backbone_config if backbone_config is not None else extractor.default_config)
        self.num_backbone_layers = num_backbone_layers
        self.visual_layers = list(visual_layers)
        self.text_layers = list(text_layers)
        self.head_width = head_width
        self.head_num_queries = head_num_queries
        self.head_num_heads = head_num_heads
        self.head_dropout = head_dropout
        self.head_use_proj_in = head_use_proj_in
        self.loss_type = loss_type
        self.thurstone_k = thurstone_k
        self.thurstone_v0 = thurstone_v0
        self.thurstone_eps = thurstone_eps
        self.fixed_variance = fixed_variance
        self.bt_margin = bt_margin
        self.use_logistic = use_logistic
        self.logistic_eta3 = logistic_eta3
        self.logistic_eta4 = logistic_eta4
        self.add_noise = add_noise
        self.default_t = default_t
        self.ensemble_t = list(ensemble_t)
        self.snap_t = snap_t
        self.num_train_timesteps = num_train_timesteps
        self.scheduler_shift = scheduler_shift
        self.guidance_scale = guidance_scale
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else 2 * lora_rank
        self.lora_target_modules = list(lora_target_modules or extractor.lora_targets)
        self.max_backbone_batch_size = max_backbone_batch_size
        self.max_sequence_length = max_sequence_length
        self.base_model_name_or_path = provenance_name(base_model_name_or_path) or extractor.default_model_id
        self.calibration = dict(calibration) if calibration else None
        self.reward_statistics = [dict(entry) for entry in reward_statistics] if reward_statistics else None
        super().__init__(**kwargs)
        self.validate_layers()

    @property
    def feature_extractor_class(self) -> type["DiNaLRMFeatureExtractor"]:
        return FEATURE_EXTRACTORS[self.backbone]

    @property
    def backbone_width(self) -> int:
        """Width of the image- and text-stream hidden states the head reads."""
        return self.feature_extractor_class.hidden_width(self.backbone_config)

    @property
    def latent_patch_size(self) -> int:
        """Latent sides must be multiples of this (SD3, Z-Image: the patch size; FLUX: 2, its packing)."""
        return self.feature_extractor_class.latent_patch_size(self.backbone_config)

    @property
    def conditioning_width(self) -> int:
        """Width of the backbone's conditioning vector that drives the head's FiLM modulation."""
        return self.feature_extractor_class.conditioning_width(self.backbone_config)

    @property
    def width(self) -> int:
        return self.head_width if self.head_width not in (None, -1) else self.backbone_width

    def validate_layers(self) -> None:
        """Refuse layer choices the backbone cannot provide, with a message naming the fix."""
        total_blocks = self.feature_extractor_class.num_blocks(self.backbone_config)
        n = self.num_backbone_layers
        if not 1 <= n <= total_blocks:
            raise ValueError(f"num_backbone_layers={n} must be between 1 and the backbone's {total_blocks} blocks.")
        if not self.visual_layers:
            raise ValueError("visual_layers must name at least one block.")
        for name, layers in (("visual_layers", self.visual_layers), ("text_layers", self.text_layers)):
            if any(b <= a for a, b in zip(layers, layers[1:])):
                raise ValueError(f"{name}={layers} must be strictly increasing.")
            if layers and (layers[0] < 0 or layers[-1] > n):
                raise ValueError(
                    f"{name}={layers} must lie in [0, num_backbone_layers={n}]: only the first {n} blocks are run."
                )
        self.feature_extractor_class.validate_config(self)
        # Each layer adapter outputs `width // 4` channels (floored, as the reference does).
        if self.width % self.head_num_heads or self.width < 4:
            raise ValueError(
                f"head width {self.width} must be at least 4 and divisible by head_num_heads={self.head_num_heads}."
            )
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not one of {LOSS_TYPES}.")


@dataclass
class DiNaLRMOutput(ModelOutput):
    """Output of [`DiNaLRMModel`].

    Args:
        rewards (`torch.FloatTensor` of shape `(batch_size,)`): raw rewards (higher = preferred).
        sigmas (`torch.FloatTensor` of shape `(batch_size,)`): the noise level actually used per sample (snapped).
        timesteps (`torch.FloatTensor` of shape `(batch_size,)`): the timestep given to the backbone.
    """

    rewards: torch.FloatTensor | None = None
    sigmas: torch.FloatTensor | None = None
    timesteps: torch.FloatTensor | None = None


class DiNaLRMFeatureExtractor(nn.Module):
    """The first `N` blocks of a diffusion transformer, read as features for the reward head.

    One subclass per backbone family. Each keeps the module names of its diffusers class, so the checkpoint's keys
    load as they are and only the kept blocks' tensors are read (see [`DiNaLRMModel.from_backbone`]). For
    `(noisy latents, timestep, prompt conditioning)` it returns the conditioning vector that drives the head's FiLM
    modulation and the image- and text-stream hidden states after the blocks named by `visual_layers` /
    `text_layers` (0 = the embeddings before any block).

    Class attributes:
        family (`str`): the key in [`FEATURE_EXTRACTORS`] and `DiNaLRMConfig.backbone`.
        transformer_class (`str`): the diffusers class whose checkpoints it reads.
        default_model_id (`str`) / default_config (`dict`): the family's reference model and its config.
        blocks_attribute (`str`): the module list holding the blocks counted by `num_backbone_layers`.
        lora_targets (`tuple[str]`): default LoRA target suffixes; text_only_lora_targets: those of them that only
            feed the text stream's output (left out on the last kept block when no text layer reads it).
        has_pooled_projection (`bool`): whether the family takes a pooled prompt embedding.
        takes_caption_lists (`bool`): whether prompt embeddings may come as a list of per-prompt tensors of different
            lengths (masked inside, as the family's own transformer does).
        context_embedder_attribute (`str`): the module that embeds the prompt tokens into the text stream.
    """

    family: str
    transformer_class: str
    default_model_id: str
    default_config: dict
    blocks_attribute: str
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    text_only_lora_targets: tuple[str, ...] = ()
    has_pooled_projection: bool = True
    takes_caption_lists: bool = False
    context_embedder_attribute: str = "context_embedder"

    def __init__(self, config: DiNaLRMConfig):
        super().__init__()
        self.context_width = config.backbone_width
        self.visual_layers = config.visual_layers
        self.text_layers = config.text_layers
        self.gradient_checkpointing = False

    @staticmethod
    def num_blocks(backbone_config: dict) -> int:
        """How many blocks the full backbone has in `blocks_attribute`."""
        return backbone_config["num_layers"]

    @staticmethod
    def hidden_width(backbone_config: dict) -> int:
        return backbone_config["num_attention_heads"] * backbone_config["attention_head_dim"]

    @staticmethod
    def latent_patch_size(backbone_config: dict) -> int:
        """Latent sides must be multiples of this: the latent pixels that make one token's side."""
        return backbone_config["patch_size"]

    @classmethod
    def conditioning_width(cls, backbone_config: dict) -> int:
        return cls.hidden_width(backbone_config)

    @classmethod
    def validate_config(cls, config: DiNaLRMConfig) -> None:
        """Refuses family-specific layer choices or backbone configs the extractor cannot serve."""

    def timestep(self, sigmas: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The backbone's timestep input for noise levels `sigmas`; `timesteps` are their SD3 timesteps (`1000 *
        sigma`, read from the scheduler table when snapping)."""
        raise NotImplementedError

    def check_inputs(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        context_embedded: bool = False,
    ) -> None:
        """Raises a clear error for latent or prompt shapes this backbone cannot take."""
        raise NotImplementedError

    def embed_context(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """The text stream's input: the context embedder's output for `prompt_embeds` (backbone width). It depends
        on neither the latents nor the noise level, so a frozen context embedder's output can be computed once."""
        return getattr(self, self.context_embedder_attribute)(prompt_embeds)

    def _check_latent_channels(self, latents: torch.Tensor, channels: int, what: str) -> None:
        if latents.shape[0] == 0 or 0 in latents.shape[-2:]:
            raise ValueError(f"latents of shape {tuple(latents.shape)} hold no sample or no pixel: pass at least one.")
        if latents.shape[1] != channels:
            raise ValueError(
                f"latents have {latents.shape[1]} channels but the backbone takes {channels}: pass VAE latents "
                f"(scaled as {what} pipelines do), not images."
            )

    def _check_prompt(self, prompt_embeds: torch.Tensor, dim: int, context_embedded: bool = False) -> None:
        if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
            raise ValueError(
                f"prompt_embeds must be a 3D tensor (batch, tokens, dim), got {_describe(prompt_embeds)}."
            )
        if context_embedded and prompt_embeds.shape[-1] != self.context_width:
            raise ValueError(
                f"prompt_embeds have dim {prompt_embeds.shape[-1]}, but context_embedded=True expects the context "
                f"embedder's output (dim {self.context_width}): pass `embed_context(prompt_embeds)`, or the text "
                "encoders' embeddings with context_embedded=False."
            )
        if not context_embedded and prompt_embeds.shape[-1] != dim:
            raise ValueError(f"prompt_embeds have dim {prompt_embeds.shape[-1]}, the backbone expects {dim}.")
        if prompt_embeds.shape[1] == 0:
            raise ValueError(
                "prompt_embeds hold 0 tokens: encode the prompt with the pipeline's encode_prompt (an empty prompt "
                "still has its special tokens)."
            )

    def _check_pooled(self, pooled: torch.Tensor | None, dim: int) -> None:
        if not isinstance(pooled, torch.Tensor) or pooled.ndim != 2:
            raise ValueError(f"pooled_prompt_embeds must be a 2D tensor, got {_describe(pooled)}.")
        if pooled.shape[-1] != dim:
            raise ValueError(f"pooled_prompt_embeds have dim {pooled.shape[-1]}, the backbone expects {dim}.")

    def _block(self, block: nn.Module, *args) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Runs one block, through gradient checkpointing when it is enabled and gradients are on."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def _dual_stream_features(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, *block_args
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Runs the kept dual-stream blocks (`(text, image) = block(image, text, *block_args)`, as SD3's and FLUX's)
        on the embedded streams and returns the image and text hidden states of the selected layers, in order."""
        visual = [hidden_states] if 0 in self.visual_layers else []
        text = [encoder_hidden_states] if 0 in self.text_layers else []
        for index, block in enumerate(self.transformer_blocks, start=1):
            encoder_hidden_states, hidden_states = self._block(
                block, hidden_states, encoder_hidden_states, *block_args
            )
            if index in self.visual_layers:
                visual.append(hidden_states)
            if index in self.text_layers:
                text.append(encoder_hidden_states)
        return visual, text


class SD3FeatureExtractor(DiNaLRMFeatureExtractor):
    """The first `N` blocks of an SD3 MMDiT (`SD3Transformer2DModel`).

    Every kept block is built as it is inside the full model: with a text output, except the backbone's last block,
    which is context-pre-only (kept only when `num_backbone_layers` is the backbone's full depth). Noise convention:
    the timestep is `1000 * sigma`, read from the scheduler's table when snapping.
    """

    family = "sd3"
    transformer_class = "SD3Transformer2DModel"
    default_model_id = SD35_MEDIUM_ID
    default_config = SD35_MEDIUM_TRANSFORMER_CONFIG
    blocks_attribute = "transformer_blocks"
    lora_targets = tuple(DEFAULT_LORA_TARGET_MODULES)
    text_only_lora_targets = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    def __init__(self, config: DiNaLRMConfig):
        super().__init__(config)
        bc = config.backbone_config
        width = config.backbone_width
        self.patch_size = bc["patch_size"]
        self.max_size = bc["pos_embed_max_size"] * bc["patch_size"]
        self.in_channels = bc["in_channels"]
        self.joint_attention_dim = bc["joint_attention_dim"]
        self.pooled_projection_dim = bc["pooled_projection_dim"]
        self.pos_embed = PatchEmbed(
            height=bc["sample_size"],
            width=bc["sample_size"],
            patch_size=bc["patch_size"],
            in_channels=bc["in_channels"],
            embed_dim=width,
            pos_embed_max_size=bc["pos_embed_max_size"],
        )
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            embedding_dim=width, pooled_projection_dim=bc["pooled_projection_dim"]
        )
        self.context_embedder = nn.Linear(bc["joint_attention_dim"], bc["caption_projection_dim"])
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(
                dim=width,
                num_attention_heads=bc["num_attention_heads"],
                attention_head_dim=bc["attention_head_dim"],
                context_pre_only=i == bc["num_layers"] - 1,
                qk_norm=bc.get("qk_norm"),
                use_dual_attention=i in (bc.get("dual_attention_layers") or ()),
            )
            for i in range(config.num_backbone_layers)
        )

    @classmethod
    def validate_config(cls, config: DiNaLRMConfig) -> None:
        total_blocks = config.backbone_config["num_layers"]
        if config.text_layers and config.text_layers[-1] == total_blocks:
            raise ValueError(
                f"text_layers={config.text_layers} asks for the text stream after block {total_blocks}, the "
                "backbone's last block, which is context-pre-only and has no text output. Drop that index."
            )
        if config.backbone_config["caption_projection_dim"] != config.backbone_width:
            raise ValueError(
                "backbone_config: caption_projection_dim must equal num_attention_heads * attention_head_dim."
            )

    def timestep(self, sigmas: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps

    def check_inputs(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        context_embedded: bool = False,
    ) -> None:
        self._check_latent_channels(latents, self.in_channels, "SD3")
        height, width = latents.shape[-2:]
        patch = self.patch_size
        if height % patch or width % patch:
            raise ValueError(f"latent size {height}x{width} must be divisible by the patch size {patch}.")
        if height > self.max_size or width > self.max_size:
            raise ValueError(
                f"latent size {height}x{width} exceeds the backbone's maximum of {self.max_size}x{self.max_size}."
            )
        self._check_prompt(prompt_embeds, self.joint_attention_dim, context_embedded)
        self._check_pooled(pooled, self.pooled_projection_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        context_embedded: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Returns `(temb, visual_features, text_features)`; features are listed in layer order. With
        `context_embedded`, `encoder_hidden_states` is already `embed_context`'s output."""
        hidden_states = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep, pooled_projections)
        if not context_embedded:
            encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        return temb, *self._dual_stream_features(hidden_states, encoder_hidden_states, temb)


class FluxFeatureExtractor(DiNaLRMFeatureExtractor):
    """The first `N` double-stream blocks of FLUX (`FluxTransformer2DModel`); the single-stream blocks are never
    built.

    Latents come in as the FLUX VAE's scaled `(B, 16, H, W)` latents; the 2x2 packing into `(B, H*W/4, 64)` tokens
    and the text/image position ids are made here as `FluxPipeline` makes them. Noise convention: the timestep
    input is `sigma` (the model multiplies it by 1000), plus `config.guidance_scale` for guidance-distilled models.
    """

    family = "flux"
    transformer_class = "FluxTransformer2DModel"
    default_model_id = FLUX1_DEV_ID
    default_config = FLUX1_DEV_TRANSFORMER_CONFIG
    blocks_attribute = "transformer_blocks"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    # The text queries, keys and values also feed the image stream through joint attention; only `to_add_out`
    # writes nothing but the text stream.
    text_only_lora_targets = ("to_add_out",)

    def __init__(self, config: DiNaLRMConfig):
        from diffusers.models.embeddings import (
            CombinedTimestepGuidanceTextProjEmbeddings,
            CombinedTimestepTextProjEmbeddings,
        )
        from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxTransformerBlock

        super().__init__(config)
        bc = config.backbone_config
        width = config.backbone_width
        self.in_channels = bc["in_channels"] // 4
        self.joint_attention_dim = bc["joint_attention_dim"]
        self.pooled_projection_dim = bc["pooled_projection_dim"]
        self.guidance_scale = config.guidance_scale if bc.get("guidance_embeds") else None
        self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=bc["axes_dims_rope"])
        embeddings = (
            CombinedTimestepGuidanceTextProjEmbeddings
            if bc.get("guidance_embeds")
            else CombinedTimestepTextProjEmbeddings
        )
        self.time_text_embed = embeddings(embedding_dim=width, pooled_projection_dim=bc["pooled_projection_dim"])
        self.context_embedder = nn.Linear(bc["joint_attention_dim"], width)
        self.x_embedder = nn.Linear(bc["in_channels"], width)
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(
                dim=width, num_attention_heads=bc["num_attention_heads"], attention_head_dim=bc["attention_head_dim"]
            )
            for _ in range(config.num_backbone_layers)
        )

    @classmethod
    def validate_config(cls, config: DiNaLRMConfig) -> None:
        if config.backbone_config.get("patch_size", 1) != 1 or config.backbone_config["in_channels"] % 4:
            raise ValueError(
                "backbone_config: only FLUX transformers on 2x2-packed latents are supported (patch_size 1, "
                "in_channels = 4 * the VAE's latent channels)."
            )

    @staticmethod
    def latent_patch_size(backbone_config: dict) -> int:
        return 2

    def timestep(self, sigmas: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return sigmas

    def check_inputs(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        context_embedded: bool = False,
    ) -> None:
        self._check_latent_channels(latents, self.in_channels, "FLUX")
        height, width = latents.shape[-2:]
        if height % 2 or width % 2:
            raise ValueError(
                f"latent size {height}x{width} must be even: FLUX packs 2x2 latent patches into one token."
            )
        self._check_prompt(prompt_embeds, self.joint_attention_dim, context_embedded)
        self._check_pooled(pooled, self.pooled_projection_dim)

    def forward(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        context_embedded: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Returns `(temb, visual_features, text_features)` for `(B, C, H, W)` latents and `timestep = sigma`; with
        `context_embedded`, `encoder_hidden_states` is already `embed_context`'s output."""
        batch, channels, height, width = latents.shape
        hidden_states = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        hidden_states = hidden_states.reshape(batch, (height // 2) * (width // 2), channels * 4)
        img_ids = torch.zeros(height // 2, width // 2, 3, device=latents.device)
        img_ids[..., 1] = torch.arange(height // 2, device=latents.device)[:, None]
        img_ids[..., 2] = torch.arange(width // 2, device=latents.device)[None, :]
        img_ids = img_ids.reshape(-1, 3).to(latents.dtype)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=latents.device, dtype=latents.dtype)
        image_rotary_emb = self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

        hidden_states = self.x_embedder(hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        if self.guidance_scale is None:
            temb = self.time_text_embed(timestep, pooled_projections)
        else:
            guidance = torch.full_like(timestep, self.guidance_scale) * 1000
            temb = self.time_text_embed(timestep, guidance, pooled_projections)
        if not context_embedded:
            encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        return temb, *self._dual_stream_features(hidden_states, encoder_hidden_states, temb, image_rotary_emb)


# Z-Image pads the image and caption token sequences to a multiple of this (diffusers' `SEQ_MULTI_OF`).
_ZIMAGE_SEQ_MULTIPLE = 32
# Width of Z-Image's timestep embedding (diffusers' `ADALN_EMBED_DIM`).
_ZIMAGE_ADALN_WIDTH = 256


class ZImageFeatureExtractor(DiNaLRMFeatureExtractor):
    """The first `N` main layers of Z-Image (`ZImageTransformer2DModel`), a single-stream DiT.

    The noise refiner (image tokens) and context refiner (caption tokens) always run and do NOT count toward `N`:
    they are the embedding stage that builds the unified `[image, caption]` sequence the main layers read (as
    SD3's patch embedding and context embedder are), so layer 0 is that sequence and "16 layers" means the first
    16 of the 30 main layers. The image features are the image tokens of the sequence, the text features its
    caption tokens (padding excluded). The conditioning vector is the timestep embedding (256 wide), Z-Image has no
    pooled prompt embedding. Noise convention: the timestep input is `1 - sigma` (the model scales it by
    `t_scale`), as `ZImagePipeline` passes it.
    """

    family = "zimage"
    transformer_class = "ZImageTransformer2DModel"
    default_model_id = ZIMAGE_TURBO_ID
    default_config = ZIMAGE_TURBO_TRANSFORMER_CONFIG
    blocks_attribute = "layers"
    has_pooled_projection = False
    takes_caption_lists = True
    context_embedder_attribute = "cap_embedder"

    def __init__(self, config: DiNaLRMConfig):
        from diffusers.models.normalization import RMSNorm
        from diffusers.models.transformers.transformer_z_image import (
            RopeEmbedder,
            TimestepEmbedder,
            ZImageTransformerBlock,
        )

        super().__init__(config)
        bc = config.backbone_config
        dim, heads, kv_heads, eps, qk_norm = bc["dim"], bc["n_heads"], bc["n_kv_heads"], bc["norm_eps"], bc["qk_norm"]
        self.patch_size = bc["all_patch_size"][0]
        self.in_channels = bc["in_channels"]
        self.cap_feat_dim = bc["cap_feat_dim"]
        self.t_scale = bc["t_scale"]
        self.all_x_embedder = nn.ModuleDict(
            {f"{self.patch_size}-1": nn.Linear(self.patch_size * self.patch_size * self.in_channels, dim)}
        )
        self.noise_refiner = nn.ModuleList(
            ZImageTransformerBlock(1000 + i, dim, heads, kv_heads, eps, qk_norm, modulation=True)
            for i in range(bc["n_refiner_layers"])
        )
        self.context_refiner = nn.ModuleList(
            ZImageTransformerBlock(i, dim, heads, kv_heads, eps, qk_norm, modulation=False)
            for i in range(bc["n_refiner_layers"])
        )
        self.t_embedder = TimestepEmbedder(min(dim, _ZIMAGE_ADALN_WIDTH), mid_size=1024)
        self.cap_embedder = nn.Sequential(RMSNorm(self.cap_feat_dim, eps=eps), nn.Linear(self.cap_feat_dim, dim))
        self.x_pad_token = nn.Parameter(torch.zeros((1, dim)))
        self.cap_pad_token = nn.Parameter(torch.zeros((1, dim)))
        self.layers = nn.ModuleList(
            ZImageTransformerBlock(i, dim, heads, kv_heads, eps, qk_norm) for i in range(config.num_backbone_layers)
        )
        self.rope_embedder = RopeEmbedder(theta=bc["rope_theta"], axes_dims=bc["axes_dims"], axes_lens=bc["axes_lens"])

    @staticmethod
    def num_blocks(backbone_config: dict) -> int:
        return backbone_config["n_layers"]

    @staticmethod
    def hidden_width(backbone_config: dict) -> int:
        return backbone_config["dim"]

    @staticmethod
    def latent_patch_size(backbone_config: dict) -> int:
        return backbone_config["all_patch_size"][0]

    @classmethod
    def conditioning_width(cls, backbone_config: dict) -> int:
        return min(backbone_config["dim"], _ZIMAGE_ADALN_WIDTH)

    @classmethod
    def validate_config(cls, config: DiNaLRMConfig) -> None:
        if (
            list(config.backbone_config["all_f_patch_size"]) != [1]
            or len(config.backbone_config["all_patch_size"]) != 1
        ):
            raise ValueError(
                "backbone_config: only single-frame Z-Image transformers with one patch size are supported."
            )

    def timestep(self, sigmas: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return 1.0 - sigmas

    def check_inputs(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        context_embedded: bool = False,
    ) -> None:
        self._check_latent_channels(latents, self.in_channels, "Z-Image")
        height, width = latents.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"latent size {height}x{width} must be divisible by the patch size {self.patch_size}.")
        # Rotary positions index tables of `axes_lens` entries: captions on the first axis, image rows and columns.
        frames, max_rows, max_cols = self.rope_embedder.axes_lens
        if height // self.patch_size > max_rows or width // self.patch_size > max_cols:
            raise ValueError(
                f"latent size {height}x{width} exceeds the backbone's maximum of {max_rows * self.patch_size}x"
                f"{max_cols * self.patch_size} (axes_lens {list(self.rope_embedder.axes_lens)}): downscale the image."
            )
        self._check_prompt(prompt_embeds, self.cap_feat_dim, context_embedded)
        tokens = prompt_embeds.shape[1] + -prompt_embeds.shape[1] % _ZIMAGE_SEQ_MULTIPLE
        if tokens + 1 >= frames:
            raise ValueError(
                f"prompt_embeds hold {prompt_embeds.shape[1]} tokens; the backbone takes at most {frames - 2} once "
                f"padded to a multiple of {_ZIMAGE_SEQ_MULTIPLE} (axes_lens[0] = {frames}): shorten the prompt."
            )
        if pooled is not None:
            raise ValueError("Z-Image has no pooled prompt embedding: pass pooled_prompt_embeds=None.")

    def _positions(self, grid: tuple[int, int, int], start: int, pad: int, device: torch.device) -> torch.Tensor:
        """Position ids of a `(frames, rows, cols)` grid whose first axis starts at `start`, then `pad` zero ids."""
        axes = [torch.arange(s, s + n, dtype=torch.int32, device=device) for s, n in zip((start, 0, 0), grid)]
        ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flatten(0, 2)
        return torch.cat([ids, ids.new_zeros(pad, 3)])

    def forward(
        self,
        latents: torch.Tensor,
        cap_feats: torch.Tensor,
        pooled_projections: None,
        timestep: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
        context_embedded: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Returns `(adaln_input, visual_features, text_features)` for `(B, C, H, W)` latents, `timestep = 1 - sigma`;
        with `context_embedded`, `cap_feats` is already `embed_context`'s output.

        Tokens, position ids and attention masks are laid out as `ZImageTransformer2DModel.forward` lays them out
        for equal-sized images: each caption is padded to a multiple of 32 with the pad token, the image positions
        start after its own caption, and captions of different lengths (`prompt_mask`, `(B, tokens)`, True on real
        tokens) are padded to the batch's longest and masked, so a sample's features do not depend on its batch. The
        text features span the longest caption; their padding is for the head to mask.
        """
        batch, channels, height, width = latents.shape
        patch, device = self.patch_size, latents.device
        rows, cols = height // patch, width // patch
        image_len = rows * cols
        image_pad = -image_len % _ZIMAGE_SEQ_MULTIPLE
        if prompt_mask is None:
            cap_lens = [cap_feats.shape[1]] * batch
        else:
            cap_lens = prompt_mask.sum(dim=1).tolist()
        cap_totals = [n + -n % _ZIMAGE_SEQ_MULTIPLE for n in cap_lens]
        cap_width = max(cap_totals)
        adaln_input = self.t_embedder(timestep * self.t_scale).type_as(latents)

        x = latents.view(batch, channels, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1)
        x = self.all_x_embedder[f"{patch}-1"](x.reshape(batch, image_len, patch * patch * channels))
        x = torch.cat([x, self.x_pad_token.expand(batch, image_pad, -1)], dim=1)
        cap = cap_feats if context_embedded else self.cap_embedder(cap_feats)
        columns = torch.arange(cap_width, device=device)
        cap_lens_t = torch.tensor(cap_lens, device=device)[:, None]
        inner_pad = ((columns >= cap_lens_t) & (columns < torch.tensor(cap_totals, device=device)[:, None]))[..., None]
        cap = F.pad(cap, (0, 0, 0, cap_width - cap.shape[1]))
        cap = torch.where(inner_pad, self.cap_pad_token, cap)
        cap_freqs = self.rope_embedder(self._positions((cap_width, 1, 1), 1, 0, device)).expand(batch, -1, -1)
        x_freqs = torch.stack(
            [
                self.rope_embedder(self._positions((1, rows, cols), total + 1, image_pad, device))
                for total in cap_totals
            ]
        )
        cap_mask = unified_mask = None
        if len(set(cap_totals)) > 1:
            cap_mask = columns < torch.tensor(cap_totals, device=device)[:, None]
            unified_mask = torch.cat([cap_mask.new_ones(batch, image_len + image_pad), cap_mask], dim=1)

        for layer in self.noise_refiner:
            x = self._block(layer, x, None, x_freqs, adaln_input)
        for layer in self.context_refiner:
            cap = self._block(layer, cap, cap_mask, cap_freqs)
        unified = torch.cat([x, cap], dim=1)
        freqs = torch.cat([x_freqs, cap_freqs], dim=1)
        image_tokens = slice(0, image_len)
        cap_tokens = slice(image_len + image_pad, image_len + image_pad + max(cap_lens))
        visual = [unified[:, image_tokens]] if 0 in self.visual_layers else []
        text = [unified[:, cap_tokens]] if 0 in self.text_layers else []
        for index, layer in enumerate(self.layers, start=1):
            unified = self._block(layer, unified, unified_mask, freqs, adaln_input)
            if index in self.visual_layers:
                visual.append(unified[:, image_tokens])
            if index in self.text_layers:
                text.append(unified[:, cap_tokens])
        return adaln_input, visual, text


# The backbone families by `DiNaLRMConfig.backbone`.
FEATURE_EXTRACTORS: dict[str, type[DiNaLRMFeatureExtractor]] = {
    extractor.family: extractor for extractor in (SD3FeatureExtractor, FluxFeatureExtractor, ZImageFeatureExtractor)
}


class FiLMLayerAdapter(nn.Module):
    """Projects one backbone layer to `W/4` channels after a timestep-conditioned affine modulation (FiLM)."""

    def __init__(self, in_dim: int, cond_dim: int, width: int, use_proj_in: bool):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, width) if use_proj_in or in_dim != width else nn.Identity()
        self.layer_embed = nn.Parameter(torch.zeros(1, 1, width))
        self.cond_mlp = nn.Sequential(nn.Linear(cond_dim, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width))
        self.cond_mlp[-1]._dinalrm_zero_init = True
        self.proj = nn.Linear(width, width // 4)

    def forward(self, features: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.cond_mlp(temb).unsqueeze(1).chunk(2, dim=-1)
        modulated = self.proj_in(features) * (1 + gamma) + beta
        return self.proj(modulated + self.layer_embed)


class GatedCrossAttention(nn.Module):
    """Pre-normed cross-attention of the query tokens over image tokens and, optionally, text tokens.

    With gating, every context token's value is scaled by a learned scalar in (0, 1) so the head can ignore
    uninformative tokens. The image and text results are summed and added to the queries.
    """

    def __init__(self, width: int, num_heads: int, with_text: bool, with_gates: bool, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.RMSNorm(width)
        self.norm_v = nn.RMSNorm(width)
        self.to_q = nn.Linear(width, width)
        self.to_k_vis = nn.Linear(width, width)
        self.to_v_vis = nn.Linear(width, width)
        if with_text:
            self.norm_t = nn.RMSNorm(width)
            self.to_k_text = nn.Linear(width, width)
            self.to_v_text = nn.Linear(width, width)
        self.to_out = nn.Sequential(nn.Linear(width, width), nn.Dropout(dropout))
        self.gate_vis = self._make_gate(width) if with_gates else None
        self.gate_text = self._make_gate(width) if with_gates and with_text else None

    @staticmethod
    def _make_gate(width: int) -> nn.Sequential:
        gate = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
        gate[-1]._dinalrm_zero_init = True
        return gate

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        mask = None if mask is None else mask[:, None, None, :]
        return F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask).transpose(1, 2).flatten(2)

    def _branch(self, q, context, to_k, to_v, gate, mask: torch.Tensor | None = None) -> torch.Tensor:
        values = to_v(context)
        if gate is not None:
            values = values * torch.sigmoid(gate(context))
        return self._attend(q, to_k(context), values, mask)

    def forward(
        self,
        queries: torch.Tensor,
        visual: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`text_mask` (`(B, text tokens)`, True on real tokens) keeps padded caption tokens out of the attention."""
        q = self.to_q(self.norm_q(queries))
        attended = self._branch(q, self.norm_v(visual), self.to_k_vis, self.to_v_vis, self.gate_vis)
        if text is not None:
            attended = attended + self._branch(
                q, self.norm_t(text), self.to_k_text, self.to_v_text, self.gate_text, text_mask
            )
        return queries + self.to_out(attended)


class DiNaLRMHead(nn.Module):
    """FiLM layer adapters, layer fusion and the query head that turns backbone features into one reward.

    Parameter names follow the official `rm_head.pt` layout, so official head weights load without renaming.
    """

    def __init__(self, config: DiNaLRMConfig):
        super().__init__()
        width, in_dim, cond_dim = config.width, config.backbone_width, config.conditioning_width
        self.layer_adapters_visual = nn.ModuleList(
            FiLMLayerAdapter(in_dim, cond_dim, width, config.head_use_proj_in) for _ in config.visual_layers
        )
        self.layer_adapters_text = nn.ModuleList(
            FiLMLayerAdapter(in_dim, cond_dim, width, config.head_use_proj_in) for _ in config.text_layers
        )
        self.agg_visual = nn.Linear(len(config.visual_layers) * (width // 4), width)
        self.agg_text = nn.Linear(len(config.text_layers) * (width // 4), width) if config.text_layers else None
        self.query_tokens = nn.Parameter(torch.zeros(1, config.head_num_queries, width))
        heads, dropout = config.head_num_heads, config.head_dropout
        self.attn1 = GatedCrossAttention(
            width, heads, with_text=bool(config.text_layers), with_gates=True, dropout=dropout
        )
        self.attn2 = GatedCrossAttention(width, heads, with_text=False, with_gates=False, dropout=dropout)
        self.norm_ff = nn.RMSNorm(width)
        self.ff = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )
        self.head = nn.Linear(width, 1)

    def fuse(
        self, visual: list[torch.Tensor], text: list[torch.Tensor], temb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Modulates each layer with `temb` and fuses the layers of each stream into `W`-wide tokens."""
        fused_visual = self.agg_visual(torch.cat([a(f, temb) for a, f in zip(self.layer_adapters_visual, visual)], -1))
        if self.agg_text is None:
            return fused_visual, None
        fused_text = self.agg_text(torch.cat([a(f, temb) for a, f in zip(self.layer_adapters_text, text)], -1))
        return fused_visual, fused_text

    def pool(
        self, visual: torch.Tensor, text: torch.Tensor | None, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pools fused tokens into one reward per sample through the learned queries (`text_mask`: True on the
        text tokens to read, for captions padded to one length)."""
        queries = self.query_tokens.expand(visual.shape[0], -1, -1)
        queries = self.attn1(queries, visual, text, text_mask)
        queries = self.attn2(queries, visual)
        queries = queries + self.ff(self.norm_ff(queries))
        return self.head(queries).mean(dim=1).squeeze(-1)


class DiNaLRMPreTrainedModel(PreTrainedModel):
    config_class = DiNaLRMConfig
    base_model_prefix = "dinalrm"
    supports_gradient_checkpointing = True
    _no_split_modules = ["JointTransformerBlock", "FluxTransformerBlock", "ZImageTransformerBlock", "DiNaLRMHead"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Random init for a fresh model; the backbone is meant to be overwritten by pretrained weights."""
        if isinstance(module, nn.Linear):
            if getattr(module, "_dinalrm_zero_init", False):
                init.zeros_(module.weight)
            else:
                init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "RMSNorm" in type(module).__name__:
            if getattr(module, "weight", None) is not None:
                init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, FiLMLayerAdapter):
            init.normal_(module.layer_embed, std=0.02)
        elif isinstance(module, DiNaLRMHead):
            init.normal_(module.query_tokens, std=0.02)
        elif isinstance(module, PatchEmbed) and module.pos_embed is not None:
            table = get_2d_sincos_pos_embed(
                module.pos_embed.shape[-1],
                module.pos_embed_max_size or module.height,
                base_size=module.base_size,
                interpolation_scale=module.interpolation_scale,
                output_type="pt",
            )
            init.copy_(module.pos_embed, table.float().unsqueeze(0))


class DiNaLRMModel(DiNaLRMPreTrainedModel):
    """DiNa-LRM reward model: a truncated diffusion backbone (optionally with LoRA) + timestep-aware query head.

    The backbone is the family's [`DiNaLRMFeatureExtractor`] (`config.backbone`: SD3, FLUX or Z-Image).

    `forward` scores latents that are already noisy; `score_latents` noises clean latents itself (one level or
    the multi-level ensemble). `preference_probability` / `preference_loss` implement the training objective.
    """

    def __init__(self, config: DiNaLRMConfig):
        super().__init__(config)
        self.backbone = config.feature_extractor_class(config)
        self.reward_head = DiNaLRMHead(config)
        with torch.device("cpu"):
            scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=config.num_train_timesteps, shift=config.scheduler_shift
            )
        # The noise-level table is derived from the config, so it is kept out of the state dict.
        self._sigma_table = scheduler.sigmas[: config.num_train_timesteps].to(torch.float32)
        self._timestep_table = scheduler.timesteps[: config.num_train_timesteps].to(torch.float32)
        self.post_init()
        if config.lora_rank:
            self._inject_lora()

    # ----------------------------------------------------------------------------------------------- LoRA
    def _inject_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        lora_config = LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            target_modules=self.config.lora_target_modules,
            init_lora_weights="gaussian",
            lora_dropout=0.0,
        )
        inject_adapter_in_model(lora_config, self.backbone, adapter_name="default")
        self._freeze_lora_base()

    def _freeze_lora_base(self) -> None:
        """As with any LoRA fine-tuning, only the adapter (and the head) train; the pretrained blocks stay frozen."""
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(".lora_" in name)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args, base_model: str | None = None, **kwargs
    ):
        r"""`PreTrainedModel.from_pretrained`, and official DiNa-LRM checkpoints by Hub id or folder.

        A repository or folder in the reference's layout (`config.json` with a `model` section, `checkpoint/`) is
        converted in memory on the first blocks of `base_model`'s transformer (see [`load_official_checkpoint`];
        cached on disk, so only the first load converts).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a DiNa-LRM model folder or Hub id, or an
                official checkpoint such as `"liuhuohuo/DiNa-LRM-SD35M-12layers"`.
            base_model (`str`, *optional*): for official checkpoints, the SD3 pipeline (Hub id or folder) whose
                transformer provides the backbone; defaults to `"stabilityai/stable-diffusion-3.5-medium"`.
        """
        if not args and not kwargs.get("subfolder") and _is_official(pretrained_model_name_or_path, kwargs):
            return load_official_checkpoint(
                pretrained_model_name_or_path,
                base_model or SD35_MEDIUM_ID,
                torch_dtype=kwargs.get("torch_dtype") or kwargs.get("dtype"),
                revision=kwargs.get("revision"),
                token=kwargs.get("token"),
                cache_dir=kwargs.get("cache_dir"),
            )
        if base_model is not None:
            raise ValueError(
                f"base_model is for official DiNa-LRM checkpoints; {pretrained_model_name_or_path} is a converted "
                "model that already holds its backbone blocks. Drop base_model."
            )
        require_local_folder(pretrained_model_name_or_path, "DiNa-LRM model")
        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if os.path.isdir(pretrained_model_name_or_path) and not os.path.isfile(os.path.join(folder, "config.json")):
            # transformers would build the full-size default model here and only then fail on the weights.
            raise FileNotFoundError(
                f"{os.path.join(folder, 'config.json')} is missing: {folder} is not a saved DiNa-LRM model "
                "(save one with save_pretrained, or pass the folder that holds config.json and model.safetensors)."
            )
        from safetensors import SafetensorError

        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            damaged = ", ".join(_damaged_weights_files(folder)) or f"a *.safetensors file of {folder}"
            raise OSError(
                f"{damaged} is truncated or damaged ({error}): save the DiNa-LRM model again, or download it again."
            ) from None
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.config.lora_rank:
            # Loading re-creates the parameters, which forgets the freezing done in `__init__`.
            model._freeze_lora_base()
        return loaded

    def add_lora(
        self, rank: int = 64, alpha: float | None = None, target_modules: Sequence[str] | None = None
    ) -> None:
        """Adds a fresh LoRA adapter (B = 0, so the rewards are unchanged) to the backbone only, never the head."""
        if self.config.lora_rank:
            raise ValueError("The backbone already has a LoRA adapter; merge it first with `merge_lora()`.")
        self.config.lora_rank = rank
        self.config.lora_alpha = alpha if alpha is not None else 2 * rank
        self.config.lora_target_modules = list(target_modules or self.default_lora_targets())
        self._inject_lora()

    def default_lora_targets(self) -> list[str]:
        """Where the reference puts LoRA: every attention projection of the kept blocks, except the last block's
        text-only projections (SD3: `add_q/k/v_proj`, `to_add_out`, as the reference; FLUX: `to_add_out`) when no
        text layer reads that block's output."""
        extractor = type(self.backbone)
        targets = extractor.lora_targets
        if not extractor.text_only_lora_targets or (
            self.config.text_layers and self.config.text_layers[-1] == self.config.num_backbone_layers
        ):
            return list(targets)
        last = f"{extractor.blocks_attribute}.{self.config.num_backbone_layers - 1}.attn."
        excluded = {last + name for name in extractor.text_only_lora_targets}
        suffixes = tuple("." + name for name in targets)
        return sorted(
            name
            for name, _ in self.backbone.named_modules()
            if name.endswith(suffixes)
            and name not in excluded
            and isinstance(self.backbone.get_submodule(name), nn.Linear)
        )

    def lora_layers(self) -> dict[str, nn.Module]:
        """Backbone modules carrying LoRA, by their path inside the backbone."""
        return {
            name: m for name, m in self.backbone.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
        }

    def _merged_backbone_weights(self) -> dict[str, torch.Tensor]:
        merged = {}
        for name, layer in self.lora_layers().items():
            merged[f"backbone.{name}.weight"] = layer.base_layer.weight + layer.get_delta_weight("default")
        return merged

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Folds the LoRA adapter into the backbone weights and removes it (rewards unchanged)."""
        merged = self._merged_backbone_weights()
        for name, layer in self.lora_layers().items():
            base = layer.base_layer
            base.weight.copy_(merged[f"backbone.{name}.weight"])
            parent_name, _, child = name.rpartition(".")
            setattr(self.backbone.get_submodule(parent_name), child, base)
        self.config.lora_rank = 0

    def save_pretrained(self, save_directory: str | os.PathLike, merge_lora: bool = True, **kwargs) -> None:
        """Saves a self-contained folder; with `merge_lora` (default) the adapter is folded into the weights."""
        if not (merge_lora and self.config.lora_rank):
            return super().save_pretrained(save_directory, **kwargs)
        with torch.no_grad():
            merged = self._merged_backbone_weights()
        state_dict = {}
        for key, value in self.state_dict().items():
            if ".lora_A." in key or ".lora_B." in key:
                continue
            plain = key.replace(".base_layer.", ".")
            state_dict[plain] = merged.get(plain, value)
        lora_settings = (self.config.lora_rank, self.config.lora_alpha)
        self.config.lora_rank = 0
        try:
            super().save_pretrained(save_directory, state_dict=state_dict, **kwargs)
        finally:
            self.config.lora_rank, self.config.lora_alpha = lora_settings

    # ---------------------------------------------------------------------------------- noise levels
    def snap_noise_level(
        self,
        t: float | torch.Tensor,
        batch_size: int,
        device: torch.device | None = None,
        check_finite: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Maps noise fractions `t` in [0, 1] to `(sigmas, timesteps)` of shape `(batch_size,)`.

        With `config.snap_t` (default, as the reference), `t` snaps to the nearest entry of the scheduler's
        sigma table (first index on ties) and the backbone gets that entry's timestep.

        Args:
            t (`float` or `torch.Tensor` of shape `()` or `(batch_size,)`): the noise fraction(s).
            batch_size (`int`): how many samples the level is for.
            device (`torch.device`, *optional*): where the results go; defaults to `t`'s device.
            check_finite (`bool`, *optional*): whether to refuse a tensor `t` with values outside [0, 1] (NaN
                included). `None` checks CPU tensors only (outside `torch.compile`): on an accelerator the check
                would wait for the device. A Python number is always checked, in Python.
        """
        if isinstance(t, (int, float)):
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"t is the noise fraction and must lie in [0, 1]; got {t!r}.")
        else:
            t = torch.as_tensor(t, dtype=torch.float32)
            if _checks_values(check_finite, t) and not ((t >= 0) & (t <= 1)).all():
                raise ValueError(f"t is the noise fraction and must lie in [0, 1]; got {t.tolist()}.")
        t = torch.as_tensor(t, dtype=torch.float32, device=device)
        if t.ndim == 0:
            t = t.expand(batch_size)
        if t.shape != (batch_size,):
            raise ValueError(f"t must be a float or a tensor of shape ({batch_size},), got shape {tuple(t.shape)}.")
        if not self.config.snap_t:
            return t, t * self.config.num_train_timesteps
        sigma_table = self._sigma_table.to(t.device)
        index = torch.argmin((sigma_table[None, :] - t[:, None]).abs(), dim=1)
        return sigma_table[index], self._timestep_table.to(t.device)[index]

    # ----------------------------------------------------------------------------------- validation
    def check_inputs(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor | None,
        check_finite: bool | None = None,
        context_embedded: bool = False,
    ) -> None:
        r"""Raises a clear error for latents or prompt embeddings the backbone cannot take.

        Args:
            latents (`torch.Tensor`): `(B, C, H, W)` latents (clean or noisy).
            prompt_embeds (`torch.Tensor`): `(B, tokens, dim)` prompt embeddings of the family's text encoder(s).
            pooled_prompt_embeds (`torch.Tensor`, *optional*): `(B, pooled_projection_dim)` pooled prompt embeddings;
                required for SD3 and FLUX, `None` for Z-Image.
            check_finite (`bool`, *optional*): whether to refuse NaN or infinite values (which give NaN rewards).
                `None` checks the tensors that are on the CPU (outside `torch.compile`), where it costs nothing;
                `True` checks always, which waits for an accelerator; `False` never checks.
            context_embedded (`bool`, defaults to `False`): whether `prompt_embeds` is already [`~DiNaLRMModel.embed_context`]'s
                output.
        """
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            raise ValueError(
                f"latents must be a 4D tensor (batch, channels, height, width), got {_describe(latents)}."
            )
        for name, value in (
            ("latents", latents),
            ("prompt_embeds", prompt_embeds),
            ("pooled_prompt_embeds", pooled_prompt_embeds),
        ):
            if isinstance(value, torch.Tensor) and not value.is_floating_point():
                raise TypeError(
                    f"{name} must be floating-point, got {value.dtype}: pass float32, bfloat16 or float16."
                )
        self.backbone.check_inputs(latents, prompt_embeds, pooled_prompt_embeds, context_embedded)
        batch = latents.shape[0]
        if prompt_embeds.shape[0] != batch or (
            pooled_prompt_embeds is not None and len(pooled_prompt_embeds) != batch
        ):
            pooled = "" if pooled_prompt_embeds is None else f" and {len(pooled_prompt_embeds)} pooled_prompt_embeds"
            raise ValueError(
                f"batch mismatch: {batch} latents but {prompt_embeds.shape[0]} prompt_embeds{pooled}; give one "
                "prompt embedding per latent."
            )
        if _checks_values(check_finite, latents):
            _require_finite(
                latents,
                "latents contain NaN or infinite values: pass finite VAE latents (an SD3 VAE run in float16 can "
                "overflow; encode in float32 or bfloat16).",
            )
        if _checks_values(check_finite, prompt_embeds):
            _require_finite(
                prompt_embeds,
                "prompt_embeds contain NaN or infinite values: re-encode the prompt (a T5 encoder run in float16 can "
                "overflow; run it in bfloat16 or float32).",
            )
        if pooled_prompt_embeds is not None and _checks_values(check_finite, pooled_prompt_embeds):
            _require_finite(
                pooled_prompt_embeds,
                "pooled_prompt_embeds contain NaN or infinite values: re-encode the prompt with the CLIP text "
                "encoders in bfloat16 or float32.",
            )

    def _batch_prompts(
        self, prompt_embeds: torch.Tensor | Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(prompt_embeds, prompt_mask)`: a list of `(tokens_i, dim)` caption features (Z-Image, as
        `ZImagePipeline.encode_prompt` returns them) zero-padded to the longest, with the mask of real tokens (`None`
        when all have one length); a tensor passes through unmasked."""
        if not isinstance(prompt_embeds, (list, tuple)):
            return prompt_embeds, None
        if not self.backbone.takes_caption_lists:
            raise ValueError(
                f"prompt_embeds as a list of per-prompt tensors is taken by Z-Image backbones only; the "
                f"{self.config.backbone} backbone takes one (batch, tokens, dim) tensor."
            )
        if not prompt_embeds or any(
            not isinstance(e, torch.Tensor) or e.ndim != 2 or not len(e) for e in prompt_embeds
        ):
            raise ValueError(
                "prompt_embeds as a list must hold one non-empty (tokens, dim) tensor per sample, as "
                f"ZImagePipeline.encode_prompt returns them; got {[_describe(e) for e in prompt_embeds]}."
            )
        lengths = [len(e) for e in prompt_embeds]
        padded = torch.nn.utils.rnn.pad_sequence(list(prompt_embeds), batch_first=True)
        if len(set(lengths)) == 1:
            return padded, None
        mask = (
            torch.arange(padded.shape[1], device=padded.device) < torch.tensor(lengths, device=padded.device)[:, None]
        )
        return padded, mask

    def compile_repeated_blocks(self, **compile_kwargs) -> None:
        """Compiles each kept backbone block in place with `torch.compile` (regional compilation, as diffusers'
        `ModelMixin.compile_repeated_blocks`): blocks of one class reuse one compiled graph, so compiling takes a
        fraction of whole-model compilation; state-dict keys and rewards are unchanged. `compile_kwargs` go to
        `torch.compile`."""
        for block in getattr(self.backbone, self.backbone.blocks_attribute):
            block.compile(**compile_kwargs)

    # -------------------------------------------------------------------------------------- scoring
    def embed_context(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        r"""The backbone's context embedder applied to prompt embeddings: the text stream's input, of backbone width.

        It depends on neither the latents nor the noise level, so when the context embedder is frozen its output can
        be computed once (e.g. stored in a feature cache: 1536 instead of 4096 values per token for SD3.5-Medium) and
        passed to [`~DiNaLRMModel.forward`] with `context_embedded=True`.

        Args:
            prompt_embeds (`torch.Tensor` of shape `(B, tokens, dim)`, or `list[torch.Tensor]`): the family's prompt
                embeddings (Z-Image: one `(tokens_i, dim)` tensor per prompt, embedded one by one).
        """
        if isinstance(prompt_embeds, (list, tuple)):  # Z-Image captions of their own lengths stay a list
            return [self.backbone.embed_context(embeds[None].to(self.dtype))[0] for embeds in prompt_embeds]
        return self.backbone.embed_context(prompt_embeds.to(self.dtype))

    def _backbone_passes(
        self, noisy, sigmas, timesteps, prompt_embeds, pooled, prompt_mask=None, context_embedded: bool = False
    ):
        """Backbone features of `noisy`, which stacks the ensemble's levels of one batch (`prompt_embeds` has one row
        per sample of a level; `pooled`, `prompt_mask` and the noise levels one row per latent).

        The text is embedded once, before any pass (it does not depend on `t` until the first block), then the
        backbone runs one pass per level, split further into chunks of `config.max_backbone_batch_size`. Stacking
        the levels into one pass is not cheaper once a level's batch fills the hardware, and on the CPU it is slower
        (larger activations fall out of cache): `benchmarks/bench_floor.py` measures the ensemble against three
        single-level passes.
        """
        dtype = self.dtype
        batch = prompt_embeds.shape[0]
        context = prompt_embeds.to(dtype)
        if not context_embedded:
            context = self.backbone.embed_context(context)
        chunk = min(self.config.max_backbone_batch_size or batch, batch)
        parts = []
        for level_start in range(0, noisy.shape[0], batch):
            for offset in range(0, batch, chunk):
                rows = slice(level_start + offset, level_start + min(offset + chunk, batch))
                parts.append(
                    self.backbone(
                        noisy[rows].to(dtype),
                        context[offset : offset + chunk],
                        None if pooled is None else pooled[rows].to(dtype),
                        self.backbone.timestep(sigmas[rows], timesteps[rows]),
                        *(() if prompt_mask is None else (prompt_mask[rows],)),
                        context_embedded=True,
                    )
                )
        if len(parts) == 1:
            return parts[0]
        temb = torch.cat([p[0] for p in parts])
        visual = [torch.cat(layer) for layer in zip(*(p[1] for p in parts))]
        text = [_cat_padded_tokens(layer) for layer in zip(*(p[2] for p in parts))]
        return temb, visual, text

    def _reward_over_levels(
        self,
        noisy,
        sigmas,
        timesteps,
        prompt_embeds,
        pooled,
        num_levels: int,
        prompt_mask=None,
        context_embedded: bool = False,
    ) -> torch.Tensor:
        """Rewards of `num_levels` stacked copies of a batch: the levels' features fused together, their tokens
        joined per sample.

        `prompt_mask` (`(B * num_levels, tokens)`) marks the real caption tokens of prompts padded to one length.
        """
        temb, visual, text = self._backbone_passes(
            noisy, sigmas, timesteps, prompt_embeds, pooled, prompt_mask, context_embedded
        )
        fused_visual, fused_text = self.reward_head.fuse(visual, text, temb)
        fused_visual = _join_levels(fused_visual, num_levels)
        fused_text = None if fused_text is None else _join_levels(fused_text, num_levels)
        text_mask = None
        if prompt_mask is not None and fused_text is not None:
            text_mask = _join_levels(prompt_mask[:, : text[0].shape[1]], num_levels)
        rewards = self.reward_head.pool(fused_visual, fused_text, text_mask)
        if self.config.use_logistic:
            # The reference's `_logistic` with eta1 = 2, eta2 = -2, written as it writes it.
            scale = abs(self.config.logistic_eta4) + 1e-6
            rewards = 4.0 / (1 + torch.exp(-(rewards - self.config.logistic_eta3) / scale)) - 2.0
        return rewards

    def forward(
        self,
        noisy_latents: torch.Tensor,
        t: float | torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor | None = None,
        return_dict: bool = True,
        check_finite: bool | None = None,
        context_embedded: bool = False,
    ) -> DiNaLRMOutput | tuple:
        r"""Rewards of latents that are ALREADY noised to level `t`.

        Args:
            noisy_latents (`torch.Tensor` of shape `(B, C, H, W)`): the family VAE's scaled latents at noise level
                `t`.
            t (`float` or `torch.Tensor` of shape `(B,)`): noise fraction in [0, 1] (snapped, see `snap_noise_level`).
            prompt_embeds (`torch.Tensor` of shape `(B, tokens, dim)`, or `list[torch.Tensor]`): the family's prompt
                embeddings; Z-Image also takes one `(tokens_i, dim)` tensor per sample, as `ZImagePipeline.encode_prompt`
                returns them (padded and masked inside, so a prompt's reward does not depend on its batch).
            pooled_prompt_embeds (`torch.Tensor` of shape `(B, pooled_projection_dim)`, *optional*): pooled prompt
                embeddings (SD3, FLUX); `None` for Z-Image.
            return_dict (`bool`, defaults to `True`): return a [`DiNaLRMOutput`] instead of a tuple.
            check_finite (`bool`, *optional*): refuse NaN / infinite inputs and a tensor `t` outside [0, 1]. `None`
                checks only tensors on the CPU (outside `torch.compile`), so that scoring on an accelerator never
                waits for the device; see `check_inputs`.
            context_embedded (`bool`, defaults to `False`): `prompt_embeds` is already [`~DiNaLRMModel.embed_context`]'s
                output (backbone width), so the context embedder is skipped.
        """
        prompt_embeds, prompt_mask = self._batch_prompts(prompt_embeds)
        self.check_inputs(noisy_latents, prompt_embeds, pooled_prompt_embeds, check_finite, context_embedded)
        sigmas, timesteps = self.snap_noise_level(t, noisy_latents.shape[0], noisy_latents.device, check_finite)
        rewards = self._reward_over_levels(
            noisy_latents, sigmas, timesteps, prompt_embeds, pooled_prompt_embeds, 1, prompt_mask, context_embedded
        )
        timesteps = self.backbone.timestep(sigmas, timesteps)
        if not return_dict:
            return (rewards, sigmas, timesteps)
        return DiNaLRMOutput(rewards=rewards, sigmas=sigmas, timesteps=timesteps)

    def score_latents(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor | None = None,
        t: float | Sequence[float] | None = None,
        noise: torch.Tensor | Sequence[torch.Tensor] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        check_finite: bool | None = None,
        context_embedded: bool = False,
    ) -> torch.Tensor:
        r"""Rewards of CLEAN latents, shape `(B,)`; differentiable w.r.t. `latents` when grad is enabled.

        Args:
            latents (`torch.Tensor` of shape `(B, C, H, W)`): the family VAE's clean scaled latents (FLUX's 2x2
                packing happens inside).
            prompt_embeds (`torch.Tensor` of shape `(B, tokens, dim)`, or `list[torch.Tensor]`): the family's prompt
                embeddings; Z-Image also takes one `(tokens_i, dim)` tensor per sample, as `ZImagePipeline.encode_prompt`
                returns them (padded and masked inside, so a prompt's reward does not depend on its batch).
            pooled_prompt_embeds (`torch.Tensor` of shape `(B, pooled_projection_dim)`, *optional*): pooled prompt
                embeddings (SD3, FLUX); `None` for Z-Image.
            t (`float` or `list[float]`, *optional*): one noise level, or a list of levels for the token-level
                ensemble (the text embedded once, one backbone pass per level, their tokens joined before the query
                head). Defaults to `config.default_t`.
            noise (`torch.Tensor` or `list[torch.Tensor]`, *optional*): a tensor shaped like `latents` shared by all
                levels (the default convention), or one tensor per level. Drawn from `generator` when omitted.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): source of the noise.
            check_finite (`bool`, *optional*): refuse NaN / infinite `latents`, prompt embeddings or explicit `noise`
                (they would give NaN rewards). `None` checks only tensors on the CPU (outside `torch.compile`), so
                that scoring on an accelerator never waits for the device; `True` always checks, `False` never.
            context_embedded (`bool`, defaults to `False`): `prompt_embeds` is already [`~DiNaLRMModel.embed_context`]'s
                output (backbone width), so the context embedder is skipped.
        """
        prompt_embeds, prompt_mask = self._batch_prompts(prompt_embeds)
        self.check_inputs(latents, prompt_embeds, pooled_prompt_embeds, check_finite, context_embedded)
        if t is None:
            t = self.config.default_t
        levels = [t] if isinstance(t, (int, float, torch.Tensor)) else list(t)
        if not levels:
            raise ValueError("t must be a noise level or a non-empty list of levels.")
        explicit_noise = noise is not None
        if noise is None:
            noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noises = list(noise) if isinstance(noise, (list, tuple)) else [noise] * len(levels)
        if len(noises) != len(levels) or any(n.shape != latents.shape for n in noises):
            raise ValueError(
                f"noise must be one tensor of shape {tuple(latents.shape)} or a list of {len(levels)} such tensors."
            )
        if explicit_noise:
            for level_noise in noises if isinstance(noise, (list, tuple)) else [noise]:
                if _checks_values(check_finite, level_noise):
                    _require_finite(
                        level_noise,
                        "noise contains NaN or infinite values: pass standard Gaussian noise shaped like the latents, "
                        "or leave noise=None to draw it from `generator`.",
                    )
        batch = latents.shape[0]
        noisy, all_sigmas, all_timesteps = [], [], []
        for level, level_noise in zip(levels, noises):
            sigmas, timesteps = self.snap_noise_level(level, batch, latents.device, check_finite)
            if self.config.add_noise:
                noisy.append(add_noise(latents, level_noise.to(latents.device), sigmas))
            else:
                noisy.append(latents)
            all_sigmas.append(sigmas)
            all_timesteps.append(timesteps)
        repeat = len(levels)
        return self._reward_over_levels(
            torch.cat(noisy),
            torch.cat(all_sigmas),
            torch.cat(all_timesteps),
            prompt_embeds,
            None if pooled_prompt_embeds is None else pooled_prompt_embeds.repeat(repeat, 1),
            repeat,
            None if prompt_mask is None else prompt_mask.repeat(repeat, 1),
            context_embedded,
        )

    # -------------------------------------------------------------------------------------- objective
    def preference_probability(
        self, rewards_a: torch.Tensor, rewards_b: torch.Tensor, t: float | torch.Tensor
    ) -> torch.Tensor:
        r"""P(a preferred over b) per pair under the configured comparison model at noise level `t` (snapped).

        Args:
            rewards_a (`torch.Tensor` of shape `(B,)`): rewards of the first sample of each pair.
            rewards_b (`torch.Tensor` of shape `(B,)`): rewards of the second sample of each pair.
            t (`float` or `torch.Tensor` of shape `()` or `(B,)`): the noise level(s) the rewards were read at. A
                tensor `t` is range-checked only on the CPU (see `snap_noise_level`).

        Returns:
            `torch.Tensor` of shape `(B,)`: Thurstone `Phi((r_a - r_b) / sqrt(2 var(t) + eps))` with
            `var(t) = k t**2 + v0` (a constant variance for `"fixed_variance"`), or `sigmoid(r_a - r_b)` (BT, with
            or without the training margin).
        """
        diff = rewards_a.reshape(-1) - rewards_b.reshape(-1)
        if self.config.loss_type in ("bradley_terry", "bradley_terry_margin"):
            return torch.sigmoid(diff)
        variance = self._comparison_variance(t, diff)
        z = diff / torch.sqrt(variance + variance + self.config.thurstone_eps)
        return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))

    def preference_loss(
        self,
        rewards_chosen: torch.Tensor,
        rewards_rejected: torch.Tensor,
        t: float | torch.Tensor,
        weights: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        r"""The training loss of pairs, chosen first: fidelity `1 - sqrt(p + eps)` (Thurstone / fixed variance,
        `p` from `preference_probability`) or `-log sigmoid(r_c - r_r - margin)` (Bradley-Terry, margin 0 or
        `bt_margin`).

        Every pair is computed with elementwise operations, so a pair's loss does not depend on the other pairs.

        Args:
            rewards_chosen (`torch.Tensor` of shape `(B,)`): rewards of the preferred samples.
            rewards_rejected (`torch.Tensor` of shape `(B,)`): rewards of the other samples.
            t (`float` or `torch.Tensor` of shape `()` or `(B,)`): the noise level of every pair, or of each pair.
            weights (`torch.Tensor` of shape `(B,)`, *optional*): per-pair weights of the mean,
                `sum(w * loss) / sum(w)` (a zero sum gives 0, not NaN). Only with `reduction="mean"`.
            reduction (`str`, defaults to `"mean"`): `"mean"` (the weighted mean with `weights`) or `"none"` for the
                `(B,)` per-pair losses.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction={reduction!r} is not supported: use 'mean' or 'none' (per-pair losses).")
        if weights is not None and reduction != "mean":
            raise ValueError("weights are the weights of the mean: pass them with reduction='mean'.")
        if self.config.loss_type in ("bradley_terry", "bradley_terry_margin"):
            margin = self.config.bt_margin if self.config.loss_type == "bradley_terry_margin" else 0.0
            losses = -F.logsigmoid(rewards_chosen.reshape(-1) - rewards_rejected.reshape(-1) - margin)
        else:
            p = self.preference_probability(rewards_chosen, rewards_rejected, t)
            losses = 1.0 - torch.sqrt(p + self.config.thurstone_eps)
        if reduction == "none":
            return losses
        if weights is None:
            return losses.mean()
        weights = weights.reshape(-1).to(losses)
        if weights.shape != losses.shape:
            raise ValueError(f"weights must hold one value per pair ({losses.shape[0]}), got {weights.shape[0]}.")
        return (weights * losses).sum() / weights.sum().clamp_min(torch.finfo(losses.dtype).tiny)

    def reward_statistics_for(self, t: float | Sequence[float]) -> dict:
        """The `config.reward_statistics` entry measured at the noise level(s) `t` (compared after snapping).

        Raises `ValueError` when the model has no statistics, or none for these levels, naming how to compute them.
        """
        entries = self.config.reward_statistics
        fix = "compute them with `python eval/reward_stats.py --model <folder> --pairs <reference pairs> --t <t> --write_to_model`"
        if not entries:
            raise ValueError(
                f"normalize='zscore' needs reward statistics in the model config, and it has none: {fix}."
            )
        levels = [t] if isinstance(t, (int, float)) else list(t)
        snapped = [float(self.snap_noise_level(float(level), 1)[0][0]) for level in levels]
        for entry in entries:
            if [float(self.snap_noise_level(float(level), 1)[0][0]) for level in entry["t"]] == snapped:
                return entry
        measured = ", ".join(str(entry["t"]) for entry in entries)
        raise ValueError(f"The model's reward statistics were measured at t={measured}, not at t={levels}: {fix}.")

    def zscore(self, rewards: torch.Tensor, t: float | Sequence[float]) -> torch.Tensor:
        """`(rewards - mean) / std` from the reward statistics measured at noise level(s) `t`."""
        stats = self.reward_statistics_for(t)
        return (rewards - stats["mean"]) / stats["std"]

    def calibration_for(self, t: float | Sequence[float]) -> dict | None:
        """`config.calibration` if it was fitted at the noise level(s) `t` (compared after snapping), else None."""
        calibration = self.config.calibration
        if not calibration:
            return None
        levels = [t] if isinstance(t, (int, float)) else list(t)
        snapped = [float(self.snap_noise_level(float(level), 1)[0][0]) for level in levels]
        fitted = [float(self.snap_noise_level(float(level), 1)[0][0]) for level in calibration["t"]]
        return calibration if snapped == fitted else None

    def calibrated_probability(
        self, rewards_a: torch.Tensor, rewards_b: torch.Tensor, t: float | Sequence[float]
    ) -> torch.Tensor | None:
        r"""P(a preferred over b) from the fitted logistic calibration, `sigmoid(slope * (r_a - r_b))`, or None when
        the model has no calibration for the noise level(s) `t` (see `eval/calibrate.py`)."""
        calibration = self.calibration_for(t)
        if calibration is None:
            return None
        return torch.sigmoid(calibration["slope"] * (rewards_a.reshape(-1) - rewards_b.reshape(-1)))

    def calibrated_score(self, rewards: torch.Tensor, t: float | Sequence[float]) -> torch.Tensor:
        r"""Calibrated scores in (0, 1): `sigmoid(slope * (r - reference_reward))`, the calibrated probability that
        a sample is preferred over one with the median reward of the calibration set, for the same prompt.

        Raises `ValueError` when the model has no calibration (fit one with `eval/calibrate.py`); warns when it was
        fitted at other noise levels than `t`, since reward differences grow with the noise level.
        """
        calibration = self.config.calibration
        if not calibration:
            raise ValueError(
                "normalize='logistic' needs a calibration in the model config: fit one with "
                "`python eval/calibrate.py --model <model> --pairs <pairs> --write_to_model` (or use normalize=True "
                "for the display score (raw + 10) / 10)."
            )
        if self.calibration_for(t) is None:
            logger.warning(
                f"The calibration was fitted at t={calibration['t']}; scores at t={t} are calibrated with it anyway."
            )
        return torch.sigmoid(calibration["slope"] * (rewards - calibration["reference_reward"]))

    def _comparison_variance(self, t: float | torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
        if self.config.loss_type == "fixed_variance":
            return torch.full_like(diff, self.config.fixed_variance)
        sigmas, _ = self.snap_noise_level(t, diff.shape[0], diff.device)
        sigmas = sigmas.to(diff.dtype)
        return self.config.thurstone_k * sigmas**2 + self.config.thurstone_v0

    # --------------------------------------------------------------------------------- construction
    @classmethod
    def from_backbone(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = "transformer",
        num_layers: int = 12,
        revision: str | None = None,
        variant: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        token: str | bool | None = None,
        cache_dir: str | None = None,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] | None = None,
        **config_kwargs,
    ) -> "DiNaLRMModel":
        """Builds a reward model on the first `num_layers` blocks of a diffusers transformer checkpoint.

        `pretrained_model_name_or_path` is a Hub id or folder of an SD3, FLUX or Z-Image pipeline (the transformer
        is read from `subfolder`) or a folder holding the transformer's `config.json` directly; the family follows
        from its class (`SD3Transformer2DModel`, `FluxTransformer2DModel`, `ZImageTransformer2DModel`). Only the
        kept blocks' tensors are read; the head starts from random init (see `_init_weights`).

        Examples:

        ```py
        >>> sd3 = DiNaLRMModel.from_backbone("stabilityai/stable-diffusion-3.5-medium", num_layers=12)
        >>> flux = DiNaLRMModel.from_backbone("black-forest-labs/FLUX.1-dev", num_layers=19, visual_layers=[6, 12, 19])
        >>> zimage = DiNaLRMModel.from_backbone("Tongyi-MAI/Z-Image-Turbo", num_layers=16, visual_layers=[4, 8, 16])
        ```
        """
        files = _BackboneFiles(pretrained_model_name_or_path, subfolder, revision, variant, token, cache_dir)
        backbone_config = {k: v for k, v in files.config.items() if not k.startswith("_")}
        if config_kwargs.setdefault("backbone", files.family) != files.family:
            raise ValueError(
                f"backbone={config_kwargs['backbone']!r} but {files.describe()} is a {files.family} transformer "
                f"({files.config.get('_class_name')}); drop backbone= (the family follows from the checkpoint)."
            )
        config_kwargs.setdefault("base_model_name_or_path", str(pretrained_model_name_or_path))
        config = DiNaLRMConfig(backbone_config=backbone_config, num_backbone_layers=num_layers, **config_kwargs)
        # Built on the meta device and filled by `assign=True` with one copy of each memory-mapped tensor, cast
        # straight to `torch_dtype`: one backbone-sized allocation, nothing randomly initialised then overwritten.
        # The copy is aligned memory (the file's offsets are not; unaligned weights change matmul results) and
        # leaves no mapping of the user's file behind.
        with torch.device("meta"):
            model = cls(config)
        wanted = set(model.backbone.state_dict())
        state = files.read(lambda key: key in wanted)
        missing = sorted(wanted - state.keys())
        if missing:
            raise ValueError(
                f"{files.describe()} lacks backbone weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
            )
        state = {k: v.to(torch_dtype if v.is_floating_point() else v.dtype, copy=True) for k, v in state.items()}
        model.backbone.load_state_dict(state, strict=True, assign=True)
        model.reward_head.to_empty(device="cpu")
        model.reward_head.apply(model._init_weights)
        model.to(torch_dtype)
        if lora_rank:
            model.add_lora(lora_rank, lora_alpha, lora_target_modules)
            model.to(torch_dtype)
        return model


def _damaged_weights_files(folder: str) -> list[str]:
    """The `*.safetensors` files of a local folder that cannot be opened (e.g. truncated: header beyond the end)."""
    from safetensors import SafetensorError, safe_open

    damaged = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(folder, name), framework="pt"):
                    pass
            except (SafetensorError, OSError):
                damaged.append(os.path.join(folder, name))
    return damaged


def _is_official(name: str | os.PathLike, kwargs: dict) -> bool:
    """Whether `name` (folder or Hub id) is an official checkpoint; a Hub id costs one small config download."""
    if os.path.isdir(name):
        return is_official_checkpoint(name)
    if not looks_like_repo_id(name):
        return False
    from huggingface_hub import hf_hub_download

    try:
        config_path = hf_hub_download(
            str(name), "config.json", revision=kwargs.get("revision"), token=kwargs.get("token"),
            cache_dir=kwargs.get("cache_dir"),
        )  # fmt: skip
    except Exception:  # transformers' own loading reports what is wrong with the repository
        return False
    with open(config_path, encoding="utf-8") as handle:
        return isinstance(json.load(handle).get("model"), dict)


def _describe(value) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


class _BackboneFiles:
    """Finds a diffusers transformer checkpoint (local or Hub) and reads selected tensors lazily from safetensors."""

    WEIGHTS = "diffusion_pytorch_model"

    def __init__(self, path, subfolder, revision, variant, token, cache_dir):
        self.path, self.revision, self.token, self.cache_dir = str(path), revision, token, cache_dir
        self.variant = variant
        self.subfolder = subfolder
        if os.path.isdir(self.path):
            if os.path.isfile(os.path.join(self.path, "config.json")) and not (
                subfolder and os.path.isfile(os.path.join(self.path, subfolder, "config.json"))
            ):
                self.subfolder = None
            elif not (subfolder and os.path.isfile(os.path.join(self.path, subfolder, "config.json"))):
                raise FileNotFoundError(
                    f"No transformer config.json in {self.path} or {os.path.join(self.path, subfolder or '')}."
                )
        with open(self._fetch("config.json"), encoding="utf-8") as handle:
            self.config = json.load(handle)
        families = {extractor.transformer_class: family for family, extractor in FEATURE_EXTRACTORS.items()}
        class_name = self.config.get("_class_name", "SD3Transformer2DModel")
        if class_name not in families:
            raise ValueError(
                f"{self.describe()} holds a {class_name}; supported backbones are {', '.join(sorted(families))}."
            )
        self.family = families[class_name]

    def describe(self) -> str:
        return os.path.join(self.path, self.subfolder or "")

    def _fetch(self, filename: str) -> str:
        if os.path.isdir(self.path):
            local = os.path.join(self.path, self.subfolder or "", filename)
            if not os.path.isfile(local):
                raise FileNotFoundError(f"Missing {local}.")
            return local
        from huggingface_hub import hf_hub_download

        return hf_hub_download(
            self.path,
            filename,
            subfolder=self.subfolder,
            revision=self.revision,
            token=self.token,
            cache_dir=self.cache_dir,
        )

    def read(self, keep) -> dict[str, torch.Tensor]:
        """Tensors whose key satisfies `keep`; other tensors (and shards holding none) are never read."""
        from huggingface_hub.errors import EntryNotFoundError
        from safetensors import safe_open

        suffix = f".{self.variant}" if self.variant else ""
        single = f"{self.WEIGHTS}{suffix}.safetensors"
        try:  # one file (fetched whole), else a sharded checkpoint (only the shards holding kept tensors)
            shards = {single: None}
            self._fetch(single)
        except (FileNotFoundError, EntryNotFoundError):
            with open(self._fetch(f"{single}.index.json"), encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
            shards = {}
            for key, shard in weight_map.items():
                if keep(key):
                    shards.setdefault(shard, []).append(key)
        tensors = {}
        for shard, keys in shards.items():
            with safe_open(self._fetch(shard), framework="pt") as handle:
                for key in keys if keys is not None else handle.keys():
                    if keep(key):
                        tensors[key] = handle.get_tensor(key)
        return tensors


# ------------------------------------------------------------------------------------- official checkpoints
OFFICIAL_CHECKPOINT_ID = "liuhuohuo/DiNa-LRM-SD35M-12layers"
# What the reference (github.com/HKUST-C4G/diffusion-rm) saves; nothing else of an official repository is read.
OFFICIAL_ALLOW_PATTERNS = [
    "config.json",
    "checkpoint/rm_head.safetensors",
    "checkpoint/rm_head.pt",
    "checkpoint/full_model.safetensors",
    "checkpoint/full_model.pt",
    "checkpoint/backbone_lora/adapter_config.json",
    "checkpoint/backbone_lora/adapter_model.safetensors",
]
# The reference's `model_type` -> our loss settings.
OFFICIAL_LOSS_TYPES = {
    "thurstone": {"loss_type": "thurstone"},
    "thurstone-constant": {"loss_type": "fixed_variance", "fixed_variance": 0.5},
    "bt": {"loss_type": "bradley_terry"},
    "bradley_terry": {"loss_type": "bradley_terry"},
    "bt-margin": {"loss_type": "bradley_terry_margin", "bt_margin": 1.0},
}
# The reference's initial values of its logistic squashing parameters (its LoRA runs do not save them).
OFFICIAL_LOGISTIC_INIT = {"eta3": 0.0, "eta4": 0.15}
_PEFT_PREFIX = "base_model.model."
# Bump when the converted form changes, so older cached conversions are not reused.
_CONVERSION_VERSION = 1


class ConversionError(ValueError):
    """An official checkpoint that cannot be converted faithfully."""


class ModelUnavailableError(OSError):
    """A model that neither a local folder, the Hugging Face cache nor the Hub can provide (one-line message)."""


@contextlib.contextmanager
def hub_errors(repo_id: str, role: str) -> Iterator[None]:
    """Turns huggingface_hub's failures for `repo_id` into one [`ModelUnavailableError`] that says what to do."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"https://huggingface.co/{repo_id}"
    try:
        yield
    except GatedRepoError:
        message = (
            f"the {role} {repo_id} is gated: accept its licence at {page} with your Hugging Face account, then run "
            "`hf auth login` here (or pass a local folder)."
        )
    except RevisionNotFoundError:
        message = f"the {role} {repo_id} has no such revision: check --revision (or pass a local folder)."
    except RepositoryNotFoundError:
        message = (
            f"the {role} {repo_id} was not found on the Hub: check the id (a private or gated repository needs "
            "`hf auth login`), or pass a local folder."
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        message = (
            f"the {role} {repo_id} is not in the Hugging Face cache and the Hub cannot be reached (offline, or "
            f"HF_HUB_OFFLINE=1): run once with network access or `hf download {repo_id}` (a gated model needs its "
            f"licence accepted at {page} and `hf auth login` first), or pass a local folder."
        )
    except EntryNotFoundError as error:
        message = f"the {role} {repo_id} lacks a file it needs ({error}); pass a complete repository or folder."
    except HfHubHTTPError as error:
        message = (
            f"the Hub refused the {role} {repo_id} ({str(error).splitlines()[0]}); retry, or pass a local folder."
        )
    else:
        return
    raise ModelUnavailableError(message) from None


def is_official_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether `folder` has the reference's layout: `config.json` with a `model` section, and `checkpoint/`."""
    config_path = os.path.join(folder, "config.json")
    if not (os.path.isfile(config_path) and os.path.isdir(os.path.join(folder, "checkpoint"))):
        return False
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    return isinstance(config, dict) and isinstance(config.get("model"), dict)


def looks_like_local_path(name: str | os.PathLike) -> bool:
    """Whether `name` is meant as a local path: it exists, is absolute, starts with `.` or `~`, or has more
    separators than an `owner/name` Hub id."""
    name = str(name)
    separators = name.count("/") + (name.count(os.sep) if os.sep != "/" else 0)
    return os.path.exists(name) or name.startswith((".", "~", "/", os.sep)) or separators > 1


def provenance_name(name: str | os.PathLike | None) -> str | None:
    """What a config records as a model's origin: a Hub id as it is, a local path as its folder name only."""
    if name is None or not looks_like_local_path(name):
        return None if name is None else str(name)
    return os.path.basename(os.path.normpath(os.path.expanduser(str(name))))


def looks_like_repo_id(name: str | os.PathLike) -> bool:
    """`owner/name` that is not meant as a local path."""
    name = str(name)
    return not looks_like_local_path(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None


def require_local_folder(name: str | os.PathLike, role: str) -> None:
    """Refuses a path meant as local (see [`looks_like_local_path`]) that is not a folder, naming it."""
    if looks_like_local_path(name) and not os.path.isdir(name):
        what = "is a file, not a folder" if os.path.isfile(name) else "does not exist: no such folder"
        raise ModelUnavailableError(
            f"the {role} {str(name)!r} {what} ({os.path.abspath(os.path.expanduser(str(name)))}); check the path, "
            "or pass a Hub id as owner/name."
        )


def snapshot_revision(path: str) -> str | None:
    """The commit of a file or folder inside the Hugging Face cache (`.../snapshots/<commit>/...`), else None."""
    parts = os.path.normpath(path).split(os.sep)
    if "snapshots" in parts[:-1]:
        commit = parts[parts.index("snapshots") + 1]
        return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None
    return None


def resolve_repo(
    name: str | os.PathLike,
    allow_patterns: list[str],
    role: str,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
) -> tuple[str, str | None]:
    """`(local folder, commit)` of a folder (commit None) or a Hub id, downloading only `allow_patterns`."""
    if os.path.isdir(name):
        return str(name), None
    require_local_folder(name, role)
    if not looks_like_repo_id(name):
        raise ModelUnavailableError(f"the {role} {str(name)!r} is neither a local folder nor a Hub id (owner/name).")
    from huggingface_hub import snapshot_download

    with hub_errors(str(name), role):
        folder = snapshot_download(
            str(name), allow_patterns=allow_patterns, revision=revision, token=token, cache_dir=cache_dir
        )
    return folder, snapshot_revision(folder)


def converted_cache_root() -> str:
    """Where converted official checkpoints are kept: `$DINALRM_CACHE`, else `$HF_HOME/dinalrm/converted`."""
    from huggingface_hub import constants

    return os.environ.get("DINALRM_CACHE") or os.path.join(constants.HF_HOME, "dinalrm", "converted")


def _local_fingerprint(folder: str, names: Sequence[str]) -> str:
    """Identifies the files `names` of a local folder by size and modification time (they may be gigabytes)."""
    entries = []
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            stat = os.stat(path)
            entries.append([name, stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps([os.path.abspath(folder), entries]).encode()).hexdigest()


def _damaged(path: str, error: Exception) -> ConversionError:
    return ConversionError(
        f"{path} is truncated or damaged ({str(error).splitlines()[0] or type(error).__name__}): download the "
        "checkpoint again (`hf download <id>`, or delete that file from the Hugging Face cache)."
    )


def require_finite_weights(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """Refuses weights holding NaN or infinity, which would give NaN rewards for every input."""
    bad = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise ConversionError(
            f"{path} holds NaN or infinite weights ({len(bad)} tensors, e.g. {bad[:3]}): the checkpoint is damaged "
            "(or was saved from a diverged run); download it again or use another checkpoint."
        )
    return state


def read_safetensors_weights(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file of an official checkpoint, refusing a damaged file or non-finite values."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (SafetensorError, OSError) as error:
        raise _damaged(path, error) from None
    return require_finite_weights(state, path)


def load_pickled_weights(path: str):
    """The contents of a `.pt` pickle read with `weights_only=True` (tensors, numbers and containers only).

    Raises [`ConversionError`] for a truncated file, and for a pickle holding other Python objects, which is not
    loaded at all (unpickling them could run code): the message says what the file is and how to convert it.
    """
    import pickle
    import zipfile

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" not in str(error).lower():
            raise _damaged(path, error) from None
        stem = os.path.splitext(path)[0]
        raise ConversionError(
            f"{path} is a pickle that holds Python objects besides tensors, which would run code when unpickled, so "
            f"it was not loaded. Ask its publisher for the weights as safetensors, or, if you trust its source, "
            f"convert it in an isolated environment (a throwaway container): load it with torch.load, keep its "
            f"tensors and save them with safetensors.torch.save_file as {stem}.safetensors, which is read first."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise _damaged(path, error) from None


def _load_tensors(stem: str) -> dict[str, torch.Tensor]:
    """Reads `<stem>.safetensors` if present, else the pickle `<stem>.pt` with `weights_only=True`."""
    if os.path.isfile(stem + ".safetensors"):
        return read_safetensors_weights(stem + ".safetensors")
    path = stem + ".pt"
    if not os.path.isfile(path):
        raise ConversionError(f"Missing weights: {path} (or {stem}.safetensors)")
    state = load_pickled_weights(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} is not a state dict of tensors.")
    return require_finite_weights(state, path)


def _official_model_kwargs(config: dict) -> dict:
    """Maps the reference's run config (its `model` and `training` sections) to `from_backbone` arguments."""
    model_cfg = config["model"]
    head = model_cfg.get("reward_head", {})
    if head.get("out_dim", 1) != 1:
        raise ConversionError(f"reward_head.out_dim={head['out_dim']}: only scalar rewards are supported.")
    if not model_cfg.get("use_t_embed", True):
        raise ConversionError("use_t_embed=false (a head without timestep conditioning) is not supported.")
    model_type = model_cfg.get("model_type", "thurstone")
    if model_type not in OFFICIAL_LOSS_TYPES:
        raise ConversionError(f"Unknown official model_type {model_type!r}; known: {sorted(OFFICIAL_LOSS_TYPES)}.")
    use_text = model_cfg.get("use_text_features", True)
    width = head.get("width", -1)
    return {
        "num_layers": model_cfg["num_transformer_layers"],
        # The reference collects features in block order, whatever order the lists are written in.
        "visual_layers": sorted(model_cfg["visual_head_idx"]),
        "text_layers": sorted(model_cfg.get("text_head_idx") or []) if use_text else [],
        "head_width": None if width == -1 else width,
        "head_num_queries": head.get("num_queries", 4),
        "head_num_heads": head.get("num_attn_heads", 8),
        "head_dropout": head.get("dropout", 0.0),
        "head_use_proj_in": head.get("use_proj_in", False),
        "use_logistic": bool(model_cfg.get("use_logistic", False)),
        "add_noise": bool((config.get("training") or {}).get("add_noise", True)),
        **OFFICIAL_LOSS_TYPES[model_type],
    }


def _official_lora(lora_dir: str) -> tuple[dict, list[str], dict[str, torch.Tensor]]:
    """The adapter's config, the module paths it targets inside the backbone, and its tensors under our keys."""
    config_path = os.path.join(lora_dir, "adapter_config.json")
    weights_path = os.path.join(lora_dir, "adapter_model.safetensors")
    for path, what in ((config_path, "LoRA config"), (weights_path, "LoRA weights")):
        if not os.path.isfile(path):
            raise ConversionError(f"Missing {what}: {path}")
    with open(config_path, encoding="utf-8") as handle:
        adapter_config = json.load(handle)
    for flag in ("use_rslora", "use_dora"):
        if adapter_config.get(flag):
            raise ConversionError(f"LoRA with {flag}=true is not supported.")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if adapter_config.get(pattern):
            raise ConversionError(f"LoRA with a non-empty {pattern} is not supported.")
    modules, state = set(), {}
    for key, value in read_safetensors_weights(weights_path).items():
        if not key.startswith(_PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ConversionError(f"Unexpected key in the LoRA adapter: {key}")
        module, _, part = key[len(_PEFT_PREFIX) :].rpartition(".lora_")
        modules.add(module)
        state[f"backbone.{module}.lora_{part.removesuffix('.weight')}.default.weight"] = value
    for module in sorted(modules):
        for side in ("A", "B"):
            if f"backbone.{module}.lora_{side}.default.weight" not in state:
                raise ConversionError(f"LoRA adapter has no lora_{side} for {module}.")
    return adapter_config, sorted(modules), state


def load_state_exactly(model: nn.Module, state: dict[str, torch.Tensor], expected: set[str], what: str) -> None:
    """Loads `state` into `model`, insisting that its keys are exactly `expected` with matching shapes (peft
    itself would only warn and leave LoRA at zero, i.e. silently the no-LoRA model)."""
    own = model.state_dict()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ConversionError(f"{what}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ConversionError(f"{what}: shape mismatches {wrong[:10]}")
    integers = [
        f"{k}: {v.dtype}" for k, v in state.items() if own[k].is_floating_point() and not v.is_floating_point()
    ]
    if integers:
        raise ConversionError(
            f"{what}: integer tensors where the model has float weights ({integers[:5]}): casting would change "
            "the values; the file is not a float checkpoint of this model."
        )
    result = model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    if result.unexpected_keys:
        raise ConversionError(f"{what}: keys not consumed {result.unexpected_keys[:10]}")


def convert_official_checkpoint(
    official_dir: str | os.PathLike,
    backbone: str | os.PathLike,
    backbone_subfolder: str | None = "transformer",
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
) -> "DiNaLRMModel":
    """Builds a [`DiNaLRMModel`] holding exactly an official checkpoint's weights, LoRA kept as an adapter.

    Reads the reference's `config.json` and `checkpoint/` (`backbone_lora/` + `rm_head`, `rm_head` alone when the
    backbone was frozen, or `full_model`) and the first blocks of `backbone`, an SD3 transformer (Hub id or
    folder). Every official configuration the reference can produce converts with score parity; a partial load
    stops with a [`ConversionError`] naming the keys.
    """
    official_dir = str(official_dir)
    require_local_folder(backbone, "base model")
    config_path = os.path.join(official_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"Missing official config: {config_path}")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ConversionError(f"{config_path} is not valid JSON ({error}): download the checkpoint again.") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ConversionError(f"{config_path} has no `model` section: it is not an official DiNa-LRM run config.")
    model_cfg = config["model"]
    kwargs = _official_model_kwargs(config)
    checkpoint = os.path.join(official_dir, "checkpoint")
    model = DiNaLRMModel.from_backbone(
        backbone, subfolder=backbone_subfolder, revision=revision, token=token, cache_dir=cache_dir, **kwargs
    )
    head_keys = {k for k in model.state_dict() if k.startswith("reward_head.")}
    logistic = dict(OFFICIAL_LOGISTIC_INIT)
    # The reference builds LoRA only for an unfrozen backbone (freezing wins) and then saves only the head.
    if model_cfg.get("freeze_backbone") or model_cfg.get("use_lora"):
        if model_cfg.get("use_lora") and not model_cfg.get("freeze_backbone"):
            adapter_config, modules, lora_state = _official_lora(os.path.join(checkpoint, "backbone_lora"))
            unknown = sorted(set(modules) - {name for name, _ in model.backbone.named_modules()})
            if unknown:
                raise ConversionError(f"LoRA modules in the checkpoint but not in the backbone: {unknown[:10]}")
            model.add_lora(adapter_config["r"], adapter_config["lora_alpha"], target_modules=modules)
            if set(model.lora_layers()) != set(modules):
                raise ConversionError(f"LoRA landed on {sorted(model.lora_layers())[:10]}, expected {modules[:10]}")
            load_state_exactly(model, lora_state, {k for k in model.state_dict() if ".lora_" in k}, "LoRA adapter")
        head = {f"reward_head.{k}": v for k, v in _load_tensors(os.path.join(checkpoint, "rm_head")).items()}
        load_state_exactly(model, head, head_keys, "rm_head")
        logistic_source = None
    else:
        state = _load_tensors(os.path.join(checkpoint, "full_model"))
        if kwargs["use_logistic"]:
            missing = [name for name in logistic if name not in state]
            if missing:
                raise ConversionError(f"full_model: use_logistic=true but {missing} are missing.")
            logistic = {name: float(state.pop(name)) for name in logistic}
        load_state_exactly(model, state, set(model.state_dict()), "full_model")
        logistic_source = "full_model"
    if kwargs["use_logistic"]:
        if logistic_source is None:
            logger.warning(
                "use_logistic=true: the official checkpoint does not save the logistic parameters eta3/eta4 "
                "(only its full_model.pt does); using the reference's initial values eta3=0, eta4=0.15."
            )
        model.config.logistic_eta3, model.config.logistic_eta4 = logistic["eta3"], logistic["eta4"]
    return model


def load_official_checkpoint(
    official: str | os.PathLike,
    base_model: str | os.PathLike = SD35_MEDIUM_ID,
    torch_dtype: torch.dtype | None = None,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
) -> "DiNaLRMModel":
    """An official checkpoint (Hub id or folder) as a [`DiNaLRMModel`], converted once and cached on disk.

    Only the official files and the base transformer's config and kept blocks are read. The conversion is kept
    in [`converted_cache_root`] under a key made of both repositories' revisions (a local folder: its files'
    sizes and times), so a later load reads the converted model instead of converting again.
    """
    official_dir, official_commit = resolve_repo(
        official, OFFICIAL_ALLOW_PATTERNS, "DiNa-LRM checkpoint", revision, token, cache_dir
    )
    if not is_official_checkpoint(official_dir):
        raise ConversionError(
            f"{official} is not an official DiNa-LRM checkpoint (config.json `model` + checkpoint/)."
        )
    official_key = official_commit or _local_fingerprint(
        official_dir, [p for p in OFFICIAL_ALLOW_PATTERNS if "*" not in p]
    )
    if os.path.isdir(base_model):
        subfolder = "transformer" if os.path.isfile(os.path.join(base_model, "transformer", "config.json")) else None
        transformer_dir = os.path.join(base_model, subfolder or "")
        base_key = _local_fingerprint(transformer_dir, sorted(os.listdir(transformer_dir)))
        base_source, base_pin = str(base_model), None
    else:
        from huggingface_hub import hf_hub_download

        with hub_errors(str(base_model), "base model"):
            config_path = hf_hub_download(
                str(base_model), "config.json", subfolder="transformer", revision=base_revision, token=token,
                cache_dir=cache_dir,
            )  # fmt: skip
        base_key = base_pin = snapshot_revision(config_path)
        base_source, subfolder = str(base_model), "transformer"
    key = json.dumps([_CONVERSION_VERSION, str(official), official_key, str(base_model), base_key])
    name = re.sub(r"[^A-Za-z0-9._-]+", "--", os.path.basename(os.path.normpath(str(official))) or "official")
    target = os.path.join(converted_cache_root(), f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
    model = None
    if use_cache and os.path.isfile(os.path.join(target, "config.json")):
        logger.info(f"Loading the converted reward model from {target} (cached; no conversion).")
        try:
            model = DiNaLRMModel.from_pretrained(target)
        except OSError as error:  # e.g. truncated by a full disk: the cache is ours to rebuild
            logger.warning(f"The cached conversion {target} is damaged ({error}); converting again.")
            shutil.rmtree(target, ignore_errors=True)
    if model is None:
        logger.info(f"Converting the official checkpoint {official} on the first blocks of {base_model} (once).")
        with hub_errors(str(base_model), "base model"):
            model = convert_official_checkpoint(
                official_dir, base_source, subfolder, base_pin, token=token, cache_dir=cache_dir
            )
        if use_cache:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            staging = tempfile.mkdtemp(prefix=".partial-", dir=os.path.dirname(target))
            try:
                model.save_pretrained(staging, merge_lora=False)
                os.replace(staging, target)
                logger.info(f"Cached the converted reward model in {target}.")
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                if not os.path.isfile(os.path.join(target, "config.json")):
                    raise
    model.config.base_model_name_or_path = str(base_model)
    return model.to(torch_dtype or torch.float32).eval()


DiNaLRMConfig.register_for_auto_class()
DiNaLRMModel.register_for_auto_class("AutoModel")
