"""`dinalrm-score`: score images against their prompts from the shell.

    dinalrm-score --prompt "a photo of a cat" a.png b.png [--model ID_OR_DIR] [--t 0.4 | --ensemble] [--json]
    dinalrm-score --prompt "a photo of a cat" folder/ 'runs/**/*.png' --output scores.csv
    dinalrm-score --pairs pairs.jsonl --output scores.jsonl

Prints one raw reward and the per-prompt rank per image (higher = preferred) and, for two images, the probability
that the first one is preferred; with `--output`, writes the rows to a CSV or JSON Lines file that a second run
resumes (see `dinalrm.serving.scoring`). Bad rows are counted skips. Exit codes: 0 success, 1 the model could not be
loaded, 2 bad arguments or no image that could be scored. Heavy imports (torch, diffusers) wait until the arguments
are parsed, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from dinalrm import DEFAULT_MODEL, bundled_asset


# The base the published checkpoint (`DEFAULT_MODEL`, official layout) needs.
DEFAULT_BASE = "stabilityai/stable-diffusion-3.5-medium"
# The tiny-world demo model shipped inside the package (examples/tiny_world); used when the default is unreachable.
BUNDLED_TINY_MODEL = bundled_asset("dinalrm-tiny")
DTYPES = ("float32", "bfloat16", "float16")
FORMATS = ("csv", "jsonl")
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
        description="Score images against their prompts with DiNa-LRM (higher = preferred), with the installed "
        "DiNa-LRM code (a model repository's own code files are never run).",
    )
    parser.add_argument(
        "images",
        nargs="*",
        help="Image files, folders (searched recursively for image files) or quoted glob patterns ('gen/**/*.png'); "
        "any size and mode, resized as the pipeline documents.",
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
    parser.add_argument("--prompt", default=None, help="The prompt of every image (unless --pairs gives prompts).")
    parser.add_argument(
        "--pairs",
        "--prompts",
        dest="rows_file",
        default=None,
        help="A CSV or JSON Lines file of rows to score: `prompt,image` (the prompt column may be left out with "
        "--prompt), or preference pairs in the canonical schema (prompt, chosen, rejected) or HPDv3's (prompt, "
        "path1, path2). Relative image paths are relative to the file's folder.",
    )
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
        help="prompt (default): the images of a prompt share one noise draw, so their rewards differ only by the "
        "images (identical images tie, P = 0.5) and do not depend on the other images; none: one draw per image "
        "within each batch, the reference code's protocol.",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="Default: bfloat16 on CUDA, float32 on the CPU.")
    parser.add_argument(
        "--normalize",
        choices=("display", "logistic", "zscore"),
        default=None,
        help="Print the official display score (raw + 10) / 10, or calibrated scores in (0, 1) from the model's "
        "fitted calibration (eval/calibrate.py), instead of raw rewards; in --output files the `normalized` column "
        "(default there: display). P(first preferred) is the same either way.",
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")
    parser.add_argument(
        "--output",
        default=None,
        help="Write one row per image to this .csv or .jsonl file, streamed as batches finish; an existing file "
        "written with the same settings is resumed (rows already there are skipped).",
    )
    parser.add_argument("--format", choices=FORMATS, default=None, help="Format of --output (default: its suffix).")
    parser.add_argument("--overwrite", action="store_true", help="Start --output anew instead of resuming it.")
    args = parser.parse_args(argv)
    if not args.images and args.rows_file is None:
        parser.error("pass image files, folders or globs, or a --pairs/--prompts file.")
    if args.output is not None and args.json:
        parser.error("--json prints to stdout; to write JSON Lines pass --output FILE.jsonl (or --format jsonl).")
    if args.output is None and (args.format or args.overwrite):
        parser.error("--format and --overwrite apply to --output FILE.")
    if args.output is not None and args.format is None:
        args.format = Path(args.output).suffix.lower().lstrip(".")
        if args.format not in FORMATS:
            parser.error(f"cannot tell the format of --output {args.output} from its suffix: use .csv or .jsonl.")
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1.")
    for level in [args.t] if args.t is not None else args.ensemble or []:
        if not 0.0 <= level <= 1.0:
            parser.error(f"noise levels are fractions in [0, 1], got {level}.")
    return args


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


def _rows_to_score(args: argparse.Namespace, skips) -> list:
    """The rows of the command line (files, folders, globs) or of the --pairs file, bad ones counted in `skips`."""
    from dinalrm.serving.scoring import expand_images, rows_from_file, rows_from_images

    rows = rows_from_file(args.rows_file, args.prompt, skips) if args.rows_file is not None else []
    if args.images:
        rows += rows_from_images(expand_images(args.images, skips), args.prompt)
    return rows


def _load_row_image(row, skips, header_only: bool = False):
    """The image of `row`, decoded as training and evaluation decode them (or only its header, a quick check before
    the model loads); None, counted in `skips`, if that fails."""
    from dinalrm.data import OVERSIZED, ImageLoadError, load_image, read_image_size

    try:
        return (read_image_size if header_only else load_image)(row.path)
    except ImageLoadError as err:
        hint = (
            " Downscale it first: it is resized to about 1024x1024 pixels anyway." if err.reason == OVERSIZED else ""
        )
        skips.skip(err.reason, f"cannot read image {row.image}: {err}.{hint}")
        return None


def _batches(rows: list, batch_size: int) -> list[list[int]]:
    """Row indices grouped by prompt (first appearance order), then cut into batches: fixed by the input alone."""
    by_prompt: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_prompt.setdefault(row.prompt, []).append(index)
    return [group[i : i + batch_size] for group in by_prompt.values() for i in range(0, len(group), batch_size)]


def _score_batch(pipe, prompt: str, images: list, options: dict, skips, names: list[str]) -> list[float | None]:
    """Raw rewards of one prompt's images with a fresh generator from `--seed` (the pipeline's noise rule then gives
    every prompt the same draws whatever the batch holds); None, a counted skip, for an image the pipeline refuses."""
    import torch

    from dinalrm.serving.scoring import NONFINITE_REWARD

    def score(pictures: list) -> list[float]:
        generator = torch.Generator().manual_seed(options["seed"])
        output = pipe(prompt, images=pictures, generator=generator, batch_size=len(pictures), **options["pipe"])
        return output.rewards.tolist()

    def finite(rewards: list[float]) -> list[float | None]:
        for name, reward in zip(names, rewards):
            if not math.isfinite(reward):
                skips.skip(NONFINITE_REWARD, f"{name}: the model scored it {reward} (its weights hold NaN/inf?)")
        return [reward if math.isfinite(reward) else None for reward in rewards]

    try:
        return finite(score(images))
    except ValueError:  # find the image(s) at fault and score the others alone
        rewards = []
        for name, image in zip(names, images):
            try:
                rewards += finite(score([image]))
            except ValueError as err:
                skips.skip("unscorable_image", f"{name}: {err}")
                rewards.append(None)
        return rewards


def _score_rows(pipe, rows: list, keys: list, done: set, output, options: dict, skips) -> dict:
    """Scores the batches that hold rows not `done` yet, appending the new rows to `output` batch by batch; returns
    the scored rows by key."""
    import torch
    from tqdm.auto import tqdm

    from dinalrm.serving.scoring import output_row

    batches = [batch for batch in _batches(rows, options["batch_size"]) if any(keys[i] not in done for i in batch)]
    scored = {}
    todo = sum(keys[i] not in done for batch in batches for i in batch)
    with tqdm(total=todo, unit="img", desc="dinalrm-score", disable=None, file=sys.stderr) as progress:
        for batch in batches:
            images = {index: _load_row_image(rows[index], skips) for index in batch}
            members = [index for index in batch if images[index] is not None]
            if members:
                names = [rows[index].image for index in members]
                pictures = [images[index] for index in members]
                rewards = _score_batch(pipe, rows[members[0]].prompt, pictures, options, skips, names)
                kept = [(index, reward) for index, reward in zip(members, rewards) if reward is not None]
                members, rewards = [index for index, _ in kept], [reward for _, reward in kept]
                normalized = pipe.normalize_rewards(torch.tensor(rewards), options["normalize"], options["pipe"]["t"])
                new = []
                for index, reward, value in zip(members, rewards, normalized.tolist()):
                    scored[keys[index]] = entry = output_row(rows[index], reward, value)
                    if keys[index] not in done:
                        new.append(entry)
                if output is not None and new:
                    output.append(new)
            progress.update(sum(keys[i] not in done for i in batch))
    return scored


def score_main(argv: list[str] | None = None) -> int:
    """Entry point of `dinalrm-score`; returns the process exit code."""
    args = parse_args(argv)
    if args.device is not None:
        problem = _device_problem(args.device)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    if args.images and args.prompt is None:
        print("error: pass --prompt for the images given on the command line.", file=sys.stderr)
        return 2
    if args.prompt is not None and not args.prompt.strip():
        print("error: --prompt is empty: pass the prompt the images were generated from.", file=sys.stderr)
        return 2
    from dinalrm.serving.scoring import NONFINITE_REWARD, Skips, finish_rows, row_keys

    skips = Skips()
    try:
        rows = _rows_to_score(args, skips)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.output is not None:
        from dinalrm.serving.scoring import check_output_is_not_an_input

        inputs = [row.path for row in rows] + ([args.rows_file] if args.rows_file is not None else [])
        try:
            check_output_is_not_an_input(args.output, inputs)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    total = len(rows) + skips.n_skipped
    rows = [row for row in rows if _load_row_image(row, skips, header_only=True) is not None]
    if not rows:
        print(f"warning: {skips.summary(total)}\nerror: no image to score.", file=sys.stderr)
        return 2
    import torch

    interactive = sys.stderr.isatty()
    if not interactive:
        _quiet_progress_bars()
    # Conversion of an official checkpoint (first use) and cache hits are reported on stderr.
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    logging.getLogger("modeling_dinalrm").setLevel(logging.INFO)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or default_dtype(device)
    pipe, name, fell_back = _load_pipeline(args.model, args.base, getattr(torch, dtype_name))
    if pipe is None:
        return 1
    args.model = str(BUNDLED_TINY_MODEL) if fell_back else name
    pipe.set_progress_bar_config(disable=True)  # the one progress bar is ours, over all rows
    pipe.to(device)
    if args.ensemble is not None:
        t = args.ensemble or list(pipe.reward_model.config.ensemble_t)
    else:
        t = args.t if args.t is not None else pipe.reward_model.config.default_t
    normalize_name = args.normalize or ("display" if args.output else None)
    normalize = {None: False, "display": True, "logistic": "logistic", "zscore": "zscore"}[normalize_name]
    options = {"seed": args.seed, "batch_size": args.batch_size, "normalize": normalize}
    options["pipe"] = {"t": t, "noise_sharing": args.noise_sharing}
    keys = row_keys(rows)
    output = None
    if args.output is not None:
        from dinalrm.serving.scoring import OutputFile

        model = os.path.abspath(args.model) if os.path.isdir(args.model) else args.model
        settings = {"model": model, "base": args.base, "dtype": dtype_name, "t": t, "normalize": normalize_name}
        settings |= {"seed": args.seed, "noise_sharing": args.noise_sharing}
        if args.noise_sharing == "none":  # draws follow the batches then
            settings["batch_size"] = args.batch_size
        try:
            output = OutputFile(args.output, args.format, settings, args.overwrite)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    done = set(row_keys(output.rows)) if output is not None else set()
    scored = _score_rows(pipe, rows, keys, done, output, options, skips)
    if skips.n_skipped:
        print(f"warning: {skips.summary(total)}", file=sys.stderr)
    failed = skips.counts[NONFINITE_REWARD]
    if failed:  # a model problem, not a data one: the run fails, after writing the finite rows
        print(
            f"error: {failed} row(s) scored NaN or infinity and were left out: check the model's weights "
            "(e.g. load it in float32).",
            file=sys.stderr,
        )

    def probability(first, second):
        return pipe.preference_probability(torch.tensor(first), torch.tensor(second), t).tolist()

    if output is not None:
        if not output.rows:
            print(f"error: no row could be scored; {args.output} was not written.", file=sys.stderr)
            return 2
        finished = output.finish(keys, probability)
        print(f"wrote {len(finished)} rows to {args.output} ({len(finished) - len(done)} new)", file=sys.stderr)
        return 1 if failed else 0
    if not scored:
        print("error: no row could be scored.", file=sys.stderr)
        return 2
    table = finish_rows([scored[key] for key in keys if key in scored], probability)
    _print_table(args, table, t, name if fell_back else None, probability)
    return 1 if failed else 0


def _print_table(args: argparse.Namespace, table: list[dict], t, fell_back_from: str | None, probability) -> None:
    """The rewards on stdout: text lines `image  reward  rank` (grouped under each prompt when there are several),
    or one JSON object; P(first preferred) for two images of one prompt."""
    column = "normalized" if args.normalize else "reward"
    prompts = list(dict.fromkeys(row["prompt"] for row in table))
    p_first = None
    if len(table) == 2 and len(prompts) == 1:
        p_first = probability([table[0]["reward"]], [table[1]["reward"]])[0]
    if args.json:
        result = {
            "model": args.model,
            "prompt": prompts[0] if len(prompts) == 1 else prompts,
            "t": t,
            "seed": args.seed,
            "normalize": args.normalize,
            "noise_sharing": args.noise_sharing,
            "rewards": [
                {"image": row["image"], "prompt": row["prompt"], "reward": row[column], "rank": row["rank"]}
                | (
                    {"pair": row["pair"], "side": row["side"], "p_preferred": row["p_preferred"]}
                    if row["side"]
                    else {}
                )
                for row in table
            ],
        }
        if p_first is not None:
            result["p_first_preferred"] = p_first
        if fell_back_from:
            result["note"] = FALLBACK_NOTE.format(model=fell_back_from)
        print(json.dumps(result, indent=2))
        return
    if fell_back_from:
        print(FALLBACK_NOTE.format(model=fell_back_from))
    width = max(len(row["image"]) for row in table)
    for prompt in prompts:
        if len(prompts) > 1:
            print(f"prompt: {prompt}")
        for row in table:
            if row["prompt"] == prompt:
                print(f"{row['image']:<{width}}  {row[column]:+.4f}  rank {row['rank']}")
    if p_first is not None:
        print(f"P(first preferred) = {p_first:.4f}")


if __name__ == "__main__":
    sys.exit(score_main())


def serve_main(argv: list[str] | None = None) -> None:
    """Entry point of `dinalrm-serve`: the HTTP server of `dinalrm.serving.server`, or with `--ray` its Ray Serve
    deployment (`dinalrm.serving.ray_serve`). The choice lives here so neither serving module imports the other."""
    from diffusers.utils import logging as diffusers_logging

    from dinalrm.serving.server import build_parser, create_app, options_from_args

    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    diffusers_logging.set_verbosity_info()
    logging.basicConfig(level=logging.INFO)
    if args.ray:
        from dinalrm.serving.ray_serve import run_ray

        run_ray(options, args.host, args.port, args.num_replicas, args.num_gpus_per_replica)
        return
    import uvicorn

    uvicorn.run(create_app(options), host=args.host, port=args.port, log_level="info")
