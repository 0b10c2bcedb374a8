"""`dinalrm score`: the docs' offline commands from the shell, then options, output and errors in-process; the
`dinalrm` command's subcommands and their instant `--help`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import tolerances
import tomllib
import torch
from conftest import REPO_ROOT

from dinalrm import cli
from dinalrm.testing import get_tiny_dinalrm_pipeline
from pipeline_dinalrm import DiNaLRMPipeline


PROMPT = "a red square"


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def readme_offline_commands() -> str:
    """The shell block of the getting-started page's offline section, as a user would paste it."""
    section = (REPO_ROOT / "docs" / "getting-started.md").read_text().split("## Offline, on a tiny local model", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return get_tiny_dinalrm_pipeline()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("cli_images")
    rng = np.random.default_rng(0)
    files = []
    for index, shape in enumerate([(32, 32, 3), (40, 24, 4), (32, 48)]):
        path = folder / f"image_{index}.png"
        PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        files.append(str(path))
    return files


@pytest.fixture
def loads_tiny_pipeline(pipe, monkeypatch):
    """`--model` resolves to the in-memory tiny pipeline (loading itself is tested through the shell)."""
    loaded = []
    load = classmethod(lambda cls, model, **options: loaded.append(model) or pipe)
    monkeypatch.setattr(DiNaLRMPipeline, "from_pretrained", load)
    return loaded


@pytest.mark.slow  # starts Python command lines (scripts, servers, README commands): 10-60 s on a shared 2-core machine
def test_readme_offline_commands_run_from_the_shell(tmp_path, pipe, warm_bin):
    script = readme_offline_commands()
    assert "dinalrm score --model tiny-dinalrm" in script
    env = {
        **os.environ,
        "PATH": f"{warm_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO_ROOT),  # what `pip install dinalrm` provides
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    header, *ranking, comparison = result.stdout.strip().splitlines()
    assert header.startswith("raw DiNa-LRM rewards (higher = preferred")
    printed = dict(ranked_line(line)[1:] for line in ranking)
    assert comparison.startswith("P(A ≻ B) = ") and comparison.endswith("A = red.png, B = noise.png")

    images = [PIL.Image.open(tmp_path / name) for name in ("red.png", "noise.png")]
    expected = pipe.compare(PROMPT, images[0], images[1], generator=generator())
    assert [printed["red.png"], printed["noise.png"]] == tolerances.printed_as(expected.rewards.tolist(), 4)
    assert [ranked_line(line)[1] for line in ranking] == sorted(printed, key=printed.get, reverse=True)  # best first
    assert float(comparison.split("= ")[1].split()[0]) == tolerances.printed_as(expected.probability, 4)


def ranked_line(line: str) -> tuple[int, str, float]:
    """`  1. red.png  +0.1234` -> (1, "red.png", 0.1234)."""
    rank, image, reward = line.split()
    return int(rank.rstrip(".")), image, float(reward)


def test_ensemble_json_output(pipe, image_files, loads_tiny_pipeline, capsys):
    assert cli.score_main(["--model", "tiny", "--prompt", PROMPT, *image_files, "--ensemble", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = pipe(
        PROMPT, images=[PIL.Image.open(path) for path in image_files], t=[0.2, 0.5, 0.7], generator=generator()
    ).rewards
    assert loads_tiny_pipeline == ["tiny"]
    assert result["t"] == [0.2, 0.5, 0.7] and result["seed"] == 0 and "comparison" not in result
    assert result["scores"].startswith("raw DiNa-LRM rewards (higher = preferred")
    assert [entry["image"] for entry in result["rewards"]] == image_files
    assert [entry["reward"] for entry in result["rewards"]] == tolerances.close_to(expected.tolist())


@pytest.mark.parametrize("levels, t", [(["--t", "0.25"], 0.25), (["--ensemble", "0.3,0.6"], [0.3, 0.6])])
def test_two_images_give_the_preference_probability(pipe, image_files, loads_tiny_pipeline, capsys, levels, t):
    argv = ["--model", "tiny", "--prompt", PROMPT, *image_files[:2], *levels, "--seed", "3", "--json"]
    assert cli.score_main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    images = [PIL.Image.open(path) for path in image_files[:2]]
    expected = pipe.compare(PROMPT, *images, t=t, generator=generator(3))
    assert result["t"] == t
    assert [entry["reward"] for entry in result["rewards"]] == tolerances.close_to(expected.rewards.tolist())
    assert result["comparison"]["a"] == image_files[0] and result["comparison"]["b"] == image_files[1]
    assert result["comparison"]["p_a_preferred"] == tolerances.close_to(expected.probability, scale=1.0)


def test_one_image_twice_ties_unless_noise_sharing_is_off(pipe, image_files, loads_tiny_pipeline, capsys):
    twice = ["--model", "tiny", "--prompt", PROMPT, image_files[0], image_files[0], "--t", "0.7", "--json"]
    assert cli.score_main(twice) == 0
    shared = json.loads(capsys.readouterr().out)
    assert shared["noise_sharing"] == "prompt" and shared["comparison"]["p_a_preferred"] == 0.5
    assert shared["rewards"][0]["reward"] == shared["rewards"][1]["reward"]
    assert cli.score_main([*twice, "--noise_sharing", "none"]) == 0
    independent = json.loads(capsys.readouterr().out)
    image = PIL.Image.open(image_files[0])
    expected = pipe.compare(PROMPT, image, image, t=0.7, generator=generator(), noise_sharing="none")
    assert independent["comparison"]["p_a_preferred"] == tolerances.close_to(expected.probability, scale=1.0)
    assert independent["comparison"]["p_a_preferred"] != 0.5


def test_model_neither_local_nor_cached_exits_with_how_to_get_it(image_files, capsys):
    code = cli.score_main(["--model", "dinalrm-tests/not-cached-anywhere", "--prompt", PROMPT, image_files[0]])
    assert code == 1
    message = capsys.readouterr().err
    assert "could not load the DiNa-LRM model 'dinalrm-tests/not-cached-anywhere'" in message
    assert "hf download dinalrm-tests/not-cached-anywhere" in message and "--model a local folder" in message


def test_default_model_offline_falls_back_loudly_to_the_bundled_tiny_model(image_files, capsys):
    code = cli.score_main(["--prompt", "a small red circle at the left on a white background", *image_files[:2]])
    assert code == 0
    captured = capsys.readouterr()
    warning = captured.err[captured.err.index("warning: ") :].splitlines()
    assert warning[0].startswith(f"warning: {cli.DEFAULT_MODEL} could not be loaded")  # and why, on this line
    details = [line for line in warning[1:] if line.startswith("  ")]
    assert len(details) <= 4 and all(len(line) <= 100 for line in details)  # a few short lines
    assert "packaged demo model" in details[0]
    assert (
        "  https://huggingface.co/stabilityai/stable-diffusion-3.5-medium\n" in captured.err
    )  # the gated licence page
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith("note: scored with the packaged demo model") and cli.DEFAULT_MODEL in lines[0]
    assert lines[-1].startswith("P(A ≻ B) = ")


@pytest.mark.slow  # starts Python command lines (scripts, servers, README commands): 10-60 s on a shared 2-core machine
def test_readme_main_command_prefers_the_matching_image_offline(tmp_path, warm_bin):
    """The README's first set-up command, minus the install: the bundled tiny model, offline, from the repo root."""
    block = (REPO_ROOT / "README.md").read_text().split("## Set-up: two commands", 1)[1].split("```bash\n", 2)[1]
    install, command = block.split("```", 1)[0].strip().split(" && ")
    assert install.startswith("pip install torch==2.13.0") and command.startswith("dinalrm score ")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{warm_bin}{os.pathsep}{os.environ['PATH']}"
    env["HF_HUB_CACHE"] = str(tmp_path / "empty-cache")  # whatever this machine has cached, the id is not there
    result = subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "packaged demo model" in result.stderr
    note, _, *ranking, comparison = result.stdout.strip().splitlines()
    assert "packaged demo model" in note
    assert [ranked_line(line)[:2] for line in ranking] == [
        (1, "assets/examples/red-circle-left.png"),
        (2, "assets/examples/blue-square-right.png"),
    ]
    assert comparison.endswith("A = assets/examples/red-circle-left.png, B = assets/examples/blue-square-right.png")
    assert float(comparison.split("= ")[1].split()[0]) > 0.5


def test_bad_images_and_arguments(image_files, tmp_path, loads_tiny_pipeline, capsys):
    assert cli.score_main(["--model", "tiny", "--prompt", PROMPT, str(tmp_path / "missing.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    assert cli.score_main(["--model", "tiny", "--prompt", PROMPT, str(tmp_path / "tiny.png")]) == 2
    assert "too small" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.score_main(["--prompt", PROMPT, image_files[0], "--t", "0.4", "--ensemble"])
    assert exit_info.value.code == 2


def test_a_decompression_bomb_or_an_unavailable_device_is_a_clear_error(image_files, tmp_path, monkeypatch, capsys):
    PIL.Image.new("RGB", (64, 64)).save(tmp_path / "huge.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: over twice the limit, as a 400 MP PNG is
    assert cli.score_main(["--model", "tiny", "--prompt", PROMPT, str(tmp_path / "huge.png"), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "huge.png" in error and "too large to decode safely" in error and "Downscale it first" in error

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.score_main(["--model", "tiny", "--prompt", PROMPT, image_files[0], "--device", "cuda"]) == 2
    assert "no cuda device is available here: pass --device cpu" in capsys.readouterr().err
    assert cli.score_main(["--model", "tiny", "--prompt", PROMPT, image_files[0], "--device", "gpu0"]) == 2
    assert "is not a device name" in capsys.readouterr().err


def test_more_than_two_images_print_a_ranking_best_first(pipe, image_files, loads_tiny_pipeline, capsys):
    assert cli.main(["score", "--model", "tiny", "--prompt", PROMPT, *image_files, "--seed", "1"]) == 0
    header, *ranking = capsys.readouterr().out.strip().splitlines()
    expected = pipe(PROMPT, images=[PIL.Image.open(path) for path in image_files], generator=generator(1)).rewards
    order = sorted(range(len(image_files)), key=lambda i: -expected[i].item())
    assert "higher = preferred" in header and not any(line.startswith("P(") for line in ranking)
    assert [ranked_line(line)[:2] for line in ranking] == [(rank, image_files[i]) for rank, i in enumerate(order, 1)]


def test_console_scripts_are_declared():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dinalrm"] == "dinalrm.cli:main"
    assert (
        scripts["dinalrm-score"] == "dinalrm.cli:score_main" and scripts["dinalrm-serve"] == "dinalrm.cli:serve_main"
    )


HEAVY_MODULES = ("torch", "diffusers", "transformers", "huggingface_hub", "accelerate", "datasets", "modeling_dinalrm")


@pytest.mark.parametrize(
    "command, expected",
    [
        ([], "build-hub"),
        (["score"], "--normalize"),
        (["serve"], "--max-batch-size"),
        (["convert"], "lrm"),
        (["convert", "dinalrm"], "--keep_lora_adapter"),
        (["convert", "lrm"], "--no_multi_scale"),
        (["build-hub"], "--push_to_hub"),
        (["eval"], "--bootstrap_samples"),
        (["calibrate"], "--holdout_fraction"),
    ],
)
def test_help_imports_no_heavy_library(command, expected):
    """`dinalrm SUB --help` must not wait for torch, diffusers, datasets or the model stack (they load in seconds):
    the rule that keeps it instant. The measured times are in benchmarks/bench_cli_help.py."""
    code = f"import sys\nfrom dinalrm import cli\ntry:\n    cli.main({[*command, '--help']!r})\nexcept SystemExit:\n    pass\n"
    assert_help_imports_nothing_heavy(code, expected)


def assert_help_imports_nothing_heavy(code: str, expected: str) -> None:
    """Runs `code` (which prints a --help) in a fresh interpreter: the help holds `expected`, and afterwards none of
    HEAVY_MODULES is imported."""
    code += f"\nimport sys\nprint([m for m in {HEAVY_MODULES!r} if m in sys.modules])"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert expected in run.stdout and run.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "script, expected", [("run_eval.py", "--bootstrap_samples"), ("calibrate.py", "--eval_pairs")]
)
def test_eval_scripts_help_imports_no_heavy_library(script, expected):
    """`python eval/run_eval.py --help` and `eval/calibrate.py --help` parse before importing the evaluation stack."""
    code = (
        f"import runpy, sys\nsys.argv = [{script!r}, '--help']\ntry:\n"
        f"    runpy.run_path({str(REPO_ROOT / 'eval' / script)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
    )
    assert_help_imports_nothing_heavy(code, expected)


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--model", "dinalrm=m", "--model", "lrm=l", "--scorer", "table1", "--t", "0.4", "--ensemble"],
        ["eval", "--benchmarks", "pickapic,hpdv2", "--noise_sharing", "none", "--ray", "--num-workers", "2"],
        ["calibrate", "--model", "m", "--pairs", "p", "--ensemble", "0.2,0.5", "--write_to_model"],
    ],
)
def test_eval_and_calibrate_subcommands_parse_as_their_modules(argv):
    """`dinalrm eval|calibrate` parse with the light parsers exactly as `runner.parse_args` / `calibration.parse_args`
    (which the runner and the calibration read)."""
    from dinalrm.evaluation import calibration, runner

    module = {"eval": runner, "calibrate": calibration}[argv[0]]
    args = vars(cli.build_parser().parse_args(argv))
    for key in ("command", "handler", "check", "command_parser"):
        args.pop(key)
    assert args == vars(module.parse_args(argv[1:]))
