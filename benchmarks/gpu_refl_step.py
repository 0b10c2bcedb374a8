#!/usr/bin/env python
"""One ReFL step at 1024x1024, batch 1, bf16, for DiNa-LRM and for VAE decode + HPSv3, measured on a CUDA GPU.

Builds random-initialised, real-size models (no download, no network): the SD3.5-Medium transformer as the
generator (all weights trainable), DiNa-LRM on its first 12 blocks (features of blocks 4, 8, 12), and the
pixel reward of the paper's comparison, SD3.5-M's VAE decoder + HPSv3 (Qwen2-VL-7B at HPSv3's 448x448 input).
Models are built on the `meta` device from the configurations in `dinalrm.evaluation.efficiency`, then materialised on the
GPU (`to_empty`) and filled with N(0, 0.02) weights there, so no time goes into a CPU random init; rewards are
meaningless, costs are real. The reward models are frozen; the gradient of the reward flows into the generator.

One ReFL step: noisy latents at t = 0.6 -> generator velocity (with grad) -> predicted clean latents
`x0 = x_t - t v` -> reward (DiNa-LRM on latents; VAE decode then HPSv3 on pixels) -> `-reward` backward into the
generator's weights. Only the generator and one reward's models are resident at a time. Per reward it reports, as JSON: `torch.cuda.max_memory_allocated` over the whole step and
over the reward alone (forward + backward into its input), and `FlopCounterMode` FLOPs of both, plus the
machine. `--tiny` runs the same code on tiny configurations (CPU allowed; memory then from `PeakMemoryMode`).

    python benchmarks/gpu_refl_step.py [--json refl_step.json]        # on a CUDA machine, repo as working dir
    python benchmarks/gpu_refl_step.py --tiny --device cpu            # the same code path on tiny models
"""

import argparse
import contextlib
import json
import platform
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dinalrm.evaluation import efficiency
from modeling_dinalrm import DiNaLRMConfig, DiNaLRMModel


NOISE_LEVEL = efficiency.GENERATOR_NOISE_LEVEL  # the generator's step; DiNa-LRM reads its prediction at t = 0.4

TINY_TRANSFORMER = {
    **efficiency.SD35M_TRANSFORMER,
    "sample_size": 16,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 24,
    "pos_embed_max_size": 32,
    "dual_attention_layers": [0],
}
TINY_VAE = {**efficiency.SD35M_VAE, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1}
TINY_QWEN = {
    "text_config": {
        **efficiency.QWEN2_VL_7B["text_config"],
        "vocab_size": 64,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    },
    "vision_config": {
        **efficiency.QWEN2_VL_7B["vision_config"],
        "depth": 1,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
    },
    "tie_word_embeddings": False,
}


def materialise(module: nn.Module, device: torch.device) -> nn.Module:
    """Allocates a meta-built module on `device` and fills it there: weights N(0, 0.02), buffers zero."""
    module.to_empty(device=device)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.02)
        for buffer in module.buffers():
            buffer.zero_()
    return module


def build(tiny: bool, device: torch.device, reward: str) -> dict:
    """The generator and one reward's models (`"DiNa-LRM"` or `"VAE decode + HPSv3"`), materialised on `device`."""
    transformer_config = TINY_TRANSFORMER if tiny else efficiency.SD35M_TRANSFORMER
    models = {"generator": efficiency.on_meta(lambda: SD3Transformer2DModel(**transformer_config))}
    if reward == "DiNa-LRM":
        blocks, layers = (2, (1, 2)) if tiny else (efficiency.DINALRM_BLOCKS, efficiency.DINALRM_LAYERS)
        config = DiNaLRMConfig(
            backbone_config=transformer_config, num_backbone_layers=blocks, visual_layers=layers, text_layers=layers
        )
        models["dinalrm"] = efficiency.on_meta(lambda: DiNaLRMModel(config))
    else:
        models["vae"] = efficiency.build_vae(TINY_VAE if tiny else efficiency.SD35M_VAE)
        models["hpsv3"] = efficiency.build_hpsv3(TINY_QWEN if tiny else efficiency.QWEN2_VL_7B)
    for model in models.values():
        materialise(model, device)
    if "hpsv3" in models:
        models["hpsv3"].rm_head.float()
    models["generator"].train().requires_grad_(True)
    return models


def reward_fn(models: dict, tiny: bool, device: torch.device):
    """reward(clean_latents) -> (B,) for the reward in `models`: DiNa-LRM, or VAE decode + HPSv3."""
    if "dinalrm" in models:
        dina, t = models["dinalrm"], efficiency.DINALRM_NOISE_LEVEL
        config = dina.config.backbone_config
        prompt = torch.zeros(
            1, efficiency.SD3_TEXT_TOKENS, config["joint_attention_dim"], device=device, dtype=efficiency.DTYPE
        )
        pooled = torch.zeros(1, config["pooled_projection_dim"], device=device, dtype=efficiency.DTYPE)
        timestep = torch.full((1,), 1000 * t, device=device)
        noise = torch.randn(1, 16, 1, 1, device=device, dtype=efficiency.DTYPE)

        def dinalrm(latents):
            temb, visual, text = dina.backbone((1 - t) * latents + t * noise, prompt, pooled, timestep)
            return dina.reward_head.pool(*dina.reward_head.fuse(visual, text, temb))

        return dinalrm
    budget = (56 * 56, 56 * 56) if tiny else (efficiency.HPSV3_PIXELS, efficiency.HPSV3_PIXELS)
    around = (2, 3) if tiny else (efficiency.HPSV3_TOKENS_BEFORE_IMAGE, efficiency.HPSV3_TOKENS_AFTER_IMAGE)
    decode, hps = efficiency.vae_decode(models["vae"]), efficiency.hpsv3_reward(models["hpsv3"], budget, around)
    return lambda latents: hps(decode(latents))


def peak_memory(fn, device: torch.device) -> int:
    """Peak memory of one call: CUDA's max allocated, else efficiency.PeakMemoryMode (measured without FLOP counting)."""
    if device.type != "cuda":
        with efficiency.PeakMemoryMode() as memory:
            fn()
        return memory.peak
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


@contextlib.contextmanager
def counting_attention(models: dict):
    """HPSv3's language model on eager attention while FLOPs are counted.

    PyTorch's FLOP counter rejects grouped-query SDPA (Qwen2-VL: 28 query heads, 4 key/value heads); eager attention
    does the same attention matmuls with key/value heads repeated, so the count is the same. Memory is measured
    outside this context, on SDPA.
    """
    qwen = models["hpsv3"].qwen if "hpsv3" in models else None
    if qwen is None:
        yield
        return
    previous = qwen.config._attn_implementation
    qwen.set_attn_implementation("eager")
    try:
        yield
    finally:
        qwen.set_attn_implementation(previous)


def refl_step(models: dict, reward, latent_shape, device: torch.device, text_tokens: int) -> dict:
    """Whole ReFL step and reward alone (forward + backward into its input): FLOPs and peak memory."""
    generator = models["generator"]
    config = generator.config
    x_t = torch.randn(latent_shape, device=device, dtype=efficiency.DTYPE)
    prompt = torch.randn(1, text_tokens, config.joint_attention_dim, device=device, dtype=efficiency.DTYPE)
    pooled = torch.randn(1, config.pooled_projection_dim, device=device, dtype=efficiency.DTYPE)

    def whole():
        efficiency.generator_refl_step(generator, reward, x_t, prompt, pooled, NOISE_LEVEL)
        generator.zero_grad(set_to_none=True)

    def reward_only():
        x0 = torch.randn(latent_shape, device=device, dtype=efficiency.DTYPE, requires_grad=True)
        (-reward(x0).float().sum()).backward()

    result = {}
    for name, fn in (("whole_step", whole), ("reward", reward_only)):
        fn()  # warm-up: kernels, workspaces, allocator
        peak = peak_memory(fn, device)
        with counting_attention(models), FlopCounterMode(display=False) as flops:
            fn()
        result[name] = {"flops": flops.get_total_flops(), "peak_memory_bytes": peak}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configurations (a CPU check of the code path)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run on a GPU machine, or pass --tiny --device cpu for the code-path check.")
    resolution = 64 if args.tiny else args.resolution
    latent_shape = (1, 16, resolution // 8, resolution // 8)
    result = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "settings": {
            "resolution": resolution,
            "batch": 1,
            "dtype": str(efficiency.DTYPE),
            "tiny": args.tiny,
            "generator_t": NOISE_LEVEL,
            "generator": "SD3.5-M transformer, all weights trainable",
        },
        "rewards": {},
    }
    for name in ("DiNa-LRM", "VAE decode + HPSv3"):  # one reward's models resident at a time
        models = build(args.tiny, device, name)
        reward = reward_fn(models, args.tiny, device)
        result["rewards"][name] = refl_step(models, reward, latent_shape, device, efficiency.SD3_TEXT_TOKENS)
        del models, reward
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ours, theirs = result["rewards"]["DiNa-LRM"], result["rewards"]["VAE decode + HPSv3"]
    result["change_vs_hpsv3"] = {
        f"{part}_{key}": ours[part][key] / theirs[part][key] - 1
        for part in ("reward", "whole_step")
        for key in ("flops", "peak_memory_bytes")
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
