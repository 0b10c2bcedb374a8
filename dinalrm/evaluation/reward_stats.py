"""Reward statistics: the distribution of a model's rewards on a reference prompt/image set, per noise setting.

Rewards of different models live on different scales; an RL trainer mixing them (`w1 * z1 + w2 * z2`) needs each
on a documented one. `reward_statistics` summarises rewards (mean, population std, quantiles, count) and
`write_reward_statistics` stores the summary in the model's `config.json` (`reward_statistics`, one entry per noise
setting; what `DiNaLRMPipeline(..., normalize="zscore")` reads) and in its model card's metadata.
`main` (the command line of `eval/reward_stats.py`) scores the reference set and calls these:

    python eval/reward_stats.py --model FOLDER --pairs REFERENCE_PAIRS [--t 0.4 | --ensemble [0.2,0.5,0.7]] \
        [--num_noise_samples N] [--output_dir reward_stats] [--write_to_model [--overwrite]]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .arguments import add_benchmark_args, parse_floats
from .calibration import reward_model_config_path
from .common import distributed_scores, load_benchmarks, start_run, write_json
from .scorers import DiNaLRMScorer


QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def reward_statistics(
    rewards: Sequence[float], t: float | Sequence[float], quantiles: Sequence[float] = QUANTILES, **about: Any
) -> dict[str, Any]:
    """`{t, mean, std, quantiles: {"0.05": ...}, n, **about}` of `rewards` read at noise level(s) `t`.

    `std` is the population standard deviation (ddof 0), quantiles are numpy's linear interpolation; `about`
    records what the set was (e.g. `reference`, `num_noise_samples`). Needs two or more finite rewards that differ.
    """
    values = np.asarray(rewards, dtype=np.float64)
    if values.ndim != 1 or values.size < 2 or not np.isfinite(values).all():
        raise ValueError(f"Reward statistics need two or more finite rewards, got {values.size} values.")
    std = float(values.std())
    if std == 0.0:
        raise ValueError("All rewards are equal: a z-score would divide by a zero standard deviation.")
    levels = [float(t)] if isinstance(t, (int, float)) else [float(level) for level in t]
    return {
        "t": levels,
        "mean": float(values.mean()),
        "std": std,
        "quantiles": {f"{q:g}": float(np.quantile(values, q)) for q in quantiles},
        "n": int(values.size),
        **about,
    }


def _write_json(path: str, value: Mapping[str, Any]) -> None:
    """Replace `path` atomically (a staged file renamed over it)."""
    staging = tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), suffix=".json", delete=False)
    with staging:
        json.dump(value, staging, indent=2, sort_keys=True)
        staging.write("\n")
    os.replace(staging.name, path)


def merge_entry(entries: list[dict[str, Any]] | None, entry: dict[str, Any], overwrite: bool) -> list[dict[str, Any]]:
    """`entries` with `entry` added; an entry at the same levels is replaced only with `overwrite`."""
    kept = []
    for existing in entries or []:
        if np.allclose(existing["t"], entry["t"]) if len(existing["t"]) == len(entry["t"]) else False:
            if not overwrite:
                raise ValueError(
                    f"Reward statistics at t={entry['t']} exist already; pass --overwrite to replace them."
                )
            continue
        kept.append(existing)
    return [*kept, entry]


def write_reward_statistics(
    config_path: str, entry: dict[str, Any], overwrite: bool = False, card_path: str | None = None
) -> list[dict[str, Any]]:
    """Add `entry` to `reward_statistics` in the reward model's `config.json` and, when `card_path` is given, in
    that model card's metadata (the card is created if absent). Returns the config's new list."""
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["reward_statistics"] = merge_entry(config.get("reward_statistics"), entry, overwrite)
    _write_json(config_path, config)
    if card_path is not None:
        from huggingface_hub import ModelCard

        card = ModelCard.load(card_path) if os.path.isfile(card_path) else ModelCard("---\n---\n")
        card.data.reward_statistics = config["reward_statistics"]
        card.save(card_path)
    return config["reward_statistics"]


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
