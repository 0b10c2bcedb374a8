"""The units `DiNaLRMPipeline.__call__` chains, each alone: input normalisation and prompt-shared noise grouping.

Expected values are written out by hand (group numbers, crop windows, pixel values), or drawn with `torch.randn` from
a fresh generator and cut by hand, never taken from the unit under test.
"""

import numpy as np
import PIL.Image
import pytest
import torch

from pipeline_dinalrm import (
    _as_image_list,
    _as_rgb_image,
    _centre_crop,
    _check_noise_sharing,
    _check_positive_int,
    _count_prompts,
    _count_samples,
    _distinct_rows,
    _embedding_row_ids,
    _first_appearance_ids,
    _per_sample,
    _ScoringInputs,
    prompt_groups,
    prompt_shared_noises,
)


# ---------------------------------------------------------------------------------------------- input normalisation
def test_image_list_splits_batches_wraps_single_images_and_opens_paths(tmp_path):
    batch = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    assert [a.shape for a in _as_image_list(batch)] == [(8, 8, 3), (8, 8, 3)]
    assert [t.shape for t in _as_image_list(torch.zeros(3, 3, 8, 8))] == [(3, 8, 8)] * 3
    single = PIL.Image.new("RGB", (4, 4))
    assert _as_image_list(single) == [single]
    # A fully transparent grey+alpha file: opened, composited on white, RGB.
    path = tmp_path / "clear.png"
    PIL.Image.new("LA", (2, 2), (0, 0)).save(path)
    (opened,) = _as_image_list(str(path))
    assert opened.mode == "RGB" and opened.getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize(
    "images, error, message",
    [
        ([], ValueError, "images is an empty list"),
        ({"a": 1}, TypeError, "got dict"),
        ([PIL.Image.new("RGB", (4, 4)), 3], TypeError, r"images\[1\] is a int"),
    ],
)
def test_image_list_refuses_what_is_not_an_image(images, error, message):
    with pytest.raises(error, match=message):
        _as_image_list(images)


def test_rgb_image_reads_channels_first_tensors_and_grey_floats():
    pixels = torch.tensor([[[10, 20]], [[30, 40]], [[50, 60]]], dtype=torch.uint8)  # (C=3, H=1, W=2)
    image = _as_rgb_image(pixels)
    assert image.mode == "RGB" and image.size == (2, 1)
    assert [image.getpixel((0, 0)), image.getpixel((1, 0))] == [(10, 30, 50), (20, 40, 60)]
    grey = _as_rgb_image(torch.tensor([[[0.0, 1.0]]]))  # (C=1, H=1, W=2) floats in [0, 1]
    assert [grey.getpixel((0, 0)), grey.getpixel((1, 0))] == [(0, 0, 0), (255, 255, 255)]
    with pytest.raises(ValueError, match="is empty"):
        _as_rgb_image(np.zeros((0, 4, 3), dtype=np.uint8))


def test_count_samples_counts_images_or_the_latent_batch():
    assert _count_samples([object()] * 3, None) == 3
    assert _count_samples(None, torch.zeros(2, 16, 4, 4)) == 2


@pytest.mark.parametrize(
    "images, latents, error, message",
    [
        (None, None, ValueError, "Pass `images`"),
        ([1], torch.zeros(1, 16, 4, 4), ValueError, "not both"),
        (None, torch.zeros(16, 4, 4), ValueError, "4D tensor"),
        (None, torch.zeros(1, 16, 4, 4, dtype=torch.int64), TypeError, "floating-point"),
        (None, torch.zeros(0, 16, 4, 4), ValueError, "batch 0"),
    ],
)
def test_count_samples_refuses(images, latents, error, message):
    with pytest.raises(error, match=message):
        _count_samples(images, latents)


def test_count_prompts():
    assert _count_prompts("a cat") == 1
    assert _count_prompts(["a cat", "a dog"]) == 2
    for prompt, error, message in (
        ([], ValueError, "empty list"),
        (["a cat", "  "], ValueError, "prompt is empty"),
        (3, TypeError, "got int"),
        (["a cat", 1], TypeError, "list of strings"),
    ):
        with pytest.raises(error, match=message):
            _count_prompts(prompt)


def test_positive_int():
    _check_positive_int("batch_size", 3)
    for value in (0, -1, 2.0):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            _check_positive_int("batch_size", value)


def test_per_sample_broadcasts_one_row_or_reads_one_per_sample():
    assert _per_sample(["x"], [0, 1, 2]) == ["x", "x", "x"]
    assert _per_sample(["x", "y", "z"], [2, 0]) == ["z", "x"]


def test_scoring_inputs_count_their_samples():
    assert _ScoringInputs([1, 2, 3], None, "p", None, None, None).num_samples == 3
    assert _ScoringInputs(None, torch.zeros(5, 16, 2, 2), "p", None, None, None).num_samples == 5


# ---------------------------------------------------------------------------------------------- prompt-shared noise
def test_noise_sharing_modes():
    _check_noise_sharing("prompt", torch.Generator())
    _check_noise_sharing("none", [torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="noise_sharing='batch' is not supported"):
        _check_noise_sharing("batch", None)
    with pytest.raises(ValueError, match="list of generators"):
        _check_noise_sharing("prompt", [torch.Generator()])


def test_first_appearance_ids():
    assert _first_appearance_ids(["b", "a", "b", "c", "a"]) == [0, 1, 0, 2, 1]
    assert _first_appearance_ids([]) == []


def test_prompt_groups_of_text_prompts():
    assert prompt_groups("a cat", None, None, 3) == [0, 0, 0]
    assert prompt_groups(["a dog", "a cat", "a dog", "a bird"], None, None, 4) == [0, 1, 0, 2]


def test_prompt_groups_of_embedding_rows_need_both_rows_equal():
    embeds = torch.tensor([[[1.0]], [[2.0]], [[1.0]], [[2.0]]])  # rows A, B, A, B
    pooled = torch.tensor([[5.0], [6.0], [5.0], [7.0]])  # ... but the last pooled row differs: a third prompt
    assert _embedding_row_ids(embeds, pooled) == [0, 1, 0, 2]
    assert prompt_groups(None, embeds, pooled, 4) == [0, 1, 0, 2]
    assert prompt_groups(None, embeds[:1], pooled[:1], 3) == [0, 0, 0]  # one row serves every sample


def test_prompt_groups_of_token_lists_without_pooled_embeddings():
    """Z-Image's format: one `(tokens_i, dim)` tensor per prompt, of different lengths, no pooled embedding."""
    first, second = torch.ones(2, 3), torch.ones(4, 3)
    assert prompt_groups(None, [first, second, first.clone()], None, 3) == [0, 1, 0]


def test_centre_crop_takes_the_middle_window():
    grid = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(_centre_crop(grid, 2, 2), torch.tensor([[[[5.0, 6.0], [9.0, 10.0]]]]))
    grid = torch.arange(25.0).view(1, 1, 5, 5)  # odd margins: top (5 - 2) // 2 = 1, left (5 - 3) // 2 = 1
    assert torch.equal(_centre_crop(grid, 2, 3), torch.tensor([[[[6.0, 7.0, 8.0], [11.0, 12.0, 13.0]]]]))


def test_prompt_shared_noises_draw_per_group_in_order_and_crop_each_latent():
    side, channels = 4, 2
    groups = [0, 1, 0]  # samples 0 and 2 share a prompt
    latents = torch.zeros(3, channels, 2, 2)
    draws: dict = {}
    (part,) = prompt_shared_noises(draws, groups, [([0, 1, 2], latents)], 2, torch.Generator().manual_seed(0), side)

    # Expected: group 0's two draws, then group 1's, each (1, C, 4, 4), cut to their centre 2x2 (rows/cols 1..2).
    reference = torch.Generator().manual_seed(0)
    expected_draws = [torch.randn(1, channels, side, side, generator=reference) for _ in range(4)]
    for k in range(2):
        group0, group1 = expected_draws[k][..., 1:3, 1:3], expected_draws[2 + k][..., 1:3, 1:3]
        assert torch.equal(part[k], torch.cat([group0, group1, group0]))  # bit-identical: copies of the same draw
    assert sorted(draws) == [0, 1]


def test_prompt_shared_noises_do_not_depend_on_batching():
    groups = [0, 1, 0, 2]
    latents = torch.zeros(4, 1, 2, 2)
    whole = prompt_shared_noises({}, groups, [([0, 1, 2, 3], latents)], 1, torch.Generator().manual_seed(3), 4)
    generator, draws = torch.Generator().manual_seed(3), {}
    first = prompt_shared_noises(draws, groups, [([0, 1], latents[:2])], 1, generator, 4)
    second = prompt_shared_noises(draws, groups, [([2, 3], latents[2:])], 1, generator, 4)
    # Bit-identical: the same draws, taken in the same order, are only cut and concatenated.
    assert torch.equal(whole[0][0], torch.cat([first[0][0], second[0][0]]))


def test_distinct_rows_scores_equal_latents_of_one_group_once():
    a, b = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    latents = torch.cat([a, b, a])
    noises = [torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2)]
    groups = [9, 9, 9, 0, 0, 0]  # per sample index; samples 3, 4, 5 form the part
    kept, kept_latents, kept_noises, (targets, source) = _distinct_rows([3, 4, 5], latents, noises, groups)
    assert kept == [3, 4] and targets == [3, 4, 5] and source == [0, 1, 0]
    assert torch.equal(kept_latents, torch.cat([a, b]))
    assert torch.equal(kept_noises[0][:, 0, 0, 0], torch.tensor([0.0, 1.0]))
    groups[5] = 1  # the equal latent under another prompt has its own noise: it is scored
    kept, _, _, (_, source) = _distinct_rows([3, 4, 5], latents, noises, groups)
    assert kept == [3, 4, 5] and source == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- the chain
def test_validated_inputs_lists_images_checks_and_groups_samples_by_prompt():
    from dinalrm.testing import get_tiny_dinalrm_pipeline

    pipe = get_tiny_dinalrm_pipeline(seed=0)
    images = np.zeros((3, 32, 32, 3), dtype=np.uint8)  # a 4D batch: three images
    args = (None, None, None, None, 1, 8)  # latents, prompt_embeds, pooled, t, num_noise_samples, batch_size
    inputs = pipe._validated_inputs(["a dog", "a cat", "a dog"], images, *args, "prompt", None)
    assert len(inputs.images) == 3 and inputs.latents is None and inputs.groups == [0, 1, 0]
    assert pipe._validated_inputs("a dog", images, *args, "none", None).groups is None
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        pipe._validated_inputs(["a dog", "a cat"], images, *args, "prompt", None)
