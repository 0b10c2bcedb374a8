"""Reward statistics (dinalrm/evaluation/reward_stats.py) and z-scored rewards (`normalize="zscore"`)."""

import json
import math
from pathlib import Path

import pytest
import tolerances
import torch
from huggingface_hub import ModelCard
from PIL import Image

from dinalrm.evaluation.reward_stats import reward_statistics, write_reward_statistics
from dinalrm.testing import save_tiny_dinalrm_repo
from pipeline_dinalrm import DiNaLRMPipeline


pytestmark = pytest.mark.usefixtures("one_thread")


def test_statistics_by_hand():
    stats = reward_statistics([1.0, 2.0, 3.0, 4.0, 10.0], 0.4, quantiles=(0.25, 0.5, 1.0), reference="by hand")
    # mean 20 / 5 = 4; population variance (9 + 4 + 1 + 0 + 36) / 5 = 10; linear quantiles at positions 1, 2, 4.
    assert stats["t"] == [0.4] and stats["n"] == 5 and stats["reference"] == "by hand"
    assert stats["mean"] == pytest.approx(4.0, rel=1e-12)
    assert stats["std"] == pytest.approx(math.sqrt(10.0), rel=1e-12)
    assert stats["quantiles"] == pytest.approx({"0.25": 2.0, "0.5": 3.0, "1": 10.0}, rel=1e-12)
    assert reward_statistics([0.0, 1.0], [0.2, 0.5, 0.7])["t"] == [0.2, 0.5, 0.7]
    with pytest.raises(ValueError, match="two or more finite rewards"):
        reward_statistics([1.0, float("nan")], 0.4)
    with pytest.raises(ValueError, match="zero standard deviation"):
        reward_statistics([2.0, 2.0, 2.0], 0.4)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return Path(save_tiny_dinalrm_repo(tmp_path_factory.mktemp("stats") / "tiny-dinalrm"))


def score(pipe, normalize, t=0.4):
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (20, 30, 220))]
    generator = torch.Generator().manual_seed(0)
    return pipe(
        ["a red square", "a blue square"], images=images, t=t, generator=generator, normalize=normalize
    ).rewards


def test_zscore_from_the_model_config_and_card(repo, tmp_path):
    pipe = DiNaLRMPipeline.from_pretrained(repo)
    with pytest.raises(ValueError, match=r"needs reward statistics[\s\S]*eval/reward_stats.py"):
        score(pipe, "zscore")
    config_path = repo / "reward_model" / "config.json"
    entry = {"t": [0.4], "mean": 0.25, "std": 2.0, "quantiles": {"0.5": 0.2}, "n": 8}
    write_reward_statistics(str(config_path), entry, card_path=str(repo / "README.md"))
    assert json.loads(config_path.read_text())["reward_statistics"] == [entry]
    assert ModelCard.load(repo / "README.md").data.reward_statistics == [entry]
    with pytest.raises(ValueError, match="--overwrite"):
        write_reward_statistics(str(config_path), entry)

    pipe = DiNaLRMPipeline.from_pretrained(repo)
    raw = score(pipe, False)
    expected = (raw - 0.25) / 2.0
    # Same noise (seeded), so the z-scores are the raw rewards shifted and scaled: float32 rounding only.
    tolerances.assert_close(score(pipe, "zscore"), expected)
    with pytest.raises(ValueError, match=r"measured at t=\[0.4\], not at t=\[0.7\]"):
        score(pipe, "zscore", t=0.7)
