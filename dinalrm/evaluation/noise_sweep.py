"""Pairwise accuracy versus the scoring noise level t (the paper's Fig. 2), for one or more DiNa-LRM models.

    python eval/noise_sweep.py --models org/dinalrm-sd35m[,OTHER] --benchmarks hpdv2,hpdv3 \
        [--t_values 0.0,0.1,...,0.9] [--num_noise_samples N] [--data_dir DIR] [--limit N] [--output_dir DIR]
    python eval/noise_sweep.py --models assets/dinalrm-tiny --pairs examples/tiny_world/outputs/pairs

Each image is encoded once and scored at every t with the same noise draw (see `scorers.DiNaLRMScorer`), so
the curve compares noise levels, not noise samples; `--noise_sharing prompt,none` (default) gives one curve with the
draws shared by the images of a prompt and one with a draw per image (the paper's protocol). Writes `noise_sweep.csv` (one row per model, benchmark and
t; with several benchmarks also `average` rows, the unweighted mean of their accuracies) and `noise_sweep.png`
(one panel per benchmark, one line per model). Runs under `accelerate launch` like `run_eval.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .arguments import add_benchmark_args, parse_floats
from .common import (
    DISPLAY_NAMES,
    load_benchmarks,
    save_figure,
    setting_entries,
    start_run,
    write_csv,
)
from .scorers import DiNaLRMScorer, model_label


DEFAULT_T_VALUES = "0.0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"
AVERAGE = "average"
COUNTS = ("n_pairs", "n_correct", "n_score_ties")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        required=True,
        type=lambda text: [m for m in text.split(",") if m],
        help="Comma-separated DiNa-LRM Hub ids or local folders.",
    )
    parser.add_argument(
        "--t_values",
        type=parse_floats,
        default=parse_floats(DEFAULT_T_VALUES),
        help=f"Noise levels to sweep (default {DEFAULT_T_VALUES}).",
    )
    parser.add_argument("--num_noise_samples", type=int, default=1, help="Average each score over N noise draws.")
    parser.add_argument("--output_dir", default="eval_results")
    add_benchmark_args(parser, "imagereward,hpdv2,hpdv3,genai_bench")
    return parser.parse_args(argv)


def sweep(
    scorer: DiNaLRMScorer, model: str, benchmarks: dict, t_values: list[float], accelerator, batch_size: int
) -> list[dict[str, Any]]:
    """CSV rows `model, noise_sharing, benchmark, t, accuracy, n_pairs, n_correct, n_score_ties`.

    One curve per noise-sharing mode of `scorer`. With several benchmarks, `average` rows add the mean accuracy
    over benchmarks and the summed counts.
    """
    rows = []
    settings = [(mode, t) for mode in scorer.noise_sharing for t in t_values]
    for key, benchmark in benchmarks.items():
        entries, _ = setting_entries(scorer, benchmark, accelerator, batch_size)
        for (mode, t), entry in zip(settings, entries, strict=True):
            rows.append({"model": model, "noise_sharing": mode, "benchmark": key, "t": t,
                         "accuracy": entry["accuracy"], "n_pairs": entry["n_pairs"], "n_correct": entry["n_correct"],
                         "n_score_ties": entry["n_score_ties"]})  # fmt: skip
    if len(benchmarks) > 1:
        for mode, t in settings:
            level = [row for row in rows if row["t"] == t and row["noise_sharing"] == mode]
            average = {"model": model, "noise_sharing": mode, "benchmark": AVERAGE, "t": t,
                       "accuracy": sum(row["accuracy"] for row in level) / len(level)}  # fmt: skip
            rows.append({**average, **{key: sum(row[key] for row in level) for key in COUNTS}})
    return rows


def plot_sweep(rows: list[dict[str, Any]], path: str) -> None:
    """Accuracy (%) against t: one panel per benchmark (and the average), one line per model and noise sharing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(row["benchmark"] for row in rows))
    models = list(dict.fromkeys((row["model"], row["noise_sharing"]) for row in rows))
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False, sharey=False)
    for axis, panel in zip(axes[0], panels):
        for model, mode in models:
            points = sorted(
                (row["t"], 100 * row["accuracy"])
                for row in rows
                if row["benchmark"] == panel and row["model"] == model and row["noise_sharing"] == mode
            )
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{model} (noise={mode})")
        name = panel.split(":")[0]
        axis.set_title("Average" if panel == AVERAGE else DISPLAY_NAMES.get(name, name) + panel[len(name) :])
        axis.set_xlabel("noise level t")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("pairwise accuracy (%)")
    axes[0][-1].legend(fontsize="small")
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accelerator = start_run()
    with accelerator.main_process_first():
        benchmarks = load_benchmarks(args)
    rows = []
    for model in args.models:
        with accelerator.main_process_first():
            scorer = DiNaLRMScorer.load(
                model, accelerator.device, args.t_values, args.dtype,
                num_noise_samples=args.num_noise_samples, seed=args.seed, noise_sharing=args.noise_sharing,
            )  # fmt: skip
        rows += sweep(scorer, model_label(model), benchmarks, args.t_values, accelerator, args.batch_size)
        del scorer
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        csv_path = os.path.join(args.output_dir, "noise_sweep.csv")
        png_path = os.path.join(args.output_dir, "noise_sweep.png")
        write_csv(csv_path, rows)
        plot_sweep(rows, png_path)
        for row in rows:
            print(
                f"{row['model']:<30} noise={row['noise_sharing']:<7} {row['benchmark']:<14} t={row['t']:<5g} "
                f"accuracy={100 * row['accuracy']:.2f}"
            )
        print(f"Wrote {csv_path} and {png_path}")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
