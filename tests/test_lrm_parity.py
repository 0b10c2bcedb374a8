"""LRM parity with the official code (Kwai-Kolors/LPO `lrm/lrm_15`) on `tests/fixtures/official-lrm-tiny`.

The official checkpoint goes through the public converter script; a fresh process loads the converted reward model
with `AutoModel.from_pretrained(..., trust_remote_code=True)` and recomputes every LRM tensor of the fixture
(`tests/helpers/lrm_parity_run.py`). Sizes, seeds, prompts, labels, timesteps and settings are read from the
fixture's own files, so these tests pass unchanged on any fixture made the same way.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import tolerances
import torch
from conftest import OFFICIAL_LRM_TINY, REPO_ROOT, assert_close
from safetensors.torch import load_file


FIXTURE = OFFICIAL_LRM_TINY


def run_lrm_converter(python: str, official_dir, base, output_dir, *extra: str) -> subprocess.CompletedProcess:
    """Runs scripts/convert_official_lrm_checkpoint.py with the interpreter `python` as a user would (offline)."""
    command = [
        python,
        str(REPO_ROOT / "scripts" / "convert_official_lrm_checkpoint.py"),
        "--official_dir",
        str(official_dir),
        "--base",
        str(base),
        "--output_dir",
        str(output_dir),
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def lrm_settings(config: dict) -> list[str]:
    lrm = config["lrm"]
    flags = ["--guidance_scale", str(lrm["guidance_scale"])]
    if not lrm["multi_scale"]:
        flags.append("--no_multi_scale")
    if lrm["multi_scale_cfg"]:
        flags.append("--multi_scale_cfg")
    return flags


@pytest.fixture(scope="module")
def converted(tmp_path_factory, lrm_tiny_config, warm_python) -> Path:
    output = tmp_path_factory.mktemp("lrm") / "converted"
    paths = lrm_tiny_config["paths"]
    result = run_lrm_converter(
        warm_python, FIXTURE / paths["checkpoint"], FIXTURE / paths["base"], output, *lrm_settings(lrm_tiny_config)
    )
    assert result.returncode == 0, result.stderr
    return output


@pytest.fixture(scope="module")
def recomputed(converted, tmp_path_factory, warm_python) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("lrm-run") / "recomputed.safetensors"
    helper = REPO_ROOT / "tests" / "helpers" / "lrm_parity_run.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    # Run outside the repository, with no path to its files: only the converted folder's remote code can load.
    result = subprocess.run(
        [warm_python, str(helper), str(converted), str(FIXTURE), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(out.parent),
    )
    assert result.returncode == 0, result.stderr
    return load_file(out)


@pytest.mark.slow  # the converter's and the recomputation's command lines: ~30 s for the module
def test_converted_config_matches_the_fixture_settings(converted, lrm_tiny_config, lrm_tiny_inputs):
    config = json.loads((converted / "reward_model" / "config.json").read_text())
    lrm = lrm_tiny_config["lrm"]
    assert config["auto_map"]["AutoModel"] == "modeling_lrm.LRMModel"
    assert (converted / "reward_model" / "modeling_lrm.py").is_file()
    assert config["multi_scale_indices"] == lrm["multi_scale_indices"]
    assert config["guidance_scale"] == lrm["guidance_scale"]
    assert config["projection_dim"] == lrm["projection_dim"]
    state = load_file(converted / "reward_model" / "model.safetensors")
    assert tuple(state["visual_projection.weight"].shape) == (
        lrm["projection_dim"],
        lrm["visual_projection_in_features"],
    )
    assert not any(key.startswith("unet.up_blocks.") for key in state), "the up path must not be kept"
    # The unconditional VFE branch uses the ids of the empty prompt: BOS, then EOS / padding.
    ids = lrm_tiny_inputs["lrm/input_ids"]
    assert len(config["negative_input_ids"]) == ids.shape[1]
    assert config["negative_input_ids"][0] == ids[0, 0].item()


@pytest.mark.slow  # the converter's and the recomputation's command lines: ~30 s for the module
def test_vae_latents_noise_and_unet_inputs_match(recomputed, lrm_tiny_expected, lrm_tiny_inputs):
    num_images = 2 * lrm_tiny_inputs["lrm/input_ids"].shape[0]
    assert_close(recomputed["lrm/debug/vae_latents"], lrm_tiny_expected["lrm/debug/vae_latents"], "vae_latents")
    assert_close(recomputed["lrm/debug/noise"], lrm_tiny_expected["lrm/debug/noise"], "noise")
    unet_in = lrm_tiny_expected["lrm/debug/unet_noisy_latents_in"]
    assert_close(recomputed["lrm/debug/noisy_latents"], unet_in[:num_images], "noisy latents (cond half)")
    assert_close(recomputed["lrm/debug/noisy_latents"], unet_in[num_images:], "noisy latents (uncond half)")
    hidden = lrm_tiny_expected["lrm/debug/unet_encoder_hidden_states_in"]
    num_prompts = num_images // 2
    assert_close(recomputed["lrm/debug/encoder_hidden_states"], hidden[:num_prompts], "prompt hidden states")
    assert_close(
        recomputed["lrm/debug/negative_encoder_hidden_states"],
        hidden[num_images : num_images + num_prompts],
        "empty-prompt hidden states",
    )


@pytest.mark.slow  # the converter's and the recomputation's command lines: ~30 s for the module
def test_multiscale_features_with_vfe_match(recomputed, lrm_tiny_expected):
    assert_close(recomputed["lrm/debug/pooled_multiscale"], lrm_tiny_expected["lrm/debug/pooled_multiscale"], "pooled")


@pytest.mark.slow  # the converter's and the recomputation's command lines: ~30 s for the module
def test_image_and_text_features_match(recomputed, lrm_tiny_expected):
    for key in ("lrm/image_0_features", "lrm/image_1_features", "lrm/text_features"):
        assert_close(recomputed[key], lrm_tiny_expected[key], key)


@pytest.mark.slow  # the converter's and the recomputation's command lines: ~30 s for the module
def test_scores_match(recomputed, lrm_tiny_expected):
    for key in ("lrm/score_0", "lrm/score_1"):
        assert_close(recomputed[key], lrm_tiny_expected[key], key)


@pytest.mark.slow  # the converter's and the recomputation's command lines: ~30 s for the module
def test_pair_loss_with_ties_and_prompt_weights_matches(recomputed, lrm_tiny_expected):
    assert_close(recomputed["lrm/loss_pair"], lrm_tiny_expected["lrm/loss_pair"], "loss")


@pytest.mark.slow  # the converter's and the recomputation's command lines: ~30 s for the module
def test_gradients_per_parameter_group_match(recomputed, lrm_tiny_expected):
    # A UNet gradient entry sums over every latent position of every image (conditional and unconditional passes).
    images, _, height, width = lrm_tiny_expected["lrm/debug/vae_latents"].shape
    rtol = tolerances.accumulation_rtol(2 * images * height * width)
    for key in ("lrm/grad/logit_scale", "lrm/grad/visual_projection", "lrm/grad/text_projection"):
        assert_close(recomputed[key], lrm_tiny_expected[key], key, rtol)
    for group in ("visual_projection", "text_projection", "unet", "text_encoder"):
        assert recomputed[f"lrm/grad_count/{group}"].item() > 0
        assert_close(
            recomputed[f"lrm/grad_norm/{group}"],
            lrm_tiny_expected[f"lrm/grad_norm/{group}"],
            f"grad norm {group}",
            rtol,
        )


def test_pair_loss_formula_on_the_official_scores(lrm_tiny_expected, lrm_tiny_inputs, lrm_tiny_config):
    """The loss of the official scores themselves, without any model: the objective alone is the official one."""
    from modeling_lrm import LRMModel

    pairs = lrm_tiny_inputs["lrm/timestep_collated"].reshape(-1, 2)
    loss = LRMModel.preference_loss(
        lrm_tiny_expected["lrm/score_0"],
        lrm_tiny_expected["lrm/score_1"],
        lrm_tiny_inputs["lrm/label_0"],
        lrm_tiny_inputs["lrm/label_1"],
        lrm_tiny_inputs["lrm/num_example_per_prompt"],
        pairs[:, 0],
        pairs[:, 1],
        aux_loss_coeff=lrm_tiny_config["lrm"]["aux_loss_coeff"],
    )
    assert_close(loss.reshape(1), lrm_tiny_expected["lrm/loss_pair"], "loss from official scores")
