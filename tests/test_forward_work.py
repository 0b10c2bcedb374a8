"""The ensemble does each level-independent piece of work once: the text embedding, and one batched layer fusion;
the backbone runs one pass per level (never a pass that stacks levels), split by `max_backbone_batch_size`."""

import pytest
import tolerances
import torch

from dinalrm.testing import get_tiny_dinalrm_reward_model
from modeling_dinalrm import add_noise


LEVELS = [0.2, 0.5, 0.7]


@pytest.fixture(scope="module")
def model():
    return get_tiny_dinalrm_reward_model(num_layers=3, visual_layers=(1, 2, 3), text_layers=(1, 2))


@pytest.fixture(scope="module")
def inputs(model):
    config = model.config.backbone_config
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, config["in_channels"], 16, 16, generator=generator)
    prompt = torch.randn(3, 7, config["joint_attention_dim"], generator=generator)
    pooled = torch.randn(3, config["pooled_projection_dim"], generator=generator)
    return latents, prompt, pooled, torch.randn(latents.shape, generator=generator)


def record_batches(module: torch.nn.Module, seen: list[int]):
    return module.register_forward_hook(lambda _module, args, _output: seen.append(args[0].shape[0]))


@pytest.mark.parametrize("chunk", [None, 2], ids=["one_pass_per_level", "chunked"])
def test_text_is_embedded_once_across_levels(model, inputs, chunk, monkeypatch):
    latents, prompt, pooled, noise = inputs
    monkeypatch.setattr(model.config, "max_backbone_batch_size", chunk)
    embedded, passes, adapted = [], [], []
    hooks = [record_batches(model.backbone.context_embedder, embedded)]
    hooks.append(record_batches(model.backbone.transformer_blocks[0], passes))
    hooks += [record_batches(a, adapted) for a in model.reward_head.layer_adapters_visual]
    try:
        with torch.no_grad():
            model.score_latents(latents, prompt, pooled, t=LEVELS, noise=noise)
    finally:
        for hook in hooks:
            hook.remove()
    assert embedded == [3]  # the 3 prompts, not 3 levels x 3 prompts, whatever the chunking
    if chunk is None:
        assert passes == [3, 3, 3]  # one pass per level
    else:  # each level's 3 samples in chunks of at most 2
        assert passes == [2, 1, 2, 1, 2, 1]
    # One fusion over all levels: each layer adapter runs once on the 9 level-stacked samples.
    assert adapted == [9, 9, 9]


def test_batched_fusion_matches_the_per_level_definition(model, inputs):
    """DESIGN.md: V and T are built per level with that level's temb, then joined along the token axis."""
    latents, prompt, pooled, noise = inputs
    with torch.no_grad():
        rewards = model.score_latents(latents, prompt, pooled, t=LEVELS, noise=noise)
        fused = []
        for level in LEVELS:
            sigmas, timesteps = model.snap_noise_level(level, 3)
            noisy = add_noise(latents, noise, sigmas)
            temb, visual, text = model.backbone(noisy, prompt, pooled, model.backbone.timestep(sigmas, timesteps))
            fused.append(model.reward_head.fuse(visual, text, temb))
        expected = model.reward_head.pool(torch.cat([v for v, _ in fused], 1), torch.cat([t for _, t in fused], 1))
    # One batched matmul over the levels may sum in another order than three: equal up to float32 rounding.
    tolerances.assert_close(rewards, expected)
