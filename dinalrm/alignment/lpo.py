# Copyright 2026 The dinalrm authors. Licensed under the Apache License, Version 2.0.
"""LPO (Latent Preference Optimization, arXiv 2502.01051): step-level preference optimisation in latent space.

At every denoising step the policy's Gaussian transition `p(x_prev | x_t)` is sampled K times around one mean, a
noise-aware latent reward scores the K candidates, and the best and worst candidates form a preference pair when
their softmax gap exceeds a noise-dependent threshold. The trajectory continues from a random candidate. The pairs
train the policy with a DPO-style loss on clipped likelihood ratios against a frozen reference.

The DDIM path is exact to the official code (Kwai-Kolors/LPO, `lpo/`), checked on
`tests/fixtures/official-lrm-tiny` by `tests/test_lpo_parity.py`; the flow path is this repository's extension. The step loop [`sample_with_candidates`] is
generic over the sampler step (a function returning the Gaussian transition) and the comparison rule, so other
samplers ([`flow_step_distribution`], the SDE version of a flow-matching sampler) and rewards (DiNa-LRM, with its
noise-calibrated [`confidence_compare_fn`]) plug in without changing it.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .flow_sde import sde_step


# The official dynamic-threshold tables (compare_funcs.py:5-17): the DDIM eta=1 standard deviations of the 20-step
# SD1.5 schedule at t = 50 i + 1 (4 decimals) and their squares. They are fixed numbers in the official code, looked
# up at `t // 50` whatever the sampler's step count.
OFFICIAL_SIGMA_TABLE = (
    0.0206, 0.0406, 0.1673, 0.2144, 0.2509, 0.2836, 0.3144, 0.3442, 0.3732, 0.4016,
    0.4293, 0.4565, 0.4829, 0.5087, 0.5336, 0.5576, 0.5807, 0.6029, 0.6241, 0.6444,
)  # fmt: skip
OFFICIAL_VARIANCE_TABLE = (
    0.0004, 0.0016, 0.0280, 0.0460, 0.0630, 0.0804, 0.0988, 0.1185, 0.1393, 0.1613,
    0.1843, 0.2084, 0.2332, 0.2588, 0.2847, 0.3109, 0.3372, 0.3635, 0.3895, 0.4153,
)  # fmt: skip
OFFICIAL_TABLE_STRIDE = 50
OFFICIAL_LINEAR_RANGE = (1, 951)
THRESHOLD_SCHEDULES = ("sigma", "variance", "linear")
# (threshold_min, threshold_max) of the official configs: SD1.5 / SD2.1 and SDXL, all with the "sigma" schedule.
OFFICIAL_THRESHOLD_RANGES = {"sd15": (0.35, 0.5), "sd21": (0.35, 0.5), "sdxl": (0.45, 0.6)}


# ------------------------------------------------------------------------------------------- thresholds
def dynamic_threshold(
    schedule: str, timesteps: torch.Tensor, threshold_min: float, threshold_max: float
) -> torch.Tensor:
    r"""The official noise-dependent compare threshold at integer DDPM `timesteps` (compare_funcs.py:20-39).

    Args:
        schedule (`str`): `"sigma"` (the official choice: the DDIM standard deviation table mapped linearly onto
            `[threshold_min, threshold_max]`), `"variance"` (the same with its squares) or `"linear"` (linear in t
            between t = 1 and t = 951, not clamped).
        timesteps (`torch.LongTensor`): timesteps below 1000 (the tables are read at `t // 50`).
        threshold_min (`float`): the threshold at the least noisy step.
        threshold_max (`float`): the threshold at the noisiest step.
    """
    if schedule == "linear":
        low, high = OFFICIAL_LINEAR_RANGE
        return (timesteps - low) / (high - low) * (threshold_max - threshold_min) + threshold_min
    if schedule not in THRESHOLD_SCHEDULES:
        raise ValueError(f"Unknown threshold schedule {schedule!r}: use one of {THRESHOLD_SCHEDULES}.")
    table = torch.tensor(OFFICIAL_SIGMA_TABLE if schedule == "sigma" else OFFICIAL_VARIANCE_TABLE)
    index = timesteps.long() // OFFICIAL_TABLE_STRIDE
    if ((index < 0) | (index >= table.numel())).any():
        raise ValueError(
            f"The official {schedule!r} threshold table covers timesteps 0..{table.numel() * OFFICIAL_TABLE_STRIDE - 1}"
            f", got {timesteps.tolist()}."
        )
    thresholds = (table - table[0]) / (table[-1] - table[0]) * (threshold_max - threshold_min) + threshold_min
    return thresholds.to(timesteps.device)[index]


def official_threshold_fn(
    schedule: str = "sigma", threshold_min: float = 0.35, threshold_max: float = 0.5
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A threshold function `timesteps -> thresholds` for [`sample_with_candidates`] (defaults: the SD1.5 recipe)."""
    if schedule not in THRESHOLD_SCHEDULES:
        raise ValueError(f"Unknown threshold schedule {schedule!r}: use one of {THRESHOLD_SCHEDULES}.")
    return lambda timesteps: dynamic_threshold(schedule, timesteps, threshold_min, threshold_max)


# ------------------------------------------------------------------------------------------- comparison
@dataclass
class CompareOutput(BaseOutput):
    """Best / worst candidate of every prompt and whether the pair is confident enough to train on.

    Args:
        indices (`torch.LongTensor` of shape `(2, B)`): row 0 the index of the best candidate, row 1 of the worst.
        valid (`torch.BoolTensor` of shape `(B,)`): the softmax gap of the two exceeds the threshold.
    """

    indices: torch.Tensor
    valid: torch.Tensor


def compare_candidates(scores: torch.Tensor, thresholds: torch.Tensor | float) -> CompareOutput:
    r"""The official candidate comparison (compare_funcs.py:43-63): best and worst of each column of `scores`
    `(K, B)`, kept when `softmax(best, worst)` differs by more than `thresholds` (`tanh((best - worst) / 2)`).
    """
    sorted_scores, indices = _best_and_worst(scores)
    probabilities = sorted_scores.softmax(dim=0)
    return CompareOutput(indices=indices, valid=probabilities[0] - probabilities[1] > thresholds)


def _best_and_worst(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores `(2, B)` and indices `(2, B)` of the best (row 0) and worst (row 1) of each column of `scores`."""
    if scores.ndim != 2 or scores.shape[0] < 2:
        raise ValueError(f"scores must have shape (num_candidates >= 2, batch), got {tuple(scores.shape)}.")
    sorted_scores, order = torch.sort(scores, dim=0, descending=True)
    return sorted_scores[[0, -1], :], order[[0, -1], :]


def confidence_compare_fn(
    model: torch.nn.Module, min_confidence: float
) -> Callable[[torch.Tensor, torch.Tensor], CompareOutput]:
    r"""A compare function for [`sample_with_candidates`] from DiNa-LRM's own noise-calibrated comparison model.

    The best and worst candidate of each prompt form a pair when `model.preference_probability(best, worst, t)`
    exceeds `min_confidence`: for the Thurstone objective `Phi((r_best - r_worst) / sqrt(2 var(t)))` with
    `var(t) = k t**2 + v0`, the probability the reward model itself assigns to "best beats worst" at the
    candidates' noise level `t`. It replaces LPO's hand-tuned threshold table and is automatically stricter at high
    noise, where the model's comparison variance grows. (A model trained with Bradley-Terry has no noise term: its
    probability is `sigmoid(r_best - r_worst)` at every level.)

    Args:
        model ([`DiNaLRMModel`]): the reward model that scored the candidates.
        min_confidence (`float`): in [0.5, 1); a pair is kept when its probability is strictly above it.
    """
    if not 0.5 <= min_confidence < 1.0:
        raise ValueError(f"min_confidence is a probability that best beats worst, in [0.5, 1); got {min_confidence}.")

    def compare(scores: torch.Tensor, timesteps: torch.Tensor) -> CompareOutput:
        best_worst, indices = _best_and_worst(scores)
        probability = model.preference_probability(best_worst[0], best_worst[1], timesteps)
        return CompareOutput(indices=indices, valid=probability > min_confidence)

    return compare


# ------------------------------------------------------------------------------------------- rewards
@runtime_checkable
class LatentReward(Protocol):
    """A noise-aware latent reward: rewards `(N,)` of noisy latents at their noise levels.

    `timesteps` holds one value per latent in the sampler's own units (integer DDPM timesteps for DDIM, sigmas for
    flow matching); `conditioning` is whatever the reward needs for the prompts (row r of the latents belongs to
    prompt `r % num_prompts`, the candidate-major layout of [`sample_with_candidates`]).
    """

    def score(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor: ...


class CallableReward:
    """Any function `(latents, timesteps, conditioning) -> rewards` as a [`LatentReward`]."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]):
        self.fn = fn

    def score(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        return self.fn(latents, timesteps, conditioning)


class LRMReward:
    """An [`LRMModel`] (modeling_lrm.py) as a [`LatentReward`]: `conditioning` is its `encode_prompt(...)` output.

    The latents are read as already noised to the integer DDPM `timesteps` (`LRMModel.forward`), as the official
    LPO does (no extra noise is added). Scores are computed without gradients.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def score(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model(latents.to(dtype), timesteps, prompt_embeds=conditioning).rewards.float()


class DiNaLRMReward:
    """A [`DiNaLRMModel`] (modeling_dinalrm.py) as a [`LatentReward`] on noisy states.

    The candidates are already noisy, so they go through `DiNaLRMModel.forward` at their own noise level `t`
    (`timesteps` in [0, 1]); `score_latents` would noise them a second time. `conditioning` is the pair
    `(prompt_embeds, pooled_prompt_embeds)` of the prompts. Scores are computed without gradients.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def score(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        prompt_embeds, pooled_prompt_embeds = conditioning
        repeats = latents.shape[0] // prompt_embeds.shape[0]
        dtype = next(self.model.parameters()).dtype
        rewards = self.model(
            latents.to(dtype),
            timesteps,
            prompt_embeds.repeat(repeats, 1, 1),
            pooled_prompt_embeds.repeat(repeats, 1),
        ).rewards
        return rewards.float()


# ------------------------------------------------------------------------------------------- DDIM transitions
@dataclass
class StepDistribution(BaseOutput):
    """The Gaussian transition `p(x_prev | x_t) = N(mean, std^2)` of one sampler step.

    Args:
        mean (`torch.Tensor`): the transition mean, shaped like the sample.
        std (`torch.Tensor`): its standard deviation, broadcast to the sample's shape.
        prev_timestep (`torch.Tensor`): the noise level of `x_prev` (the step's target).
    """

    mean: torch.Tensor
    std: torch.Tensor
    prev_timestep: torch.Tensor


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = values.to(like.device)
    if values.ndim == 0:
        return values.expand(like.shape)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim)).expand(like.shape)


def ddim_step_distribution(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float = 1.0,
) -> StepDistribution:
    r"""The DDIM transition of the official code (ddim_seperate.py, ddim_with_logprob.py) at `timestep`.

    `t_prev = clamp(t - T // N, 0, T - 1)` (official: the last step uses `alpha_bar_0`, not `final_alpha_cumprod`),
    `x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)` (or the `sample` / `v_prediction` forms, then the scheduler's
    clipping), `std = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev))`,
    `mean = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps`.

    Args:
        scheduler ([`DDIMScheduler`]): with `set_timesteps(N)` called.
        model_output (`torch.Tensor`): the (guided) prediction of the model at `(sample, timestep)`.
        timestep (`int` or `torch.LongTensor` of shape `()` or `(B,)`): integer DDPM timestep(s).
        sample (`torch.Tensor` of shape `(B, C, H, W)`): x_t.
        eta (`float`, defaults to 1.0): DDIM's eta (LPO: 1, the DDPM-like stochastic sampler).
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("Call scheduler.set_timesteps(num_inference_steps) before sampling.")
    config = scheduler.config
    timestep = torch.as_tensor(timestep, device=scheduler.alphas_cumprod.device).long()
    prev_timestep = (timestep - config.num_train_timesteps // scheduler.num_inference_steps).clamp(
        0, config.num_train_timesteps - 1
    )
    alpha_prod_t = _per_sample(scheduler.alphas_cumprod[timestep], sample)
    alpha_prod_t_prev = _per_sample(scheduler.alphas_cumprod[prev_timestep], sample)
    beta_prod_t = 1 - alpha_prod_t
    if config.prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        pred_epsilon = model_output
    elif config.prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
    elif config.prediction_type == "v_prediction":
        pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    else:
        raise ValueError(f"prediction_type {config.prediction_type!r} is not supported by the DDIM step.")
    if config.thresholding:
        pred_original_sample = scheduler._threshold_sample(pred_original_sample)
    elif config.clip_sample:
        pred_original_sample = pred_original_sample.clamp(-config.clip_sample_range, config.clip_sample_range)
    variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
    std = eta * variance**0.5
    mean = alpha_prod_t_prev**0.5 * pred_original_sample + (1 - alpha_prod_t_prev - std**2) ** 0.5 * pred_epsilon
    return StepDistribution(mean=mean, std=std, prev_timestep=prev_timestep)


def sample_candidates(
    distribution: StepDistribution, num_candidates: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`num_candidates` draws `(K, B, ...)` of the transition, in one `randn` call as the official sampler."""
    mean = distribution.mean
    noise = randn_tensor((num_candidates, *mean.shape), generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean[None] + distribution.std[None] * noise).to(mean.dtype)


def gaussian_log_prob(sample: torch.Tensor, distribution: StepDistribution) -> torch.Tensor:
    r"""`log N(sample; mean, std^2)` averaged over all non-batch dimensions (the official *mean*, not the sum)."""
    mean, std = distribution.mean, distribution.std
    log_prob = (
        -((sample.detach() - mean) ** 2) / (2 * std**2)
        - torch.log(std)
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def flow_step_distribution(
    model_output: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    sample: torch.Tensor,
    noise_level: float = 0.7,
) -> StepDistribution:
    r"""The Gaussian transition of the SDE version of a rectified-flow sampler from `sigma` to `sigma_next`.

    The mean and standard deviation of `dinalrm.alignment.flow_sde.sde_step` (Flow-GRPO's ODE-to-SDE step, float32), so that
    LPO's candidates, log-probabilities ([`gaussian_log_prob`], the same Gaussian) and loss run on flow models;
    `prev_timestep` is `sigma_next`, the candidates' own noise level.

    Args:
        model_output (`torch.Tensor`): the (guided) velocity at `sample`.
        sigma (`float` or `torch.Tensor` of shape `()` or `(B,)`): the current noise level.
        sigma_next (`float` or `torch.Tensor` of shape `()` or `(B,)`): the next, smaller noise level.
        sample (`torch.Tensor` of shape `(B, C, H, W)`): x_sigma.
        noise_level (`float`, defaults to 0.7): Flow-GRPO's `a`; must be positive for a stochastic step.
    """
    if noise_level <= 0:
        raise ValueError(
            f"LPO needs a stochastic step to draw candidates: noise_level must be > 0, got {noise_level}."
        )
    _, _, mean, std = sde_step(model_output, sigma, sigma_next, sample, noise_level, prev_sample=sample)
    return StepDistribution(
        mean=mean, std=std.expand_as(mean), prev_timestep=torch.as_tensor(sigma_next, device=mean.device)
    )


def guided_prediction(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    r"""The UNet's noise prediction with classifier-free guidance as the official LPO computes it in sampling and
    training: one call on `[x; x]` with `[negative; prompt]` embeddings (unconditional first), then
    `eps_u + guidance_scale (eps_c - eps_u)`; a plain conditional call when `guidance_scale <= 1`.
    """
    if guidance_scale <= 1.0:
        return unet(latents, timesteps, prompt_embeds).sample
    timesteps = torch.as_tensor(timesteps, device=latents.device)
    if timesteps.ndim > 0:
        timesteps = torch.cat([timesteps, timesteps])
    prediction = unet(
        torch.cat([latents, latents]), timesteps, torch.cat([negative_prompt_embeds, prompt_embeds])
    ).sample
    uncond, cond = prediction.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


# ------------------------------------------------------------------------------------------- the step loop
@dataclass
class LPOSampleOutput(BaseOutput):
    """Kept preference pairs of one sampling call and the record of the trajectory.

    Args:
        timesteps (`torch.Tensor` of shape `(P,)`): the step's noise level t of every kept pair (step, then prompt).
        prompt_indices (`torch.LongTensor` of shape `(P,)`): the prompt (batch row) of every kept pair.
        current_latents (`torch.Tensor` of shape `(P, C, H, W)`): x_t of every kept pair.
        winner_latents (`torch.Tensor` of shape `(P, C, H, W)`): the best-scored candidate x_prev.
        loser_latents (`torch.Tensor` of shape `(P, C, H, W)`): the worst-scored candidate.
        scores (`torch.Tensor` of shape `(S, K, B)`): every reward of every step.
        compare_indices (`torch.LongTensor` of shape `(S, 2, B)`): best / worst candidate per step and prompt.
        compare_valid (`torch.BoolTensor` of shape `(S, B)`): whether the pair of that step and prompt was kept.
        continuation_indices (`torch.LongTensor` of shape `(S, B)`): the candidate the trajectory continued from.
        trajectory (`torch.Tensor` of shape `(S + 1, B, C, H, W)`): x_T and the latents after every step.
        stds (`torch.Tensor` of shape `(S,)`): the transition standard deviation of every step.
    """

    timesteps: torch.Tensor
    prompt_indices: torch.Tensor
    current_latents: torch.Tensor
    winner_latents: torch.Tensor
    loser_latents: torch.Tensor
    scores: torch.Tensor
    compare_indices: torch.Tensor
    compare_valid: torch.Tensor
    continuation_indices: torch.Tensor
    trajectory: torch.Tensor
    stds: torch.Tensor


@torch.no_grad()
def sample_with_candidates(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    step_distribution: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], StepDistribution],
    reward: LatentReward,
    threshold_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    conditioning: Any,
    num_candidates: int,
    generator: torch.Generator | None = None,
    continuation_generator: torch.Generator | None = None,
    reward_at_current_timestep: bool = True,
    start_step: int = 0,
    end_step: int = 0,
    progress_bar: Callable | None = None,
    compare_fn: Callable[[torch.Tensor, torch.Tensor], CompareOutput] | None = None,
) -> LPOSampleOutput:
    r"""The LPO sampling loop (multi_sample_pipeline.py): K candidates per step, scored, compared and continued.

    Args:
        predict (`Callable`): `(x_t, t) -> model_output` of the policy, guidance included.
        step_distribution (`Callable`): `(model_output, t, x_t) -> StepDistribution`, e.g. [`ddim_step_distribution`]
            bound to a scheduler.
        reward ([`LatentReward`]): scores the candidates.
        threshold_fn (`Callable`, *optional*): `timesteps (B,) -> thresholds (B,)` of the official softmax-gap
            comparison ([`compare_candidates`]) at the step's t, e.g. [`official_threshold_fn`]; `None` with
            `compare_fn`.
        latents (`torch.Tensor` of shape `(B, C, H, W)`): x_T.
        timesteps (`torch.Tensor`): the sampler's grid.
        conditioning (`Any`): passed to `reward.score`.
        num_candidates (`int`): K >= 2 candidates per step.
        generator (`torch.Generator`, *optional*): draws the candidates' noise.
        continuation_generator (`torch.Generator`, *optional*): draws the candidate to continue from; `None` uses
            the global generator, as the official code does.
        reward_at_current_timestep (`bool`, defaults to `True`): tell the reward the step's t while it scores
            x_prev (official behaviour); `False` tells it the candidates' own noise level `prev_timestep`.
        start_step (`int`, defaults to 0): steps before it sample one plain transition (official `divert_start_step`).
        end_step (`int`, defaults to 0): stop before this step when > 0 (official `divert_end_step`).
        progress_bar (`Callable`, *optional*): a `tqdm`-like wrapper for the step iterator.
        compare_fn (`Callable`, *optional*): `(scores (K, B), reward timesteps (B,)) -> CompareOutput`, a whole
            comparison rule instead of `threshold_fn`'s, told the noise level the reward was told (e.g.
            [`confidence_compare_fn`]).
    """
    if (threshold_fn is None) == (compare_fn is None):
        raise ValueError("Pass exactly one of threshold_fn (the official softmax-gap rule) and compare_fn.")
    if num_candidates < 2:
        raise ValueError(f"num_candidates must be at least 2 to form a pair, got {num_candidates}.")
    batch = latents.shape[0]
    kept = {"timesteps": [], "prompts": [], "current": [], "winner": [], "loser": []}
    record = {"scores": [], "indices": [], "valid": [], "continue": [], "trajectory": [latents], "stds": []}
    steps = list(enumerate(timesteps))
    for i, t in progress_bar(steps) if progress_bar is not None else steps:
        if end_step > 0 and i >= end_step:
            break
        distribution = step_distribution(predict(latents, t), t, latents)
        if i < start_step:
            latents = sample_candidates(distribution, 1, generator)[0]
            record["trajectory"].append(latents)
            continue
        candidates = sample_candidates(distribution, num_candidates, generator)
        reward_t = t if reward_at_current_timestep else distribution.prev_timestep
        flat = candidates.flatten(0, 1)
        scores = reward.score(flat, torch.as_tensor(reward_t).reshape(-1).expand(flat.shape[0]), conditioning)
        scores = scores.reshape(num_candidates, batch)
        if compare_fn is None:
            compared = compare_candidates(scores, threshold_fn(torch.as_tensor(t).reshape(-1).expand(batch)))
        else:
            compared = compare_fn(scores, torch.as_tensor(reward_t).reshape(-1).expand(batch))
        rows = compared.valid.nonzero().flatten()
        kept["timesteps"].append(torch.as_tensor(t).reshape(-1).expand(rows.numel()))
        kept["prompts"].append(rows)
        kept["current"].append(latents[rows])
        kept["winner"].append(candidates[compared.indices[0, rows], rows])
        kept["loser"].append(candidates[compared.indices[1, rows], rows])
        chosen = torch.randint(0, num_candidates, (batch,), device=latents.device, generator=continuation_generator)
        latents = candidates[chosen, torch.arange(batch, device=latents.device)]
        record["scores"].append(scores)
        record["indices"].append(compared.indices)
        record["valid"].append(compared.valid)
        record["continue"].append(chosen)
        record["trajectory"].append(latents)
        record["stds"].append(distribution.std.flatten()[0])
    empty = latents.new_zeros((0, *latents.shape[1:]))
    return LPOSampleOutput(
        timesteps=torch.cat(kept["timesteps"]) if kept["timesteps"] else timesteps.new_zeros(0),
        prompt_indices=torch.cat(kept["prompts"]) if kept["prompts"] else torch.zeros(0, dtype=torch.long),
        current_latents=torch.cat(kept["current"]) if kept["current"] else empty,
        winner_latents=torch.cat(kept["winner"]) if kept["winner"] else empty,
        loser_latents=torch.cat(kept["loser"]) if kept["loser"] else empty,
        scores=torch.stack(record["scores"]) if record["scores"] else latents.new_zeros(0, num_candidates, batch),
        compare_indices=torch.stack(record["indices"]) if record["indices"] else torch.zeros(0, 2, batch).long(),
        compare_valid=torch.stack(record["valid"]) if record["valid"] else torch.zeros(0, batch, dtype=torch.bool),
        continuation_indices=torch.stack(record["continue"]) if record["continue"] else torch.zeros(0, batch).long(),
        trajectory=torch.stack(record["trajectory"]),
        stds=torch.stack(record["stds"]) if record["stds"] else latents.new_zeros(0),
    )


# ------------------------------------------------------------------------------------------- the loss
def parameters_to_clip(
    parameters: list[torch.nn.Parameter], official_exhausted_iterator: bool = True
) -> Iterable[torch.nn.Parameter]:
    r"""What to hand to `accelerator.clip_grad_norm_`, optionally with the official quirk (train_lpo.py:251, 648).

    The official script passes a `filter` iterator that the optimizer constructor has already consumed, so
    clipping sees no parameter, clips nothing and returns 0. `official_exhausted_iterator=True` reproduces that
    (an empty iterator); `False` returns `parameters`, which clips them as intended.
    """
    return iter(()) if official_exhausted_iterator else parameters


@dataclass
class LPOLossOutput(BaseOutput):
    """The LPO loss and its diagnostics.

    Args:
        loss (`torch.Tensor`): mean over pairs of `-log sigmoid(beta (log r_w - log r_l))`.
        ratio_w (`torch.Tensor` of shape `(P,)`): clipped policy / reference likelihood ratio of the winners.
        ratio_l (`torch.Tensor` of shape `(P,)`): the same for the losers.
        implicit_acc (`torch.Tensor`): fraction of pairs with `r_w > r_l`.
        margin (`torch.Tensor`): mean of `r_w - r_l`.
    """

    loss: torch.Tensor
    ratio_w: torch.Tensor
    ratio_l: torch.Tensor
    implicit_acc: torch.Tensor
    margin: torch.Tensor


def lpo_loss(
    log_prob_w: torch.Tensor,
    ref_log_prob_w: torch.Tensor,
    log_prob_l: torch.Tensor,
    ref_log_prob_l: torch.Tensor,
    beta: float,
    eps: float = 0.1,
) -> LPOLossOutput:
    r"""The official LPO loss (train_lpo.py:605-610) on per-pair transition log-probabilities.

    `r = clamp(exp(log p_policy - log p_ref), 1 - eps, 1 + eps)` for winner and loser, then
    `mean(-log sigmoid(beta log r_w - beta log r_l))` (computed with `logsigmoid`, which equals the official
    `log(sigmoid(.))` where that is finite and stays finite where it underflows).
    """
    ratio_w = torch.clamp(torch.exp(log_prob_w - ref_log_prob_w), 1 - eps, 1 + eps)
    ratio_l = torch.clamp(torch.exp(log_prob_l - ref_log_prob_l), 1 - eps, 1 + eps)
    loss = -F.logsigmoid(beta * torch.log(ratio_w) - beta * torch.log(ratio_l)).mean()
    return LPOLossOutput(
        loss=loss,
        ratio_w=ratio_w,
        ratio_l=ratio_l,
        implicit_acc=((ratio_w - ratio_l) > 0).float().mean(),
        margin=(ratio_w - ratio_l).mean(),
    )
