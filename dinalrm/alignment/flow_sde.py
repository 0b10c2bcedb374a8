# Copyright 2026 The dinalrm authors. Licensed under the Apache License, Version 2.0.
"""One stochastic step of a rectified-flow sampler with its Gaussian log-probability (Flow-GRPO's ODE-to-SDE).

A rectified flow `x_sigma = (1 - sigma) x0 + sigma noise` is sampled by the ODE `dx = v dsigma`. Flow-GRPO
(arXiv 2505.05470) replaces it by the SDE with the same marginals,

    dx = [v + s^2 / (2 sigma) (x + (1 - sigma) v)] dsigma + s dw,   s = a sqrt(sigma / (1 - sigma)),

whose Euler-Maruyama step from `sigma` to `sigma_next < sigma` is a Gaussian with the mean below and standard
deviation `s sqrt(sigma - sigma_next)`. Its exact log-density makes policy-gradient RL (GRPO, PPO) and LPO on
flow models possible; `noise_level` `a` = 0 gives back the deterministic Euler step.
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or `(B,)` noise level broadcast against `like` `(B, ...)`, in float32."""
    value = torch.as_tensor(value, device=like.device, dtype=torch.float32)
    return value.reshape(-1, *([1] * (like.ndim - 1))) if value.ndim else value


def sde_step(
    model_output: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""One SDE step of a rectified flow from `sigma` to `sigma_next`, with the log-probability of its result.

    Computed in float32 like Flow-GRPO's `sde_step_with_logprob`. At `sigma = 1` the diffusion coefficient
    `sqrt(sigma / (1 - sigma))` is read at `sigma_next` instead (Flow-GRPO reads it at the schedule's second
    sigma, which is the same value for the first step).

    Args:
        model_output (`torch.Tensor` of shape `(B, ...)`): the velocity `v` (noise - x0) at `sample`.
        sigma (`float` or `torch.Tensor` of shape `(B,)`): the current noise level in (0, 1].
        sigma_next (`float` or `torch.Tensor` of shape `(B,)`): the next noise level, below `sigma`.
        sample (`torch.Tensor` of shape `(B, ...)`): the current latents `x_sigma`.
        noise_level (`float`): Flow-GRPO's `a` (0.7 in the paper); 0 is the ODE (Euler) step.
        generator (`torch.Generator` or a list of them, *optional*): source of the step's noise.
        prev_sample (`torch.Tensor`, *optional*): a next state to evaluate instead of drawing one (the stored
            sample of a rollout, or one of K candidates around the same mean).

    Returns:
        `tuple`: `prev_sample` (the next latents), `log_prob` `(B,)` (the Gaussian log-density of `prev_sample`,
        averaged over the non-batch dimensions as Flow-GRPO does; 0 for a deterministic step), `mean` (the
        step's mean) and `std` (its standard deviation, broadcastable to the latents).
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}.")
    model_output, sample = model_output.float(), sample.float()
    sigma, sigma_next = _per_sample(sigma, sample), _per_sample(sigma_next, sample)
    dt = sigma_next - sigma  # negative: sigma decreases towards the clean sample
    if bool((dt >= 0).any()):
        raise ValueError("sigma_next must be smaller than sigma (the sampler runs from noise to data).")
    diffusion = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))
    mean = (
        sample * (1 + diffusion**2 / (2 * sigma) * dt)
        + model_output * (1 + diffusion**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    std = diffusion * torch.sqrt(-dt)
    if noise_level == 0:
        prev_sample = mean if prev_sample is None else prev_sample.float()
        return prev_sample, torch.zeros(sample.shape[0], device=sample.device), mean, std
    if prev_sample is None:
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.float()
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean, std
