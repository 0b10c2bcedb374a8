"""Calibrated preference probabilities: fit a logistic curve to reward differences and measure it on held-out pairs.

    python eval/calibrate.py --model assets/dinalrm-tiny --pairs FIT_PAIRS --eval_pairs HELD_OUT_PAIRS \
        [--t 0.4 | --ensemble [0.2,0.5,0.7]] [--output_dir calibration] [--write_to_model [--overwrite]]
    python eval/calibrate.py --model liuhuohuo/DiNa-LRM-SD35M-12layers --benchmarks hpdv3 --holdout_fraction 0.3

The fitting pairs are any canonical pair set (`--pairs`, read as `run_eval.py` reads it; split `test` unless
`--split pairs=train`) or Table 1 benchmarks (`--benchmarks`); human ties are left out. Every image is scored once
at one noise setting (`--t`, or `--ensemble`), with `run_eval.py`'s per-image noise. The curve is

    P(a preferred over b) = sigmoid(slope * (r_a - r_b))

with one slope fitted by maximum likelihood (no intercept: which image of a pair comes first carries no
information). Calibration is measured before (the model's own comparison probability, the Thurstone curve
`compare` uses without a calibration) and after (the fitted curve) on held-out pairs, `--eval_pairs` or a
`--holdout_fraction` of the fitting set's prompts: the expected calibration error (ECE, 10 equal-width bins of the
predicted probability) and the Brier score, both over the two orders of every pair.

Writes `calibration.json` (the fitted calibration with its errors) and `reliability.png` (held-out reliability
diagram, before and after) to `--output_dir`. `--write_to_model` stores the calibration as `calibration` in the
local model folder's reward-model `config.json` (an existing calibration is replaced only with `--overwrite`);
`DiNaLRMPipeline(..., normalize="logistic")`, `dinalrm score --normalize logistic` and `compare` then use it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dinalrm.data import Benchmark, pair_margins

from .arguments import parse_calibrate_args
from .common import distributed_scores, load_benchmarks, save_figure, start_run, write_json
from .scorers import DiNaLRMScorer, setting_label


NUM_BINS = 10


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The arguments of `dinalrm calibrate` (`arguments.parse_calibrate_args`)."""
    return parse_calibrate_args(argv, prog)


# ------------------------------------------------------------------------------------------------------ the maths
def fit_slope(margins: Sequence[float], max_iterations: int = 100) -> float:
    """The maximum-likelihood `slope` of `P(preferred) = sigmoid(slope * margin)` (Newton's method, 1-D).

    `margins` are `r_preferred - r_other`. A set the rewards order perfectly has no finite maximum: refused.
    """
    d = np.asarray(margins, dtype=np.float64)
    if d.size == 0:
        raise ValueError("No pairs to fit the calibration on.")
    if (d > 0).all() or (d < 0).all():
        raise ValueError(
            f"All {d.size} fitting pairs are ordered the same way by the rewards: the slope is unbounded. "
            "Fit on more (or harder) pairs."
        )
    slope = 1.0 / max(float(np.sqrt(np.mean(d**2))), 1e-12)
    for _ in range(max_iterations):
        p = 1.0 / (1.0 + np.exp(-slope * d))
        gradient = np.mean(d * (1.0 - p))  # of the mean log-likelihood
        hessian = np.mean(d**2 * p * (1.0 - p))
        step = gradient / hessian
        slope += step
        if abs(step) <= 1e-10 * max(1.0, abs(slope)):
            break
    return float(slope)


def reliability_bins(probabilities: Sequence[float], num_bins: int = NUM_BINS) -> list[tuple[float, float, float]]:
    """`(share of predictions, mean prediction, observed frequency)` per non-empty equal-width bin, over both orders
    of each pair (`p` with outcome 1 and `1 - p` with outcome 0), so that how the pairs happen to be ordered does not
    matter."""
    p = np.asarray(probabilities, dtype=np.float64)
    predicted = np.concatenate([p, 1.0 - p])
    outcome = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    bins = np.minimum((predicted * num_bins).astype(int), num_bins - 1)
    return [
        (float((bins == b).mean()), float(predicted[bins == b].mean()), float(outcome[bins == b].mean()))
        for b in range(num_bins)
        if (bins == b).any()
    ]


def calibration_errors(probabilities: Sequence[float], num_bins: int = NUM_BINS) -> dict[str, float]:
    """ECE (`sum_b n_b / N * |mean p - observed frequency|` over `num_bins` equal-width bins) and Brier score of
    `probabilities` that each pair's preferred image wins, both over the two orders of each pair."""
    p = np.asarray(probabilities, dtype=np.float64)
    ece = sum(share * abs(mean - observed) for share, mean, observed in reliability_bins(p, num_bins))
    # Both orders: (p - 1)^2 and ((1 - p) - 0)^2 are equal, so the Brier score is the mean of (1 - p)^2.
    return {"ece": float(ece), "brier": float(np.mean((1.0 - p) ** 2)), "n_pairs": int(p.size)}


# ------------------------------------------------------------------------------------------------------ the data
def split_by_prompt(benchmark: Benchmark, fraction: float) -> tuple[list, list]:
    """`(fit pairs, held-out pairs)`: whole prompts (pair groups) held out, chosen by a hash of their id."""

    def held_out(group_id: str) -> bool:
        digest = hashlib.sha256(group_id.encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64 < fraction

    fit = [pair for pair in benchmark.pairs if not held_out(pair.group_id)]
    return fit, [pair for pair in benchmark.pairs if held_out(pair.group_id)]


def scored_margins(pairs, scores: Mapping[str, float]) -> np.ndarray:
    """`r_preferred - r_other` of every pair with a human preference whose two images were scored."""
    margins = pair_margins(pairs, scores)
    return np.asarray([m for m, tie in zip(margins.margins, margins.gt_tie, strict=True) if not tie])


def model_probabilities(reward_model, margins: np.ndarray, level: float) -> list[float]:
    """The model's own comparison probability (its training objective) for reward differences `margins`."""
    diff = torch.as_tensor(margins, dtype=torch.float32)
    return reward_model.preference_probability(diff, torch.zeros_like(diff), level).tolist()


# ------------------------------------------------------------------------------------------------------ outputs
def reward_model_config_path(model: str) -> str:
    """The reward model's config.json inside a local pipeline or reward-model folder."""
    for path in (os.path.join(model, "reward_model", "config.json"), os.path.join(model, "config.json")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                if json.load(handle).get("model_type") == "dinalrm":
                    return path
    raise ValueError(
        f"--write_to_model needs a local DiNa-LRM folder (a pipeline or a saved reward model); {model} is not one "
        "(a Hub id or an official checkpoint: save or convert it locally first). calibration.json holds the fit."
    )


def write_calibration_to_model(model: str, calibration: dict[str, Any], overwrite: bool) -> str:
    """Sets `calibration` in the model's config.json (nothing else changes); replaces one only with `overwrite`."""
    path = reward_model_config_path(model)
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("calibration") and not overwrite:
        raise ValueError(f"{path} already holds a calibration; pass --overwrite to replace it.")
    config["calibration"] = calibration
    staging = tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), suffix=".json", delete=False)
    with staging:
        json.dump(config, staging, indent=2, sort_keys=True)
        staging.write("\n")
    os.replace(staging.name, path)
    return path


def plot_reliability(held_out: dict[str, list[float]], path: str, num_bins: int = NUM_BINS) -> None:
    """Reliability diagram (mean outcome per probability bin) of the held-out pairs, before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.2, 4.0))
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect")
    for label, probabilities in held_out.items():
        bins = reliability_bins(probabilities, num_bins)
        axis.plot([mean for _, mean, _ in bins], [observed for _, _, observed in bins], "o-", label=label)
    axis.set_xlabel("predicted P(preferred)")
    axis.set_ylabel("observed frequency")
    axis.set_title("Held-out calibration")
    axis.legend(fontsize="small")
    save_figure(figure, path)


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The command line (`dinalrm calibrate`); returns the exit code."""
    return run(parse_args(argv, prog))


def run(args: argparse.Namespace) -> int:
    """`dinalrm calibrate` on parsed arguments (`parse_args`); returns the exit code."""
    accelerator = start_run()
    try:
        with accelerator.main_process_first():
            fit_sets = load_benchmarks(args)
            if args.eval_pairs:
                eval_args = copy.copy(args)
                eval_args.pairs, eval_args.benchmarks = args.eval_pairs, []
                eval_args.split = [f"pairs={args.eval_split}"]
                eval_sets = load_benchmarks(eval_args)
            pipe = DiNaLRMScorer.load_pipeline(args.model, accelerator.device, args.dtype)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = pipe.reward_model.config
    if args.ensemble is not None:
        setting: float | tuple[float, ...] = tuple(args.ensemble or config.ensemble_t)
        levels, level = list(setting), config.default_t  # `compare`'s level for an ensemble
    else:
        setting = config.default_t if args.t is None else args.t
        levels, level = [setting], setting
    scorer = DiNaLRMScorer(
        pipe, [setting], num_noise_samples=args.num_noise_samples, seed=args.seed,
        label=DiNaLRMScorer.label_for(args.model),
    )  # fmt: skip

    def margins_of(benchmarks: dict[str, Benchmark], holdout: bool) -> tuple[np.ndarray, np.ndarray, list[float]]:
        fit, held, rewards = [], [], []
        for benchmark in benchmarks.values():
            scores, _ = distributed_scores(scorer, benchmark, accelerator, args.batch_size)
            scores = {image_id: row[0] for image_id, row in scores.items()}
            rewards += list(scores.values())
            fit_pairs, held_pairs = (
                split_by_prompt(benchmark, args.holdout_fraction) if holdout else (benchmark.pairs, [])
            )
            fit.append(scored_margins(fit_pairs, scores))
            held.append(scored_margins(held_pairs, scores))
        return np.concatenate(fit), np.concatenate(held), rewards

    fit_margins, held_margins, fit_rewards = margins_of(fit_sets, holdout=not args.eval_pairs)
    if args.eval_pairs:
        held_margins, _, _ = margins_of(eval_sets, holdout=False)
    if not accelerator.is_main_process:
        return 0
    try:
        slope = fit_slope(fit_margins)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if held_margins.size == 0:
        print(
            "error: no held-out pairs to measure calibration on (--eval_pairs or --holdout_fraction).", file=sys.stderr
        )
        return 2
    sigmoid = lambda margins: (1.0 / (1.0 + np.exp(-slope * margins))).tolist()  # noqa: E731
    before = model_probabilities(pipe.reward_model, held_margins, level)
    after = sigmoid(held_margins)
    errors_before, errors_after = calibration_errors(before), calibration_errors(after)
    calibration = {
        "type": "logistic",
        "slope": slope,
        "reference_reward": float(np.median(fit_rewards)),
        "t": [float(x) for x in levels],
        "fitted_on": args.pairs or ",".join(fit_sets),
        "n_fit_pairs": int(fit_margins.size),
        "held_out": args.eval_pairs or f"{args.holdout_fraction:g} of the fitting prompts",
        "held_out_before": errors_before,
        "held_out_after": errors_after,
        "fit_before": calibration_errors(model_probabilities(pipe.reward_model, fit_margins, level)),
        "fit_after": calibration_errors(sigmoid(fit_margins)),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(os.path.join(args.output_dir, "calibration.json"), calibration)
    plot_reliability(
        {"before (model's Thurstone P)": before, f"after (sigmoid({slope:.3g} * diff))": after},
        os.path.join(args.output_dir, "reliability.png"),
    )
    print(
        f"{setting_label(setting)}: slope {slope:.4f} from {fit_margins.size} pairs; held-out {held_margins.size} pairs"
    )
    for name, errors in (("before", errors_before), ("after", errors_after)):
        print(f"  {name:<6} ECE {errors['ece']:.4f}  Brier {errors['brier']:.4f}")
    print(f"Wrote {os.path.join(args.output_dir, 'calibration.json')} and reliability.png")
    if args.write_to_model:
        try:
            print(f"Wrote the calibration into {write_calibration_to_model(args.model, calibration, args.overwrite)}")
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
