"""Sampling an SD3 generator for alignment: flow sampling with classifier-free guidance split into a no-grad prefix
and a differentiable tail, the generator's prompt encoding, and the VAE decode.

The settings are read by attribute (`SamplingSettings`, or any object with the same attributes, such as a recipe's
`argparse.Namespace`), so a recipe passes its parsed arguments through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class SamplingSettings:
    """What `Sampler` and `encode_generator_prompts` read: image size, the sampling schedule, guidance, the number of
    final steps that keep gradients, and the generator's T5 prompt length."""

    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    max_sequence_length: int = 128
    grad_steps: int = 1


class Sampler:
    """SD3 flow sampling with classifier-free guidance, split into a no-grad prefix and a differentiable tail."""

    def __init__(self, pipe: StableDiffusion3Pipeline, args: SamplingSettings):
        self.pipe, self.args = pipe, args
        self.scheduler = pipe.scheduler
        self.latent_shape = (
            pipe.transformer.config.in_channels,
            args.height // pipe.vae_scale_factor,
            args.width // pipe.vae_scale_factor,
        )

    def sigmas(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampling schedule (sigmas, timesteps) of the pipeline's scheduler."""
        self.scheduler.set_timesteps(self.args.num_inference_steps, device=device)
        return self.scheduler.sigmas.to(device), self.scheduler.timesteps.to(device)

    def velocity(self, transformer, latents, timestep, embeds, pooled):
        """Guided velocity at `timestep` (one for all samples, or one per sample); `embeds`/`pooled` hold the
        unconditional half first."""
        model_input = torch.cat([latents, latents])
        v = transformer(
            hidden_states=model_input,
            timestep=timestep.expand(latents.shape[0]).repeat(2),  # one per sample, or one for all
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + self.args.guidance_scale * (v_cond - v_uncond)

    def sample_x0(self, transformer, embeds, pooled, stop: int, generator, grad: bool = True) -> torch.Tensor:
        """Run steps `0..stop` and return the one-step clean prediction at `stop` (differentiable tail)."""
        sigmas, timesteps = self.sigmas(embeds.device)
        batch = embeds.shape[0] // 2
        latents = randn_tensor(
            (batch, *self.latent_shape), generator=generator, device=embeds.device, dtype=embeds.dtype
        )
        first_grad = stop - self.args.grad_steps + 1 if grad else stop + 1
        for i in range(stop + 1):
            with torch.set_grad_enabled(grad and i >= first_grad):
                v = self.velocity(transformer, latents, timesteps[i], embeds, pooled)
                if i == stop:
                    return latents - sigmas[i] * v
                latents = latents + (sigmas[i + 1] - sigmas[i]) * v
        raise AssertionError("unreachable")


def encode_generator_prompts(pipe: StableDiffusion3Pipeline, prompts: list[str], args: SamplingSettings, device):
    """Generator prompt embeddings with the unconditional (empty prompt) half first, as the SD3 pipeline does."""
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=True,
            max_sequence_length=args.max_sequence_length,
        )
    return torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled SD3 latents -> images in [-1, 1] with the generator's VAE (differentiable when gradients are on)."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample
