"""Flow-GRPO's update: advantages normalised within each prompt group and the clipped, KL-regularised policy loss
of one SDE transition (Liu et al., Flow-GRPO, 2025; the ratio is of `dinalrm.alignment.flow_sde.sde_step`'s
log-probabilities under the current and the sampling policy)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


#: Added to each group's standard deviation, so a group whose samples all got the same reward gives zero advantages.
ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rewards standardised within each prompt group (consecutive `group_size` samples; unbiased std)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}.")
    grouped = rewards.view(-1, group_size)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + ADVANTAGE_EPS)).flatten()


@dataclass
class GRPOLossOutput:
    """`loss` to back-propagate; `clip_fraction`, the share of samples whose ratio left `[1 - clip, 1 + clip]`."""

    loss: torch.Tensor
    clip_fraction: float


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
) -> GRPOLossOutput:
    """PPO's clipped surrogate `mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))` with `r = exp(log_prob - old)`, plus
    `beta * mean(kl)` when a per-sample KL to the reference policy is given (see `gaussian_kl`)."""
    ratio = torch.exp(log_prob - old_log_prob)
    bounded = ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(-advantages * ratio, -advantages * bounded).mean()
    if kl is not None and beta > 0:
        loss = loss + beta * kl.mean()
    clip_fraction = float(((ratio.detach() - 1).abs() > clip_range).float().mean())
    return GRPOLossOutput(loss=loss, clip_fraction=clip_fraction)


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample KL between two Gaussian transitions of the same `std` (one per sample): the mean over elements of
    `(mean - reference_mean)^2 / (2 std^2)`."""
    return ((mean - reference_mean) ** 2).mean(dim=tuple(range(1, mean.dim()))) / (2 * std.flatten() ** 2)
