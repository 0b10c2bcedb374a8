"""`dinalrm score` batch mode: folders, globs, --pairs files, counted skips, streamed output, resume and refusals."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import tolerances
import torch
from conftest import REPO_ROOT

from dinalrm import cli
from dinalrm.serving.scoring import OutputFile
from dinalrm.testing import get_tiny_dinalrm_pipeline
from pipeline_dinalrm import DiNaLRMPipeline


PROMPT = "a red square"
OTHER = "a blue circle"
pytestmark = pytest.mark.usefixtures("one_thread")


def save_images(folder: Path, count: int, seed: int = 0, size: int = 64) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"image_{index:03d}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def rewards_of(pipe, prompt: str, images: list, seed: int = 0) -> list[float]:
    return pipe(prompt, images=images, generator=torch.Generator().manual_seed(seed)).rewards.tolist()


def read_csv(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def pipe():
    return get_tiny_dinalrm_pipeline()


@pytest.fixture
def tiny_model(pipe, monkeypatch):
    """`--model tiny` resolves to the in-memory tiny pipeline (loading itself is tested through the shell)."""
    monkeypatch.setattr(DiNaLRMPipeline, "from_pretrained", classmethod(lambda cls, model, **options: pipe))


def test_pipeline_accepts_file_paths(pipe, tmp_path):
    paths = save_images(tmp_path, 3, size=48)
    opened = [PIL.Image.open(path) for path in paths]
    expected = rewards_of(pipe, PROMPT, opened)
    assert rewards_of(pipe, PROMPT, [paths[0], Path(paths[1]), opened[2]]) == expected
    assert rewards_of(pipe, PROMPT, paths[0]) == rewards_of(pipe, PROMPT, opened[:1])


def test_folders_are_recursive_and_globs_are_expanded(pipe, tmp_path, tiny_model, capsys):
    top = save_images(tmp_path / "gen", 2, seed=1, size=48)
    nested = save_images(tmp_path / "gen" / "more", 2, seed=2, size=48)
    (tmp_path / "gen" / "notes.txt").write_text("not an image")
    output = tmp_path / "out.csv"
    argv = ["--model", "tiny", "--prompt", PROMPT, str(tmp_path / "gen"), str(tmp_path / "gen" / "**" / "*_001.png")]
    argv += [str(tmp_path / "nothing-*.png"), "--output", str(output)]
    assert cli.score_main(argv) == 0
    assert "skipped 1 of 7 rows (no_match=1)" in capsys.readouterr().err
    rows = read_csv(output)
    images = [*top, *nested, top[1], nested[1]]  # the folder (sorted, recursive), then the glob's matches (sorted)
    assert [row["image"] for row in rows] == images
    rewards = [float(row["reward"]) for row in rows]
    assert rewards == tolerances.close_to(rewards_of(pipe, PROMPT, images))
    assert [float(row["normalized"]) for row in rows] == tolerances.close_to([(r + 10) / 10 for r in rewards])
    # the same file twice gets the same reward (shared noise), and equal rewards share the better rank
    assert rewards[1] == rewards[4] and rewards[3] == rewards[5]
    assert [int(row["rank"]) for row in rows] == [1 + sum(other > reward for other in rewards) for reward in rewards]


def test_pairs_file_in_both_formats_with_counted_skips(pipe, tmp_path, tiny_model, capsys):
    red, blue, green = save_images(tmp_path / "img", 3, size=48)
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    pairs = [
        {"prompt": PROMPT, "chosen": "img/image_000.png", "rejected": "img/image_001.png"},
        {"prompt": OTHER, "chosen": "img/image_002.png", "rejected": "img/image_000.png"},
        {"prompt": " ", "chosen": "img/image_000.png", "rejected": "img/image_001.png"},
        {"prompt": PROMPT, "chosen": "img/image_002.png", "rejected": "img/missing.png"},
    ]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    output = tmp_path / "scores.jsonl"
    assert cli.score_main(["--model", "tiny", "--pairs", str(pairs_file), "--output", str(output)]) == 0
    err = capsys.readouterr().err
    assert "skipped 3 of 8 rows (empty_prompt=2, missing_image=1)" in err and "missing.png" in err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(row["image"], row["prompt"], row["pair"], row["side"]) for row in rows] == [
        ("img/image_000.png", PROMPT, 0, "a"),
        ("img/image_001.png", PROMPT, 0, "b"),
        ("img/image_002.png", OTHER, 1, "a"),
        ("img/image_000.png", OTHER, 1, "b"),
        ("img/image_002.png", PROMPT, 3, "a"),  # its other side is missing: scored, without a probability
    ]
    for pair, (prompt, a, b) in enumerate([(PROMPT, red, blue), (OTHER, green, red)]):
        expected = pipe.compare(
            prompt, PIL.Image.open(a), PIL.Image.open(b), generator=torch.Generator().manual_seed(0)
        )
        side_a, side_b = rows[2 * pair], rows[2 * pair + 1]
        assert [side_a["reward"], side_b["reward"]] == tolerances.close_to(expected.rewards.tolist())
        assert side_a["p_preferred"] == tolerances.close_to(expected.probability, scale=1.0)
        assert side_b["p_preferred"] == tolerances.close_to(1 - expected.probability, scale=1.0)
    assert rows[4]["p_preferred"] is None
    red_square = [rows[0]["reward"], rows[1]["reward"], rows[4]["reward"]]
    assert [rows[i]["rank"] for i in (0, 1, 4)] == [1 + sorted(red_square, reverse=True).index(r) for r in red_square]
    assert sorted([rows[2]["rank"], rows[3]["rank"]]) == [1, 2]

    # `prompt,image` rows in CSV: a prompt column, relative paths, an unreadable image counted
    table = tmp_path / "prompts.csv"
    table.write_text(f"prompt,image\n{OTHER},img/image_002.png\n{PROMPT},img/broken.png\n{OTHER},img/image_001.png\n")
    assert cli.score_main(["--model", "tiny", "--prompts", str(table), "--json"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 of 3 rows (corrupt_image=1)" in captured.err and "broken.png" in captured.err
    result = json.loads(captured.out)
    assert [(entry["image"], entry["prompt"]) for entry in result["rewards"]] == [
        ("img/image_002.png", OTHER),
        ("img/image_001.png", OTHER),
    ]
    expected = rewards_of(pipe, OTHER, [green, blue])
    assert [entry["reward"] for entry in result["rewards"]] == tolerances.close_to(expected)


def test_other_settings_or_a_foreign_file_are_refused_never_overwritten(tmp_path, tiny_model, capsys):
    images = save_images(tmp_path / "img", 2, size=48)
    output = tmp_path / "new-folder" / "out.jsonl"
    base = ["--model", "tiny", "--prompt", PROMPT, *images, "--output", str(output)]
    assert cli.score_main(base) == 0
    written = output.read_bytes()
    assert cli.score_main(base) == 0  # the same command again: nothing to do, nothing changed
    assert f"wrote 2 rows to {output} (0 new)" in capsys.readouterr().err and output.read_bytes() == written
    assert cli.score_main([*base, "--seed", "1"]) == 2
    assert "other settings (seed: 0 -> 1)" in capsys.readouterr().err and output.read_bytes() == written
    assert cli.score_main([*base, "--normalize", "logistic", "--t", "0.6"]) == 2
    message = capsys.readouterr().err
    assert "normalize: 'display' -> 'logistic'" in message and "t: 0.4 -> 0.6" in message and "--overwrite" in message
    assert output.read_bytes() == written
    assert cli.score_main([*base, "--seed", "1", "--overwrite"]) == 0
    assert output.read_bytes() != written and json.loads(Path(f"{output}.settings.json").read_text())["seed"] == 1

    independent = [*base, "--noise_sharing", "none", "--batch_size"]
    assert cli.score_main([*independent, "2", "--overwrite"]) == 0  # draws per image within a batch: a setting then
    assert cli.score_main([*independent, "1"]) == 2
    assert "batch_size: 2 -> 1" in capsys.readouterr().err

    foreign = tmp_path / "mine.csv"
    foreign.write_text("my,own,data\n")
    assert cli.score_main(["--model", "tiny", "--prompt", PROMPT, *images, "--output", str(foreign)]) == 2
    assert "was not written by dinalrm score" in capsys.readouterr().err
    assert foreign.read_text() == "my,own,data\n"


def test_one_progress_bar_with_images_per_second_on_a_terminal(tmp_path, tiny_model, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    images = save_images(tmp_path, 3, size=48)
    assert cli.score_main(["--model", "tiny", "--prompt", PROMPT, *images, "--output", str(tmp_path / "out.csv")]) == 0
    lines = terminal.getvalue().replace("\r", "\n").splitlines()
    bars = [line for line in lines if line.startswith("dinalrm score:")]
    assert bars and "3/3" in bars[-1] and ("img/s" in bars[-1] or "s/img" in bars[-1])  # s/img below 1 img/s
    assert all(line.startswith("dinalrm score:") for line in lines if "%|" in line)  # the pipeline's bar stays off


@pytest.mark.parametrize("file_format", ["csv", "jsonl"])
def test_a_torn_last_record_is_dropped_and_a_damaged_file_refused(tmp_path, file_format):
    """Killed while writing: the record cut short goes, even a CSV prompt cut after one of its own newlines."""
    path = str(tmp_path / f"out.{file_format}")
    rows = [
        {"image": "a.png", "prompt": "two\nlines", "reward": 0.1, "normalized": 1.01, "rank": None}
        | {"pair": 0, "side": "a", "p_preferred": None},
        {"image": "b.png", "prompt": "two\nlines", "reward": -2.5, "normalized": 0.75, "rank": None}
        | {"pair": 0, "side": "b", "p_preferred": None},
    ]
    settings = {"seed": 0}
    OutputFile(path, file_format, settings, overwrite=False).append(rows)
    whole = Path(path).read_bytes()
    second = whole.rindex(b"\n", 0, whole.index(b"b.png")) + 1  # where the second record starts
    Path(path).write_bytes(whole[: whole.index(b"lines", second)])  # in CSV, just after the quoted newline
    assert OutputFile(path, file_format, settings, overwrite=False).rows == rows[:1]
    assert Path(path).read_bytes() == whole[:second]

    Path(path).write_bytes(whole.replace(b"a.png", b"a.png,extra" if file_format == "csv" else b'a.png"}'))
    with pytest.raises(ValueError, match="cannot be resumed"):
        OutputFile(path, file_format, settings, overwrite=False)


def score_arguments(folder: Path, output: Path) -> list[str]:
    model, prompt = str(REPO_ROOT / "assets" / "dinalrm-tiny"), "a small red circle at the left on a white background"
    return ["--model", model, "--prompt", prompt, str(folder), "--output", str(output)]


def score_command(folder: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "dinalrm.cli", "score", *score_arguments(folder, output)]


@pytest.mark.slow  # one interpreter start (the kill must hit a real process): 10-30 s on a shared 2-core machine
def test_killed_run_resumes_to_the_uninterrupted_file(tmp_path, capsys, caplog):
    """120 images to CSV: `python -m dinalrm.cli score` SIGKILLed midway, a torn last line, resumed (in this process,
    the same `score_main` the command calls); the file equals an uninterrupted run's, byte for byte."""
    folder = tmp_path / "images"
    save_images(folder, 120)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    whole, resumed = tmp_path / "whole.csv", tmp_path / "resumed.csv"
    assert cli.score_main(score_arguments(folder, whole)) == 0  # in this process: one interpreter start less

    process = subprocess.Popen(score_command(folder, resumed), env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    # Kill after 3 of the 15 batches of 8 rows: the other 12 (about 1 s of scoring) are the margin for this poll.
    while time.monotonic() < deadline and process.poll() is None:
        if resumed.exists() and resumed.read_bytes().count(b"\n") > 24:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    lines = resumed.read_bytes().count(b"\n") - 1
    assert 24 <= lines < 120
    with open(resumed, "a") as file:  # as if killed in the middle of writing a row
        file.write(f"{folder}/image_119.png,a small red")
    capsys.readouterr()
    assert cli.score_main(score_arguments(folder, resumed)) == 0
    assert sum("dropped a torn last line" in record.getMessage() for record in caplog.records) == 1  # a log warning
    assert f"wrote 120 rows to {resumed} ({120 - lines} new)" in capsys.readouterr().err
    assert resumed.read_bytes() == whole.read_bytes()
    rows = read_csv(whole)
    assert len(rows) == 120 and sorted(int(row["rank"]) for row in rows) == list(range(1, 121))


def test_the_job_api_scores_rows_and_another_loop_can_reuse_it(pipe, tmp_path):
    """`score_rows` in one call, and the same job driven by a hand-written loop (as another engine drives it):
    rewards as the pipeline gives them per prompt with a fresh generator, one file either way."""
    from dinalrm.serving.scoring import ScoringJob, ScoringSettings, normalized_rewards, score_images, score_rows

    red, blue = save_images(tmp_path / "red", 3, seed=4), save_images(tmp_path / "blue", 2, seed=5)
    rows_file = tmp_path / "rows.csv"
    rows_file.write_text("prompt,image\n" + "".join(f"{PROMPT},{p}\n" for p in red) + f"{OTHER},{blue[0]}\n")
    settings = ScoringSettings(t=pipe.reward_model.config.default_t, seed=2, batch_size=2)  # what rewards_of uses
    job = ScoringJob.from_inputs(blue[1:], rows_file=str(rows_file), prompt=OTHER)
    table = score_rows(pipe, job.rows, settings)
    expected_red = rewards_of(pipe, PROMPT, [PIL.Image.open(p) for p in red[:2]], seed=2)
    expected_red += rewards_of(pipe, PROMPT, [PIL.Image.open(red[2])], seed=2)  # batch_size 2: a second batch
    expected_blue = rewards_of(pipe, OTHER, [PIL.Image.open(p) for p in blue], seed=2)
    assert [row["image"] for row in table] == [*red, blue[0], blue[1]]
    assert [row["reward"] for row in table] == tolerances.close_to(expected_red + expected_blue)
    assert [row["rank"] for row in table[:3]] == [
        sorted(expected_red, reverse=True).index(r) + 1 for r in expected_red
    ]

    written = tmp_path / "loop.jsonl"
    job.open_output(str(written), "jsonl", {"seed": 2})
    for batch in job.pending_batches(settings.batch_size):  # the loop another engine replaces
        members, images = job.load_images(batch)
        rewards = score_images(pipe, job.rows[members[0]].prompt, images, settings)
        job.record(members, rewards, normalized_rewards(pipe, rewards, settings))
    finished = job.finish(lambda first, second: [0.5] * len(first))
    assert [row["reward"] for row in finished] == pytest.approx([row["reward"] for row in table], rel=1e-6)
    assert [json.loads(line)["image"] for line in written.read_text().splitlines()] == [*red, *blue]
    assert ScoringJob.from_inputs(blue, prompt=OTHER).pending_batches(1) == [[0], [1]]
