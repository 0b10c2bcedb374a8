# Copyright 2026 The dinalrm authors. Licensed under the Apache License, Version 2.0.
"""DiNaLRMPipeline: score, compare and rank text-to-image samples with DiNa-LRM (arXiv 2602.11146).

The pipeline turns prompts into SD3 prompt embeddings (CLIP-L, OpenCLIP-bigG, T5) and images into scaled SD3 VAE
latents, then asks the reward model (`reward_model/modeling_dinalrm.py`) for one reward per sample. This file is
the Hub's remote code and must stay self-contained: it imports nothing from the rest of the dinalrm repository.

Why one file rather than several: `DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` downloads, of a
repository's root code, only the file `model_index.json` names (`DiffusionPipeline.download` allows
`f"{custom_pipeline}.py"` and `<component>/<module>.py`, diffusers 0.42), then loads it from that snapshot. diffusers
follows a `from .sibling import ...` line only by copying `sibling.py` out of the same snapshot folder, where it was
never downloaded, so the load stops with `FileNotFoundError`; a relative import would also break the plain
`from pipeline_dinalrm import DiNaLRMPipeline` of an installed copy. The pipeline's parts are therefore units inside
this file: the input normalisation (`_as_image_list`, `_count_samples`, `_count_prompts`, ...) and the prompt-shared
noise (`prompt_groups`, `prompt_shared_noises`, `_distinct_rows`) are module-level functions above the class.
"""

import importlib
import inspect
import json
import math
import os
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5EncoderModel,
    T5Tokenizer,
)


logger = logging.get_logger(__name__)

PIPELINE_FILE = "pipeline_dinalrm.py"
MODELING_FILE = "modeling_dinalrm.py"
# The official README's display scale: (raw + 10) / 10.
DISPLAY_OFFSET = 10.0
DISPLAY_SCALE = 10.0
# How many prompts keep their embeddings between calls (alignment loops reuse a fixed prompt set).
PROMPT_CACHE_SIZE = 64
# The most pixels an uploaded image may hold before it is decoded (16.8 MP, 4096 x 4096): the Space and the reward
# server refuse larger uploads by their header, so a small compressed file cannot expand into gigabytes.
MAX_IMAGE_PIXELS = 4096 * 4096
# Float images may overshoot [0, 1] by this much (rounding in upstream processing) before being refused.
FLOAT_RANGE_TOLERANCE = 1e-3
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_EXIF_ORIENTATION = 0x0112
# `noise_sharing`: "prompt" gives the samples of one prompt (and latent shape) one noise draw, "none" one per sample.
NOISE_SHARING_MODES = ("prompt", "none")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from pipeline_dinalrm import DiNaLRMPipeline

        >>> pipe = DiNaLRMPipeline.from_pretrained("liuhuohuo/DiNa-LRM-SD35M-12layers", torch_dtype=torch.float32)
        >>> images = [Image.new("RGB", (512, 512), "red"), Image.effect_noise((512, 512), 64).convert("RGB")]
        >>> generator = torch.Generator().manual_seed(0)
        >>> rewards = pipe("a red square", images=images, generator=generator).rewards
        >>> comparison = pipe.compare("a red square", images[0], images[1], generator=generator)
        >>> print(f"P(first preferred) = {comparison.probability:.3f}, winner: {comparison.winner}")
        >>> best_first = pipe.rank("a red square", images, generator=generator).indices
        ```
"""


@dataclass
class DiNaLRMPipelineOutput(BaseOutput):
    """Output of [`DiNaLRMPipeline`].

    Args:
        rewards (`torch.Tensor` of shape `(num_samples,)`): float32 rewards on the CPU, higher = preferred; raw unless
            `normalize` was passed.
        noise_levels (`list[float]`): the noise levels actually used (snapped to the scheduler's table), one per
            ensemble level.
    """

    rewards: torch.Tensor
    noise_levels: list[float]


@dataclass
class DiNaLRMComparisonOutput(BaseOutput):
    """Output of [`DiNaLRMPipeline.compare`].

    Args:
        probability (`float`): P(image A is preferred over image B) under the model's comparison model.
        winner (`str`): `"a"` when `probability >= 0.5`, else `"b"`.
        rewards (`torch.Tensor` of shape `(2,)`): rewards of A and B (raw unless `normalize=True` was passed).
        noise_level (`float`): the (snapped) noise level whose comparison variance gave `probability`.
    """

    probability: float
    winner: str
    rewards: torch.Tensor
    noise_level: float


@dataclass
class DiNaLRMRankingOutput(BaseOutput):
    """Output of [`DiNaLRMPipeline.rank`].

    Args:
        indices (`list[int]`): positions of the inputs, best first (ties keep the input order).
        rewards (`torch.Tensor` of shape `(num_samples,)`): their rewards in the same order.
    """

    indices: list[int]
    rewards: torch.Tensor


def _as_uint8(array: np.ndarray) -> np.ndarray:
    """8-bit pixels from uint8, uint16 (scaled from the 16-bit range) or float/bool arrays in [0, 1]."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return np.rint(array / 257.0).astype(np.uint8)
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ValueError(
                "a float image holds NaN or infinite values: pass finite values in [0, 1] (a failed decode or a "
                "division by zero upstream?)."
            )
        low, high = float(array.min()), float(array.max())
        if low < -FLOAT_RANGE_TOLERANCE or high > 1.0 + FLOAT_RANGE_TOLERANCE:
            raise ValueError(
                f"float images must hold values in [0, 1], got [{low:.3f}, {high:.3f}]; "
                "for images in [-1, 1] pass (image + 1) / 2, for 0..255 values pass uint8."
            )
        return np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise TypeError(f"unsupported image dtype {array.dtype}: pass uint8, uint16 or float values in [0, 1].")


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    """A PIL image from an (H, W) or (H, W, C) array with C in 1..4 (grey, grey+alpha, RGB, RGBA)."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)):
        raise ValueError(
            f"an image array must be (height, width) or (height, width, channels) with 1-4 channels "
            f"(torch tensors: (channels, height, width)), got shape {tuple(array.shape)}."
        )
    return PIL.Image.fromarray(np.ascontiguousarray(_as_uint8(array)))


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """8-bit RGB of any PIL image: EXIF rotation applied, transparency composited on white, 16-bit rescaled."""
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = PIL.ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(grey).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _open_image(path: str | os.PathLike) -> PIL.Image.Image:
    """The image file at `path`, decoded to RGB (the file is closed again)."""
    with PIL.Image.open(path) as image:
        return to_rgb(image).copy()


def _require_pixels(image) -> None:
    """Refuses an image without pixels (a 0-pixel side), which no resize rule can bring to size."""
    if isinstance(image, PIL.Image.Image):
        empty, shape = min(image.size) == 0, f"{image.width}x{image.height} pixels"
    else:  # numpy array or torch tensor
        empty, shape = 0 in image.shape, f"shape {tuple(image.shape)}"
    if empty:
        raise ValueError(f"an image of {shape} is empty: pass an image with pixels (did its file fail to decode?).")


def _describe(value) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} of shape {tuple(shape)}" if shape is not None else type(value).__name__


# ---------------------------------------------------------------------------------------------- input normalisation
# The steps that turn a call's prompts and images/latents into one validated batch. They are module-level functions
# (not methods) so each can be read and tested alone; the pipeline's `check_inputs` and `__call__` chain them.
_IMAGE_TYPES = (PIL.Image.Image, np.ndarray, torch.Tensor, str, os.PathLike)


def _as_image_list(images) -> list:
    """One list entry per image; 4D numpy arrays / torch tensors are batches, file paths are opened.

    Done before `check_inputs`, so the sample count it checks is the number of images, however they were passed.
    """
    if isinstance(images, _IMAGE_TYPES):
        if getattr(images, "ndim", 3) == 4:
            return list(images)
        images = [images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(
            "images must be a PIL image, numpy array, torch tensor, file path or a list of them, got "
            f"{_describe(images)}."
        )
    if not images:
        raise ValueError("images is an empty list: pass at least one image.")
    for index, image in enumerate(images):
        if not isinstance(image, _IMAGE_TYPES):
            raise TypeError(
                f"images[{index}] is a {_describe(image)}; each image must be a PIL image, a numpy array "
                "(H, W[, C]), a torch tensor (C, H, W) or a file path."
            )
    return [_open_image(image) if isinstance(image, (str, os.PathLike)) else image for image in images]


def _as_rgb_image(image) -> PIL.Image.Image:
    """One image (PIL, numpy `(H, W[, C])` or torch `(C, H, W)`) as 8-bit RGB PIL, the form every resize rule takes.

    Empty images are refused first; tensors are read back to the CPU (floats as float32) and go the numpy way.
    """
    _require_pixels(image)
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        array = array.float() if array.is_floating_point() else array
        image = array.permute(1, 2, 0).numpy() if array.ndim == 3 else array.numpy()
    return to_rgb(image if isinstance(image, PIL.Image.Image) else _array_to_pil(image))


def _count_samples(images: list | None, latents) -> int:
    """How many samples a call scores: `len(images)` (already a list) or the latents' batch.

    Refuses neither or both of `images` and `latents`, and latents that are not a non-empty 4D floating tensor.
    """
    if images is None and latents is None:
        raise ValueError("Pass `images` (PIL, numpy or torch) or `latents` (scaled SD3 VAE latents) to score.")
    if images is not None and latents is not None:
        raise ValueError("Pass either `images` or `latents`, not both.")
    if latents is not None and not (isinstance(latents, torch.Tensor) and latents.ndim == 4):
        raise ValueError(f"latents must be a 4D tensor (batch, 16, height, width), got {_describe(latents)}.")
    if latents is not None and not latents.is_floating_point():
        raise TypeError(
            f"latents must be floating-point VAE latents, got {latents.dtype}: pass float32, bfloat16 or float16."
        )
    num_samples = len(images) if images is not None else latents.shape[0]
    if num_samples == 0:
        raise ValueError("latents hold no sample (batch 0): pass at least one.")
    return num_samples


def _as_prompt_list(prompt: str | list[str]) -> list[str]:
    """`prompt` as a list: a single string serves every sample."""
    return [prompt] if isinstance(prompt, str) else prompt


def _count_prompts(prompt) -> int:
    """How many text prompts `prompt` holds; refuses non-strings, an empty list and blank prompts.

    A blank prompt is refused because the reward measures how well an image matches its prompt.
    """
    prompts = _as_prompt_list(prompt)
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a string or a list of strings, got {_describe(prompt)}.")
    if not prompts:
        raise ValueError("prompt is an empty list: pass one prompt, or one per image.")
    if any(not p.strip() for p in prompts):
        raise ValueError(
            "prompt is empty: DiNa-LRM scores how well an image matches its prompt; pass the prompt the image "
            "was generated from (for an unconditional score pass prompt_embeds from encode_prompt(''))."
        )
    return len(prompts)


def _check_positive_int(name: str, value) -> None:
    """Refuses anything but a positive `int` for the count `name` (`num_noise_samples`, `batch_size`)."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _per_sample(rows: Sequence, indices: Sequence[int]) -> list:
    """The entries of `rows` for the samples at `indices`: one row serves every sample, else row `i` is sample `i`.

    `check_inputs` has made sure `len(rows)` is 1 or the number of samples, so `i % len(rows)` is exactly that rule.
    """
    return [rows[i % len(rows)] for i in indices]


def resize_and_center_crop(image: PIL.Image.Image, size: tuple[int, int]) -> PIL.Image.Image:
    """The one fixed-size resize rule, shared by training and scoring: `image` at exactly `size = (width, height)`.

    The image is scaled with Lanczos filtering (the filter of diffusers' `VaeImageProcessor`), keeping its aspect
    ratio, to the smallest size that covers `size` (the side that does not bind is rounded down, never below the
    target), then the centre is cropped. This is what `VaeImageProcessor.resize(..., resize_mode="crop")` does, pixel
    for pixel on RGB images, without its paste onto a new canvas. Smaller images are upscaled: a training bucket or
    an explicit `resolution=(height, width)` asks for that exact size. `train_dinalrm.py` calls this (through
    `dinalrm.data`) to bring each image to its bucket, and `DiNaLRMPipeline` calls it for `resolution=(h, w)`, so a
    model scores images resized exactly as it was trained on them.
    """
    target_w, target_h = size
    if target_w < 1 or target_h < 1:
        raise ValueError(f"size must be positive, got {target_w}x{target_h}.")
    width, height = image.size
    if target_w / target_h > width / height:
        new_w, new_h = target_w, height * target_w // width
    else:
        new_w, new_h = width * target_h // height, target_h
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), PIL.Image.Resampling.LANCZOS)
    left, top = new_w // 2 - target_w // 2, new_h // 2 - target_h // 2
    return image.crop((left, top, left + target_w, top + target_h))


# ---------------------------------------------------------------------------------------------- prompt-shared noise
# With `noise_sharing="prompt"` the samples of one prompt are scored with one noise draw (common random numbers, as
# the pairs of training were). These units say which samples form a group, draw the groups' noise and find the rows
# of a batch that are scored once (equal latents of one group).


def _check_noise_sharing(noise_sharing: str, generator) -> None:
    """Refuses an unknown `noise_sharing` mode, and a list of generators (one noise per sample) with `"prompt"`."""
    if noise_sharing not in NOISE_SHARING_MODES:
        raise ValueError(
            f"noise_sharing={noise_sharing!r} is not supported: use 'prompt' (one noise draw per prompt) or "
            "'none' (one per sample, the reference protocol)."
        )
    if noise_sharing == "prompt" and isinstance(generator, (list, tuple)):
        raise ValueError(
            "a list of generators gives every sample its own noise: pass noise_sharing='none' with it, or one "
            "generator for noise_sharing='prompt'."
        )


def _first_appearance_ids(keys: Sequence) -> list[int]:
    """Per key, the number of its distinct value, counted in order of first appearance (`a b a c` -> `0 1 0 2`).

    Numbering by first appearance is what makes a group's noise draws come from `generator` in sample order.
    """
    numbers: dict = {}
    return [numbers.setdefault(key, len(numbers)) for key in keys]


def _embedding_row_ids(prompt_embeds, pooled_prompt_embeds) -> list[int]:
    """Per row of precomputed embeddings, the number of its distinct row (first appearance), comparing rows exactly.

    Two rows are one prompt when their `prompt_embeds` rows are equal and so are their `pooled_prompt_embeds` rows
    (Z-Image has none). Rows are compared with `torch.equal`, which reads them back once: a prompt re-encoded in
    another batch may differ in the last bit and then counts as another prompt, never the reverse.
    """
    representatives: list[int] = []
    row_ids = []
    for row in range(len(prompt_embeds)):
        match = next(
            (
                key
                for key, other in enumerate(representatives)
                if torch.equal(prompt_embeds[row], prompt_embeds[other])
                and (
                    pooled_prompt_embeds is None or torch.equal(pooled_prompt_embeds[row], pooled_prompt_embeds[other])
                )
            ),
            None,
        )
        if match is None:
            representatives.append(row)
            match = len(representatives) - 1
        row_ids.append(match)
    return row_ids


def prompt_groups(prompt, prompt_embeds, pooled_prompt_embeds, num_samples: int) -> list[int]:
    """Per sample, the index of its prompt among the distinct prompts, numbered in order of first appearance.

    Prompts are compared as strings; precomputed embeddings row by row (see `_embedding_row_ids`). One prompt or
    embedding row serves every sample.
    """
    if prompt is not None:
        keys = _per_sample(_as_prompt_list(prompt), range(num_samples))
    else:
        keys = _per_sample(_embedding_row_ids(prompt_embeds, pooled_prompt_embeds), range(num_samples))
    return _first_appearance_ids(keys)


def _centre_crop(noise: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centre `height x width` window of the last two axes (the top/left margin is the smaller one when odd)."""
    top, left = (noise.shape[-2] - height) // 2, (noise.shape[-1] - width) // 2
    return noise[..., top : top + height, left : left + width]


def prompt_shared_noises(
    draws: dict,
    groups: list[int],
    parts: list[tuple[list[int], torch.Tensor]],
    num_noise_samples: int,
    generator: torch.Generator | None,
    max_latent_side: int,
) -> list[list[torch.Tensor]]:
    """Per part `(indices, latents)`, its `num_noise_samples` noise tensors under prompt sharing.

    A prompt group not in `draws` yet gets `num_noise_samples` draws from `generator` (groups taken in the order of
    their first sample), each at `max_latent_side`, the largest latent side the backbone takes
    ([`DiNaLRMPipeline.max_latent_side_for`]); every latent gets the centre crop of its size. Latents of one size thus
    share the noise exactly, and latents of other sizes share it where their centres align. As the parts hold
    consecutive samples, the draws (and so every score) do not depend on how the inputs are batched. The reward
    server draws one latent's noise with it too, so a sample scored there equals the pipeline's score.
    """
    latents = parts[0][1]
    shape = (1, latents.shape[1], max_latent_side, max_latent_side)
    for group in sorted({groups[index] for indices, _ in parts for index in indices}):
        if group not in draws:
            draws[group] = [
                randn_tensor(shape, generator=generator, device=latents.device, dtype=latents.dtype)
                for _ in range(num_noise_samples)
            ]
    return [
        [
            torch.cat([_centre_crop(draws[groups[i]][k], *part.shape[-2:]) for i in indices])
            for k in range(num_noise_samples)
        ]
        for indices, part in parts
    ]


def _first_equal_rows(flat: torch.Tensor, keys: list) -> tuple[list[int], list[int]]:
    """The rows of `flat` that differ from every earlier row in value or key, and for each row the position (in
    that list) of the first row it equals."""
    rows: list[int] = []
    source = []
    for position, key in enumerate(keys):
        match = next(
            (k for k, row in enumerate(rows) if keys[row] == key and torch.equal(flat[row], flat[position])), None
        )
        if match is None:
            rows.append(position)
            match = len(rows) - 1
        source.append(match)
    return rows, source


def _distinct_rows(indices: list[int], latents: torch.Tensor, noises: list[torch.Tensor], groups: list[int]):
    """The rows of a part that differ in latent or prompt group, and where each sample's reward comes from.

    Equal latents of one prompt group get the same shared noise, hence the same reward; scoring them once makes
    that exact (a batched pass may round equal rows differently) and saves the work. Returns `(indices,
    latents, noises, (all indices, row of each))` for the distinct rows.
    """
    rows, source = _first_equal_rows(latents.flatten(1), [groups[index] for index in indices])
    kept = [indices[row] for row in rows]
    return kept, latents[rows], [noise[rows] for noise in noises], (indices, source)


@dataclass
class _ScoringInputs:
    """One call's inputs once validated: the samples (a list of images or a latent batch), their prompts (text or
    precomputed embeddings, one for all samples or one per sample) and, under prompt-shared noise, each sample's
    prompt group (`prompt_groups`; `None` when every sample draws its own noise).

    [`DiNaLRMPipeline._validated_inputs`] builds it; the scoring steps read it instead of five loose arguments.
    """

    images: list | None
    latents: torch.Tensor | None
    prompt: str | list[str] | None
    prompt_embeds: torch.Tensor | list[torch.Tensor] | None
    pooled_prompt_embeds: torch.Tensor | None
    groups: list[int] | None

    @property
    def num_samples(self) -> int:
        return len(self.images) if self.images is not None else self.latents.shape[0]


def _require_rankable(rewards: torch.Tensor) -> None:
    """Refuses NaN rewards, which have no place in an order (a sort would silently put them first)."""
    if torch.isnan(rewards).any():
        raise ValueError(
            f"rewards {rewards.tolist()} hold NaN, so they cannot be ranked: the inputs hold NaN or infinite values "
            "(scored with check_finite=False?). Pass finite images or latents and prompt embeddings."
        )


def _installed_modeling():
    """The installed `modeling_dinalrm` (this file's companion); its classes load every repository's weights."""
    try:
        return importlib.import_module(MODELING_FILE.removesuffix(".py"))
    except ImportError as error:
        raise ImportError(
            "DiNaLRMPipeline.from_pretrained loads with the installed dinalrm classes: install dinalrm "
            "(`pip install -e .` in its repository), or load a pipeline repository with its own code through "
            "`DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)`."
        ) from error


def _has_model_section(folder: str) -> bool:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as handle:
        return isinstance(json.load(handle).get("model"), dict)


# The SD3 components the pipeline takes from a base pipeline (never its transformer), and the libraries allowed to
# provide them.
BASE_COMPONENTS = (
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "scheduler",
)
_COMPONENT_LIBRARIES = ("diffusers", "transformers")


def load_base_components(
    base: str | os.PathLike,
    torch_dtype: torch.dtype | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    role: str = "base model",
    names: Sequence[str] = BASE_COMPONENTS,
    optional: Sequence[str] = ("text_encoder_3", "tokenizer_3"),
) -> dict:
    r"""The components of an SD3 (or DiNa-LRM) pipeline but its transformer and reward model, each loaded from its
    own subfolder with the class `model_index.json` names (diffusers and transformers classes only).

    For a Hub id only those subfolders are downloaded (no transformer, no single-file checkpoints, no fp16/bf16
    duplicates); a gated, missing or unreachable repository stops with one message saying what to do.

    Args:
        base (`str` or `os.PathLike`): SD3 pipeline Hub id or folder, e.g. `"stabilityai/stable-diffusion-3.5-medium"`.
        torch_dtype (`torch.dtype`, *optional*): dtype of the models (default: float32).
        names (`Sequence[str]`, defaults to SD3's): the components to load; optional: those that may be missing.
    """
    modeling = _installed_modeling()
    patterns = ["model_index.json"] + [
        f"{name}/*.{ext}" for name in names for ext in ("json", "txt", "model", "jinja", "safetensors")
    ]
    folder, _ = modeling.resolve_repo(base, patterns, role, revision, token, cache_dir)
    model_index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(model_index_path):
        raise ValueError(f"{base} has no model_index.json: pass an SD3 pipeline (Hub id or folder).")
    with open(model_index_path, encoding="utf-8") as handle:
        model_index = json.load(handle)
    components = {}
    for name in names:
        library, class_name = model_index.get(name) or (None, None)
        if class_name is None:
            if name not in optional:
                raise ValueError(f"{base} has no {name}; the DiNa-LRM pipeline needs SD3's {name}.")
            components[name] = None
            continue
        if library not in _COMPONENT_LIBRARIES:
            raise ValueError(f"{base}'s {name} comes from {library!r}; only {_COMPONENT_LIBRARIES} are loaded.")
        component_class = getattr(importlib.import_module(library), class_name)
        options = {} if name.startswith(("tokenizer", "scheduler")) else {"dtype": torch_dtype or torch.float32}
        components[name] = component_class.from_pretrained(os.path.join(folder, name), **options)
    return components


class DiNaLRMPipeline(DiffusionPipeline):
    r"""Scores images or SD3 latents against prompts with the DiNa-LRM latent reward model.

    A clean latent is noised to level `t` (or to several levels for the ensemble) and read by the first blocks of
    SD3.5-Medium's MMDiT plus a small query head (the `reward_model`). The text encoders, tokenizers and VAE are
    SD3's; the `scheduler` is SD3's too and documents the noise-level table the reward model snaps `t` to (the
    table itself comes from the reward model's config).

    Args:
        reward_model ([`DiNaLRMModel`]): the reward model (remote code in `reward_model/modeling_dinalrm.py`).
        vae ([`AutoencoderKL`]): SD3's VAE; images are encoded to `(mode - shift_factor) * scaling_factor`.
        text_encoder / text_encoder_2 ([`CLIPTextModelWithProjection`]): CLIP-L and OpenCLIP-bigG.
        text_encoder_3 ([`T5EncoderModel`], *optional*): T5-XXL; without it the T5 part of the prompt is zeros, as
            in SD3.
        tokenizer / tokenizer_2 ([`CLIPTokenizer`]), tokenizer_3 ([`T5Tokenizer`], *optional*): their tokenizers.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): SD3's scheduler (shift 3 for SD3.5).
        compile (`bool`, defaults to `False`): compile the reward model's backbone blocks with `torch.compile`
            ([`DiNaLRMModel.compile_repeated_blocks`]); off by default (see `benchmarks/bench_compile.py`).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->vae->reward_model"
    _optional_components = ["text_encoder_3", "tokenizer_3"]
    # The components (all but the reward model) `from_pretrained` loads from a saved repository.
    _base_components = BASE_COMPONENTS

    def __init__(
        self,
        reward_model: PreTrainedModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel | None,
        tokenizer_3: T5Tokenizer | None,
        scheduler: FlowMatchEulerDiscreteScheduler,
        compile: bool = False,
    ):
        super().__init__()
        self.register_modules(
            reward_model=reward_model,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            scheduler=scheduler,
        )
        self._set_up_scoring(compile)

    def _set_up_scoring(self, compile: bool = False) -> None:
        """The image processor, the prompt cache and the noise-table check every family's pipeline needs; with
        `compile`, the reward model's backbone blocks are compiled (see `DiNaLRMModel.compile_repeated_blocks`)."""
        if compile:
            self.reward_model.compile_repeated_blocks()
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._prompt_cache: OrderedDict = OrderedDict()
        scheduler_table = (self.scheduler.config.shift, self.scheduler.config.num_train_timesteps)
        reward_table = (self.reward_model.config.scheduler_shift, self.reward_model.config.num_train_timesteps)
        if scheduler_table != reward_table:
            logger.warning(
                f"The scheduler's (shift, num_train_timesteps) = {scheduler_table} differ from the table the reward "
                f"model snaps t to, {reward_table}; rewards follow the reward model's config."
            )

    # ------------------------------------------------------------------------------------------ properties
    @property
    def patch_size(self) -> int:
        return self.reward_model.config.latent_patch_size

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: one backbone patch after the VAE's downsampling."""
        return self.vae_scale_factor * self.patch_size

    @classmethod
    def max_latent_side_for(cls, reward_model: PreTrainedModel) -> int:
        """The largest latent side `reward_model`'s backbone takes (SD3: its position table); prompt-shared noise is
        drawn at it. Also for callers that score latents with the reward model alone (the reward server)."""
        family_class = cls._class_for(reward_model)
        if family_class is not cls:
            return family_class.max_latent_side_for(reward_model)
        return reward_model.config.backbone_config["pos_embed_max_size"] * reward_model.config.latent_patch_size

    @property
    def max_latent_side(self) -> int:
        """The largest latent side the backbone takes; prompt-shared noise is drawn at it."""
        return self.max_latent_side_for(self.reward_model)

    @property
    def default_resolution(self) -> int:
        """The backbone's native image side (1024 for SD3.5-Medium), the default area cap for images."""
        return self.reward_model.config.backbone_config["sample_size"] * self.vae_scale_factor

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_sd3(cls, sd3_pipeline: DiffusionPipeline, reward_model: PreTrainedModel) -> "DiNaLRMPipeline":
        """Builds the pipeline around an already loaded `StableDiffusion3Pipeline`, sharing (not copying) its VAE,
        text encoders, tokenizers and scheduler, so an alignment loop holds one copy of each."""
        shared = (
            "vae",
            "text_encoder",
            "tokenizer",
            "text_encoder_2",
            "tokenizer_2",
            "text_encoder_3",
            "tokenizer_3",
            "scheduler",
        )
        return cls(reward_model=reward_model, **{name: getattr(sd3_pipeline, name) for name in shared})

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        base_model: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        compile: bool = False,
        **kwargs,
    ) -> "DiNaLRMPipeline":
        r"""Loads a DiNa-LRM pipeline repository, or an official checkpoint, with the installed classes.

        - A pipeline repository (`model_index.json`, as `save_pretrained` writes it): the reward model is loaded
          with the installed `DiNaLRMModel` and the rest by diffusers; the repository's code files are not run.
          (Its own code runs only through `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`, or
          with `trust_remote_code=True` here.)
        - An official checkpoint (`config.json` with a `model` section and `checkpoint/`, e.g.
          `"liuhuohuo/DiNa-LRM-SD35M-12layers"`): the reward model is converted from it and the first blocks of
          `base_model`'s transformer (cached on disk after the first load), and the VAE, text encoders, tokenizers
          and scheduler come from `base_model`, which is gated on the Hub: accept its licence on the model page
          and run `hf auth login`, or pass a local folder.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): Hub id or local folder.
            base_model (`str` or `os.PathLike`, *optional*): for official checkpoints, the SD3 pipeline (Hub id or
                folder); defaults to `"stabilityai/stable-diffusion-3.5-medium"`. Its transformer file is read only
                for the kept blocks and is never loaded as a whole.
            torch_dtype (`torch.dtype`, *optional*): the dtype of every component, whatever the repository was
                saved in; defaults to `torch.float32`.
            compile (`bool`, defaults to `False`): compile the reward model's backbone blocks with `torch.compile`
                (regional compilation: the first call compiles, later calls run faster; see
                `benchmarks/bench_compile.py`).
            kwargs: `revision`, `token`, `cache_dir` and the other options of `DiffusionPipeline.from_pretrained`.
        """
        torch_dtype = torch_dtype or kwargs.pop("dtype", None) or torch.float32
        if kwargs.get("trust_remote_code"):
            pipeline = super().from_pretrained(pretrained_model_name_or_path, dtype=torch_dtype, **kwargs)
            if compile:
                pipeline.reward_model.compile_repeated_blocks()
            return pipeline
        modeling = _installed_modeling()
        hub = {key: kwargs[key] for key in ("revision", "token", "cache_dir") if key in kwargs}
        folder, _ = modeling.resolve_repo(
            pretrained_model_name_or_path,
            ["config.json", "model_index.json", "reward_model/config.json"],
            "DiNa-LRM model",
            **hub,
        )
        if modeling.is_official_checkpoint(folder) or (
            not os.path.isfile(os.path.join(folder, "model_index.json")) and _has_model_section(folder)
        ):
            base_model = base_model or modeling.SD35_MEDIUM_ID
            reward_model = modeling.load_official_checkpoint(
                pretrained_model_name_or_path, base_model, torch_dtype=torch_dtype, **hub
            )
            components = load_base_components(base_model, torch_dtype=torch_dtype, token=hub.get("token"))
            return cls(reward_model=reward_model, compile=compile, **components)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise ValueError(
                f"{pretrained_model_name_or_path} is neither a DiNa-LRM pipeline (model_index.json) nor an official "
                "DiNa-LRM checkpoint (config.json with a `model` section and checkpoint/)."
            )
        if base_model is not None:
            raise ValueError(
                f"base_model is for official checkpoints; {pretrained_model_name_or_path} is a pipeline repository "
                "that already holds its components. Drop base_model."
            )
        if not os.path.isfile(os.path.join(folder, "reward_model", "config.json")):
            raise ValueError(
                f"{pretrained_model_name_or_path} has a model_index.json but no reward_model/config.json: it is not "
                "a complete DiNa-LRM pipeline (save one with DiNaLRMPipeline.save_pretrained or "
                "scripts/build_hub_repo.py)."
            )
        with modeling.hub_errors(str(pretrained_model_name_or_path), "DiNa-LRM model"):
            reward_model = modeling.DiNaLRMModel.from_pretrained(
                pretrained_model_name_or_path, subfolder="reward_model", dtype=torch_dtype, **hub
            )
        pipeline_class = cls._class_for(reward_model)
        components = load_base_components(
            pretrained_model_name_or_path,
            torch_dtype=torch_dtype,
            role="DiNa-LRM model",
            names=pipeline_class._base_components,
            optional=pipeline_class._optional_components,
            **hub,
        )
        return pipeline_class(reward_model=reward_model, compile=compile, **components)

    @classmethod
    def _class_for(cls, reward_model: PreTrainedModel) -> type["DiNaLRMPipeline"]:
        """The pipeline class of the reward model's backbone family (`DiNaLRMPipeline.from_pretrained` on a FLUX
        repository gives a [`DiNaLRMFluxPipeline`]); a family-specific class keeps itself."""
        if cls is not DiNaLRMPipeline:
            return cls
        family = getattr(reward_model.config, "backbone", "sd3")
        classes = {"sd3": DiNaLRMPipeline, "flux": DiNaLRMFluxPipeline, "zimage": DiNaLRMZImagePipeline}
        if family not in classes:
            raise ValueError(
                f"there is no pipeline for {family} reward models yet: load the reward model with "
                "DiNaLRMModel.from_pretrained(repo, subfolder='reward_model') and score latents with score_latents."
            )
        return classes[family]

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Saves the Hub layout that reloads in a fresh process (diffusers' own save copies no code files).

        Writes every component, then `pipeline_dinalrm.py` at the root, `reward_model/modeling_dinalrm.py`, and a
        `model_index.json` naming both files. With `push_to_hub`, uploads the folder (`repo_id`, `token`, `private`,
        `commit_message`, `create_pr` as in diffusers).
        """
        hub_options = {
            key: kwargs.pop(key)
            for key in ("repo_id", "token", "private", "commit_message", "create_pr")
            if key in kwargs
        }
        super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        self._write_hub_layout(str(save_directory))
        if push_to_hub:
            repo_id = hub_options.get("repo_id", os.path.basename(os.path.abspath(save_directory)))
            token = hub_options.get("token")
            repo_id = create_repo(repo_id, exist_ok=True, private=hub_options.get("private"), token=token).repo_id
            self._upload_folder(
                save_directory,
                repo_id,
                token=token,
                commit_message=hub_options.get("commit_message"),
                create_pr=hub_options.get("create_pr", False),
            )

    def _write_hub_layout(self, save_directory: str) -> None:
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

    # ------------------------------------------------------------------------------------------ prompts
    def _tokenize(self, tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
        """Token ids padded to `max_length`; warns (as SD3 and the reference's training do) when text is cut."""
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > max_length:
            logger.warning(f"Prompts longer than {max_length} {type(tokenizer).__name__} tokens were truncated.")
        return ids.input_ids

    def _clip_prompt_embeds(
        self, prompts: list[str], tokenizer, text_encoder, device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self._tokenize(tokenizer, prompts, tokenizer.model_max_length)
        output = text_encoder(ids.to(device), output_hidden_states=True)
        return output.hidden_states[-2], output.text_embeds

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device | None = None,
        max_sequence_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""SD3 prompt embeddings, encoded as the reward model was trained.

        CLIP-L and OpenCLIP-bigG penultimate hidden states are joined on channels and zero-padded to the T5 width;
        T5's last hidden state (`max_sequence_length` tokens, default `reward_model.config.max_sequence_length`)
        follows on the token axis. Without `text_encoder_3` the T5 part is zeros, as in SD3. Empty strings are
        encoded like any other (an unconditional embedding); the pipeline call itself refuses empty prompts.

        Returns:
            `(prompt_embeds, pooled_prompt_embeds)` of shapes `(B, 77 + max_sequence_length, joint_attention_dim)`
            and `(B, pooled_projection_dim)` (the two CLIP text embeddings side by side).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self._execution_device
        max_sequence_length = max_sequence_length or self.reward_model.config.max_sequence_length
        clip_l, pooled_l = self._clip_prompt_embeds(prompts, self.tokenizer, self.text_encoder, device)
        clip_g, pooled_g = self._clip_prompt_embeds(prompts, self.tokenizer_2, self.text_encoder_2, device)
        t5_width = self.reward_model.config.backbone_config["joint_attention_dim"]
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(prompts), max_sequence_length, t5_width, device=device, dtype=clip_l.dtype)
        else:
            ids = self._tokenize(self.tokenizer_3, prompts, max_sequence_length)
            t5 = self.text_encoder_3(ids.to(device))[0]
        clip = torch.cat([clip_l, clip_g], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])).to(t5.dtype)
        return torch.cat([clip, t5], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)

    @torch.no_grad()
    def _cached_prompt_embeds(
        self, prompts: list[str], device: torch.device, max_sequence_length: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of `prompts`; each distinct prompt is encoded once and kept for later calls (LRU)."""
        max_sequence_length = max_sequence_length or self.reward_model.config.max_sequence_length
        keys = [(p, max_sequence_length) for p in prompts]
        missing = [key for key in dict.fromkeys(keys) if key not in self._prompt_cache]
        rows = {key: self._prompt_cache[key] for key in dict.fromkeys(keys) if key in self._prompt_cache}
        if missing:
            embeds, pooled = self.encode_prompt([p for p, _ in missing], device, max_sequence_length)
            rows.update({key: self._select_rows(embeds, pooled, [i], device) for i, key in enumerate(missing)})
        for key, value in rows.items():
            self._prompt_cache[key] = value
            self._prompt_cache.move_to_end(key)
        while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return self._join_rows([rows[key] for key in keys], device)

    @staticmethod
    def _select_rows(prompt_embeds, pooled_prompt_embeds, rows: list[int], device) -> tuple:
        """The embeddings of the prompts at `rows` (copies, on `device`), in the family's format."""
        return prompt_embeds[rows].to(device), pooled_prompt_embeds[rows].to(device)

    @staticmethod
    def _join_rows(parts: list[tuple], device) -> tuple:
        """One batch of embeddings from `_select_rows` parts, on `device`."""
        return torch.cat([part[0] for part in parts]).to(device), torch.cat([part[1] for part in parts]).to(device)

    def _prompt_embeds_for(
        self, inputs: _ScoringInputs, indices: list[int], device, max_sequence_length
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings of the samples at `indices` (a single prompt or embedding row serves every sample)."""
        if inputs.prompt is not None:
            return self._cached_prompt_embeds(
                _per_sample(_as_prompt_list(inputs.prompt), indices), device, max_sequence_length
            )
        rows = _per_sample(range(len(inputs.prompt_embeds)), indices)
        return self._select_rows(inputs.prompt_embeds, inputs.pooled_prompt_embeds, rows, device)

    # ------------------------------------------------------------------------------------------ images
    def _fit(self, image: PIL.Image.Image, resolution: int | tuple[int, int] | None) -> PIL.Image.Image:
        """The RGB image at a size the VAE and the patch size accept; see `__call__`'s `resolution` for the rule."""
        multiple = self.size_multiple
        if isinstance(resolution, (tuple, list)):
            if len(resolution) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in resolution):
                raise ValueError(f"resolution=(height, width) takes two integers, got {resolution!r}.")
            height, width = resolution
            if height % multiple or width % multiple or min(height, width) < multiple:
                raise ValueError(
                    f"resolution={tuple(resolution)} must be positive multiples of {multiple} (VAE factor "
                    f"{self.vae_scale_factor} x patch size {self.patch_size})."
                )
            return resize_and_center_crop(image, (width, height))
        if resolution is not None and (
            isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < multiple
        ):
            raise ValueError(
                f"resolution={resolution!r} must be an integer side of at least {multiple} pixels, a (height, width) "
                f"pair, or None for the default ({self.default_resolution})."
            )
        original_size = image.size
        scale = min(1.0, (resolution or self.default_resolution) / math.sqrt(image.width * image.height))
        if scale < 1.0:
            image = self.image_processor.resize(
                image, max(1, round(image.height * scale)), max(1, round(image.width * scale))
            )
        height, width = image.height // multiple * multiple, image.width // multiple * multiple
        if min(height, width) < multiple:
            raise ValueError(
                f"an image of {original_size[0]}x{original_size[1]} pixels is too small: each side must be at least "
                f"{multiple} pixels (one {self.patch_size}x{self.patch_size} backbone patch after the VAE's "
                f"{self.vae_scale_factor}x downsampling). Upscale it or pass a larger image."
            )
        left, top = (image.width - width) // 2, (image.height - height) // 2
        return image.crop((left, top, left + width, top + height))

    def _preprocess(self, image, resolution) -> torch.Tensor:
        """One image as a `(1, 3, H, W)` tensor in [-1, 1]: converted to RGB, then brought to size by `_fit`."""
        fitted = self._fit(_as_rgb_image(image), resolution)
        return self.image_processor.preprocess(fitted, height=fitted.height, width=fitted.width)

    def _encode_pixels(
        self, pixels: torch.Tensor, sample_posterior: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        posterior = self.vae.encode(pixels.to(self._execution_device, self.vae.dtype)).latent_dist
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        shift = self.vae.config.shift_factor or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).contiguous()

    @torch.no_grad()
    def encode_images(
        self,
        images,
        resolution: int | tuple[int, int] | None = None,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        r"""Scaled SD3 latents `(B, 16, H/8, W/8)` of images, exactly as the pipeline call encodes them.

        Conversion, resizing and `resolution` follow `__call__`. All images must come out at one size (pass
        `resolution=(height, width)` to force one); `__call__` itself groups images of different sizes.
        """
        pixels = [self._preprocess(image, resolution) for image in _as_image_list(images)]
        sizes = {tuple(p.shape[-2:]) for p in pixels}
        if len(sizes) > 1:
            raise ValueError(
                f"the images come out at different sizes {sorted(sizes)}: pass resolution=(height, width) to encode "
                "them at one size, or encode them separately."
            )
        return self._encode_pixels(torch.cat(pixels), sample_posterior, generator)

    # ------------------------------------------------------------------------------------------ checks
    def _noise_levels(self, t: float | Sequence[float] | None) -> list[float]:
        """The requested levels as a list (one entry unless ensembling); refuses values outside [0, 1]."""
        if t is None:
            t = self.reward_model.config.default_t
        levels = [t] if isinstance(t, (int, float)) else t
        if not isinstance(levels, (list, tuple)) or not levels:
            raise ValueError(f"t must be a float in [0, 1] or a non-empty list of them, got {t!r}.")
        for level in levels:
            if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 <= level <= 1.0:
                raise ValueError(f"t is the noise fraction and must lie in [0, 1]; got {level!r}.")
        return [float(level) for level in levels]

    def _snapped(self, level: float) -> float:
        return float(self.reward_model.snap_noise_level(level, 1)[0][0])

    def check_inputs(
        self,
        prompt,
        images,
        latents,
        prompt_embeds,
        pooled_prompt_embeds,
        t,
        num_noise_samples: int = 1,
        batch_size: int = 1,
    ) -> None:
        """Raises a `ValueError`/`TypeError` naming the fix for inputs the pipeline cannot score.

        `images` is the list `_as_image_list` makes. The checks run in a fixed order (samples, prompts, their
        counts, `t`, the integer options), so one input gives one message.
        """
        num_samples = _count_samples(images, latents)
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass `prompt` or precomputed `prompt_embeds` and `pooled_prompt_embeds`.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is not None:
            count = _count_prompts(prompt)
        else:
            count = self._check_prompt_embeds(prompt_embeds, pooled_prompt_embeds)
        if count not in (1, num_samples):
            raise ValueError(
                f"{count} prompts for {num_samples} images: pass one prompt for all images or one per image."
            )
        self._noise_levels(t)
        _check_positive_int("num_noise_samples", num_noise_samples)
        _check_positive_int("batch_size", batch_size)

    @staticmethod
    def _check_prompt_embeds(prompt_embeds, pooled_prompt_embeds) -> int:
        """Checks precomputed embeddings in the family's format; returns how many prompts they hold."""
        if pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds as well (both come from encode_prompt).")
        for name, value in (("prompt_embeds", prompt_embeds), ("pooled_prompt_embeds", pooled_prompt_embeds)):
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
                raise TypeError(
                    f"{name} must be a floating-point torch tensor (from encode_prompt), got {_describe(value)}"
                    + (f" of {value.dtype}." if isinstance(value, torch.Tensor) else ".")
                )
        if prompt_embeds.ndim != 3 or pooled_prompt_embeds.ndim != 2:
            raise ValueError(
                f"prompt_embeds must be (batch, tokens, dim) and pooled_prompt_embeds (batch, dim); got "
                f"{_describe(prompt_embeds)} and {_describe(pooled_prompt_embeds)}."
            )
        if prompt_embeds.shape[0] != pooled_prompt_embeds.shape[0]:
            raise ValueError("prompt_embeds and pooled_prompt_embeds must have the same batch size.")
        return prompt_embeds.shape[0]

    def _validated_inputs(
        self,
        prompt,
        images,
        latents,
        prompt_embeds,
        pooled_prompt_embeds,
        t,
        num_noise_samples: int,
        batch_size: int,
        noise_sharing: str,
        generator,
    ) -> _ScoringInputs:
        """A call's inputs as one validated batch: images listed (`_as_image_list`), everything checked
        (`check_inputs`, then the noise-sharing mode), and the samples grouped by prompt for shared noise."""
        images = _as_image_list(images) if images is not None else None
        self.check_inputs(
            prompt, images, latents, prompt_embeds, pooled_prompt_embeds, t, num_noise_samples, batch_size
        )
        _check_noise_sharing(noise_sharing, generator)
        inputs = _ScoringInputs(images, latents, prompt, prompt_embeds, pooled_prompt_embeds, groups=None)
        if noise_sharing == "prompt":
            inputs.groups = prompt_groups(prompt, prompt_embeds, pooled_prompt_embeds, inputs.num_samples)
        return inputs

    # ------------------------------------------------------------------------------------------ scoring
    def _score(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        levels: list[float],
        num_noise_samples: int,
        generator: torch.Generator | None,
        check_finite: bool,
        noises: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Rewards of clean latents, averaged over `num_noise_samples` noise draws.

        The draws are `noises` (one tensor shaped like `latents` per draw) when given, else taken in order from
        `generator`, one per sample. The noise convention (snapping, one noise shared by all ensemble levels) is
        `reward_model.score_latents`'s; `check_finite` is its value check (NaN / infinite latents or prompt
        embeddings), done once per batch.
        """
        draws = [
            self.reward_model.score_latents(
                latents,
                prompt_embeds,
                pooled_prompt_embeds,
                t=levels,
                noise=None if noises is None else noises[draw],
                generator=generator,
                check_finite=check_finite and draw == 0,
            )
            for draw in range(num_noise_samples)
        ]
        return torch.stack(draws).mean(dim=0)

    def normalize_rewards(
        self, rewards: torch.Tensor, normalize: bool | str, t: float | list[float] | None = None
    ) -> torch.Tensor:
        """Raw rewards (`normalize=False`), the official display score `(raw + 10) / 10` (`True`), calibrated
        scores (`"logistic"`, see [`DiNaLRMModel.calibrated_score`]) or z-scores (`"zscore"`: `(raw - mean) / std`
        from the model's reward statistics, see [`DiNaLRMModel.zscore`]) of rewards read at noise level(s) `t`."""
        if normalize == "logistic":
            return self.reward_model.calibrated_score(rewards, self._noise_levels(t))
        if normalize == "zscore":
            return self.reward_model.zscore(rewards, self._noise_levels(t))
        if normalize not in (True, False):
            raise ValueError(f"normalize must be False, True, 'logistic' or 'zscore', got {normalize!r}.")
        return (rewards + DISPLAY_OFFSET) / DISPLAY_SCALE if normalize else rewards

    def _preference_probability(
        self, rewards_a: torch.Tensor, rewards_b: torch.Tensor, level: float, levels: list[float]
    ) -> torch.Tensor:
        """The fitted calibration curve when the model has one for `levels`, else the training objective at
        `level`."""
        calibrated = self.reward_model.calibrated_probability(rewards_a, rewards_b, levels)
        if calibrated is not None:
            return calibrated
        return self.reward_model.preference_probability(rewards_a, rewards_b, level)

    def reward_fn(
        self,
        latents: torch.Tensor,
        prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        t: float | list[float] | None = None,
        num_noise_samples: int = 1,
        generator: torch.Generator | None = None,
        normalize: bool | str = False,
        max_sequence_length: int | None = None,
        noise_sharing: str = "none",
    ) -> torch.Tensor:
        r"""Differentiable rewards `(B,)` of clean latents for alignment loops (ReFL: `loss = -rewards.mean()`).

        The autograd graph runs from `latents` to the rewards (no batching, no progress bar, rewards stay on the
        latents' device). Give the generator pipeline's own `prompt_embeds` / `pooled_prompt_embeds`, or `prompt`:
        prompts are encoded once and cached across calls. Freeze the reward model yourself
        (`pipe.reward_model.requires_grad_(False)`) if only the generator should receive gradients. Input values are
        not checked for NaN / infinity: reading them back would wait for the accelerator on every call (and break
        `torch.compile` graphs); check the rewards, or call the reward model with `check_finite=True`, to debug.

        `noise_sharing` defaults to `"none"`: every sample gets its own noise draw (one per sample from
        `generator`), so the samples' reward gradients carry independent noise. `"prompt"` gives the samples of one
        prompt one shared draw, as `__call__` does by default (see there); with precomputed embeddings it compares
        their rows, which reads them back once per call.
        """
        inputs = self._validated_inputs(
            prompt,
            None,
            latents,
            prompt_embeds,
            pooled_prompt_embeds,
            t,
            num_noise_samples,
            1,
            noise_sharing,
            generator,
        )
        indices = list(range(inputs.num_samples))
        embeds, pooled = self._prompt_embeds_for(inputs, indices, latents.device, max_sequence_length)
        noises = None
        if inputs.groups is not None:
            noises = prompt_shared_noises(
                {}, inputs.groups, [(indices, latents.detach())], num_noise_samples, generator, self.max_latent_side
            )[0]
        levels = self._noise_levels(t)
        rewards = self._score(latents, embeds, pooled, levels, num_noise_samples, generator, False, noises)
        return self.normalize_rewards(rewards, normalize, levels)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        images=None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        t: float | list[float] | None = None,
        num_noise_samples: int = 1,
        generator: torch.Generator | None = None,
        batch_size: int = 8,
        normalize: bool | str = False,
        resolution: int | tuple[int, int] | None = None,
        sample_posterior: bool = False,
        max_sequence_length: int | None = None,
        return_dict: bool = True,
        check_finite: bool = True,
        noise_sharing: str = "prompt",
    ) -> DiNaLRMPipelineOutput | tuple:
        r"""Rewards of images or clean latents for their prompts.

        Args:
            prompt (`str` or `list[str]`): one prompt for all samples or one per sample (not empty).
            images (PIL image, numpy array, torch tensor, file path, or a list of them): numpy arrays are
                `(H, W[, C])`, torch tensors `(C, H, W)`; 4D arrays/tensors are batches; paths are opened with PIL.
                Grey, grey+alpha, RGB and RGBA are accepted, as uint8, uint16 (16-bit) or floats in [0, 1]; PIL
                images of any mode (16-bit, palette, CMYK, ...).
                Transparency is composited on white and EXIF rotation applied. Each image is then resized and
                center-cropped (see `resolution`) and encoded with the VAE's posterior mode (or a posterior sample
                with `sample_posterior=True`) to `(latent - shift_factor) * scaling_factor`.
            latents (`torch.Tensor` of shape `(B, 16, h, w)`): clean scaled SD3 latents instead of images, e.g. from
                `StableDiffusion3Pipeline(..., output_type="latent")`.
            prompt_embeds / pooled_prompt_embeds (`torch.Tensor`): precomputed embeddings instead of `prompt`
                (see `encode_prompt`); one row for all samples or one per sample.
            t (`float` or `list[float]`, *optional*): noise level in [0, 1] (snapped to the scheduler's table), or a
                list of levels for the token-level ensemble (one backbone pass per level, one noise shared by all
                levels). Defaults to `reward_model.config.default_t` (0.4); the paper's ensemble is
                `reward_model.config.ensemble_t` (0.2, 0.5, 0.7).
            num_noise_samples (`int`): average the reward over this many noise draws (lower variance); with
                `noise_sharing="prompt"` these are draws per prompt group, shared by its samples.
            generator (`torch.Generator`, *optional*): source of every random draw (posterior samples, then the
                scoring noise, batch by batch); the same generator state gives the same rewards.
            batch_size (`int`): samples per VAE/backbone pass; more samples show a progress bar.
            normalize (`bool` or `str`): `True` returns the display score `(raw + 10) / 10` instead of the raw
                reward; `"zscore"` returns `(raw - mean) / std` from the model's reward statistics (`eval/reward_stats.py`);
                `"logistic"` returns calibrated scores in (0, 1) from the model's fitted calibration
                (`eval/calibrate.py`): the probability that the sample is preferred over a median one.
            resolution (`int` or `(height, width)`, *optional*): the resize rule. An `int` caps the image area at
                `resolution**2` pixels (default: the backbone's native side, 1024 for SD3.5-Medium): larger images
                are downscaled (Lanczos) keeping their aspect ratio, smaller ones are never upscaled; then a center
                crop of at most 15 pixels in each dimension makes both sides multiples of
                `vae_scale_factor * patch_size` (16 for SD3). A `(height, width)` pair (multiples of 16) resizes the
                image to cover that size and center-crops it to exactly that size.
            sample_posterior (`bool`): encode images with a VAE posterior sample instead of its mode.
            max_sequence_length (`int`, *optional*): T5 tokens; defaults to `reward_model.config.max_sequence_length`.
            return_dict (`bool`): return a [`DiNaLRMPipelineOutput`] instead of a tuple.
            check_finite (`bool`, defaults to `True`): refuse latents (given or encoded) and prompt embeddings that
                hold NaN or infinite values, which would give NaN rewards. The check reads the values back, one
                device sync per batch; pass `False` to skip it.
            noise_sharing (`str`, defaults to `"prompt"`): `"prompt"` scores the samples that share a prompt with
                ONE noise draw (common random numbers, as in training, where both images of a pair get the same
                noise): differences between them carry no noise-draw variance, identical images get identical
                rewards, and `compare` gives P = 0.5 for them. Each prompt takes its draws from `generator` in the
                order of its first sample, at the backbone's largest latent size; every latent gets the centre crop
                of its own size, so images of different sizes share the noise where their centres align. Rewards do
                not depend on `batch_size` (without `sample_posterior`, whose draws are interleaved batch by batch).
                `"none"` draws one noise per sample, batch by batch, as the reference code does.

        Examples:
        """
        inputs = self._validated_inputs(
            prompt,
            images,
            latents,
            prompt_embeds,
            pooled_prompt_embeds,
            t,
            num_noise_samples,
            batch_size,
            noise_sharing,
            generator,
        )
        levels = self._noise_levels(t)
        rewards = self._score_in_batches(
            inputs,
            levels,
            num_noise_samples,
            generator,
            batch_size,
            resolution,
            sample_posterior,
            check_finite,
            max_sequence_length,
        )
        rewards = self.normalize_rewards(rewards, normalize, levels)
        noise_levels = [self._snapped(level) for level in levels]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (rewards, noise_levels)
        return DiNaLRMPipelineOutput(rewards=rewards, noise_levels=noise_levels)

    def _score_in_batches(
        self,
        inputs: _ScoringInputs,
        levels: list[float],
        num_noise_samples: int,
        generator: torch.Generator | None,
        batch_size: int,
        resolution: int | tuple[int, int] | None,
        sample_posterior: bool,
        check_finite: bool,
        max_sequence_length: int | None,
    ) -> torch.Tensor:
        """Float32 CPU rewards of all samples, `batch_size` at a time: each batch is encoded into latents of one
        size per part (`_latent_groups`), given its prompt groups' shared noise (`prompt_shared_noises`, drawn at a
        group's first sample and kept across batches) and scored part by part (`_score_part`)."""
        rewards = torch.empty(inputs.num_samples, dtype=torch.float32)
        shared_draws: dict = {}  # each prompt group's noise draws, drawn at its first sample and kept across batches
        starts = range(0, inputs.num_samples, batch_size)
        with self.progress_bar(total=len(starts)) as progress:
            for start in starts:
                batch = list(range(start, min(start + batch_size, inputs.num_samples)))
                parts = list(self._latent_groups(batch, inputs, resolution, sample_posterior, generator))
                noises = [None] * len(parts)
                if inputs.groups is not None:
                    noises = prompt_shared_noises(
                        shared_draws, inputs.groups, parts, num_noise_samples, generator, self.max_latent_side
                    )
                for (indices, part_latents), part_noises in zip(parts, noises):
                    targets, scores = self._score_part(
                        inputs,
                        indices,
                        part_latents,
                        part_noises,
                        levels,
                        num_noise_samples,
                        generator,
                        check_finite,
                        max_sequence_length,
                    )
                    rewards[targets] = scores
                progress.update()
        return rewards

    def _latent_groups(self, batch: list[int], inputs: _ScoringInputs, resolution, sample_posterior, generator):
        """Yields `(indices, latents)` for one batch; images of different sizes form separate groups."""
        if inputs.latents is not None:
            yield batch, inputs.latents[batch[0] : batch[-1] + 1].to(self._execution_device)
            return
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for index in batch:
            pixels = self._preprocess(inputs.images[index], resolution)
            groups.setdefault(tuple(pixels.shape[-2:]), []).append((index, pixels))
        for members in groups.values():
            pixels = torch.cat([p for _, p in members])
            if sample_posterior:
                latents = self._encode_pixels(pixels, sample_posterior, generator)
            else:
                # Equal images are encoded once: the VAE may round equal rows of a batch differently, and their
                # latents must be equal for `_distinct_rows` to give them one reward.
                rows, source = _first_equal_rows(pixels.flatten(1), [None] * len(pixels))
                latents = self._encode_pixels(pixels[rows], sample_posterior, generator)[source]
            yield [i for i, _ in members], latents

    def _score_part(
        self,
        inputs: _ScoringInputs,
        indices: list[int],
        latents: torch.Tensor,
        noises: list[torch.Tensor] | None,
        levels: list[float],
        num_noise_samples: int,
        generator: torch.Generator | None,
        check_finite: bool,
        max_sequence_length: int | None,
    ) -> tuple[list[int], torch.Tensor]:
        """Float32 CPU rewards of one part's samples, and the sample indices they belong to.

        Under prompt-shared noise, equal latents of one prompt group are scored once (`_distinct_rows`) and their
        reward is copied to each of them.
        """
        targets, sources = indices, list(range(len(indices)))
        if inputs.groups is not None:
            indices, latents, noises, (targets, sources) = _distinct_rows(indices, latents, noises, inputs.groups)
        embeds, pooled = self._prompt_embeds_for(inputs, indices, self._execution_device, max_sequence_length)
        scores = self._score(latents, embeds, pooled, levels, num_noise_samples, generator, check_finite, noises)
        return targets, scores.float().cpu()[sources]

    # ------------------------------------------------------------------------------------------ compare / rank
    def compare(
        self,
        prompt: str | None,
        image_a,
        image_b,
        t: float | list[float] | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> DiNaLRMComparisonOutput:
        r"""Probability that `image_a` is preferred over `image_b` for `prompt`, and the winner.

        Both images are scored in one call (other keyword arguments as in `__call__`; NaN or infinite inputs are
        refused unless `check_finite=False`). By default (`noise_sharing="prompt"`) both get the same noise draw,
        as the pairs of training did (images of different sizes cannot share it; see `__call__`), so identical
        images give P = 0.5 exactly; `noise_sharing="none"` draws one noise per image (the reference protocol). The
        probability is `reward_model.preference_probability(r_a, r_b, level)` of the raw rewards, the comparison
        model of training (Thurstone: `Phi((r_a - r_b) / sqrt(2 * (k * level**2 + v0)))`), or the fitted curve
        `sigmoid(slope * (r_a - r_b))` when the model carries a calibration for these noise levels
        (`eval/calibrate.py`). `level` is `t`; for an ensemble, which has no single level, it is
        `reward_model.config.default_t`. `normalize` changes only the returned `rewards`, never the probability.
        """
        for name, image in (("image_a", image_a), ("image_b", image_b)):
            if isinstance(image, (list, tuple)) or getattr(image, "ndim", 3) == 4:
                raise ValueError(
                    f"compare takes one image per side, got a batch for {name}; for many pairs score them with "
                    "pipe(...) and use pipe.reward_model.preference_probability."
                )
        normalize = kwargs.pop("normalize", False)
        rewards = self(prompt, images=[image_a, image_b], t=t, generator=generator, **kwargs).rewards
        levels = self._noise_levels(t)
        probability = float(self.preference_probability(rewards[:1], rewards[1:], t)[0])
        return DiNaLRMComparisonOutput(
            probability=probability,
            winner="a" if probability >= 0.5 else "b",
            rewards=self.normalize_rewards(rewards, normalize, levels),
            noise_level=self._comparison_level(levels),
        )

    def _comparison_level(self, levels: list[float]) -> float:
        """The snapped level a comparison is made at: `t`, or `default_t` for an ensemble."""
        return self._snapped(levels[0] if len(levels) == 1 else self.reward_model.config.default_t)

    def preference_probability(
        self, rewards_a: torch.Tensor, rewards_b: torch.Tensor, t: float | list[float] | None = None
    ) -> torch.Tensor:
        r"""P(a preferred over b) of raw rewards scored at `t`, row by row, as [`~DiNaLRMPipeline.compare`] gives
        it (the fitted calibration when the model has one for these levels, else the training objective)."""
        levels = self._noise_levels(t)
        return self._preference_probability(rewards_a, rewards_b, self._comparison_level(levels), levels)

    def rank(self, prompt: str | list[str] | None, images=None, latents: torch.Tensor | None = None, **kwargs):
        r"""Orders images (or latents) by reward, best first; other keyword arguments as in `__call__`.

        The samples of one prompt share their noise draw by default (`noise_sharing="prompt"`, see `__call__`), so
        the order reflects the images, not the noise; `noise_sharing="none"` draws one noise per sample.
        NaN or infinite latents or prompt embeddings are refused unless `check_finite=False` is passed.

        Returns:
            [`DiNaLRMRankingOutput`] with `indices` into the inputs and their `rewards`, best first.
        """
        rewards = self(prompt, images=images, latents=latents, **kwargs).rewards
        _require_rankable(rewards)
        ordered, order = torch.sort(rewards, descending=True, stable=True)
        return DiNaLRMRankingOutput(indices=order.tolist(), rewards=ordered)


class _GeneratorFamilyPipeline(DiNaLRMPipeline):
    """What the pipelines of the other backbone families share: the family check, a latent-size default and bound
    of their own (no SD3 position table), and building around a loaded generator pipeline's components."""

    family: str
    family_name: str
    # A 1024-pixel default (128 latents) and a latent side of 2048 pixels for prompt-shared noise.
    _default_latent_side = 128
    _max_latent_side = 256

    def _register(self, reward_model: PreTrainedModel, compile: bool = False, **components) -> None:
        DiffusionPipeline.__init__(self)
        if reward_model.config.backbone != self.family:
            raise ValueError(
                f"{type(self).__name__} needs a reward model on a {self.family_name} backbone, got backbone="
                f"{reward_model.config.backbone!r}; use the pipeline of that family."
            )
        self.register_modules(reward_model=reward_model, **components)
        self._set_up_scoring(compile)

    @classmethod
    def max_latent_side_for(cls, reward_model: PreTrainedModel) -> int:
        return cls._max_latent_side

    @property
    def default_resolution(self) -> int:
        return self._default_latent_side * self.vae_scale_factor

    @classmethod
    def _sharing(cls, generator: DiffusionPipeline, reward_model: PreTrainedModel) -> "_GeneratorFamilyPipeline":
        return cls(reward_model=reward_model, **{name: getattr(generator, name) for name in cls._base_components})


class DiNaLRMFluxPipeline(_GeneratorFamilyPipeline):
    r"""Scores images or FLUX latents against prompts with a DiNa-LRM reward model on a FLUX backbone.

    Everything but the encoders is [`DiNaLRMPipeline`]'s (`__call__`, `compare`, `rank`, `reward_fn`, the resize
    rule, the noise conventions). Prompts are encoded as `FluxPipeline` encodes them (T5 hidden states, the CLIP
    pooled output) and images with FLUX's 16-channel VAE, `(mode - shift_factor) * scaling_factor`; the reward model
    packs the latents 2x2 itself, so latent sides must be even.

    Args:
        reward_model ([`DiNaLRMModel`]): a reward model with `config.backbone == "flux"`.
        vae ([`AutoencoderKL`]): FLUX's VAE.
        text_encoder ([`CLIPTextModel`]) / tokenizer ([`CLIPTokenizer`]): CLIP-L, for the pooled embedding.
        text_encoder_2 ([`T5EncoderModel`]) / tokenizer_2 ([`T5TokenizerFast`]): T5-XXL, for the token embeddings.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): FLUX's scheduler.
        compile (`bool`, defaults to `False`): compile the reward model's backbone blocks, as [`DiNaLRMPipeline`].
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->vae->reward_model"
    _optional_components = []
    _base_components = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    family, family_name = "flux", "FLUX"

    def __init__(
        self,
        reward_model: PreTrainedModel,
        vae: AutoencoderKL,
        text_encoder: PreTrainedModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: PreTrainedTokenizerBase,
        scheduler: FlowMatchEulerDiscreteScheduler,
        compile: bool = False,
    ):
        self._register(
            reward_model,
            compile,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            scheduler=scheduler,
        )

    @classmethod
    def from_flux(cls, flux_pipeline: DiffusionPipeline, reward_model: PreTrainedModel) -> "DiNaLRMFluxPipeline":
        """Builds the pipeline around an already loaded `FluxPipeline`, sharing (not copying) its VAE, text
        encoders, tokenizers and scheduler, so an alignment loop holds one copy of each."""
        return cls._sharing(flux_pipeline, reward_model)

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device | None = None,
        max_sequence_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""FLUX prompt embeddings, as `FluxPipeline.encode_prompt` makes them.

        Returns:
            `(prompt_embeds, pooled_prompt_embeds)`: T5's last hidden state over `max_sequence_length` tokens
            (default `reward_model.config.max_sequence_length`), `(B, tokens, joint_attention_dim)`, and CLIP's
            pooled output, `(B, pooled_projection_dim)`.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self._execution_device
        max_sequence_length = max_sequence_length or self.reward_model.config.max_sequence_length
        clip_ids = self._tokenize(self.tokenizer, prompts, self.tokenizer.model_max_length)
        pooled = self.text_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
        t5_ids = self._tokenize(self.tokenizer_2, prompts, max_sequence_length)
        prompt_embeds = self.text_encoder_2(t5_ids.to(device), output_hidden_states=False)[0]
        return prompt_embeds.to(self.text_encoder_2.dtype), pooled.to(self.text_encoder.dtype)


class DiNaLRMZImagePipeline(_GeneratorFamilyPipeline):
    r"""Scores images or Z-Image latents against prompts with a DiNa-LRM reward model on a Z-Image backbone.

    Everything but the encoders is [`DiNaLRMPipeline`]'s (`__call__`, `compare`, `rank`, `reward_fn`, the resize
    rule, the noise conventions). Prompts are encoded as `ZImagePipeline.encode_prompt` encodes them (the Qwen3 chat
    template, the second-to-last hidden state of the prompt's own tokens), so prompt embeddings are a list of
    `(tokens_i, dim)` tensors, one per prompt, and there is no pooled embedding; the reward model pads and masks them
    as the Z-Image transformer does, so a prompt's reward does not depend on its batch. Images are encoded with the
    Z-Image VAE, `(mode - shift_factor) * scaling_factor`.

    Args:
        reward_model ([`DiNaLRMModel`]): a reward model with `config.backbone == "zimage"`.
        vae ([`AutoencoderKL`]): Z-Image's VAE.
        text_encoder ([`PreTrainedModel`]): Z-Image's Qwen3 text encoder.
        tokenizer ([`PreTrainedTokenizerBase`]): its tokenizer, with the chat template.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): Z-Image's scheduler.
        compile (`bool`, defaults to `False`): compile the reward model's backbone blocks, as [`DiNaLRMPipeline`].
    """

    model_cpu_offload_seq = "text_encoder->vae->reward_model"
    _optional_components = []
    _base_components = ("vae", "text_encoder", "tokenizer", "scheduler")
    family, family_name = "zimage", "Z-Image"

    def __init__(
        self,
        reward_model: PreTrainedModel,
        vae: AutoencoderKL,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        scheduler: FlowMatchEulerDiscreteScheduler,
        compile: bool = False,
    ):
        self._register(
            reward_model, compile, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )

    @classmethod
    def from_zimage(cls, zimage_pipeline: DiffusionPipeline, reward_model: PreTrainedModel) -> "DiNaLRMZImagePipeline":
        """Builds the pipeline around an already loaded `ZImagePipeline`, sharing (not copying) its VAE, text
        encoder, tokenizer and scheduler, so an alignment loop holds one copy of each."""
        return cls._sharing(zimage_pipeline, reward_model)

    def encode_prompt(
        self,
        prompt: str | list[str],
        device: torch.device | None = None,
        max_sequence_length: int | None = None,
    ) -> tuple[list[torch.Tensor], None]:
        r"""Z-Image prompt embeddings, as `ZImagePipeline.encode_prompt` makes them.

        Each prompt is wrapped in the tokenizer's chat template (a user turn, generation prompt, thinking enabled),
        cut to `max_sequence_length` tokens (default `reward_model.config.max_sequence_length`) and encoded; the
        text encoder's second-to-last hidden state is kept at the prompt's real tokens.

        Returns:
            `(prompt_embeds, None)`: a list of `(tokens_i, cap_feat_dim)` tensors, one per prompt; Z-Image has no
            pooled embedding.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self._execution_device
        max_sequence_length = max_sequence_length or self.reward_model.config.max_sequence_length
        templated = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for text in prompts
        ]
        inputs = self.tokenizer(
            templated, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        )
        mask = inputs.attention_mask.to(device).bool()
        hidden = self.text_encoder(
            input_ids=inputs.input_ids.to(device), attention_mask=mask, output_hidden_states=True
        ).hidden_states[-2]
        return [hidden[i][mask[i]] for i in range(len(prompts))], None

    @staticmethod
    def _select_rows(prompt_embeds, pooled_prompt_embeds, rows: list[int], device) -> tuple:
        return [prompt_embeds[row].to(device) for row in rows], None

    @staticmethod
    def _join_rows(parts: list[tuple], device) -> tuple:
        return [embeds.to(device) for part in parts for embeds in part[0]], None

    @staticmethod
    def _check_prompt_embeds(prompt_embeds, pooled_prompt_embeds) -> int:
        if pooled_prompt_embeds is not None:
            raise ValueError("Z-Image has no pooled prompt embedding: pass pooled_prompt_embeds=None.")
        rows = list(prompt_embeds) if isinstance(prompt_embeds, (list, tuple, torch.Tensor)) else None
        if not rows or any(
            not (isinstance(row, torch.Tensor) and row.is_floating_point() and row.ndim == 2) for row in rows
        ):
            raise ValueError(
                "prompt_embeds must be a list of floating-point (tokens, dim) tensors, one per prompt, as "
                f"encode_prompt returns them (or a (batch, tokens, dim) tensor); got {_describe(prompt_embeds)}."
            )
        return len(rows)
