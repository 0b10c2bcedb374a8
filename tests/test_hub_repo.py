"""The Hub repository: scripts/build_hub_repo.py output, its layout, and loading it in a fresh Python process."""

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import tolerances
import torch
from safetensors.torch import save_file

import dinalrm.hub
import pipeline_dinalrm
from dinalrm.testing import (
    get_tiny_dinalrm_pipeline,
    get_tiny_dinalrm_reward_model,
    save_tiny_sd3_pipeline,
    torch_threads,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_hub_repo.py"
PROMPT = "a photo of a red cat on a table"
EXPECTED_FILES = {
    "README.md",
    "model_index.json",
    "pipeline_dinalrm.py",
    "reward_model/config.json",
    "reward_model/model.safetensors",
    "reward_model/modeling_dinalrm.py",
    "scheduler/scheduler_config.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    *(
        f"{encoder}/{name}"
        for encoder in ("text_encoder", "text_encoder_2", "text_encoder_3")
        for name in ("config.json", "model.safetensors")
    ),
    *(
        f"{tokenizer}/{name}"
        for tokenizer in ("tokenizer", "tokenizer_2", "tokenizer_3")
        for name in ("tokenizer.json", "tokenizer_config.json")
    ),
}
EXPECTED_MODEL_INDEX = {
    "_class_name": ["pipeline_dinalrm", "DiNaLRMPipeline"],
    "reward_model": ["modeling_dinalrm", "DiNaLRMModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5Tokenizer"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}

# Runs in a new interpreter, from a folder outside the repository, with the repository's modules made unimportable:
# everything must come from the saved folder. Prints one JSON line of results.
FRESH_PROCESS_SCRIPT = r"""
import importlib.abc, json, os, sys

class BlockRepositoryModules(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"dinalrm", "modeling_dinalrm", "pipeline_dinalrm"}:
            raise ImportError(f"{name} must come from the saved folder, not from the repository")

blocker = BlockRepositoryModules()
sys.meta_path.insert(0, blocker)

import PIL.Image
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
from transformers import AutoModel

folder, pipeline_file, inputs_file, prompt, *image_files = sys.argv[1:]
images = [PIL.Image.open(path) for path in image_files]

def rewards(pipe):
    return pipe(prompt, images=images, generator=torch.Generator().manual_seed(0)).rewards.tolist()

results = {}
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
results["diffusion_pipeline"] = rewards(pipe)
results["modules"] = [type(pipe).__module__, type(pipe.reward_model).__module__]

reward_model = AutoModel.from_pretrained(f"{folder}/reward_model", trust_remote_code=True)
x = load_file(inputs_file)
results["auto_model"] = reward_model.score_latents(
    x["latents"], x["prompt_embeds"], x["pooled_prompt_embeds"], t=[0.2, 0.5, 0.7],
    generator=torch.Generator().manual_seed(0),
).tolist()

# The installed package (`pip install -e .`): DiNaLRMPipeline.from_pretrained loads with its classes, not the folder's.
sys.meta_path.remove(blocker)
import pipeline_dinalrm as installed
assert os.path.samefile(installed.__file__, pipeline_file), (installed.__file__, pipeline_file)  # this repository's
pipe = installed.DiNaLRMPipeline.from_pretrained(folder)
results["pipeline_class"] = rewards(pipe)
results["installed_modules"] = [type(pipe).__module__, type(pipe.reward_model).__module__]

example = [line.strip()[4:] for line in installed.EXAMPLE_DOC_STRING.splitlines() if line.strip().startswith(">>> ")]
exec("\n".join(example).replace("liuhuohuo/DiNa-LRM-SD35M-12layers", folder), {})
results["example_ran"] = True
print(json.dumps(results))
"""


def clean_env(tmp_path: Path) -> dict[str, str]:
    """No repository on PYTHONPATH, offline, private module cache, one torch thread (tiny models)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}


def load_build_script():
    spec = importlib.util.spec_from_file_location("build_hub_repo", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> SimpleNamespace:
    """A saved tiny SD3 pipeline WITHOUT its transformer (it must never be read) and a saved tiny reward model."""
    root = tmp_path_factory.mktemp("hub_sources")
    base = Path(save_tiny_sd3_pipeline(root / "base"))
    shutil.rmtree(base / "transformer")
    get_tiny_dinalrm_reward_model().save_pretrained(root / "reward_model")
    return SimpleNamespace(root=root, base=base, reward_model=root / "reward_model")


@pytest.fixture(scope="module")
def hub_repo(sources) -> Path:
    """The script's output (run in-process through its `main`; the fresh-process test loads it)."""
    output = sources.root / "hub"
    load_build_script().main(
        ["--reward_model", str(sources.reward_model), "--base", str(sources.base), "--output_dir", str(output)]
    )
    return output


def test_build_writes_the_hub_layout(hub_repo):
    files = {path.relative_to(hub_repo).as_posix() for path in hub_repo.rglob("*") if path.is_file()}
    assert files == EXPECTED_FILES
    model_index = json.loads((hub_repo / "model_index.json").read_text())
    model_index.pop("_diffusers_version")
    assert model_index == EXPECTED_MODEL_INDEX
    assert (hub_repo / "pipeline_dinalrm.py").read_bytes() == (REPO_ROOT / "pipeline_dinalrm.py").read_bytes()
    modeling = (hub_repo / "reward_model" / "modeling_dinalrm.py").read_bytes()
    assert modeling == (REPO_ROOT / "modeling_dinalrm.py").read_bytes()
    auto_map = json.loads((hub_repo / "reward_model" / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "modeling_dinalrm.DiNaLRMConfig", "AutoModel": "modeling_dinalrm.DiNaLRMModel"}


def test_model_card(hub_repo):
    card = (hub_repo / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "license: other" in card
    for expected in (
        "Stability AI Community License",
        "arXiv:2602.11146",
        "`t = 0.4`",
        "[0.2, 0.5, 0.7]",
        "(raw + 10) / 10",
        'DiffusionPipeline.from_pretrained("hub", trust_remote_code=True)',
        "dinalrm score --model hub",
    ):
        assert expected in card, expected
    # The base was a local folder: the card names it without the build machine's path or a broken Hub link.
    assert str(hub_repo.parent) not in card and "huggingface.co//" not in card
    assert "the local pipeline `base`" in card


@pytest.mark.slow  # starts a Python process: 5-20 s on a shared 2-core machine
def test_fresh_process_loads_give_the_in_memory_rewards(hub_repo, tmp_path, warm_python):
    rng = np.random.default_rng(0)
    arrays = {
        "rgb.png": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        "rgba.png": rng.integers(0, 256, (32, 32, 4), dtype=np.uint8),
        "grey.png": rng.integers(0, 256, (48, 32), dtype=np.uint8),
    }
    image_files = []
    for name, array in arrays.items():
        PIL.Image.fromarray(array).save(tmp_path / name)
        image_files.append(str(tmp_path / name))

    pipe = get_tiny_dinalrm_pipeline()
    images = [PIL.Image.open(path) for path in image_files]
    expected = pipe(PROMPT, images=images, generator=torch.Generator().manual_seed(0)).rewards
    latents = pipe.encode_images(images[:2])
    prompt_embeds, pooled = pipe.encode_prompt([PROMPT, "a dog"])
    inputs = {"latents": latents, "prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
    save_file(inputs, tmp_path / "inputs.safetensors")
    expected_model = pipe.reward_model.score_latents(
        **inputs, t=[0.2, 0.5, 0.7], generator=torch.Generator().manual_seed(0)
    )

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    (workdir / "fresh.py").write_text(FRESH_PROCESS_SCRIPT)
    command = [
        warm_python,
        "fresh.py",
        str(hub_repo),
        str(REPO_ROOT / "pipeline_dinalrm.py"),
        str(tmp_path / "inputs.safetensors"),
        PROMPT,
        *image_files,
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir, env=clean_env(tmp_path))
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.strip().splitlines()[-1])

    loaded_from = [f"diffusers_modules.local.{name}" for name in ("pipeline_dinalrm", "modeling_dinalrm")]
    assert results["modules"] == loaded_from
    assert results["installed_modules"] == ["pipeline_dinalrm", "modeling_dinalrm"]
    for key in ("diffusion_pipeline", "pipeline_class"):
        tolerances.assert_close(torch.tensor(results[key]), expected, msg=key)
    tolerances.assert_close(torch.tensor(results["auto_model"]), expected_model)
    assert results["example_ran"]


def test_build_refuses_a_non_empty_output_dir(hub_repo, sources):
    build = load_build_script()
    with pytest.raises(SystemExit, match="not empty; pass --overwrite"):
        build.main(
            ["--reward_model", str(sources.reward_model), "--base", str(sources.base), "--output_dir", str(hub_repo)]
        )
    with pytest.raises(SystemExit):
        build.main(["--reward_model", "x", "--base", "y", "--output_dir", "z", "--push_to_hub"])


def test_push_to_hub_uploads_the_built_folder_and_overwrite_replaces_it(sources, tmp_path, monkeypatch):
    build = load_build_script()
    calls = []
    monkeypatch.setattr(
        dinalrm.hub,
        "create_repo",
        lambda repo_id, **kwargs: calls.append(("create", repo_id, kwargs)) or SimpleNamespace(repo_id=repo_id),
    )
    monkeypatch.setattr(dinalrm.hub, "upload_folder", lambda **kwargs: calls.append(("upload", kwargs)))
    output = tmp_path / "pushed"
    common = ["--reward_model", str(sources.reward_model), "--base", str(sources.base), "--output_dir", str(output)]
    build.main([*common, "--push_to_hub", "--hub_model_id", "me/tiny-dinalrm", "--private"])
    assert calls[0] == ("create", "me/tiny-dinalrm", {"exist_ok": True, "private": True})
    assert calls[1][0] == "upload"
    assert calls[1][1]["repo_id"] == "me/tiny-dinalrm" and calls[1][1]["folder_path"] == str(output)
    assert "me/tiny-dinalrm" in (output / "README.md").read_text()

    (output / "stale.txt").write_text("left over")
    build.main([*common, "--overwrite"])
    assert not (output / "stale.txt").exists() and (output / "model_index.json").is_file()
    assert len(calls) == 2


def test_pipeline_save_pretrained_pushes_the_hub_layout(tmp_path, monkeypatch):
    uploads = []
    monkeypatch.setattr(pipeline_dinalrm, "create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(
        pipeline_dinalrm.DiNaLRMPipeline,
        "_upload_folder",
        lambda self, folder, repo_id, **kwargs: uploads.append((Path(folder), repo_id)),
    )
    pipe = get_tiny_dinalrm_pipeline()
    pipe.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="me/saved")
    assert uploads == [(tmp_path / "saved", "me/saved")]
    assert (tmp_path / "saved" / "pipeline_dinalrm.py").is_file()
    model_index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert model_index["_class_name"] == EXPECTED_MODEL_INDEX["_class_name"]


def test_cards_carry_licence_base_model_datasets_and_model_index(sources, tmp_path):
    """Both cards (the Hub repository's and the trainer's) in the Hub's metadata format, read back by huggingface_hub."""
    from huggingface_hub import ModelCard

    import train_dinalrm

    results = {"DiNa-LRM [x] t=0.4": {"hpdv3": {"accuracy": 0.7504}, "hpdv2": {"accuracy": 0.8213}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    output = tmp_path / "hub"
    argv = ["--reward_model", str(sources.reward_model), "--base", str(sources.base), "--output_dir", str(output)]
    argv += ["--datasets", "MizzenAI/HPDv3", "--eval_results", str(tmp_path / "results.json")]
    load_build_script().main(argv)
    data = ModelCard.load(output / "README.md").data
    assert (data.license, data.license_name, data.datasets) == (
        "other",
        "stabilityai-ai-community",
        ["MizzenAI/HPDv3"],
    )
    found = {(r.dataset_type, r.dataset_split, r.metric_type, r.metric_value) for r in data.eval_results}
    assert found == {("MizzenAI/HPDv3", "test", "accuracy", 0.7504), ("ymhao/HPDv2", "test", "accuracy", 0.8213)}
    assert "pip install dinalrm" not in (output / "README.md").read_text()

    args = train_dinalrm.parse_args(
        [
            "--pretrained_model_name_or_path",
            "stabilityai/stable-diffusion-3.5-medium",
            "--dataset_name",
            "MizzenAI/HPDv3",
        ]
        + ["--validation_split", "test", "--validation_t", "0.2,0.4", "--output_dir", str(tmp_path / "run")]
    )
    validation = {"val/accuracy_t0.2": 0.61, "val/accuracy_t0.4": 0.75, "val/accuracy_ensemble": 0.76, "val/pairs": 9}
    train_dinalrm.save_model_card("me/dinalrm", args, str(tmp_path), validation, {})
    data = ModelCard.load(tmp_path / "README.md").data
    assert data.base_model == "stabilityai/stable-diffusion-3.5-medium" and data.license == "other"
    assert data.datasets == ["MizzenAI/HPDv3"] and data.model_name == "me/dinalrm"
    found = {(r.metric_name, r.metric_value, r.dataset_type, r.dataset_split) for r in data.eval_results}
    assert found == {
        ("Pairwise accuracy (t=0.2)", 0.61, "MizzenAI/HPDv3", "test"),
        ("Pairwise accuracy (t=0.4)", 0.75, "MizzenAI/HPDv3", "test"),
        ("Pairwise accuracy (ensemble=0.2,0.4)", 0.76, "MizzenAI/HPDv3", "test"),
    }
