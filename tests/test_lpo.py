"""`dinalrm.alignment.lpo` beyond the official fixture: the reward adapters and the generic step loop's contract."""

import pytest
import tolerances
import torch

from dinalrm.alignment.flow_sde import sde_step
from dinalrm.alignment.lpo import (
    CallableReward,
    DiNaLRMReward,
    LatentReward,
    StepDistribution,
    confidence_compare_fn,
    dynamic_threshold,
    flow_step_distribution,
    gaussian_log_prob,
    sample_candidates,
    sample_with_candidates,
)
from dinalrm.testing.models import get_tiny_dinalrm_reward_model


pytestmark = pytest.mark.usefixtures("one_thread")


def test_dinalrm_reward_scores_each_candidate_with_its_own_prompt():
    model = get_tiny_dinalrm_reward_model()
    config = model.config.backbone_config
    generator = torch.Generator().manual_seed(0)
    num_prompts, num_candidates = 2, 3
    prompt_embeds = torch.randn(num_prompts, 5, config["joint_attention_dim"], generator=generator)
    pooled = torch.randn(num_prompts, config["pooled_projection_dim"], generator=generator)
    latents = torch.randn(num_prompts * num_candidates, config["in_channels"], 8, 8, generator=generator)
    sigmas = torch.full((latents.shape[0],), 0.6)
    reward = DiNaLRMReward(model)
    assert isinstance(reward, LatentReward)
    scores = reward.score(latents, sigmas, (prompt_embeds, pooled))
    for row in range(latents.shape[0]):  # candidate-major: row r belongs to prompt r % num_prompts
        j = row % num_prompts
        alone = model(latents[row : row + 1], 0.6, prompt_embeds[j : j + 1], pooled[j : j + 1]).rewards
        assert scores[row].item() == tolerances.close_to(alone.item())


def _toy_run(reward_at_current_timestep: bool):
    calls = []

    def score(latents, timesteps, conditioning):
        calls.append(timesteps.clone())
        return latents.mean(dim=(1, 2, 3)) * 10

    timesteps = torch.tensor([900, 600, 300])
    output = sample_with_candidates(
        predict=lambda x, t: torch.zeros_like(x),
        step_distribution=lambda eps, t, x: StepDistribution(
            mean=0.9 * x, std=torch.full_like(x, 0.5), prev_timestep=t - 300
        ),
        reward=CallableReward(score),
        threshold_fn=lambda t: dynamic_threshold("linear", t, 0.0, 0.2),
        latents=torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1)),
        timesteps=timesteps,
        conditioning=None,
        num_candidates=4,
        generator=torch.Generator().manual_seed(2),
        continuation_generator=torch.Generator().manual_seed(3),
        reward_at_current_timestep=reward_at_current_timestep,
    )
    return output, calls, timesteps


def test_step_loop_keeps_best_and_worst_and_continues_from_the_drawn_candidate():
    output, calls, timesteps = _toy_run(reward_at_current_timestep=True)
    assert [c.tolist() for c in calls] == [[t] * 8 for t in timesteps.tolist()]  # the official quirk: told t
    for step in range(len(timesteps)):
        scores = output.scores[step]  # (K, B)
        assert torch.equal(output.compare_indices[step, 0], scores.argmax(0))
        assert torch.equal(output.compare_indices[step, 1], scores.argmin(0))
        gap = torch.tanh((scores.max(0).values - scores.min(0).values) / 2)
        threshold = 0.2 * (timesteps[step] - 1) / 950
        assert torch.equal(output.compare_valid[step], gap > threshold)
    assert len(output.timesteps) == output.compare_valid.sum()
    kept_scores = output.winner_latents.mean(dim=(1, 2, 3)) * 10
    assert (kept_scores >= output.loser_latents.mean(dim=(1, 2, 3)) * 10).all()
    # x_{i+1} is candidate continuation_indices[i]: it sits at 0.9 x_i + 0.5 noise, scored with that value.
    for step in range(len(timesteps)):
        chosen = output.scores[step].gather(0, output.continuation_indices[step][None])[0]
        tolerances.assert_close(output.trajectory[step + 1].mean(dim=(1, 2, 3)) * 10, chosen)


def test_step_loop_can_tell_the_reward_the_candidates_own_level():
    output, calls, timesteps = _toy_run(reward_at_current_timestep=False)
    assert [c.tolist() for c in calls] == [[t - 300] * 8 for t in timesteps.tolist()]
    same, _, _ = _toy_run(reward_at_current_timestep=True)
    # Exact: the sampling does not depend on the reward, so both runs are the same computation.
    assert torch.equal(output.trajectory, same.trajectory), "only what the reward is told changes"


def test_official_tables_refuse_timesteps_beyond_them():
    with pytest.raises(ValueError, match="covers timesteps 0..999"):
        dynamic_threshold("sigma", torch.tensor([1000]), 0.35, 0.5)
    with pytest.raises(ValueError, match="Unknown threshold schedule"):
        dynamic_threshold("cosine", torch.tensor([1]), 0.35, 0.5)


def test_confidence_rule_is_the_thurstone_probability_of_best_over_worst():
    """The flow path's pair rule against `Phi(dr / sqrt(2 var(t) + eps))` written here from the formula."""
    from scipy.stats import norm

    model = get_tiny_dinalrm_reward_model()
    config = model.config
    table = model._sigma_table  # levels that snap to themselves
    sigmas = torch.stack([table[len(table) // 2], table[len(table) // 3], table.min(), table.max()])
    scores = torch.tensor([[0.1, 0.0, 1.0, 0.3], [0.9, 0.5, 0.0, 1.3], [0.4, 1.2, 0.5, 0.5]])
    min_confidence = 0.75
    compared = confidence_compare_fn(model, min_confidence)(scores, sigmas)

    best, worst = scores.max(0), scores.min(0)
    variance = config.thurstone_k * sigmas.double() ** 2 + config.thurstone_v0
    expected = norm.cdf(((best.values - worst.values).double() / torch.sqrt(2 * variance + config.thurstone_eps)))
    assert torch.equal(compared.indices, torch.stack([best.indices, worst.indices]))
    assert compared.valid.tolist() == (expected > min_confidence).tolist()
    # The same gap of 1 is confident at the least noisy level and not at the noisiest: stricter where var(t) grows.
    assert compared.valid[2] and not compared.valid[3] and expected[2] > min_confidence > expected[3]
    with pytest.raises(ValueError, match="min_confidence"):
        confidence_compare_fn(model, 0.3)


def test_flow_step_distribution_is_the_shared_sde_step():
    generator = torch.Generator().manual_seed(0)
    sample, velocity = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)
    sigma, sigma_next = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.3])
    distribution = flow_step_distribution(velocity, sigma, sigma_next, sample, noise_level=0.7)
    candidate = sample_candidates(distribution, 1, generator)[0]
    _, log_prob, mean, std = sde_step(velocity, sigma, sigma_next, sample, 0.7, prev_sample=candidate)
    assert torch.equal(distribution.mean, mean) and torch.equal(distribution.prev_timestep, sigma_next)
    tolerances.assert_close(gaussian_log_prob(candidate, distribution), log_prob)
    # std = a sqrt(sigma / (1 - sigma)) sqrt(sigma - sigma_next), written out here
    expected_std = 0.7 * torch.sqrt(sigma / (1 - sigma)) * torch.sqrt(sigma - sigma_next)
    tolerances.assert_close(distribution.std[:, 0, 0, 0], expected_std)
    with pytest.raises(ValueError, match="noise_level must be > 0"):
        flow_step_distribution(velocity, sigma, sigma_next, sample, noise_level=0.0)


def test_step_loop_takes_exactly_one_comparison_rule():
    with pytest.raises(ValueError, match="exactly one of threshold_fn"):
        sample_with_candidates(
            predict=None,
            step_distribution=None,
            reward=None,
            threshold_fn=None,
            latents=torch.zeros(1, 1, 2, 2),
            timesteps=torch.tensor([1]),
            conditioning=None,
            num_candidates=2,
        )
