"""The published checkpoint by its Hub id, end to end, on a simulated Hugging Face cache (offline).

The cache holds the official-format tiny checkpoint under `liuhuohuo/DiNa-LRM-SD35M-12layers` and a tiny SD3
pipeline around the same fixture's transformer under `stabilityai/stable-diffusion-3.5-medium`, in the cache's
documented layout. What the CLI and `from_pretrained` print must equal converting the same checkpoint with the
script and scoring through a pipeline assembled by hand.
"""

import json
import logging
import os
import re
import subprocess

import httpx
import PIL.Image
import pytest
import tolerances
import torch
from conftest import OFFICIAL_TINY, REPO_ROOT, code_blocks, documentation_pages, use_hub_cache
from diffusers import FluxPipeline, ZImagePipeline
from huggingface_hub.errors import GatedRepoError
from test_lrm_parity import FIXTURE as LRM_FIXTURE
from test_lrm_parity import lrm_settings

import modeling_dinalrm
from dinalrm.cli import main as dinalrm_main
from dinalrm.testing import (
    add_to_hub_cache,
    get_tiny_flux_components,
    get_tiny_zimage_components,
    save_tiny_sd3_base,
    tiny_flux_transformer_config,
    tiny_zimage_transformer_config,
)
from modeling_dinalrm import DiNaLRMModel, ModelUnavailableError
from pipeline_dinalrm import DiNaLRMPipeline, load_base_components


OFFICIAL_ID = "liuhuohuo/DiNa-LRM-SD35M-12layers"
BASE_ID = "stabilityai/stable-diffusion-3.5-medium"
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The simulated cache, the snapshot folders, two images and the environment of a user offline."""
    root = tmp_path_factory.mktemp("hub")
    official = add_to_hub_cache(root / "cache", OFFICIAL_ID, OFFICIAL_TINY)
    base = add_to_hub_cache(root / "cache", BASE_ID, save_tiny_sd3_base(root / "base", OFFICIAL_TINY / "transformer"))
    # The README's FLUX.1-dev and Z-Image-Turbo stand-ins: as deep as the real ones, so its layer choices hold.
    FluxPipeline(
        **get_tiny_flux_components(transformer_config=tiny_flux_transformer_config(num_layers=19))
    ).save_pretrained(root / "flux")
    add_to_hub_cache(root / "cache", "black-forest-labs/FLUX.1-dev", root / "flux")
    ZImagePipeline(
        **get_tiny_zimage_components(transformer_config=tiny_zimage_transformer_config(n_layers=30))
    ).save_pretrained(root / "zimage")
    add_to_hub_cache(root / "cache", "Tongyi-MAI/Z-Image-Turbo", root / "zimage")
    images = []
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        PIL.Image.new("RGB", (64, 48), colour).save(root / name)
        images.append(str(root / name))
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(root / "cache"),
        "HF_HOME": str(root / "hf_home"),  # the converted-model cache lives below it
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
    }
    return {"root": root, "official": official, "base": base, "images": images, "env": env}


@pytest.fixture(scope="module")
def expected(hub):
    """Rewards from the script's conversion of the same checkpoint, scored through a hand-assembled pipeline."""
    out = hub["root"] / "converted"
    # `dinalrm convert dinalrm`, what scripts/convert_official_checkpoint.py runs, in this process (local paths: no
    # cache needed); the script's own command line runs as a user's in test_converter.py (`python=warm_python`).
    arguments = ["--official_dir", str(hub["official"]), "--backbone", str(hub["base"]), "--output_dir", str(out)]
    assert dinalrm_main(["convert", "dinalrm", *arguments]) == 0
    pipe = DiNaLRMPipeline(reward_model=DiNaLRMModel.from_pretrained(out), **load_base_components(hub["base"]))
    images = [PIL.Image.open(path) for path in hub["images"]]
    comparison = pipe.compare(PROMPT, images[0], images[1], generator=torch.Generator().manual_seed(0))
    return comparison.rewards.tolist(), comparison.probability


def score(hub, python: str, *extra) -> subprocess.CompletedProcess:
    command = [python, "-m", "dinalrm.cli", "score", "--prompt", PROMPT, *hub["images"], "--json", *extra]
    return subprocess.run(command, capture_output=True, text=True, env=hub["env"], cwd=hub["root"])


@pytest.mark.slow  # starts Python command lines (scripts, servers, README commands): 10-60 s on a shared 2-core machine
def test_cli_scores_the_published_id_like_the_converted_checkpoint_and_converts_once(
    hub, expected, warm_python, monkeypatch, capsys, caplog
):
    """`--model <published id>` converts the official checkpoint once (a user's fresh `dinalrm score` process); the
    next run, without --model, takes the same published id by default (found in the simulated cache: no fallback)
    and reuses that conversion. The second run is `dinalrm score` in this process, on the same cache and converted
    cache (`$HF_HOME/dinalrm/converted`): a second interpreter would only re-import torch and diffusers."""
    rewards, probability = expected
    first = score(hub, warm_python, "--model", OFFICIAL_ID)
    assert first.returncode == 0, first.stderr
    use_hub_cache(monkeypatch, hub["env"]["HF_HUB_CACHE"], home=hub["env"]["HF_HOME"])
    if "DINALRM_CACHE" in hub["env"]:  # where the first run converted to, else below HF_HOME
        monkeypatch.setenv("DINALRM_CACHE", hub["env"]["DINALRM_CACHE"])
    monkeypatch.chdir(hub["root"])
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="modeling_dinalrm"):
        assert dinalrm_main(["score", "--prompt", PROMPT, *hub["images"], "--json"]) == 0
    second = capsys.readouterr()
    for stdout, stderr in ((first.stdout, first.stderr), (second.out, second.err)):
        result = json.loads(stdout)
        assert result["model"] == OFFICIAL_ID and "note" not in result
        assert [entry["reward"] for entry in result["rewards"]] == tolerances.close_to(rewards)
        assert result["comparison"]["p_a_preferred"] == tolerances.close_to(probability, scale=1.0)
        assert "Traceback" not in stderr and "%|" not in stderr  # no progress bar when not a terminal
    assert "Converting the official checkpoint" in first.stderr and "no conversion" not in first.stderr
    assert "Converting the official checkpoint" not in caplog.text and "(cached; no conversion)" in caplog.text


def test_missing_base_stops_with_one_message(hub, monkeypatch, capsys):
    """`dinalrm score` in this process (the command line itself runs in the test above), on the simulated cache."""
    use_hub_cache(monkeypatch, hub["env"]["HF_HUB_CACHE"])
    monkeypatch.setenv("DINALRM_CACHE", str(hub["root"] / "converted-by-the-missing-base-test"))
    argv = ["score", "--prompt", PROMPT, *hub["images"], "--json", "--model", OFFICIAL_ID]
    assert dinalrm_main([*argv, "--base", "stabilityai/not-in-the-cache"]) == 1
    stderr = capsys.readouterr().err
    error = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "base model stabilityai/not-in-the-cache is not in the Hugging Face cache" in error[0]
    assert "hf auth login" in error[0] and "pass a local folder" in error[0]


def test_gated_base_says_to_accept_the_licence_and_log_in(monkeypatch, tmp_path):
    url = f"https://huggingface.co/{BASE_ID}/resolve/main/model_index.json"
    response = httpx.Response(401, request=httpx.Request("GET", url))

    def gated(*args, **kwargs):
        raise GatedRepoError(f"401 Client Error: access to model {BASE_ID} is restricted", response=response)

    monkeypatch.setattr("huggingface_hub.snapshot_download", gated)
    with pytest.raises(ModelUnavailableError) as error:
        modeling_dinalrm.resolve_repo(BASE_ID, ["model_index.json"], "base model")
    message = str(error.value)
    assert "\n" not in message and error.value.__cause__ is None
    assert f"accept its licence at https://huggingface.co/{BASE_ID}" in message and "hf auth login" in message


@pytest.mark.slow  # starts Python command lines (scripts, servers, README commands): 10-60 s on a shared 2-core machine
def test_pipeline_and_space_load_the_published_id_in_a_fresh_process(hub, expected, warm_python):
    """One new process (huggingface_hub reads the cache from its environment at import), two loads by the published id:
    `DiNaLRMPipeline.from_pretrained` with the installed class (no remote code) scores like the converted checkpoint;
    the Space's default model is the published id and, as an official checkpoint ships no code, the app loads it with
    the DiNa-LRM code deployed with it, every component in the dtype asked for (here `--dtype bfloat16`)."""
    code = f"""
import importlib.util, json, sys, torch, PIL.Image
from pipeline_dinalrm import DiNaLRMPipeline
pipe = DiNaLRMPipeline.from_pretrained({OFFICIAL_ID!r})
images = [PIL.Image.open(p) for p in {hub["images"]!r}]
out = pipe.compare({PROMPT!r}, images[0], images[1], generator=torch.Generator().manual_seed(0))
print(json.dumps({{"rewards": out.rewards.tolist(), "module": type(pipe.reward_model).__module__}}))
spec = importlib.util.spec_from_file_location("app", {str(REPO_ROOT / "space" / "app.py")!r})
app = sys.modules["app"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app)
args = app.parse_args(["--device", "cpu", "--dtype", "bfloat16"])
model = app.SharedModel(app.ModelSettings.from_env(args.model, args.device, args.dtype))
pipe = model.get()
dtypes = sorted({{str(p.dtype) for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()}})
print(json.dumps({{"status": model.status(), "dtypes": dtypes, "module": type(pipe).__module__}}))
"""
    env = {key: value for key, value in hub["env"].items() if not key.startswith("DINALRM_")}
    run = subprocess.run([warm_python, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    by_id, space = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    assert by_id["module"] == "modeling_dinalrm"  # the installed class, no remote code
    assert by_id["rewards"] == tolerances.close_to(expected[0])
    assert space["status"].startswith(f"Model: `{OFFICIAL_ID}` on cpu (torch.bfloat16)"), space["status"]
    assert space["dtypes"] == ["torch.bfloat16"] and space["module"] == "pipeline_dinalrm"


def test_one_dtype_for_every_component_whatever_the_repository_was_saved_in(hub, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    StableDiffusion3Pipeline.from_pretrained(hub["base"], dtype=torch.float16).save_pretrained(tmp_path / "fp16")
    weights = (tmp_path / "fp16" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert b"F16" in weights[:2000]  # the base really is saved in float16

    def dtypes(pipe) -> set[torch.dtype]:
        modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
        return {p.dtype for module in modules for p in module.parameters()}

    official = DiNaLRMPipeline.from_pretrained(
        hub["official"], base_model=tmp_path / "fp16", torch_dtype=torch.bfloat16
    )
    assert dtypes(official) == {torch.bfloat16}
    assert dtypes(DiNaLRMPipeline.from_pretrained(hub["official"], base_model=tmp_path / "fp16")) == {torch.float32}
    official.to(torch.float16).save_pretrained(tmp_path / "pipeline-fp16")
    assert dtypes(DiNaLRMPipeline.from_pretrained(tmp_path / "pipeline-fp16")) == {torch.float32}
    reloaded = DiNaLRMPipeline.from_pretrained(tmp_path / "pipeline-fp16", torch_dtype=torch.bfloat16)
    assert dtypes(reloaded) == {torch.bfloat16}


def readme_python_blocks() -> list[str]:
    return [block for page in documentation_pages() for block in code_blocks(page.read_text(), "python")[0]]


@pytest.mark.slow  # starts Python command lines (scripts, servers, README commands): 10-60 s on a shared 2-core machine
def test_readme_python_blocks_run_against_the_simulated_hub(hub, tmp_path, warm_python):
    """Every Python block of the README and the docs pages, in order in one new process (later blocks continue
    earlier ones), on the tiny stand-ins under the real ids. What a user without a GPU changes: cpu for cuda,
    float32 for bfloat16, and the tiny backbone's 32x32 latents for SD3.5's 128x128 in the ReFL sketch."""
    blocks = readme_python_blocks()
    assert len(blocks) >= 5 and all("org/dinalrm" not in block for block in blocks)
    calls = [call for block in blocks for call in re.findall(r"\.from_pretrained\((.*?)\)(?:\.|\n)", block, re.S)]
    assert len(calls) >= 4 and all("torch_dtype=" in call for call in calls), calls  # every load names its dtype
    script = "\n".join(blocks)
    for old, new in (('"cuda"', '"cpu"'), ("torch.bfloat16", "torch.float32"), ("1, 16, 128, 128", "1, 16, 32, 32")):
        script = script.replace(old, new)
    for name, colour in (("a.png", "red"), ("b.png", "blue"), ("c.png", "green")):
        PIL.Image.new("RGB", (64, 64), colour).save(tmp_path / name)
    # The LRM section loads the converter's output folder `lrm-sd15`: here, the official-lrm-tiny fixture converted
    # by `dinalrm convert lrm` in this process (what scripts/convert_official_lrm_checkpoint.py runs; that script's
    # own command line runs in a fresh interpreter in test_lrm_parity.py).
    lrm_fixture = json.loads((LRM_FIXTURE / "config.json").read_text())
    paths = lrm_fixture["paths"]
    arguments = ["--official_dir", str(LRM_FIXTURE / paths["checkpoint"]), "--base", str(LRM_FIXTURE / paths["base"])]
    arguments += ["--output_dir", str(tmp_path / "lrm-sd15"), *lrm_settings(lrm_fixture)]
    assert dinalrm_main(["convert", "lrm", *arguments]) == 0
    # The training page's example dataset, written by its shell block as a user would.
    dataset_block = code_blocks((REPO_ROOT / "docs" / "training.md").read_text(), "bash")[0][0]
    assert "my-pairs/train.jsonl" in dataset_block
    subprocess.run(["bash", "-c", dataset_block], cwd=tmp_path, check=True)
    (tmp_path / "readme.py").write_text(script + "\nprint('README OK', float(loss))\n")
    run = subprocess.run(
        [warm_python, "readme.py"], capture_output=True, text=True, env=hub["env"], cwd=tmp_path, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "README OK" in run.stdout
