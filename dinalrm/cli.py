"""`dinalrm-score`: score image files against a prompt from the shell.

    dinalrm-score --prompt "a photo of a cat" a.png b.png [--model ID_OR_DIR] [--t 0.4 | --ensemble] [--json]

Prints one raw reward per image (higher = preferred) and, for two images, the probability that the first one
is preferred. Exit codes: 0 success, 1 the model could not be loaded, 2 bad arguments or unreadable images.
Heavy imports (torch, diffusers) wait until the arguments are parsed, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


# The published checkpoint (official layout; converted on first use and cached) and the base it needs.
DEFAULT_MODEL = "liuhuohuo/DiNa-LRM-SD35M-12layers"
DEFAULT_BASE = "stabilityai/stable-diffusion-3.5-medium"
# The tiny-world demo model shipped with the repository (examples/tiny_world); used when the default is unreachable.
BUNDLED_TINY_MODEL = Path(__file__).resolve().parents[1] / "assets" / "dinalrm-tiny"
DTYPES = ("float32", "bfloat16", "float16")
FALLBACK_WARNING = """\
warning: {model!r} could not be loaded ({reason}); scoring with the bundled tiny-world demo model
{fallback} instead. It only knows the tiny world's coloured shapes; pass --model for real images.
"""
FALLBACK_NOTE = "note: scored with the bundled tiny-world demo model ({model} could not be loaded; see stderr)."
MODEL_UNAVAILABLE = "error: could not load the DiNa-LRM model {model!r}: {reason}\n"
HUB_MODEL_HINT = """\
To get it, run once with network access (it is cached afterwards): hf download {model}
or pass --model a local folder (a DiNa-LRM pipeline folder, or an official checkpoint folder with --base), or for
a quick offline try: python -c "from dinalrm.testing import save_tiny_dinalrm_repo; save_tiny_dinalrm_repo('tiny-dinalrm')"
"""


def _noise_levels(text: str) -> list[float]:
    try:
        return [float(level) for level in text.split(",")]
    except ValueError as err:
        message = f"expected comma-separated noise levels like 0.2,0.5,0.7, got {text!r}"
        raise argparse.ArgumentTypeError(message) from err


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dinalrm-score",
        description="Score images against a prompt with DiNa-LRM (higher = preferred), with the installed DiNa-LRM "
        "code (a model repository's own code files are never run).",
    )
    parser.add_argument(
        "images", nargs="+", help="Image files (any size and mode; resized as the pipeline documents)."
    )
    parser.add_argument(
        "--model",
        default=None,
        help=f"Hub id or local folder: a DiNa-LRM pipeline or an official checkpoint (default: {DEFAULT_MODEL}, "
        "or the bundled tiny-world demo model when that is unreachable offline).",
    )
    parser.add_argument(
        "--base",
        default=None,
        help="For official checkpoints: the SD3 pipeline (Hub id or folder) providing the backbone blocks, VAE and "
        f"text encoders (default: {DEFAULT_BASE}, gated: accept its licence on its Hub page and `hf auth login`).",
    )
    parser.add_argument("--prompt", required=True, help="The prompt the images were generated from.")
    levels = parser.add_mutually_exclusive_group()
    levels.add_argument("--t", type=float, default=None, help="Noise level in [0, 1] (default: the model's, 0.4).")
    levels.add_argument(
        "--ensemble",
        type=_noise_levels,
        nargs="?",
        const=[],
        default=None,
        help="Multi-level ensemble: comma-separated levels, or no value for the model's (0.2,0.5,0.7).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the scoring noise (same seed, same rewards).")
    parser.add_argument(
        "--noise_sharing",
        default="prompt",
        choices=("prompt", "none"),
        help="prompt (default): all images share one noise draw, so their rewards differ only by the images "
        "(identical images tie, P = 0.5); none: one draw per image, the reference code's protocol.",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="Default: bfloat16 on CUDA, float32 on the CPU.")
    parser.add_argument(
        "--normalize",
        choices=("display", "logistic"),
        default=None,
        help="Print the official display score (raw + 10) / 10, or calibrated scores in (0, 1) from the model's "
        "fitted calibration (eval/calibrate.py), instead of raw rewards. P(first preferred) is the same either way.",
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")
    return parser.parse_args(argv)


def _load_images(paths: list[str]) -> list | None:
    """The images, decoded as training and evaluation decode them; None (with the reason on stderr) if one fails."""
    from dinalrm.images import OVERSIZED, ImageLoadError, load_image

    try:
        return [load_image(path) for path in paths]
    except ImageLoadError as err:
        hint = (
            " Downscale it first: it is resized to about 1024x1024 pixels anyway." if err.reason == OVERSIZED else ""
        )
        print(f"error: cannot read image: {err}{hint}", file=sys.stderr)
        return None


def _device_problem(device: str) -> str | None:
    """Why `--device` cannot be used here, or None."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        return f"--device {device!r} is not a device name: use cpu, cuda, cuda:1 or mps."
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(kind, lambda: True)
    if not available():
        return f"--device {device} was asked for, but no {kind} device is available here: pass --device cpu."
    return None


def default_dtype(device: str) -> str:
    """bfloat16 where users run (CUDA), float32 on the CPU (where bfloat16 is slow)."""
    return "bfloat16" if device.startswith("cuda") else "float32"


def _load_pipeline(model: str | None, base: str, dtype) -> tuple[object | None, str, bool]:
    """Loads `model` (default: the published checkpoint); without an explicit model, falls back (loudly) to the
    bundled tiny model when that one cannot be loaded. Returns `(pipeline or None, name, fell_back)`."""
    from huggingface_hub.errors import HFValidationError

    from modeling_dinalrm import looks_like_local_path
    from pipeline_dinalrm import DiNaLRMPipeline

    name = model or DEFAULT_MODEL
    try:
        return DiNaLRMPipeline.from_pretrained(name, base_model=base, torch_dtype=dtype), name, False
    except (OSError, HFValidationError, ValueError) as err:  # ValueError: ConversionError, not a DiNa-LRM folder
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if model is None and BUNDLED_TINY_MODEL.is_dir():
            print(FALLBACK_WARNING.format(model=name, reason=reason, fallback=BUNDLED_TINY_MODEL), file=sys.stderr)
            return DiNaLRMPipeline.from_pretrained(BUNDLED_TINY_MODEL, torch_dtype=dtype), name, True
        print(MODEL_UNAVAILABLE.format(model=name, reason=reason), file=sys.stderr, end="")
        if not looks_like_local_path(name):  # a local folder is not downloaded: the reason says what is wrong
            print(HUB_MODEL_HINT.format(model=name), file=sys.stderr, end="")
        return None, name, False


def _quiet_progress_bars() -> None:
    """No progress bars (loading or scoring) unless stderr is a terminal: logs and pipes stay clean."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def score_main(argv: list[str] | None = None) -> int:
    """Entry point of `dinalrm-score`; returns the process exit code."""
    args = parse_args(argv)
    if args.device is not None:
        problem = _device_problem(args.device)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    images = _load_images(args.images)
    if images is None:
        return 2
    import torch

    interactive = sys.stderr.isatty()
    if not interactive:
        _quiet_progress_bars()
    # Conversion of an official checkpoint (first use) and cache hits are reported on stderr.
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    logging.getLogger("modeling_dinalrm").setLevel(logging.INFO)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or default_dtype(device))
    pipe, name, fell_back = _load_pipeline(args.model, args.base, dtype)
    if pipe is None:
        return 1
    args.model = str(BUNDLED_TINY_MODEL) if fell_back else name
    pipe.set_progress_bar_config(disable=not interactive)
    pipe.to(device)
    if args.ensemble is not None:
        t = args.ensemble or list(pipe.reward_model.config.ensemble_t)
    else:
        t = args.t
    generator = torch.Generator().manual_seed(args.seed)
    options = {"t": t, "generator": generator, "batch_size": args.batch_size, "noise_sharing": args.noise_sharing}
    normalize = {None: False, "display": True, "logistic": "logistic"}[args.normalize]
    try:
        if len(images) == 2:
            comparison = pipe.compare(args.prompt, images[0], images[1], **options)
            rewards, probability = comparison.rewards, comparison.probability
        else:
            rewards, probability = pipe(args.prompt, images=images, **options).rewards, None
        rewards = pipe.normalize_rewards(rewards, normalize, t).tolist()
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if args.json:
        result = {
            "model": args.model,
            "prompt": args.prompt,
            "t": t if t is not None else pipe.reward_model.config.default_t,
            "seed": args.seed,
            "normalize": args.normalize,
            "noise_sharing": args.noise_sharing,
            "rewards": [{"image": path, "reward": reward} for path, reward in zip(args.images, rewards)],
        }
        if probability is not None:
            result["p_first_preferred"] = probability
        if fell_back:
            result["note"] = FALLBACK_NOTE.format(model=name)
        print(json.dumps(result, indent=2))
        return 0
    if fell_back:
        print(FALLBACK_NOTE.format(model=name))
    width = max(len(os.fspath(path)) for path in args.images)
    for path, reward in zip(args.images, rewards):
        print(f"{path:<{width}}  {reward:+.4f}")
    if probability is not None:
        print(f"P(first preferred) = {probability:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(score_main())
