"""Pairwise accuracy of a reward model on the paper's benchmarks (Table 1), with one protocol for every model.

    python eval/run_eval.py --model org/dinalrm-sd35m --benchmarks imagereward,hpdv2,hpdv3,genai_bench \
        [--data_dir DIR] [--t 0.4] [--ensemble 0.2,0.5,0.7] [--num_noise_samples N] \
        [--scorer dinalrm|lrm|pickscore|clip|hpsv2|hpsv3|imagereward|table1[,...]] [--lrm_timesteps 1,451] \
        [--manifests manifests] [--batch_size 8] [--limit N] [--seed 0] [--output_dir eval_results]
    python eval/run_eval.py --scorer table1 --model dinalrm=liuhuohuo/DiNa-LRM-SD35M-12layers --model lrm=LRM_DIR \
        --t 0.4 --ensemble --data_dir DATA --manifests manifests    # Table 1: every model, one table
    python eval/run_eval.py --model assets/dinalrm-tiny --pairs examples/tiny_world/outputs/pairs --t 0.4 --ensemble

Each distinct image is scored once; each setting (`--t`, `--ensemble`: one results row each) reuses that
pass. Under `accelerate launch` the images are split over the processes and the main process writes the
same files a single process would. Writes `results.json`
(`{setting: {benchmark: {accuracy, accuracy_ci_low, accuracy_ci_high, n_pairs, n_correct, n_score_ties,
n_gt_ties_dropped, n_missing_images, averaging[, manifest]}}}`; `manifest`, with `--manifests`: the manifest's
sha256, its pair count and the missing and altered files by name) and `results.md` (Table 1 layout, then counts and intervals).
The interval is a 95% percentile bootstrap (`--bootstrap_samples`, `--bootstrap_seed`) that resamples pairs for
micro averages and whole prompts for HPDv2's macro average (prompts are its averaging unit). Entries already in
`--output_dir/results.json` from other runs are kept (same setting and benchmark: replaced), so successive runs
for several models build one table; `--fresh` starts over. Protocols per benchmark are documented in
`dinalrm/data/benchmarks.py`. `--pairs PATH_OR_ID` evaluates a dataset in our canonical pair schema (e.g. the
tiny world's held-out pairs) as benchmark `canonical`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from .arguments import parse_eval_args
from .common import (
    BENCHMARKS,
    CONFIDENCE_LEVEL,
    DISPLAY_NAMES,
    TABLE1_BENCHMARKS,
    collect_scores,
    load_benchmarks,
    score_entries,
    setting_entries,
    start_run,
    write_json,
)
from .scorers import SCORERS, build_scorer


# The paper's Table 1 (pairwise accuracy, %), for comparison in results.md.
PAPER_TABLE1: dict[str, tuple[float, float, float, float, float]] = {
    "DiNa-LRM (t=0.4)": (60.34, 82.13, 75.04, 68.43, 71.49),
    "DiNa-LRM (ensemble 0.2/0.5/0.7)": (61.75, 84.31, 74.86, 68.98, 72.48),
    "HPSv3": (67.03, 85.36, 76.03, 70.95, 74.84),
    "PickScore": (62.73, 79.44, 65.67, 69.98, 69.45),
}


def scorer_args(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """`args` with `model` set for scorer `name` from `--model [SCORER=]ID` (None: the scorer's default)."""
    models, bare = {}, []
    for item in args.model:
        scorer, sep, model = item.partition("=")
        if sep and scorer in SCORERS:
            models[scorer] = model
        else:
            bare.append(item)
    if len(bare) > 1:
        raise ValueError(f"--model given {len(bare)} times without SCORER=: write --model SCORER=ID for each.")
    if bare and (len(args.scorer) == 1 or name == "dinalrm"):
        models.setdefault(name, bare[0])
    return argparse.Namespace(**{**vars(args), "model": models.get(name)})


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The arguments of `dinalrm eval` (`arguments.parse_eval_args`), `--scorer` accepting every registered scorer."""
    return parse_eval_args(argv, prog, scorer_names=SCORERS)


def evaluate(
    scorer, benchmarks: dict, accelerator, batch_size: int, bootstrap_samples: int = 0, bootstrap_seed: int = 0
) -> tuple[dict[str, dict[str, dict[str, Any]]], int]:
    """`({setting: {benchmark: entry}}, images this process scored)` for every score column of `scorer`.

    Each entry carries a `bootstrap_samples`-resample percentile interval of its accuracy (see
    `common.compute_accuracy`: pairs are resampled for micro averages, whole prompts for HPDv2's macro one).
    """
    results: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in scorer.setting_names}
    n_local = 0
    for key, benchmark in benchmarks.items():
        entries, n_images = setting_entries(
            scorer, benchmark, accelerator, batch_size, n_bootstrap=bootstrap_samples, seed=bootstrap_seed
        )
        n_local += n_images
        _add_entries(results, key, benchmark, scorer.setting_names, entries)
    return results, n_local


def _add_entries(results: dict, key: str, benchmark, settings: list[str], entries: list[dict[str, Any]]) -> None:
    for setting, entry in zip(settings, entries, strict=True):
        results[setting][key] = entry if benchmark.manifest is None else {**entry, "manifest": benchmark.manifest}


def evaluate_on_ray(
    name: str, args: argparse.Namespace, benchmarks: dict, bootstrap_samples: int = 0, bootstrap_seed: int = 0
) -> tuple[dict[str, dict[str, dict[str, Any]]], int]:
    """`evaluate` for scorer `name` with the images spread over `args.num_workers` Ray Data actors (see
    `dinalrm.serving.distributed`): the same entries, as every score is independent of the process."""
    from dinalrm.serving.distributed import benchmark_scores

    settings, scored = benchmark_scores(
        name, args, benchmarks, args.batch_size, args.num_workers, args.num_gpus_per_worker
    )
    results: dict[str, dict[str, dict[str, Any]]] = {setting: {} for setting in settings}
    for key, benchmark in benchmarks.items():
        scores = collect_scores(benchmark, scored[key])
        entries = score_entries(benchmark, scores, len(settings), n_bootstrap=bootstrap_samples, seed=bootstrap_seed)
        _add_entries(results, key, benchmark, settings, entries)
    return results, sum(len(images) for images in scored.values())


def _percent(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _interval(entry: dict[str, Any]) -> str:
    """`[low, high]` in %, or – (no bootstrap, or results written before intervals were recorded)."""
    low, high = entry.get("accuracy_ci_low"), entry.get("accuracy_ci_high")
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "–"
    return f"[{_percent(low)}, {_percent(high)}]"


def _pairs(entry: dict[str, Any]) -> str:
    """Pairs scored, `of N` the manifest's pairs when a manifest was checked."""
    manifest = entry.get("manifest")
    return f"{entry['n_pairs']}" + (f" of {manifest['n_pairs']}" if manifest else "")


def manifest_lines(results: dict[str, dict[str, dict[str, Any]]], header) -> list[str]:
    """The `## Split manifests` section of results.md: per benchmark its manifest and what the copy lacked."""
    checks = {}
    for entries in results.values():
        for key, entry in entries.items():
            if entry.get("manifest"):
                checks.setdefault(key, entry["manifest"])
    if not checks:
        return []
    lines = ["", "## Split manifests", "", "| Benchmark | Manifest | sha256 | Pairs | Missing files | Altered files |",
             "|---|---|---|---:|---|---|"]  # fmt: skip
    for key in sorted(checks, key=_column_order):
        check = checks[key]

        def names(files: list[str]) -> str:
            return f"{len(files)}" + (": " + ", ".join(files) if files else "")

        lines.append(
            f"| {header(key)} | {check['path']} | `{check['sha256']}` | {check['n_pairs']} | "
            f"{names(check['missing_files'])} | {names(check['altered_files'])} |"
        )
    return lines


def _column_order(key: str) -> tuple[int, str]:
    name = key.split(":")[0]
    return (list(BENCHMARKS).index(name) if name in BENCHMARKS else len(BENCHMARKS), key)


def markdown_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """`results.md`: Table 1 (accuracy %, one row per setting, average), then counts and the paper's numbers.

    The average is over the Table 1 benchmarks shown (Pick-a-Pic is reported but not averaged, as in the paper);
    a row missing one of them gets no average.
    """
    columns = sorted({key for entries in results.values() for key in entries}, key=_column_order)
    averaged = [key for key in columns if key.split(":")[0] in TABLE1_BENCHMARKS] or columns

    def header(key: str) -> str:
        name, _, split = key.partition(":")
        return DISPLAY_NAMES.get(name, name) + (f" ({split})" if split else "")

    lines = [
        "# Pairwise accuracy (%)",
        "",
        "| Model / setting | " + " | ".join(header(key) for key in columns) + " | Avg |",
        "|---|" + "---:|" * (len(columns) + 1),
    ]
    for setting, entries in results.items():
        cells = [_percent(entries[key]["accuracy"]) if key in entries else "–" for key in columns]
        values = [entries[key]["accuracy"] for key in averaged if entries.get(key, {}).get("accuracy") is not None]
        average = sum(values) / len(values) if len(values) == len(averaged) else None
        lines.append(f"| {setting} | " + " | ".join(cells) + f" | {_percent(average)} |")
    lines += [
        "",
        "Average over: " + ", ".join(header(key) for key in averaged) + ".",
        "",
        "## Counts and 95% bootstrap intervals",
        "",
        f"Intervals: percentile bootstrap at {CONFIDENCE_LEVEL:.0%} over the pairs (micro averages) or the prompts "
        "(macro, HPDv2).",
        "",
        "| Model / setting | Benchmark | Averaging | Accuracy | 95% CI | Pairs | Correct | Score ties "
        "| GT ties dropped | Missing images |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setting, entries in results.items():
        for key in sorted(entries, key=_column_order):
            e = entries[key]
            lines.append(
                f"| {setting} | {header(key)} | {e['averaging']} | {_percent(e['accuracy'])} | {_interval(e)} | "
                f"{_pairs(e)} | {e['n_correct']} | "
                f"{e['n_score_ties']} | {e['n_gt_ties_dropped']} | {e['n_missing_images']} |"
            )
    lines += manifest_lines(results, header)
    lines += [
        "",
        "## The paper's Table 1 (arXiv 2602.11146), for comparison",
        "",
        "| Model | ImageReward | HPDv2 | HPDv3 | GenAI-Bench | Avg |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {model} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for model, row in PAPER_TABLE1.items()]
    return "\n".join(lines) + "\n"


def write_results(output_dir: str, results: dict[str, dict[str, dict[str, Any]]], fresh: bool = False) -> dict:
    """Merge `results` into `output_dir/results.json` (unless `fresh`) and rewrite it and `results.md`."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "results.json")
    merged: dict[str, dict[str, dict[str, Any]]] = {}
    if not fresh and os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            merged = json.load(handle)
    for setting, entries in results.items():
        merged.setdefault(setting, {}).update(entries)
    write_json(path, merged)
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown_table(merged))
    return merged


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The command line (`dinalrm eval`); returns the exit code."""
    return run(parse_args(argv, prog))


def run(args: argparse.Namespace) -> int:
    """`dinalrm eval` on parsed arguments (`parse_args`); returns the exit code."""
    accelerator = start_run()
    try:
        with accelerator.main_process_first():
            benchmarks = load_benchmarks(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, dict[str, Any]]] = {}
    if args.ray:
        return _main_on_ray(args, benchmarks)
    for name in args.scorer:
        # One scorer at a time (each may hold a large model), all on the same loaded benchmarks.
        try:
            with accelerator.main_process_first():
                scorer = build_scorer(name, scorer_args(args, name), accelerator.device)
        except (ValueError, FileNotFoundError, RuntimeError) as err:
            print(f"error: --scorer {name}: {err}", file=sys.stderr)
            return 2
        try:
            scored, n_local = evaluate(
                scorer, benchmarks, accelerator, args.batch_size, args.bootstrap_samples, args.bootstrap_seed
            )
        finally:
            scorer.close()
        results.update(scored)
        print(
            f"process {accelerator.process_index}/{accelerator.num_processes}: scored {n_local} images ({name})",
            flush=True,
        )
    if accelerator.is_main_process:
        merged = write_results(args.output_dir, results, args.fresh)
        print(markdown_table({setting: merged[setting] for setting in results}), end="")
        print(f"Wrote {os.path.join(args.output_dir, 'results.json')} and results.md")
    accelerator.wait_for_everyone()
    return 0


def _main_on_ray(args: argparse.Namespace, benchmarks: dict) -> int:
    """`main` with `--ray`: each scorer's images on a pool of Ray Data actors, the files written here."""
    from dinalrm.serving.distributed import ray_session

    results: dict[str, dict[str, dict[str, Any]]] = {}
    with ray_session():
        for name in args.scorer:
            scored, n_images = evaluate_on_ray(
                name, scorer_args(args, name), benchmarks, args.bootstrap_samples, args.bootstrap_seed
            )
            results.update(scored)
            print(f"Ray: {args.num_workers} workers scored {n_images} images ({name})", flush=True)
    merged = write_results(args.output_dir, results, args.fresh)
    print(markdown_table({setting: merged[setting] for setting in results}), end="")
    print(f"Wrote {os.path.join(args.output_dir, 'results.json')} and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
