"""FLOPs and memory of DiNa-LRM versus pixel-space rewards, for one reward call and one whole ReFL step.

Setting: 1024x1024 images, batch 1, bf16. On the reward side, a ReFL step back-propagates the reward into its input
(the generator's latents); the reward model itself is frozen, so no weight gradients are formed. The whole step adds
the generator as `benchmarks/gpu_refl_step.py` runs it on a GPU: SD3.5-Medium's full transformer, every weight
trainable, predicts the clean latents from noisy ones at t = 0.6, and `-reward` is back-propagated into its weights.
Every model is built from its published configuration on the `meta` device: shapes and dtypes are real, no weight
is allocated, nothing is downloaded. The modelled figures are set beside the paper's and beside the H200 measurement
in `eval/results/refl_step_h200.json`. DiNa-LRM's reward side is also modelled on FLUX.1-dev and Z-Image-Turbo
(their feature extractors in `modeling_dinalrm`, real configs).

- FLOPs come from `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add of matmuls, convolutions
  and attention; element-wise ops and norms are not counted).
- Attention is routed to PyTorch's fused memory-efficient SDPA kernel (the O(N)-memory kernel used on GPUs) for
  every model, so no model is charged for an N x N attention matrix.
- Peak activation memory: a dispatch mode records every tensor storage an op allocates (views and in-place
  results share their input's storage, so parameters, buffers and the caller's inputs never count) and follows
  its lifetime through a weak reference; the peak is the largest live total after any op, over the forward pass
  (inference, `no_grad`) or over forward + backward (ReFL). It is what a caching-free allocator would need on
  top of the weights; allocator slack, workspaces and the CUDA context are not modelled.

The report is `dinalrm.evaluation.efficiency_report`; run `python eval/efficiency.py [--json PATH] [--resolution 1024]`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_leaves
from torch.utils.flop_counter import FlopCounterMode, flop_registry
from transformers import (
    CLIPConfig,
    CLIPModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from modeling_dinalrm import (
    FLUX1_DEV_TRANSFORMER_CONFIG,
    SD35_MEDIUM_TRANSFORMER_CONFIG,
    ZIMAGE_TURBO_TRANSFORMER_CONFIG,
    DiNaLRMConfig,
    DiNaLRMModel,
)


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

# The generator's step in the whole ReFL step (as in benchmarks/gpu_refl_step.py); the reward reads its prediction.
GENERATOR_NOISE_LEVEL = 0.6

# DiNa-LRM on the other backbones of the paper's Table 6 (layers as in the README's examples). FLUX.1-dev's pipeline
# pads T5 prompts to 512 tokens; Z-Image keeps only a prompt's real Qwen3 tokens, 128 here (a long prompt, assumed).
OTHER_BACKBONES = {
    "flux": (FLUX1_DEV_TRANSFORMER_CONFIG, 19, (6, 12, 19), 512),
    "zimage": (ZIMAGE_TURBO_TRANSFORMER_CONFIG, 16, (4, 8, 12, 16), 128),
}
# The backbone config keys of each family's prompt embedding width and pooled embedding width (None: no pooled input).
PROMPT_INPUT_KEYS = {
    "sd3": ("joint_attention_dim", "pooled_projection_dim"),
    "flux": ("joint_attention_dim", "pooled_projection_dim"),
    "zimage": ("cap_feat_dim", None),
}

# The paper's efficiency figures for a 1024^2 ReFL step, batch 1, DiNa-LRM vs HPSv3 (the paper states these
# percentages only: not its generator set-up, HPSv3 input size, counting tool or optimiser).
PAPER_CLAIMS = {
    "refl_reward_flops_change_vs_hpsv3": -0.711,
    "refl_peak_vram_change_vs_hpsv3": -0.514,
    "refl_optimisation_flops_change_vs_hpsv3": -0.464,
}


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

    The mode also keeps the cost model fast. Meta kernels of many ops (element-wise ones, reductions) are torch's
    Python reference implementations, about a third of a millisecond each, and the models repeat the same blocks on
    the same shapes: an op that the FLOP counter neither counts nor decomposes (`_uncounted`) runs below every
    dispatch mode, and when it allocates fresh outputs (`_fresh_outputs`), outputs of the shapes it gave for the
    same input metadata are made directly. Counted ops go on to the FLOP counter below this mode as before.
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
        leaves, structure = tree_flatten((args, kwargs))
        if not _uncounted(func):
            out = func(*args, **kwargs)
        else:
            key = _metadata_key(func, structure, leaves) if _fresh_outputs(func) else None
            known = _OUTPUT_METADATA.get(key) if key is not None else None
            if known is not None:
                out = tuple(
                    torch.empty_strided(shape, stride, dtype=dtype, device="meta") for shape, stride, dtype in known
                )
                out = out if len(known) > 1 else out[0]
            else:
                with _disable_current_modes():
                    out = func(*args, **kwargs)
                outputs = out if isinstance(out, tuple) else (out,)
                if key is not None and all(isinstance(t, torch.Tensor) and t.is_meta for t in outputs):
                    _OUTPUT_METADATA[key] = tuple((t.shape, t.stride(), t.dtype) for t in outputs)
        inputs = {t.untyped_storage()._cdata for t in leaves if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in inputs and key not in self.live:
                    self.live[key] = weakref.ref(storage, functools.partial(self._release, key, storage.nbytes()))
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


# (op, argument metadata) -> (shape, stride, dtype) of each output, for the ops of `_fresh_outputs`.
_OUTPUT_METADATA: dict[tuple, tuple[tuple, ...]] = {}


@functools.cache
def _uncounted(func: torch._ops.OpOverload) -> bool:
    """Whether `FlopCounterMode` neither counts `func` nor decomposes it (its result is all the counter would use)."""
    return (
        func not in flop_registry
        and func._overloadpacket not in flop_registry
        and not func.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd)
    )


@functools.cache
def _fresh_outputs(func: torch._ops.OpOverload) -> bool:
    """Whether `func` returns only new tensors (no views of its inputs) and mutates nothing: then its outputs' shapes,
    strides and dtypes follow from its inputs' metadata alone."""
    schema = func._schema
    return (
        not schema.is_mutable
        and bool(schema.returns)
        and all(isinstance(r.type, torch.TensorType) and r.alias_info is None for r in schema.returns)
    )


def _metadata_key(func: torch._ops.OpOverload, structure, leaves: list) -> tuple | None:
    """`func` and its arguments (their nesting `structure` and `leaves`), tensors by shape, stride, dtype and device,
    with the default dtype (Python scalars promote to it); None if an argument is of another kind."""
    parts: list = [func, structure, torch.get_default_dtype()]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device.type))
        elif leaf is None or isinstance(leaf, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format)):
            parts.append((type(leaf), leaf))
        else:
            return None
    return tuple(parts)


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
    backbone: str = "sd3",
) -> nn.Module:
    """The repository's `DiNaLRMModel` of family `backbone` on meta; `layers` are the 1-based blocks feeding the head
    (image and text)."""
    model_config = DiNaLRMConfig(
        backbone=backbone,
        backbone_config=config,
        num_backbone_layers=num_blocks,
        visual_layers=layers,
        text_layers=layers,
    )
    return on_meta(lambda: DiNaLRMModel(model_config))


def dinalrm_reward(model: nn.Module, text_tokens: int) -> Callable:
    """Reward of clean latents: noised to t = 0.4 with a fixed noise draw, then backbone, fusion and pooling.

    The backbone and head are called directly (as `DiNaLRMModel.score_latents` does after its input checks,
    which read tensor values and so cannot run on meta tensors); the timestep input follows the family's noise
    convention (`backbone.timestep`).
    """
    config = model.config.backbone_config
    prompt_key, pooled_key = PROMPT_INPUT_KEYS[model.config.backbone]
    prompt_embeds = torch.zeros(1, text_tokens, config[prompt_key], device="meta", dtype=DTYPE)
    pooled = torch.zeros(1, config[pooled_key], device="meta", dtype=DTYPE) if pooled_key else None
    sigma = torch.full((1,), DINALRM_NOISE_LEVEL, device="meta")
    timestep = model.backbone.timestep(sigma, 1000 * sigma)

    def reward(latents: torch.Tensor) -> torch.Tensor:
        noisy = (1 - DINALRM_NOISE_LEVEL) * latents + DINALRM_NOISE_LEVEL * torch.zeros_like(latents)
        temb, visual, text = model.backbone(noisy, prompt_embeds, pooled, timestep)
        return model.reward_head.pool(*model.reward_head.fuse(visual, text, temb))

    return reward


def build_generator(config: dict = SD35M_TRANSFORMER) -> SD3Transformer2DModel:
    """SD3.5-Medium's full transformer on meta with every weight trainable: the ReFL generator."""
    return on_meta(lambda: SD3Transformer2DModel(**config)).requires_grad_(True)


def generator_refl_step(
    generator: SD3Transformer2DModel,
    reward: Callable[[torch.Tensor], torch.Tensor],
    noisy_latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    noise_level: float = GENERATOR_NOISE_LEVEL,
) -> None:
    """Forward and backward of one ReFL step: the generator's velocity at `noise_level` gives the clean-latent
    prediction `x_t - t v`, whose reward is back-propagated into the generator's weights (`.grad`)."""
    timestep = torch.full((noisy_latents.shape[0],), 1000 * noise_level, device=noisy_latents.device)
    velocity = generator(noisy_latents, prompt_embeds, pooled, timestep, return_dict=False)[0]
    (-reward(noisy_latents - noise_level * velocity).float().sum()).backward()


@dataclass
class StepCost:
    """FLOPs and peak activation bytes (weight gradients included) of one whole ReFL step."""

    flops: int
    activation_peak: int


def measure_step(
    generator: SD3Transformer2DModel, reward: Callable, latent_shape: tuple[int, ...], text_tokens: int
) -> StepCost:
    """Measure one whole ReFL step on meta inputs; the generator's gradients are dropped afterwards.

    A frozen generator is back-propagated into its input instead: the cost of LoRA fine-tuning without LoRA's own
    small matmuls (the gradient crosses every block, but no full-size weight gradient is formed).
    """
    config = generator.config
    frozen = not any(p.requires_grad for p in generator.parameters())
    noisy = torch.zeros(latent_shape, device="meta", dtype=DTYPE, requires_grad=frozen)
    prompt = torch.zeros(1, text_tokens, config.joint_attention_dim, device="meta", dtype=DTYPE)
    pooled = torch.zeros(1, config.pooled_projection_dim, device="meta", dtype=DTYPE)
    with fused_attention(), FlopCounterMode(display=False) as counter, PeakMemoryMode() as memory:
        generator_refl_step(generator, reward, noisy, prompt, pooled)
        generator.zero_grad(set_to_none=True)
    return StepCost(counter.get_total_flops(), memory.peak)


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


def qwen2_vl_attention_flops(config: dict, image_side: int, text_tokens: int) -> int:
    """Forward FLOPs of Qwen2-VL's attention matmuls (`4 N^2 d` per layer, causal counted as full) for a square
    image of `image_side` pixels and `text_tokens` text tokens around it: a hand count, independent of the meta
    models."""
    vision, text = config["vision_config"], config["text_config"]
    patches = (image_side // vision["patch_size"]) ** 2
    tokens = patches // vision["spatial_merge_size"] ** 2 + text_tokens
    vision_flops = 4 * patches**2 * vision["embed_dim"] * vision["depth"]
    return vision_flops + 4 * tokens**2 * text["hidden_size"] * text["num_hidden_layers"]


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


def model_whole_step(latent_shape: tuple[int, ...], rewards: dict[str, tuple[Row, Callable]], measured: dict) -> dict:
    """Whole ReFL step with SD3.5-M as the generator, per reward, set beside the GPU measurement and the paper.

    `measured` is one ReFL step measured on a GPU by `benchmarks/gpu_refl_step.py` (its JSON, e.g.
    `eval/results/refl_step_h200.json`); `rewards` maps the reward names used there to the reward's row (its
    reward-side cost) and the reward.
    As on the GPU, the reward-side peak is measured with the generator's weights resident.
    """
    generator = build_generator()
    generator_params, generator_bytes = weight_stats(generator)
    modelled, frozen = {}, {}
    for name, (row, reward) in rewards.items():
        step = measure_step(generator, reward, latent_shape, SD3_TEXT_TOKENS)
        modelled[name] = {
            "reward": {"flops": row.flops_refl, "peak_memory_bytes": generator_bytes + row.peak_refl},
            "whole_step": {
                "flops": step.flops,
                "peak_memory_bytes": generator_bytes + row.weight_bytes + step.activation_peak,
            },
        }
        generator.requires_grad_(False)
        step = measure_step(generator, reward, latent_shape, SD3_TEXT_TOKENS)
        generator.requires_grad_(True)
        frozen[name] = {
            "flops": step.flops,
            "peak_memory_bytes": generator_bytes + row.weight_bytes + step.activation_peak,
        }
    ours, theirs = modelled.values()
    frozen_ours, frozen_theirs = frozen.values()
    return {
        "generator": {"params": generator_params, "weight_bytes": generator_bytes},
        "generator_flops": ours["whole_step"]["flops"] - ours["reward"]["flops"],
        "frozen_generator_flops": frozen_ours["flops"] - ours["reward"]["flops"],
        "modelled": modelled,
        "modelled_change": {
            f"{part}_{key}": change(ours[part][key], theirs[part][key])
            for part in ("reward", "whole_step")
            for key in ("flops", "peak_memory_bytes")
        },
        "frozen_generator": frozen,
        "frozen_generator_change": {
            key: change(frozen_ours[key], frozen_theirs[key]) for key in ("flops", "peak_memory_bytes")
        },
        "measured": measured,
    }


def change(ours: float, theirs: float) -> float:
    """Relative change of `ours` with respect to `theirs` (-0.7 = 70% less)."""
    return ours / theirs - 1


def run(measured: dict, resolution: int = 1024) -> dict:
    """Measure every model at `resolution`; returns settings, rows, ratios and the comparison with the paper and
    with `measured` (the GPU measurement of one ReFL step, see `model_whole_step`)."""
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
    for family, (config, blocks, layers, text_tokens) in OTHER_BACKBONES.items():
        model = build_dinalrm(config, blocks, layers, backbone=family)
        name = f"DiNa-LRM {family} ({blocks} blocks, {text_tokens} text tokens)"
        rows.append(profile(name, dinalrm_reward(model, text_tokens), latent_shape, [model]))
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
    backbone_ratios = {
        row.name: {
            "refl_flops": change(row.flops_refl, by_name[vae_hps].flops_refl),
            "refl_peak_memory": change(row.peak_refl, by_name[vae_hps].peak_refl),
        }
        for row in rows[len(by_name) :]
    }
    ours, theirs = by_name[dina_short], by_name[vae_hps]
    whole_step = model_whole_step(
        latent_shape,
        {
            "DiNa-LRM": (ours, dinalrm_reward(dinalrm, SD3_TEXT_TOKENS)),
            "VAE decode + HPSv3": (theirs, lambda z: hps(decode(z))),
        },
        measured,
    )
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
        "backbone_ratios_vs_vae_hpsv3": backbone_ratios,
        "whole_step": whole_step,
        "paper": PAPER_CLAIMS,
        "paper_comparison": paper_comparison(
            ours, theirs, by_name["SD3.5-M VAE decode"], by_name[vae_hps_default], whole_step, hps_side
        ),
    }


def paper_comparison(ours: Row, theirs: Row, vae: Row, theirs_default: Row, whole_step: dict, hps_side: int) -> dict:
    """What the paper's three percentages imply, given our counts, for the quantities the paper does not state.

    `ours` / `theirs` are DiNa-LRM and VAE + HPSv3 at HPSv3's `hps_side` input, `theirs_default` the same at
    Qwen2-VL's default input size.
    """
    reward_claim = 1 + PAPER_CLAIMS["refl_reward_flops_change_vs_hpsv3"]
    step_claim = 1 + PAPER_CLAIMS["refl_optimisation_flops_change_vs_hpsv3"]
    memory_claim = PAPER_CLAIMS["refl_peak_vram_change_vs_hpsv3"]
    # Pixel-side ReFL FLOPs for which DiNa-LRM's count gives the paper's reward FLOPs change.
    implied_pixel = ours.flops_refl / reward_claim
    # Generator FLOPs G for which both paper changes hold: (G + r R) = s (G + R), R the pixel side, r R ours.
    implied_generator = implied_pixel * (step_claim - reward_claim) / (1 - step_claim)
    modelled = whole_step["modelled"]["DiNa-LRM"]["whole_step"]["peak_memory_bytes"]
    modelled_theirs = whole_step["modelled"]["VAE decode + HPSv3"]["whole_step"]["peak_memory_bytes"]
    # AdamW's two float32 moments per trainable generator weight, if resident at the peak of both set-ups.
    adam_bytes = 8 * whole_step["generator"]["params"]
    return {
        "vae_decode_vs_dinalrm_forward_flops": vae.flops_forward / ours.flops_forward,
        "pixel_refl_flops_hpsv3": theirs.flops_refl,
        "pixel_refl_flops_hpsv3_default": theirs_default.flops_refl,
        "refl_flops_change_hpsv3": change(ours.flops_refl, theirs.flops_refl),
        "refl_flops_change_hpsv3_default": change(ours.flops_refl, theirs_default.flops_refl),
        "refl_peak_change_hpsv3": change(ours.peak_refl, theirs.peak_refl),
        "forward_flops_change_hpsv3": change(ours.flops_forward, theirs.flops_forward),
        "forward_flops_change_hpsv3_default": change(ours.flops_forward, theirs_default.flops_forward),
        "qwen2_vl_attention_forward_flops": qwen2_vl_attention_flops(
            QWEN2_VL_7B, hps_side, HPSV3_TOKENS_BEFORE_IMAGE + HPSV3_TOKENS_AFTER_IMAGE
        ),
        "implied_pixel_refl_flops": implied_pixel,
        "implied_generator_flops": implied_generator,
        "whole_step_flops_change_at_implied_pixel_side": {
            generator: change(whole_step[key] + ours.flops_refl, whole_step[key] + implied_pixel)
            for generator, key in (("full", "generator_flops"), ("frozen", "frozen_generator_flops"))
        },
        # Memory shared by both set-ups that turns the reward-side change into the paper's: (a + m) / (b + m).
        "implied_shared_memory_bytes": (ours.peak_refl - (1 + memory_claim) * theirs.peak_refl) / memory_claim,
        "adam_state_bytes": adam_bytes,
        "whole_step_peak_change_with_adam_state": change(modelled + adam_bytes, modelled_theirs + adam_bytes),
    }
