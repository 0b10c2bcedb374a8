"""What a release ships: the wheel works outside the clone, the shipped files name no path of the machine that built
them, and every model card this repository ships or writes runs as written."""

import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import PIL.Image
import pytest
from conftest import REPO_ROOT


PROMPT = "a large red circle at the left on a white background"
# The Hub modules a wheel must install as top-level modules (they are also the Hub repositories' code files).
HUB_MODULES = ("modeling_dinalrm", "pipeline_dinalrm", "modeling_lrm", "pipeline_lrm")
# Every installed command the wheel test runs from an empty folder, in order: one line each, the arguments
# ({examples}: the packaged example-image folder; {work}: a scratch folder; {official}: a copy of the official-format
# fixture tests/fixtures/official-tiny) and a pattern its output (stdout and stderr) must match.
TINY_EVAL_SETUP = (
    "from dinalrm.testing import save_tiny_dinalrm_repo as m, write_tiny_benchmarks as b; m('{work}/m'); b('{work}/b')"
)
ACCELERATE = ["python", "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
ACCELERATE += ["--mixed_precision", "no", "--dynamo_backend", "no"]
COMMANDS = [
    (["dinalrm", "--help"], r"(?s)score.*serve.*eval.*calibrate.*convert.*build-hub"),
    (["dinalrm", "score", "--help"], r"--normalize"),
    (["dinalrm", "serve", "--help"], r"--max-batch-size"),
    (["dinalrm", "eval", "--help"], r"--scorer"),
    (["dinalrm", "calibrate", "--help"], r"--holdout_fraction"),
    (["dinalrm", "convert", "--help"], r"(?s)dinalrm .*lrm "),
    (["dinalrm", "convert", "dinalrm", "--help"], r"--keep_lora_adapter"),
    (["dinalrm", "convert", "lrm", "--help"], r"--no_multi_scale"),
    (["dinalrm", "build-hub", "--help"], r"--push_to_hub"),
    (["dinalrm-score", "--help"], r"usage: dinalrm-score"),
    (["dinalrm-serve", "--help"], r"usage: dinalrm-serve"),
    (["python", "-m", "train_dinalrm", "--help"], r"--train_data_dir"),
    ([*ACCELERATE, "-m", "train_dinalrm", "--help"], r"--train_data_dir"),
    (
        ["dinalrm", "score", "--prompt", PROMPT, "{examples}/red-circle-left.png", "{examples}/blue-square-right.png"],
        r"(?s)packaged demo model.*P\(A ≻ B\) = [01]\.\d+   A = \S*red-circle-left.png, B = \S*blue-square-right.png",
    ),
    (
        ["dinalrm", "score", "--prompt", PROMPT, "{examples}/red-circle-left.png", "{examples}/blue-square-right.png"]
        + ["--json"],
        r'(?s)"model": "\S+/dinalrm/assets/dinalrm-tiny".*"p_a_preferred": [01]\.\d+',
    ),
    (["python", "-c", TINY_EVAL_SETUP], r""),  # set-up: its exit status is the check
    (
        ["dinalrm", "eval", "--model", "{work}/m", "--data_dir", "{work}/b", "--benchmarks", "hpdv2,hpdv3"]
        + ["--bootstrap_samples", "0", "--output_dir", "{work}/eval"],
        r"Wrote \S+/eval/results.json",
    ),
    (
        ["dinalrm", "convert", "dinalrm", "--official_dir", "{official}", "--backbone", "{official}/transformer"]
        + ["--output_dir", "{work}/converted"],
        r"Saved \S+/converted",
    ),
]
# Absolute paths of a build machine: this project's work folders, temporary folders, root's and users' homes.
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|tmp|root|home|Users)/")


def python_blocks(markdown: str) -> list[str]:
    return [block.split("```", 1)[0] for block in markdown.split("```python\n")[1:]]


@pytest.mark.slow
def test_wheel_works_from_an_empty_folder(tmp_path):
    """Build the wheel, install it alone into a fresh venv (torch & co from the system site-packages, no download),
    and use it from an empty folder with no PYTHONPATH: the demo model and the example images come from the wheel."""
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation", "-w", str(dist)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("dinalrm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [name for name in names if name.startswith("tests/") or "/tests/" in name or "conftest" in name]
    assert "dinalrm/assets/dinalrm-tiny/model_index.json" in names
    assert {f"{module}.py" for module in HUB_MODULES} <= set(names)
    assert "dinalrm/evaluation/requirements/hpsv2.txt" in names  # the isolated scorers' pins ship with the package
    checked = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel)], capture_output=True, text=True
    )
    assert checked.returncode == 0 and "PASSED" in checked.stdout, checked.stdout + checked.stderr

    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(tmp_path / "empty-cache"),  # whatever this machine has cached, the default id is not there
        OMP_NUM_THREADS="1",
    )
    # --ignore-installed: a dinalrm in the system site-packages (an editable clone) must not stand in for the wheel.
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)]
    installed = subprocess.run(install, cwd=empty, env=env, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    script = "import importlib, dinalrm; print(dinalrm.bundled_asset('examples'))\n"
    script += "".join(f"print(importlib.import_module({module!r}).__file__)\n" for module in ("dinalrm", *HUB_MODULES))
    found = subprocess.run([str(python), "-c", script], cwd=empty, env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr[-3000:]
    examples, *files = found.stdout.strip().splitlines()
    assert all(Path(file).resolve().is_relative_to(Path(site).resolve()) for file in files), (site, files)
    assert Path(examples).resolve().is_relative_to(Path(site).resolve())

    work, official = tmp_path / "work", tmp_path / "official-tiny"
    work.mkdir()
    shutil.copytree(REPO_ROOT / "tests" / "fixtures" / "official-tiny", official)
    outputs = {}
    for arguments, expected in COMMANDS:
        command = [argument.format(examples=examples, work=work, official=official) for argument in arguments]
        run = subprocess.run(command, cwd=empty, env=env, capture_output=True, text=True, timeout=600)
        outputs[" ".join(arguments)] = run.stdout
        assert run.returncode == 0, (command, run.stderr[-3000:])
        assert re.search(expected, run.stdout + run.stderr), (command, run.stdout, run.stderr[-3000:])
        assert str(REPO_ROOT) not in run.stdout + run.stderr  # nothing was read from the clone
    # Offline with an empty cache, scoring fell back to the demo model inside the installed wheel.
    scored = json.loads(next(out for command, out in outputs.items() if command.endswith("--json")))
    assert Path(scored["model"]).resolve().is_relative_to(Path(site).resolve())
    assert (work / "eval" / "results.json").is_file() and (work / "converted" / "config.json").is_file()
    assert sorted(os.listdir(empty)) == []  # the commands write nothing into the folder they run in


def test_shipped_text_files_carry_no_path_of_the_build_machine():
    """Every text file under assets/ (what the demo model and the tiny-world generator ship)."""
    checked, offending = 0, []
    for path in sorted((REPO_ROOT / "assets").rglob("*")):
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # weights and images
        checked += 1
        offending += [f"{path.relative_to(REPO_ROOT)}: {m.group(0)}" for m in MACHINE_PATH.finditer(text)]
    assert checked >= 20 and offending == []


def test_the_machine_path_pattern_finds_what_it_must():
    for text in ('"/work/main/x"', "'/tmp/tw/vae'", "/root/.cache", "/home/me/x", "/Users/me/x"):
        assert MACHINE_PATH.search(text), text
    for text in ("tiny-sd3", "https://huggingface.co/stabilityai/x", "owner/name", "a/tmp/b"):
        assert not MACHINE_PATH.search(text), text


def run_card_blocks(card: Path, cwd: Path) -> subprocess.CompletedProcess:
    """A card's Python blocks in order in one fresh process, in `cwd` (where the card's repository name resolves,
    next to a.png and b.png), on the CPU: what a user without a GPU changes."""
    blocks = python_blocks(card.read_text())
    assert blocks, f"{card} has no Python block"
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        PIL.Image.new("RGB", (64, 64), colour).save(cwd / name)
    (cwd / "card.py").write_text("\n".join(blocks).replace('"cuda"', '"cpu"') + "\nprint('CARD OK')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "card.py"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # runs every card's code blocks on the tiny-world models: 15-20 s each
def test_shipped_cards_run_as_written(tmp_path):
    """`assets/*/README.md`: each card's blocks, with the folder under the name the card uses."""
    cards = sorted((REPO_ROOT / "assets").glob("*/README.md"))
    assert cards
    for card in cards:
        cwd = tmp_path / card.parent.name
        cwd.mkdir()
        (cwd / card.parent.name).symlink_to(card.parent, target_is_directory=True)
        run = run_card_blocks(card, cwd)
        assert run.returncode == 0 and "CARD OK" in run.stdout, (card, run.stderr[-3000:])


@pytest.mark.slow  # runs every card's code blocks on the tiny-world models: 15-20 s each
def test_written_cards_run_as_written(tmp_path):
    """The card `build_hub_repo.py` writes and the card `train_dinalrm.py` writes, on the tiny-world models."""
    import train_dinalrm
    from dinalrm.hub import build_hub_repo
    from modeling_dinalrm import DiNaLRMModel

    reward_model = REPO_ROOT / "assets" / "dinalrm-tiny" / "reward_model"
    base = tmp_path / "tiny-sd3"
    base.symlink_to(REPO_ROOT / "assets" / "tiny-sd3", target_is_directory=True)
    build_hub_repo(DiNaLRMModel.from_pretrained(reward_model), str(base), str(tmp_path / "built"))
    card = tmp_path / "built" / "README.md"
    assert (tmp_path / "built" / "pipeline_dinalrm.py").is_file()
    run = run_card_blocks(card, tmp_path)
    assert run.returncode == 0 and "CARD OK" in run.stdout, run.stderr[-3000:]

    trained = tmp_path / "trained"
    shutil.copytree(reward_model, trained)
    config = json.loads((reward_model / "config.json").read_text())
    layers = ",".join(str(layer) for layer in config["visual_layers"])
    args = train_dinalrm.parse_args(
        ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(tmp_path / "pairs")]
        + ["--num_backbone_layers", str(config["num_backbone_layers"]), "--visual_layers", layers]
        + ["--text_layers", layers, "--output_dir", str(trained)]
        + ["--overwrite_output_dir"]  # the folder already holds the model whose card is written, as at a run's end
    )
    train_dinalrm.save_model_card("trained", args, str(trained), {"val/accuracy_t0.4": 0.8}, {})
    text = (trained / "README.md").read_text()
    assert str(tmp_path) not in text  # local folders are named by their folder name
    run = run_card_blocks(trained / "README.md", tmp_path)
    assert run.returncode == 0 and "CARD OK" in run.stdout, run.stderr[-3000:]
