"""Every official configuration the reference code can produce converts with score parity (official-tiny fixture).

Expected values come from the fixture's official outputs, or from the reference's formulas written out here
(github.com/HKUST-C4G/diffusion-rm: `SD3RewardModel._logistic`, `compute_loss`, the training/inference `add_noise`
switch, the LoRA `exclude_modules` rule and `RewardHead`'s `width // 4`).
"""

import json
import logging
import math
import shutil

import tolerances
import torch
from conftest import OFFICIAL_TINY, copy_official
from safetensors.torch import load_file, save_file

from modeling_dinalrm import DiNaLRMModel, convert_official_checkpoint


TRANSFORMER = OFFICIAL_TINY / "transformer"


def convert(folder) -> DiNaLRMModel:
    return convert_official_checkpoint(folder, TRANSFORMER, backbone_subfolder=None).eval()


def single(model: DiNaLRMModel, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.score_latents(
            x["x0"],
            x["encoder_hidden_states"],
            x["pooled_projections"],
            t=x["u_single"].item(),
            noise=x["noise_single"],
        )


def assert_close(actual, expected, scale=None) -> None:
    """Scores of a forward pass: FORWARD_RTOL relative to the largest |expected| (tests/tolerances.py)."""
    tolerances.assert_close(actual, expected.reshape(actual.shape), scale=scale)


def test_lora_with_frozen_backbone_is_the_head_alone(tmp_path, official_inputs, official_expected):
    """use_lora + freeze_backbone: the reference builds no LoRA (freezing wins) and saves only the head."""
    official = copy_official(tmp_path, use_lora=True, freeze_backbone=True)
    shutil.rmtree(official / "checkpoint" / "backbone_lora")
    model = convert(official)
    assert not model.lora_layers()
    assert_close(single(model, official_inputs), official_expected["score_single_nolora"])


def test_logistic_squashing_with_the_reference_initial_values_warns(
    tmp_path, official_inputs, official_expected, caplog
):
    official = copy_official(tmp_path, use_logistic=True)
    with caplog.at_level(logging.WARNING, logger="modeling_dinalrm"):
        model = convert(official)
    assert "eta3=0, eta4=0.15" in caplog.text
    raw = official_expected["score_single"].reshape(-1)
    expected = 4.0 / (1 + torch.exp(-(raw - 0.0) / (abs(0.15) + 1e-6))) - 2.0
    assert_close(single(model, official_inputs), expected)


def test_logistic_parameters_come_from_full_model(tmp_path, official_inputs, official_expected):
    official = copy_official(tmp_path, use_lora=False, freeze_backbone=False, use_logistic=True)
    lora = convert(copy_official(tmp_path / "lora"))
    lora.merge_lora()
    state = {**lora.state_dict(), "eta3": torch.tensor(2.9), "eta4": torch.tensor(-0.4)}
    torch.save(state, official / "checkpoint" / "full_model.pt")
    model = convert(official)
    raw = official_expected["score_single"].reshape(-1)
    expected = 4.0 / (1 + torch.exp(-(raw - 2.9) / (abs(-0.4) + 1e-6))) - 2.0
    assert_close(single(model, official_inputs), expected)


def test_thurstone_constant_and_bt_margin_losses(tmp_path, official_inputs, official_expected):
    chosen = official_expected["score_pair_chosen"].reshape(-1)
    rejected = official_expected["score_pair_rejected"].reshape(-1)
    t = official_inputs["u_pair"]
    # float32 losses of float32 scores against float64 formulas: the loss inherits the scores' rounding.
    scale = max(chosen.abs().max().item(), rejected.abs().max().item())
    diff = (chosen - rejected).tolist()

    model = convert(copy_official(tmp_path / "constant", model_type="thurstone-constant"))
    phi = [0.5 * (1 + math.erf(d / math.sqrt(0.5 + 0.5 + 1e-6) / math.sqrt(2))) for d in diff]
    expected = sum(1 - math.sqrt(p + 1e-6) for p in phi) / len(phi)
    assert_close(model.preference_loss(chosen, rejected, t), torch.tensor(expected), scale=scale)

    model = convert(copy_official(tmp_path / "margin", model_type="bt-margin"))
    expected = sum(math.log1p(math.exp(-(d - 1.0))) for d in diff) / len(diff)
    assert_close(model.preference_loss(chosen, rejected, t), torch.tensor(expected), scale=scale)


def test_clean_latents_at_the_level_timestep_when_add_noise_is_off(tmp_path, official_inputs):
    """training.add_noise: false: the reference feeds the clean latents with the snapped level's timestep."""
    official = copy_official(tmp_path)
    config = (official / "config.json").read_text().replace('"add_noise": true', '"add_noise": false')
    (official / "config.json").write_text(config)
    x = official_inputs
    with torch.no_grad():
        clean = convert(official).score_latents(
            x["x0"],
            x["encoder_hidden_states"],
            x["pooled_projections"],
            t=x["u_single"].item(),
            noise=x["noise_single"],
        )
        reference = convert(OFFICIAL_TINY).forward(
            x["x0"], x["u_single"].item(), x["encoder_hidden_states"], x["pooled_projections"]
        )
    assert_close(clean, reference.rewards)


def test_head_width_not_divisible_by_four_is_floored(tmp_path, official_inputs):
    """width 18 with 2 heads: the reference's adapters output 18 // 4 = 4 channels, its fusion takes 3 * 4."""
    official = copy_official(tmp_path)
    fixture = json.loads((OFFICIAL_TINY / "config.json").read_text())["model"]
    layers = {"visual": fixture["visual_head_idx"], "text": fixture["text_head_idx"]}
    source = DiNaLRMModel.from_backbone(
        TRANSFORMER, subfolder=None, num_layers=fixture["num_transformer_layers"], visual_layers=layers["visual"],
        text_layers=layers["text"], head_width=18, head_num_heads=2, head_use_proj_in=True,
    ).eval()  # fmt: skip
    num_visual = len(layers["visual"])
    generator = torch.Generator().manual_seed(0)
    head = {
        k.removeprefix("reward_head."): torch.randn(v.shape, generator=generator) * 0.3
        for k, v in source.state_dict().items()
        if k.startswith("reward_head.")
    }
    assert head["layer_adapters_visual.0.proj.weight"].shape == (4, 18)
    assert head["agg_visual.weight"].shape == (18, num_visual * 4)
    (official / "checkpoint" / "rm_head.pt").unlink()
    save_file(head, official / "checkpoint" / "rm_head.safetensors")
    config = json.loads((official / "config.json").read_text())
    config["model"].update(use_lora=False, freeze_backbone=True)
    config["model"]["reward_head"].update(width=18, num_attn_heads=2)
    (official / "config.json").write_text(json.dumps(config))
    model = convert(official)
    source.reward_head.load_state_dict(head)
    assert_close(single(model, official_inputs), single(source, official_inputs))
    assert load_file(official / "checkpoint" / "rm_head.safetensors").keys() == head.keys()


def test_training_puts_lora_where_the_reference_does():
    """The last kept block's text-stream projections get no LoRA unless a text layer reads that block."""
    last_excluded = {
        f"transformer_blocks.2.attn.{p}" for p in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    }
    unread = DiNaLRMModel.from_backbone(
        TRANSFORMER, subfolder=None, num_layers=3, visual_layers=[3], text_layers=[2], lora_rank=2
    )
    read = DiNaLRMModel.from_backbone(
        TRANSFORMER, subfolder=None, num_layers=3, visual_layers=[3], text_layers=[3], lora_rank=2
    )
    assert not last_excluded & set(unread.lora_layers())
    assert last_excluded <= set(read.lora_layers())
    assert set(read.lora_layers()) - set(unread.lora_layers()) == last_excluded
    assert "transformer_blocks.2.attn.to_q" in unread.lora_layers()
