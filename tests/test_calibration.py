"""Calibrated preference probabilities (issue 12, item 3): the fit, its error measures, the script that writes it into
a model, and what `normalize="logistic"`, `compare` and the CLI do with it."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import tolerances
import torch
from conftest import REPO_ROOT

from dinalrm import cli
from dinalrm.evaluation.calibration import calibration_errors, fit_slope
from dinalrm.evaluation.calibration import main as calibrate_main
from dinalrm.testing import get_tiny_dinalrm_pipeline, write_tiny_preference_dataset
from pipeline_dinalrm import DiNaLRMPipeline


pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle"


def test_fit_recovers_the_slope_of_simulated_preferences():
    rng = np.random.default_rng(0)
    margins = rng.normal(0.0, 1.5, 40_000)
    preferred_first = rng.random(margins.size) < 1.0 / (1.0 + np.exp(-2.0 * margins))  # true slope 2
    assert fit_slope(np.where(preferred_first, margins, -margins)) == pytest.approx(2.0, rel=0.03)


def test_perfectly_ordered_pairs_are_refused():
    with pytest.raises(ValueError, match="slope is unbounded"):
        fit_slope([0.1, 0.5, 2.0])


def test_calibration_errors_by_hand():
    # Both orders: predictions 0.9, 0.6 (outcome 1) and 0.1, 0.4 (outcome 0). Bins 9, 6, 1, 4: each bin holds one
    # prediction, |0.9-1| + |0.6-1| + |0.1-0| + |0.4-0| = 1.0 over 4 -> ECE 0.25; Brier (0.01+0.16+0.01+0.16)/4.
    errors = calibration_errors([0.9, 0.6])
    assert errors == {"ece": pytest.approx(0.25), "brier": pytest.approx(0.085), "n_pairs": 2}
    assert calibration_errors([0.5] * 7)["ece"] == pytest.approx(0.0)  # 0.5 and 0.5 share a bin: 1/2 observed


@pytest.fixture(scope="module")
def calibrated():
    pipe = get_tiny_dinalrm_pipeline()
    pipe.reward_model.config.calibration = {"type": "logistic", "slope": 3.0, "reference_reward": 0.25, "t": [0.4]}
    yield pipe
    pipe.reward_model.config.calibration = None


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]


def test_logistic_normalization_and_compare_use_the_fitted_curve(calibrated, images):
    raw = calibrated(PROMPT, images=images, t=0.4, generator=torch.Generator().manual_seed(0)).rewards
    scores = calibrated(PROMPT, images=images, t=0.4, generator=torch.Generator().manual_seed(0), normalize="logistic")
    tolerances.assert_close(scores.rewards.numpy(), 1 / (1 + np.exp(-3.0 * (raw.numpy() - 0.25))))

    comparison = calibrated.compare(PROMPT, *images, t=0.4, generator=torch.Generator().manual_seed(0))
    assert comparison.probability == pytest.approx(1 / (1 + np.exp(-3.0 * float(raw[0] - raw[1]))), rel=1e-6)
    # At a level the calibration was not fitted at, compare keeps the training objective (Thurstone at t = 0.7).
    raw = calibrated(PROMPT, images=images, t=0.7, generator=torch.Generator().manual_seed(0)).rewards
    comparison = calibrated.compare(PROMPT, *images, t=0.7, generator=torch.Generator().manual_seed(0))
    sigma = float(calibrated.reward_model.snap_noise_level(0.7, 1)[0][0])
    z = float(raw[0] - raw[1]) / np.sqrt(2 * (2.0 * sigma**2 + 0.05) + 1e-6)
    assert comparison.probability == pytest.approx(0.5 * (1 + torch.erf(torch.tensor(z / np.sqrt(2))).item()), 1e-5)


def test_logistic_normalization_without_a_calibration_says_how_to_fit_one(images):
    pipe = get_tiny_dinalrm_pipeline()
    with pytest.raises(ValueError, match="eval/calibrate.py"):
        pipe(PROMPT, images=images, normalize="logistic")
    with pytest.raises(ValueError, match="normalize must be False, True, 'logistic' or 'zscore'"):
        pipe(PROMPT, images=images, normalize="sigmoid")


@pytest.mark.slow  # the whole script end to end (fit, write, reload): ~7 s; the fit itself is checked above
def test_script_fits_on_pairs_writes_into_the_model_and_the_pipeline_uses_it(tmp_path, capsys):
    model = shutil.copytree(REPO_ROOT / "assets" / "dinalrm-tiny", tmp_path / "model")
    fit = write_tiny_preference_dataset(tmp_path / "fit", num_pairs=24, seed=3, split="test")
    held = write_tiny_preference_dataset(tmp_path / "held", num_pairs=16, seed=4, split="test")
    argv = ["--model", str(model), "--pairs", fit, "--eval_pairs", held, "--output_dir", str(tmp_path / "out")]
    assert calibrate_main([*argv, "--write_to_model"]) == 0
    written = json.loads((tmp_path / "out" / "calibration.json").read_text())
    config = json.loads((model / "reward_model" / "config.json").read_text())
    assert config["calibration"] == written and written["t"] == [0.4] and written["n_fit_pairs"] == 24
    assert written["held_out_after"]["n_pairs"] == 16 and (tmp_path / "out" / "reliability.png").stat().st_size > 0
    assert "ECE" in capsys.readouterr().out

    assert calibrate_main([*argv, "--write_to_model"]) == 2  # never replaced without asking
    assert "already holds a calibration; pass --overwrite" in capsys.readouterr().err

    pipe = DiNaLRMPipeline.from_pretrained(model)
    assert pipe.reward_model.config.calibration == written
    image = str(REPO_ROOT / "assets" / "examples" / "red-circle-left.png")
    other = str(REPO_ROOT / "assets" / "examples" / "blue-square-right.png")
    assert cli.score_main(["--model", str(model), "--prompt", PROMPT, image, other, "--normalize", "logistic"]) == 0
    printed = capsys.readouterr().out.splitlines()
    opened = [PIL.Image.open(path) for path in (image, other)]
    raw = pipe(PROMPT, images=opened, generator=torch.Generator().manual_seed(0)).rewards
    expected = 1 / (1 + np.exp(-written["slope"] * (raw.numpy() - written["reference_reward"])))
    header, *ranking, comparison = printed
    assert header.startswith("calibrated scores in (0, 1) (higher = preferred)")
    scores = {line.split()[1]: float(line.split()[2]) for line in ranking}  # "  1. image +0.8123", best first
    assert [scores[image], scores[other]] == tolerances.printed_as(expected.tolist(), 4)
    probability = 1 / (1 + np.exp(-written["slope"] * float(raw[0] - raw[1])))
    assert comparison.endswith(f"A = {image}, B = {other}")
    assert float(comparison.split("= ")[1].split()[0]) == tolerances.printed_as(probability, 4)
