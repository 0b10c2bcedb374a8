"""The `dinalrm` command: argument parsing only; each subcommand calls into the package.

    dinalrm score --prompt "a photo of a cat" a.png b.png [--model ID_OR_DIR] [--t 0.4 | --ensemble] [--json]
    dinalrm score --prompt "a photo of a cat" folder/ 'runs/**/*.png' --output scores.csv
    dinalrm score --pairs pairs.jsonl --output scores.jsonl
    dinalrm serve --model ID_OR_DIR [--port 8000] [--ray]
    dinalrm eval --model ID_OR_DIR --benchmarks hpdv2 [--data_dir DIR]      (dinalrm.evaluation.runner)
    dinalrm calibrate --model DIR --data_dir DIR [--write_to_model]         (dinalrm.evaluation.calibration)
    dinalrm convert dinalrm --official_dir DIR_OR_ID --output_dir OUT       (an official DiNa-LRM checkpoint)
    dinalrm convert lrm --official_dir DIR_OR_ID --base SD15_OR_SDXL --output_dir OUT   (an official LRM one)
    dinalrm build-hub --reward_model DIR --base ID_OR_DIR --output_dir OUT [--push_to_hub --hub_model_id ID]

`dinalrm-score` and `dinalrm-serve` are aliases of `dinalrm score` and `dinalrm serve`. `score` prints one raw
reward and the per-prompt rank per image (higher = preferred), P(A ≻ B) for two images and a ranking for more; with
`--output`, it writes the rows to a CSV, JSON Lines or Parquet file that a second run resumes
(`dinalrm.serving.scoring`); with `--ray`, a pool of Ray Data actors scores them (`dinalrm.serving.distributed`). Exit
codes: 0 success, 1 the model could not be loaded, 2 bad arguments or no image that could be scored. Nothing heavy
(torch, diffusers, the model stack) is imported before the arguments are parsed, so every `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dinalrm import DEFAULT_BASE, DEFAULT_MODEL
from dinalrm.serving.arguments import add_ray_args


DTYPES = ("float32", "bfloat16", "float16")
FORMATS = ("csv", "jsonl", "parquet")  # dinalrm.serving.scoring.OUTPUT_FORMATS (not imported: --help stays instant)
FALLBACK_WARNING = """\
warning: {model} could not be loaded ({reason}).
  Scoring with the packaged demo model instead: a tiny model of coloured shapes, not of real images.
  For the real model, accept the licence of its base, SD3.5-Medium, on its Hub page:
  https://huggingface.co/{base}
  then run `hf auth login` and score once online (cached afterwards), or pass --model.
"""
FALLBACK_NOTE = "note: scored with the packaged demo model, not {model} (see the warning on stderr)."
MODEL_UNAVAILABLE = "error: could not load the DiNa-LRM model {model!r}: {reason}\n"
HUB_MODEL_HINT = """\
To get it, run once with network access (it is cached afterwards): hf download {model}
or pass --model a local folder (a DiNa-LRM pipeline folder, or an official checkpoint folder with --base), or for
a quick offline try: python -c "from dinalrm.testing import save_tiny_dinalrm_repo; save_tiny_dinalrm_repo('tiny-dinalrm')"
"""
REWARD_MEANING = "raw DiNa-LRM rewards (higher = preferred; compare them within a prompt, the scale has no unit)"
NORMALIZED_MEANING = {
    "display": "display scores (raw + 10) / 10 (higher = preferred)",
    "logistic": "calibrated scores in (0, 1) (higher = preferred)",
    "zscore": "z-scores of the rewards (higher = preferred)",
}


def _noise_levels(text: str) -> list[float]:
    try:
        return [float(level) for level in text.split(",")]
    except ValueError as err:
        message = f"expected comma-separated noise levels like 0.2,0.5,0.7, got {text!r}"
        raise argparse.ArgumentTypeError(message) from err


# ------------------------------------------------------------------------------------------------ score
SCORE_DESCRIPTION = (
    "Score images against their prompts with DiNa-LRM (raw rewards, higher = preferred), with the installed DiNa-LRM "
    "code (a model repository's own code files are never run)."
)


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dinalrm score`."""
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
        "or the packaged tiny-world demo model when that is unreachable offline).",
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
        "(default there: display). P(A ≻ B) is the same either way.",
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


def check_score_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check alone; fills in `args.format` from the --output suffix."""
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


def parse_args(argv: list[str] | None = None, prog: str = "dinalrm score") -> argparse.Namespace:
    """The arguments of `dinalrm score` (`dinalrm-score`)."""
    parser = argparse.ArgumentParser(prog=prog, description=SCORE_DESCRIPTION)
    add_score_arguments(parser)
    args = parser.parse_args(argv)
    check_score_args(parser, args)
    return args


def _quiet_progress_bars() -> None:
    """No progress bars (loading or scoring) unless stderr is a terminal: logs and pipes stay clean."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def run_score(args: argparse.Namespace) -> int:
    """`dinalrm score`: runs `dinalrm.serving.scoring.ScoringJob` and prints what it found; returns the exit code."""
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
        reason = loaded.fallback_reason if len(loaded.fallback_reason) <= 160 else loaded.fallback_reason[:157] + "..."
        print(FALLBACK_WARNING.format(model=loaded.name, reason=reason, base=DEFAULT_BASE), file=sys.stderr, end="")
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
        job.run(pipe, settings, desc="dinalrm score")
    if job.skips.n_skipped:
        print(f"warning: {job.skips.summary(job.n_input)}", file=sys.stderr)
    failed = job.skips.counts[scoring.NONFINITE_REWARD]
    if failed:  # a model problem, not a data one: the run fails, after writing the finite rows
        print(
            f"error: {failed} row(s) scored NaN or infinity and were left out: check the model's weights "
            "(e.g. load it in float32).",
            file=sys.stderr,
        )
    probability = scoring.pipeline_probability(pipe, settings.t)
    try:
        table = job.finish(probability)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.output is not None:
        print(f"wrote {len(table)} rows to {args.output} ({len(table) - len(job.done)} new)", file=sys.stderr)
        return 1 if failed else 0
    _print_results(args, loaded, table, settings.t, probability)
    return 1 if failed else 0


def _succeeds(symbol: str) -> str:
    """`symbol`, or `>` where stdout cannot encode it."""
    try:
        symbol.encode(sys.stdout.encoding or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return ">"
    return symbol


def _print_results(args: argparse.Namespace, loaded, table: list[dict], t, probability) -> None:
    """The scores on stdout, saying what they are: per prompt a ranking (best first; ties keep the input order),
    and for two images of one prompt P(A ≻ B) with A and B named (A: the first given). Or one JSON object."""
    column = "normalized" if args.normalize else "reward"
    meaning = NORMALIZED_MEANING[args.normalize] if args.normalize else REWARD_MEANING
    prompts = list(dict.fromkeys(row["prompt"] for row in table))
    comparison = None
    if len(table) == 2 and len(prompts) == 1:
        a, b = table
        p_a = probability([a["reward"]], [b["reward"]])[0]
        comparison = {"a": a["image"], "b": b["image"], "p_a_preferred": p_a}
    if args.json:
        result = {
            "model": loaded.source,
            "prompt": prompts[0] if len(prompts) == 1 else prompts,
            "t": t,
            "seed": args.seed,
            "normalize": args.normalize,
            "noise_sharing": args.noise_sharing,
            "scores": meaning,
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
        if comparison is not None:
            result["comparison"] = comparison
        if loaded.fallback_reason:
            result["note"] = FALLBACK_NOTE.format(model=loaded.name)
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return
    if loaded.fallback_reason:
        print(FALLBACK_NOTE.format(model=loaded.name))
    levels = ",".join(str(level) for level in t) if isinstance(t, list) else t
    print(f"{meaning}, t={levels}, seed {args.seed}:")
    width = max(len(row["image"]) for row in table)
    for prompt in prompts:
        if len(prompts) > 1:
            print(f"prompt: {prompt}")
        members = sorted((row for row in table if row["prompt"] == prompt), key=lambda row: row["rank"])
        for row in members:
            print(f"  {row['rank']:>3}. {row['image']:<{width}}  {row[column]:+.4f}")
    if comparison is not None:
        relation = _succeeds("≻")
        print(f"P(A {relation} B) = {comparison['p_a_preferred']:.4f}   A = {comparison['a']}, B = {comparison['b']}")


def score_main(argv: list[str] | None = None) -> int:
    """Entry point of `dinalrm-score` (an alias of `dinalrm score`); returns the process exit code."""
    return run_score(parse_args(argv, prog="dinalrm-score"))


# ------------------------------------------------------------------------------------------------ serve
def run_serve(args: argparse.Namespace) -> int:
    """`dinalrm serve`: the HTTP server of `dinalrm.serving.server`, or with `--ray` its Ray Serve deployment
    (`dinalrm.serving.ray_serve`). The choice lives here so neither serving module imports the other."""
    from diffusers.utils import logging as diffusers_logging

    from dinalrm.serving.server import create_app, options_from_args

    options = options_from_args(args)
    diffusers_logging.set_verbosity_info()
    logging.basicConfig(level=logging.INFO)
    if args.ray:
        from dinalrm.serving.ray_serve import run_ray

        run_ray(options, args.host, args.port, args.num_replicas, args.num_gpus_per_replica)
        return 0
    import uvicorn

    uvicorn.run(create_app(options), host=args.host, port=args.port, log_level="info")
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of `dinalrm-serve` (an alias of `dinalrm serve`)."""
    from dinalrm.serving.arguments import build_parser

    return run_serve(build_parser(prog="dinalrm-serve").parse_args(argv))


# ---------------------------------------------------------------------------------------------- convert
CONVERT_DINALRM_DESCRIPTION = """\
Convert an official DiNa-LRM checkpoint (github.com/HKUST-C4G/diffusion-rm: `config.json` + `checkpoint/` with
`backbone_lora/` + `rm_head.pt`, `rm_head.pt` alone, or `full_model.pt`) into a `DiNaLRMModel` folder, taking the
backbone's pretrained blocks from a diffusers SD3 transformer. `DiNaLRMPipeline.from_pretrained(official_id_or_dir)`
runs the same conversion on the fly; this keeps a converted copy."""
CONVERT_LRM_DESCRIPTION = """\
Convert an official LRM checkpoint (github.com/Kwai-Kolors/LPO, `lrm/`: `unet/`, [`text_encoder/`,
`text_encoder_2/`,] `state_dict.pt`) into an `LRMPipeline` folder on the base SD1.5 / SDXL pipeline's VAE and
tokenizers. The reward model alone then loads with
`AutoModel.from_pretrained(OUT, subfolder="reward_model", trust_remote_code=True)`."""


def add_convert_dinalrm_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dinalrm convert dinalrm` (scripts/convert_official_checkpoint.py)."""
    parser.add_argument(
        "--official_dir", required=True, help="Official checkpoint: a folder or a Hub id (config.json + checkpoint/)."
    )
    parser.add_argument(
        "--backbone", default=DEFAULT_BASE, help="SD3 transformer: Hub id or folder (pipeline or transformer)."
    )
    parser.add_argument("--backbone_subfolder", default="transformer")
    parser.add_argument("--revision", default=None, help="Revision of the backbone repository.")
    parser.add_argument("--official_revision", default=None, help="Revision of the official checkpoint repository.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--keep_lora_adapter", action="store_true", help="Save LoRA as an adapter instead of merging it."
    )
    parser.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty output_dir.")


def add_convert_lrm_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dinalrm convert lrm` (scripts/convert_official_lrm_checkpoint.py)."""
    parser.add_argument("--official_dir", required=True, help="Official checkpoint: a folder or a Hub repository id.")
    parser.add_argument("--base", required=True, help="The SD1.5 / SDXL diffusers pipeline (Hub id or folder).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--revision", default=None, help="Revision of --official_dir on the Hub.")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="VFE guidance (official: 7.5).")
    parser.add_argument("--no_multi_scale", action="store_true", help="The checkpoint pools the mid block only.")
    parser.add_argument("--multi_scale_cfg", action="store_true", help="VFE on the down-block features too.")
    parser.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty output_dir.")


def run_convert(args: argparse.Namespace) -> int:
    """`dinalrm convert dinalrm|lrm`: `dinalrm.conversion` writes the converted folder."""
    from dinalrm import conversion

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.kind == "dinalrm":
        conversion.convert_dinalrm_folder(
            args.official_dir,
            args.output_dir,
            backbone=args.backbone,
            backbone_subfolder=args.backbone_subfolder or None,
            revision=args.revision,
            official_revision=args.official_revision,
            merge_lora=not args.keep_lora_adapter,
            overwrite=args.overwrite,
        )
    else:
        conversion.convert_lrm_folder(
            args.official_dir,
            args.base,
            args.output_dir,
            revision=args.revision,
            guidance_scale=args.guidance_scale,
            multi_scale=not args.no_multi_scale,
            multi_scale_cfg=args.multi_scale_cfg,
            overwrite=args.overwrite,
        )
    return 0


# -------------------------------------------------------------------------------------------- build-hub
BUILD_HUB_DESCRIPTION = """\
Assemble the DiNa-LRM Hub repository (a DiffusionPipeline folder with a model card) from a saved reward model and
the base pipeline of its backbone family: only the base's VAE, text encoders, tokenizers and scheduler are read. The
result loads with `DiNaLRMPipeline.from_pretrained(OUT)`."""


def add_build_hub_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dinalrm build-hub` (scripts/build_hub_repo.py)."""
    parser.add_argument("--reward_model", required=True, help="Folder of a saved DiNaLRMModel.")
    parser.add_argument("--base", required=True, help="SD3 pipeline: Hub id or local folder.")
    parser.add_argument("--revision", default=None, help="Revision of --base.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="Replace the contents of a non-empty output_dir.")
    parser.add_argument(
        "--datasets",
        default=None,
        help="Comma-separated Hub ids of the training data, for the card (e.g. MizzenAI/HPDv3).",
    )
    parser.add_argument(
        "--eval_results",
        default=None,
        help="`dinalrm eval`'s results.json: its accuracies go into the card's model-index.",
    )
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", default=None, help="Repository to push to, e.g. org/dinalrm-sd35m.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repository as private.")


def check_build_hub_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id.")


def run_build_hub(args: argparse.Namespace) -> int:
    """`dinalrm build-hub`: `dinalrm.hub.build_hub_folder` (and the push)."""
    from dinalrm.hub import build_hub_folder

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    datasets = [name for name in (args.datasets or "").split(",") if name]
    build_hub_folder(
        args.reward_model,
        args.base,
        args.output_dir,
        revision=args.revision,
        datasets=datasets,
        eval_results=args.eval_results,
        overwrite=args.overwrite,
        push_to=args.hub_model_id if args.push_to_hub else None,
        private=args.private,
    )
    return 0


# ------------------------------------------------------------------------------------------ eval, calibrate
def run_eval(args: argparse.Namespace) -> int:
    """`dinalrm eval`: `dinalrm.evaluation.runner` (pairwise accuracy, Table 1)."""
    from dinalrm.evaluation.runner import run

    return run(args)


def run_calibrate(args: argparse.Namespace) -> int:
    """`dinalrm calibrate`: `dinalrm.evaluation.calibration`."""
    from dinalrm.evaluation.calibration import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    """The parser of `dinalrm`; builds without importing torch, diffusers or the model stack."""
    from dinalrm import __version__
    from dinalrm.evaluation import arguments as evaluation
    from dinalrm.serving.arguments import DESCRIPTION as SERVE_DESCRIPTION
    from dinalrm.serving.arguments import add_serve_arguments

    parser = argparse.ArgumentParser(prog="dinalrm", description="DiNa-LRM, a diffusion-native latent reward model.")
    parser.add_argument("--version", action="version", version=f"dinalrm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, summary, description, add_arguments, handler, check=None, parent=commands):
        sub = parent.add_parser(name, help=summary, description=description)
        add_arguments(sub)
        sub.set_defaults(handler=handler, check=check, command_parser=sub)
        return sub

    add(
        "score",
        "Score images against their prompts (raw rewards, higher = preferred).",
        SCORE_DESCRIPTION,
        add_score_arguments,
        run_score,
        check_score_args,
    )
    add("serve", "HTTP reward server for RL trainers.", SERVE_DESCRIPTION, add_serve_arguments, run_serve)
    add(
        "eval",
        "Pairwise accuracy of a reward model on the paper's benchmarks (Table 1).",
        evaluation.EVAL_DESCRIPTION,
        evaluation.add_eval_arguments,
        run_eval,
        evaluation.check_eval_args,
    )
    add(
        "calibrate",
        "Fit calibrated preference probabilities and measure them on held-out pairs.",
        evaluation.CALIBRATE_DESCRIPTION,
        evaluation.add_calibrate_arguments,
        run_calibrate,
    )
    convert = commands.add_parser(
        "convert",
        help="Convert an official DiNa-LRM or LRM checkpoint.",
        description="Convert an official checkpoint.",
    )
    kinds = convert.add_subparsers(dest="kind", required=True, metavar="KIND")
    add(
        "dinalrm",
        "An official DiNa-LRM checkpoint.",
        CONVERT_DINALRM_DESCRIPTION,
        add_convert_dinalrm_arguments,
        run_convert,
        parent=kinds,
    )
    add(
        "lrm",
        "An official LRM (LPO) checkpoint.",
        CONVERT_LRM_DESCRIPTION,
        add_convert_lrm_arguments,
        run_convert,
        parent=kinds,
    )
    add(
        "build-hub",
        "Assemble a DiNa-LRM Hub repository.",
        BUILD_HUB_DESCRIPTION,
        add_build_hub_arguments,
        run_build_hub,
        check_build_hub_args,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `dinalrm`; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check is not None:
        args.check(args.command_parser, args)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
