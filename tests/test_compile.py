"""Regional compilation of the backbone blocks (`compile_repeated_blocks`, the pipeline's `compile=True`)."""

import pytest
import tolerances
import torch
from diffusers import SD3Transformer2DModel

from dinalrm.testing import (
    get_tiny_dinalrm_reward_model,
    get_tiny_sd3_components,
    save_tiny_sd3_pipeline,
    tiny_transformer_config,
)
from pipeline_dinalrm import DiNaLRMPipeline
from train_dinalrm import build_reward_model, parse_args


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow  # inductor compiles the block graph: 10-30 s of CPU time
def test_compiled_blocks_give_the_same_rewards(fresh_dynamo):
    """Two blocks of one structure (dual attention, as SD3.5-Medium's first 13), so that they can share one compiled
    graph: inductor's C++ build of each fused kernel is most of this test's time."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(**tiny_transformer_config(dual_attention_layers=(0, 1)))
    eager = get_tiny_dinalrm_reward_model(lora_rank=4, transformer=transformer)
    compiled = get_tiny_dinalrm_reward_model(lora_rank=4, transformer=transformer)
    compiled.compile_repeated_blocks()
    blocks = compiled.backbone.transformer_blocks
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert compiled.state_dict().keys() == eager.state_dict().keys()

    config = eager.config.backbone_config
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, config["in_channels"], 16, 16, generator=generator)
    prompt = torch.randn(2, 7, config["joint_attention_dim"], generator=generator)
    pooled = torch.randn(2, config["pooled_projection_dim"], generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    with torch.no_grad():  # the ensemble: one compilation covers the single-level path's blocks too
        expected = eager.score_latents(latents, prompt, pooled, t=[0.2, 0.5, 0.7], noise=noise)
        rewards = compiled.score_latents(latents, prompt, pooled, t=[0.2, 0.5, 0.7], noise=noise)
    tolerances.assert_close(rewards, expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled


def test_pipeline_compile_option_compiles_the_reward_blocks(fresh_dynamo):
    components = get_tiny_sd3_components()
    reward_model = get_tiny_dinalrm_reward_model(transformer=components.pop("transformer"))
    assert not any(module._compiled_call_impl for module in reward_model.modules())
    DiNaLRMPipeline(reward_model=reward_model, compile=True, **components)
    assert all(block._compiled_call_impl is not None for block in reward_model.backbone.transformer_blocks)


def test_train_compile_flag_compiles_the_backbone_blocks(tmp_path, fresh_dynamo):
    save_tiny_sd3_pipeline(tmp_path / "sd3")
    flags = ["--pretrained_model_name_or_path", str(tmp_path / "sd3"), "--train_data_dir", "unused"]
    flags += ["--num_backbone_layers", "2", "--visual_layers", "1,2", "--text_layers", "1,2", "--head_num_heads", "2"]
    for extra, compiled in (([], False), (["--compile"], True)):
        model = build_reward_model(parse_args([*flags, *extra]))
        assert all((block._compiled_call_impl is not None) == compiled for block in model.backbone.transformer_blocks)
