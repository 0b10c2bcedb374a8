"""The command lines of `dinalrm eval` (`runner`) and `dinalrm calibrate` (`calibration`) and the benchmark options
every evaluation script shares, kept free of heavy imports so that their `--help` is instant (the runner, the
scorers and the benchmark loaders import torch, datasets and the model stack).

The scorer and benchmark names are plain constants here; tests/test_eval_runner.py checks them against the
scorer registry (`scorers.SCORERS`) and the benchmark table (`dinalrm.data.benchmarks.BENCHMARKS`).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Collection

from dinalrm.serving.arguments import add_ray_args


# The benchmarks of `dinalrm.data.benchmarks.BENCHMARKS`, in its order (the column order of results.md).
BENCHMARK_NAMES = ("imagereward", "hpdv2", "hpdv3", "genai_bench", "pickapic_v2", "canonical")
# Accepted spellings of benchmark names (eval_datasets.py calls Pick-a-Pic v2 "pickapic_v2").
BENCHMARK_ALIASES = {
    "pickapic": "pickapic_v2", "genai-bench": "genai_bench", "genaibench": "genai_bench", "pairs": "canonical",
}  # fmt: skip
# The scorers `scorers.py` registers (`SCORERS`); a scorer registered elsewhere is accepted by `runner.parse_args`.
SCORER_NAMES = ("dinalrm", "lrm", "pickscore", "clip", "hpsv2", "hpsv3", "imagereward")
# The scorers of Table 1, in its row order: `--scorer table1`.
TABLE1_SCORERS = ("dinalrm", "lrm", "pickscore", "clip", "hpsv2", "hpsv3", "imagereward")
# `noise_sharing` of the DiNa-LRM scorer: one noise per prompt (and latent shape), or one per image.
NOISE_SHARING = ("prompt", "none")
# run_eval's bootstrap: resamples of the pairs (micro) or of whole prompts (macro, HPDv2), 95% percentile interval.
BOOTSTRAP_SAMPLES = 1000

EVAL_DESCRIPTION = (
    "Pairwise accuracy of a reward model on the paper's benchmarks (Table 1), with one protocol for every model."
)
CALIBRATE_DESCRIPTION = (
    "Calibrated preference probabilities: fit a logistic curve to reward differences and measure it on held-out pairs."
)


# ---------------------------------------------------------------------------------------------- argparse types
def parse_floats(text: str) -> list[float]:
    """`"0.2,0.5,0.7"` -> `[0.2, 0.5, 0.7]` (an argparse type)."""
    try:
        return [float(value) for value in text.split(",") if value.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.2,0.5,0.7, got {text!r}") from err


def canonical_benchmark(name: str) -> str:
    """The eval_datasets.py name of `name` (aliases such as `pickapic` accepted)."""
    canonical = BENCHMARK_ALIASES.get(name.strip().lower(), name.strip().lower())
    if canonical not in BENCHMARK_NAMES:
        known = ", ".join([*BENCHMARK_NAMES, *BENCHMARK_ALIASES])
        raise argparse.ArgumentTypeError(f"unknown benchmark {name!r}; choose from {known}.")
    return canonical


def parse_benchmarks(text: str) -> list[str]:
    """`"imagereward,hpdv2,pickapic"` -> canonical names, duplicates removed (an argparse type)."""
    return list(dict.fromkeys(canonical_benchmark(name) for name in text.split(",") if name.strip()))


def parse_noise_sharing(text: str) -> list[str]:
    """`"prompt,none"` -> `["prompt", "none"]` (an argparse type)."""
    modes = list(dict.fromkeys(mode.strip() for mode in text.split(",") if mode.strip()))
    if not modes or any(mode not in NOISE_SHARING for mode in modes):
        raise argparse.ArgumentTypeError(f"expected prompt, none or prompt,none; got {text!r}")
    return modes


def parse_scorers(text: str, known: Collection[str] = SCORER_NAMES) -> list[str]:
    """`"dinalrm,hpsv2"` -> `["dinalrm", "hpsv2"]`; `table1` expands to `TABLE1_SCORERS`; names outside `known`
    are refused (an argparse type once `known` is bound)."""
    names: list[str] = []
    for name in filter(None, (part.strip().lower() for part in text.split(","))):
        if name != "table1" and name not in known:
            raise argparse.ArgumentTypeError(
                f"unknown scorer {name!r}; choose from {', '.join(sorted(known))}, table1."
            )
        names += TABLE1_SCORERS if name == "table1" else [name]
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------- shared options
def add_benchmark_args(parser: argparse.ArgumentParser, default_benchmarks: str) -> None:
    """Options every evaluation script shares: which benchmarks, where from, how much, how to batch."""
    parser.add_argument(
        "--benchmarks", type=parse_benchmarks, default=None,
        help=f"Comma-separated: {', '.join(BENCHMARK_NAMES)} (aliases: pickapic, pairs). Default: "
             f"{default_benchmarks}; with --pairs, none (only the pairs).",
    )  # fmt: skip
    parser.set_defaults(default_benchmarks=parse_benchmarks(default_benchmarks))
    parser.add_argument(
        "--pairs", default=None, metavar="PATH_OR_ID",
        help="Also evaluate a local folder or Hub dataset in the canonical pair schema (prompt, chosen, rejected "
             "image columns[, weight]; e.g. make_pairs.py's output): one pair per row, chosen preferred, micro "
             "average, results under 'canonical'. Split: test, or --split pairs=SPLIT.",
    )  # fmt: skip
    parser.add_argument(
        "--data_dir", default=None,
        help="Folder with one subfolder per benchmark in the published layout (see README); default: the Hub.",
    )  # fmt: skip
    parser.add_argument(
        "--split", action="append", default=[], metavar="BENCHMARK=SPLIT",
        help="Override a split, e.g. pickapic=test or genai_bench=test_v1 (repeatable).",
    )  # fmt: skip
    parser.add_argument(
        "--hub_id", action="append", default=[], metavar="BENCHMARK=REPO",
        help="Override a Hub dataset, e.g. pickapic=liuhuohuo2/pick-a-pic-v2 (repeatable).",
    )  # fmt: skip
    parser.add_argument(
        "--hpdv3_image_root", default=None, help="Extracted HPDv3 images when test.json is from the Hub."
    )
    parser.add_argument("--cache_dir", default=None, help="datasets / huggingface_hub cache folder.")
    parser.add_argument(
        "--manifests", default=None, metavar="DIR",
        help="Check each benchmark against DIR/<benchmark>-<split>.jsonl (a split manifest): score exactly its "
             "pairs, leave missing or altered files out and list them; results.json records the manifest's sha256.",
    )  # fmt: skip
    parser.add_argument(
        "--limit", type=int, default=None,
        help="Keep only the first N pairs of each benchmark (quick checks; not the benchmark's protocol).",
    )  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=8, help="Images per scoring call.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the scoring noise (mixed with each image's id).")
    parser.add_argument(
        "--noise_sharing", type=parse_noise_sharing, default=parse_noise_sharing("prompt,none"),
        help="DiNa-LRM: prompt (all images of a prompt share their noise draws, as pipelines score by default), none "
             "(one draw per image, the reference protocol and the paper's), or prompt,none (default: both rows, from "
             "one VAE encoding per image).",
    )  # fmt: skip
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="Model dtype; auto = bfloat16 on GPU, float32 on CPU.",
    )


# ---------------------------------------------------------------------------------------------------- eval
def add_eval_arguments(parser: argparse.ArgumentParser, scorer_names: Collection[str] = SCORER_NAMES) -> None:
    """The options of `dinalrm eval` (eval/run_eval.py); `scorer_names`: the names `--scorer` accepts."""
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[SCORER=]ID",
        help="Hub id or local folder (DiNa-LRM: the pipeline repo; LRM: the converter's output; CLIP scorers: a "
        "CLIPModel; default for pickscore/clip: their published model). Repeatable as SCORER=ID when several "
        "scorers run; a bare ID goes to the only scorer, or to dinalrm.",
    )
    parser.add_argument(
        "--scorer",
        type=functools.partial(parse_scorers, known=tuple(scorer_names)),
        default=["dinalrm"],
        help=f"Comma-separated scorers, run one after the other on the same benchmarks into one table: "
        f"{', '.join(sorted(scorer_names))}, or table1 (all of {', '.join(TABLE1_SCORERS)}).",
    )
    parser.add_argument(
        "--scorer_requirements",
        action="append",
        default=[],
        metavar="SCORER=FILE",
        help="hpsv2/hpsv3/imagereward: install FILE instead of the pinned requirements (a new environment).",
    )
    parser.add_argument(
        "--scorer_find_links",
        action="append",
        default=[],
        metavar="DIR_OR_URL",
        help="hpsv2/hpsv3/imagereward: extra wheel locations for uv (offline mirrors).",
    )
    parser.add_argument(
        "--backbone",
        default=None,
        choices=("sd3", "flux", "zimage"),
        help="DiNa-LRM: the backbone family --model must have (default: whichever it has; the pipeline follows it).",
    )
    parser.add_argument("--processor", default=None, help="CLIP scorers: processor id/folder (default per scorer).")
    parser.add_argument("--t", type=float, default=None, help="DiNa-LRM noise level (default: the model's, 0.4).")
    parser.add_argument(
        "--ensemble",
        type=parse_floats,
        nargs="?",
        const=[],
        default=None,
        help="DiNa-LRM ensemble levels (no value: the model's 0.2,0.5,0.7); with --t, both rows.",
    )
    parser.add_argument("--num_noise_samples", type=int, default=1, help="DiNa-LRM: average over N noise draws.")
    parser.add_argument(
        "--lrm_timesteps",
        type=parse_floats,
        default=None,
        help="LRM: integer DDPM timesteps, one results row each (default: 1, the official validation timestep).",
    )
    parser.add_argument("--output_dir", default="eval_results")
    parser.add_argument("--fresh", action="store_true", help="Ignore results already in --output_dir.")
    parser.add_argument(
        "--bootstrap_samples",
        type=int,
        default=BOOTSTRAP_SAMPLES,
        help="Bootstrap resamples for the 95%% interval of each accuracy (0: no interval).",
    )
    parser.add_argument("--bootstrap_seed", type=int, default=0, help="Seed of the bootstrap resampling.")
    add_benchmark_args(parser, "imagereward,hpdv2,hpdv3,genai_bench")
    add_ray_args(parser, "benchmark images")


def check_eval_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check alone."""
    if args.ray and args.num_workers < 1:
        parser.error("--num-workers must be at least 1.")


def parse_eval_args(
    argv: list[str] | None = None, prog: str | None = None, scorer_names: Collection[str] = SCORER_NAMES
) -> argparse.Namespace:
    """The arguments of `dinalrm eval` (eval/run_eval.py)."""
    parser = argparse.ArgumentParser(prog=prog, description=EVAL_DESCRIPTION)
    add_eval_arguments(parser, scorer_names)
    args = parser.parse_args(argv)
    check_eval_args(parser, args)
    return args


# ----------------------------------------------------------------------------------------------- calibrate
def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dinalrm calibrate` (eval/calibrate.py)."""
    parser.add_argument("--model", required=True, help="DiNa-LRM Hub id or local folder.")
    levels = parser.add_mutually_exclusive_group()
    levels.add_argument("--t", type=float, default=None, help="Noise level (default: the model's, 0.4).")
    levels.add_argument(
        "--ensemble", type=parse_floats, nargs="?", const=[], default=None,
        help="Fit for the ensemble instead (no value: the model's levels 0.2,0.5,0.7).",
    )  # fmt: skip
    parser.add_argument("--num_noise_samples", type=int, default=1, help="Average each score over N noise draws.")
    parser.add_argument(
        "--eval_pairs", default=None, metavar="PATH_OR_ID",
        help="Held-out canonical pairs to measure calibration on (split: --eval_split).",
    )  # fmt: skip
    parser.add_argument("--eval_split", default="test", help="Split of --eval_pairs (default: test).")
    parser.add_argument(
        "--holdout_fraction", type=float, default=0.3,
        help="Without --eval_pairs: the fraction of the fitting set's prompts held out for measuring.",
    )  # fmt: skip
    parser.add_argument("--output_dir", default="calibration")
    parser.add_argument(
        "--write_to_model", action="store_true",
        help="Store the calibration in the local model folder's reward-model config.json.",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="With --write_to_model: replace a calibration.")
    add_benchmark_args(parser, "hpdv3")


def parse_calibrate_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The arguments of `dinalrm calibrate` (eval/calibrate.py)."""
    parser = argparse.ArgumentParser(prog=prog, description=CALIBRATE_DESCRIPTION)
    add_calibrate_arguments(parser)
    return parser.parse_args(argv)
