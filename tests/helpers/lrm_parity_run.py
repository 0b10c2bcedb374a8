#!/usr/bin/env python
"""Recompute the LRM tensors of an official-lrm-tiny style fixture from a converted pipeline folder, in a fresh
process that loads the reward model only through `AutoModel.from_pretrained(..., trust_remote_code=True)`.

    python tests/helpers/lrm_parity_run.py <converted_dir> <fixture_dir> <out.safetensors>

Seeds, prompts, labels and timesteps come from the fixture's `inputs.safetensors`; nothing is hard-coded. The steps
are the official criterion's (`StepCLIPCriterion.get_features` + `calc_loss`): one VAE posterior sample and one
noise draw from the global generator after `torch.manual_seed(seed)`, features in eval mode, then the same
computation in train mode for the loss and its gradients.
"""

import json
import sys

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from transformers import AutoModel


def main(converted: str, fixture: str, out_path: str) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    inputs = load_file(f"{fixture}/inputs.safetensors")
    with open(f"{fixture}/config.json", encoding="utf-8") as handle:
        aux_loss_coeff = json.load(handle)["lrm"]["aux_loss_coeff"]
    model = AutoModel.from_pretrained(f"{converted}/reward_model", trust_remote_code=True)
    vae = AutoencoderKL.from_pretrained(f"{converted}/vae")
    vae.requires_grad_(False)
    seed = int(inputs["lrm/seed_global_before_forward"][0])
    pixels = torch.cat([inputs["lrm/pixel_values_0"], inputs["lrm/pixel_values_1"]])
    pairs = inputs["lrm/timestep_collated"].reshape(-1, 2)
    timesteps = torch.cat([pairs[:, 0], pairs[:, 1]])
    num_pairs = pairs.shape[0]
    results = {}

    def run(train: bool):
        model.train(train)
        torch.manual_seed(seed)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        noisy = model.add_noise(latents, noise, timesteps)
        return latents, noise, noisy, model(noisy, timesteps, inputs["lrm/input_ids"])

    with torch.no_grad():
        latents, noise, noisy, output = run(train=False)
        embeds = model.encode_prompt(inputs["lrm/input_ids"])
    results["lrm/debug/vae_latents"] = latents
    results["lrm/debug/noise"] = noise
    results["lrm/debug/noisy_latents"] = noisy
    results["lrm/debug/encoder_hidden_states"] = embeds.encoder_hidden_states
    results["lrm/debug/negative_encoder_hidden_states"] = embeds.negative_encoder_hidden_states
    results["lrm/debug/pooled_multiscale"] = output.pooled_features
    results["lrm/image_0_features"] = output.image_embeds[:num_pairs]
    results["lrm/image_1_features"] = output.image_embeds[num_pairs:]
    results["lrm/text_features"] = output.text_embeds
    results["lrm/score_0"] = output.rewards[:num_pairs]
    results["lrm/score_1"] = output.rewards[num_pairs:]

    output = run(train=True)[-1]
    loss = model.preference_loss(
        output.rewards[:num_pairs],
        output.rewards[num_pairs:],
        inputs["lrm/label_0"],
        inputs["lrm/label_1"],
        inputs["lrm/num_example_per_prompt"],
        pairs[:, 0],
        pairs[:, 1],
        aux_loss_coeff=aux_loss_coeff,
    )
    loss.backward()
    results["lrm/loss_pair"] = loss.detach().reshape(1)
    results["lrm/grad/logit_scale"] = model.logit_scale.grad.reshape(1)
    for group in ("visual_projection", "text_projection", "unet", "text_encoder"):
        grads = [p.grad for name, p in model.named_parameters() if name.startswith(f"{group}.") and p.grad is not None]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        results[f"lrm/grad_norm/{group}"] = norm.float().reshape(1)
        results[f"lrm/grad_count/{group}"] = torch.tensor([len(grads)])
    results["lrm/grad/visual_projection"] = model.visual_projection.weight.grad
    results["lrm/grad/text_projection"] = model.text_projection.weight.grad
    save_file({k: v.detach().contiguous() for k, v in results.items()}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
