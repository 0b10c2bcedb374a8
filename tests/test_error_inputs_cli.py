"""`dinalrm-score`'s error inputs: an output that is an input, a damaged settings sidecar, a model that scores NaN,
an empty folder among the inputs. Each row is a command line built in a fresh folder; an error row names the exit
code and the stderr message, a skip row the reason it is counted under (the run goes on). No input file changes."""

import copy
import json
import os
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from error_inputs import ErrorInput, SkipInput, assert_message, rows

from dinalrm import cli
from dinalrm.testing import get_tiny_dinalrm_pipeline
from pipeline_dinalrm import DiNaLRMPipeline


PROMPT = "a red square"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return get_tiny_dinalrm_pipeline()


@pytest.fixture(scope="module")
def nan_pipe(pipe):
    """The tiny pipeline with NaN in one head weight (as a broken conversion or training run leaves it)."""
    broken = copy.deepcopy(pipe)
    weight = next(parameter for name, parameter in broken.reward_model.named_parameters() if "head" in name)
    weight.data.view(-1)[0] = float("nan")
    return broken


def images(folder: Path, count: int = 2) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"image_{index}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def pairs_file(folder: Path) -> str:
    first, second = images(folder / "img")
    path = folder / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": PROMPT, "chosen": first, "rejected": second}) + "\n")
    return str(path)


def with_sidecar(text: bytes):
    """A command whose --output exists with a settings sidecar holding `text`."""

    def build(folder: Path) -> list[str]:
        output = folder / "out.jsonl"
        output.write_text("")
        Path(f"{output}.settings.json").write_bytes(text)
        return ["--prompt", PROMPT, *images(folder / "img"), "--output", str(output)]

    return build


def linked_output(folder: Path) -> list[str]:
    pairs = pairs_file(folder)
    os.symlink(pairs, folder / "link.jsonl")
    return ["--pairs", pairs, "--output", str(folder / "link.jsonl"), "--overwrite"]


CLI_ERROR_INPUTS = [
    ErrorInput(
        "output is the --pairs file",
        lambda f: ["--pairs", (p := pairs_file(f)), "--output", p, "--overwrite"],
        2,
        "is the input file .*pairs.jsonl",
    ),
    ErrorInput(
        "output is an image",
        lambda f: ["--prompt", PROMPT, *(i := images(f / "img")), "--output", i[0], "--format", "csv", "--overwrite"],
        2,
        "is the input file .*image_0.png",
    ),
    ErrorInput("output is a link to the --pairs file", linked_output, 2, "is the input file"),
    ErrorInput(
        "output is an input given through ..",
        lambda f: ["--pairs", pairs_file(f), "--output", f"{f}/img/../pairs.jsonl", "--overwrite"],
        2,
        "is the input file",
    ),
    ErrorInput(
        "truncated settings sidecar", with_sidecar(b'{"model": "ti'), 2, r"settings.json.*damaged.*--overwrite"
    ),
    ErrorInput("settings sidecar is a list", with_sidecar(b"[1, 2]"), 2, r"damaged \(a JSON list.*--overwrite"),
    ErrorInput("settings sidecar not UTF-8", with_sidecar(b"\xff\xfe\x00"), 2, r"damaged.*--overwrite"),
    ErrorInput("settings sidecar empty", with_sidecar(b""), 2, r"damaged.*--overwrite"),
    ErrorInput(
        "NaN model, every row",
        lambda f: ["--nan-model", "--prompt", PROMPT, *images(f / "img"), "--json"],
        2,
        "nonfinite_reward=2.*no row could be scored",
    ),
    ErrorInput(
        "NaN model with --output",
        lambda f: ["--nan-model", "--prompt", PROMPT, *images(f / "img"), "--output", str(f / "out.jsonl")],
        2,
        "nonfinite_reward=2.*no row could be scored",
    ),
]
CLI_SKIP_INPUTS = [
    SkipInput(
        "empty folder among the inputs",
        lambda f: ["--prompt", PROMPT, *images(f / "img"), str((f / "empty").resolve())],
        "empty_folder=1",
    ),
    SkipInput(
        "folder without images among the inputs",
        lambda f: ["--prompt", PROMPT, *images(f / "img"), str(f / "notes")],
        "empty_folder=1",
    ),
]


def run(argv: list[str], pipe, nan_pipe, monkeypatch) -> int:
    model = pipe
    if argv[0] == "--nan-model":
        argv, model = argv[1:], nan_pipe
    monkeypatch.setattr(DiNaLRMPipeline, "from_pretrained", classmethod(lambda cls, name, **options: model))
    return cli.score_main(["--model", "tiny", *argv])


def snapshot(folder: Path) -> dict:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file() and not path.is_symlink()}


@pytest.mark.parametrize("row", rows(CLI_ERROR_INPUTS))
def test_score_command_error_inputs(row, tmp_path, pipe, nan_pipe, monkeypatch, capsys):
    argv = row.input(tmp_path)
    before = snapshot(tmp_path)
    assert run(argv, pipe, nan_pipe, monkeypatch) == row.error
    captured = capsys.readouterr()
    assert_message(row, captured.err.replace("\n", " "))
    assert "NaN" not in captured.out and "nan" not in captured.out.lower().replace("nonfinite", "")
    changed = {path for path, data in before.items() if not path.exists() or path.read_bytes() != data}
    assert not changed, f"input files changed: {changed}"


@pytest.mark.parametrize("row", rows(CLI_SKIP_INPUTS))
def test_score_command_skip_inputs(row, tmp_path, pipe, nan_pipe, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    assert run(row.input(tmp_path), pipe, nan_pipe, monkeypatch) == 0
    captured = capsys.readouterr()
    assert row.reason in captured.err and "skipped 1 of 3 rows" in captured.err
    assert len(re.findall(r"^ +\d+\. ", captured.out, flags=re.M)) == 2  # the two readable images, ranked


def test_nan_rows_among_finite_ones_exit_1_and_write_no_nan(tmp_path, pipe, monkeypatch, capsys):
    """Two prompts; the model scores one prompt's image NaN: the other rows are written, the NaN row is counted and
    left out, the file is valid JSON Lines, and the exit code says the run failed."""
    first, second = images(tmp_path / "img")
    table = tmp_path / "rows.jsonl"
    table.write_text(
        "".join(json.dumps({"prompt": p, "image": i}) + "\n" for p, i in ((PROMPT, first), ("x", second)))
    )
    call = DiNaLRMPipeline.__call__

    def nan_for_x(self, prompt, *args, **kwargs):
        output = call(self, prompt, *args, **kwargs)
        if prompt == "x":
            output.rewards[:] = float("nan")
        return output

    monkeypatch.setattr(DiNaLRMPipeline, "__call__", nan_for_x)
    output = tmp_path / "out.jsonl"
    assert run(["--pairs", str(table), "--output", str(output)], pipe, None, monkeypatch) == 1
    err = capsys.readouterr().err
    assert "nonfinite_reward=1" in err and "1 row(s) scored NaN" in err
    strict = {"parse_constant": lambda name: pytest.fail(f"bare {name} in the output")}
    written = [json.loads(line, **strict) for line in output.read_text().splitlines()]
    assert [row["prompt"] for row in written] == [PROMPT] and written[0]["rank"] == 1
