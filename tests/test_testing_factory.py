"""The tiny SD3 factory builds real, consistent, deterministic components that work through diffusers' entry points."""

import numpy as np
import pytest
import tolerances
import torch
from diffusers import StableDiffusion3Pipeline

from dinalrm.testing import (
    build_tiny_tokenizers,
    get_tiny_sd3_components,
    get_tiny_sd3_pipeline,
    medium_transformer_config,
    save_tiny_sd3_pipeline,
    tiny_transformer_config,
)
from dinalrm.testing.models import _WORDS


PROMPT = "a photo of a red cat on a table"
MODULES = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


@pytest.fixture(scope="module")
def pipe() -> StableDiffusion3Pipeline:
    pipe = get_tiny_sd3_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: StableDiffusion3Pipeline) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(PROMPT, height=64, width=64, num_inference_steps=2, generator=generator, output_type="np").images


@pytest.fixture(scope="module")
def image(pipe: StableDiffusion3Pipeline) -> np.ndarray:
    return _generate(pipe)


def _state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("size", ["tiny", "medium"])
def test_dimension_chain(size: str) -> None:
    components = get_tiny_sd3_components(size=size)
    config = components["transformer"].config
    clip_1, clip_2 = components["text_encoder"].config, components["text_encoder_2"].config
    t5 = components["text_encoder_3"].config
    expected = tiny_transformer_config() if size == "tiny" else medium_transformer_config()
    assert config.num_layers == expected["num_layers"]
    assert config.caption_projection_dim == config.num_attention_heads * config.attention_head_dim
    assert config.pooled_projection_dim == clip_1.projection_dim + clip_2.projection_dim
    assert config.joint_attention_dim == t5.d_model >= clip_1.hidden_size + clip_2.hidden_size
    assert clip_1.to_dict() != clip_2.to_dict()  # the two CLIP encoders are distinguishable
    assert all(not components[name].training for name in MODULES)
    assert all(p.dtype == torch.float32 for name in MODULES for p in components[name].parameters())

    # The chain holds at run time: prompt embeddings have the shapes the transformer consumes.
    pipe = StableDiffusion3Pipeline(**components)
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        PROMPT, None, None, do_classifier_free_guidance=False, max_sequence_length=32
    )
    assert prompt_embeds.shape == (1, 77 + 32, config.joint_attention_dim)
    assert pooled.shape == (1, config.pooled_projection_dim)


def test_tiny_config_defaults_and_overrides() -> None:
    config = tiny_transformer_config(num_layers=2)
    assert config["num_layers"] == 2
    assert config["num_attention_heads"] * config["attention_head_dim"] == 32
    assert config["pos_embed_max_size"] == 32 and tuple(config["dual_attention_layers"]) == (0,)
    medium = medium_transformer_config(num_layers=12)
    assert medium["num_layers"] == 12
    assert medium["num_attention_heads"] * medium["attention_head_dim"] == medium["caption_projection_dim"] == 256


def test_broken_dimension_chain_is_refused() -> None:
    with pytest.raises(ValueError, match="pooled_projection_dim"):
        get_tiny_sd3_components(transformer_config=tiny_transformer_config(pooled_projection_dim=48))
    with pytest.raises(ValueError, match="joint_attention_dim"):
        get_tiny_sd3_components(transformer_config=tiny_transformer_config(joint_attention_dim=16))
    with pytest.raises(ValueError, match="size"):
        get_tiny_sd3_components(size="large")


def test_pipeline_runs_end_to_end(image: np.ndarray) -> None:
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0.0


def test_seeding(pipe: StableDiffusion3Pipeline) -> None:
    rng_state = torch.get_rng_state()
    same = get_tiny_sd3_components(seed=0)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's global RNG is left alone
    other = get_tiny_sd3_components(seed=1)
    for name in MODULES:
        assert _state_dicts_equal(getattr(pipe, name), same[name]), name
        assert not _state_dicts_equal(getattr(pipe, name), other[name]), name

    # Each module has its own seed: changing the transformer leaves every other module's weights as they were.
    resized = get_tiny_sd3_components(seed=0, transformer_config=tiny_transformer_config(num_layers=2))
    assert len(resized["transformer"].transformer_blocks) == 2
    for name in MODULES[1:]:
        assert _state_dicts_equal(getattr(pipe, name), resized[name]), name


def test_tokenizers_know_prompt_words() -> None:
    clip, clip_2, t5 = build_tiny_tokenizers()
    assert t5.unk_token_id == 2 and t5.pad_token_id == 0 and t5.eos_token_id == 1
    assert clip.model_max_length == clip_2.model_max_length == 77

    clip_ids = clip(PROMPT).input_ids
    assert clip.convert_ids_to_tokens(clip_ids) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "red</w>", "cat</w>", "on</w>", "a</w>",
        "table</w>", "<|endoftext|>",
    ]  # fmt: skip
    assert clip_2(PROMPT).input_ids == clip_ids
    t5_ids = t5(PROMPT).input_ids
    assert t5.convert_ids_to_tokens(t5_ids) == [
        "▁a", "▁photo", "▁of", "▁a", "▁red", "▁cat", "▁on", "▁a", "▁table", "</s>"
    ]  # fmt: skip

    # Every vocabulary word is one token in all three tokenizers (BPE merges do not interfere with each other).
    for word in _WORDS:
        assert len(clip(word, add_special_tokens=False).input_ids) == 1, word
        assert len(t5(word, add_special_tokens=False).input_ids) == 1, word

    # Words outside the vocabulary fall back to known characters, never to <unk>.
    other = "Zebra #42, in Paris!"
    assert clip.unk_token_id not in clip(other).input_ids[1:-1]
    assert t5.unk_token_id not in t5(other).input_ids
    assert clip.decode(clip(other).input_ids, skip_special_tokens=True) == "zebra # 4 2 , in paris !"
    assert t5.decode(t5(other).input_ids, skip_special_tokens=True) == other

    assert build_tiny_tokenizers(model_max_length=128)[0].model_max_length == 128


def test_vae_latents_are_a_quarter_of_the_image(pipe: StableDiffusion3Pipeline) -> None:
    vae = pipe.vae
    assert pipe.vae_scale_factor == 4
    assert vae.config.latent_channels == 16
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (0.0609, 1.5305)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(image).latent_dist.mode()
        decoded = vae.decode(latents).sample
    assert latents.shape == (1, 16, 16, 16)
    assert decoded.shape == image.shape


def test_save_round_trip(pipe: StableDiffusion3Pipeline, image: np.ndarray, tmp_path) -> None:
    path = save_tiny_sd3_pipeline(tmp_path / "tiny-sd3", seed=0)
    assert path == str(tmp_path / "tiny-sd3")
    loaded = StableDiffusion3Pipeline.from_pretrained(path)
    loaded.set_progress_bar_config(disable=True)
    for name in MODULES:
        assert _state_dicts_equal(getattr(pipe, name), getattr(loaded, name)), name
        assert not getattr(loaded, name).training, name
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        assert getattr(loaded, name)(PROMPT).input_ids == getattr(pipe, name)(PROMPT).input_ids, name
    assert loaded.tokenizer_3.unk_token_id == 2
    assert loaded.scheduler.config.shift == 3.0
    tolerances.assert_close(_generate(loaded), image)
