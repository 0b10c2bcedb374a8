"""`dinalrm-score`: score image files against a prompt from the shell.

    dinalrm-score --model org/dinalrm-sd35m --prompt "a photo of a cat" a.png b.png [--t 0.4 | --ensemble] [--json]

Prints one raw reward per image (higher = preferred) and, for two images, the probability that the first one
is preferred. Exit codes: 0 success, 1 the model could not be loaded, 2 bad arguments or unreadable images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import PIL.Image
import torch
from huggingface_hub.errors import EntryNotFoundError, HFValidationError

from pipeline_dinalrm import DiNaLRMPipeline


DEFAULT_MODEL = "org/dinalrm-sd35m"
# The tiny-world demo model shipped with the repository (examples/tiny_world); used when the default is unreachable.
BUNDLED_TINY_MODEL = Path(__file__).resolve().parents[1] / "assets" / "dinalrm-tiny"
FALLBACK_WARNING = """\
warning: {model!r} could not be loaded ({reason}); scoring with the bundled tiny-world demo model
{fallback} instead. It only knows the tiny world's coloured shapes; pass --model for real images.
"""
MODEL_UNAVAILABLE = """\
error: could not load the DiNa-LRM model {model!r}: {reason}
It is not a local folder, and neither the Hugging Face cache nor the Hub could provide it (offline,
Hub unreachable, or no such repository).
To get them, run once with network access (they are cached afterwards):
    hf download {model}
or pass --model a local folder in the Hub layout (written by scripts/build_hub_repo.py, or for a quick offline
try: python -c "from dinalrm.testing import save_tiny_dinalrm_repo; save_tiny_dinalrm_repo('tiny-dinalrm')").
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
        description="Score images against a prompt with DiNa-LRM (higher = preferred). Runs the model repository's "
        "own DiNa-LRM code (trust_remote_code).",
    )
    parser.add_argument(
        "images", nargs="+", help="Image files (any size and mode; resized as the pipeline documents)."
    )
    parser.add_argument(
        "--model",
        default=None,
        help=f"Hub id or local folder (default: {DEFAULT_MODEL}, or the bundled tiny-world model when that is "
        "unreachable offline).",
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")
    return parser.parse_args(argv)


def _load_images(paths: list[str]) -> list[PIL.Image.Image]:
    images = []
    for path in paths:
        with PIL.Image.open(path) as image:
            image.load()
            images.append(image.copy())
    return images


def _load_pipeline(model: str | None) -> tuple[DiNaLRMPipeline | None, str]:
    """Loads `model`; without an explicit model, falls back (loudly) to the bundled tiny model when offline."""
    name = model or DEFAULT_MODEL
    try:
        return DiNaLRMPipeline.from_pretrained(name), name
    except (OSError, HFValidationError, EntryNotFoundError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if model is None and BUNDLED_TINY_MODEL.is_dir():
            print(FALLBACK_WARNING.format(model=name, reason=reason, fallback=BUNDLED_TINY_MODEL), file=sys.stderr)
            return DiNaLRMPipeline.from_pretrained(BUNDLED_TINY_MODEL), str(BUNDLED_TINY_MODEL)
        print(MODEL_UNAVAILABLE.format(model=name, reason=reason), file=sys.stderr, end="")
        return None, name


def score_main(argv: list[str] | None = None) -> int:
    """Entry point of `dinalrm-score`; returns the process exit code."""
    args = parse_args(argv)
    try:
        images = _load_images(args.images)
    except OSError as err:
        print(f"error: cannot read image: {err}", file=sys.stderr)
        return 2
    pipe, args.model = _load_pipeline(args.model)
    if pipe is None:
        return 1
    pipe.to(args.device)
    if args.ensemble is not None:
        t = args.ensemble or list(pipe.reward_model.config.ensemble_t)
    else:
        t = args.t
    generator = torch.Generator().manual_seed(args.seed)
    options = {"t": t, "generator": generator, "batch_size": args.batch_size, "noise_sharing": args.noise_sharing}
    try:
        if len(images) == 2:
            comparison = pipe.compare(args.prompt, images[0], images[1], **options)
            rewards, probability = comparison.rewards.tolist(), comparison.probability
        else:
            rewards, probability = pipe(args.prompt, images=images, **options).rewards.tolist(), None
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if args.json:
        result = {
            "model": args.model,
            "prompt": args.prompt,
            "t": t if t is not None else pipe.reward_model.config.default_t,
            "seed": args.seed,
            "noise_sharing": args.noise_sharing,
            "rewards": [{"image": path, "reward": reward} for path, reward in zip(args.images, rewards)],
        }
        if probability is not None:
            result["p_first_preferred"] = probability
        print(json.dumps(result, indent=2))
        return 0
    width = max(len(os.fspath(path)) for path in args.images)
    for path, reward in zip(args.images, rewards):
        print(f"{path:<{width}}  {reward:+.4f}")
    if probability is not None:
        print(f"P(first preferred) = {probability:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(score_main())
