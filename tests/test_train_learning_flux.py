"""The photo learning test of `test_train_learning.py` with `--backbone flux`, in its own file so that CI's
`--dist loadfile` can run it beside the SD3 run rather than after it (the photo pairs are built once per run)."""

import pytest
from conftest import PHOTO_HELD_OUT_PAIRS
from diffusers import FluxPipeline
from test_train_learning import MIN_ACCURACY, held_out_curve, save_photo_pipeline, train

from dinalrm.testing import get_tiny_flux_components


pytestmark = pytest.mark.slow  # about 70 CPU seconds


def test_flux_backbone_reaches_the_same_held_out_bar(photo_pairs, tmp_path):
    """The same run with `--backbone flux`: the first 2 double-stream blocks of a tiny random FLUX transformer, the
    photo VAE and FLUX's prompt encoders. Measured (pairs p = 0): held-out accuracy at t=0.4 at steps 100 and 200
    0.776, 0.784 (training seed 0, this test), 0.812, 0.800 (seed 1), 0.824, 0.836 (seed 2): mean 0.807, inside the
    spread of the SD3 runs recorded in `test_train_learning.py` (0.780-0.864 over 9 runs); the bar is theirs,
    MIN_ACCURACY, 3 SD below this mean. (The earlier 500-step recipe gave 0.824 for seed 0.)"""
    flux = save_photo_pipeline(FluxPipeline, get_tiny_flux_components(seed=0), tmp_path / "flux")
    summary = train(photo_pairs, flux, tmp_path / "reward-model", "--backbone", "flux")
    print(f"\nheld-out accuracy by step: {held_out_curve(summary)}")
    assert summary["validation"][-1]["val/pairs"] == PHOTO_HELD_OUT_PAIRS
    assert held_out_curve(summary)[-1][1] >= MIN_ACCURACY, summary["validation"]
