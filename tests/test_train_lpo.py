"""Smoke tests of `examples/lpo/train_lpo.py` on the tiny SD1.5-topology base of `tests/fixtures/official-lrm-tiny`
and on the tiny world's SD3 generator with its DiNa-LRM: each trains, writes checkpoints and the LoRA, and a resumed
run ends with exactly the weights of an uninterrupted one.

Each runs at half the native side (fewer tokens: the resume is exact at any size), with the fewest candidates that
still form a pair (2), on one torch thread; the run "interrupted" after step 1 is the uninterrupted run's
checkpoint-1 copied into a fresh output folder, which is what a run stopped after its first checkpoint leaves.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL_LRM_TINY, OFFICIAL_TINY, REPO_ROOT, use_hub_cache
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
from safetensors.torch import load_file

from dinalrm.testing import add_to_hub_cache, save_tiny_sd3_base


FIXTURE = OFFICIAL_LRM_TINY
SCRIPT = REPO_ROOT / "examples" / "lpo" / "train_lpo.py"
TINY_SD3 = REPO_ROOT / "assets" / "tiny-sd3"
TINY_DINALRM = REPO_ROOT / "assets" / "dinalrm-tiny"

pytestmark = pytest.mark.usefixtures("one_thread")


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lpo")
    converter = load_module("convert_lrm_for_lpo", REPO_ROOT / "scripts" / "convert_official_lrm_checkpoint.py")
    converter.convert(str(FIXTURE / "checkpoint"), str(FIXTURE / "base")).save_pretrained(root / "lrm")
    (root / "prompts.json").write_text(json.dumps([{"caption": p} for p in ["a cat", "a red car", "x", "a dog"]]))
    return {"root": root, "script": load_module("train_lpo", SCRIPT)}


def run(setup, output_dir: str, *flags: str) -> None:
    script = setup["script"]
    root = setup["root"]
    args = script.parse_args(
        [
            "--pretrained_model_name_or_path", str(FIXTURE / "base"),
            "--reward_model", str(root / "lrm"),
            "--prompts_file", str(root / "prompts.json"),
            "--output_dir", str(root / output_dir),
            "--num_inference_steps", "4",
            "--divert_end_step", "1",  # one LPO step per round: 2 prompts -> at most 2 pairs -> one optimizer step
            "--num_candidates", "2",
            "--resolution", "16",  # latents of 8x8, half the UNet's native side
            "--sample_batch_size", "2",
            "--train_batch_size", "2",
            "--threshold_min", "0",
            "--threshold_max", "0",
            "--checkpointing_steps", "1",
            "--report_to", "none",
            "--use_ema",
            "--ema_decay", "0.5",
            *flags,
        ]
    )  # fmt: skip
    script.main(args)


def interrupt_after_step_one(root: Path) -> Path:
    """`root/interrupted`: what a run stopped after its first checkpoint leaves, taken from `root/straight`."""
    first = root / "interrupted" / "checkpoint-1"
    shutil.copytree(root / "straight" / "checkpoint-1", first)
    return first


def assert_resumed_run_matches_the_straight_one(root: Path, first: Path, prefix: str) -> None:
    """The LoRA of `root/interrupted` (resumed from `first`) equals `root/straight`'s bit for bit, and differs from
    `first`'s (the resumed step trained)."""
    resumed = load_file(root / "interrupted" / "pytorch_lora_weights.safetensors")
    straight = load_file(root / "straight" / "pytorch_lora_weights.safetensors")
    after_one = load_file(first / "pytorch_lora_weights.safetensors")
    assert resumed.keys() == straight.keys() and all(key.startswith(prefix) for key in resumed)
    for key in resumed:
        # Exact: a resumed run replays the same steps from bit-identical state (the code's promise).
        assert torch.equal(resumed[key], straight[key]), key
    assert any(not torch.equal(resumed[key], after_one[key]) for key in resumed), "the second step changed nothing"


@pytest.mark.slow  # three short LPO runs (straight, interrupted, resumed): ~9 s, outside the quick tier
def test_train_lpo_checkpoints_and_resumes_exactly(setup, caplog):
    root = setup["root"]
    run(setup, "straight", "--max_train_steps", "2")
    first = interrupt_after_step_one(root)
    assert json.loads((first / "training_state.json").read_text()) == {"global_step": 1, "next_round": 1}
    assert (first / "pytorch_lora_weights.safetensors").is_file() and (first / "ema").is_dir()
    with caplog.at_level("INFO"):
        run(setup, "interrupted", "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    assert f"Resuming from checkpoint {first}" in caplog.text
    assert (root / "interrupted" / "checkpoint-2").is_dir()

    assert_resumed_run_matches_the_straight_one(root, first, "unet.")

    pipe = StableDiffusionPipeline.from_pretrained(FIXTURE / "base", safety_checker=None)
    pipe.load_lora_weights(root / "interrupted")
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


@pytest.mark.parametrize(
    "flags, problem",
    [
        (["--num_candidates", "1"], "--num_candidates must be at least 2"),
        (["--min_confidence", "0.4"], "--min_confidence is a probability"),
        (["--noise_level", "0"], "--noise_level must be positive"),
    ],
)
def test_train_lpo_refuses_settings_that_cannot_form_pairs(setup, flags, problem, capsys):
    with pytest.raises(SystemExit):
        setup["script"].parse_args(
            ["--pretrained_model_name_or_path", "x", "--reward_model", "y", "--prompts_file", "z"]
            + ["--output_dir", "o", *flags]
        )
    assert problem in capsys.readouterr().err


def test_train_lpo_flow_path_on_the_tiny_world_checkpoints_and_resumes_exactly(setup, tmp_path):
    """The SD3 path (detected from model_index.json) on the tiny world's generator and DiNa-LRM: 2 optimizer steps,
    a resumed run ends with exactly the weights of an uninterrupted one, and the LoRA loads into the SD3 pipeline."""
    script = setup["script"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a large blue circle at the bottom on a black background\na small red square on a white background\n"
    )

    def flow_run(output_dir: str, *flags: str) -> None:
        args = script.parse_args(
            [
                "--pretrained_model_name_or_path", str(TINY_SD3),
                "--reward_model", str(TINY_DINALRM),
                "--prompts_file", str(prompts),
                "--output_dir", str(tmp_path / output_dir),
                "--max_sequence_length", "16",
                "--num_inference_steps", "3",
                "--divert_end_step", "1",  # one LPO step per round: 2 prompts -> at most 2 pairs -> one step
                "--num_candidates", "2",
                "--resolution", "32",  # latents of 8x8, half the transformer's native side
                "--sample_batch_size", "2",
                "--train_batch_size", "2",
                "--min_confidence", "0.5",  # keep every pair with a strictly better best
                "--checkpointing_steps", "1",
                "--report_to", "none",
                *flags,
            ]
        )  # fmt: skip
        assert script.generator_family(args) == "sd3"
        script.main(args)

    flow_run("straight", "--max_train_steps", "2")
    first = interrupt_after_step_one(tmp_path)
    assert json.loads((first / "training_state.json").read_text()) == {"global_step": 1, "next_round": 1}
    flow_run("interrupted", "--max_train_steps", "2", "--resume_from_checkpoint", "latest")

    assert_resumed_run_matches_the_straight_one(tmp_path, first, "transformer.")

    pipe = StableDiffusion3Pipeline.from_pretrained(TINY_SD3)
    pipe.load_lora_weights(tmp_path / "interrupted", weight_name="pytorch_lora_weights.safetensors")
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())


def test_train_lpo_flow_path_loads_the_published_ids_from_the_hub_cache(setup, tmp_path, monkeypatch):
    """The README's SD3.5-M command line by its real Hub ids, offline: the official-format DiNa-LRM checkpoint and a
    tiny SD3 pipeline stored under `liuhuohuo/DiNa-LRM-SD35M-12layers` and `stabilityai/stable-diffusion-3.5-medium`
    in a simulated cache; one optimizer step, and the LoRA it writes loads into the SD3 pipeline. The script's `main`
    runs in this process, with the cache and `HF_HOME` set where huggingface_hub reads them at call time (a fresh
    interpreter would read them from the environment)."""
    cache = tmp_path / "cache"
    add_to_hub_cache(cache, "liuhuohuo/DiNa-LRM-SD35M-12layers", OFFICIAL_TINY)
    base = add_to_hub_cache(
        cache,
        "stabilityai/stable-diffusion-3.5-medium",
        save_tiny_sd3_base(tmp_path / "base", OFFICIAL_TINY / "transformer"),
    )
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    use_hub_cache(monkeypatch, cache, home=tmp_path / "hf_home")
    monkeypatch.delenv("DINALRM_CACHE", raising=False)  # the conversion goes below HF_HOME
    monkeypatch.chdir(tmp_path)
    args = setup["script"].parse_args(
        [
            "--pretrained_model_name_or_path", "stabilityai/stable-diffusion-3.5-medium",
            "--reward_model", "liuhuohuo/DiNa-LRM-SD35M-12layers",
            "--prompts_file", str(tmp_path / "prompts.txt"), "--output_dir", str(tmp_path / "out"),
            "--max_sequence_length", "16", "--num_inference_steps", "2", "--divert_end_step", "1",
            "--sample_batch_size", "2", "--train_batch_size", "2", "--min_confidence", "0.5",
            "--num_candidates", "2", "--resolution", "32", "--max_train_steps", "1", "--report_to", "none",
        ]
    )  # fmt: skip
    setup["script"].main(args)
    assert (tmp_path / "hf_home" / "dinalrm" / "converted").is_dir()  # the official checkpoint, converted once
    pipe = StableDiffusion3Pipeline.from_pretrained(base)
    pipe.load_lora_weights(tmp_path / "out", weight_name="pytorch_lora_weights.safetensors")
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())
