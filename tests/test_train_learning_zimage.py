"""The photo learning test of `test_train_learning.py` with `--backbone zimage`, in its own file so that CI's
`--dist loadfile` runs it beside the SD3 and FLUX runs rather than after them."""

import json

import pytest
from diffusers import AutoencoderKL, ZImagePipeline
from test_train_learning import HELD_OUT_PAIRS, MIN_ACCURACY, SCORE_T, VAE_ASSET, photo_world, train

from dinalrm.testing import get_tiny_zimage_components


pytestmark = pytest.mark.slow
__all__ = ["photo_world"]  # the shared fixture, imported for pytest


def test_zimage_backbone_reaches_the_same_held_out_bar(photo_world):
    """The same run with `--backbone zimage`: the first 2 main layers of a tiny random Z-Image transformer (its
    refiners run in front), the photo VAE and a tiny Qwen3 prompt encoder; 64 caption tokens, so the chat template
    and the prompt fit and captions keep their own lengths. The bar is the SD3 runs', MIN_ACCURACY."""
    components = get_tiny_zimage_components(seed=0)
    components["vae"] = AutoencoderKL.from_pretrained(VAE_ASSET)
    ZImagePipeline(**components).save_pretrained(photo_world / "zimage")
    output = train(photo_world, "zimage", "--backbone", "zimage", "--max_sequence_length", "64")
    summary = json.loads((output / "training_summary.json").read_text())
    print(
        f"\nheld-out accuracy by step: {[(v['step'], v[f'val/accuracy_t{SCORE_T:g}']) for v in summary['validation']]}"
    )
    final = summary["validation"][-1]
    assert final["val/pairs"] == HELD_OUT_PAIRS
    assert final[f"val/accuracy_t{SCORE_T:g}"] >= MIN_ACCURACY, summary["validation"]
