"""Reward statistics of a DiNa-LRM model on a reference set, for z-scored rewards (`normalize="zscore"`).

    python eval/reward_stats.py --model FOLDER --pairs REFERENCE_PAIRS [--t 0.4 | --ensemble [0.2,0.5,0.7]] \
        [--num_noise_samples N] [--output_dir reward_stats] [--write_to_model [--overwrite]]

Every image of the reference set (`--pairs`, canonical pair schema, or `--benchmarks`) is scored once at the noise
setting, with `run_eval.py`'s per-image noise, and the rewards summarised (`dinalrm/evaluation/reward_stats.py`:
mean, population std, quantiles, count). Writes `reward_stats.json` to `--output_dir`; `--write_to_model` adds the
entry to `reward_statistics` in the local model folder's reward-model `config.json` and to its model card's
metadata (`README.md`), replacing an entry at the same levels only with `--overwrite`.
"""

from __future__ import annotations

import argparse
import os
import sys

from calibrate import reward_model_config_path
from common import add_benchmark_args, distributed_scores, load_benchmarks, parse_floats, start_run, write_json
from scorers import DiNaLRMScorer

from dinalrm.evaluation.reward_stats import reward_statistics, write_reward_statistics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="DiNa-LRM Hub id or local folder.")
    levels = parser.add_mutually_exclusive_group()
    levels.add_argument("--t", type=float, default=None, help="Noise level (default: the model's, 0.4).")
    levels.add_argument(
        "--ensemble", type=parse_floats, nargs="?", const=[], default=None,
        help="The ensemble instead (no value: the model's levels 0.2,0.5,0.7).",
    )  # fmt: skip
    parser.add_argument("--num_noise_samples", type=int, default=1, help="Average each score over N noise draws.")
    parser.add_argument("--output_dir", default="reward_stats")
    parser.add_argument("--write_to_model", action="store_true", help="Store the statistics in the model folder.")
    parser.add_argument("--overwrite", action="store_true", help="With --write_to_model: replace an entry.")
    add_benchmark_args(parser, "hpdv3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accelerator = start_run()
    pipe = DiNaLRMScorer.load_pipeline(args.model, accelerator.device, args.dtype)
    config = pipe.reward_model.config
    setting = tuple(args.ensemble or config.ensemble_t) if args.ensemble is not None else (args.t or config.default_t)
    scorer = DiNaLRMScorer(pipe, [setting], num_noise_samples=args.num_noise_samples, seed=args.seed,
                           noise_sharing=["none"])  # fmt: skip
    rewards, names = [], []
    for key, benchmark in load_benchmarks(args).items():
        scores, _ = distributed_scores(scorer, benchmark, accelerator, args.batch_size)
        rewards += [row[0] for row in scores.values()]
        names.append(key)
    entry = reward_statistics(
        rewards, setting, reference=", ".join(names) if not args.pairs else f"pairs: {args.pairs}",
        num_noise_samples=args.num_noise_samples, seed=args.seed,
    )  # fmt: skip
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(os.path.join(args.output_dir, "reward_stats.json"), entry)
        print(f"mean {entry['mean']:.4f}, std {entry['std']:.4f} over {entry['n']} images at t={entry['t']}")
        if args.write_to_model:
            path = reward_model_config_path(args.model)
            card = os.path.join(args.model, "README.md")
            try:
                write_reward_statistics(path, entry, args.overwrite, card_path=card)
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            print(f"Wrote reward_statistics to {path} and {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
