"""dinalrm.alignment's building blocks against hand computations: GRPO's advantages and clipped loss, the Gaussian
KL, the ReFL step's loss, the pixel reward's save/load round trip and the curves plot."""

import math

import pytest
import tolerances
import torch

from dinalrm.alignment import (
    PixelReward,
    gaussian_kl,
    group_advantages,
    grpo_loss,
    load_pixel_reward,
    plot_curves,
    refl_step,
    save_pixel_reward,
)


def test_group_advantages_are_standardised_within_each_prompt_group():
    advantages = group_advantages(torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0]), group_size=3)
    # Group 1: mean 2, unbiased std 1 -> (-1, 0, 1) / (1 + 1e-4).
    tolerances.assert_close(advantages[:3], torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-4))  # a few float32 ops
    assert torch.equal(advantages[3:], torch.zeros(3))  # a group of equal rewards teaches nothing (0 / eps is 0)


def test_group_advantages_refuse_rewards_that_do_not_split_into_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)


def test_grpo_loss_clips_the_ratio_as_ppo_does():
    # Ratios exp(0.5) ~ 1.65 and exp(-0.5) ~ 0.61, clip 0.2, advantages +1 and -1:
    # sample 1 (A=+1): max(-1.65, -1.2) = -1.2 (clipped); sample 2 (A=-1): max(0.61, 0.8) = 0.8 (clipped).
    log_prob = torch.tensor([0.5, -0.5], requires_grad=True)
    output = grpo_loss(log_prob, torch.zeros(2), torch.tensor([1.0, -1.0]), clip_range=0.2)
    tolerances.assert_close(output.loss, torch.tensor((-1.2 + 0.8) / 2))
    assert output.clip_fraction == 1.0
    output.loss.backward()
    assert torch.equal(log_prob.grad, torch.zeros(2))  # both clipped: no gradient flows


def test_grpo_loss_inside_the_clip_range_is_the_plain_surrogate_plus_the_kl():
    log_prob = torch.tensor([0.01, -0.01])
    kl = torch.tensor([0.3, 0.5])
    output = grpo_loss(log_prob, torch.zeros(2), torch.tensor([2.0, 1.0]), clip_range=0.2, kl=kl, beta=0.1)
    expected = (-2.0 * math.exp(0.01) - 1.0 * math.exp(-0.01)) / 2 + 0.1 * 0.4
    tolerances.assert_close(output.loss, torch.tensor(expected))
    assert output.clip_fraction == 0.0


def test_gaussian_kl_is_the_mean_squared_mean_gap_over_twice_the_variance():
    mean, reference = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    reference[0] = 1.0  # sample 0: every element 1 apart; sample 1: identical
    std = torch.tensor([0.5, 0.5]).view(2, 1, 1, 1)
    tolerances.assert_close(gaussian_kl(mean, reference, std), torch.tensor([1 / (2 * 0.25), 0.0]))


class _FixedSampler:
    """A sampler whose one-step prediction is a known tensor, to check the ReFL loss alone."""

    def __init__(self, x0):
        self.x0 = x0

    def sample_x0(self, transformer, embeds, pooled, stop, generator):
        return self.x0


def test_refl_step_loss_is_minus_the_weighted_mean_reward():
    x0 = torch.tensor([[1.0, 2.0], [3.0, 5.0]], requires_grad=True)
    output = refl_step(
        _FixedSampler(x0), None, None, None, ["a", "b"], lambda x, p, g: x.sum(dim=1), 0, None, reward_weight=2.0
    )
    tolerances.assert_close(output.reward, torch.tensor([3.0, 8.0]))
    tolerances.assert_close(output.loss, torch.tensor(-2.0 * 5.5))
    output.loss.backward()
    tolerances.assert_close(x0.grad, torch.full((2, 2), -1.0))  # d(-2 * mean(sum))/dx = -2 / 2


def test_pixel_reward_saves_and_loads_with_the_same_scores(tmp_path):
    torch.manual_seed(0)
    model = PixelReward(text_tokens=5, text_dim=8).eval()
    pixels, text = torch.rand(3, 3, 64, 64) * 2 - 1, torch.randn(3, 5, 8)
    save_pixel_reward(model, str(tmp_path / "pixel.safetensors"))
    loaded = load_pixel_reward(str(tmp_path / "pixel.safetensors"))
    with torch.no_grad():
        # Same weights and the same ops on the same inputs in one process: bit-identical scores.
        assert torch.equal(loaded(pixels, text), model(pixels, text))


def test_plot_curves_writes_one_image(tmp_path):
    history = [
        {"step": 0, "proxy_reward": 0.1, "golden_metric": 0.5},
        {"step": 5, "proxy_reward": 0.3, "golden_metric": 0.6},
    ]
    plot_curves(history, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
