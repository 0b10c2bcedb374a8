# Copyright 2026 The dinalrm authors. Licensed under the Apache License, Version 2.0.
"""LRM: the diffusion-based latent reward model of LPO (arXiv 2502.01051), exact to its official code.

A pretrained SD1.5 / SDXL UNet reads a noisy VAE latent and the prompt, run only through its down and mid blocks.
The features of the last layer of every down block and of the mid block are average-pooled, the mid feature is
sharpened with classifier-free guidance against the empty prompt (Visual Feature Enhancement), and the
concatenation is projected and compared with the projected text embedding by a scaled cosine, as in CLIP.
This file is self-contained: it is the Hub's remote code and must not import anything from the rest of the
dinalrm repository.
"""

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging


logger = logging.get_logger(__name__)

BACKBONE_TYPES = ("sd15", "sdxl")
# Indices into the UNet's `down_block_res_samples` that the official models pool: the output of the last layer of
# every down block (SD1.5: 4 blocks of 2 layers; SDXL: 3 blocks of 2 layers).
OFFICIAL_MULTI_SCALE_INDICES = {"sd15": (2, 5, 8, 11), "sdxl": (2, 5, 8)}
# Integer timesteps of official LRM training: `range(1, largest_timestep + 1, 50)` with largest_timestep 951.
OFFICIAL_TIMESTEP_GRID = tuple(range(1, 952, 50))
OFFICIAL_VALIDATION_TIMESTEP = 1
DEFAULT_LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
# Parts of a diffusers UNet that the LRM never runs: they are dropped from the model and never loaded.
UNUSED_UNET_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")


def _describe(value) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


class LRMConfig(PretrainedConfig):
    r"""Configuration of an [`LRMModel`].

    Args:
        backbone_type (`str`, defaults to `"sd15"`): `"sd15"` (one CLIP text encoder, text projection) or `"sdxl"`
            (two encoders, the second one's projected pooled embedding is the text feature and the added
            condition, no text projection), as the official `lrm_15` / `lrm_xl` models.
        unet_config (`dict`, *optional*): the diffusers `UNet2DConditionModel` config of the backbone.
        text_config (`dict`, *optional*): the `CLIPTextConfig` of the (first) text encoder.
        text_config_2 (`dict`, *optional*): the `CLIPTextConfig` of SDXL's second encoder (`CLIPTextModelWithProjection`).
        scheduler_config (`dict`, *optional*): the base pipeline's scheduler config, read as a `DDPMScheduler`
            (its `add_noise` is the forward process of training and of `score_latents`).
        negative_input_ids (`list[int]`, *optional*): token ids of the empty prompt for the first tokenizer (padded
            to its maximum length); the unconditional branch of Visual Feature Enhancement.
        negative_input_ids_2 (`list[int]`, *optional*): the same for SDXL's second tokenizer.
        multi_scale (`bool`, defaults to `True`): pool the down-block features at `multi_scale_indices` besides the
            mid block; `False` uses the mid block only.
        multi_scale_indices (`list[int]`, *optional*): indices into the UNet's `down_block_res_samples`; defaults
            to the official ones of `backbone_type`.
        multi_scale_cfg (`bool`, defaults to `False`): apply the guidance combination to the down-block features
            too (the official SDXL code leaves the first one conditional, reproduced here).
        guidance_scale (`float`, defaults to 7.5): the VFE guidance factor. Guidance is on when it is `!= 1` for
            SD1.5 and `> 1` for SDXL, as in the official code.
        projection_dim (`int`): width of the joint embedding space.
        text_embed_dim (`int`, *optional*): input width of the text projection (SD1.5); defaults to the text
            encoder's hidden size.
        logit_scale_init_value (`float`, defaults to 2.6592): initial `log` of the score scale (log(1/0.07)).
        vae_scale_factor (`int`, defaults to 8): spatial factor of the base VAE; SDXL's added time ids are
            `(s, s, 0, 0, s, s)` with `s = unet sample_size * vae_scale_factor`, as in the official code.
        default_timestep (`int`, defaults to 1): the timestep `score_latents` noises clean latents to (the official
            validation timestep).
        lora_rank / lora_alpha / lora_target_modules: LoRA on the UNet (rank 0 = none; the official model fine-tunes
            the whole UNet and text encoder).
        base_model_name_or_path (`str`, *optional*): the SD pipeline the backbone came from (provenance); a local
            path is kept as its folder name only, so a saved config carries no path of the machine that wrote it.
    """

    model_type = "lrm"

    def __init__(
        self,
        backbone_type: str = "sd15",
        unet_config: dict | None = None,
        text_config: dict | None = None,
        text_config_2: dict | None = None,
        scheduler_config: dict | None = None,
        negative_input_ids: Sequence[int] | None = None,
        negative_input_ids_2: Sequence[int] | None = None,
        multi_scale: bool = True,
        multi_scale_indices: Sequence[int] | None = None,
        multi_scale_cfg: bool = False,
        guidance_scale: float = 7.5,
        projection_dim: int = 768,
        text_embed_dim: int | None = None,
        logit_scale_init_value: float = 2.6592,
        vae_scale_factor: int = 8,
        default_timestep: int = OFFICIAL_VALIDATION_TIMESTEP,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] | None = None,
        base_model_name_or_path: str | None = None,
        **kwargs,
    ):
        if backbone_type not in BACKBONE_TYPES:
            raise ValueError(f"backbone_type={backbone_type!r} is not supported: use one of {BACKBONE_TYPES}.")
        self.backbone_type = backbone_type
        self.unet_config = dict(unet_config or {})
        self.text_config = dict(text_config or {})
        self.text_config_2 = dict(text_config_2) if text_config_2 else None
        self.scheduler_config = dict(scheduler_config or {})
        self.negative_input_ids = list(negative_input_ids) if negative_input_ids is not None else None
        self.negative_input_ids_2 = list(negative_input_ids_2) if negative_input_ids_2 is not None else None
        self.multi_scale = multi_scale
        if multi_scale_indices is None:
            multi_scale_indices = OFFICIAL_MULTI_SCALE_INDICES[backbone_type] if multi_scale else ()
        self.multi_scale_indices = list(multi_scale_indices) if multi_scale else []
        self.multi_scale_cfg = multi_scale_cfg
        self.guidance_scale = guidance_scale
        self.projection_dim = projection_dim
        self.text_embed_dim = text_embed_dim
        self.logit_scale_init_value = logit_scale_init_value
        self.vae_scale_factor = vae_scale_factor
        self.default_timestep = default_timestep
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else lora_rank
        self.lora_target_modules = list(lora_target_modules or DEFAULT_LORA_TARGET_MODULES)
        self.base_model_name_or_path = _provenance_name(base_model_name_or_path)
        super().__init__(**kwargs)
        if backbone_type == "sdxl" and self.unet_config and not self.text_config_2:
            raise ValueError("An SDXL LRM needs text_config_2 (the config of the second text encoder).")

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether VFE runs an unconditional branch: official SD1.5 tests `!= 1`, official SDXL `> 1`."""
        if self.backbone_type == "sdxl":
            return self.guidance_scale > 1.0
        return self.guidance_scale != 1.0

    @property
    def visual_embed_dim(self) -> int:
        """Input width of the visual projection: the pooled channels of the chosen down features plus the mid block."""
        res_channels = [self.unet_config["block_out_channels"][0]]
        blocks = self.unet_config["block_out_channels"]
        for i, width in enumerate(blocks):
            res_channels += [width] * self.unet_config_layers()
            if i < len(blocks) - 1:
                res_channels.append(width)
        for index in self.multi_scale_indices:
            if index >= len(res_channels):
                raise ValueError(
                    f"multi_scale_indices={self.multi_scale_indices}: the UNet has only {len(res_channels)} down "
                    "features (conv_in, every down-block layer and every downsampler)."
                )
        return sum(res_channels[i] for i in self.multi_scale_indices) + blocks[-1]

    def unet_config_layers(self) -> int:
        layers = self.unet_config.get("layers_per_block", 2)
        if not isinstance(layers, int):
            raise ValueError("Only a UNet with the same layers_per_block in every down block is supported.")
        return layers


@dataclass
class LRMOutput(ModelOutput):
    r"""Output of [`LRMModel.forward`].

    Args:
        rewards (`torch.Tensor` of shape `(N,)`): `exp(logit_scale) * cos(image_embeds, text_embeds)` of every latent
            with its prompt; higher = preferred. The official pair logits.
        image_embeds (`torch.Tensor` of shape `(N, projection_dim)`): L2-normalised visual features.
        text_embeds (`torch.Tensor` of shape `(P, projection_dim)`): L2-normalised text features of the prompts.
        pooled_features (`torch.Tensor` of shape `(N, visual_embed_dim)`): the pooled multi-scale features after VFE,
            the input of the visual projection.
    """

    rewards: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    pooled_features: torch.Tensor | None = None


@dataclass
class LRMPromptEmbeds(ModelOutput):
    r"""Text-side inputs of the UNet and the text feature, computed once per prompt by [`LRMModel.encode_prompt`].

    Args:
        encoder_hidden_states (`torch.Tensor` of shape `(P, tokens, cross_attention_dim)`): conditional branch.
        negative_encoder_hidden_states (`torch.Tensor`, *optional*): the empty prompt's, when guidance is on.
        text_features (`torch.Tensor` of shape `(P, projection_dim)`): unnormalised text features.
        pooled_prompt_embeds (`torch.Tensor`, *optional*): SDXL's added text condition (conditional branch).
        negative_pooled_prompt_embeds (`torch.Tensor`, *optional*): SDXL's added text condition of the empty prompt.
    """

    encoder_hidden_states: torch.Tensor | None = None
    negative_encoder_hidden_states: torch.Tensor | None = None
    text_features: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None


def _provenance_name(name: str | os.PathLike | None) -> str | None:
    """A Hub id as it is, an existing or absolute local path as its folder name only."""
    if name is None:
        return None
    name = str(name)
    if os.path.exists(name) or os.path.isabs(name) or name.startswith((".", "~")):
        return os.path.basename(os.path.normpath(os.path.expanduser(name)))
    return name


def _drop_unused_unet_parts(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Removes the up path, which the reward never runs (its weights are neither kept nor loaded)."""
    unet.up_blocks = nn.ModuleList()
    unet.conv_norm_out = None
    unet.conv_act = None
    unet.conv_out = None
    return unet


class LRMPreTrainedModel(PreTrainedModel):
    config_class = LRMConfig
    base_model_prefix = "lrm"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CLIPEncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Official init of the new parts; the UNet and the text encoders are meant to be loaded pretrained."""
        if isinstance(module, LRMModel):
            init.normal_(module.visual_projection.weight, std=0.02)
            if module.text_projection is not None:
                init.normal_(module.text_projection.weight, std=0.02)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)


class LRMModel(LRMPreTrainedModel):
    """LRM reward model: the down and mid blocks of an SD UNet, pooled multi-scale features with Visual Feature
    Enhancement, and a CLIP-style scaled cosine between projected visual and text features.

    `forward` scores latents that are already noisy (official timesteps are integers in [0, 1000)); `score_latents`
    noises clean latents itself with the backbone's own DDPM schedule. `preference_loss` is the official pair loss.
    """

    def __init__(self, config: LRMConfig):
        super().__init__(config)
        self.unet = _drop_unused_unet_parts(UNet2DConditionModel.from_config(config.unet_config))
        self.text_encoder = CLIPTextModel(CLIPTextConfig(**config.text_config))
        self.text_encoder_2 = None
        if config.backbone_type == "sdxl":
            self.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config.text_config_2))
            self.text_projection = None
        else:
            text_dim = config.text_embed_dim or config.text_config["hidden_size"]
            self.text_projection = nn.Linear(text_dim, config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(config.visual_embed_dim, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        with torch.device("cpu"):
            self.noise_scheduler = DDPMScheduler.from_config(config.scheduler_config)
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
        inject_adapter_in_model(lora_config, self.unet, adapter_name="default")
        self._freeze_lora_base()

    def _freeze_lora_base(self) -> None:
        """With LoRA only the adapter, the projections and the logit scale train; UNet and text encoders stay frozen."""
        self.requires_grad_(False)
        for name, param in self.named_parameters():
            if ".lora_" in name or not name.startswith(("unet.", "text_encoder.", "text_encoder_2.")):
                param.requires_grad_(True)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.config.lora_rank:
            model._freeze_lora_base()
        return loaded

    def add_lora(
        self, rank: int = 64, alpha: float | None = None, target_modules: Sequence[str] | None = None
    ) -> None:
        """Adds a fresh LoRA adapter to the UNet (B = 0, so the rewards are unchanged) and freezes the rest of it."""
        if self.config.lora_rank:
            raise ValueError("The UNet already has a LoRA adapter; merge it first with `merge_lora()`.")
        self.config.lora_rank = rank
        self.config.lora_alpha = alpha if alpha is not None else rank
        self.config.lora_target_modules = list(target_modules or DEFAULT_LORA_TARGET_MODULES)
        self._inject_lora()

    def lora_layers(self) -> dict[str, nn.Module]:
        """UNet modules carrying LoRA, by their path inside the UNet."""
        return {name: m for name, m in self.unet.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Folds the LoRA adapter into the UNet weights and removes it (rewards unchanged)."""
        for name, layer in self.lora_layers().items():
            base = layer.base_layer
            base.weight.add_(layer.get_delta_weight("default"))
            parent_name, _, child = name.rpartition(".")
            setattr(self.unet.get_submodule(parent_name), child, base)
        self.config.lora_rank = 0
        self.requires_grad_(True)

    def save_pretrained(self, save_directory: str | os.PathLike, merge_lora: bool = True, **kwargs) -> None:
        """Saves a self-contained folder; with `merge_lora` (default) the adapter is folded into a copy's weights."""
        if not (merge_lora and self.config.lora_rank):
            return super().save_pretrained(save_directory, **kwargs)
        merged = copy.deepcopy(self)
        merged.merge_lora()
        return merged.save_pretrained(save_directory, **kwargs)

    # ------------------------------------------------------------------------------------------- text
    def _negative_ids(self, ids: list[int] | None, like: torch.Tensor, name: str) -> torch.Tensor:
        if ids is None:
            raise ValueError(
                f"config.{name} (the token ids of the empty prompt) is not set but guidance is on: build the model "
                "with `LRMModel.from_pipeline` or the converter, which read them from the tokenizer."
            )
        if len(ids) != like.shape[1]:
            raise ValueError(
                f"input ids have {like.shape[1]} tokens but config.{name} has {len(ids)}: tokenize with "
                f"padding='max_length', max_length={len(ids)}, truncation=True."
            )
        return torch.tensor(ids, dtype=like.dtype, device=like.device).expand(like.shape[0], -1)

    def encode_prompt(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None) -> LRMPromptEmbeds:
        r"""Runs the text encoder(s) once over the prompts and the empty prompt, as the official `get_text_features`.

        Args:
            input_ids (`torch.LongTensor` of shape `(P, tokens)`): the first tokenizer's ids (`padding="max_length"`).
            input_ids_2 (`torch.LongTensor` of shape `(P, tokens)`, *optional*): the second tokenizer's (SDXL).
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            raise ValueError(f"input_ids must be a 2D tensor (prompts, tokens), got {_describe(input_ids)}.")
        sdxl = self.config.backbone_type == "sdxl"
        if sdxl and (input_ids_2 is None or input_ids_2.shape[0] != input_ids.shape[0]):
            raise ValueError("An SDXL LRM needs input_ids_2 (the second tokenizer's ids), one row per prompt.")
        cfg = self.config.do_classifier_free_guidance
        num_prompts = input_ids.shape[0]
        if cfg:
            input_ids = torch.cat(
                [input_ids, self._negative_ids(self.config.negative_input_ids, input_ids, "negative_input_ids")]
            )
        if not sdxl:
            hidden, pooled = self.text_encoder(input_ids, return_dict=False)[:2]
            text_features = self.text_projection(pooled[:num_prompts])
            pooled_embeds = None
        else:
            if cfg:
                negative_2 = self._negative_ids(self.config.negative_input_ids_2, input_ids_2, "negative_input_ids_2")
                input_ids_2 = torch.cat([input_ids_2, negative_2])
            out_1 = self.text_encoder(input_ids, output_hidden_states=True)
            out_2 = self.text_encoder_2(input_ids_2, output_hidden_states=True)
            hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
            pooled_embeds = out_2.text_embeds
            text_features = pooled_embeds[:num_prompts]
        negative_hidden = hidden[num_prompts:] if cfg else None
        return LRMPromptEmbeds(
            encoder_hidden_states=hidden[:num_prompts],
            negative_encoder_hidden_states=negative_hidden,
            text_features=text_features,
            pooled_prompt_embeds=pooled_embeds[:num_prompts] if sdxl else None,
            negative_pooled_prompt_embeds=pooled_embeds[num_prompts:] if sdxl and cfg else None,
        )

    # ------------------------------------------------------------------------------------------ image
    def _add_time_ids(self, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        size = self.config.unet_config["sample_size"] * self.config.vae_scale_factor
        ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=dtype, device=device)
        return ids.repeat(rows, 1)

    def _unet_features(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """diffusers' `UNet2DConditionModel.forward` up to the mid block: `(mid_sample, down_block_res_samples)`."""
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), None)
        aug_emb = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {}
        )
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        sample = unet.conv_in(sample)
        down_block_res_samples = (sample,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            down_block_res_samples += res
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample = unet.mid_block(sample, emb)
        return sample, down_block_res_samples

    def check_inputs(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, num_prompts: int) -> None:
        """Raises a clear error for latents, timesteps or prompt counts the model cannot take."""
        channels = self.config.unet_config["in_channels"]
        if not isinstance(noisy_latents, torch.Tensor) or noisy_latents.ndim != 4:
            raise ValueError(
                f"latents must be a 4D tensor (batch, channels, height, width), got {_describe(noisy_latents)}."
            )
        if noisy_latents.shape[1] != channels:
            raise ValueError(
                f"latents have {noisy_latents.shape[1]} channels but the UNet takes {channels}: pass VAE latents "
                "multiplied by the VAE's scaling_factor, not images."
            )
        if timesteps.shape != (noisy_latents.shape[0],):
            raise ValueError(
                f"timesteps must hold one integer timestep per latent ({noisy_latents.shape[0]}), got shape "
                f"{tuple(timesteps.shape)}."
            )
        num_train = self.noise_scheduler.config.num_train_timesteps
        if timesteps.device.type == "cpu" and not ((timesteps >= 0) & (timesteps < num_train)).all():
            raise ValueError(f"timesteps must lie in [0, {num_train}), got {timesteps.tolist()}.")
        if num_prompts == 0 or noisy_latents.shape[0] % num_prompts:
            raise ValueError(
                f"{noisy_latents.shape[0]} latents for {num_prompts} prompts: latent r is scored with prompt "
                "r % num_prompts, so the number of latents must be a multiple of the number of prompts."
            )

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor | int,
        input_ids: torch.Tensor | None = None,
        input_ids_2: torch.Tensor | None = None,
        prompt_embeds: LRMPromptEmbeds | None = None,
        return_dict: bool = True,
    ) -> LRMOutput | tuple:
        r"""Rewards of latents that are ALREADY noised to integer DDPM `timesteps`.

        Args:
            noisy_latents (`torch.Tensor` of shape `(N, C, H, W)`): scaled VAE latents at `timesteps`.
            timesteps (`int` or `torch.LongTensor` of shape `(N,)`): DDPM timesteps in [0, num_train_timesteps).
            input_ids (`torch.LongTensor` of shape `(P, tokens)`, *optional*): the prompts' token ids; latent r is
                scored with prompt `r % P` (P = N, or the official pair layout N = 2P: images 0, then images 1).
            input_ids_2 (`torch.LongTensor`, *optional*): SDXL's second tokenizer's ids.
            prompt_embeds ([`LRMPromptEmbeds`], *optional*): precomputed `encode_prompt(...)` instead of ids.
            return_dict (`bool`, defaults to `True`): return an [`LRMOutput`] instead of a tuple.
        """
        if prompt_embeds is None:
            if input_ids is None:
                raise ValueError("Pass input_ids (and input_ids_2 for SDXL) or prompt_embeds from encode_prompt.")
            prompt_embeds = self.encode_prompt(input_ids, input_ids_2)
        timesteps = torch.as_tensor(timesteps, device=noisy_latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(noisy_latents.shape[0])
        num_prompts = prompt_embeds.encoder_hidden_states.shape[0]
        self.check_inputs(noisy_latents, timesteps, num_prompts)
        repeats = noisy_latents.shape[0] // num_prompts
        cfg = self.config.do_classifier_free_guidance
        hidden = prompt_embeds.encoder_hidden_states.repeat(repeats, 1, 1)
        sample = noisy_latents.to(self.unet.dtype)
        added = None
        if cfg:
            hidden = torch.cat([hidden, prompt_embeds.negative_encoder_hidden_states.repeat(repeats, 1, 1)])
            sample = torch.cat([sample, sample])
            timesteps = torch.cat([timesteps, timesteps])
        if self.config.backbone_type == "sdxl":
            pooled = prompt_embeds.pooled_prompt_embeds.repeat(repeats, 1)
            if cfg:
                pooled = torch.cat([pooled, prompt_embeds.negative_pooled_prompt_embeds.repeat(repeats, 1)])
            added = {
                "text_embeds": pooled,
                "time_ids": self._add_time_ids(sample.shape[0], hidden.dtype, sample.device),
            }
        mid, res = self._unet_features(sample, timesteps, hidden, added)
        features = [res[i].mean(dim=(2, 3)) for i in self.config.multi_scale_indices] + [mid.mean(dim=(2, 3))]
        if cfg:
            guided = []
            for position, feature in enumerate(features):
                cond, uncond = feature.chunk(2)
                is_mid = position == len(features) - 1
                # Official SDXL with multi_scale_cfg keeps its first down feature conditional.
                enhance = is_mid or (
                    self.config.multi_scale_cfg and not (position == 0 and self.config.backbone_type == "sdxl")
                )
                guided.append(uncond + self.config.guidance_scale * (cond - uncond) if enhance else cond)
            features = guided
        pooled_features = torch.cat(features, dim=-1)
        image_features = self.visual_projection(pooled_features)
        image_embeds = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = prompt_embeds.text_features
        text_embeds = text_features / text_features.norm(dim=-1, keepdim=True)
        rewards = self.logit_scale.exp() * (image_embeds * text_embeds.repeat(repeats, 1)).sum(-1)
        if not return_dict:
            return (rewards, image_embeds, text_embeds, pooled_features)
        return LRMOutput(
            rewards=rewards, image_embeds=image_embeds, text_embeds=text_embeds, pooled_features=pooled_features
        )

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        r"""Noises clean latents to integer `timesteps` with the backbone's DDPM schedule (`DDPMScheduler.add_noise`):
        `sqrt(alpha_bar_t) * latents + sqrt(1 - alpha_bar_t) * noise`, the forward process of training and scoring.
        """
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def score_latents(
        self,
        latents: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        input_ids_2: torch.Tensor | None = None,
        prompt_embeds: LRMPromptEmbeds | None = None,
        t: int | Sequence[int] | torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        r"""Rewards of CLEAN latents, shape `(N,)`; differentiable w.r.t. `latents` when grad is enabled.

        Args:
            latents (`torch.Tensor` of shape `(N, C, H, W)`): clean VAE latents times the VAE's scaling factor.
            input_ids, input_ids_2, prompt_embeds: the prompts, as in [`~LRMModel.forward`].
            t (`int` or `torch.LongTensor` of shape `(N,)`, *optional*): DDPM timestep(s); defaults to
                `config.default_timestep` (1, the official validation timestep).
            noise (`torch.Tensor`, *optional*): Gaussian noise shaped like `latents`; drawn from `generator` if omitted.
            generator (`torch.Generator`, *optional*): source of the noise.
        """
        if t is None:
            t = self.config.default_timestep
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            raise ValueError(
                f"latents must be a 4D tensor (batch, channels, height, width), got {_describe(latents)}."
            )
        if noise is None:
            noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        elif noise.shape != latents.shape:
            raise ValueError(f"noise must have the shape of latents {tuple(latents.shape)}, got {tuple(noise.shape)}.")
        timesteps = torch.as_tensor(t, device=latents.device).long()
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        noisy = self.add_noise(latents, noise.to(latents.device), timesteps)
        return self(noisy, timesteps, input_ids, input_ids_2, prompt_embeds=prompt_embeds).rewards

    # -------------------------------------------------------------------------------------- objective
    @staticmethod
    def preference_loss(
        rewards_0: torch.Tensor,
        rewards_1: torch.Tensor,
        label_0: torch.Tensor,
        label_1: torch.Tensor | None = None,
        num_examples_per_prompt: torch.Tensor | None = None,
        timesteps_0: torch.Tensor | None = None,
        timesteps_1: torch.Tensor | None = None,
        aux_loss_coeff: float = 1.0,
        reduction: str = "sum",
    ) -> torch.Tensor:
        r"""The official pair loss (`StepCLIPCriterion`, loss_type "pair") of rewards read by [`~LRMModel.forward`].

        Per pair `j`: cross-entropy of the two-way softmax over `(r0_j, r1_j)` against the soft labels, plus
        `log 0.5` for a tie (`label_0 == label_1`) so that its minimum is 0; weighted by
        `w_j = (1 / n_j) / sum_k (1 / n_k)` (prompts with many pairs count less; uniform without
        `num_examples_per_prompt`) and by `aux_loss_coeff` for pairs read at two different timesteps.

        Args:
            rewards_0 (`torch.Tensor` of shape `(B,)`): rewards of image 0 of every pair.
            rewards_1 (`torch.Tensor` of shape `(B,)`): rewards of image 1.
            label_0 (`torch.Tensor` of shape `(B,)`): 1 if image 0 is preferred, 0 if image 1, 0.5 for a tie.
            label_1 (`torch.Tensor` of shape `(B,)`, *optional*): defaults to `1 - label_0`.
            num_examples_per_prompt (`torch.Tensor` of shape `(B,)`, *optional*): pairs the dataset has per prompt.
            timesteps_0, timesteps_1 (`torch.Tensor` of shape `(B,)`, *optional*): the timesteps of the two images.
            aux_loss_coeff (`float`, defaults to 1.0): weight of pairs whose images have different timesteps.
            reduction (`str`, defaults to `"sum"`): `"sum"` (the official weighted sum) or `"none"` (weighted terms).
        """
        if reduction not in ("sum", "none"):
            raise ValueError(f"reduction={reduction!r} is not supported: use 'sum' (official) or 'none'.")
        rewards_0, rewards_1 = rewards_0.reshape(-1), rewards_1.reshape(-1)
        label_0 = label_0.reshape(-1).to(rewards_0.dtype)
        label_1 = (1.0 - label_0) if label_1 is None else label_1.reshape(-1).to(rewards_0.dtype)
        if not (rewards_1.shape == label_0.shape == label_1.shape == rewards_0.shape):
            raise ValueError("rewards_0, rewards_1, label_0 and label_1 must hold one value per pair.")
        log_probs = torch.stack([rewards_0, rewards_1], dim=-1).log_softmax(dim=-1)
        losses = -(label_0 * log_probs[:, 0] + label_1 * log_probs[:, 1])
        losses = losses + (label_0 == label_1).to(losses.dtype) * torch.log(torch.tensor(0.5, device=losses.device))
        if num_examples_per_prompt is None:
            num_examples_per_prompt = torch.ones_like(losses)
        inverse = 1.0 / num_examples_per_prompt.reshape(-1).to(losses.dtype)
        losses = losses * (inverse / inverse.sum())
        if timesteps_0 is not None and timesteps_1 is not None:
            different = timesteps_0.reshape(-1) != timesteps_1.reshape(-1)
            losses = losses * torch.where(different, aux_loss_coeff, 1.0).to(losses.dtype)
        return losses.sum() if reduction == "sum" else losses

    @staticmethod
    def preference_probability(rewards_0: torch.Tensor, rewards_1: torch.Tensor) -> torch.Tensor:
        """P(image 0 preferred) per pair: the softmax of the two rewards (the official validation rule)."""
        return torch.sigmoid(rewards_0.reshape(-1) - rewards_1.reshape(-1))

    # --------------------------------------------------------------------------------- construction
    @classmethod
    def from_pipeline(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        revision: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        text_projection_weight: torch.Tensor | None = None,
        **config_kwargs,
    ) -> "LRMModel":
        r"""Builds an LRM on a diffusers SD1.5 / SDXL pipeline (Hub id or folder), as the official constructors do.

        The UNet (without its up path), the text encoder(s), the scheduler config and the empty prompt's token ids
        come from the pipeline; the visual projection and logit scale start from the official init. For SD1.5 the
        official model copies CLIP ViT-L/14's text projection (`openai/clip-vit-large-patch14`), which the pipeline
        does not ship: pass it as `text_projection_weight` (otherwise it starts from a random init, with a warning).
        """
        from transformers import CLIPTokenizer

        path = str(pretrained_model_name_or_path)

        def load(component_cls, subfolder):
            return component_cls.from_pretrained(path, subfolder=subfolder, revision=revision)

        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision)
        scheduler_config = dict(DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision))
        vae_config = AutoencoderKL.load_config(path, subfolder="vae", revision=revision)
        sdxl = unet.config.get("addition_embed_type") == "text_time"
        text_encoder = load(CLIPTextModel, "text_encoder")
        tokenizer = load(CLIPTokenizer, "tokenizer")
        kwargs = {
            "backbone_type": "sdxl" if sdxl else "sd15",
            "unet_config": {k: v for k, v in unet.config.items() if not k.startswith("_")},
            "text_config": text_encoder.config.to_dict(),
            "scheduler_config": {k: v for k, v in scheduler_config.items() if not k.startswith("_")},
            "negative_input_ids": _empty_prompt_ids(tokenizer),
            "vae_scale_factor": 2 ** (len(vae_config["block_out_channels"]) - 1),
            "base_model_name_or_path": path,
        }
        if sdxl:
            text_encoder_2 = load(CLIPTextModelWithProjection, "text_encoder_2")
            kwargs["text_config_2"] = text_encoder_2.config.to_dict()
            kwargs["negative_input_ids_2"] = _empty_prompt_ids(load(CLIPTokenizer, "tokenizer_2"))
            kwargs["projection_dim"] = text_encoder_2.config.projection_dim
        if text_projection_weight is not None:
            kwargs["projection_dim"] = text_projection_weight.shape[0]
        kwargs.update(config_kwargs)
        model = cls(LRMConfig(**kwargs))
        state = {f"unet.{k}": v for k, v in unet.state_dict().items() if not k.startswith(UNUSED_UNET_PREFIXES)}
        state.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
        if sdxl:
            state.update({f"text_encoder_2.{k}": v for k, v in text_encoder_2.state_dict().items()})
        if text_projection_weight is not None:
            state["text_projection.weight"] = text_projection_weight
        elif not sdxl:
            logger.warning(
                "No text_projection_weight given: the text projection starts from a random init instead of CLIP "
                "ViT-L/14's (official)."
            )
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if k.startswith(("unet.", "text_encoder"))]
        if missing or result.unexpected_keys:
            raise ValueError(f"{path}: missing keys {missing[:8]}, unexpected keys {result.unexpected_keys[:8]}")
        model.to(torch_dtype)
        return model


def _empty_prompt_ids(tokenizer) -> list[int]:
    """Token ids of the empty prompt as the official models tokenize it (padded to the tokenizer's maximum length)."""
    return (
        tokenizer(
            [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        .input_ids[0]
        .tolist()
    )


LRMConfig.register_for_auto_class()
LRMModel.register_for_auto_class("AutoModel")
