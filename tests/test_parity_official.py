"""Numerical parity with the official DiNa-LRM code on the official-tiny fixture, through the converter script.


Every size (batches, levels, pairs), noise level, seed and setting is read from the fixture (`OFFICIAL_TINY`, which
`DINALRM_OFFICIAL_TINY` can point at another fixture made the same way); tolerances follow tests/tolerances.py.
"""

import json
import math

import pytest
import tolerances
import torch
from conftest import OFFICIAL_TINY, copy_official, run_converter

from modeling_dinalrm import DiNaLRMModel


def load(path) -> DiNaLRMModel:
    return DiNaLRMModel.from_pretrained(path).eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = tolerances.FORWARD_RTOL, scale=None):
    """A forward pass of the tiny model: FORWARD_RTOL relative to the largest |expected| entry."""
    tolerances.assert_close(actual, expected.reshape(actual.shape), rtol=rtol, scale=scale)


def ensemble(x: dict) -> list[float]:
    return x["u_ens"].tolist()


def single_level(x: dict) -> float:
    return x["u_single"].item()


def gradient_accumulation_length(x: dict) -> int:
    """How many float32 terms one gradient entry sums: every token of both members of every loss pair."""
    transformer = json.loads((OFFICIAL_TINY / "transformer" / "config.json").read_text())
    patch = transformer["patch_size"]
    image_tokens = math.prod(size // patch for size in x["x0"].shape[-2:])
    text_tokens = x["encoder_hidden_states"].shape[1]
    return 2 * len(x["pair_chosen_idx"]) * (image_tokens + text_tokens)


def single_scores(model: DiNaLRMModel, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        square = model.score_latents(
            x["x0"], x["encoder_hidden_states"], x["pooled_projections"], t=single_level(x), noise=x["noise_single"]
        )
        non_square = model.score_latents(
            x["x0_ns"],
            x["encoder_hidden_states_ns"],
            x["pooled_projections_ns"],
            t=single_level(x),
            noise=x["noise_single_ns"],
        )
    return square, non_square


def pair_scores(model: DiNaLRMModel, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen/rejected rewards of the fixture's loss pairs: one prompt and one noise per pair (official training)."""
    chosen, rejected = x["pair_chosen_idx"], x["pair_rejected_idx"]
    prompt, pooled, noise = (
        x["encoder_hidden_states"][chosen],
        x["pooled_projections"][chosen],
        x["noise_single"][chosen],
    )
    s_chosen = model.score_latents(x["x0"][chosen], prompt, pooled, t=x["u_pair"], noise=noise)
    s_rejected = model.score_latents(x["x0"][rejected], prompt, pooled, t=x["u_pair"], noise=noise)
    return s_chosen, s_rejected


def test_noise_level_lookup_is_exact(converted_dirs, official_inputs, official_expected):
    model, x = load(converted_dirs["merged"]), official_inputs
    # Exact: the table is the scheduler's own float32 formula (the fixture README asks for exact lookups).
    assert torch.equal(model._sigma_table, official_expected["scheduler_sigmas"])
    assert torch.equal(model._timestep_table, official_expected["scheduler_timesteps"])
    # A table lookup: the same float32 entries, so exact.
    for key, u, batch in (
        ("single", single_level(x), x["x0"].shape[0]),
        ("single_ns", single_level(x), x["x0_ns"].shape[0]),
        ("pair", x["u_pair"], len(x["u_pair"])),
    ):
        sigmas, timesteps = model.snap_noise_level(u, batch)
        assert torch.equal(sigmas, official_expected[f"sigma_{key}"])
        assert torch.equal(timesteps, official_expected[f"timestep_{key}"])
    for level, u in enumerate(ensemble(x)):
        sigmas, timesteps = model.snap_noise_level(u, x["x0"].shape[0])
        assert torch.equal(sigmas, official_expected["sigma_ens"][level])
        assert torch.equal(timesteps, official_expected["timestep_ens"][level])


@pytest.mark.parametrize("form", ["merged", "adapter"])
def test_scores_match_official(form, converted_dirs, official_inputs, official_expected):
    model, x = load(converted_dirs[form]), official_inputs
    square, non_square = single_scores(model, x)
    with torch.no_grad():
        ens = model.score_latents(
            x["x0"], x["encoder_hidden_states"], x["pooled_projections"], t=ensemble(x), noise=list(x["noise_ens"])
        )
        ens_shared = model.score_latents(
            x["x0"], x["encoder_hidden_states"], x["pooled_projections"], t=ensemble(x), noise=x["noise_single"]
        )
        ens_shared_ns = model.score_latents(
            x["x0_ns"],
            x["encoder_hidden_states_ns"],
            x["pooled_projections_ns"],
            t=ensemble(x),
            noise=x["noise_single_ns"],
        )
        chosen, rejected = pair_scores(model, x)
    assert_close(square, official_expected["score_single"])
    assert_close(non_square, official_expected["score_single_ns"])
    assert_close(ens, official_expected["score_ens"])
    assert_close(ens_shared, official_expected["score_ens_shared"])
    assert_close(ens_shared_ns, official_expected["score_ens_shared_ns"])
    assert_close(chosen, official_expected["score_pair_chosen"])
    assert_close(rejected, official_expected["score_pair_rejected"])


def test_forward_on_noisy_latents_and_debug_features_match(converted_dirs, official_inputs, official_expected):
    model, x = load(converted_dirs["merged"]), official_inputs
    sigma = official_expected["sigma_single"].view(-1, 1, 1, 1)
    noisy = (1 - sigma) * x["x0"] + sigma * x["noise_single"]
    with torch.no_grad():
        out = model(noisy, single_level(x), x["encoder_hidden_states"], x["pooled_projections"])
        temb, _, text = model.backbone(noisy, x["encoder_hidden_states"], x["pooled_projections"], out.timesteps)
    assert out.rewards.shape == (x["x0"].shape[0],)
    assert_close(out.rewards, official_expected["score_single"])
    assert_close(temb, official_expected["debug/temb_single"])
    assert_close(torch.stack(text), official_expected["debug/text_feats_single"])


def test_seeded_generator_reproduces_the_official_noise_draw(converted_dirs, official_inputs, official_expected):
    """The official call draws torch.randn_like after torch.manual_seed(11); a generator seeded 11 draws the same."""
    model, x = load(converted_dirs["merged"]), official_inputs
    generator = torch.Generator().manual_seed(int(x["seed_noise_single"]))
    with torch.no_grad():
        scores = model.score_latents(
            x["x0"], x["encoder_hidden_states"], x["pooled_projections"], t=single_level(x), generator=generator
        )
    assert_close(scores, official_expected["score_single"])


def test_thurstone_loss_matches(converted_dirs, official_inputs, official_expected):
    model, x = load(converted_dirs["adapter"]), official_inputs
    with torch.no_grad():
        chosen, rejected = pair_scores(model, x)
        loss = model.preference_loss(chosen, rejected, x["u_pair"])
        per_pair = torch.stack(
            [model.preference_loss(chosen[i : i + 1], rejected[i : i + 1], x["u_pair"][i]) for i in range(len(chosen))]
        )
    # The loss is an O(1)-Lipschitz function of the scores, so it inherits their error: FORWARD_RTOL x |score|.
    score_scale = max(
        official_expected["score_pair_chosen"].abs().max(), official_expected["score_pair_rejected"].abs().max()
    )
    assert_close(loss, official_expected["loss_thurstone"], scale=score_scale.item())
    assert_close(per_pair, official_expected["loss_thurstone_per_pair"], scale=score_scale.item())


def test_thurstone_gradients_match(converted_dirs, official_inputs, official_expected):
    """Gradients of the mean loss over the fixture's pairs, per tensor and in total (head and LoRA)."""
    model, x = load(converted_dirs["adapter"]), official_inputs
    model.train()
    chosen, rejected = pair_scores(model, x)
    model.preference_loss(chosen, rejected, x["u_pair"]).backward()
    head_norms, lora_norms = {}, {}
    for name, param in model.named_parameters():
        if name.startswith("reward_head."):
            head_norms[name.removeprefix("reward_head.")] = param.grad.norm()
        elif ".lora_" in name:
            official = "base_model.model." + name.removeprefix("backbone.").replace(".default.weight", ".weight")
            lora_norms[official] = param.grad.norm()
        else:
            assert param.grad is None or not param.grad.any(), f"frozen base weight {name} received a gradient"
    expected_head = {
        k.removeprefix("grad_norm/rm_head/"): v
        for k, v in official_expected.items()
        if k.startswith("grad_norm/rm_head/")
    }
    expected_lora = {
        k.removeprefix("grad_norm/lora/"): v for k, v in official_expected.items() if k.startswith("grad_norm/lora/")
    }
    assert head_norms.keys() == expected_head.keys() and lora_norms.keys() == expected_lora.keys()
    # Each gradient entry is a float32 sum over every token of every pair member; its round-off is relative to the
    # largest gradient of its group (the round-off-only gradients, exact zeros stored as ~1e-8, are held to that too).
    rtol = tolerances.accumulation_rtol(gradient_accumulation_length(x))
    for norms, expected in ((head_norms, expected_head), (lora_norms, expected_lora)):
        scale = max(v.item() for v in expected.values())
        for name, norm in norms.items():
            assert_close(norm.reshape(1), expected[name], rtol=rtol, scale=scale)
    total = lambda norms: torch.stack(list(norms.values())).square().sum().sqrt()  # noqa: E731
    assert_close(total(head_norms).reshape(1), official_expected["loss_grad_norm_head"], rtol=rtol)
    assert_close(total(lora_norms).reshape(1), official_expected["loss_grad_norm_lora"], rtol=rtol)


def test_head_only_checkpoint_matches_lora_disabled_scores(tmp_path, official_inputs, official_expected):
    """Official variant use_lora=false + freeze_backbone=true: base blocks + head = the LoRA-disabled scores."""
    official = copy_official(tmp_path, use_lora=False, freeze_backbone=True)
    result = run_converter(official, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    square, non_square = single_scores(load(tmp_path / "out"), official_inputs)
    assert_close(square, official_expected["score_single_nolora"])
    assert_close(non_square, official_expected["score_single_ns_nolora"])


def test_full_model_checkpoint_converts(tmp_path, converted_dirs, official_inputs, official_expected):
    """Official variant use_lora=false + full checkpoint/full_model.pt (a torch.save'd state dict)."""
    official = copy_official(tmp_path, use_lora=False, freeze_backbone=False)
    state = load(converted_dirs["merged"]).state_dict()
    torch.save(state, official / "checkpoint" / "full_model.pt")
    result = run_converter(official, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    square, _ = single_scores(load(tmp_path / "out"), official_inputs)
    assert_close(square, official_expected["score_single"])
