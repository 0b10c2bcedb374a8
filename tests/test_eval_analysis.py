"""eval/noise_sweep.py, eval/uncertainty.py and eval/noise_sharing.py: files and rows on tiny models, statistics
against hand counts."""

import csv
import json

import numpy as np
import pytest
from accelerate import Accelerator
from PIL import Image

from dinalrm.data import FIRST, SECOND, write_canonical_pairs
from dinalrm.data.benchmarks import Benchmark, BenchmarkImage, BenchmarkPair
from dinalrm.evaluation import noise_sharing, noise_sweep, scorers, uncertainty
from dinalrm.evaluation import runner as run_eval
from dinalrm.testing import save_tiny_dinalrm_repo, write_tiny_benchmarks


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis_assets")
    return {
        "data": write_tiny_benchmarks(root / "data"),
        "model": save_tiny_dinalrm_repo(root / "tiny-a", seed=0),
        "model_b": save_tiny_dinalrm_repo(root / "tiny-b", seed=1),
    }


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow  # a sweep over noise levels with its plot: ~6 s, outside the quick tier
def test_noise_sweep_writes_csv_and_png(assets, tmp_path):
    output_dir = tmp_path / "sweep"
    argv = ["--models", f"{assets['model']},{assets['model_b']}", "--benchmarks", "hpdv2,hpdv3",
            "--data_dir", assets["data"], "--t_values", "0.0,0.4,0.9", "--output_dir", str(output_dir)]  # fmt: skip
    assert noise_sweep.main(argv) == 0
    rows = read_csv(output_dir / "noise_sweep.csv")
    assert list(rows[0]) == [
        "model", "noise_sharing", "benchmark", "t", "accuracy", "n_pairs", "n_correct", "n_score_ties",
    ]  # fmt: skip
    keys = [(r["model"], r["noise_sharing"], r["benchmark"], float(r["t"])) for r in rows]
    modes = ("prompt", "none")  # the default: both curves
    assert sorted(keys) == sorted(
        (m, s, b, t)
        for m in ("tiny-a", "tiny-b")
        for s in modes
        for b in ("hpdv2", "hpdv3", "average")
        for t in (0.0, 0.4, 0.9)
    )
    by_key = dict(zip(keys, rows))
    for model in ("tiny-a", "tiny-b"):
        for mode in modes:
            for t in (0.0, 0.4, 0.9):
                parts = [float(by_key[(model, mode, b, t)]["accuracy"]) for b in ("hpdv2", "hpdv3")]
                assert float(by_key[(model, mode, "average", t)]["accuracy"]) == pytest.approx(sum(parts) / 2)
                assert int(by_key[(model, mode, "hpdv2", t)]["n_pairs"]) == 9
                assert int(by_key[(model, mode, "hpdv3", t)]["n_pairs"]) == 2
        # Without noise (t = 0) the modes cannot differ.
        assert by_key[(model, "prompt", "hpdv2", 0.0)]["accuracy"] == by_key[(model, "none", "hpdv2", 0.0)]["accuracy"]
    png = (output_dir / "noise_sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    # The sweep's t = 0.4 points are run_eval's t = 0.4 results: same seed, same noise in each mode.
    argv = ["--model", assets["model"], "--t", "0.4", "--benchmarks", "hpdv2", "--data_dir", assets["data"],
            "--output_dir", str(tmp_path / "eval")]  # fmt: skip
    assert run_eval.main(argv) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    for mode in ("prompt", "none"):
        expected = results[f"DiNa-LRM [tiny-a] t=0.4 noise={mode}"]["hpdv2"]["accuracy"]
        assert float(by_key[("tiny-a", mode, "hpdv2", 0.4)]["accuracy"]) == expected


class TableScorer(scorers.Scorer):
    """Returns fixed rewards per image id: `table[id][level][draw]`, flattened level-major like DiNaLRMScorer."""

    def __init__(self, table):
        self.table = table

    @property
    def setting_names(self):
        return ["fake"]

    def score_columns(self, prompts, images, image_ids=None):
        return [[value for level in self.table[i] for value in level] for i in image_ids]

    @classmethod
    def from_args(cls, args, device):
        raise NotImplementedError


def test_uncertainty_quantities_match_hand_computation():
    image = Image.new("RGB", (8, 8))
    pairs = [
        BenchmarkPair("g", "a", "b", FIRST),
        BenchmarkPair("g", "a", "c", SECOND),
        BenchmarkPair("g", "b", "c", FIRST),
    ]
    bench = Benchmark("toy", "test", "micro", {i: BenchmarkImage("p", image) for i in "abc"}, pairs)
    table = {  # two levels, K = 3 draws
        "a": [[3, 3, 3], [1, 1, 1]],
        "b": [[1, 2, 4], [1, 1, 2]],
        "c": [[0, 0, 0], [2, 0, 1]],
    }
    results = uncertainty.measure(TableScorer(table), {"toy": bench}, [0.1, 0.7], 3, Accelerator(), batch_size=2)
    low, high = results["toy"]["t=0.1 noise=prompt"], results["toy"]["t=0.7 noise=prompt"]
    # t=0.1: a-b differences (2, 1, -1): mode 2 of 3 -> 1/3; a-c (3, 3, 3) and b-c (1, 2, 4) stable.
    #   margins 4/3, 3, 7/3 -> 20/9; variances a 0, b 7/3, c 0 -> 7/9; draw accuracies 2/3, 2/3, 1/3 -> 5/9.
    assert low == pytest.approx({
        "variation_ratio": 1 / 9, "frac_pairs_flipping": 1 / 3, "mean_margin": 20 / 9,
        "mean_reward_variance": 7 / 9, "mean_accuracy": 5 / 9, "n_pairs": 3, "n_images": 3, "num_draws": 3,
    })  # fmt: skip
    # t=0.7: a-b (0, 0, -1) -> 1/3 (a score tie is an outcome of its own); a-c (-1, 1, 0) -> 2/3; b-c (-1, 1, 1)
    #   -> 1/3. Margins 1/3, 2/3, 1 -> 2/3; variances 0, 1/3, 1 -> 4/9; every draw gets only b-c right -> 1/3.
    assert high == pytest.approx({
        "variation_ratio": 4 / 9, "frac_pairs_flipping": 1.0, "mean_margin": 2 / 3,
        "mean_reward_variance": 4 / 9, "mean_accuracy": 1 / 3, "n_pairs": 3, "n_images": 3, "num_draws": 3,
    })  # fmt: skip
    with pytest.raises(ValueError, match="at least 2"):
        uncertainty.uncertainty_stats(pairs, {"a": [1.0], "b": [2.0]})


def test_uncertainty_script_on_tiny_model(assets, tmp_path):
    argv = ["--model", assets["model"], "--benchmarks", "hpdv3,hpdv2", "--data_dir", assets["data"],
            "--t_values", "0.1,0.8", "--num_draws", "3", "--output_dir", str(tmp_path)]  # fmt: skip
    assert uncertainty.main(argv) == 0
    results = json.loads((tmp_path / "uncertainty.json").read_text())["tiny-a"]
    settings = ["t=0.1 noise=prompt", "t=0.8 noise=prompt", "t=0.1 noise=none", "t=0.8 noise=none"]
    assert set(results) == {"hpdv3", "hpdv2"} and list(results["hpdv2"]) == settings
    rows = read_csv(tmp_path / "uncertainty.csv")
    assert [(r["benchmark"], r["noise_sharing"], float(r["t"])) for r in rows] == [
        (benchmark, mode, t) for benchmark in ("hpdv3", "hpdv2") for mode in ("prompt", "none") for t in (0.1, 0.8)
    ]
    for row in rows:
        assert int(row["num_draws"]) == 3 and 0 <= float(row["variation_ratio"]) <= 2 / 3
        assert float(row["mean_reward_variance"]) > 0 and float(row["mean_margin"]) > 0
    hpdv2 = {float(r["t"]): r for r in rows if r["benchmark"] == "hpdv2" and r["noise_sharing"] == "none"}
    assert int(hpdv2[0.1]["n_pairs"]) == 9 and int(hpdv2[0.1]["n_images"]) == 7
    # More noise, more spread between draws.
    assert float(hpdv2[0.8]["mean_reward_variance"]) > float(hpdv2[0.1]["mean_reward_variance"])


def test_noise_sharing_script_scores_pairs_one_by_one(assets, tmp_path):
    """Pairs of one image with itself: a tie (wrong) with shared noise; per-image draws pick a random winner."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    rows = [{"prompt": "a red apple", "chosen": image, "rejected": image} for image in images]
    pairs = write_canonical_pairs(tmp_path / "twins", rows, split="test")
    output = tmp_path / "table.json"
    argv = ["--model", assets["model"], "--pairs", str(pairs), "--t_values", "0.8", "--output", str(output)]
    assert noise_sharing.main(argv) == 0
    results = json.loads(output.read_text())["results"]
    assert results["prompt"]["t=0.8"] == {"accuracy": 0.0, "standard_error": 0.0, "n_correct": 0, "n_pairs": 6}
    independent = results["none"]["t=0.8"]
    assert 0 < independent["n_correct"] < 6, "independent draws must break some ties either way"
    accuracy = independent["n_correct"] / 6
    assert independent["standard_error"] == pytest.approx((accuracy * (1 - accuracy) / 6) ** 0.5)


def test_noise_sharing_script_measures_images_of_different_sizes(assets, tmp_path):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    rows = [{"prompt": "a red apple", "chosen": a, "rejected": b} for a, b in zip(images[::2], images[1::2])]
    pairs = write_canonical_pairs(tmp_path / "pairs", rows, split="test")
    output = tmp_path / "mismatch.json"
    argv = ["--model", assets["model"], "--pairs", str(pairs), "--t_values", "0.4", "--mismatch", "crop",
            "--output", str(output)]  # fmt: skip
    assert noise_sharing.main(argv) == 0
    record = json.loads(output.read_text())
    assert record["mismatch"] == "crop" and set(record["results"]) == {"independent", "cropped"}
    for entry in (record["results"][variant]["t=0.4"] for variant in ("independent", "cropped")):
        assert entry["n_pairs"] == 2 and entry["n_correct"] in (0, 1, 2)
