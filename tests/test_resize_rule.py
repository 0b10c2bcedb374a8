"""One fixed-size resize rule for training and scoring: `pipeline_dinalrm.resize_and_center_crop`.

Training brings every image to its bucket with `dinalrm.data.resize_and_center_crop`; the pipeline applies the same
function for `encode_images(..., resolution=(height, width))`. The expected pixels below are computed with PIL
directly (the crop boxes worked out by hand), not with the code under test.
"""

import numpy as np
import PIL.Image
import pytest
import tolerances
import torch
from diffusers.image_processor import VaeImageProcessor

from dinalrm.data import resize_and_center_crop as training_resize
from dinalrm.testing import get_tiny_dinalrm_pipeline, torch_threads
from pipeline_dinalrm import resize_and_center_crop


LANCZOS = PIL.Image.Resampling.LANCZOS


def random_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# (source width, height), target (width, height), the hand-computed cover size and crop box.
CASES = [
    # 100x60 -> cover 48x32: scale 32/60, width 100*32//60 = 53; left = 53//2 - 48//2 = 2.
    ((100, 60), (48, 32), (53, 32), (2, 0, 50, 32)),
    # 20x30 -> cover 32x32 (an upscale): height 30*32//20 = 48; top = 48//2 - 32//2 = 8.
    ((20, 30), (32, 32), (32, 48), (0, 8, 32, 40)),
    # 64x64 -> 64x64: nothing to do.
    ((64, 64), (64, 64), (64, 64), (0, 0, 64, 64)),
]


@pytest.mark.parametrize(("source", "size", "cover", "box"), CASES)
def test_training_resize_is_lanczos_cover_and_centre_crop(source, size, cover, box):
    image = random_image(*source)
    expected = image.resize(cover, LANCZOS) if cover != source else image
    expected = np.asarray(expected.crop(box))
    for rule in (training_resize, resize_and_center_crop):
        out = rule(image, size)
        assert out.size == size
        np.testing.assert_array_equal(np.asarray(out), expected)


@pytest.mark.parametrize(
    ("source", "size"),
    [
        ((100, 60), (48, 32)),
        ((61, 97), (32, 48)),
        ((30, 20), (64, 64)),
        ((333, 111), (96, 32)),
        ((128, 128), (64, 64)),
    ],
)
def test_rule_matches_the_vae_image_processor_crop_mode(source, size):
    """Scoring with `resolution=(h, w)` used diffusers' crop mode before; the shared rule keeps its pixels."""
    image = random_image(*source, seed=1)
    processor = VaeImageProcessor(vae_scale_factor=8)  # resample="lanczos", as SD3's
    expected = processor.resize(image, size[1], size[0], resize_mode="crop")
    np.testing.assert_array_equal(np.asarray(resize_and_center_crop(image, size)), np.asarray(expected))


@torch.no_grad()
def test_training_path_and_pipeline_give_identical_latents():
    """Bucket resize then encode (training) == `encode_images(resolution=(h, w))` (scoring) == VAE of PIL's pixels."""
    with torch_threads(1):
        pipe = get_tiny_dinalrm_pipeline(seed=0)
        image = random_image(100, 60, seed=2)
        width, height = 48, 32
        scored = pipe.encode_images(image, resolution=(height, width))
        trained = pipe.encode_images(training_resize(image, (width, height)), resolution=(height, width))
        # Exact: the training resize and the pipeline's resize are one function, so the VAE sees the same pixels.
        assert torch.equal(trained, scored)

        pixels = np.asarray(image.resize((53, 32), LANCZOS).crop((2, 0, 50, 32)), dtype=np.float32)
        pixels = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1.0
        vae = pipe.vae
        mode = vae.encode(pixels).latent_dist.mode()
        expected = (mode - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        assert scored.shape == (1, vae.config.latent_channels, height // 4, width // 4)
        tolerances.assert_close(scored, expected)
