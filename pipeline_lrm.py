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

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTokenizer, PreTrainedModel


logger = logging.get_logger(__name__)

PIPELINE_FILE = "pipeline_lrm.py"
MODELING_FILE = "modeling_lrm.py"
# `noise_sharing`: "prompt" gives the samples of one prompt one posterior and one scoring noise draw, "none" one each.
NOISE_SHARING_MODES = ("prompt", "none")
_IMAGE_TYPES = (PIL.Image.Image, np.ndarray, torch.Tensor, str, os.PathLike)

# The input checks below repeat those of `pipeline_dinalrm.py` in small: the two files are separate Hub artefacts
# (each is the remote code of its own repository) and cannot import each other.


def _describe(value) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} of shape {tuple(shape)}" if shape is not None else type(value).__name__


def _as_image_list(images) -> list:
    """One entry per image (4D arrays / tensors are batches), in a form `VaeImageProcessor` reads faithfully: file
    paths are opened (EXIF rotation applied) and PIL images converted to RGB; uint8 `(H, W, 3)` arrays become PIL
    images; float `(H, W, 3)` arrays and `(3, H, W)` tensors must hold finite values in [0, 1]. A list mixing kinds
    is converted to PIL images. Anything else is refused, naming the accepted forms."""
    if isinstance(images, _IMAGE_TYPES):
        images = list(images) if getattr(images, "ndim", 3) == 4 else [images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be an image, a file path or a list of them, got {_describe(images)}.")
    if not images:
        raise ValueError("images is an empty list: pass at least one image.")
    accepted = (
        "pass PIL images, file paths, uint8 (H, W, 3) numpy arrays, or float (H, W, 3) numpy arrays / (3, H, W) "
        "torch tensors in [0, 1]"
    )
    checked = []
    for index, image in enumerate(images):
        if not isinstance(image, _IMAGE_TYPES):
            raise TypeError(f"images[{index}] is a {_describe(image)}: {accepted}.")
        if isinstance(image, (str, os.PathLike)):
            with PIL.Image.open(image) as opened:
                image = PIL.ImageOps.exif_transpose(opened)
        if isinstance(image, PIL.Image.Image):
            if 0 in image.size:
                raise ValueError(f"images[{index}] of {image.width}x{image.height} pixels is empty.")
            checked.append(image if image.mode == "RGB" else image.convert("RGB"))
            continue
        channel_axis = 2 if isinstance(image, np.ndarray) else 0
        if image.ndim != 3 or image.shape[channel_axis] != 3:
            raise ValueError(f"images[{index}] is a {_describe(image)}, not an RGB image: {accepted}.")
        if 0 in image.shape:
            raise ValueError(f"images[{index}] of shape {tuple(image.shape)} is empty: pass an image with pixels.")
        if isinstance(image, np.ndarray) and image.dtype == np.uint8:
            checked.append(PIL.Image.fromarray(image))
            continue
        values = torch.as_tensor(image) if isinstance(image, np.ndarray) else image
        if not values.is_floating_point():
            raise TypeError(f"images[{index}] has dtype {image.dtype}: {accepted}.")
        if not torch.isfinite(values).all():
            raise ValueError(f"images[{index}] holds NaN or infinite pixel values: pass finite pixels.")
        if values.min() < 0 or values.max() > 1:
            raise ValueError(f"images[{index}] has values outside [0, 1]: {accepted}.")
        checked.append(image)
    if len({type(image) for image in checked}) > 1:
        checked = [image if isinstance(image, PIL.Image.Image) else _to_pil(image) for image in checked]
    return checked


def _to_pil(image) -> PIL.Image.Image:
    """A float image in [0, 1] (numpy `(H, W, 3)` or torch `(3, H, W)`) as an 8-bit PIL image."""
    array = image if isinstance(image, np.ndarray) else image.detach().float().permute(1, 2, 0).cpu().numpy()
    return PIL.Image.fromarray((np.asarray(array, dtype=np.float32) * 255).round().astype(np.uint8))


def _prompt_groups(prompts: list[str], num_samples: int) -> list[int]:
    """Per sample, the index of its prompt among the distinct prompts, in order of first appearance."""
    numbers: dict[str, int] = {}
    return [numbers.setdefault(prompts[i % len(prompts)], len(numbers)) for i in range(num_samples)]


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

    def encode_images(
        self,
        images,
        generator: torch.Generator | None = None,
        sample_posterior: bool = True,
        posterior_noise: torch.Tensor | None = None,
    ):
        r"""Scaled VAE latents of images resized to the native size, as the official model encodes them.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, `str` or a list of them): the images to encode.
            generator (`torch.Generator`, *optional*): source of the posterior sample.
            sample_posterior (`bool`, defaults to `True`): sample the VAE posterior (official) or take its mode.
            posterior_noise (`torch.Tensor`, *optional*): the standard normal draws of the posterior sample, one per
                image (`mean + std * noise`), instead of drawing them from `generator`.
        """
        return self._encode_pixels(self._pixels(images), generator, sample_posterior, posterior_noise)

    def _pixels(self, images) -> torch.Tensor:
        """Images as a `(B, 3, H, W)` tensor in [-1, 1] at the native size."""
        size = self.default_resolution
        return self.image_processor.preprocess(_as_image_list(images), height=size, width=size)

    def _encode_pixels(
        self,
        pixels: torch.Tensor,
        generator: torch.Generator | None,
        sample_posterior: bool,
        posterior_noise: torch.Tensor | None,
    ) -> torch.Tensor:
        """Scaled latents of preprocessed pixels (see `encode_images`)."""
        posterior = self.vae.encode(pixels.to(self._execution_device, self.vae.dtype)).latent_dist
        if not sample_posterior:
            latents = posterior.mode()
        elif posterior_noise is not None:
            latents = posterior.mean + posterior.std * posterior_noise.to(posterior.mean.device, posterior.mean.dtype)
        else:
            latents = posterior.sample(generator)
        return latents * self.vae.config.scaling_factor

    def check_inputs(self, prompt, images, latents, t, batch_size: int = 1, noise_sharing: str = "prompt") -> None:
        """Raises a `ValueError`/`TypeError` naming the fix for inputs the pipeline cannot score."""
        if (images is None) == (latents is None):
            raise ValueError("Pass either `images` (PIL, numpy or torch) or `latents` (scaled VAE latents).")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}.")
        if any(not p.strip() for p in prompts):
            raise ValueError(
                "prompt is empty: LRM scores how well an image matches its prompt; pass the prompt the image was "
                "generated from."
            )
        if latents is not None:
            channels = self.vae.config.latent_channels
            if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != channels:
                raise ValueError(
                    f"latents must be a (batch, {channels}, height, width) tensor, got {_describe(latents)}."
                )
            if not latents.is_floating_point():
                raise TypeError(f"latents must be floating-point VAE latents, got {latents.dtype}: pass float32.")
            if 0 in latents.shape:
                raise ValueError(f"latents of shape {tuple(latents.shape)} hold no sample or no pixel.")
            if not torch.isfinite(latents).all():
                raise ValueError("latents contain NaN or infinite values: pass finite, VAE-scaled latents.")
        if noise_sharing not in NOISE_SHARING_MODES:
            raise ValueError(f"noise_sharing={noise_sharing!r} is not supported: use 'prompt' or 'none'.")
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
        noise_sharing: str = "prompt",
    ) -> LRMPipelineOutput | tuple:
        r"""Rewards of images or clean latents for their prompts.

        Args:
            prompt (`str` or `list[str]`): one prompt for all samples or one per sample.
            images (PIL image, numpy array, torch tensor, file path, or a list of them): resized (bilinear) to the
                backbone's native size and encoded with a VAE posterior sample, as the official model does.
            latents (`torch.Tensor` of shape `(B, 4, h, w)`): clean scaled VAE latents instead of images.
            t (`int`, *optional*): DDPM timestep; defaults to `reward_model.config.default_timestep` (1, official
                validation).
            generator (`torch.Generator`, *optional*): source of the posterior samples and of the scoring noise.
            batch_size (`int`): samples per VAE/UNet pass; more samples show a progress bar.
            sample_posterior (`bool`, defaults to `True`): sample the VAE posterior (official) or take its mode.
            return_dict (`bool`): return an [`LRMPipelineOutput`] instead of a tuple.
            noise_sharing (`str`, defaults to `"prompt"`): `"prompt"` gives the samples of one prompt ONE posterior
                sample noise and ONE scoring noise (common random numbers, as DiNa-LRM's pipeline does): identical
                images get identical rewards, and `compare` gives P = 0.5 for them. Each prompt takes its draws from
                `generator` in the order of its first sample. `"none"` draws them per sample, batch by batch, as
                the official code does.

        Rewards that come out NaN or infinite (inputs far outside the VAE's range) raise a `ValueError` naming
        the samples.
        """
        if images is not None:
            images = _as_image_list(images)
        self.check_inputs(prompt, images, latents, t, batch_size, noise_sharing)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        timestep = self.reward_model.config.default_timestep if t is None else t
        num_samples = len(images) if images is not None else latents.shape[0]
        shared = self._shared_noise(prompts, num_samples, latents, generator) if noise_sharing == "prompt" else None
        rewards = torch.empty(num_samples, dtype=torch.float32)
        starts = range(0, num_samples, batch_size)
        with self.progress_bar(total=len(starts)) as progress:
            for start in starts:
                stop = min(start + batch_size, num_samples)
                noise = posterior = None
                if shared is not None:
                    groups, posterior_draws, noise_draws = shared
                    posterior = posterior_draws[groups[start:stop]]
                    noise = noise_draws[groups[start:stop]]
                if images is not None and shared is not None:
                    # Equal images of one prompt (one posterior draw) are encoded once: the VAE may round equal rows
                    # of a batch differently, and their latents must be equal to tie below.
                    pixels = self._pixels(list(images[start:stop]))
                    kept, copies = self._distinct_rows(pixels, groups[start:stop])
                    batch = self._encode_pixels(pixels[kept], generator, sample_posterior, posterior[kept])[copies]
                elif images is not None:
                    batch = self.encode_images(list(images[start:stop]), generator, sample_posterior)
                else:
                    batch = latents[start:stop].to(self._execution_device)
                batch_prompts = prompts if len(prompts) == 1 else prompts[start:stop]
                rows, source = list(range(stop - start)), None
                if shared is not None:  # equal latents of one prompt share their noise: score them once (exact ties)
                    rows, source = self._distinct_rows(batch, groups[start:stop])
                    batch, noise = batch[rows], noise[rows]
                    batch_prompts = batch_prompts if len(batch_prompts) == 1 else [batch_prompts[i] for i in rows]
                embeds = self.encode_prompt(batch_prompts)
                scores = self.reward_model.score_latents(
                    batch.to(self.reward_model.dtype),
                    prompt_embeds=embeds,
                    t=timestep,
                    noise=None if noise is None else noise.to(batch.device, self.reward_model.dtype),
                    generator=generator,
                )
                scores = scores.float().cpu()
                rewards[start:stop] = scores if source is None else scores[source]
                progress.update()
        self.maybe_free_model_hooks()
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"samples {bad[:8]} scored {rewards[bad[0]].item()}: their inputs are far outside the range the model "
                "works in (latents must be VAE-scaled, pixels in the image's range) or the model's weights are broken."
            )
        if not return_dict:
            return (rewards, timestep)
        return LRMPipelineOutput(rewards=rewards, timestep=timestep)

    def _shared_noise(self, prompts: list[str], num_samples: int, latents, generator) -> tuple:
        """`(groups, posterior noise, scoring noise)` for `noise_sharing="prompt"`: one draw of each per prompt
        group, in order of first appearance, shaped like one latent."""
        groups = torch.tensor(_prompt_groups(prompts, num_samples))
        if latents is not None:
            shape = (1, *latents.shape[1:])
        else:
            side = self.default_resolution // self.vae_scale_factor
            shape = (1, self.vae.config.latent_channels, side, side)
        posterior, noise = [], []
        for _ in range(int(groups.max()) + 1):
            posterior.append(randn_tensor(shape, generator=generator, dtype=torch.float32))
            noise.append(randn_tensor(shape, generator=generator, dtype=torch.float32))
        return groups, torch.cat(posterior), torch.cat(noise)

    @staticmethod
    def _distinct_rows(latents: torch.Tensor, groups: torch.Tensor) -> tuple[list[int], list[int]]:
        """The rows that differ in latent or prompt group, and for each sample the position of its row among them."""
        rows: list[int] = []
        source = []
        for index in range(len(latents)):
            match = next(
                (
                    k
                    for k, row in enumerate(rows)
                    if groups[row] == groups[index] and torch.equal(latents[row], latents[index])
                ),
                None,
            )
            if match is None:
                rows.append(index)
                match = len(rows) - 1
            source.append(match)
        return rows, source

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
