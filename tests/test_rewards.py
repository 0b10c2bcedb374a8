"""Flow-GRPO reward adapters: same scores as direct pipeline calls, Flow-GRPO's input types, gradients."""

import numpy as np
import pytest
import tolerances
import torch
from PIL import Image

from dinalrm.alignment.rewards import flow_grpo_latent_reward, flow_grpo_reward
from dinalrm.testing import get_tiny_dinalrm_pipeline, save_tiny_dinalrm_repo


PROMPTS = ["a red circle", "a red circle", "a blue square"]


@pytest.fixture(scope="module")
def pipe():
    return get_tiny_dinalrm_pipeline(seed=0)


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # NCHW in [0, 1], as Flow-GRPO


def test_pixel_adapter_equals_the_pipeline_for_every_flow_grpo_image_type(pipe, images):
    expected = pipe(PROMPTS, images=images, generator=torch.Generator().manual_seed(7), normalize=True).rewards
    uint8 = (images * 255).round().to(torch.uint8)
    as_numpy = uint8.permute(0, 2, 3, 1).numpy()  # NHWC uint8, what older Flow-GRPO versions pass
    as_pil = [Image.fromarray(a) for a in as_numpy]
    expected_uint8 = pipe(PROMPTS, images=as_pil, generator=torch.Generator().manual_seed(7), normalize=True).rewards
    for batch, reference in ((images, expected), (as_numpy, expected_uint8), (as_pil, expected_uint8)):
        scores, details = flow_grpo_reward(pipe, seed=7)(batch, PROMPTS, [{}] * 3)
        assert details == {} and scores.shape == (3,) and scores.dtype == torch.float32
        tolerances.assert_close(scores, reference.float())
    assert len(set(expected.tolist())) == 3  # the scores differ: the comparison above can fail


def test_pixel_adapter_loads_a_folder_and_returns_raw_rewards(tmp_path, pipe, images):
    repo = save_tiny_dinalrm_repo(tmp_path / "repo", seed=0)
    scores, _ = flow_grpo_reward(repo, device="cpu", normalize=False, seed=3)(images, PROMPTS, None)
    expected = pipe(PROMPTS, images=images, generator=torch.Generator().manual_seed(3)).rewards
    tolerances.assert_close(scores, expected)


def test_one_seed_gives_fresh_noise_per_call_and_a_reproducible_run(pipe, images):
    first = flow_grpo_reward(pipe, seed=1)
    again = flow_grpo_reward(pipe, seed=1)
    a1, a2 = first(images, PROMPTS, None)[0], first(images, PROMPTS, None)[0]
    assert not torch.equal(a1, a2)
    # Exact: the same seed sequence gives the same draws for the same computation.
    assert torch.equal(a1, again(images, PROMPTS, None)[0]) and torch.equal(a2, again(images, PROMPTS, None)[0])


def _latent_batch(pipe):
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(3, 16, 4, 4, generator=generator)
    embeds, pooled = pipe.encode_prompt(PROMPTS)
    return latents, embeds, pooled


def test_latent_adapter_equals_the_pipeline(pipe):
    latents, embeds, pooled = _latent_batch(pipe)
    scores, details = flow_grpo_latent_reward(pipe, seed=5, normalize=False)(latents, embeds, pooled, None)
    expected = pipe(
        latents=latents, prompt_embeds=embeds, pooled_prompt_embeds=pooled, generator=torch.Generator().manual_seed(5)
    ).rewards
    assert details == {} and scores.shape == (3,) and not scores.requires_grad
    tolerances.assert_close(scores, expected)
    assert scores[0] != scores[2]


def test_differentiable_latent_adapter_equals_reward_fn_and_passes_gradients(pipe):
    latents, embeds, pooled = _latent_batch(pipe)
    latents.requires_grad_(True)
    fn = flow_grpo_latent_reward(pipe, seed=5, t=0.4, differentiable=True)
    scores, _ = fn(latents, embeds, pooled, None)
    expected = pipe.reward_fn(
        latents.detach(),
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        t=0.4,
        generator=torch.Generator().manual_seed(5),
        normalize=True,
        noise_sharing="prompt",
    )
    tolerances.assert_close(scores.detach(), expected)
    scores.sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipe.reward_model.parameters())  # the reward model stays frozen
    # The non-differentiable call scores the same latents to the same values.
    plain = flow_grpo_latent_reward(pipe, seed=5, t=0.4)(latents, embeds, pooled, None)[0]
    tolerances.assert_close(plain, expected)


def test_samples_of_one_prompt_share_the_reward_noise(pipe, images):
    same = torch.stack([images[0], images[0], images[2]])
    scores, _ = flow_grpo_reward(pipe, seed=0)(same, PROMPTS, None)
    # One noise draw for both: equal up to the last bits a batched matmul may give two identical rows.
    assert scores[0].item() == tolerances.close_to(scores[1].item())
    assert np.isfinite(scores.numpy()).all()
    # With a draw per sample, the same two images score visibly apart: the equality above is the shared noise.
    independent = pipe(
        PROMPTS, images=same, noise_sharing="none", generator=torch.Generator().manual_seed(0), normalize=True
    ).rewards
    assert abs(independent[0].item() - independent[1].item()) > 1e-3
