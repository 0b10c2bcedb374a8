# Copyright 2026 The dinalrm authors. Licensed under the Apache License, Version 2.0.
"""LRMPipeline: score, compare and rank text-to-image samples with LRM, LPO's diffusion latent reward model.

Images are resized to the backbone's native size and encoded with the SD1.5 / SDXL VAE (as the official LRM's
`preprocess_image`), prompts are tokenized with the base pipeline's tokenizer(s), and the reward model
(`reward_model/modeling_lrm.py`) reads the latents noised to an integer DDPM timestep. This file is the Hub's remote
code and must stay self-contained: it imports nothing from the rest of the dinalrm repository.
"""

import importlib
import inspect
import json
import os
import shutil
from dataclasses import dataclass

import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, logging
from transformers import CLIPTokenizer, PreTrainedModel


logger = logging.get_logger(__name__)

PIPELINE_FILE = "pipeline_lrm.py"
MODELING_FILE = "modeling_lrm.py"


@dataclass
class LRMPipelineOutput(BaseOutput):
    """Output of [`LRMPipeline`].

    Args:
        rewards (`torch.Tensor` of shape `(num_samples,)`): float32 rewards on the CPU, higher = preferred
            (`exp(logit_scale) * cos(image, text)`, the official pair logits).
        timestep (`int`): the DDPM timestep the latents were noised to.
    """

    rewards: torch.Tensor
    timestep: int


@dataclass
class LRMComparisonOutput(BaseOutput):
    """Output of [`LRMPipeline.compare`].

    Args:
        probability (`float`): P(image A preferred) = softmax of the two rewards (the official validation rule).
        winner (`str`): `"a"` when `probability >= 0.5`, else `"b"`.
        rewards (`torch.Tensor` of shape `(2,)`): rewards of A and B.
    """

    probability: float
    winner: str
    rewards: torch.Tensor


@dataclass
class LRMRankingOutput(BaseOutput):
    """Output of [`LRMPipeline.rank`].

    Args:
        indices (`list[int]`): positions of the inputs, best first (ties keep the input order).
        rewards (`torch.Tensor` of shape `(num_samples,)`): their rewards in the same order.
    """

    indices: list[int]
    rewards: torch.Tensor


class LRMPipeline(DiffusionPipeline):
    r"""Scores images or SD1.5 / SDXL latents against prompts with an LRM reward model.

    Args:
        reward_model ([`LRMModel`]): the reward model with its (fine-tuned) UNet encoder and text encoder(s).
        vae ([`AutoencoderKL`]): the base pipeline's VAE; images become `latent_dist.sample() * scaling_factor`.
        tokenizer ([`CLIPTokenizer`]): the base pipeline's (first) tokenizer.
        tokenizer_2 ([`CLIPTokenizer`], *optional*): SDXL's second tokenizer.
    """

    model_cpu_offload_seq = "vae->reward_model"
    _optional_components = ["tokenizer_2"]

    def __init__(
        self,
        reward_model: PreTrainedModel,
        vae: AutoencoderKL,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer | None = None,
    ):
        super().__init__()
        self.register_modules(reward_model=reward_model, vae=vae, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        # The official `val_transform`: bilinear resize to the backbone's native size, then [-1, 1].
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, resample="bilinear", do_convert_rgb=True
        )
        if reward_model.config.backbone_type == "sdxl" and tokenizer_2 is None:
            raise ValueError("An SDXL reward model needs tokenizer_2 (SDXL's second tokenizer).")

    @property
    def default_resolution(self) -> int:
        """The backbone's native image side (512 for SD1.5, 1024 for SDXL): the official resize target."""
        return self.reward_model.config.unet_config["sample_size"] * self.vae_scale_factor

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, trust_remote_code: bool = False, **kwargs
    ) -> "LRMPipeline":
        """Loads an LRM pipeline folder or Hub repository (the converter's output layout).

        By default no code from the repository runs: the components load with the installed `modeling_lrm` (from
        `pip install dinalrm`) and this class. `trust_remote_code=True` instead runs the repository's own
        `pipeline_lrm.py` and `reward_model/modeling_lrm.py` through diffusers. `dtype` (or `torch_dtype`),
        `revision`, `token` and `cache_dir` are passed on to every component.
        """
        if trust_remote_code:
            return super().from_pretrained(pretrained_model_name_or_path, trust_remote_code=True, **kwargs)
        try:
            reward_model_class = importlib.import_module(MODELING_FILE.removesuffix(".py")).LRMModel
        except ImportError as error:
            raise ImportError(
                "The LRM reward model class is not installed: `pip install dinalrm`, or pass trust_remote_code=True "
                "to run the repository's own modeling_lrm.py."
            ) from error
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        options = {key: kwargs.pop(key) for key in ("revision", "token", "cache_dir") if key in kwargs}
        if kwargs:
            raise TypeError(f"Unexpected arguments {sorted(kwargs)}.")
        path = str(pretrained_model_name_or_path)
        index = cls.load_config(path, **options)
        reward_model = reward_model_class.from_pretrained(path, subfolder="reward_model", dtype=dtype, **options)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **options)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **options)
        tokenizer_2 = None
        if index.get("tokenizer_2", [None])[0] is not None:
            tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **options)
        return cls(reward_model=reward_model, vae=vae, tokenizer=tokenizer, tokenizer_2=tokenizer_2)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Saves the Hub layout that reloads in a fresh process: components, `pipeline_lrm.py` at the root,
        `reward_model/modeling_lrm.py`, and a `model_index.json` naming both files."""
        super().save_pretrained(save_directory, **kwargs)
        save_directory = str(save_directory)
        code_files = {
            os.path.join(save_directory, PIPELINE_FILE): inspect.getsourcefile(type(self)),
            os.path.join(save_directory, "reward_model", MODELING_FILE): inspect.getsourcefile(
                type(self.reward_model)
            ),
        }
        for target, source in code_files.items():
            if not (os.path.exists(target) and os.path.samefile(source, target)):
                shutil.copyfile(source, target)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as handle:
            model_index = json.load(handle)
        model_index["_class_name"] = [PIPELINE_FILE.removesuffix(".py"), type(self).__name__]
        model_index["reward_model"] = [MODELING_FILE.removesuffix(".py"), type(self.reward_model).__name__]
        with open(index_path, "w", encoding="utf-8") as handle:
            json.dump(model_index, handle, indent=2, sort_keys=True)
            handle.write("\n")

    # ------------------------------------------------------------------------------------------ inputs
    def _tokenize(self, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self._execution_device)

    def encode_prompt(self, prompt: str | list[str]):
        r"""The reward model's text inputs ([`LRMPromptEmbeds`]) for one prompt or a list, tokenized as the
        official `encode_prompt` (`padding="max_length"`, truncation at the tokenizer's maximum length)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids_2 = self._tokenize(self.tokenizer_2, prompts) if self.tokenizer_2 is not None else None
        return self.reward_model.encode_prompt(self._tokenize(self.tokenizer, prompts), ids_2)

    def encode_images(self, images, generator: torch.Generator | None = None, sample_posterior: bool = True):
        r"""Scaled VAE latents of images resized to the native size, as the official model encodes them.

        Args:
            images (PIL image, numpy array, torch tensor or a list of them): anything `VaeImageProcessor` takes.
            generator (`torch.Generator`, *optional*): source of the posterior sample.
            sample_posterior (`bool`, defaults to `True`): sample the VAE posterior (official) or take its mode.
        """
        size = self.default_resolution
        pixels = self.image_processor.preprocess(images, height=size, width=size)
        posterior = self.vae.encode(pixels.to(self._execution_device, self.vae.dtype)).latent_dist
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        return latents * self.vae.config.scaling_factor

    def check_inputs(self, prompt, images, latents, t, batch_size: int = 1) -> None:
        """Raises a `ValueError`/`TypeError` naming the fix for inputs the pipeline cannot score."""
        if (images is None) == (latents is None):
            raise ValueError("Pass either `images` (PIL, numpy or torch) or `latents` (scaled VAE latents).")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}.")
        num_samples = len(images) if images is not None else latents.shape[0]
        if len(prompts) not in (1, num_samples):
            raise ValueError(f"{len(prompts)} prompts for {num_samples} samples: pass one prompt or one per sample.")
        if t is not None:
            num_train = self.reward_model.noise_scheduler.config.num_train_timesteps
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_train:
                raise ValueError(f"t is an integer DDPM timestep in [0, {num_train}), got {t!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")

    # ------------------------------------------------------------------------------------------ scoring
    def reward_fn(
        self,
        latents: torch.Tensor,
        prompt: str | list[str] | None = None,
        prompt_embeds=None,
        t: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        r"""Differentiable rewards `(B,)` of clean latents for alignment loops (ReFL: `loss = -rewards.mean()`).

        Give `prompt` (one, or one per latent) or precomputed `prompt_embeds` from `encode_prompt`. Freeze the
        reward model yourself (`pipe.reward_model.requires_grad_(False)`) if only the generator should learn.
        """
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            prompt_embeds = self.encode_prompt(prompts)
        return self.reward_model.score_latents(latents, prompt_embeds=prompt_embeds, t=t, generator=generator)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        images=None,
        latents: torch.Tensor | None = None,
        t: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int = 8,
        sample_posterior: bool = True,
        return_dict: bool = True,
    ) -> LRMPipelineOutput | tuple:
        r"""Rewards of images or clean latents for their prompts.

        Args:
            prompt (`str` or `list[str]`): one prompt for all samples or one per sample.
            images (PIL image, numpy array, torch tensor, or a list of them): resized (bilinear) to the backbone's
                native size and encoded with a VAE posterior sample, as the official model does.
            latents (`torch.Tensor` of shape `(B, 4, h, w)`): clean scaled VAE latents instead of images.
            t (`int`, *optional*): DDPM timestep; defaults to `reward_model.config.default_timestep` (1, official
                validation).
            generator (`torch.Generator`, *optional*): source of the posterior samples and of the scoring noise.
            batch_size (`int`): samples per VAE/UNet pass; more samples show a progress bar.
            sample_posterior (`bool`, defaults to `True`): sample the VAE posterior (official) or take its mode.
            return_dict (`bool`): return an [`LRMPipelineOutput`] instead of a tuple.
        """
        if isinstance(images, PIL.Image.Image) or getattr(images, "ndim", 0) == 3:
            images = [images]
        self.check_inputs(prompt, images, latents, t, batch_size)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        timestep = self.reward_model.config.default_timestep if t is None else t
        num_samples = len(images) if images is not None else latents.shape[0]
        rewards = torch.empty(num_samples, dtype=torch.float32)
        starts = range(0, num_samples, batch_size)
        with self.progress_bar(total=len(starts)) as progress:
            for start in starts:
                stop = min(start + batch_size, num_samples)
                if images is not None:
                    batch = self.encode_images(list(images[start:stop]), generator, sample_posterior)
                else:
                    batch = latents[start:stop].to(self._execution_device)
                batch_prompts = prompts if len(prompts) == 1 else prompts[start:stop]
                embeds = self.encode_prompt(batch_prompts)
                scores = self.reward_model.score_latents(
                    batch.to(self.reward_model.dtype), prompt_embeds=embeds, t=timestep, generator=generator
                )
                rewards[start:stop] = scores.float().cpu()
                progress.update()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (rewards, timestep)
        return LRMPipelineOutput(rewards=rewards, timestep=timestep)

    def compare(
        self, prompt: str, image_a, image_b, t: int | None = None, generator: torch.Generator | None = None, **kwargs
    ) -> LRMComparisonOutput:
        r"""Probability that `image_a` is preferred over `image_b` for `prompt` (the softmax of the two rewards,
        the official validation rule), and the winner. Other keyword arguments as in `__call__`."""
        rewards = self(prompt, images=[image_a, image_b], t=t, generator=generator, **kwargs).rewards
        probability = float(self.reward_model.preference_probability(rewards[:1], rewards[1:])[0])
        return LRMComparisonOutput(probability=probability, winner="a" if probability >= 0.5 else "b", rewards=rewards)

    def rank(self, prompt: str | list[str], images=None, latents: torch.Tensor | None = None, **kwargs):
        r"""Orders images (or latents) by reward, best first; other keyword arguments as in `__call__`.

        Returns:
            [`LRMRankingOutput`] with `indices` into the inputs and their `rewards`, best first.
        """
        rewards = self(prompt, images=images, latents=latents, **kwargs).rewards
        ordered, order = torch.sort(rewards, descending=True, stable=True)
        return LRMRankingOutput(indices=order.tolist(), rewards=ordered)
