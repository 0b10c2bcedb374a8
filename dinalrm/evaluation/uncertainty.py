"""How much DiNa-LRM's verdicts depend on the scoring noise (the paper's Table 4 quantities).

    python eval/uncertainty.py --model org/dinalrm-sd35m --benchmarks hpdv3 --limit 1000 \
        [--t_values 0.2,0.4,0.6,0.8] [--num_draws 10] [--data_dir DIR] [--output_dir DIR]

Every image is scored `K = --num_draws` times at each t, with K independent noise draws (draw k is the k-th
noise of the image's own seeded generator, the same draws at every t; see `scorers.DiNaLRMScorer`). With
`--noise_sharing prompt` the images of a prompt share their K draws (draw k of a pair's two images is one noise);
with `none` every image has its own (the paper's protocol); the default `prompt,none` reports both. For a pair
(a, b) and draw k let `d_k = r_a^k - r_b^k` and the predicted outcome `o_k = sign(d_k)` (a win for a, a win
for b, or a score tie). Over the pairs of a benchmark whose two images were scored:

* `variation_ratio` — the mean over pairs of `1 - m / K`, where `m` is how many draws give the pair's most
  frequent outcome (0: every draw agrees; at most 1 - 1/3 with three outcomes);
* `frac_pairs_flipping` — the fraction of pairs whose outcome is not the same in all K draws;
* `mean_margin` — the mean over pairs and draws of `|d_k|` (the typical reward gap the noise has to beat);
* `mean_reward_variance` — the mean over the distinct images of the unbiased sample variance (`ddof=1`)
  of their K rewards;
* `mean_accuracy` — the benchmark's pairwise accuracy (its own protocol) averaged over the K draws.

Pairs are all the benchmark's pairs, human ties included (stability does not need a label). The paper reports,
at t = 0.4 on 1000 HPDv3 pairs with 10 draws, variation ratio 0.023 and mean margin 0.929. Writes
`uncertainty.json` (`{model: {benchmark: {"t=0.4 noise=prompt": {...}}}}`) and `uncertainty.csv`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from accelerate import Accelerator

from dinalrm.data import Benchmark, BenchmarkPair

from .arguments import add_benchmark_args, parse_floats
from .common import (
    accuracy_entry,
    distributed_scores,
    load_benchmarks,
    setup_logging,
    write_csv,
    write_json,
)
from .scorers import DiNaLRMScorer, model_label, setting_label


STATS = ("variation_ratio", "frac_pairs_flipping", "mean_margin", "mean_reward_variance", "mean_accuracy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="DiNa-LRM Hub id or local folder.")
    parser.add_argument("--t_values", type=parse_floats, default=parse_floats("0.2,0.4,0.6,0.8"))
    parser.add_argument("--num_draws", type=int, default=10, help="Noise draws K per image and level (>= 2).")
    parser.add_argument("--output_dir", default="eval_results")
    add_benchmark_args(parser, "hpdv3")
    return parser.parse_args(argv)


def uncertainty_stats(pairs: Iterable[BenchmarkPair], draws: Mapping[str, Sequence[float]]) -> dict[str, float | int]:
    """Variation ratio, flip fraction, mean margin and mean reward variance (module docstring) of K draws per image.

    `draws` maps image ids to their K rewards; pairs with an image missing from it are left out.
    """
    rewards = {image_id: np.asarray(values, dtype=np.float64) for image_id, values in draws.items()}
    num_draws = len(next(iter(rewards.values()))) if rewards else 0
    if num_draws < 2:
        raise ValueError(f"Need at least 2 noise draws per image, got {num_draws}.")
    ratios, margins, used = [], [], set()
    for _, image_a, image_b, _ in pairs:
        if image_a not in rewards or image_b not in rewards:
            continue
        diff = rewards[image_a] - rewards[image_b]
        mode_count = max(Counter(np.sign(diff).tolist()).values())
        ratios.append(1.0 - mode_count / num_draws)
        margins.append(np.abs(diff).mean())
        used.update((image_a, image_b))
    variances = [rewards[image_id].var(ddof=1) for image_id in used]
    nan = float("nan")
    return {
        "variation_ratio": float(np.mean(ratios)) if ratios else nan,
        "frac_pairs_flipping": float(np.mean([r > 0 for r in ratios])) if ratios else nan,
        "mean_margin": float(np.mean(margins)) if margins else nan,
        "mean_reward_variance": float(np.mean(variances)) if variances else nan,
        "n_pairs": len(ratios),
        "n_images": len(used),
        "num_draws": num_draws,
    }


def measure(
    scorer,
    benchmarks: Mapping[str, Benchmark],
    t_values: Sequence[float],
    num_draws: int,
    accelerator,
    batch_size: int,
    noise_sharing: Sequence[str] = ("prompt",),
) -> dict[str, dict[str, dict[str, Any]]]:
    """`{benchmark: {"t=.. noise=..": stats}}` from a scorer whose columns are mode-major, then level-major,
    `num_draws` per level."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    settings = [(mode, t) for mode in noise_sharing for t in t_values]
    for key, benchmark in benchmarks.items():
        scores, _ = distributed_scores(scorer, benchmark, accelerator, batch_size)
        results[key] = {}
        for level_index, (mode, t) in enumerate(settings):
            first = level_index * num_draws
            draws = {image_id: row[first : first + num_draws] for image_id, row in scores.items()}
            stats = uncertainty_stats(benchmark.pairs, draws)
            accuracies = [
                accuracy_entry(benchmark, {image_id: values[k] for image_id, values in draws.items()})["accuracy"]
                for k in range(num_draws)
            ]
            results[key][f"{setting_label(t)} noise={mode}"] = {**stats, "mean_accuracy": float(np.mean(accuracies))}
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num_draws < 2:
        print("error: --num_draws must be at least 2", file=sys.stderr)
        return 2
    accelerator = Accelerator()
    setup_logging(accelerator)
    with accelerator.main_process_first():
        benchmarks = load_benchmarks(args)
        scorer = DiNaLRMScorer.load(
            args.model, accelerator.device, args.t_values, args.dtype, num_draws=args.num_draws, seed=args.seed,
            noise_sharing=args.noise_sharing,
        )  # fmt: skip
    results = measure(
        scorer, benchmarks, args.t_values, args.num_draws, accelerator, args.batch_size, args.noise_sharing
    )
    if accelerator.is_main_process:
        model = model_label(args.model)
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(os.path.join(args.output_dir, "uncertainty.json"), {model: results}, sort_keys=False)
        settings = [(mode, t) for mode in args.noise_sharing for t in args.t_values]
        rows = [
            {"model": model, "noise_sharing": mode, "benchmark": key, "t": t, **{name: stats[name] for name in STATS},
             "n_pairs": stats["n_pairs"], "n_images": stats["n_images"], "num_draws": stats["num_draws"]}
            for key, by_level in results.items()
            for (mode, t), stats in zip(settings, by_level.values())
        ]  # fmt: skip
        write_csv(os.path.join(args.output_dir, "uncertainty.csv"), rows)
        for row in rows:
            print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        print(f"Wrote {args.output_dir}/uncertainty.json and uncertainty.csv")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
