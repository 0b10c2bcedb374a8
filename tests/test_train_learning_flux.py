"""The photo learning test of `test_train_learning.py` with `--backbone flux`, in its own file so that CI's
`--dist loadfile` runs it beside the SD3 run rather than after it (each takes about 4-5 CPU minutes)."""

import json

import pytest
from diffusers import AutoencoderKL, FluxPipeline
from test_train_learning import HELD_OUT_PAIRS, MIN_ACCURACY, SCORE_T, VAE_ASSET, photo_world, train

from dinalrm.testing import get_tiny_flux_components


pytestmark = pytest.mark.slow
__all__ = ["photo_world"]  # the shared fixture, imported for pytest


def test_flux_backbone_reaches_the_same_held_out_bar(photo_world):
    """The same run with `--backbone flux`: the first 2 double-stream blocks of a tiny random FLUX transformer, the
    photo VAE and FLUX's prompt encoders. Measured once (seed 0, pairs p = 0): held-out accuracy at t=0.4 by step
    0.776, 0.820, 0.828, 0.832, 0.824 (ensemble 0.808), inside the spread of the SD3 runs recorded in
    `test_train_learning.py` (0.804-0.884 over 12 runs); the bar is theirs, MIN_ACCURACY."""
    components = get_tiny_flux_components(seed=0)
    components["vae"] = AutoencoderKL.from_pretrained(VAE_ASSET)
    FluxPipeline(**components).save_pretrained(photo_world / "flux")
    summary = json.loads((train(photo_world, "flux", "--backbone", "flux") / "training_summary.json").read_text())
    final = summary["validation"][-1]
    assert final["val/pairs"] == HELD_OUT_PAIRS
    assert final[f"val/accuracy_t{SCORE_T:g}"] >= MIN_ACCURACY, summary["validation"]
