"""DiNa-LRM demo Space: which of two images does the latent reward model prefer for a prompt, and how sure is it?

`python space/app.py [--model ID_OR_DIR] [--device DEVICE] [--dtype DTYPE]` serves the demo (honouring
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT). The options override the environment: DINALRM_MODEL (a Hub id or a local
folder, default the published checkpoint `liuhuohuo/DiNa-LRM-SD35M-12layers`), DINALRM_DEVICE (default: cuda when
available, else cpu) and DINALRM_DTYPE (float32, float16 or bfloat16; default bfloat16 on cuda, float32 on cpu).

A pipeline repository that ships its own `pipeline_dinalrm.py` loads through
`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` (the code published with the weights). An official
checkpoint ships no code: it loads with the DiNa-LRM code deployed next to this file (`pipeline_dinalrm.py` and
`modeling_dinalrm.py`, copied from the repository root; in a checkout, the installed package), which converts it on
the first blocks of SD3.5-Medium (gated: the Space needs an HF_TOKEN secret of an account that accepted its licence).

The scoring and input checks are plain functions (`compare_images`, `reward_curve`, `rank_images`, `read_upload`,
`run_compare`, `run_curve`, `run_rank`); `build_demo` only wires them to components.
"""

import argparse
import os


# Gradio reads this when the Blocks are built: without it the server phones home, which an offline Space must not do.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch
from diffusers import DiffusionPipeline
from gradio.data_classes import ImageData
from gradio.utils import get_upload_folder
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image, ImageDraw, ImageFilter, UnidentifiedImageError

from pipeline_dinalrm import MAX_IMAGE_PIXELS  # one cap, shared with the reward server


try:
    import spaces
except ImportError:
    spaces = None


DEFAULT_MODEL = "liuhuohuo/DiNa-LRM-SD35M-12layers"
# Tried when DINALRM_MODEL is unset and DEFAULT_MODEL cannot be loaded (offline): the repository's tiny-world demo
# model, when the Space runs from a checkout of the repository.
_BUNDLED_TINY_MODEL = Path(__file__).resolve().parents[1] / "assets" / "dinalrm-tiny"
OFFLINE_FALLBACK_MODEL: str | None = str(_BUNDLED_TINY_MODEL) if _BUNDLED_TINY_MODEL.is_dir() else None

DEFAULT_T = 0.4
PAPER_ENSEMBLE = (0.2, 0.5, 0.7)
CURVE_LEVELS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAX_DRAWS = 8
MAX_SEED = 2**31 - 1
MAX_PROMPT_CHARS = 1000
MAX_RANK_IMAGES = 8
MAX_PIXELS = MAX_IMAGE_PIXELS
MAX_FILE_BYTES = 20 * 1024 * 1024
NEAR_TIE = 0.05
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
COLORS = {"A": "#2563eb", "B": "#ea580c"}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# What PIL raises for undecodable data, depending on the format plugin.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)

CSS = """
.verdict { border-radius: 10px; padding: 14px 18px; border-left: 8px solid var(--winner-color);
           background: var(--block-background-fill); }
.verdict-winner { font-size: 1.5em; font-weight: 700; color: var(--winner-color); }
.verdict-probability { font-size: 1.2em; font-weight: 600; margin-top: 4px; }
.verdict-detail { opacity: 0.75; margin-top: 6px; }
.verdict-empty { opacity: 0.6; padding: 14px 18px; }
"""


def on_gpu(fn: Callable) -> Callable:
    """`spaces.GPU` when the `spaces` package is installed (Hugging Face ZeroGPU); the function unchanged otherwise."""
    return spaces.GPU(fn) if spaces is not None else fn


# ---------------------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelSettings:
    """Where the pipeline comes from and where it runs; `explicit` is True when DINALRM_MODEL was set."""

    name: str
    device: str
    dtype: torch.dtype
    explicit: bool

    @classmethod
    def from_env(
        cls, model: str | None = None, device: str | None = None, dtype: str | None = None
    ) -> "ModelSettings":
        """Reads DINALRM_MODEL, DINALRM_DEVICE and DINALRM_DTYPE, each overridden by its argument when given; raises
        ValueError for an unknown dtype."""
        device = device or os.environ.get("DINALRM_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype_name = (
            dtype or os.environ.get("DINALRM_DTYPE") or ("float32" if device == "cpu" else "bfloat16")
        ).lower()
        if dtype_name not in DTYPES:
            raise ValueError(f"DINALRM_DTYPE={dtype_name!r} is not one of {', '.join(DTYPES)}.")
        model = model or os.environ.get("DINALRM_MODEL")
        return cls(name=model or DEFAULT_MODEL, device=device, dtype=DTYPES[dtype_name], explicit=bool(model))


def ships_pipeline_code(name: str) -> bool:
    """Whether the repository or folder `name` holds its own `pipeline_dinalrm.py` (a pipeline repository)."""
    if os.path.isdir(name):
        return os.path.isfile(os.path.join(name, "pipeline_dinalrm.py"))
    try:
        hf_hub_download(name, "pipeline_dinalrm.py")
    except (OSError, ValueError, EntryNotFoundError):  # none, or unreachable: the DiNa-LRM loader says which
        return False
    return True


def load_pipeline(name: str, device: str, dtype: torch.dtype) -> DiffusionPipeline:
    """The DiNa-LRM pipeline of a Hub repo or local folder, every component in `dtype`.

    A pipeline repository runs its own `pipeline_dinalrm.py` (remote code). An official checkpoint, or a folder
    that ships no code (the bundled demo model), loads with the `pipeline_dinalrm` deployed with the app.
    """
    if ships_pipeline_code(name):
        pipe = DiffusionPipeline.from_pretrained(name, trust_remote_code=True, dtype=dtype)
    else:
        from pipeline_dinalrm import DiNaLRMPipeline

        pipe = DiNaLRMPipeline.from_pretrained(name, torch_dtype=dtype)
    if not all(hasattr(pipe, method) for method in ("compare", "rank")):
        raise ValueError(f"{name} holds a {type(pipe).__name__}, not a DiNa-LRM pipeline.")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class SharedModel:
    """Loads the pipeline once, on first use, and hands the same instance to every request."""

    def __init__(self, settings: ModelSettings | None = None) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._pipeline: DiffusionPipeline | None = None
        self._error: str | None = None
        self._loaded_name: str | None = None

    def _load(self) -> None:
        try:
            settings = self._settings or ModelSettings.from_env()
        except ValueError as err:
            self._error = str(err)
            return
        candidates = [settings.name]
        if not settings.explicit and OFFLINE_FALLBACK_MODEL:
            candidates.append(OFFLINE_FALLBACK_MODEL)
        failures = []
        for name in candidates:
            # Anything can go wrong fetching and building a remote pipeline; each failure is reported in the UI.
            try:
                self._pipeline = load_pipeline(name, settings.device, settings.dtype)
            except Exception as err:  # noqa: BLE001
                failures.append(f"`{name}`: {type(err).__name__}: {err}")
                continue
            self._loaded_name = name
            return
        self._error = (
            "The DiNa-LRM model could not be loaded (" + "; ".join(failures) + "). Set DINALRM_MODEL to a local "
            "model folder to run offline, e.g. one written by `dinalrm.testing.save_tiny_dinalrm_repo`."
        )

    def load(self) -> None:
        """Loads the pipeline unless that was already tried; a failure is kept for `get` and `status` to report."""
        with self._lock:
            if self._pipeline is None and self._error is None:
                self._load()

    def get(self) -> DiffusionPipeline:
        """The shared pipeline; raises `gr.Error` explaining why when it cannot be loaded."""
        self.load()
        if self._pipeline is None:
            raise gr.Error(self._error, title="Model unavailable", duration=None, print_exception=False)
        return self._pipeline

    def status(self) -> str:
        """One line of Markdown for the page header: the model in use, or why there is none."""
        self.load()
        if self._pipeline is None:
            return f"⚠️ **Model unavailable.** {self._error}"
        return f"Model: `{self._loaded_name}` on {self._pipeline.device} ({self._pipeline.dtype})."


MODEL = SharedModel()


# ---------------------------------------------------------------------------------------------------------- inputs
def _input_error(message: str, title: str) -> gr.Error:
    return gr.Error(message, title=title, print_exception=False)


def check_prompt(prompt: str | None) -> str:
    """The stripped prompt; `gr.Error` when it is missing or too long."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise _input_error("Enter the prompt the images were generated from.", "Missing prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _input_error(
            f"The prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}.", "Prompt too long"
        )
    return prompt


def read_upload(path: str | None, label: str) -> Image.Image:
    """Decodes one uploaded image, refusing anything but Gradio's temporary copy of an upload.

    Checks, in order: an image was given, the path lies in Gradio's upload folder, the file size cap, the format
    (by content, not by name), the pixel cap (from the header, before decoding), then decodes every pixel so a
    truncated file fails here with a clear message rather than inside the model.
    """
    if not path:
        raise _input_error(f"Add {label}.", "Missing image")
    file = Path(path).resolve()
    if not file.is_relative_to(Path(get_upload_folder()).resolve()) or not file.is_file():
        raise _input_error(f"{label} is not a file uploaded to this app; upload it again.", "Missing image")
    size = file.stat().st_size
    if size > MAX_FILE_BYTES:
        raise _input_error(
            f"{label} ({file.name}) is {size / 2**20:.1f} MB; the limit is {MAX_FILE_BYTES / 2**20:.0f} MB.",
            "File too large",
        )
    supported = ", ".join(SUPPORTED_FORMATS)
    try:
        image = Image.open(file)
    except Image.DecompressionBombError as err:
        raise _input_error(f"{label} ({file.name}) has too many pixels to decode safely.", "Image too large") from err
    except UnidentifiedImageError as err:
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            raise _input_error(
                f"{label} ({file.name}) is not a supported image type; upload {supported}.", "Unsupported file type"
            ) from err
        raise _input_error(
            f"{label} ({file.name}) could not be read as an image: the file is corrupt or not an image.",
            "Corrupt image",
        ) from err
    with image:
        if image.format not in SUPPORTED_FORMATS:
            raise _input_error(
                f"{label} ({file.name}) is a {image.format} file; upload {supported}.", "Unsupported file type"
            )
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise _input_error(
                f"{label} ({file.name}) is {width}×{height} = {width * height / 1e6:.1f} megapixels; the limit is "
                f"{MAX_PIXELS / 1e6:.1f} megapixels.",
                "Image too large",
            )
        try:
            image.load()
        except DECODE_ERRORS as err:
            raise _input_error(
                f"{label} ({file.name}) could not be decoded: the file is corrupt or truncated.", "Corrupt image"
            ) from err
        return image.copy()


@dataclass(frozen=True)
class ScoreOptions:
    """The scoring controls: noise level `t`, the paper's ensemble instead of `t`, noise draws averaged, and seed."""

    t: float = DEFAULT_T
    ensemble: bool = False
    num_draws: int = 1
    seed: int = 0

    @classmethod
    def from_ui(
        cls, t: float | None, ensemble: bool | None, num_draws: float | None, seed: float | None
    ) -> "ScoreOptions":
        """Options from the control values; `gr.Error` for values out of range (only a hand-made request sends them)."""
        t = DEFAULT_T if t is None else float(t)
        num_draws = 1 if num_draws is None else int(num_draws)
        seed = 0 if seed is None else int(seed)
        if not 0.0 < t < 1.0:
            raise _input_error(f"The noise level t must lie in (0, 1), got {t}.", "Invalid setting")
        if not 1 <= num_draws <= MAX_DRAWS:
            raise _input_error(
                f"The number of noise draws must be 1 to {MAX_DRAWS}, got {num_draws}.", "Invalid setting"
            )
        if not 0 <= seed <= MAX_SEED:
            raise _input_error(f"The seed must be 0 to {MAX_SEED}, got {seed}.", "Invalid setting")
        return cls(t=t, ensemble=bool(ensemble), num_draws=num_draws, seed=seed)

    def pipeline_kwargs(self, pipe: DiffusionPipeline) -> dict:
        """`t`, `num_noise_samples` and a freshly seeded `generator` for one pipeline call."""
        return {
            "t": list(pipe.reward_model.config.ensemble_t) if self.ensemble else self.t,
            "num_noise_samples": self.num_draws,
            "generator": torch.Generator().manual_seed(self.seed),
        }


@contextmanager
def pipeline_errors() -> Iterator[None]:
    """Turns the pipeline's input errors (e.g. an image smaller than one backbone patch) into `gr.Error`s."""
    try:
        yield
    except gr.Error:
        raise
    except ValueError as err:
        raise _input_error(str(err), "Cannot score these inputs") from err


# ---------------------------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class Comparison:
    """The result of comparing image A with image B."""

    reward_a: float
    reward_b: float
    probability: float
    winner: str
    noise_level: float
    options: ScoreOptions


def compare_images(
    pipe: DiffusionPipeline, prompt: str, image_a: Image.Image, image_b: Image.Image, options: ScoreOptions
) -> Comparison:
    """Both rewards and P(A preferred) from `pipe.compare`; the winner is "A" or "B"."""
    prompt = check_prompt(prompt)
    with pipeline_errors():
        output = pipe.compare(prompt, image_a, image_b, **options.pipeline_kwargs(pipe))
    reward_a, reward_b = (float(value) for value in output.rewards)
    return Comparison(
        reward_a=reward_a,
        reward_b=reward_b,
        probability=float(output.probability),
        winner=output.winner.upper(),
        noise_level=float(output.noise_level),
        options=options,
    )


def reward_curve(
    pipe: DiffusionPipeline,
    prompt: str,
    image_a: Image.Image,
    image_b: Image.Image,
    options: ScoreOptions,
    levels: Sequence[float] = CURVE_LEVELS,
) -> pd.DataFrame:
    """Rewards of A and B and P(A preferred) at each noise level (single levels, `options`' draws and seed).

    One row per level and image: columns `t` (the snapped level), `image` ("A"/"B"), `reward`, `p_a`. Each level is
    scored exactly like Compare at that `t`, so the curve passes through the Compare result.
    """
    rows = []
    for level in levels:
        level_options = ScoreOptions(t=level, num_draws=options.num_draws, seed=options.seed)
        result = compare_images(pipe, prompt, image_a, image_b, level_options)
        for name, reward in (("A", result.reward_a), ("B", result.reward_b)):
            rows.append({"t": result.noise_level, "image": name, "reward": reward, "p_a": result.probability})
    return pd.DataFrame(rows, columns=["t", "image", "reward", "p_a"])


def rank_images(
    pipe: DiffusionPipeline, prompt: str, images: Sequence[Image.Image], options: ScoreOptions
) -> list[tuple[int, float]]:
    """`(input position, reward)` pairs, best first (ties keep the input order)."""
    prompt = check_prompt(prompt)
    if not images:
        raise _input_error("Add at least one image to rank.", "Missing image")
    if len(images) > MAX_RANK_IMAGES:
        raise _input_error(f"{len(images)} images given; rank at most {MAX_RANK_IMAGES} at a time.", "Too many images")
    with pipeline_errors():
        output = pipe.rank(prompt, list(images), **options.pipeline_kwargs(pipe))
    return [(index, float(reward)) for index, reward in zip(output.indices, output.rewards)]


# ---------------------------------------------------------------------------------------------------------- display
def verdict_html(result: Comparison) -> str:
    """The verdict box: the winner in its colour, P(A preferred), and how it was measured."""
    margin = abs(result.probability - 0.5)
    options = result.options
    how = "the paper's 3-level ensemble" if options.ensemble else f"noise level t = {result.noise_level:.3f}"
    draws = f"{options.num_draws} noise draw{'s' if options.num_draws > 1 else ''} shared by A and B"
    tie = " (a near tie)" if margin < NEAR_TIE else ""
    return (
        f'<div class="verdict" data-winner="{result.winner}" data-probability="{result.probability!r}" '
        f'style="--winner-color: {COLORS[result.winner]}">'
        f'<div class="verdict-winner">Image {result.winner} is preferred{tie}</div>'
        f'<div class="verdict-probability">P(A preferred) = {result.probability:.3f}</div>'
        f'<div class="verdict-detail">Raw rewards: A {result.reward_a:.4f}, B {result.reward_b:.4f}; {how}, '
        f"{draws}, seed {options.seed}.</div></div>"
    )


def rewards_table(result: Comparison) -> pd.DataFrame:
    """Two rows, A and B, with the raw reward; the winner is marked."""
    return pd.DataFrame(
        {
            "image": ["A", "B"],
            "reward": [round(result.reward_a, 4), round(result.reward_b, 4)],
            "verdict": ["preferred" if result.winner == name else "" for name in ("A", "B")],
        }
    )


EMPTY_VERDICT = '<div class="verdict-empty">Add a prompt and two images, then press Compare.</div>'


# ---------------------------------------------------------------------------------------------------------- handlers
@on_gpu
def run_compare(
    prompt: str | None,
    image_a: str | None,
    image_b: str | None,
    t: float,
    ensemble: bool,
    num_draws: float,
    seed: float,
) -> tuple[str, pd.DataFrame]:
    """Compare button: the verdict HTML and the rewards table for two uploaded files."""
    prompt = check_prompt(prompt)
    first = read_upload(image_a, "Image A")
    second = read_upload(image_b, "Image B")
    options = ScoreOptions.from_ui(t, ensemble, num_draws, seed)
    result = compare_images(MODEL.get(), prompt, first, second, options)
    return verdict_html(result), rewards_table(result)


@on_gpu
def run_curve(
    prompt: str | None, image_a: str | None, image_b: str | None, num_draws: float, seed: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """After Compare: the reward-versus-t plot data (both images) and the P(A preferred)-versus-t plot data."""
    prompt = check_prompt(prompt)
    first = read_upload(image_a, "Image A")
    second = read_upload(image_b, "Image B")
    options = ScoreOptions.from_ui(DEFAULT_T, False, num_draws, seed)
    curve = reward_curve(MODEL.get(), prompt, first, second, options)
    return curve[["t", "image", "reward"]], curve.loc[curve["image"] == "A", ["t", "p_a"]]


@on_gpu
def run_rank(
    prompt: str | None, files: Sequence[str] | None, t: float, ensemble: bool, num_draws: float, seed: float
) -> tuple[list[tuple[Image.Image, str]], pd.DataFrame]:
    """Rank button: gallery items (image, caption) best first and the ranking table.

    Unreadable files are skipped with a warning so one bad upload does not block the rest.
    """
    prompt = check_prompt(prompt)
    files = list(files or [])
    if not files:
        raise _input_error("Add at least one image to rank.", "Missing image")
    if len(files) > MAX_RANK_IMAGES:
        raise _input_error(f"{len(files)} images given; rank at most {MAX_RANK_IMAGES} at a time.", "Too many images")
    names, images = [], []
    for path in files:
        try:
            images.append(read_upload(path, Path(path).name))
        except gr.Error as err:
            gr.Warning(f"Skipped: {err.message}", title="Image skipped")
            continue
        names.append(Path(path).name)
    if not images:
        raise _input_error("None of the uploaded files could be read as an image.", "Missing image")
    options = ScoreOptions.from_ui(t, ensemble, num_draws, seed)
    ranking = rank_images(MODEL.get(), prompt, images, options)
    gallery = [
        (images[index], f"#{place} · {reward:.4f} · {names[index]}")
        for place, (index, reward) in enumerate(ranking, 1)
    ]
    table = pd.DataFrame(
        {
            "rank": list(range(1, len(ranking) + 1)),
            "file": [names[index] for index, _ in ranking],
            "reward": [round(reward, 4) for _, reward in ranking],
        }
    )
    return gallery, table


# ---------------------------------------------------------------------------------------------------------- examples
def _apple(size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (236, 226, 208))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, size * 0.62, size, size), fill=(150, 98, 56))
    for y in range(int(size * 0.62), size, max(2, size // 24)):
        draw.line((0, y, size, y + size // 40), fill=(128, 82, 45), width=1)
    s = size / 256
    draw.ellipse((70 * s, 188 * s, 190 * s, 206 * s), fill=(112, 72, 40))
    draw.ellipse((68 * s, 80 * s, 188 * s, 196 * s), fill=(196, 26, 30))
    draw.ellipse((92 * s, 98 * s, 122 * s, 126 * s), fill=(238, 120, 110))
    draw.line((128 * s, 86 * s, 134 * s, 58 * s), fill=(84, 52, 24), width=max(1, int(5 * s)))
    draw.ellipse((134 * s, 52 * s, 170 * s, 72 * s), fill=(52, 140, 56))
    return image.filter(ImageFilter.GaussianBlur(size / 256))


def _mountains(size: int) -> Image.Image:
    rows = np.linspace(0.0, 1.0, size)[:, None, None]
    sky = (1 - rows) * np.array([255, 150, 90]) + rows * np.array([80, 120, 200])
    image = Image.fromarray(np.repeat(sky, size, axis=1).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    s = size / 256
    draw.ellipse((170 * s, 60 * s, 214 * s, 104 * s), fill=(255, 214, 120))
    draw.polygon([(0, 200 * s), (70 * s, 90 * s), (150 * s, 200 * s)], fill=(70, 80, 110))
    draw.polygon([(60 * s, 210 * s), (160 * s, 70 * s), (256 * s, 210 * s)], fill=(50, 60, 90))
    draw.polygon([(136 * s, 104 * s), (160 * s, 70 * s), (184 * s, 104 * s)], fill=(240, 240, 250))
    draw.rectangle((0, 200 * s, size, size), fill=(60, 130, 70))
    return image.filter(ImageFilter.GaussianBlur(size / 256))


def _degraded(image: Image.Image, seed: int) -> Image.Image:
    """Downscaled, blurred and noised: the kind of damage a reward model should notice."""
    small = image.resize((image.width // 6, image.height // 6), Image.Resampling.BILINEAR).resize(image.size)
    noise = np.random.default_rng(seed).normal(0.0, 28.0, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.asarray(small, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def write_example_images(folder: Path, size: int = 256) -> dict[str, Path]:
    """Draws the example images (no downloads) into `folder`; returns their paths by name."""
    folder.mkdir(parents=True, exist_ok=True)
    pictures = {"apple": _apple(size), "mountains": _mountains(size)}
    pictures["apple_degraded"] = _degraded(pictures["apple"], seed=0)
    pictures["mountains_degraded"] = _degraded(pictures["mountains"], seed=1)
    paths = {}
    for name, picture in pictures.items():
        paths[name] = folder / f"{name}.png"
        picture.save(paths[name])
    return paths


APPLE_PROMPT = "a photo of a red apple on a wooden table"
MOUNTAIN_PROMPT = "snowy mountains under an orange sunset sky"


# ---------------------------------------------------------------------------------------------------------- UI
class UploadedImage(gr.Image):
    """An image upload box (build it with `type="filepath"`) whose handler gets the upload's temporary path undecoded.

    `gr.Image` opens the file itself before the handler runs, so a corrupt upload would end in Gradio's generic
    error; this box leaves decoding to `read_upload`, which names the problem. Gradio has already checked that the
    path is an upload (its preprocessing refuses other paths), and `read_upload` checks it again.
    """

    is_template = True

    def preprocess(self, payload: ImageData | None) -> str | None:
        """The uploaded file's path; pasted images (data URLs) are written to the upload folder by `gr.Image`."""
        if payload is None or payload.path is None:
            return super().preprocess(payload)
        return payload.path


def build_demo() -> gr.Blocks:
    """The Blocks app; every scoring event shares one queue slot so requests use the model one at a time."""
    examples = write_example_images(Path(get_upload_folder()) / "dinalrm-examples")
    model_events = {"concurrency_id": "model", "concurrency_limit": 1}
    with gr.Blocks(title="DiNa-LRM: which image does the reward model prefer?", analytics_enabled=False) as demo:
        gr.Markdown(
            "# DiNa-LRM: which image does the reward model prefer?\n"
            "DiNa-LRM ([arXiv 2602.11146](https://arxiv.org/abs/2602.11146)) scores an image for its prompt by "
            "noising its SD3 VAE latent to level *t* and reading it with the first blocks of SD3.5-Medium. Compare "
            "two images, see how the judgement changes with the noise level, or rank several images."
        )
        status = gr.Markdown(elem_id="model_status")
        with gr.Accordion("Scoring settings", open=True), gr.Row():
            t_slider = gr.Slider(
                0.05,
                0.95,
                value=DEFAULT_T,
                step=0.01,
                label="Noise level t",
                info="0 = clean, 1 = pure noise; the paper scores at 0.4.",
                elem_id="t_slider",
            )
            ensemble = gr.Checkbox(
                False,
                label="Ensemble",
                elem_id="ensemble",
                info=f"Score at t = {', '.join(map(str, PAPER_ENSEMBLE))} at once (ignores the slider).",
            )
            num_draws = gr.Slider(
                1,
                MAX_DRAWS,
                value=1,
                step=1,
                label="Noise draws",
                elem_id="num_draws",
                info="Average the reward over this many noise samples.",
            )
            seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
        with gr.Tabs():
            with gr.Tab("Compare", id="compare_tab"):
                prompt = gr.Textbox(
                    label="Prompt", placeholder=APPLE_PROMPT, max_length=MAX_PROMPT_CHARS, elem_id="prompt"
                )
                with gr.Row():
                    image_a, image_b = (
                        UploadedImage(
                            type="filepath",
                            image_mode=None,
                            sources=["upload", "clipboard"],
                            label=f"Image {side}",
                            elem_id=f"image_{side.lower()}",
                        )
                        for side in "AB"
                    )
                compare = gr.Button("Compare", variant="primary", elem_id="compare")
                verdict = gr.HTML(EMPTY_VERDICT, elem_id="verdict")
                rewards = gr.Dataframe(
                    headers=["image", "reward", "verdict"], label="Rewards (raw)", interactive=False, elem_id="rewards"
                )
                with gr.Row():
                    reward_plot = gr.LinePlot(
                        x="t",
                        y="reward",
                        color="image",
                        color_map=COLORS,
                        x_lim=[0, 1],
                        title="Reward versus noise level",
                        x_title="noise level t",
                        elem_id="reward_curve",
                    )
                    probability_plot = gr.LinePlot(
                        x="t",
                        y="p_a",
                        x_lim=[0, 1],
                        y_lim=[0, 1],
                        title="P(A preferred) versus noise level",
                        x_title="noise level t",
                        y_title="P(A preferred)",
                        elem_id="probability_curve",
                    )
                gr.Examples(
                    [
                        [APPLE_PROMPT, str(examples["apple"]), str(examples["apple_degraded"])],
                        [MOUNTAIN_PROMPT, str(examples["mountains_degraded"]), str(examples["mountains"])],
                        [APPLE_PROMPT, str(examples["mountains"]), str(examples["apple"])],
                    ],
                    inputs=[prompt, image_a, image_b],
                    cache_examples=False,
                    label="Examples (quality: sharp vs degraded; alignment: right vs wrong subject)",
                    elem_id="compare_examples",
                )
            with gr.Tab("Rank", id="rank_tab"):
                rank_prompt = gr.Textbox(
                    label="Prompt", placeholder=APPLE_PROMPT, max_length=MAX_PROMPT_CHARS, elem_id="rank_prompt"
                )
                rank_files = gr.File(
                    file_count="multiple",
                    file_types=["image"],
                    type="filepath",
                    label=f"Images (up to {MAX_RANK_IMAGES})",
                    elem_id="rank_images",
                )
                rank_button = gr.Button("Rank", variant="primary", elem_id="rank")
                rank_gallery = gr.Gallery(label="Best first", columns=4, object_fit="contain", elem_id="rank_gallery")
                rank_table = gr.Dataframe(
                    headers=["rank", "file", "reward"],
                    label="Ranking (raw rewards)",
                    interactive=False,
                    elem_id="rank_table",
                )
                gr.Examples(
                    [[APPLE_PROMPT, [str(examples[name]) for name in ("apple_degraded", "mountains", "apple")]]],
                    inputs=[rank_prompt, rank_files],
                    cache_examples=False,
                    elem_id="rank_examples",
                )

        demo.load(MODEL.status, outputs=status, api_visibility="private")
        ensemble.change(
            lambda on: gr.update(interactive=not on), ensemble, t_slider, queue=False, api_visibility="private"
        )
        compare.click(
            lambda: (EMPTY_VERDICT, None, None, None),
            None,
            [verdict, rewards, reward_plot, probability_plot],
            queue=False,
            api_visibility="private",
        ).then(
            run_compare,
            [prompt, image_a, image_b, t_slider, ensemble, num_draws, seed],
            [verdict, rewards],
            api_name="compare",
            **model_events,
        ).success(
            run_curve,
            [prompt, image_a, image_b, num_draws, seed],
            [reward_plot, probability_plot],
            api_name="reward_curve",
            **model_events,
        )
        rank_button.click(
            run_rank,
            [rank_prompt, rank_files, t_slider, ensemble, num_draws, seed],
            [rank_gallery, rank_table],
            api_name="rank",
            **model_events,
        )
    return demo


def launch_options() -> dict:
    """Keyword arguments for `demo.launch` shared by `main` and the browser test: upload cap and styling."""
    return {"max_file_size": MAX_FILE_BYTES, "css": CSS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the DiNa-LRM demo Space.")
    parser.add_argument(
        "--model", default=None, help=f"Hub id or local folder (default: DINALRM_MODEL, else {DEFAULT_MODEL})."
    )
    parser.add_argument(
        "--device", default=None, help="torch device (default: DINALRM_DEVICE, else cuda if available)."
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="dtype of every component (default: DINALRM_DTYPE, else bfloat16 on CUDA, float32 on the CPU).",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Loads the model (reporting failures in the page), then serves the app."""
    global MODEL
    args = parse_args(argv)
    MODEL = SharedModel(ModelSettings.from_env(args.model, args.device, args.dtype))
    MODEL.load()
    build_demo().queue(max_size=32).launch(**launch_options())


if __name__ == "__main__":
    main()
