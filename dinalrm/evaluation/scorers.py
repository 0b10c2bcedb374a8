"""Reward scorers behind one interface, so DiNa-LRM and its peers are evaluated the same way.

A scorer maps `(prompts, images[, image_ids])` to one score per image (higher = preferred). It may produce
several *columns* of scores per image in one pass (e.g. DiNa-LRM at t = 0.4 and with the ensemble, from one VAE
encoding); `score` returns the first column, `score_columns` all of them, and `setting_names` names each
column as a row of the results table.

Registry (`SCORERS`, names as in `run_eval.py --scorer`; `arguments.SCORER_NAMES` lists the ones registered here so
that `--help` need not import this module):

* `dinalrm` — DiNa-LRM through `DiNaLRMPipeline.from_pretrained` (noise level(s), ensemble, noise samples,
  seed, noise sharing). Deterministic per image: the scoring noise of an image comes from a CPU generator seeded
  with `sha256(f"{seed}/{key}")`, so a score depends neither on the batch it is in nor on the process that
  computes it. The key is the image id with `noise_sharing="none"` (one noise per image, the reference protocol)
  and the prompt with `"prompt"`: the images of a prompt are scored as the pipeline scores a prompt group by
  default, sharing the draws (centre crops of one draw for images of other sizes).
* `lrm` — LRM, LPO's diffusion latent reward model, through `LRMPipeline.from_pretrained` (the converter's
  output); one column per `--lrm_timesteps` entry (default 1, the official validation timestep).
* `pickscore` — `yuvalkirstain/PickScore_v1` with the processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`;
  score = `logit_scale.exp() * cos(image, text)` (PickScore's own formula).
* `clip` — plain CLIP (`openai/clip-vit-large-patch14`), same formula (its logit scale is 100).
* `hpsv2`, `hpsv3`, `imagereward` — the published packages (`hpsv2`, `hpsv3`, `image-reward` from PyPI), each
  in its own virtual environment made on first use from the pinned requirements in
  `dinalrm/evaluation/requirements/`, scoring through a JSON-lines worker process
  (`dinalrm/evaluation/isolated.py`): their pins cannot share our environment.

To plug in another scorer, subclass [`Scorer`] and decorate it with `@register_scorer("name")`;
`run_eval.py --scorer name` then uses it. A scorer needs `from_args(args, device)` (build it from the parsed
command line), `setting_names` and `score_columns`; `close()` frees what it holds.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from PIL import Image

from dinalrm.evaluation.arguments import NOISE_SHARING
from dinalrm.evaluation.isolated import BACKENDS as ISOLATED_BACKENDS
from dinalrm.evaluation.isolated import IsolatedWorker, start_scorer


logger = logging.getLogger(__name__)

NoiseSetting = float | tuple[float, ...]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on accelerators and float32 on the CPU."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return DTYPES[name]


def model_label(model: str) -> str:
    """How a model appears in result names: a Hub id as is, a local folder by its name (stable across paths)."""
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


class Scorer(ABC):
    """Scores images against prompts; one or more score columns per image (see the module docstring)."""

    name: ClassVar[str]

    @property
    @abstractmethod
    def setting_names(self) -> list[str]:
        """One name per score column (a row of the results table)."""

    @abstractmethod
    def score_columns(
        self, prompts: list[str], images: list[Image.Image], image_ids: list[str] | None = None
    ) -> list[list[float]]:
        """Per image, its scores in every column (`len(setting_names)` values)."""

    def score(self, prompts: list[str], images: list[Image.Image], image_ids: list[str] | None = None) -> list[float]:
        """One score per image: the first column."""
        return [row[0] for row in self.score_columns(prompts, images, image_ids)]

    @classmethod
    @abstractmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> Scorer:
        """Build the scorer from `run_eval.py`'s parsed arguments, on `device`."""

    def close(self) -> None:  # noqa: B027 - most scorers hold nothing to free
        """Free what the scorer holds beyond memory (worker processes); a no-op unless overridden."""


SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(name: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Class decorator adding a scorer to `SCORERS` under `name`."""

    def register(cls: type[Scorer]) -> type[Scorer]:
        cls.name = name
        SCORERS[name] = cls
        return cls

    return register


def build_scorer(name: str, args: argparse.Namespace, device: torch.device) -> Scorer:
    """The registered scorer `name` built from `args`."""
    if name not in SCORERS:
        raise ValueError(f"Unknown scorer {name!r}; choose one of {', '.join(sorted(SCORERS))}.")
    return SCORERS[name].from_args(args, device)


def image_seed(seed: int, image_id: str) -> int:
    """A 64-bit seed per (run seed, image id), the same in every process (unlike Python's `hash`)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{image_id}".encode()).digest()[:8], "little")


def noise_key(noise_sharing: str, image_id: str, prompt: str) -> str:
    """What seeds an image's scoring noise: its id (`"none"`) or its prompt (`"prompt"`)."""
    return image_id if noise_sharing == "none" else f"prompt/{prompt}"


def content_id(prompt: str, image: Image.Image) -> str:
    """An id for an image given without one: a digest of its prompt, size, mode and pixels."""
    digest = hashlib.sha256(f"{prompt}\0{image.size}\0{image.mode}\0".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def setting_label(setting: NoiseSetting) -> str:
    """`t=0.4` for one level, `ensemble=0.2,0.5,0.7` for several."""
    if isinstance(setting, tuple):
        return "ensemble=" + ",".join(f"{level:g}" for level in setting)
    return f"t={setting:g}"


@register_scorer("dinalrm")
class DiNaLRMScorer(Scorer):
    """DiNa-LRM rewards at one or more noise settings, each image encoded once.

    Columns are mode-major, then setting-major: for noise-sharing mode `m`, setting `s` and noise draw `k` the
    column is `(m * len(settings) + s) * num_draws + k`. The noise comes from generators seeded by
    `image_seed(seed, noise_key(...))`: one per image with `"none"`; with `"prompt"` one per prompt, and the images of
    a prompt (and size) are scored in one call with `noise_sharing="prompt"`, so that they get the same draws however
    they are batched or split over processes. Draw `k` averages
    the generator's next `num_noise_samples` noises, and every setting restarts it, so all settings see the same
    noises (common random numbers: a noise sweep compares levels, not noise draws). An ensemble setting shares one
    noise across its levels. Images are encoded once (the VAE's posterior mode), grouped by size, then scored as
    latents in every mode.
    """

    def __init__(
        self,
        pipe,
        settings: Sequence[NoiseSetting],
        num_noise_samples: int = 1,
        num_draws: int = 1,
        seed: int = 0,
        label: str = "DiNa-LRM",
        noise_sharing: Sequence[str] = ("prompt",),
    ) -> None:
        if not settings:
            raise ValueError("Give at least one noise setting (a level t, or a tuple of levels for the ensemble).")
        if isinstance(noise_sharing, str) or not noise_sharing or set(noise_sharing) - set(NOISE_SHARING):
            raise ValueError(f"noise_sharing must be a non-empty list of {NOISE_SHARING}, got {noise_sharing!r}.")
        self.noise_sharing = list(noise_sharing)
        self.pipe = pipe
        self.settings = [tuple(s) if isinstance(s, (list, tuple)) else float(s) for s in settings]
        self.num_noise_samples = num_noise_samples
        self.num_draws = num_draws
        self.seed = seed
        self.label = label

    @staticmethod
    def load_pipeline(model: str, device: torch.device, dtype: str = "auto"):
        """`DiNaLRMPipeline.from_pretrained` (Hub id or local folder) on `device`, progress bars off."""
        from pipeline_dinalrm import DiNaLRMPipeline

        pipe = DiNaLRMPipeline.from_pretrained(model, dtype=resolve_dtype(dtype, device))
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def load(
        cls, model: str, device: torch.device, settings: Sequence[NoiseSetting], dtype: str = "auto", **kwargs
    ) -> DiNaLRMScorer:
        """A scorer on the pipeline of `model`; `kwargs` as in the constructor."""
        return cls(cls.load_pipeline(model, device, dtype), settings, label=cls.label_for(model), **kwargs)

    @staticmethod
    def label_for(model: str) -> str:
        """`DiNa-LRM [model]`: the prefix of this scorer's result names."""
        return f"DiNa-LRM [{model_label(model)}]"

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> DiNaLRMScorer:
        """`--t` and/or `--ensemble` (no value: the model's levels) give the settings, in that order."""
        if not args.model:
            raise ValueError("--scorer dinalrm needs --model (a Hub id or a local folder in the Hub layout).")
        pipe = cls.load_pipeline(args.model, device, args.dtype)
        config = pipe.reward_model.config
        backbone = getattr(args, "backbone", None)
        if backbone is not None and config.backbone != backbone:
            raise ValueError(
                f"--backbone {backbone}, but {args.model} is a DiNa-LRM model on a {config.backbone} backbone: "
                f"pass --backbone {config.backbone}, or drop --backbone (the model's family is read from it)."
            )
        settings: list[NoiseSetting] = []
        if args.t is not None or args.ensemble is None:
            settings.append(config.default_t if args.t is None else args.t)
        if args.ensemble is not None:
            settings.append(tuple(args.ensemble or config.ensemble_t))
        return cls(
            pipe,
            settings,
            num_noise_samples=args.num_noise_samples,
            seed=args.seed,
            label=cls.label_for(args.model),
            noise_sharing=args.noise_sharing,
        )

    @property
    def setting_names(self) -> list[str]:
        suffix = f" noise-samples={self.num_noise_samples}" if self.num_noise_samples > 1 else ""
        draws = [f" draw={k}" for k in range(self.num_draws)] if self.num_draws > 1 else [""]
        return [
            f"{self.label} {setting_label(s)}{suffix} noise={mode}{d}"
            for mode in self.noise_sharing
            for s in self.settings
            for d in draws
        ]

    @torch.no_grad()
    def _latents(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """Clean latents per image; images of one size are encoded in one VAE batch."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(image.size, []).append(index)
        latents: list[torch.Tensor] = [torch.empty(0)] * len(images)
        for indices in by_size.values():
            encoded = self.pipe.encode_images([images[i] for i in indices])
            for row, index in enumerate(indices):
                latents[index] = encoded[row : row + 1]
        return latents

    def score_columns(
        self, prompts: list[str], images: list[Image.Image], image_ids: list[str] | None = None
    ) -> list[list[float]]:
        if image_ids is None:
            image_ids = [content_id(p, im) for p, im in zip(prompts, images, strict=True)]
        latents = self._latents(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, latent in enumerate(latents):
            by_shape.setdefault(tuple(latent.shape), []).append(index)
        columns = len(self.noise_sharing) * len(self.settings) * self.num_draws
        rows = [[0.0] * columns for _ in images]
        for indices in by_shape.values():
            for m, mode in enumerate(self.noise_sharing):
                if mode == "none":
                    calls = [(indices, [noise_key(mode, image_ids[i], prompts[i]) for i in indices])]
                else:
                    by_prompt: dict[str, list[int]] = {}
                    for index in indices:
                        by_prompt.setdefault(prompts[index], []).append(index)
                    calls = [(members, [noise_key(mode, "", prompt)]) for prompt, members in by_prompt.items()]
                for members, keys in calls:
                    batch = torch.cat([latents[i] for i in members])
                    for s, setting in enumerate(self.settings):
                        generators = [torch.Generator().manual_seed(image_seed(self.seed, key)) for key in keys]
                        for draw in range(self.num_draws):
                            rewards = self.pipe(
                                prompt=[prompts[i] for i in members],
                                latents=batch,
                                t=list(setting) if isinstance(setting, tuple) else setting,
                                num_noise_samples=self.num_noise_samples,
                                generator=generators if mode == "none" else generators[0],
                                batch_size=len(members),
                                noise_sharing=mode,
                            ).rewards
                            column = (m * len(self.settings) + s) * self.num_draws + draw
                            for row, index in enumerate(members):
                                rows[index][column] = float(rewards[row])
        return rows


@register_scorer("lrm")
class LRMScorer(Scorer):
    """LRM (LPO's diffusion latent reward model) through `LRMPipeline` at one or more integer DDPM timesteps.

    One column per timestep (default: 1, the official validation timestep). As the official model, each image is
    resized to the backbone's native size and encoded with a VAE posterior sample; the sample comes from a generator
    seeded with `image_seed(seed, image_id)` and the scoring noise from one seeded with `image_seed(seed,
    image_id + "/noise")`, restarted for every timestep (common random numbers), so a score depends neither on the
    batch nor on the process.
    """

    def __init__(self, pipe, timesteps: Sequence[int], seed: int = 0, label: str = "LRM") -> None:
        if not timesteps:
            raise ValueError("Give at least one DDPM timestep.")
        self.pipe = pipe
        self.timesteps = [int(t) for t in timesteps]
        self.seed = seed
        self.label = label

    @classmethod
    def load(
        cls,
        model: str,
        device: torch.device,
        timesteps: Sequence[int] | None = None,
        dtype: str = "auto",
        seed: int = 0,
    ) -> LRMScorer:
        """A scorer on the `LRMPipeline` folder or Hub id `model` (the converter's output layout)."""
        from pipeline_lrm import LRMPipeline

        pipe = LRMPipeline.from_pretrained(model, dtype=resolve_dtype(dtype, device))
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        timesteps = timesteps or [pipe.reward_model.config.default_timestep]
        return cls(pipe, timesteps, seed=seed, label=f"LRM [{model_label(model)}]")

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> LRMScorer:
        """`--lrm_timesteps` gives the columns; DiNa-LRM's noise options do not apply."""
        if not args.model:
            raise ValueError(
                "--scorer lrm needs --model (an LRMPipeline folder or Hub id, e.g. the converter's output)."
            )
        if args.t is not None or args.ensemble is not None or args.num_noise_samples != 1:
            logger.warning("--t, --ensemble and --num_noise_samples apply to DiNa-LRM; LRM uses --lrm_timesteps.")
        timesteps = [int(t) for t in args.lrm_timesteps] if getattr(args, "lrm_timesteps", None) else None
        return cls.load(args.model, device, timesteps, args.dtype, args.seed)

    @property
    def setting_names(self) -> list[str]:
        return [f"{self.label} timestep={t}" for t in self.timesteps]

    @torch.no_grad()
    def score_columns(
        self, prompts: list[str], images: list[Image.Image], image_ids: list[str] | None = None
    ) -> list[list[float]]:
        if image_ids is None:
            image_ids = [content_id(p, im) for p, im in zip(prompts, images, strict=True)]
        generators = [torch.Generator().manual_seed(image_seed(self.seed, i)) for i in image_ids]
        latents = self.pipe.encode_images(images, generator=generators)
        rows = [[0.0] * len(self.timesteps) for _ in images]
        for column, timestep in enumerate(self.timesteps):
            noise = [torch.Generator().manual_seed(image_seed(self.seed, f"{i}/noise")) for i in image_ids]
            rewards = self.pipe(prompts, latents=latents, t=timestep, generator=noise, batch_size=len(images)).rewards
            for row, reward in enumerate(rewards.tolist()):
                rows[row][column] = reward
        return rows


class CLIPScorer(Scorer):
    """`logit_scale.exp() * cos(image, text)` of a transformers `CLIPModel` (PickScore's formula)."""

    display_name: ClassVar[str] = "CLIP"
    default_model: ClassVar[str] = "openai/clip-vit-large-patch14"
    default_processor: ClassVar[str | None] = None

    def __init__(self, model, processor, label: str, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.label = label
        self.device = device

    @classmethod
    def load(cls, model: str | None, processor: str | None, device: torch.device, dtype: str = "auto") -> CLIPScorer:
        """Model and processor by Hub id or folder (the processor defaults to the class's, then to the model's)."""
        from transformers import AutoProcessor, CLIPModel

        model = model or cls.default_model
        processor = processor or cls.default_processor or model
        clip = CLIPModel.from_pretrained(model, dtype=resolve_dtype(dtype, device))
        return cls(
            clip, AutoProcessor.from_pretrained(processor), f"{cls.display_name} [{model_label(model)}]", device
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> CLIPScorer:
        if args.t is not None or args.ensemble is not None or args.num_noise_samples != 1:
            logger.warning(
                "--t, --ensemble and --num_noise_samples apply to DiNa-LRM only; %s ignores them.", cls.name
            )
        return cls.load(args.model, args.processor, device, args.dtype)

    @property
    def setting_names(self) -> list[str]:
        return [self.label]

    @torch.no_grad()
    def score_columns(
        self, prompts: list[str], images: list[Image.Image], image_ids: list[str] | None = None
    ) -> list[list[float]]:
        unique = list(dict.fromkeys(prompts))
        inputs = self.processor(
            text=unique, images=images, return_tensors="pt", padding=True, truncation=True, max_length=77
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        output = self.model(**inputs)
        text = output.text_embeds[[unique.index(p) for p in prompts]]
        cosine = (text * output.image_embeds).sum(dim=-1)
        scores = self.model.logit_scale.exp() * cosine
        return [[float(s)] for s in scores.float().cpu()]


@register_scorer("pickscore")
class PickScoreScorer(CLIPScorer):
    """PickScore v1: a CLIP-H fine-tuned on Pick-a-Pic, read with OpenCLIP-H's processor."""

    display_name = "PickScore"
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


@register_scorer("clip")
class PlainCLIPScorer(CLIPScorer):
    """OpenAI CLIP ViT-L/14 (or any `CLIPModel` given by `--model`)."""


class IsolatedScorer(Scorer):
    """A published scorer package run in its own virtual environment (`dinalrm/evaluation/isolated.py`)."""

    def __init__(self, worker: IsolatedWorker, label: str) -> None:
        self.worker = worker
        self.label = label

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device) -> IsolatedScorer:
        """`--scorer_requirements NAME=FILE` replaces the pinned requirements, `--scorer_find_links` adds wheels."""
        if args.t is not None or args.ensemble is not None or args.num_noise_samples != 1:
            logger.warning(
                "--t, --ensemble and --num_noise_samples apply to DiNa-LRM only; %s ignores them.", cls.name
            )
        overrides = dict(item.split("=", 1) for item in getattr(args, "scorer_requirements", None) or [])
        worker = start_scorer(
            cls.name,
            str(device),
            find_links=getattr(args, "scorer_find_links", None) or (),
            requirements=overrides.get(cls.name),
        )
        return cls(worker, f"{ISOLATED_BACKENDS[cls.name].display_name} [{worker.package}=={worker.version}]")

    @property
    def setting_names(self) -> list[str]:
        return [self.label]

    def score_columns(
        self, prompts: list[str], images: list[Image.Image], image_ids: list[str] | None = None
    ) -> list[list[float]]:
        return [[score] for score in self.worker.score_images(prompts, images)]

    def close(self) -> None:
        """Stop the package's worker process."""
        self.worker.close()


@register_scorer("hpsv2")
class HPSv2Scorer(IsolatedScorer):
    """HPSv2.1 through `hpsv2.score` (the `hpsv2` package, OpenCLIP ViT-H/14, weights `xswu/HPSv2`)."""


@register_scorer("hpsv3")
class HPSv3Scorer(IsolatedScorer):
    """HPSv3 through `hpsv3.HPSv3RewardInferencer.reward` (Qwen2-VL-7B, weights `MizzenAI/HPSv3`): the mean mu."""


@register_scorer("imagereward")
class ImageRewardScorer(IsolatedScorer):
    """ImageReward v1.0 through `ImageReward.load('ImageReward-v1.0').score` (the `image-reward` package)."""
