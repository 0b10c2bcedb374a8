"""The flow-matching SDE step: its density, its ODE limit and its sampling."""

import math

import pytest
import tolerances
import torch

from dinalrm.alignment.flow_sde import sde_step


def _inputs(batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 5, 6, generator=generator)
    velocity = torch.randn(batch, 4, 5, 6, generator=generator)
    return velocity, sample


def test_log_prob_is_the_gaussian_density_of_the_sample():
    velocity, sample = _inputs()
    sigma, sigma_next, a = 0.6, 0.45, 0.7
    prev, log_prob, mean, std = sde_step(
        velocity, sigma, sigma_next, sample, a, generator=torch.Generator().manual_seed(1)
    )
    # Independent computation: Flow-GRPO's coefficients written out by hand, density from torch.distributions.
    s = a * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    expected_mean = sample + dt * (velocity + s**2 / (2 * sigma) * (sample + (1 - sigma) * velocity))
    expected_std = s * math.sqrt(-dt)
    density = torch.distributions.Normal(expected_mean.double(), expected_std).log_prob(prev.double())
    tolerances.assert_close(mean, expected_mean)
    tolerances.assert_close(float(std), expected_std)
    tolerances.assert_close(log_prob.double(), density.mean(dim=(1, 2, 3)))
    assert log_prob.shape == (3,)


def test_given_prev_sample_is_scored_not_redrawn():
    velocity, sample = _inputs()
    candidate = torch.randn(sample.shape, generator=torch.Generator().manual_seed(5))
    prev, log_prob, mean, std = sde_step(velocity, 0.8, 0.7, sample, 0.5, prev_sample=candidate)
    # Exact: a given sample is returned as it is, not recomputed.
    assert torch.equal(prev, candidate)
    density = torch.distributions.Normal(mean.double(), std.double()).log_prob(candidate.double())
    tolerances.assert_close(log_prob.double(), density.mean(dim=(1, 2, 3)))
    # The mean itself is the most likely next state.
    assert (sde_step(velocity, 0.8, 0.7, sample, 0.5, prev_sample=mean)[1] > log_prob).all()


def test_noise_level_zero_is_the_euler_step():
    velocity, sample = _inputs()
    prev, log_prob, mean, std = sde_step(velocity, 0.5, 0.25, sample, 0.0)
    tolerances.assert_close(prev, sample - 0.25 * velocity)
    # Exact: with no noise the step returns its mean and a zero log-probability by construction.
    assert torch.equal(prev, mean) and float(std) == 0.0 and torch.equal(log_prob, torch.zeros(3))


def test_per_sample_sigmas_match_scalar_calls():
    velocity, sample = _inputs()
    sigmas, nexts = torch.tensor([1.0, 0.7, 0.3]), torch.tensor([0.9, 0.5, 0.0])
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(2))
    batched = sde_step(velocity, sigmas, nexts, sample, 0.7, prev_sample=noise)
    for i in range(3):
        one = slice(i, i + 1)
        single = sde_step(velocity[one], float(sigmas[i]), float(nexts[i]), sample[one], 0.7, prev_sample=noise[one])
        tolerances.assert_close(batched[1][one], single[1])
        tolerances.assert_close(batched[2][one], single[2])
    assert torch.isfinite(batched[1]).all()  # sigma = 1 reads the diffusion coefficient at sigma_next


def test_draws_follow_the_generator_and_the_stated_std():
    velocity, sample = _inputs(batch=2)
    first = sde_step(velocity, 0.5, 0.4, sample, 1.0, generator=torch.Generator().manual_seed(3))
    again = sde_step(velocity, 0.5, 0.4, sample, 1.0, generator=torch.Generator().manual_seed(3))
    # Exact: the same seed draws the same noise for the same computation.
    assert torch.equal(first[0], again[0])
    residual = (first[0] - first[2]) / first[3]
    assert abs(float(residual.std()) - 1.0) < 0.15  # 240 draws of a unit normal


def test_gradient_flows_to_the_velocity_through_the_log_prob():
    velocity, sample = _inputs()
    velocity.requires_grad_(True)
    prev, _, _, _ = sde_step(velocity.detach(), 0.5, 0.4, sample, 0.7, generator=torch.Generator().manual_seed(0))
    log_prob = sde_step(velocity, 0.5, 0.4, sample, 0.7, prev_sample=prev)[1]
    log_prob.sum().backward()
    assert velocity.grad is not None and velocity.grad.abs().sum() > 0


@pytest.mark.parametrize(("sigma", "sigma_next", "a"), [(0.4, 0.5, 0.7), (0.5, 0.5, 0.7), (0.5, 0.4, -0.1)])
def test_bad_arguments_are_refused(sigma, sigma_next, a):
    velocity, sample = _inputs()
    with pytest.raises(ValueError, match="sigma_next|noise_level"):
        sde_step(velocity, sigma, sigma_next, sample, a)
