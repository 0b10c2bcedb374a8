# Copyright 2026 The dinalrm authors. Licensed under the Apache License, Version 2.0.
"""DiNa-LRM as a reward function for online-RL trainers, in Flow-GRPO's `flow_grpo/rewards.py` convention.

A Flow-GRPO reward is a factory returning `_fn(images, prompts, metadata) -> (scores, details)`; register DiNa-LRM
in `flow_grpo.rewards.multi_score`'s table and select it in the config:

    score_functions["dinalrm"] = lambda device: flow_grpo_reward(device=device, dtype=torch.bfloat16)
    config.reward_fn = {"dinalrm": 1.0}

Trainers that keep the SD3 latents use [`flow_grpo_latent_reward`] instead (no VAE decode and re-encode).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dinalrm import DEFAULT_MODEL
from pipeline_dinalrm import DiNaLRMPipeline


def _pipeline(model_or_pipe: str | DiNaLRMPipeline, device, dtype, **kwargs) -> DiNaLRMPipeline:
    """The given pipeline, or one loaded from a Hub id / folder onto `device` in `dtype`, frozen."""
    if isinstance(model_or_pipe, DiNaLRMPipeline):
        pipe = model_or_pipe
    else:
        pipe = DiNaLRMPipeline.from_pretrained(model_or_pipe, torch_dtype=dtype, **kwargs)
    if device is not None:
        pipe = pipe.to(device)
    pipe.reward_model.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generator(seed: int | None, device) -> torch.Generator | None:
    """One generator for the reward function's lifetime: calls draw fresh noise, the run stays reproducible."""
    return None if seed is None else torch.Generator(device or "cpu").manual_seed(seed)


def flow_grpo_reward(
    model_or_pipe: str | DiNaLRMPipeline = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    t: float | list[float] | None = None,
    normalize: bool | str = True,
    num_noise_samples: int = 1,
    seed: int | None = None,
    batch_size: int = 8,
    **from_pretrained_kwargs: Any,
) -> Callable[[Any, list[str], Any], tuple[torch.Tensor, dict]]:
    r"""A Flow-GRPO pixel reward: `_fn(images, prompts, metadata) -> (scores, {})`.

    `images` is what Flow-GRPO passes: a float tensor `(N, 3, H, W)` in [0, 1], a uint8 array `(N, H, W, 3)` or a
    list of PIL images. The samples of one prompt share one reward noise draw (the pipeline's
    `noise_sharing="prompt"`), so a GRPO group's advantages carry no noise-draw variance.

    Args:
        model_or_pipe (`str` or [`DiNaLRMPipeline`]): a Hub id or folder (loaded with `from_pretrained`), or a
            loaded pipeline. Defaults to the published `liuhuohuo/DiNa-LRM-SD35M-12layers`.
        device (`str` or `torch.device`, *optional*): where the reward model runs.
        dtype (`torch.dtype`): the loaded pipeline's dtype.
        t (`float` or `list[float]`, *optional*): noise level(s), see [`DiNaLRMPipeline.__call__`].
        normalize (`bool` or `str`): `True` (default) gives the display score `(raw + 10) / 10`, `False` the raw
            reward, `"logistic"` calibrated scores, `"zscore"` `(raw - mean) / std` from the model's reward
            statistics (`eval/reward_stats.py`), for mixing with other rewards by weights.
        num_noise_samples (`int`): noise draws averaged per prompt group.
        seed (`int`, *optional*): seeds one generator used by every call (reproducible runs); `None` draws from
            the global RNG.
        batch_size (`int`): samples per VAE / backbone pass.
        from_pretrained_kwargs: passed to `DiNaLRMPipeline.from_pretrained` (e.g. `base_model=`).

    Returns:
        `Callable`: `_fn(images, prompts, metadata)` returning float32 scores `(N,)` on the CPU and an empty dict.
    """
    pipe = _pipeline(model_or_pipe, device, dtype, **from_pretrained_kwargs)
    generator = _generator(seed, device)

    def _fn(images, prompts: list[str], metadata=None) -> tuple[torch.Tensor, dict]:
        if isinstance(images, torch.Tensor):
            images = images.detach().float().cpu()
        rewards = pipe(
            list(prompts),
            images=images,
            t=t,
            num_noise_samples=num_noise_samples,
            generator=generator,
            batch_size=batch_size,
            normalize=normalize,
        ).rewards
        return rewards.float().cpu(), {}

    return _fn


def flow_grpo_latent_reward(
    model_or_pipe: str | DiNaLRMPipeline = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    t: float | list[float] | None = None,
    normalize: bool | str = True,
    num_noise_samples: int = 1,
    seed: int | None = None,
    differentiable: bool = False,
    **from_pretrained_kwargs: Any,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, dict]]:
    r"""A latent reward: `_fn(latents, prompt_embeds, pooled_prompt_embeds, metadata) -> (scores, {})`.

    `latents` are clean SD3 latents as the generator produces them, `(z - shift_factor) * scaling_factor`;
    `prompt_embeds` / `pooled_prompt_embeds` are the SD3 text embeddings (any token length, one row per sample
    or one for all). Samples with equal embedding rows share one reward noise draw.

    Args:
        model_or_pipe, device, dtype, t, normalize, num_noise_samples, seed, from_pretrained_kwargs: as in
            [`flow_grpo_reward`].
        differentiable (`bool`): `True` keeps the autograd graph from `latents` to the scores (ReFL-style
            objectives, through [`DiNaLRMPipeline.reward_fn`]); `False` (default) scores without gradients.

    Returns:
        `Callable`: `_fn(latents, prompt_embeds, pooled_prompt_embeds, metadata)` returning float scores `(B,)` on
        the latents' device and an empty dict.
    """
    pipe = _pipeline(model_or_pipe, device, dtype, **from_pretrained_kwargs)
    generator = _generator(seed, device)

    def _fn(latents, prompt_embeds, pooled_prompt_embeds, metadata=None) -> tuple[torch.Tensor, dict]:
        dtype = pipe.reward_model.dtype
        inputs = {
            "prompt_embeds": prompt_embeds.to(latents.device, dtype),
            "pooled_prompt_embeds": pooled_prompt_embeds.to(latents.device, dtype),
            "t": t,
            "num_noise_samples": num_noise_samples,
            "generator": generator,
            "normalize": normalize,
            "noise_sharing": "prompt",
        }
        if differentiable:
            return pipe.reward_fn(latents.to(dtype), **inputs), {}
        return pipe(latents=latents.detach().to(dtype), **inputs).rewards, {}

    return _fn
