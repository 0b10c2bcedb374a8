"""The training step and the randomness it draws, shared by `train_dinalrm.py`, its tests and the benchmark.

* The step: `preference_step` draws one noise level and one noise per pair (shared by both images), scores
  both sides in ONE forward and returns the loss.
* Randomness is counter-based (`seeded_generator`): every draw of a step depends only on the seed, the process
  and the data position, so a resumed run repeats the draws of an uninterrupted one without saving RNG states.

Data (`dinalrm.training.buckets`, `dinalrm.training.pair_datasets`, `dinalrm.training.feature_cache`) and checkpoints
(`dinalrm.training.checkpointing`) have their own modules.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling
from diffusers.utils.torch_utils import randn_tensor

from modeling_dinalrm import add_noise


__all__ = [
    "WEIGHTING_SCHEMES",
    "StepOutput",
    "parameter_digest",
    "preference_step",
    "repeat_prompts",
    "sample_noise_levels",
    "seeded_generator",
]

WEIGHTING_SCHEMES = ("uniform", "logit_normal", "constant")


# ----------------------------------------------------------------------------------------------- randomness
def seeded_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from `seed` and integer `keys` (e.g. process, epoch, batch).

    Distinct key tuples give unrelated streams; the same tuple always gives the same stream, on any device.
    """
    digest = hashlib.sha256(json.dumps([seed, *keys]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def sample_noise_levels(
    weighting_scheme: str,
    batch_size: int,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    constant_t: float = 0.4,
) -> torch.Tensor:
    """Noise fractions `t` in (0, 1), shape `(batch_size,)`: uniform, logit-normal (diffusers' sampler) or constant."""
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme={weighting_scheme!r} is not one of {WEIGHTING_SCHEMES}.")
    if weighting_scheme == "constant":
        return torch.full((batch_size,), float(constant_t))
    return compute_density_for_timestep_sampling(
        weighting_scheme, batch_size, logit_mean=logit_mean, logit_std=logit_std, generator=generator
    )


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every tensor of `module`'s state dict (names and bytes): equal digests mean equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- the step
@dataclass
class StepOutput:
    """What one training micro-step produced (the loss keeps its graph)."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    reward_margin: torch.Tensor
    mean_t: torch.Tensor


def repeat_prompts(
    prompt_embeds: torch.Tensor | list[torch.Tensor],
    pooled_prompt_embeds: torch.Tensor | None,
    times: int,
    device: torch.device | None = None,
) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | None]:
    """Prompt embeddings for `times` stacked copies of a batch (e.g. `[chosen; rejected]`), on `device`: tensors are
    repeated, per-prompt caption lists (Z-Image, no pooled embedding) are chained."""
    if isinstance(prompt_embeds, (list, tuple)):
        return [e.to(device) for e in prompt_embeds] * times, None
    return prompt_embeds.to(device).repeat(times, 1, 1), pooled_prompt_embeds.to(device).repeat(times, 1)


def preference_step(
    model: torch.nn.Module,
    reward_model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    weighting_scheme: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    constant_t: float = 0.4,
    context_embedded: bool = False,
) -> StepOutput:
    """The DiNa-LRM objective on one batch of pairs of clean latents.

    Per pair: one noise level `t` and ONE noise shared by chosen and rejected (`x_t = (1 - t) x0 + t eps` with
    `t` snapped to the scheduler's table, see `modeling_dinalrm.add_noise`), one batched forward of
    `[chosen; rejected]` through `model` (the possibly DDP-wrapped `reward_model`), then the model's
    chosen-first `preference_loss` over all pairs at once, weighted by `batch["weights"]`. The pairs are not
    presented in a random order: the loss is symmetric, so a left/right swap would change nothing. Draws from
    `generator` in a fixed order: t, then noise. `context_embedded`: `batch["prompt_embeds"]` is already the
    context embedder's output (a compact feature cache).
    """
    chosen, rejected = batch["chosen"], batch["rejected"]
    device, pairs = chosen.device, chosen.shape[0]
    t = sample_noise_levels(weighting_scheme, pairs, generator, logit_mean, logit_std, constant_t)
    noise = randn_tensor(chosen.shape, generator=generator, device=device, dtype=chosen.dtype)
    sigmas, _ = reward_model.snap_noise_level(t, pairs, device)
    noisy = torch.cat([add_noise(chosen, noise, sigmas), add_noise(rejected, noise, sigmas)])
    rewards = model(
        noisy,
        torch.cat([sigmas, sigmas]),
        *repeat_prompts(batch["prompt_embeds"], batch["pooled_prompt_embeds"], 2),
        check_finite=False,  # the training loop checks the loss and the gradients instead (no sync per forward)
        context_embedded=context_embedded,
    ).rewards.float()
    rewards_chosen, rewards_rejected = rewards.chunk(2)
    loss = reward_model.preference_loss(rewards_chosen, rewards_rejected, sigmas, weights=batch["weights"])
    with torch.no_grad():
        margin = rewards_chosen - rewards_rejected
        return StepOutput(
            loss=loss, accuracy=(margin > 0).float().mean(), reward_margin=margin.mean(), mean_t=sigmas.mean()
        )
