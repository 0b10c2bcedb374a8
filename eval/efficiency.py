"""FLOPs and memory of DiNa-LRM versus pixel-space rewards, for one reward call and one ReFL step.

Setting: 1024x1024 images, batch 1, bf16. A ReFL step back-propagates the reward into its input (the generator's
latents); the reward model itself is frozen, so no weight gradients are formed. Every model is built from its
published configuration on the `meta` device: shapes and dtypes are real, no weight is allocated, nothing is
downloaded.

- FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add of matmuls, convolutions
  and attention; element-wise ops and norms are not counted).
- Attention is routed to PyTorch's fused memory-efficient SDPA kernel (the O(N)-memory kernel used on GPUs) for
  every model, so no model is charged for an N x N attention matrix.
- Peak activation memory: a dispatch mode records every tensor storage an op allocates (views and in-place
  results share their input's storage, so parameters, buffers and the caller's inputs never count) and follows
  its lifetime through a weak reference; the peak is the largest live total after any op, over the forward pass
  (inference, `no_grad`) or over forward + backward (ReFL). It is what a caching-free allocator would need on
  top of the weights; allocator slack, workspaces and the CUDA context are not modelled.

Run `python eval/efficiency.py [--json PATH] [--resolution 1024]`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import textwrap
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPConfig,
    CLIPModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from modeling_dinalrm import SD35_MEDIUM_TRANSFORMER_CONFIG, DiNaLRMConfig, DiNaLRMModel


DTYPE = torch.bfloat16
GIB = 1024**3

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (kept once, in modeling_dinalrm).
SD35M_TRANSFORMER = SD35_MEDIUM_TRANSFORMER_CONFIG

# stabilityai/stable-diffusion-3.5-medium, vae/config.json.
SD35M_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# Qwen/Qwen2-VL-7B-Instruct, config.json (HPSv3's backbone), in transformers 5's nested layout.
QWEN2_VL_7B = {
    "text_config": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    },
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "hidden_size": 3584,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "tie_word_embeddings": False,
}

# laion/CLIP-ViT-H-14-laion2B-s32B-b79K, config.json (PickScore_v1 is a fine-tune of it).
CLIP_VIT_H14 = {
    "projection_dim": 1024,
    "text_config": {
        "vocab_size": 49408,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
    },
    "vision_config": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "gelu",
    },
}

# DiNa-LRM recipe (the training recipe in README.md: 12 blocks of SD3.5-M, features of blocks 4, 8, 12).
DINALRM_BLOCKS = 12
DINALRM_LAYERS = (4, 8, 12)
DINALRM_NOISE_LEVEL = 0.4
SD3_TEXT_TOKENS = 77 + 77  # CLIP + T5 at SD3's default max_sequence_length 77
DINALRM_TRAIN_TEXT_TOKENS = 77 + 128  # CLIP + T5 at DiNa-LRM's training max_sequence_length 128

# HPSv3 (MizzenAI/HPSv3, hpsv3/inference.py and config/HPSv3_7B.yaml): min_pixels = max_pixels = 256 * 28 * 28,
# so a square image becomes 448 x 448 -> 32 x 32 patches -> 256 visual tokens after the 2 x 2 merge. Text around
# them (chat template with the default system prompt, HPSv3's instruction, the prompt, "<|Reward|>" suffix): an
# estimate of 90 template tokens plus a 20-token prompt, 15 of them before the image and 95 after it.
HPSV3_PIXELS = 256 * 28 * 28
HPSV3_TOKENS_BEFORE_IMAGE = 15
HPSV3_TOKENS_AFTER_IMAGE = 95
# Qwen2-VL's own processor defaults (min 56 * 56, max 1280 * 28 * 28 pixels): a sensitivity check only.
QWEN2_VL_DEFAULT_MIN_PIXELS = 56 * 56
QWEN2_VL_DEFAULT_PIXELS = 1280 * 28 * 28
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PICKSCORE_TEXT_TOKENS = 77

PAPER_CLAIMS = {"refl_reward_flops_change_vs_hpsv3": -0.711, "refl_peak_vram_change_vs_hpsv3": -0.514}


def fused_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for `F.scaled_dot_product_attention` that always uses the fused memory-efficient kernel.

    Grouped-query attention is modelled as a GQA-aware kernel does it: the query heads sharing one key/value head
    are laid out along the sequence axis, which gives the same FLOPs and the same saved tensors without copying
    keys and values.
    """
    *batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[-3]
    if enable_gqa and kv_heads != heads:
        query = query.reshape(*batch, kv_heads, heads // kv_heads * length, head_dim)
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale
    )[0]
    return out.reshape(*batch, heads, length, value.shape[-1])


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Route every `F.scaled_dot_product_attention` call to `fused_sdpa` while active."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class PeakMemoryMode(TorchDispatchMode):
    """Peak total size of the live tensor storages allocated by ops while the mode is active.

    An op output counts when its storage is not one of the op's input storages (views and in-place results
    share their input's storage), so parameters, buffers and the caller's inputs are never counted. A storage
    stops counting when it is freed (a weak-reference callback).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int, nbytes: int, _ref: weakref.ref) -> None:
        del self.live[key]
        self.current -= nbytes

    def __torch_dispatch__(
        self, func: torch._ops.OpOverload, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> object:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in inputs and key not in self.live:
                    self.live[key] = weakref.ref(storage, functools.partial(self._release, key, storage.nbytes()))
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


@dataclass
class Cost:
    """FLOPs and peak activation bytes of one reward call (forward) and of one ReFL step (forward + backward)."""

    flops_forward: int
    flops_refl: int
    peak_forward: int
    peak_refl: int


def measure(reward: Callable[[torch.Tensor], torch.Tensor], make_input: Callable[[], torch.Tensor]) -> Cost:
    """Measure `reward` on fresh inputs: inference under `no_grad`, then forward + backward into the input.

    The forward FLOPs are read from the ReFL pass before its backward starts (the same ops run without grad).
    """
    with fused_attention():
        with PeakMemoryMode() as inference, torch.no_grad():
            reward(make_input())
        x = make_input().requires_grad_()
        with FlopCounterMode(display=False) as counter, PeakMemoryMode() as refl:
            total = reward(x).sum()
            flops_forward = counter.get_total_flops()
            total.backward()
    return Cost(flops_forward, counter.get_total_flops(), inference.peak, refl.peak)


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module on the meta device in bf16, frozen and in eval mode.

    The dtype cast is `nn.Module.to` itself: the diffusers / transformers overrides only add warnings and
    quantisation checks that do not apply to a cost model.
    """
    with torch.device("meta"):
        module = build()
    nn.Module.to(module, DTYPE)
    return module.eval().requires_grad_(False)


def weight_stats(*modules: nn.Module) -> tuple[int, int]:
    """Number of parameters, and bytes of parameters plus persistent buffers in bf16."""
    params = sum(p.numel() for m in modules for p in m.parameters())
    stored = sum(t.numel() for m in modules for t in m.state_dict().values())
    return params, stored * torch.finfo(DTYPE).bits // 8


def build_dinalrm(
    config: dict = SD35M_TRANSFORMER,
    num_blocks: int = DINALRM_BLOCKS,
    layers: tuple[int, ...] = DINALRM_LAYERS,
) -> nn.Module:
    """The repository's `DiNaLRMModel` on meta; `layers` are the 1-based blocks feeding the head (image and text)."""
    model_config = DiNaLRMConfig(
        backbone_config=config, num_backbone_layers=num_blocks, visual_layers=layers, text_layers=layers
    )
    return on_meta(lambda: DiNaLRMModel(model_config))


def dinalrm_reward(model: nn.Module, text_tokens: int, config: dict = SD35M_TRANSFORMER) -> Callable:
    """Reward of clean latents: noised to t = 0.4 with a fixed noise draw, then backbone, fusion and pooling.

    The backbone and head are called directly (as `DiNaLRMModel.score_latents` does after its input checks,
    which read tensor values and so cannot run on meta tensors).
    """
    pooled = torch.zeros(1, config["pooled_projection_dim"], device="meta", dtype=DTYPE)
    prompt_embeds = torch.zeros(1, text_tokens, config["joint_attention_dim"], device="meta", dtype=DTYPE)
    timestep = torch.full((1,), 1000 * DINALRM_NOISE_LEVEL, device="meta")

    def reward(latents: torch.Tensor) -> torch.Tensor:
        noisy = (1 - DINALRM_NOISE_LEVEL) * latents + DINALRM_NOISE_LEVEL * torch.zeros_like(latents)
        temb, visual, text = model.backbone(noisy, prompt_embeds, pooled, timestep)
        return model.reward_head.pool(*model.reward_head.fuse(visual, text, temb))

    return reward


def build_vae(config: dict = SD35M_VAE) -> AutoencoderKL:
    """SD3.5-Medium's VAE on meta."""
    return on_meta(lambda: AutoencoderKL(**config))


def vae_decode(vae: AutoencoderKL) -> Callable:
    """Scaled latents -> RGB in [0, 1], as SD3 pipelines decode them."""

    def decode(latents: torch.Tensor) -> torch.Tensor:
        scaled = latents / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(scaled).sample / 2 + 0.5).clamp(0, 1)

    return decode


def qwen_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides multiple of `factor`, area within bounds, aspect ratio kept."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / shrink / factor) * factor, math.floor(width / shrink / factor) * factor
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * grow / factor) * factor, math.ceil(width * grow / factor) * factor
    return h, w


def sdpa_config(config_class: type, config: dict):
    """A transformers config built from `config` that runs attention through torch SDPA."""
    built = config_class(**config)
    built._attn_implementation = "sdpa"
    return built


class HPSv3Reward(nn.Module):
    """HPSv3: Qwen2-VL on the image and instruction, an MLP head read at the reward token (mu of the output)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        qwen_config = sdpa_config(Qwen2VLConfig, config)
        self.qwen = Qwen2VLForConditionalGeneration(qwen_config)
        hidden = qwen_config.text_config.hidden_size
        self.rm_head = nn.Sequential(
            nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2)
        )

    def forward(
        self, pixels: torch.Tensor, pixel_budget: tuple[int, int], tokens_around: tuple[int, int]
    ) -> torch.Tensor:
        """Score images in [0, 1] (batch 1) with the differentiable preprocessing HPSv3 uses for ReFL."""
        vision = self.qwen.config.vision_config
        height, width = qwen_resize(*pixels.shape[-2:], *pixel_budget)
        image = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        image = ((image - mean) / std).repeat(vision.temporal_patch_size, 1, 1, 1)
        patch, merge = vision.patch_size, vision.spatial_merge_size
        grid_h, grid_w = height // patch, width // patch
        patches = image.view(
            1, vision.temporal_patch_size, 3, grid_h // merge, merge, patch, grid_w // merge, merge, patch
        )
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(grid_h * grid_w, -1)
        image_embeds = self.qwen.model.visual(
            patches,
            grid_thw=torch.tensor([[1, grid_h, grid_w]]),
            cu_seqlens=torch.tensor([0, grid_h * grid_w], dtype=torch.int32),
            position_ids=torch.zeros(grid_h * grid_w, 2, dtype=torch.long, device=image.device),
        ).pooler_output
        embed = self.qwen.get_input_embeddings()
        before, after = (torch.zeros(1, n, dtype=torch.long, device=image.device) for n in tokens_around)
        embeds = torch.cat([embed(before), image_embeds.unsqueeze(0).to(embed.weight.dtype), embed(after)], dim=1)
        positions = torch.zeros(3, 1, embeds.shape[1], dtype=torch.long, device=image.device)
        hidden = self.qwen.model.language_model(
            inputs_embeds=embeds, position_ids=positions, use_cache=False
        ).last_hidden_state
        # HPSv3 reads the head at its "<|Reward|>" token; which position it is does not change the cost.
        return self.rm_head(hidden.float())[:, -1, 0]


def build_hpsv3(config: dict = QWEN2_VL_7B) -> HPSv3Reward:
    """HPSv3 on meta; its reward head stays in float32 as in the released model."""
    model = on_meta(lambda: HPSv3Reward(config))
    model.rm_head.float()
    return model


def hpsv3_reward(
    model: HPSv3Reward,
    pixel_budget: tuple[int, int] = (HPSV3_PIXELS, HPSV3_PIXELS),
    tokens_around: tuple[int, int] = (HPSV3_TOKENS_BEFORE_IMAGE, HPSV3_TOKENS_AFTER_IMAGE),
) -> Callable:
    """HPSv3 reward of an image batch in [0, 1]."""
    return lambda pixels: model(pixels, pixel_budget, tokens_around)


class PickScoreReward(nn.Module):
    """PickScore: CLIP ViT-H/14, logit scale times the cosine of image and prompt embeddings."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.clip = CLIPModel(sdpa_config(CLIPConfig, config))

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Score images in [0, 1]: resize to the CLIP resolution, normalise, embed, compare."""
        size = self.clip.config.vision_config.image_size
        image = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        image_emb = self.clip.get_image_features(pixel_values=(image - mean) / std).pooler_output
        text_emb = self.clip.get_text_features(input_ids=input_ids).pooler_output
        cosine = (F.normalize(image_emb, dim=-1) * F.normalize(text_emb, dim=-1)).sum(-1)
        return self.clip.logit_scale.exp() * cosine


def build_pickscore(config: dict = CLIP_VIT_H14) -> PickScoreReward:
    """PickScore on meta."""
    return on_meta(lambda: PickScoreReward(config))


def pickscore_reward(model: PickScoreReward, text_tokens: int = PICKSCORE_TEXT_TOKENS) -> Callable:
    """PickScore reward of an image batch in [0, 1] for a prompt padded to `text_tokens`."""
    input_ids = torch.zeros(1, text_tokens, dtype=torch.long, device="meta")
    return lambda pixels: model(pixels, input_ids)


@dataclass
class Row:
    """One line of the report."""

    name: str
    input: str
    params: int
    weight_bytes: int
    flops_forward: int
    flops_refl: int
    activation_peak_forward: int
    activation_peak_refl: int

    @property
    def peak_forward(self) -> int:
        """Weights plus forward activations."""
        return self.weight_bytes + self.activation_peak_forward

    @property
    def peak_refl(self) -> int:
        """Weights plus forward-and-backward activations."""
        return self.weight_bytes + self.activation_peak_refl


def profile(name: str, reward: Callable, input_shape: tuple[int, ...], modules: list[nn.Module]) -> Row:
    """Measure one reward on meta inputs of `input_shape`; `modules` are the weights it keeps in memory."""
    params, weight_bytes = weight_stats(*modules)
    cost = measure(reward, lambda: torch.zeros(input_shape, device="meta", dtype=DTYPE))
    label = "x".join(str(s) for s in input_shape)
    return Row(
        name, label, params, weight_bytes, cost.flops_forward, cost.flops_refl, cost.peak_forward, cost.peak_refl
    )


def change(ours: float, theirs: float) -> float:
    """Relative change of `ours` with respect to `theirs` (-0.7 = 70% less)."""
    return ours / theirs - 1


def run(resolution: int = 1024) -> dict:
    """Measure every model at `resolution`; returns settings, rows, ratios and the paper comparison."""
    latent_shape = (1, SD35M_VAE["latent_channels"], resolution // 8, resolution // 8)
    pixel_shape = (1, 3, resolution, resolution)
    dinalrm = build_dinalrm()
    vae, hpsv3, pickscore = build_vae(), build_hpsv3(), build_pickscore()
    decode = vae_decode(vae)
    hps, pick = hpsv3_reward(hpsv3), pickscore_reward(pickscore)
    hps_default = hpsv3_reward(hpsv3, pixel_budget=(QWEN2_VL_DEFAULT_MIN_PIXELS, QWEN2_VL_DEFAULT_PIXELS))
    hps_side = qwen_resize(resolution, resolution, HPSV3_PIXELS, HPSV3_PIXELS)[0]
    default_side = qwen_resize(resolution, resolution, QWEN2_VL_DEFAULT_MIN_PIXELS, QWEN2_VL_DEFAULT_PIXELS)[0]
    dina_short = f"DiNa-LRM ({SD3_TEXT_TOKENS} text tokens)"
    dina_long = f"DiNa-LRM ({DINALRM_TRAIN_TEXT_TOKENS} text tokens)"
    vae_hps, vae_pick = f"VAE + HPSv3 ({hps_side}px)", "VAE + PickScore (224px)"
    vae_hps_default = f"VAE + HPSv3 at Qwen2-VL default ({default_side}px)"
    rows = [
        profile(dina_short, dinalrm_reward(dinalrm, SD3_TEXT_TOKENS), latent_shape, [dinalrm]),
        profile(dina_long, dinalrm_reward(dinalrm, DINALRM_TRAIN_TEXT_TOKENS), latent_shape, [dinalrm]),
        profile("SD3.5-M VAE decode", decode, latent_shape, [vae]),
        profile(f"HPSv3 (Qwen2-VL-7B, {hps_side}px)", hps, pixel_shape, [hpsv3]),
        profile("PickScore (CLIP ViT-H/14, 224px)", pick, pixel_shape, [pickscore]),
        profile(vae_hps, lambda z: hps(decode(z)), latent_shape, [vae, hpsv3]),
        profile(vae_pick, lambda z: pick(decode(z)), latent_shape, [vae, pickscore]),
        profile(vae_hps_default, lambda z: hps_default(decode(z)), latent_shape, [vae, hpsv3]),
    ]
    by_name = {row.name: row for row in rows}
    ratios = {
        f"{ours} vs {theirs}": {
            "refl_flops": change(by_name[ours].flops_refl, by_name[theirs].flops_refl),
            "refl_peak_memory": change(by_name[ours].peak_refl, by_name[theirs].peak_refl),
            "forward_flops": change(by_name[ours].flops_forward, by_name[theirs].flops_forward),
            "forward_peak_memory": change(by_name[ours].peak_forward, by_name[theirs].peak_forward),
        }
        for ours in (dina_short, dina_long)
        for theirs in (vae_hps, vae_pick, vae_hps_default)
    }
    ours, theirs = by_name[dina_short], by_name[vae_hps]
    flops_claim = PAPER_CLAIMS["refl_reward_flops_change_vs_hpsv3"]
    memory_claim = PAPER_CLAIMS["refl_peak_vram_change_vs_hpsv3"]
    return {
        "settings": {
            "resolution": resolution,
            "batch": 1,
            "dtype": str(DTYPE),
            "dinalrm_blocks": DINALRM_BLOCKS,
            "sd35m_blocks": SD35M_TRANSFORMER["num_layers"],
            "dinalrm_image_tokens": (latent_shape[-1] // SD35M_TRANSFORMER["patch_size"]) ** 2,
            "hpsv3_image_side": hps_side,
            "hpsv3_text_tokens": HPSV3_TOKENS_BEFORE_IMAGE + HPSV3_TOKENS_AFTER_IMAGE,
            "hpsv3_unused_lm_head_params": hpsv3.qwen.lm_head.weight.numel(),
            "qwen2_vl_default_image_side": default_side,
            "pickscore_text_tokens": PICKSCORE_TEXT_TOKENS,
        },
        "rows": [{**asdict(row), "peak_forward": row.peak_forward, "peak_refl": row.peak_refl} for row in rows],
        "ratios": ratios,
        "paper": PAPER_CLAIMS,
        "paper_comparison": {
            "vae_decode_vs_dinalrm_forward_flops": by_name["SD3.5-M VAE decode"].flops_forward / ours.flops_forward,
            "pixel_refl_flops_hpsv3": theirs.flops_refl,
            "pixel_refl_flops_hpsv3_default": by_name[vae_hps_default].flops_refl,
            # Pixel pipeline ReFL FLOPs for which DiNa-LRM's count would give the paper's FLOPs change.
            "implied_pixel_refl_flops": ours.flops_refl / (1 + flops_claim),
            # Memory shared by both ReFL setups (generator, text encoders, ...) that turns our weights +
            # activations figures into the paper's VRAM change: (a + m) / (b + m) = 1 + claim.
            "implied_shared_memory_bytes": (ours.peak_refl - (1 + memory_claim) * theirs.peak_refl) / memory_claim,
        },
    }


NOTES = {
    "Method": [
        "DiNa-LRM: modeling_dinalrm.DiNaLRMModel, the first {dinalrm_blocks} of {sd35m_blocks} SD3.5-M blocks, scoring the "
        "generator's latents at t = 0.4 with the generator's prompt embeddings (SD3's text encoders are not charged).",
        "Pixel rewards: latents -> SD3.5-M VAE decode (bf16) -> differentiable preprocessing -> reward. HPSv3 "
        "resizes to {hpsv3_image_side}x{hpsv3_image_side} (min_pixels = max_pixels = 256*28*28 in its inference "
        "code, 256 visual tokens) and reads ~{hpsv3_text_tokens} text tokens (estimated: chat template, HPSv3's "
        "instruction and a short prompt); PickScore reads 224x224 pixels and {pickscore_text_tokens} text tokens.",
        "FLOPs: torch.utils.flop_counter.FlopCounterMode on meta tensors; matmuls, convolutions and attention only, "
        "2 per multiply-add, causal attention counted as full. ReFL = forward + backward into the input with the "
        "reward frozen: no weight gradients, so the backward is ~1x the forward for matmuls and 2.5x for the fused "
        "attention (which recomputes the scores).",
        "Memory: weights = parameters + persistent buffers in bf16 (HPSv3 also holds Qwen2-VL's {lm_head:.2f}B-"
        "parameter LM head, which the reward never uses). Activations: every storage an op allocates is followed "
        "through a weak reference until it is freed, and the figure is the peak of the live total during the "
        "forward (no_grad) or the forward + backward; at the end of the forward that total equals the size of the "
        "tensors autograd saved for backward. Every model uses a fused O(N)-memory attention kernel; no gradient "
        "checkpointing; allocator caching, workspaces and the CUDA context are not counted. Peak = weights + "
        "activation peak.",
    ],
    "Why our ratios differ from the paper's": [
        "FLOPs: the paper's {flops_claim:+.1%} would mean a pixel pipeline of {implied_flops:.1f} TFLOPs per ReFL "
        "step. We count {hps_flops:.1f} TFLOPs with HPSv3 at its own {hpsv3_image_side}px input and "
        "{default_flops:.1f} TFLOPs with the image kept near full size ({qwen2_vl_default_image_side}px, Qwen2-VL's "
        "default max_pixels); the paper's figure {implied_position}, so it depends on the HPSv3 input size used, "
        "which we could not pin down. The VAE decode alone costs {vae_vs_dinalrm:.1f}x DiNa-LRM's forward FLOPs; "
        "DiNa-LRM's cost is {dinalrm_image_tokens} image tokens through {dinalrm_blocks} dual-attention blocks and "
        "hardly depends on the prompt length.",
        "Memory: our figures cover the reward side only. The paper's {memory_claim:+.1%} is for a whole ReFL step, "
        "which also holds what both setups share (the SD3.5-M generator and whatever of its text encoders, "
        "activations and optimiser state stays on the GPU): {shared_memory:.1f} GiB of such shared memory would "
        "turn our reward-side change into the paper's. Real allocators add overhead on top.",
    ],
}


def format_report(result: dict) -> str:
    """Human-readable table, ratios, paper comparison and method notes."""
    columns = [
        ("model", "", 46),
        ("input", "", 14),
        ("params", "(B)", 8),
        ("weights", "(GiB)", 9),
        ("GFLOPs", "fwd", 9),
        ("GFLOPs", "fwd+bwd", 9),
        ("act fwd", "(GiB)", 9),
        ("act ReFL", "(GiB)", 10),
        ("peak fwd", "(GiB)", 10),
        ("peak ReFL", "(GiB)", 11),
    ]
    lines = [
        "".join(f"{title:<{w}}" if i == 0 else f"{title:>{w}}" for i, (title, _, w) in enumerate(columns)),
        "".join(f"{unit:<{w}}" if i == 0 else f"{unit:>{w}}" for i, (_, unit, w) in enumerate(columns)),
    ]
    lines.append("-" * len(lines[0]))
    for row in result["rows"]:
        lines.append(
            f"{row['name']:<46}{row['input']:>14}{row['params'] / 1e9:>8.3f}{row['weight_bytes'] / GIB:>9.2f}"
            f"{row['flops_forward'] / 1e9:>9.0f}{row['flops_refl'] / 1e9:>9.0f}"
            f"{row['activation_peak_forward'] / GIB:>9.2f}{row['activation_peak_refl'] / GIB:>10.2f}"
            f"{row['peak_forward'] / GIB:>10.2f}{row['peak_refl'] / GIB:>11.2f}"
        )
    lines += ["", "DiNa-LRM relative to latents -> VAE decode -> pixel reward (negative = DiNa-LRM is cheaper):"]
    for pair, ratio in result["ratios"].items():
        lines.append(
            f"  {pair:<78} ReFL: FLOPs {ratio['refl_flops']:+6.1%}, peak {ratio['refl_peak_memory']:+6.1%}"
            f" | inference: FLOPs {ratio['forward_flops']:+6.1%}, peak {ratio['forward_peak_memory']:+6.1%}"
        )
    paper, comparison = result["paper"], result["paper_comparison"]
    flops_claim, memory_claim = paper["refl_reward_flops_change_vs_hpsv3"], paper["refl_peak_vram_change_vs_hpsv3"]
    lines += [
        "",
        f"Paper (ReFL step, 1024^2, batch 1, vs HPSv3): reward FLOPs {flops_claim:+.1%}, "
        f"peak VRAM {memory_claim:+.1%}.",
    ]
    implied, low, high = (
        comparison[key]
        for key in ("implied_pixel_refl_flops", "pixel_refl_flops_hpsv3", "pixel_refl_flops_hpsv3_default")
    )
    values = {
        **result["settings"],
        "implied_position": "lies between the two" if low < implied < high else "lies outside this range",
        "vae_vs_dinalrm": comparison["vae_decode_vs_dinalrm_forward_flops"],
        "flops_claim": flops_claim,
        "memory_claim": memory_claim,
        "lm_head": result["settings"]["hpsv3_unused_lm_head_params"] / 1e9,
        "implied_flops": implied / 1e12,
        "hps_flops": low / 1e12,
        "default_flops": high / 1e12,
        "shared_memory": comparison["implied_shared_memory_bytes"] / GIB,
    }
    for title, paragraphs in NOTES.items():
        lines += ["", title]
        lines += [
            textwrap.fill(text.format(**values), 116, initial_indent="  - ", subsequent_indent="    ")
            for text in paragraphs
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels (default 1024)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(args.resolution)
    result["settings"]["seconds"] = round(time.perf_counter() - start, 1)
    print(format_report(result))
    print(f"\n(measured in {result['settings']['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
