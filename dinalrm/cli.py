"""`dinalrm-score`: score images against their prompts from the shell.

    dinalrm-score --prompt "a photo of a cat" a.png b.png [--model ID_OR_DIR] [--t 0.4 | --ensemble] [--json]
    dinalrm-score --prompt "a photo of a cat" folder/ 'runs/**/*.png' --output scores.csv
    dinalrm-score --pairs pairs.jsonl --output scores.jsonl
    dinalrm-score --prompt "a photo of a cat" folder/ --output scores.parquet --ray --num-workers 4 --num-gpus-per-worker 1

Prints one raw reward and the per-prompt rank per image (higher = preferred) and, for two images, the probability
that the first one is preferred; with `--output`, writes the rows to a CSV, JSON Lines or Parquet file that a second
run resumes (see `dinalrm.serving.scoring`). With `--ray`, a pool of Ray Data actors scores the rows (see
`dinalrm.serving.distributed`): the same rows, columns and file as one process. Bad rows are counted skips. Exit codes: 0 success, 1 the model could not be
loaded, 2 bad arguments or no image that could be scored. Heavy imports (torch, diffusers) wait until the arguments
are parsed, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dinalrm import DEFAULT_BASE, DEFAULT_MODEL
from dinalrm.serving.distributed import add_ray_args


DTYPES = ("float32", "bfloat16", "float16")
FORMATS = ("csv", "jsonl", "parquet")  # dinalrm.serving.scoring.OUTPUT_FORMATS (not imported: --help stays instant)
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
        help="Write one row per image to this .csv, .jsonl or .parquet file, streamed as batches finish (Parquet: "
        "through FILE.partial.jsonl, written whole at the end); an existing file "
        "written with the same settings is resumed (rows already there are skipped).",
    )
    parser.add_argument("--format", choices=FORMATS, default=None, help="Format of --output (default: its suffix).")
    parser.add_argument("--overwrite", action="store_true", help="Start --output anew instead of resuming it.")
    add_ray_args(parser, "images")
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
            parser.error(
                f"cannot tell the format of --output {args.output} from its suffix: use .csv, .jsonl or .parquet."
            )
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1.")
    if args.num_workers < 1:
        parser.error("--num-workers must be at least 1.")
    for level in [args.t] if args.t is not None else args.ensemble or []:
        if not 0.0 <= level <= 1.0:
            parser.error(f"noise levels are fractions in [0, 1], got {level}.")
    return args


def _quiet_progress_bars() -> None:
    """No progress bars (loading or scoring) unless stderr is a terminal: logs and pipes stay clean."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def score_main(argv: list[str] | None = None) -> int:
    """Entry point of `dinalrm score`: parses the arguments and runs `dinalrm.serving.scoring.ScoringJob`;
    returns the process exit code."""
    args = parse_args(argv)
    from dinalrm.serving import scoring

    if args.device is not None:
        problem = scoring.device_problem(args.device)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    try:
        job = scoring.ScoringJob.from_inputs(args.images, args.rows_file, args.prompt)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    if not sys.stderr.isatty():
        _quiet_progress_bars()
    # Conversion of an official checkpoint (first use) and cache hits are reported on stderr.
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    logging.getLogger("modeling_dinalrm").setLevel(logging.INFO)
    device = args.device or scoring.default_device()
    if args.ray:  # the actors score on their GPUs (or CPUs); here the model only resolves settings and compares pairs
        device = "cpu"
    dtype_name = args.dtype or scoring.default_dtype("cuda" if args.ray and args.num_gpus_per_worker else device)
    try:
        loaded = scoring.load_scoring_pipeline(args.model, args.base, getattr(torch, dtype_name))
    except scoring.ModelUnavailableError as err:
        print(MODEL_UNAVAILABLE.format(model=err.model, reason=err.reason), file=sys.stderr, end="")
        if err.hub_hint:
            print(HUB_MODEL_HINT.format(model=err.model), file=sys.stderr, end="")
        return 1
    if loaded.fallback_reason:
        warning = FALLBACK_WARNING.format(model=loaded.name, reason=loaded.fallback_reason, fallback=loaded.source)
        print(warning, file=sys.stderr)
    pipe = loaded.pipe
    pipe.set_progress_bar_config(disable=True)  # the one progress bar is the job's, over all rows
    pipe.to(device)
    settings = scoring.ScoringSettings(
        t=scoring.noise_levels(pipe, args.t, args.ensemble),
        seed=args.seed,
        noise_sharing=args.noise_sharing,
        batch_size=args.batch_size,
        normalize=args.normalize or ("display" if args.output else None),
    )
    if args.output is not None:
        try:
            resume_key = settings.resume_key(loaded.source, args.base, dtype_name)
            job.open_output(args.output, args.format, resume_key, overwrite=args.overwrite)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.ray:
        from dinalrm.serving.distributed import ray_session, run_on_ray

        base = None if loaded.fallback_reason else args.base
        with ray_session():
            run_on_ray(job, settings, loaded.source, base, dtype_name, args.num_workers, args.num_gpus_per_worker)
    else:
        job.run(pipe, settings, desc="dinalrm-score")
    if job.skips.n_skipped:
        print(f"warning: {job.skips.summary(job.n_input)}", file=sys.stderr)
    probability = scoring.pipeline_probability(pipe, settings.t)
    try:
        table = job.finish(probability)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.output is not None:
        print(f"wrote {len(table)} rows to {args.output} ({len(table) - len(job.done)} new)", file=sys.stderr)
        return 0
    _print_table(args, loaded, table, settings.t, probability)
    return 0


def _print_table(args: argparse.Namespace, loaded, table: list[dict], t, probability) -> None:
    """The rewards on stdout: text lines `image  reward  rank` (grouped under each prompt when there are several),
    or one JSON object; P(first preferred) for two images of one prompt."""
    column = "normalized" if args.normalize else "reward"
    prompts = list(dict.fromkeys(row["prompt"] for row in table))
    p_first = None
    if len(table) == 2 and len(prompts) == 1:
        p_first = probability([table[0]["reward"]], [table[1]["reward"]])[0]
    if args.json:
        result = {
            "model": loaded.source,
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
        if loaded.fallback_reason:
            result["note"] = FALLBACK_NOTE.format(model=loaded.name)
        print(json.dumps(result, indent=2))
        return
    if loaded.fallback_reason:
        print(FALLBACK_NOTE.format(model=loaded.name))
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
