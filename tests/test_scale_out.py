"""Scoring and evaluation on Ray Data actors (`--ray`, `dinalrm.serving.distributed`) give what one process gives.

One local Ray with 2 CPUs serves the whole module (2 workers; a Ray instance costs ~8 s of CPU in its own processes);
the models are the bundled tiny-world model and the tiny models of `dinalrm.testing`. Every Ray run starts its actors,
each a fresh interpreter that imports torch and diffusers and loads the model (12-18 s of CPU): the tests run few of
them, 2 where several must give one process's results.
"""

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
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray with 2 CPUs for the module (the commands below find it running), stopped at the end. Its processes
    inherit this environment (a `runtime_env` would leave the workers Ray starts with it idle and start others)."""
    env = {"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
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


def write_inputs(root: Path) -> tuple[Path, Path]:
    """`(pairs file, folder)`: 4 pairs (one image missing) and a folder of 96 images of mixed sizes, an undecodable
    PNG (refused by the header check, before Ray) and a JPEG cut in half (its header reads: it fails on an actor)."""
    save_images(root / "img", [(48, 48), (64, 48), (48, 64), (40, 40)], seed=1)
    pairs = [
        {"prompt": PROMPT, "chosen": "img/image_000.png", "rejected": "img/image_001.png"},
        {"prompt": OTHER, "chosen": "img/image_002.png", "rejected": "img/image_000.png"},
        {"prompt": PROMPT, "chosen": "img/image_003.png", "rejected": "img/missing.png"},
        {"prompt": PROMPT, "chosen": "img/image_002.png", "rejected": "img/image_003.png"},
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    folder = root / "images"
    save_images(folder, [(48, 48), (64, 40), (40, 72), (48, 48), (96, 64), (32, 32), (56, 48), (48, 56)] * 12)
    (folder / "broken.png").write_bytes(b"not a png")
    PIL.Image.open(folder / "image_000.png").save(folder / "cut.jpg")
    jpeg = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return root / "pairs.jsonl", folder


def score_arguments(pairs: Path, folder: Path, output: Path, *ray: str) -> list[str]:
    """`dinalrm score` of the pairs and the folder (against PROMPT) in batches of 2, with `ray` options."""
    return ["--model", MODEL, "--pairs", str(pairs), "--prompt", PROMPT, str(folder), "--batch_size", "2"] + [
        "--output", str(output), *ray
    ]  # fmt: skip


@pytest.mark.slow  # Ray runs (actors start and load the model) and one interpreter start: 1-2 min on 2 busy cores
def test_pairs_and_a_folder_killed_on_actors_and_resumed_on_two_give_the_file_of_one_process(
    ray_address, tmp_path, capsys, caplog
):
    """Pairs and a folder with bad files, to Parquet. `python -m dinalrm.cli score --ray` on the module's Ray (found
    through RAY_ADDRESS, as on a cluster) is SIGKILLed midway, its sidecar gets a torn last line, and `score_dataset`
    (the Python API) resumes it on 2 actors: the file equals one process's (`dinalrm score` without `--ray`) byte for
    byte, the skips counted on an actor reported once. Each Ray run starts its own actors (an interpreter that imports
    torch and diffusers, 12-15 s of CPU): the killed run and its resumption are the only Ray runs here."""
    pairs, folder = write_inputs(tmp_path)
    one, resumed = tmp_path / "one.parquet", tmp_path / "resumed.parquet"
    assert cli.score_main(score_arguments(pairs, folder, one)) == 0
    skipped = "skipped 3 of 106 rows (corrupt_image=2, missing_image=1)"
    err = capsys.readouterr().err
    assert err.count(skipped) == 1 and "cut.jpg" in err and "broken.png" in err and "missing.png" in err
    assert "wrote 103 rows" in err and not (tmp_path / "one.parquet.partial.jsonl").exists()
    rows = pq.read_table(one).to_pylist()
    assert [row["pair"] for row in rows[:7]] == [0, 0, 1, 1, 2, 3, 3]  # pair 2 lost its other side: no probability
    assert [row["p_preferred"] is None for row in rows] == [False] * 4 + [True] + [False] * 2 + [True] * 96
    assert len({row["rank"] for row in rows[7:]}) == 96  # 96 distinct random images, ranked among PROMPT's rows

    # One actor for the killed run: its 52 batches come back in 7 blocks; killed after the first, the other 6
    # blocks of scoring are the poll's margin.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ray_address}
    command = [sys.executable, "-m", "dinalrm.cli", "score"]
    command += score_arguments(pairs, folder, resumed, "--ray", "--num-workers", "1")
    with open(tmp_path / "killed.err", "w") as log:  # a file, not a pipe nobody reads
        process = subprocess.Popen(command, env=env, stderr=log)
    sidecar = tmp_path / "resumed.parquet.partial.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if sidecar.exists() and sidecar.read_bytes().count(b"\n") > 0:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    killed = process.wait() == -signal.SIGKILL
    assert killed, f"the run ended before it could be killed: {(tmp_path / 'killed.err').read_text()[-3000:]}"
    lines = sidecar.read_bytes().count(b"\n")
    assert 1 <= lines < 103 and not resumed.exists()
    with open(sidecar, "a") as file:  # as if killed in the middle of writing a row
        file.write('{"image": "' + str(folder / "image_095.png"))
    returned = score_dataset(
        [str(folder)],
        rows_file=str(pairs),
        prompt=PROMPT,
        model=MODEL,
        output=str(resumed),
        batch_size=2,
        num_workers=2,
    )  # in this process: one interpreter start less; 2 actors share the rest (their results come in any order)
    messages = [record.getMessage() for record in caplog.records]
    assert sum("dropped a torn last line" in message for message in messages) == 1
    assert sum(skipped in message for message in messages) == 1  # counted on an actor, reported once, at the end
    assert not sidecar.exists() and pq.read_table(resumed).schema == pq.read_table(one).schema
    assert resumed.read_bytes() == one.read_bytes()
    assert returned == pq.read_table(resumed).to_pylist()


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
