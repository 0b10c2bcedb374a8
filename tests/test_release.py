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
# Commands started one by one from the empty folder, each with a pattern its output (stdout and stderr) must match:
# the installed console scripts (the entry points resolve, the parsers load without the model stack), and
# accelerate's launcher with the training module installed as a top-level module (it starts `python -m train_dinalrm`).
ACCELERATE = ["python", "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
ACCELERATE += ["--mixed_precision", "no", "--dynamo_backend", "no"]
OWN_PROCESS_COMMANDS = [
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
    ([*ACCELERATE, "-m", "train_dinalrm", "--help"], r"--train_data_dir"),
]
# The commands that load models, in order, with the pattern their output must match ({examples}: the packaged
# example-image folder; {work}: a scratch folder; {official}: a copy of the official-format fixture
# tests/fixtures/official-tiny). They run in ONE interpreter of the venv (one start of torch for them all), through
# `dinalrm.cli.main`, the function the `dinalrm` console script calls (started above).
MODEL_COMMANDS = [
    (
        ["dinalrm", "score", "--prompt", PROMPT, "{examples}/red-circle-left.png", "{examples}/blue-square-right.png"]
        + ["--json"],  # the text output of the same fallback is tested in tests/test_cli.py
        r'(?s)"model": "\S+/dinalrm/assets/dinalrm-tiny".*"p_a_preferred": [01]\.\d+.*could not be loaded.*'
        r"Scoring with the packaged demo model",  # the JSON on stdout, then the warning on stderr
    ),
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
DONE = "=== command done, exit status"
# What the venv's python runs (argv: the commands and the places as JSON): first where the installed package, its
# example images and the Hub modules live, and the tiny model and benchmarks `dinalrm eval` reads; then each command,
# a DONE line with its exit status closing its output on stdout and on stderr.
IN_ONE_INTERPRETER = f"""
import importlib, json, sys, sysconfig
import dinalrm
from dinalrm import cli
from dinalrm.testing import save_tiny_dinalrm_repo, write_tiny_benchmarks
commands, places = json.loads(sys.argv[1]), json.loads(sys.argv[2])
places["examples"] = str(dinalrm.bundled_asset("examples"))
modules = {("dinalrm", "dinalrm.testing", *HUB_MODULES)!r}
files = [importlib.import_module(module).__file__ for module in modules]
print(json.dumps({{"site": sysconfig.get_paths()["purelib"], "examples": places["examples"], "files": files}}))
save_tiny_dinalrm_repo(places["work"] + "/m")
write_tiny_benchmarks(places["work"] + "/b")
for arguments in commands:
    arguments = [argument.format(**places) for argument in arguments]
    assert arguments[0] == "dinalrm", arguments
    try:
        status = cli.main(arguments[1:])
    except SystemExit as exit:
        status = exit.code
    for stream in (sys.stdout, sys.stderr):
        print("{DONE}", status, file=stream, flush=True)
"""
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

    # No pip in the venv (ensurepip costs seconds): this interpreter's pip installs into it with --python.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    empty, work = tmp_path / "empty", tmp_path / "work"
    empty.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(tmp_path / "empty-cache"),  # whatever this machine has cached, the default id is not there
        OMP_NUM_THREADS="1",
    )
    # --ignore-installed: a dinalrm in the system site-packages (an editable clone) must not stand in for the wheel.
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index"]
    install += ["--ignore-installed", str(wheel)]
    installed = subprocess.run(install, cwd=empty, env=env, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    for command, expected in OWN_PROCESS_COMMANDS:
        run = subprocess.run(command, cwd=empty, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, (command, run.stderr[-3000:])
        assert re.search(expected, run.stdout + run.stderr), (command, run.stdout, run.stderr[-3000:])
        assert str(REPO_ROOT) not in run.stdout + run.stderr  # nothing was read from the clone

    official = tmp_path / "official-tiny"
    shutil.copytree(REPO_ROOT / "tests" / "fixtures" / "official-tiny", official)
    places = json.dumps({"work": str(work), "official": str(official)})
    commands = json.dumps([arguments for arguments, _ in MODEL_COMMANDS])
    run = subprocess.run(
        [str(python), "-c", IN_ONE_INTERPRETER, commands, places],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert str(REPO_ROOT) not in run.stdout + run.stderr  # nothing was read from the clone
    found, *outputs = re.split(rf"^{DONE} .*\n", run.stdout, flags=re.M)
    found, outputs = json.loads(found.splitlines()[0]), [found.split("\n", 1)[1], *outputs[:-1]]
    errors = re.split(rf"^{DONE} .*\n", run.stderr, flags=re.M)[:-1]
    statuses = re.findall(rf"^{DONE} (.*)$", run.stdout, flags=re.M)
    assert statuses == ["0"] * len(MODEL_COMMANDS), (statuses, run.stderr[-3000:])
    site = Path(found["site"]).resolve()
    assert [Path(file).resolve().is_relative_to(site) for file in found["files"]] == [True] * (2 + len(HUB_MODULES))
    assert Path(found["examples"]).resolve().is_relative_to(site)
    for (arguments, expected), out, err in zip(MODEL_COMMANDS, outputs, errors, strict=True):
        assert re.search(expected, out + err), (arguments, out, err[-3000:])
    # Offline with an empty cache, scoring fell back to the demo model inside the installed wheel.
    scored = json.loads(outputs[[arguments[-1] for arguments, _ in MODEL_COMMANDS].index("--json")])
    assert Path(scored["model"]).resolve().is_relative_to(site)
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


# Runs each script given as a script (a fresh namespace, its folder as working directory and first on sys.path, as
# `python card_N.py` there), all in one interpreter: one start of torch for every card.
CARD_RUNNER = """
import os, runpy, sys
for script in sys.argv[1:]:
    folder = os.path.dirname(script)
    os.chdir(folder)
    sys.path.insert(0, folder)
    runpy.run_path(script, run_name="__main__")
    sys.path.remove(folder)
    print("CARD OK", script, flush=True)
"""


def run_cards(python: str, cards: list[tuple[Path, Path]]) -> None:
    """Each `(card, cwd)`: the card's Python blocks in order, in `cwd` (where the card's repository name resolves,
    next to a.png and b.png), on the CPU (what a user without a GPU changes), in one process of `python`."""
    scripts = []
    for index, (card, cwd) in enumerate(cards):
        blocks = python_blocks(card.read_text())
        assert blocks, f"{card} has no Python block"
        for name, colour in (("a.png", "red"), ("b.png", "blue")):
            PIL.Image.new("RGB", (64, 64), colour).save(cwd / name)
        scripts.append(str(cwd / f"card_{index}.py"))
        Path(scripts[-1]).write_text("\n".join(blocks).replace('"cuda"', '"cpu"') + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([python, "-c", CARD_RUNNER, *scripts], env=env, capture_output=True, text=True, timeout=600)
    done = [line.split(" ", 2)[2] for line in run.stdout.splitlines() if line.startswith("CARD OK ")]
    assert run.returncode == 0 and done == scripts, (done, run.stderr[-3000:])


@pytest.mark.slow  # runs every card's code blocks on the tiny-world models: 5-20 s for the one process
def test_shipped_and_written_cards_run_as_written(tmp_path, warm_python):
    """`assets/*/README.md` (each with its folder under the name the card uses), the card `build_hub_repo.py` writes
    and the card `train_dinalrm.py` writes, on the tiny-world models."""
    import train_dinalrm
    from dinalrm.hub import build_hub_repo
    from modeling_dinalrm import DiNaLRMModel

    cards = []
    shipped = sorted((REPO_ROOT / "assets").glob("*/README.md"))
    assert shipped
    for card in shipped:
        cwd = tmp_path / "shipped" / card.parent.name
        cwd.mkdir(parents=True)
        (cwd / card.parent.name).symlink_to(card.parent, target_is_directory=True)
        cards.append((card, cwd))

    reward_model = REPO_ROOT / "assets" / "dinalrm-tiny" / "reward_model"
    base = tmp_path / "tiny-sd3"
    base.symlink_to(REPO_ROOT / "assets" / "tiny-sd3", target_is_directory=True)
    build_hub_repo(DiNaLRMModel.from_pretrained(reward_model), str(base), str(tmp_path / "built"))
    assert (tmp_path / "built" / "pipeline_dinalrm.py").is_file()
    cards.append((tmp_path / "built" / "README.md", tmp_path))

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
    assert str(tmp_path) not in (trained / "README.md").read_text()  # local folders are named by their folder name
    cards.append((trained / "README.md", tmp_path))
    run_cards(warm_python, cards)
