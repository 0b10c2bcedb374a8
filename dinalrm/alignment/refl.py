"""ReFL with a DiNa-LRM reward (Xu et al., ImageReward, 2023): the generator samples up to a stop step, the last steps
with gradients; the one-step clean prediction `x0 = x_t - sigma * v` at the stop step is scored and `-reward` is
back-propagated into the generator. Also: loading a DiNa-LRM reward model for alignment."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from modeling_dinalrm import DiNaLRMModel

from .sampling import Sampler


#: A training reward of one-step clean latents: `(x0, prompts, generator) -> (B,)`, differentiable in `x0`.
RewardFn = Callable[[torch.Tensor, list[str], torch.Generator], torch.Tensor]


def load_reward_model(path: str) -> DiNaLRMModel:
    """The reward model of a Hub-layout repo (`reward_model/` subfolder) or of a bare model folder."""
    subfolder = (
        "reward_model" if (not os.path.isdir(path) or os.path.isdir(os.path.join(path, "reward_model"))) else None
    )
    return DiNaLRMModel.from_pretrained(path, subfolder=subfolder)


@dataclass
class ReFLStepOutput:
    """`loss = -reward_weight * reward.mean()` (to back-propagate), the per-sample `reward` and the scored `x0`."""

    loss: torch.Tensor
    reward: torch.Tensor
    x0: torch.Tensor


def refl_step(
    sampler: Sampler,
    transformer,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    prompts: list[str],
    reward_fn: RewardFn,
    stop: int,
    generator: torch.Generator,
    reward_weight: float = 1.0,
) -> ReFLStepOutput:
    """One ReFL loss: sample to step `stop` (the sampler's last `grad_steps` steps keep gradients), score the
    one-step prediction with `reward_fn` (noise drawn from `generator`) and weight it; call `backward` on `loss`."""
    x0 = sampler.sample_x0(transformer, embeds, pooled, stop, generator)
    reward = reward_fn(x0, prompts, generator)
    return ReFLStepOutput(loss=-reward_weight * reward.mean(), reward=reward, x0=x0)
