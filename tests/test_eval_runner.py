"""dinalrm.evaluation (eval/run_eval.py) and its scorers end to end: tiny offline models on tiny copies of the five benchmarks."""

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tolerances
import torch
from PIL import Image

from dinalrm.data import write_canonical_pairs
from dinalrm.data.benchmarks import BENCHMARKS, load_benchmark
from dinalrm.evaluation import arguments, common, noise_sweep, scorers
from dinalrm.evaluation import runner as run_eval
from dinalrm.testing import (
    make_tiny_image_pair,
    save_tiny_clip,
    save_tiny_dinalrm_repo,
    write_tiny_benchmarks,
)


REPO_ROOT = Path(__file__).resolve().parents[1]

ALL_BENCHMARKS = "imagereward,hpdv2,hpdv3,genai_bench,pickapic"
# Per benchmark, by hand from write_tiny_benchmarks' docstring:
# (pairs scored, GT ties dropped, images missing or unreadable, averaging, distinct images scored).
EXPECTED = {
    "imagereward": (8, 1, 1, "micro", 7),  # 11 pairs with distinct ranks, 3 of them with the missing file
    "hpdv2": (9, 0, 0, "macro", 7),  # C(3,2) + C(4,2), the tie kept and credited
    "hpdv3": (2, 0, 1, "micro", 5),  # 3 rows, one with a missing path2
    "genai_bench": (3, 1, 0, "micro", 6),  # tievote dropped and counted; bothbad_vote dropped apart
    "pickapic_v2": (2, 1, 1, "micro", 5),  # 0.5/0.5 dropped; the corrupt JPEG's pair excluded
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_assets")
    return {
        "data": write_tiny_benchmarks(root / "data"),
        "model": save_tiny_dinalrm_repo(root / "tiny-dinalrm"),
        "clip": save_tiny_clip(root / "tiny-clip"),
        "cache": str(root / "cache"),
    }


def base_args(assets, output_dir, benchmarks=ALL_BENCHMARKS, data_dir=None):
    return ["--benchmarks", benchmarks, "--data_dir", data_dir or assets["data"], "--cache_dir", assets["cache"],
            "--output_dir", str(output_dir)]  # fmt: skip


def read_results(output_dir):
    return json.loads((Path(output_dir) / "results.json").read_text())


@pytest.fixture(scope="module")
def one_process_run(assets, tmp_path_factory):
    """run_eval in this process, t = 0.4 and the ensemble, with every scored image id recorded."""
    output_dir = tmp_path_factory.mktemp("one_process")
    calls = []
    original = scorers.DiNaLRMScorer.score_columns

    def recording(self, prompts, images, image_ids=None):
        calls.extend(image_ids)
        return original(self, prompts, images, image_ids)

    scorers.DiNaLRMScorer.score_columns = recording
    try:
        argv = ["--model", assets["model"], "--t", "0.4", "--ensemble", "--batch_size", "3"]
        assert run_eval.main(argv + base_args(assets, output_dir)) == 0
    finally:
        scorers.DiNaLRMScorer.score_columns = original
    return output_dir, calls


def test_run_eval_writes_json_and_table_scoring_each_image_once(one_process_run):
    output_dir, calls = one_process_run
    results = read_results(output_dir)
    settings = [
        f"DiNa-LRM [tiny-dinalrm] {level} noise={mode}"
        for mode in ("prompt", "none")
        for level in ("t=0.4", "ensemble=0.2,0.5,0.7")
    ]
    assert sorted(results) == sorted(settings)
    for setting in settings:
        assert set(results[setting]) == set(EXPECTED)
        for name, (n_pairs, ties, missing, averaging, _) in EXPECTED.items():
            entry = results[setting][name]
            assert list(entry) == sorted(common.RESULT_KEYS)
            assert (entry["n_pairs"], entry["n_gt_ties_dropped"], entry["n_missing_images"], entry["averaging"]) == (
                n_pairs, ties, missing, averaging,
            ), name  # fmt: skip
            if averaging == "micro":
                assert entry["accuracy"] == pytest.approx(entry["n_correct"] / n_pairs)
            # The 95% bootstrap interval (pairs resampled for micro, prompts for HPDv2's macro) holds the estimate.
            assert entry["accuracy_ci_low"] <= entry["accuracy"] <= entry["accuracy_ci_high"], name
    # Each distinct readable image went to the scorer exactly once, for both settings together.
    assert len(calls) == sum(e[4] for e in EXPECTED.values()) == 30
    assert max(Counter(calls).values()) == 1

    table = (output_dir / "results.md").read_text()
    header = "| Model / setting | ImageReward | HPDv2 | HPDv3 | GenAI-Bench | Pick-a-Pic v2 | Avg |"
    assert header in table
    for setting in settings:
        row = next(line for line in table.splitlines() if line.startswith(f"| {setting} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
        entries = results[setting]
        expected = [entries[n]["accuracy"] for n in ("imagereward", "hpdv2", "hpdv3", "genai_bench", "pickapic_v2")]
        average = sum(expected[:4]) / 4  # Pick-a-Pic is shown but not averaged (not in the paper's Table 1)
        assert cells == [f"{100 * v:.2f}" for v in [*expected, average]]
    assert "| DiNa-LRM (t=0.4) | 60.34 | 82.13 | 75.04 | 68.43 | 71.49 |" in table
    hpdv2 = results[settings[0]]["hpdv2"]
    interval = f"[{100 * hpdv2['accuracy_ci_low']:.2f}, {100 * hpdv2['accuracy_ci_high']:.2f}]"
    assert f"| {settings[0]} | HPDv2 | macro | {100 * hpdv2['accuracy']:.2f} | {interval} |" in table


@pytest.mark.slow
def test_accelerate_two_processes_match_one_process(assets, one_process_run, tmp_path, warm_bin):
    output_dir = tmp_path / "two_processes"
    command = [
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO_ROOT / "eval" / "run_eval.py"),
        "--model", assets["model"], "--t", "0.4", "--ensemble", "--batch_size", "2",
        *base_args(assets, output_dir),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT), "PATH": f"{warm_bin}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = dict(re.findall(r"process (\d)/2: scored (\d+) images", result.stdout))
    assert set(counts) == {"0", "1"}, result.stdout  # two ranks, both with world size 2
    assert int(counts["0"]) + int(counts["1"]) == 30 + 1  # the corrupt Pick-a-Pic image is tried, and counted
    assert min(int(n) for n in counts.values()) > 0
    assert read_results(output_dir) == read_results(one_process_run[0])


def test_dinalrm_scorer_is_deterministic_per_image(assets):
    scorer = scorers.DiNaLRMScorer.load(
        assets["model"], torch.device("cpu"), [0.4, (0.2, 0.7)], num_draws=2, noise_sharing=["none"]
    )
    rng = np.random.default_rng(3)
    images = [make_tiny_image_pair(rng, size)[i % 2] for i, size in enumerate([(32, 32), (40, 32), (32, 32)])]
    prompts = ["a red apple", "a cat", "a dog in a park"]
    ids = ["x/0", "x/1", "x/2"]
    together = torch.tensor(scorer.score_columns(prompts, images, ids))
    alone = torch.tensor([scorer.score_columns([p], [im], [i])[0] for p, im, i in zip(prompts, images, ids)])
    reversed_ = torch.tensor(scorer.score_columns(prompts[::-1], images[::-1], ids[::-1])[::-1])
    tolerances.assert_close(together, alone)
    tolerances.assert_close(together, reversed_)
    assert together.shape == (3, 4)
    assert scorer.setting_names[1] == "DiNa-LRM [tiny-dinalrm] t=0.4 noise=none draw=1"
    assert not torch.allclose(together[:, 0], together[:, 1])  # draws 0 and 1 differ
    # Column 0 is what the pipeline gives on the image itself with the image's own generator.
    for index in (0, 1):
        generator = torch.Generator().manual_seed(scorers.image_seed(0, ids[index]))
        direct = scorer.pipe(
            prompts[index], images=images[index], t=0.4, generator=generator, noise_sharing="none"
        ).rewards
        assert float(direct[0]) == tolerances.close_to(float(together[index, 0]))
    scorer.settings, scorer.num_draws, scorer.seed = [0.4], 1, 1
    assert not torch.allclose(torch.tensor(scorer.score_columns(prompts, images, ids))[:, 0], together[:, 0])


def test_dinalrm_scorer_shares_draws_between_images_of_a_prompt(assets):
    scorer = scorers.DiNaLRMScorer.load(
        assets["model"], torch.device("cpu"), [0.7], num_draws=2, noise_sharing=["prompt", "none"]
    )
    rng = np.random.default_rng(5)
    chosen, rejected = make_tiny_image_pair(rng, (32, 32))
    images, prompts, ids = [chosen, rejected, chosen], ["a red apple"] * 3, ["y/0", "y/1", "y/2"]
    rows = torch.tensor(scorer.score_columns(prompts, images, ids))
    assert rows.shape == (3, 4)
    shared, independent = rows[:, :2], rows[:, 2:]
    # One image twice under one prompt: same draws, same rewards (up to the rounding of the batch row).
    tolerances.assert_close(shared[0], shared[2])
    assert (independent[0] - independent[2]).abs().min() > 1e-3, "per-image draws differ"
    # Scored as the pipeline scores a prompt group by default, with the prompt's own generator.
    seed = scorers.image_seed(0, scorers.noise_key("prompt", "y/0", "a red apple"))
    direct = scorer.pipe("a red apple", images=images[:2], t=0.7, generator=torch.Generator().manual_seed(seed))
    tolerances.assert_close(shared[:2, 0], direct.rewards)
    alone = torch.tensor(scorer.score_columns(prompts[1:2], images[1:2], ids[1:2]))
    tolerances.assert_close(alone[0], rows[1])


def test_clip_scorer_formula_and_run_eval(assets, tmp_path):
    scorer = scorers.PlainCLIPScorer.load(assets["clip"], None, torch.device("cpu"))
    images = [Image.new("RGB", (40, 32), (200, 10, 10)), Image.new("RGB", (32, 32), (10, 10, 200))]
    prompts = ["a red apple", "a blue sky"]
    scores = scorer.score(prompts, images)
    for prompt, image, score in zip(prompts, images, scores):
        inputs = scorer.processor(text=[prompt], images=[image], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = scorer.model(**inputs).logits_per_image  # logit_scale * cosine
        assert score == tolerances.close_to(float(logits[0, 0]))
    assert scores[0] != scores[1]
    pickscore = scorers.PickScoreScorer.load(assets["clip"], assets["clip"], torch.device("cpu"))
    assert pickscore.setting_names == ["PickScore [tiny-clip]"]
    assert scorers.PickScoreScorer.default_processor == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    # The runner with --scorer clip; Pick-a-Pic stored under the alias folder name "pickapic".
    data_dir = tmp_path / "data"
    shutil.copytree(Path(assets["data"]) / "hpdv2", data_dir / "hpdv2")
    shutil.copytree(Path(assets["data"]) / "pickapic_v2", data_dir / "pickapic")
    output_dir = tmp_path / "out"
    argv = [
        "--scorer",
        "clip",
        "--model",
        assets["clip"],
        *base_args(assets, output_dir, "hpdv2,pickapic", str(data_dir)),
    ]
    assert run_eval.main(argv) == 0
    results = read_results(output_dir)
    assert list(results) == ["CLIP [tiny-clip]"]
    assert set(results["CLIP [tiny-clip]"]) == {"hpdv2", "pickapic_v2"}
    assert results["CLIP [tiny-clip]"]["pickapic_v2"]["n_pairs"] == 2


def test_table1_runs_every_scorer_in_one_invocation(assets, tmp_path, monkeypatch):
    """`--scorer table1`: DiNa-LRM, LRM, PickScore, CLIP, HPSv2, HPSv3 and ImageReward on the same benchmarks into
    one table with bootstrap intervals. The three published packages are stand-in wheels (tests/
    test_isolated_scorers.py) installed through the same environment code path; LRM is the converter's output
    for the official tiny checkpoint."""
    from test_isolated_scorers import HPSV2, HPSV3, IMAGEREWARD

    from dinalrm.testing.wheels import build_wheel

    wheels = tmp_path / "wheels"
    pins = {}
    for name, (distribution, version, module, source) in {
        "hpsv2": ("hpsv2", "1.2.0", "hpsv2", HPSV2), "hpsv3": ("hpsv3", "1.0.0", "hpsv3", HPSV3),
        "imagereward": ("image-reward", "1.5", "ImageReward", IMAGEREWARD),
    }.items():  # fmt: skip
        build_wheel(wheels, distribution, version, {f"{module}/__init__.py": source})
        pins[name] = tmp_path / f"{name}.txt"
        pins[name].write_text(f"{distribution}=={version}\n")
    lrm = convert_tiny_lrm(tmp_path / "lrm")
    output_dir = tmp_path / "out"
    argv = ["--scorer", "table1", "--model", assets["model"], "--model", f"lrm={lrm}",
            "--model", f"pickscore={assets['clip']}", "--model", f"clip={assets['clip']}",
            "--processor", assets["clip"], "--noise_sharing", "none", "--bootstrap_samples", "50",
            "--scorer_find_links", str(wheels), *base_args(assets, output_dir, "hpdv2,genai_bench")]  # fmt: skip
    for name, path in pins.items():
        argv += ["--scorer_requirements", f"{name}={path}"]
    monkeypatch.setenv("DINALRM_CACHE", str(tmp_path / "cache"))
    assert run_eval.main(argv) == 0
    results = read_results(output_dir)
    expected_rows = [
        "DiNa-LRM [tiny-dinalrm] t=0.4 noise=none", "LRM [lrm] timestep=1", "PickScore [tiny-clip]",
        "CLIP [tiny-clip]", "HPSv2.1 [hpsv2==1.2.0]", "HPSv3 [hpsv3==1.0.0]", "ImageReward [image-reward==1.5]",
    ]  # fmt: skip
    assert sorted(results) == sorted(expected_rows)
    for row in expected_rows:
        for benchmark in ("hpdv2", "genai_bench"):
            entry = results[row][benchmark]
            assert entry["n_pairs"] == EXPECTED[benchmark][0], (row, benchmark)
            assert entry["accuracy_ci_low"] <= entry["accuracy"] <= entry["accuracy_ci_high"], (row, benchmark)
    table = (output_dir / "results.md").read_text()
    assert all(f"| {row} |" in table for row in expected_rows)
    with pytest.raises(SystemExit):
        run_eval.parse_args(["--scorer", "aesthetic"])


def convert_tiny_lrm(output_dir) -> str:
    """The official tiny LRM checkpoint through the public converter script (an LRMPipeline folder)."""
    import importlib.util

    fixture = REPO_ROOT / "tests" / "fixtures" / "official-lrm-tiny"
    spec = importlib.util.spec_from_file_location(
        "convert_lrm", REPO_ROOT / "scripts" / "convert_official_lrm_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = [
        "--official_dir",
        str(fixture / "checkpoint"),
        "--base",
        str(fixture / "base"),
        "--output_dir",
        str(output_dir),
    ]
    module.main(argv)
    return str(output_dir)


def test_light_names_are_the_registry_and_the_benchmark_table():
    """`dinalrm eval --help` takes the scorer and benchmark names from `arguments` (no torch, no datasets): they must
    be the names the scorer registry and the benchmark table hold, in the table's order (results.md's columns)."""
    assert sorted(scorers.SCORERS) == sorted(arguments.SCORER_NAMES)
    assert tuple(BENCHMARKS) == arguments.BENCHMARK_NAMES
    assert set(arguments.TABLE1_SCORERS) <= set(scorers.SCORERS)


def test_a_scorer_registered_later_is_accepted_by_the_runner(monkeypatch):
    """`register_scorer` plug-ins: `runner.parse_args` accepts every registered name, the light parser its own."""
    monkeypatch.setitem(scorers.SCORERS, "aesthetic", scorers.DiNaLRMScorer)
    assert run_eval.parse_args(["--scorer", "aesthetic,dinalrm"]).scorer == ["aesthetic", "dinalrm"]
    with pytest.raises(SystemExit):
        arguments.parse_eval_args(["--scorer", "aesthetic"])


def test_benchmark_names_limit_and_merged_results(assets, tmp_path):
    assert arguments.parse_benchmarks("pickapic, HPDv2,hpdv2") == ["pickapic_v2", "hpdv2"]
    with pytest.raises(argparse.ArgumentTypeError, match="drawbench"):
        arguments.parse_benchmarks("drawbench")
    bench = load_benchmark("imagereward", assets["data"])
    limited = common.limit_pairs(bench, 2)
    assert limited.pairs == bench.pairs[:2] and len(limited.images) == 3  # a-b and a-c of the first prompt
    assert common.limit_pairs(bench, None) is bench

    entry = {"accuracy": 0.5, "n_pairs": 2, "n_correct": 1, "n_score_ties": 0, "n_gt_ties_dropped": 0,
             "n_missing_images": 0, "averaging": "micro"}  # fmt: skip
    run_eval.write_results(str(tmp_path), {"A": {"hpdv2": entry}})
    merged = run_eval.write_results(str(tmp_path), {"B": {"hpdv3": {**entry, "accuracy": 1.0}}})
    assert read_results(tmp_path) == merged == {"A": {"hpdv2": entry}, "B": {"hpdv3": {**entry, "accuracy": 1.0}}}
    table = (tmp_path / "results.md").read_text()
    assert "| A | 50.00 | – | – |" in table and "| B | – | 100.00 | – |" in table  # no average with a gap
    run_eval.write_results(str(tmp_path), {"C": {"hpdv2": entry}}, fresh=True)
    assert read_results(tmp_path) == {"C": {"hpdv2": entry}}


def test_pairs_in_the_canonical_schema(assets, tmp_path):
    """--pairs: a local folder of canonical pairs (the tiny world's format), one pair per row, chosen preferred."""
    rng = np.random.default_rng(5)
    rows = []
    for prompt in ["a red apple", "a cat", "a red apple", "a dog in a park"]:
        chosen, rejected = make_tiny_image_pair(rng)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "weight": 1.0})
    rows[2]["rejected"] = {"bytes": b"not an image", "path": None}  # unreadable: its pair is skipped and counted
    pairs = write_canonical_pairs(tmp_path / "pairs", rows, split="test")
    write_canonical_pairs(pairs, rows[:2], split="train")
    output_dir = tmp_path / "out"
    shared = ["--pairs", pairs, "--cache_dir", assets["cache"], "--output_dir", str(output_dir)]

    # Without --benchmarks only the pairs are evaluated (no Hub benchmark is loaded).
    assert run_eval.main(["--model", assets["model"], "--t", "0.4", "--ensemble", *shared]) == 0
    results = read_results(output_dir)
    levels = ("t=0.4", "ensemble=0.2,0.5,0.7")
    settings = [f"DiNa-LRM [tiny-dinalrm] {level} noise={mode}" for mode in ("prompt", "none") for level in levels]
    assert sorted(results) == sorted(settings)
    for setting in settings:
        entry = results[setting]["canonical"]
        assert list(entry) == sorted(common.RESULT_KEYS)
        assert (entry["n_pairs"], entry["n_missing_images"], entry["averaging"]) == (3, 1, "micro")
        assert entry["accuracy"] == pytest.approx(entry["n_correct"] / 3)
    assert "| Model / setting | Pairs | Avg |" in (output_dir / "results.md").read_text()

    # The noise sweep shares the option; --split pairs=SPLIT picks another split.
    argv = ["--models", assets["model"], "--t_values", "0.2,0.6", "--split", "pairs=train", *shared]
    assert noise_sweep.main(argv) == 0
    with (output_dir / "noise_sweep.csv").open() as handle:
        sweep = list(csv.DictReader(handle))
    assert [(row["benchmark"], row["noise_sharing"], row["t"], row["n_pairs"]) for row in sweep] == [
        ("canonical:train", mode, t, "2") for mode in ("prompt", "none") for t in ("0.2", "0.6")
    ]
    with pytest.raises(ValueError, match="no default dataset"):
        load_benchmark("canonical")


def test_results_json_is_strict_json_without_nan(tmp_path):
    """No pairs, no bootstrap: the NaN accuracy and interval are written as null, which every JSON reader takes."""
    entry = {"accuracy": float("nan"), "accuracy_ci_low": float("nan"), "accuracy_ci_high": float("nan"),
             "n_pairs": 0, "n_correct": 0, "n_score_ties": 0, "n_gt_ties_dropped": 0, "n_missing_images": 2,
             "averaging": "micro"}  # fmt: skip
    run_eval.write_results(str(tmp_path), {"A": {"hpdv3": entry}})
    run_eval.write_results(str(tmp_path), {"B": {"hpdv3": {**entry, "accuracy": 0.5}}})  # merges the file back

    def refuse(constant):
        raise ValueError(f"bare {constant} in results.json")

    results = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert results["A"]["hpdv3"]["accuracy"] is None and results["A"]["hpdv3"]["accuracy_ci_low"] is None
    assert results["B"]["hpdv3"]["accuracy"] == 0.5
    assert "| A | – |" in (tmp_path / "results.md").read_text()
