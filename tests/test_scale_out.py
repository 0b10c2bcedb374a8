"""Scoring and evaluation on Ray Data actors (`--ray`, `dinalrm.serving.distributed`) give what one process gives.

One local Ray with 2 CPUs serves the whole module (2 workers); the models are the bundled tiny-world model and the
tiny models of `dinalrm.testing`. Every Ray run starts its actors and loads the model in each: slow on a shared CPU.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest
import ray
from conftest import REPO_ROOT

from dinalrm import bundled_asset, cli
from dinalrm.evaluation import runner
from dinalrm.serving.distributed import score_dataset
from dinalrm.serving.scoring import OutputFile
from dinalrm.testing import save_tiny_dinalrm_repo, write_tiny_benchmarks


MODEL = str(bundled_asset("dinalrm-tiny"))
PROMPT = "a small red circle at the left on a white background"
OTHER = "a blue square at the right"
# Rewards are float32 sums over a few thousand terms: another process may order them otherwise (relative 1e-6).
RTOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray with 2 CPUs for the module (the commands below find it running), stopped at the end."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def save_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index, (width, height) in enumerate(sizes):
        path = folder / f"image_{index:03d}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def assert_same_rows(ray_rows: list[dict], rows: list[dict]) -> None:
    """Same rows in the same order with the same keys, ranks and pairs; scores within RTOL of their magnitude."""
    assert len(ray_rows) == len(rows) > 0
    exact = ("image", "prompt", "rank", "pair", "side")
    assert [[row[name] for name in exact] for row in ray_rows] == [[row[name] for name in exact] for row in rows]
    for name in ("reward", "normalized", "p_preferred"):
        got = [row[name] for row in ray_rows]
        expected = [row[name] for row in rows]
        assert [value is None for value in got] == [value is None for value in expected]
        got, expected = (np.array([v for v in values if v is not None], dtype=float) for values in (got, expected))
        scale = np.abs(expected).max(initial=1.0)
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * scale)


def read_csv_rows(path: Path) -> list[dict]:
    def value(name, text):
        if text == "":
            return None
        return {"rank": int, "pair": int, "reward": float, "normalized": float, "p_preferred": float}.get(name, str)(
            text
        )

    with open(path, newline="") as file:
        return [{name: value(name, text) for name, text in row.items()} for row in csv.DictReader(file)]


@pytest.mark.slow  # a Ray run: actors start and load the model, 20-40 s on a shared 2-core CPU
def test_folder_of_mixed_sizes_with_a_corrupt_file_to_parquet(ray_address, tmp_path, capsys):
    sizes = [(48, 48), (64, 40), (40, 72), (48, 48), (96, 64), (32, 32), (56, 48)]
    save_images(tmp_path / "images", sizes)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")  # refused by the header check, before Ray
    PIL.Image.open(tmp_path / "images" / "image_000.png").save(tmp_path / "images" / "cut.jpg")
    jpeg = (tmp_path / "images" / "cut.jpg").read_bytes()
    (tmp_path / "images" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # its header reads: it fails on an actor
    base = ["--model", MODEL, "--prompt", PROMPT, str(tmp_path / "images"), "--batch_size", "3"]
    assert cli.score_main([*base, "--output", str(tmp_path / "one.parquet")]) == 0
    single = capsys.readouterr().err
    assert cli.score_main([*base, "--output", str(tmp_path / "ray.parquet"), "--ray", "--num-workers", "2"]) == 0
    err = capsys.readouterr().err
    warning = "warning: skipped 2 of 9 rows (corrupt_image=2)"
    assert err.count(warning) == 1 and single.count(warning) == 1  # one counted on an actor, reported once here
    assert "cut.jpg" in err and "broken.png" in err
    assert "wrote 7 rows" in err and not (tmp_path / "ray.parquet.partial.jsonl").exists()
    one, on_ray = (pq.read_table(tmp_path / name) for name in ("one.parquet", "ray.parquet"))
    assert on_ray.schema == one.schema
    assert_same_rows(on_ray.to_pylist(), one.to_pylist())
    assert sorted(row["rank"] for row in one.to_pylist()) == list(range(1, 8))  # 7 distinct random images


@pytest.mark.slow  # a Ray run: actors start and load the model, 20-40 s on a shared 2-core CPU
def test_pairs_file_to_jsonl_through_the_python_api(ray_address, tmp_path, capsys, caplog):
    save_images(tmp_path / "img", [(48, 48), (64, 48), (48, 64), (40, 40)])
    pairs = [
        {"prompt": PROMPT, "chosen": "img/image_000.png", "rejected": "img/image_001.png"},
        {"prompt": OTHER, "chosen": "img/image_002.png", "rejected": "img/image_000.png"},
        {"prompt": PROMPT, "chosen": "img/image_003.png", "rejected": "img/missing.png"},
        {"prompt": PROMPT, "chosen": "img/image_002.png", "rejected": "img/image_003.png"},
    ]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    base = ["--model", MODEL, "--pairs", str(pairs_file), "--batch_size", "2"]
    assert cli.score_main([*base, "--output", str(tmp_path / "one.jsonl")]) == 0
    skipped = "skipped 1 of 8 rows (missing_image=1)"
    assert capsys.readouterr().err.count(skipped) == 1
    returned = score_dataset(
        rows_file=str(pairs_file), model=MODEL, output=str(tmp_path / "ray.jsonl"), batch_size=2, num_workers=2
    )
    assert sum(skipped in record.getMessage() for record in caplog.records) == 1  # reported once, at the end
    one, on_ray = ([json.loads(line) for line in (tmp_path / name).read_text().splitlines()] for name in
                   ("one.jsonl", "ray.jsonl"))  # fmt: skip
    assert_same_rows(on_ray, one)
    assert returned == on_ray
    assert [row["pair"] for row in one] == [0, 0, 1, 1, 2, 3, 3]  # pair 2 lost its other side: no probability
    assert [row["p_preferred"] is None for row in one] == [False] * 4 + [True] + [False] * 2


@pytest.mark.slow  # a Ray run: actors start and load the model, 20-40 s on a shared 2-core CPU
def test_eval_on_ray_writes_the_results_json_of_one_process(ray_address, tmp_path):
    data = write_tiny_benchmarks(tmp_path / "data")
    model = save_tiny_dinalrm_repo(tmp_path / "tiny-dinalrm")
    # ImageReward has a missing file, Pick-a-Pic a corrupt JPEG: skipped images counted on the actors.
    argv = ["--model", model, "--t", "0.4", "--ensemble", "--batch_size", "3", "--benchmarks", "imagereward,pickapic",
            "--data_dir", data, "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    assert runner.main([*argv, "--output_dir", str(tmp_path / "one")]) == 0
    assert runner.main([*argv, "--output_dir", str(tmp_path / "ray"), "--ray", "--num-workers", "2"]) == 0
    one, on_ray = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "ray"))
    # Accuracies, intervals and counts follow from the signs of score differences, each score the same computation
    # with the same seeded noise in both runs: the files are equal (the scores themselves may differ in the last bit).
    assert on_ray == one
    assert len(one) == 4 and all(set(entries) == {"imagereward", "pickapic_v2"} for entries in one.values())
    assert {entries["pickapic_v2"]["n_missing_images"] for entries in one.values()} == {1}


def score_command(folder: Path, output: Path) -> list[str]:
    options = [
        "--model",
        MODEL,
        "--prompt",
        PROMPT,
        str(folder),
        "--output",
        str(output),
        "--ray",
        "--num-workers",
        "2",
    ]
    return [sys.executable, "-m", "dinalrm.cli", "score", *options]


@pytest.mark.slow  # a Ray run: actors start and load the model, 20-40 s on a shared 2-core CPU
def test_killed_run_resumes_to_the_uninterrupted_file(ray_address, tmp_path, capsys):
    """120 images to CSV on the module's Ray (found through RAY_ADDRESS, as on a cluster): SIGKILL the driver
    midway, a torn last line, resume; the file equals an uninterrupted run's, byte for byte."""
    folder = tmp_path / "images"
    save_images(folder, [(48, 48)] * 120)
    whole, resumed = tmp_path / "whole.csv", tmp_path / "resumed.csv"
    assert cli.score_main(score_command(folder, whole)[4:]) == 0  # in this process: one interpreter start less
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ray_address}
    process = subprocess.Popen(score_command(folder, resumed), env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if resumed.exists() and resumed.read_bytes().count(b"\n") > 30:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    lines = resumed.read_bytes().count(b"\n") - 1
    assert 30 <= lines < 120
    with open(resumed, "a") as file:  # as if killed in the middle of writing a row
        file.write(f"{folder}/image_119.png,a small red")
    run = subprocess.run(score_command(folder, resumed), env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "dropped a torn last line" in run.stderr
    assert f"wrote 120 rows to {resumed} ({120 - lines} new)" in run.stderr
    assert resumed.read_bytes() == whole.read_bytes()
    assert sorted(row["rank"] for row in read_csv_rows(whole)) == list(range(1, 121))


def test_parquet_output_streams_through_a_sidecar_and_resumes(tmp_path):
    """Parquet is written whole at the end; until then rows go to `<output>.partial.jsonl`, which resumes (a torn
    last line dropped), and a finished Parquet file resumes too."""
    path = str(tmp_path / "out.parquet")
    rows = [
        {"image": "a.png", "prompt": "p", "reward": 0.5, "normalized": 1.05, "rank": None, "pair": 0, "side": "a"},
        {"image": "b.png", "prompt": "p", "reward": -2.5, "normalized": 0.75, "rank": None, "pair": 0, "side": "b"},
        {"image": "c.png", "prompt": "q", "reward": 1.0, "normalized": 1.1, "rank": None, "pair": None, "side": None},
    ]
    rows = [{**row, "p_preferred": None} for row in rows]
    settings = {"seed": 0}
    OutputFile(path, "parquet", settings, overwrite=False).append(rows[:2])
    partial = Path(path + ".partial.jsonl")
    assert not Path(path).exists() and len(partial.read_text().splitlines()) == 2
    partial.write_text(partial.read_text() + '{"image": "c.pn')  # killed while writing the third row
    output = OutputFile(path, "parquet", settings, overwrite=False)
    assert output.rows == rows[:2]
    output.append(rows[2:])

    def sigmoid_difference(first, second):  # a stand-in preference model: sigmoid(r_a - r_b)
        return [1 / (1 + np.exp(b - a)) for a, b in zip(first, second)]

    keys = [("a.png", "p", 0), ("b.png", "p", 0), ("c.png", "q", 0)]
    output.finish(keys, sigmoid_difference)
    assert not partial.exists()
    written = pq.read_table(path).to_pylist()
    assert [row["image"] for row in written] == ["a.png", "b.png", "c.png"]
    assert [row["rank"] for row in written] == [1, 2, 1]
    assert written[0]["p_preferred"] == pytest.approx(1 / (1 + np.exp(-3.0)), rel=1e-12)
    assert written[2]["p_preferred"] is None
    assert OutputFile(path, "parquet", settings, overwrite=False).rows == written  # a finished file resumes
    with pytest.raises(ValueError, match="other settings"):
        OutputFile(path, "parquet", {"seed": 1}, overwrite=False)
