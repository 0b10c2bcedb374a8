"""LPO parity with the official code (Kwai-Kolors/LPO `lpo/`) on `tests/fixtures/official-lrm-tiny`.

`dinalrm.alignment.lpo` recomputes the fixture's thresholds, candidate comparison, the seeded multi-candidate DDIM run
(trajectory, candidates, scores, kept pairs), the DDIM log-probabilities of policy (base UNet + the fixture's policy
LoRA) and reference (the base UNet), the loss and its LoRA gradients. Every size, seed and setting is read from the
fixture's config.json and tensors, so the tests pass unchanged on any fixture made the same way.
"""

import importlib.util

import pytest
import tolerances
import torch
from conftest import OFFICIAL_LRM_TINY, REPO_ROOT, assert_close
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from dinalrm.alignment.lpo import (
    THRESHOLD_SCHEDULES,
    LRMReward,
    compare_candidates,
    ddim_step_distribution,
    dynamic_threshold,
    gaussian_log_prob,
    guided_prediction,
    lpo_loss,
    official_threshold_fn,
    parameters_to_clip,
    sample_with_candidates,
)


FIXTURE = OFFICIAL_LRM_TINY
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lrm(lrm_tiny_config):
    """The official LRM checkpoint through the public converter (the same weights the official LPO scores with)."""
    spec = importlib.util.spec_from_file_location(
        "convert_lrm_lpo", REPO_ROOT / "scripts" / "convert_official_lrm_checkpoint.py"
    )
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    lrm = lrm_tiny_config["lrm"]
    pipe = converter.convert(
        str(FIXTURE / lrm_tiny_config["paths"]["checkpoint"]),
        str(FIXTURE / lrm_tiny_config["paths"]["base"]),
        guidance_scale=lrm["guidance_scale"],
        multi_scale=lrm["multi_scale"],
        multi_scale_cfg=lrm["multi_scale_cfg"],
    )
    return pipe.reward_model.eval()


@pytest.fixture(scope="module")
def policy(lrm_tiny_config):
    """The sampling pipeline as train_lpo.py builds it: DDIM from the base scheduler config, the policy LoRA."""
    pipe = StableDiffusionPipeline.from_pretrained(FIXTURE / lrm_tiny_config["paths"]["base"], safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(FIXTURE / lrm_tiny_config["paths"]["policy_lora"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sampled(policy, lrm, lrm_tiny_config, lrm_tiny_inputs):
    """The seeded multi-candidate run of the fixture: global seed for the continuations, a generator for noise."""
    sample = lrm_tiny_config["sample"]
    compare = lrm_tiny_config["compare"]
    pipe = policy
    pipe.unet.eval()
    pipe.scheduler.set_timesteps(sample["num_steps"])
    with torch.no_grad():
        prompt_embeds = pipe.text_encoder(lrm_tiny_inputs["lpo/pipe_prompt_ids"])[0]
        negative = pipe.text_encoder(pipe.tokenizer([""], padding="max_length", return_tensors="pt").input_ids)[0]
        conditioning = lrm.encode_prompt(lrm_tiny_inputs["lpo/pipe_lrm_input_ids"])
    negative = negative.repeat(prompt_embeds.shape[0], 1, 1)
    torch.manual_seed(int(lrm_tiny_inputs["lpo/pipe_seed_global"][0]))
    generator = torch.Generator().manual_seed(int(lrm_tiny_inputs["lpo/pipe_seed_generator"][0]))
    scale = pipe.vae_scale_factor
    shape = (prompt_embeds.shape[0], pipe.unet.config.in_channels, sample["height"] // scale, sample["width"] // scale)
    latents = randn_tensor(shape, generator=generator, dtype=prompt_embeds.dtype) * pipe.scheduler.init_noise_sigma
    output = sample_with_candidates(
        predict=lambda x, t: guided_prediction(pipe.unet, x, t, prompt_embeds, negative, sample["guidance_scale"]),
        step_distribution=lambda eps, t, x: ddim_step_distribution(pipe.scheduler, eps, t, x, eta=sample["eta"]),
        reward=LRMReward(lrm),
        threshold_fn=official_threshold_fn(
            compare["dynamic_threshold"], compare["threshold_min"], compare["threshold_max"]
        ),
        latents=latents,
        timesteps=pipe.scheduler.timesteps,
        conditioning=conditioning,
        num_candidates=sample["num_sample_each_step"],
        generator=generator,
        start_step=sample["divert_start_step"],
        end_step=sample["divert_end_step"],
    )
    return output, prompt_embeds, negative


def test_threshold_schedules_match_all_ranges(lrm_tiny_inputs, lrm_tiny_expected, lrm_tiny_config):
    timesteps = lrm_tiny_inputs["lpo/threshold_timesteps"]
    assert set(THRESHOLD_SCHEDULES) == {"sigma", "variance", "linear"}
    for suffix, key in (("", "lpo/threshold_range"), ("_alt", "lpo/threshold_range_alt")):
        low, high = lrm_tiny_inputs[key].tolist()
        for schedule in THRESHOLD_SCHEDULES:
            actual = dynamic_threshold(schedule, timesteps, low, high)
            reference = lrm_tiny_expected[f"lpo/threshold_{schedule}{suffix}"]
            # A few float32 operations on values inside [low, high]: relative to the range's upper end.
            tolerances.assert_close(actual, reference, scale=high, msg=f"{schedule}{suffix}")
    assert [low, high] == lrm_tiny_config["thresholds"]["alt"]


def test_lrm_scores_compare_indices_and_validity_match(lrm, lrm_tiny_inputs, lrm_tiny_expected, lrm_tiny_config):
    num_candidates = lrm_tiny_config["lpo_score"]["num_samples"]
    num_prompts = lrm_tiny_inputs["lpo/compare_timesteps"].shape[0]
    ids = lrm_tiny_inputs["lpo/input_ids"]
    with torch.no_grad():
        scores = LRMReward(lrm).score(
            lrm_tiny_inputs["lpo/noisy_latents"],
            lrm_tiny_inputs["lpo/timesteps"],
            lrm.encode_prompt(ids[:num_prompts]),
        )
    assert torch.equal(ids, ids[:num_prompts].repeat(num_candidates, 1)), "rows must be candidate-major"
    assert_close(scores, lrm_tiny_expected["lpo/lrm_scores"], "lrm scores")
    compare = lrm_tiny_config["compare"]
    thresholds = official_threshold_fn(
        compare["dynamic_threshold"], compare["threshold_min"], compare["threshold_max"]
    )(lrm_tiny_inputs["lpo/compare_timesteps"])
    assert_close(thresholds, lrm_tiny_expected["lpo/compare_threshold"], "compare thresholds")
    result = compare_candidates(lrm_tiny_expected["lpo/lrm_scores"].reshape(num_candidates, num_prompts), thresholds)
    assert torch.equal(result.indices, lrm_tiny_expected["lpo/compare_indices"])
    assert torch.equal(result.valid.long(), lrm_tiny_expected["lpo/compare_valid"])


@pytest.mark.slow  # the seeded 20-step multi-candidate run: ~15 s on a shared 2-core machine
def test_sampled_trajectory_candidates_and_scores_match(sampled, lrm_tiny_expected, policy):
    output, _, _ = sampled
    assert torch.equal(policy.scheduler.timesteps, lrm_tiny_expected["lpo/pipe_timesteps"])
    assert_close(output.stds, lrm_tiny_expected["lpo/pipe_std_dev"], "std per step")
    assert torch.equal(output.continuation_indices, lrm_tiny_expected["lpo/pipe_denoise_idx"])
    assert_close(output.trajectory, lrm_tiny_expected["lpo/pipe_trajectory"], "trajectory")
    assert_close(output.scores.flatten(), lrm_tiny_expected["lpo/pipe_score_logs"], "score log")
    assert torch.equal(output.compare_indices, lrm_tiny_expected["lpo/pipe_compare_indices"])
    assert torch.equal(output.compare_valid.long(), lrm_tiny_expected["lpo/pipe_compare_valid"])


@pytest.mark.slow  # the seeded 20-step multi-candidate run: ~15 s on a shared 2-core machine
def test_kept_pairs_match(sampled, lrm_tiny_expected):
    output, prompt_embeds, _ = sampled
    assert torch.equal(output.timesteps.unsqueeze(1), lrm_tiny_expected["lpo/pipe_valid_timesteps"])
    assert_close(output.current_latents.unsqueeze(1), lrm_tiny_expected["lpo/pipe_current_latents"], "x_t")
    pairs = torch.stack([output.winner_latents, output.loser_latents], dim=1)
    assert_close(pairs, lrm_tiny_expected["lpo/pipe_next_latents"], "winner / loser")
    assert_close(
        prompt_embeds[output.prompt_indices].unsqueeze(1), lrm_tiny_expected["lpo/pipe_valid_prompt_embeds"], "embeds"
    )


@pytest.fixture(scope="module")
def trained(policy, lrm_tiny_expected, lrm_tiny_inputs, lrm_tiny_config):
    """Policy (LoRA, train mode) and reference (adapter disabled) on the fixture's kept pairs, with the loss."""
    pipe = policy
    unet = pipe.unet
    sample, train = lrm_tiny_config["sample"], lrm_tiny_config["train"]
    pipe.scheduler.set_timesteps(sample["num_steps"])
    timesteps = lrm_tiny_expected["lpo/pipe_valid_timesteps"][:, 0]
    current = lrm_tiny_expected["lpo/pipe_current_latents"][:, 0]
    winners, losers = lrm_tiny_expected["lpo/pipe_next_latents"].unbind(1)
    embeds = lrm_tiny_expected["lpo/pipe_valid_prompt_embeds"][:, 0]
    negative = lrm_tiny_inputs["lpo/pipe_negative_prompt_embeds"].repeat(embeds.shape[0], 1, 1)
    guidance = sample["guidance_scale"] if train["cfg"] else 1.0
    unet.train()
    unet.requires_grad_(False)
    lora = [p for n, p in unet.named_parameters() if "lora" in n]
    for parameter in lora:
        parameter.requires_grad_(True)
        parameter.grad = None
    eps_policy = guided_prediction(unet, current, timesteps, embeds, negative, guidance)
    with torch.no_grad():
        unet.disable_adapters()
        eps_ref = guided_prediction(unet, current, timesteps, embeds, negative, guidance)
        unet.enable_adapters()
    policy_step = ddim_step_distribution(pipe.scheduler, eps_policy, timesteps, current, eta=sample["eta"])
    ref_step = ddim_step_distribution(pipe.scheduler, eps_ref, timesteps, current, eta=sample["eta"])
    log_probs = {
        "w_pol": gaussian_log_prob(winners, policy_step),
        "w_ref": gaussian_log_prob(winners, ref_step),
        "l_pol": gaussian_log_prob(losers, policy_step),
        "l_ref": gaussian_log_prob(losers, ref_step),
    }
    out = lpo_loss(
        log_probs["w_pol"], log_probs["w_ref"], log_probs["l_pol"], log_probs["l_ref"], **_loss_kwargs(train)
    )
    out.loss.backward()
    unet.eval()
    return eps_policy.detach(), eps_ref, log_probs, out, {n: p for n, p in unet.named_parameters() if "lora" in n}


def _loss_kwargs(train: dict) -> dict:
    return {"beta": train["beta"], "eps": train["eps"]}


def test_noise_predictions_and_log_probs_of_policy_and_reference_match(trained, lrm_tiny_expected):
    eps_policy, eps_ref, log_probs, _, _ = trained
    assert_close(eps_policy, lrm_tiny_expected["lpo/eps_policy"], "policy eps")
    assert_close(eps_ref, lrm_tiny_expected["lpo/eps_ref"], "reference eps")
    for name, value in log_probs.items():
        assert_close(value.detach(), lrm_tiny_expected[f"lpo/logprob_{name}"], f"log-prob {name}")


def test_loss_ratios_and_diagnostics_match(trained, lrm_tiny_expected):
    out = trained[3]
    assert_close(out.ratio_w.detach(), lrm_tiny_expected["lpo/ratio_w"], "ratio_w")
    assert_close(out.ratio_l.detach(), lrm_tiny_expected["lpo/ratio_l"], "ratio_l")
    assert_close(out.loss.detach().reshape(1), lrm_tiny_expected["lpo/loss"], "loss")
    assert_close(out.implicit_acc.reshape(1), lrm_tiny_expected["lpo/implicit_acc"], "implicit_acc")
    # The margin is a difference of log-probability ratios: small through cancellation, so its round-off is that of
    # the log-probabilities it is made of.
    logprob_scale = max(lrm_tiny_expected[f"lpo/logprob_{k}"].abs().max().item() for k in ("w_pol", "l_pol"))
    tolerances.assert_close(
        out.margin.detach().reshape(1), lrm_tiny_expected["lpo/margin"], scale=logprob_scale, msg="margin"
    )


def test_loss_formula_on_the_official_log_probs(lrm_tiny_expected, lrm_tiny_config):
    """The loss of the official log-probabilities themselves, without any model: the objective alone."""
    out = lpo_loss(
        lrm_tiny_expected["lpo/logprob_w_pol"],
        lrm_tiny_expected["lpo/logprob_w_ref"],
        lrm_tiny_expected["lpo/logprob_l_pol"],
        lrm_tiny_expected["lpo/logprob_l_ref"],
        **_loss_kwargs(lrm_tiny_config["train"]),
    )
    assert_close(out.loss.reshape(1), lrm_tiny_expected["lpo/loss"], "loss from official log-probs")
    assert_close(out.ratio_w, lrm_tiny_expected["lpo/ratio_w"], "ratio_w from official log-probs")


def test_lora_gradients_and_the_official_clipping_quirk_match(trained, lrm_tiny_expected, lrm_tiny_config):
    grads = {name: p.grad for name, p in trained[4].items()}
    assert all(g is not None for g in grads.values())

    def norm(names) -> torch.Tensor:
        return torch.sqrt(sum((grads[n].double() ** 2).sum() for n in names)).float().reshape(1)

    # Each LoRA gradient entry sums over every latent position of every kept pair, conditional and unconditional.
    kept, _, channels, height, width = lrm_tiny_expected["lpo/pipe_current_latents"].shape
    rtol = tolerances.accumulation_rtol(2 * kept * height * width)
    total = lrm_tiny_expected["lpo/grad_norm_policy_lora"]
    assert_close(norm(grads), total, "LoRA grad norm", rtol=rtol)
    for part in ("lora_A", "lora_B"):
        expected = lrm_tiny_expected[f"lpo/grad_norm_policy_{part}"]
        tolerances.assert_close(norm([n for n in grads if part in n]), expected, rtol, total.item(), msg=part)
    max_norm = lrm_tiny_config["train"]["max_grad_norm"]
    returned = torch.nn.utils.clip_grad_norm_(parameters_to_clip(list(trained[4].values())), max_norm)
    # The quirk returns the norm of no gradient at all: exactly 0.
    assert_close(returned.reshape(1), lrm_tiny_expected["lpo/clip_grad_norm_returned"], "clip return (official quirk)")
    assert_close(
        norm(grads), lrm_tiny_expected["lpo/grad_norm_policy_lora_after_clip"], "norm after the official clip", rtol
    )
    fixed = parameters_to_clip(list(trained[4].values()), official_exhausted_iterator=False)
    saved = {n: g.clone() for n, g in grads.items()}
    before = norm(grads).item()
    torch.nn.utils.clip_grad_norm_(fixed, max_norm)
    # The rule, whichever side of the threshold the fixture's gradient falls: min(norm, max_norm) (torch's clip adds
    # 1e-6 to the denominator, well inside FORWARD_RTOL of a max_norm of order 1).
    after = norm(grads).item()
    assert after == tolerances.close_to(min(before, max_norm)), "without the quirk the norm is min(norm, max_norm)"
    for name, parameter in trained[4].items():
        parameter.grad = saved[name]
