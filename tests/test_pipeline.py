"""DiNaLRMPipeline on the tiny offline SD3 components: equivalences, noise convention, inputs and errors."""

import math

import numpy as np
import PIL.Image
import pytest
import tolerances
import torch
from conftest import rounding_by_row

from dinalrm.testing import get_tiny_dinalrm_pipeline, get_tiny_sd3_pipeline, torch_threads
from pipeline_dinalrm import DiNaLRMPipeline


PROMPT = "a photo of a red cat on a table"
ENSEMBLE = [0.2, 0.5, 0.7]


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_rgb(seed: int, height: int = 32, width: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def pipe() -> DiNaLRMPipeline:
    return get_tiny_dinalrm_pipeline(seed=0)


@pytest.fixture(scope="module")
def sd3():
    sd3 = get_tiny_sd3_pipeline(seed=0)
    sd3.set_progress_bar_config(disable=True)
    return sd3


@pytest.fixture(scope="module")
def images() -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray(random_rgb(seed)) for seed in range(3)]


@pytest.fixture(scope="module")
def latents(pipe, images) -> torch.Tensor:
    return pipe.encode_images(images)


@pytest.fixture(scope="module")
def embeds(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    return pipe.encode_prompt(PROMPT)


def test_rewards_from_images_equal_rewards_from_their_latents(pipe, images, latents):
    from_images = pipe(PROMPT, images=images, generator=generator()).rewards
    from_latents = pipe(PROMPT, latents=latents, generator=generator()).rewards
    assert from_images.shape == (3,) and from_images.dtype == torch.float32
    assert from_images.unique().numel() == 3, "tiny head must tell images apart"
    tolerances.assert_close(from_images, from_latents)


def test_encode_images_is_the_scaled_vae_posterior_mode(pipe, images, latents):
    pixels = pipe.image_processor.preprocess(images)
    posterior = pipe.vae.encode(pixels).latent_dist
    expected = (posterior.mode() - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    tolerances.assert_close(latents, expected)
    assert latents.shape == (3, 16, 8, 8)  # tiny VAE: factor 4


def test_posterior_sample_is_drawn_before_the_scoring_noise(pipe, images):
    shared = generator(3)
    sampled = pipe.encode_images(images, sample_posterior=True, generator=shared)
    expected = pipe(PROMPT, latents=sampled, generator=shared).rewards
    actual = pipe(PROMPT, images=images, sample_posterior=True, generator=generator(3)).rewards
    tolerances.assert_close(actual, expected)


def test_rewards_from_prompts_equal_rewards_from_prompt_embeds(pipe, latents, embeds):
    from_prompt = pipe(PROMPT, latents=latents, generator=generator()).rewards
    from_embeds = pipe(
        prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1], latents=latents, generator=generator()
    ).rewards
    tolerances.assert_close(from_prompt, from_embeds)

    prompts = [PROMPT, "a dog in the snow", PROMPT]
    per_image = pipe(prompts, latents=latents, generator=generator()).rewards
    rows = pipe.encode_prompt(prompts)
    per_row = pipe(prompt_embeds=rows[0], pooled_prompt_embeds=rows[1], latents=latents, generator=generator()).rewards
    tolerances.assert_close(per_image, per_row)
    assert not torch.allclose(per_image[1], from_prompt[1]), "the prompt must matter"


def test_encode_prompt_matches_stable_diffusion_3(pipe, sd3):
    prompts = ["a photo of a cat", "an oil painting of a castle near the sea"]
    expected, _, expected_pooled, _ = sd3.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=128
    )
    actual, pooled = pipe.encode_prompt(prompts)
    assert actual.shape == (2, 77 + 128, 32) and pooled.shape == (2, 32)
    # Exact: the same encoders run on the same token ids in the same batch layout as StableDiffusion3Pipeline's.
    assert torch.equal(actual, expected) and torch.equal(pooled, expected_pooled)
    empty, _ = pipe.encode_prompt("")  # allowed here: an unconditional embedding
    assert empty.shape == (1, 205, 32)


def test_missing_t5_encoder_gives_zero_t5_tokens(pipe, embeds):
    no_t5 = DiNaLRMPipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    prompt_embeds, pooled = no_t5.encode_prompt(PROMPT)
    assert prompt_embeds.shape == embeds[0].shape
    tolerances.assert_close(prompt_embeds[:, :77], embeds[0][:, :77])
    assert not prompt_embeds[:, 77:].any()
    tolerances.assert_close(pooled, embeds[1])


def test_pipeline_ensemble_equals_model_level_ensemble(pipe, latents, embeds):
    output = pipe(PROMPT, latents=latents, t=ENSEMBLE, generator=generator(1), noise_sharing="none")
    batch = latents.shape[0]
    expected = pipe.reward_model.score_latents(
        latents, embeds[0].expand(batch, -1, -1), embeds[1].expand(batch, -1), t=ENSEMBLE, generator=generator(1)
    )
    tolerances.assert_close(output.rewards, expected)
    expected_levels = pipe.reward_model.snap_noise_level(torch.tensor(ENSEMBLE), 3)[0].tolist()
    assert output.noise_levels == tolerances.close_to(expected_levels) and output.noise_levels != ENSEMBLE


def test_same_generator_same_rewards(pipe, latents):
    first = pipe(PROMPT, latents=latents, generator=generator(7)).rewards
    again = pipe(PROMPT, latents=latents, generator=generator(7)).rewards
    other = pipe(PROMPT, latents=latents, generator=generator(8)).rewards
    # Exact: the same seed, the same inputs, the same batch: the same computation.
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_num_noise_samples_averages_draws_taken_in_order(pipe, latents, embeds):
    averaged = pipe(PROMPT, latents=latents, num_noise_samples=3, generator=generator(5), noise_sharing="none").rewards
    shared = generator(5)
    batch = latents.shape[0]
    draws = [
        pipe.reward_model.score_latents(
            latents, embeds[0].expand(batch, -1, -1), embeds[1].expand(batch, -1), t=0.4, generator=shared
        )
        for _ in range(3)
    ]
    tolerances.assert_close(averaged, torch.stack(draws).mean(0))


def test_no_sharing_draws_noise_batch_by_batch_as_the_reference(pipe, latents, monkeypatch):
    five = torch.cat([latents, latents[:2].flip(0)])
    totals = []
    original = pipe.progress_bar
    monkeypatch.setattr(pipe, "progress_bar", lambda total: totals.append(total) or original(total=total))
    rewards = pipe(PROMPT, latents=five, batch_size=2, generator=generator(2), noise_sharing="none").rewards
    assert totals == [3]
    shared = generator(2)
    with torch.no_grad():  # the pipeline encodes and scores without autograd, which changes the last bits
        prompt_embeds, pooled = pipe.encode_prompt(PROMPT)
        expected = [
            pipe.reward_model.score_latents(
                chunk, prompt_embeds.repeat(len(chunk), 1, 1), pooled.repeat(len(chunk), 1), generator=shared
            )
            for chunk in five.split(2)
        ]
    # Bit for bit: "none" is the scoring of the reference code (and of this pipeline before noise sharing).
    assert torch.equal(rewards, torch.cat(expected))


def _draws(pipe, shapes: list[tuple[int, ...]], seed: int, per_group: int = 1) -> list[list[torch.Tensor]]:
    """Per shape (one prompt group each), `per_group` centre crops of standard normal tensors at the backbone's
    largest latent size, drawn in order from one seeded CPU generator."""
    config = pipe.reward_model.config.backbone_config
    side = config["pos_embed_max_size"] * config["patch_size"]
    source = generator(seed)
    crops = []
    for channels, height, width in shapes:
        top, left = (side - height) // 2, (side - width) // 2
        draws = [torch.randn((1, channels, side, side), generator=source) for _ in range(per_group)]
        crops.append([d[..., top : top + height, left : left + width] for d in draws])
    return crops


def test_prompt_sharing_draws_one_noise_per_prompt_in_order_of_first_appearance(pipe, latents):
    prompts = [PROMPT, "a dog in the snow", PROMPT]
    embeds, pooled = pipe.encode_prompt(prompts)
    rewards = pipe(prompts, latents=latents, generator=generator(4)).rewards
    (cat,), (dog,) = _draws(pipe, [latents.shape[1:]] * 2, seed=4)
    expected = pipe.reward_model.score_latents(latents, embeds, pooled, t=0.4, noise=torch.cat([cat, dog, cat]))
    tolerances.assert_close(rewards, expected)
    # Rows of precomputed embeddings that are equal are one prompt, like equal strings.
    from_rows = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=latents, generator=generator(4))
    tolerances.assert_close(from_rows.rewards, rewards)


def test_num_noise_samples_are_draws_per_prompt_group(pipe, latents, embeds):
    rewards = pipe(PROMPT, latents=latents, t=ENSEMBLE, num_noise_samples=3, generator=generator(6)).rewards
    (draws,) = _draws(pipe, [latents.shape[1:]], seed=6, per_group=3)
    batch = latents.shape[0]
    expected = [
        pipe.reward_model.score_latents(
            latents,
            embeds[0].expand(batch, -1, -1),
            embeds[1].expand(batch, -1),
            t=ENSEMBLE,
            noise=d.expand_as(latents),
        )
        for d in draws
    ]
    tolerances.assert_close(rewards, torch.stack(expected).mean(0))


def test_identical_images_get_equal_rewards_and_even_odds(pipe, images):
    twin = images[0].copy()
    for seed in range(5):
        for t in (0.1, 0.7, ENSEMBLE):
            result = pipe.compare(PROMPT, images[0], twin, t=t, generator=generator(seed))
            assert result.rewards[0] == result.rewards[1]
            assert result.probability == 0.5 and result.winner == "a"
    independent = pipe.compare(PROMPT, images[0], twin, t=0.7, generator=generator(0), noise_sharing="none")
    assert independent.rewards[0] != independent.rewards[1], "independent draws must differ for this test to bite"
    ranking = pipe.rank(PROMPT, [images[1], twin, images[0]], generator=generator(1))
    assert ranking.rewards[ranking.indices.index(1)] == ranking.rewards[ranking.indices.index(2)]


def test_equal_images_tie_although_batch_rows_round_differently(pipe, images, monkeypatch):
    monkeypatch.setattr(pipe, "_encode_pixels", rounding_by_row(pipe._encode_pixels))
    twin = images[0].copy()
    ranking = pipe.rank(PROMPT, [images[1], twin, images[0], twin], generator=generator(1))
    tied = [ranking.rewards[ranking.indices.index(i)] for i in (1, 2, 3)]
    assert tied[0] == tied[1] == tied[2]
    assert ranking.rewards[ranking.indices.index(0)] != tied[0], "a different image must score differently"


def test_shared_scores_do_not_depend_on_batching(pipe, latents):
    five = torch.cat([latents, latents[:2].flip(0)])
    prompts = [PROMPT, "a dog in the snow", PROMPT, "a dog in the snow", PROMPT]
    full = pipe(prompts, latents=five, batch_size=5, generator=generator(3)).rewards
    # Backbone passes of other batch sizes round differently in the last bits (about 1e-6 relative), nothing more.
    for batch_size in (1, 2, 3):
        rewards = pipe(prompts, latents=five, batch_size=batch_size, generator=generator(3)).rewards
        tolerances.assert_close(rewards, full)
    # Other samples of a prompt neither shift nor reorder the draws: a sub-list and a reordering agree.
    fewer = pipe(prompts[:2], latents=five[:2], generator=generator(3)).rewards
    tolerances.assert_close(fewer, full[:2])
    order = [0, 3, 4, 1, 2]  # same first appearance of each prompt
    reordered = pipe([prompts[i] for i in order], latents=five[order], batch_size=2, generator=generator(3)).rewards
    tolerances.assert_close(reordered, full[order])


def test_images_of_different_sizes_share_the_centre_of_one_draw(pipe, images):
    tall = PIL.Image.fromarray(random_rgb(5, height=48))
    rewards = pipe(PROMPT, images=[images[0], tall, images[1]], batch_size=1, generator=generator(2)).rewards
    square, high = pipe.encode_images(images[:2]), pipe.encode_images([tall])
    assert square.shape[-2:] != high.shape[-2:]
    ((big,),) = _draws(pipe, [(16, 32, 32)], seed=2)  # the tiny backbone's largest latent: 32 x 32
    embeds, pooled = pipe.encode_prompt(PROMPT)
    centre = {size: big[..., (32 - size[0]) // 2 :, (32 - size[1]) // 2 :][..., : size[0], : size[1]]
              for size in (tuple(square.shape[-2:]), tuple(high.shape[-2:]))}  # fmt: skip
    expected_square = pipe.reward_model.score_latents(
        square,
        embeds.expand(2, -1, -1),
        pooled.expand(2, -1),
        noise=centre[tuple(square.shape[-2:])].expand_as(square),
    )
    expected_tall = pipe.reward_model.score_latents(high, embeds, pooled, noise=centre[tuple(high.shape[-2:])])
    tolerances.assert_close(rewards[[0, 2]], expected_square)
    tolerances.assert_close(rewards[1:2], expected_tall)


def test_noise_sharing_refuses_unknown_modes_and_generator_lists(pipe, latents):
    with pytest.raises(ValueError, match="noise_sharing='per-image' is not supported"):
        pipe(PROMPT, latents=latents, noise_sharing="per-image")
    with pytest.raises(ValueError, match="pass noise_sharing='none' with it"):
        pipe(PROMPT, latents=latents, generator=[generator(i) for i in range(3)])
    per_sample = pipe(PROMPT, latents=latents, generator=[generator(i) for i in range(3)], noise_sharing="none")
    assert per_sample.rewards.shape == (3,)


def test_normalize_gives_the_display_score(pipe, latents, images):
    raw = pipe(PROMPT, latents=latents, generator=generator()).rewards
    display = pipe(PROMPT, latents=latents, generator=generator(), normalize=True).rewards
    tolerances.assert_close(display, (raw + 10) / 10)
    # compare: the probability comes from the raw rewards whatever the display scale of the returned rewards.
    plain = pipe.compare(PROMPT, images[0], images[1], t=0.1, generator=generator())
    shown = pipe.compare(PROMPT, images[0], images[1], t=0.1, generator=generator(), normalize=True)
    assert shown.probability == plain.probability and abs(plain.probability - 0.5) > 0.05
    tolerances.assert_close(shown.rewards, (plain.rewards + 10) / 10)


def test_compare_agrees_with_the_thurstone_formula(pipe, images):
    config = pipe.reward_model.config
    for t, level in ((0.3, 0.3), (ENSEMBLE, config.default_t)):
        result = pipe.compare(PROMPT, images[0], images[1], t=t, generator=generator())
        rewards = pipe(PROMPT, images=images[:2], t=t, generator=generator()).rewards
        tolerances.assert_close(result.rewards, rewards)
        sigma = pipe.reward_model.snap_noise_level(level, 1)[0].item()
        assert result.noise_level == sigma
        variance = config.thurstone_k * sigma**2 + config.thurstone_v0
        z = (rewards[0] - rewards[1]).item() / math.sqrt(2 * variance + config.thurstone_eps)
        assert result.probability == tolerances.close_to(0.5 * (1 + math.erf(z / math.sqrt(2))), scale=1.0)
        assert result.winner == ("a" if rewards[0] >= rewards[1] else "b")


def test_rank_orders_best_first(pipe, images):
    rewards = pipe(PROMPT, images=images, generator=generator()).rewards
    ranking = pipe.rank(PROMPT, images, generator=generator())
    assert ranking.indices == sorted(range(3), key=lambda i: -rewards[i].item())
    tolerances.assert_close(ranking.rewards, rewards[ranking.indices])


def test_from_sd3_shares_components_without_copies(pipe, sd3):
    shared = DiNaLRMPipeline.from_sd3(sd3, pipe.reward_model)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        ours, theirs = getattr(shared, name), getattr(sd3, name)
        assert ours is theirs
        assert [p.data_ptr() for p in ours.parameters()] == [p.data_ptr() for p in theirs.parameters()]
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"):
        assert getattr(shared, name) is getattr(sd3, name)
    assert shared.reward_model is pipe.reward_model


def test_scores_latents_of_a_stable_diffusion_3_run_with_its_own_prompt_embeds(pipe, sd3):
    prompt_embeds, negative, pooled, negative_pooled = sd3.encode_prompt(PROMPT, None, None, max_sequence_length=128)
    latents = sd3(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=generator(),
        output_type="latent",
    ).images
    reused = pipe(latents=latents, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, generator=generator())
    encoded = pipe(PROMPT, latents=latents, generator=generator())
    tolerances.assert_close(reused.rewards, encoded.rewards)


def test_reward_fn_keeps_the_graph_to_the_latents(pipe, sd3, latents, embeds):
    trainable = latents.clone().requires_grad_(True)
    rewards = pipe.reward_fn(trainable, prompt=PROMPT, generator=generator(4))
    assert rewards.requires_grad and rewards.shape == (3,)
    (-rewards.mean()).backward()
    assert torch.isfinite(trainable.grad).all() and trainable.grad.abs().sum() > 0
    pipe.reward_model.zero_grad(set_to_none=True)

    expected = pipe(PROMPT, latents=latents, generator=generator(4), noise_sharing="none").rewards
    tolerances.assert_close(rewards.detach(), expected)
    shared = pipe.reward_fn(latents, prompt=PROMPT, generator=generator(4), noise_sharing="prompt")
    tolerances.assert_close(shared.detach(), pipe(PROMPT, latents=latents, generator=generator(4)).rewards)
    sd3_embeds, _, sd3_pooled, _ = sd3.encode_prompt(
        PROMPT, None, None, do_classifier_free_guidance=False, max_sequence_length=128
    )
    with torch.no_grad():
        from_sd3 = pipe.reward_fn(
            latents,
            prompt_embeds=sd3_embeds,
            pooled_prompt_embeds=sd3_pooled,
            generator=generator(4),
            t=0.4,
            num_noise_samples=1,
        )
    tolerances.assert_close(from_sd3, expected)


def test_reward_fn_encodes_each_prompt_once(pipe, latents, monkeypatch):
    calls = []
    original = pipe.encode_prompt
    counting = lambda prompts, *args: calls.append(list(prompts)) or original(prompts, *args)  # noqa: E731
    monkeypatch.setattr(pipe, "encode_prompt", counting)
    prompts = ["a blue boat on a lake", "a tall tree", "a blue boat on a lake"]
    with torch.no_grad():
        first = pipe.reward_fn(latents, prompt=prompts, generator=generator())
        again = pipe.reward_fn(latents, prompt=prompts, generator=generator())
    assert calls == [["a blue boat on a lake", "a tall tree"]]
    # Exact: the cached prompt embeddings are the tensors computed the first time.
    assert torch.equal(first, again)


def test_image_modes_are_converted(pipe):
    rgb = random_rgb(10)
    alpha = np.random.default_rng(11).integers(0, 256, (32, 32, 1), dtype=np.uint8)
    over_white = np.rint(rgb * (alpha / 255) + 255 * (1 - alpha / 255)).astype(np.uint8)
    grey = rgb[..., 0]
    rounding = np.random.default_rng(12).integers(-128, 129, grey.shape)  # still rounds to the same 8-bit value
    grey16 = np.clip(grey.astype(np.int64) * 257 + rounding, 0, 65535)
    cases = {
        "RGBA": (PIL.Image.fromarray(np.concatenate([rgb, alpha], -1)), over_white),
        "numpy RGBA": (np.concatenate([rgb, alpha], -1), over_white),
        "L": (PIL.Image.fromarray(grey), np.repeat(grey[..., None], 3, -1)),
        "16-bit PIL": (PIL.Image.fromarray(grey16.astype(np.uint16)), np.repeat(grey[..., None], 3, -1)),
        "16-bit numpy": (rgb.astype(np.uint16) * 257, rgb),
        "torch float CHW": (torch.from_numpy(rgb).permute(2, 0, 1) / 255.0, rgb),
        "numpy float HW": (grey / 255.0, np.repeat(grey[..., None], 3, -1)),
    }
    assert cases["16-bit PIL"][0].mode == "I;16" and cases["L"][0].mode == "L"
    for name, (image, as_rgb) in cases.items():
        expected = pipe.encode_images(PIL.Image.fromarray(np.ascontiguousarray(as_rgb)))
        # Exact: the mode conversion yields the very same RGB pixels, which then take the same path.
        assert torch.equal(pipe.encode_images(image), expected), name

    odd_pixels = random_rgb(13, height=53, width=37)
    odd = PIL.Image.fromarray(odd_pixels)
    center_crop = PIL.Image.fromarray(np.ascontiguousarray(odd_pixels[2:50, 2:34]))  # 53x37 -> 48x32, no resampling
    # Exact: the crop is the same pixels (no resampling), encoded the same way.
    assert torch.equal(pipe.encode_images(odd), pipe.encode_images(center_crop))
    assert pipe.encode_images(odd).shape == (1, 16, 12, 8)
    mixed = [cases["RGBA"][0], odd, cases["L"][0], cases["16-bit PIL"][0]]
    rewards = pipe(PROMPT, images=mixed, generator=generator(), noise_sharing="none").rewards
    assert rewards.shape == (4,) and torch.isfinite(rewards).all()
    # A batch is split into groups of one size, in order of first appearance; without noise sharing each group draws
    # its noise in turn.
    shared = generator()
    same_size = pipe(PROMPT, images=[mixed[0], mixed[2], mixed[3]], generator=shared, noise_sharing="none").rewards
    odd_alone = pipe(PROMPT, images=[odd], generator=shared, noise_sharing="none").rewards
    tolerances.assert_close(rewards, torch.stack([same_size[0], odd_alone[0], same_size[1], same_size[2]]))


def test_resize_rule(pipe):
    large = PIL.Image.fromarray(random_rgb(20, height=200, width=300))
    # Area capped at 128**2 (the tiny backbone's native side), aspect kept: 156x104 -> multiples of 8: 152x104.
    assert pipe.default_resolution == 128 and pipe.size_multiple == 8
    assert pipe.encode_images(large).shape[-2:] == (104 // 4, 152 // 4)
    assert pipe.encode_images(large, resolution=64).shape[-2:] == (48 // 4, 72 // 4)
    assert pipe.encode_images(large, resolution=(64, 32)).shape[-2:] == (16, 8)
    small = PIL.Image.fromarray(random_rgb(21, height=24, width=40))
    assert pipe.encode_images(small).shape[-2:] == (24 // 4, 40 // 4)  # never upscaled


def test_cpu_offload_sequence_names_every_model(pipe):
    models = {name for name, value in pipe.components.items() if isinstance(value, torch.nn.Module)}
    assert set(pipe.model_cpu_offload_seq.split("->")) == models


TINY = PIL.Image.new("RGB", (4, 4))
IMG = PIL.Image.new("RGB", (32, 32))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"prompt": PROMPT}, ValueError, "Pass `images`"),
        ({"prompt": PROMPT, "images": [IMG], "latents": torch.zeros(1, 16, 8, 8)}, ValueError, "not both"),
        ({"prompt": [PROMPT, PROMPT], "images": [IMG, IMG, IMG]}, ValueError, "2 prompts for 3 images"),
        ({"prompt": PROMPT, "images": []}, ValueError, "empty list"),
        ({"prompt": [], "images": [IMG]}, ValueError, "empty list"),
        ({"prompt": "  ", "images": [IMG]}, ValueError, "prompt is empty"),
        ({"images": [IMG]}, ValueError, "Pass `prompt`"),
        ({"prompt": PROMPT, "images": "no-such-file.png"}, FileNotFoundError, "no-such-file.png"),
        ({"prompt": PROMPT, "images": [IMG, {"path": "x"}]}, TypeError, r"images\[1\] is a dict"),
        ({"prompt": PROMPT, "images": [np.zeros((32, 32, 3), np.int64)]}, TypeError, "dtype int64"),
        ({"prompt": PROMPT, "images": [np.zeros((3, 32, 32), np.uint8)]}, ValueError, r"\(height, width, channels\)"),
        ({"prompt": PROMPT, "images": [np.full((32, 32, 3), -0.5)]}, ValueError, r"\(image \+ 1\) / 2"),
        ({"prompt": PROMPT, "images": [TINY]}, ValueError, "too small.*at least 8 pixels"),
        ({"prompt": PROMPT, "images": [IMG], "resolution": (30, 32)}, ValueError, "multiples of 8"),
        ({"prompt": PROMPT, "images": [IMG], "t": 1.5}, ValueError, r"\[0, 1\]"),
        ({"prompt": PROMPT, "images": [IMG], "t": -0.1}, ValueError, r"\[0, 1\]"),
        ({"prompt": PROMPT, "images": [IMG], "t": [0.2, 1.2]}, ValueError, r"\[0, 1\]"),
        ({"prompt": PROMPT, "images": [IMG], "t": []}, ValueError, "non-empty list"),
        ({"prompt": PROMPT, "images": [IMG], "num_noise_samples": 0}, ValueError, "num_noise_samples"),
        ({"prompt": PROMPT, "images": [IMG], "batch_size": 0}, ValueError, "batch_size"),
        ({"prompt_embeds": torch.zeros(1, 205, 32), "images": [IMG]}, ValueError, "pooled_prompt_embeds"),
        ({"prompt": PROMPT, "latents": torch.zeros(16, 8, 8)}, ValueError, "4D tensor"),
        ({"prompt": PROMPT, "latents": torch.zeros(1, 4, 8, 8)}, ValueError, "16 channels|channels"),
        # issue 14: inputs that used to give silent wrong results or raw crashes
        ({"prompt": PROMPT, "images": [np.full((32, 32, 3), np.nan, np.float32)]}, ValueError, "NaN or infinite"),
        ({"prompt": PROMPT, "images": [IMG], "resolution": 0}, ValueError, "resolution=0 must be an integer side"),
        ({"prompt": PROMPT, "images": [IMG], "resolution": -16}, ValueError, "resolution=-16"),
        ({"prompt": PROMPT, "images": [IMG], "resolution": (32.0, 32)}, ValueError, "two integers"),
        ({"prompt": PROMPT, "images": [np.zeros((0, 32, 3), np.uint8)]}, ValueError, r"shape \(0, 32, 3\) is empty"),
        ({"prompt": PROMPT, "images": [PIL.Image.new("RGB", (0, 0))]}, ValueError, "0x0 pixels is empty"),
        ({"prompt": PROMPT, "images": [torch.zeros(3, 0, 0)]}, ValueError, r"shape \(3, 0, 0\) is empty"),
        ({"prompt": PROMPT, "latents": torch.zeros(1, 16, 8, 8, dtype=torch.long)}, TypeError, "floating-point"),
        (
            {
                "prompt_embeds": [[[0.0] * 32]],
                "pooled_prompt_embeds": [[0.0] * 32],
                "latents": torch.zeros(1, 16, 8, 8),
            },
            TypeError,
            "prompt_embeds must be a floating-point torch tensor",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe(**kwargs)


def test_compare_refuses_batches(pipe):
    with pytest.raises(ValueError, match="one image per side"):
        pipe.compare(PROMPT, [IMG, IMG], IMG)


def _with_nan(tensor: torch.Tensor) -> torch.Tensor:
    broken = tensor.clone()
    broken.view(-1)[0] = float("nan")
    return broken


def test_pipeline_refuses_non_finite_inputs_by_default(pipe, latents, embeds):
    with pytest.raises(ValueError, match="latents contain NaN"):
        pipe(PROMPT, latents=_with_nan(latents), generator=generator())
    with pytest.raises(ValueError, match="prompt_embeds contain NaN"):
        pipe(prompt_embeds=_with_nan(embeds[0]), pooled_prompt_embeds=embeds[1], latents=latents)
    with pytest.raises(ValueError, match="latents contain NaN"):
        pipe.rank(PROMPT, latents=_with_nan(latents))
    unchecked = pipe(PROMPT, latents=_with_nan(latents), generator=generator(), check_finite=False).rewards
    assert torch.isnan(unchecked[0]) and torch.isfinite(unchecked[1:]).all()
    inf_pooled = embeds[1].clone()
    inf_pooled[0, 0] = float("inf")
    with pytest.raises(ValueError, match="pooled_prompt_embeds contain NaN or infinite"):
        pipe(prompt_embeds=embeds[0], pooled_prompt_embeds=inf_pooled, latents=latents)
    with pytest.raises(ValueError, match="noise contains NaN or infinite"):
        pipe.reward_model.score_latents(
            latents, embeds[0].expand(3, -1, -1), embeds[1].expand(3, -1), noise=_with_nan(torch.randn_like(latents))
        )
    with pytest.raises(TypeError, match="latents must be floating-point, got torch.int64"):
        pipe.reward_model.score_latents(latents.long(), embeds[0].expand(3, -1, -1), embeds[1].expand(3, -1))
    with pytest.raises(ValueError, match="cannot be ranked"):  # a NaN reward is never ranked (first, or anywhere)
        pipe.rank(PROMPT, latents=_with_nan(latents), generator=generator(), check_finite=False)


def test_reward_fn_does_not_read_input_values_back(pipe, latents):
    """On the CPU the model would check by default; reward_fn opts out, so a NaN reaches the reward untouched."""
    with torch.no_grad():
        rewards = pipe.reward_fn(_with_nan(latents), prompt=PROMPT, generator=generator())
    assert torch.isnan(rewards[0]) and torch.isfinite(rewards[1:]).all()
