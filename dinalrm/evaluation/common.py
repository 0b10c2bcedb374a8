"""Shared by run_eval.py, noise_sweep.py and uncertainty.py: benchmark loading, distributed scoring, accuracy rows
(the benchmark options themselves are in `arguments`, which imports nothing heavy).

Scoring visits each DISTINCT image of a benchmark once (pairs only index the cached scores). Under
`accelerate launch` the image ids are split over the processes (`split_between_processes`) and the scores
gathered (`gather_object`); as scorers are deterministic per image id, every process count gives the same scores.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from accelerate import Accelerator
from accelerate.utils import gather_object

from dinalrm.data import BENCHMARKS, Benchmark, BenchmarkPair, ImageLoadError, SkipStats, load_benchmark, pair_margins

from .arguments import BENCHMARK_ALIASES, canonical_benchmark
from .manifests import apply_manifests, check_entry

# A link to the `evaluate` metric eval/pairwise_accuracy/pairwise_accuracy.py: one implementation, two homes.
from .pairwise_accuracy import pairwise_accuracy


logger = logging.getLogger(__name__)

# `--pairs`: a dataset in our canonical pair schema, evaluated as benchmark "canonical" (not in Table 1).
PAIRS_BENCHMARK = "canonical"
# Column order and headers of the paper's Table 1 (Pick-a-Pic is not in it and stays out of its average).
DISPLAY_NAMES = {
    "imagereward": "ImageReward",
    "hpdv2": "HPDv2",
    "hpdv3": "HPDv3",
    "genai_bench": "GenAI-Bench",
    "pickapic_v2": "Pick-a-Pic v2",
    "canonical": "Pairs",
}
TABLE1_BENCHMARKS = ("imagereward", "hpdv2", "hpdv3", "genai_bench")
RESULT_KEYS = (
    "accuracy", "accuracy_ci_low", "accuracy_ci_high", "n_pairs", "n_correct", "n_score_ties", "n_gt_ties_dropped",
    "n_missing_images", "averaging",
)  # fmt: skip
# The confidence level of run_eval's bootstrap intervals (`arguments.BOOTSTRAP_SAMPLES` resamples by default).
CONFIDENCE_LEVEL = 0.95


def write_json(path: str, value: Any, sort_keys: bool = True) -> None:
    """Write `value` as strict JSON: NaN and infinite numbers (no accuracy without pairs, no interval without a
    bootstrap) become `null`, since a bare `NaN` is not JSON and breaks other readers. `sort_keys=False` keeps the
    order of the settings as they were measured."""

    def strict(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, Mapping):
            return {key: strict(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [strict(v) for v in item]
        return item

    with open(path, "w", encoding="utf-8") as handle:
        json.dump(strict(value), handle, indent=2, sort_keys=sort_keys, allow_nan=False)
        handle.write("\n")


def _per_benchmark(values: Sequence[str]) -> dict[str, str]:
    """`["pickapic=test", ...]` -> `{"pickapic_v2": "test"}`."""
    mapping = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not value:
            raise SystemExit(f"error: expected BENCHMARK=VALUE, got {item!r}")
        mapping[canonical_benchmark(name)] = value
    return mapping


def result_key(name: str, split: str) -> str:
    """Results are keyed by benchmark name, with the split appended when it is not the protocol's default."""
    return name if split == BENCHMARKS[name].split else f"{name}:{split}"


def limit_pairs(benchmark: Benchmark, limit: int | None) -> Benchmark:
    """The first `limit` pairs and only the images they use (unchanged without a limit)."""
    if limit is None or limit >= len(benchmark.pairs):
        return benchmark
    pairs = benchmark.pairs[:limit]
    used = {image for pair in pairs for image in pair[1:3]}
    images = {image_id: item for image_id, item in benchmark.images.items() if image_id in used}
    return replace(benchmark, pairs=pairs, images=images)


def _load_one(name: str, args: argparse.Namespace, split: str | None, hub_id: str | None) -> Benchmark:
    """`load_benchmark`, also finding a local copy stored under an alias folder (e.g. `data_dir/pickapic`)."""
    options: dict[str, Any] = {
        "split": split, "hub_id": hub_id, "image_root": args.hpdv3_image_root if name == "hpdv3" else None,
        "cache_dir": args.cache_dir,
    }  # fmt: skip
    # A source given for the canonical pairs (--pairs or --hub_id canonical=...) wins over --data_dir.
    data_dir = None if name == PAIRS_BENCHMARK and hub_id is not None else args.data_dir
    if data_dir is not None and not os.path.isdir(os.path.join(data_dir, name)):
        aliases = [alias for alias, target in BENCHMARK_ALIASES.items() if target == name]
        folder = next((os.path.join(data_dir, a) for a in aliases if os.path.isdir(os.path.join(data_dir, a))), None)
        if folder is not None:
            with tempfile.TemporaryDirectory() as view:
                os.symlink(os.path.abspath(folder), os.path.join(view, name))
                return load_benchmark(name, view, **options)
    return load_benchmark(name, data_dir, **options)


def requested_benchmarks(args: argparse.Namespace) -> list[str]:
    """`--benchmarks`, else the script's default (none with `--pairs`), plus `canonical` with `--pairs`."""
    names = args.benchmarks if args.benchmarks is not None else ([] if args.pairs else args.default_benchmarks)
    return list(dict.fromkeys([*names, *([PAIRS_BENCHMARK] if args.pairs else [])]))


def load_benchmarks(args: argparse.Namespace) -> dict[str, Benchmark]:
    """The requested benchmarks keyed by `result_key`, limited to `--limit` pairs each."""
    splits, hub_ids = _per_benchmark(args.split), _per_benchmark(args.hub_id)
    if args.pairs:
        hub_ids[PAIRS_BENCHMARK] = args.pairs
    loaded = {}
    for name in requested_benchmarks(args):
        benchmark = _load_one(name, args, splits.get(name), hub_ids.get(name))
        if getattr(args, "manifests", None):
            benchmark, check = apply_manifests(benchmark, args.manifests)
            benchmark.manifest = check_entry(check)
        benchmark = limit_pairs(benchmark, args.limit)
        loaded[result_key(name, benchmark.split)] = benchmark
    return loaded


def score_images(
    scorer, benchmark: Benchmark, image_ids: Sequence[str], batch_size: int
) -> list[tuple[str, list[float] | None, str | None]]:
    """Score the given images of `benchmark` in batches: `(image_id, scores or None, skip reason or None)`.

    Unreadable images are reported with their reason instead of stopping the run.
    """
    results: list[tuple[str, list[float] | None, str | None]] = []
    batch: list[tuple[str, str, Any]] = []

    def flush() -> None:
        ids, prompts, images = (list(column) for column in zip(*batch, strict=True))
        rows = scorer.score_columns(prompts, images, ids)
        if len(rows) != len(ids):
            raise ValueError(f"The scorer returned {len(rows)} rows for {len(ids)} images.")
        results.extend((image_id, [float(v) for v in row], None) for image_id, row in zip(ids, rows, strict=True))
        batch.clear()

    for image_id in image_ids:
        item = benchmark.images[image_id]
        try:
            batch.append((image_id, item.prompt, item.load()))
        except ImageLoadError as err:
            logger.debug("Skipping image %s: %s", image_id, err)
            results.append((image_id, None, err.reason))
            continue
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return results


def distributed_scores(
    scorer, benchmark: Benchmark, accelerator: Accelerator, batch_size: int
) -> tuple[dict[str, list[float]], int]:
    """Every distinct image's score columns, computed once across all processes, on every process.

    Returns `(scores_by_image, n_local)`: `n_local` is how many images this process itself handled.
    """
    image_ids = list(benchmark.images)
    with accelerator.split_between_processes(image_ids) as mine:
        local = score_images(scorer, benchmark, mine, batch_size)
    return collect_scores(benchmark, gather_object(local), accelerator.is_main_process), len(local)


def collect_scores(
    benchmark: Benchmark, results: Iterable[tuple[str, list[float] | None, str | None]], report: bool = True
) -> dict[str, list[float]]:
    """The score columns by image of `score_images` results (from every process or worker), the skipped images
    counted by reason and, with `report`, logged once."""
    stats = SkipStats()
    scores = {}
    for image_id, row, reason in results:
        if row is None:
            stats.count(reason)
        else:
            scores[image_id] = row
    stats.kept = len(scores)
    if report:
        stats.report(f"Benchmark {benchmark.name} [{benchmark.split}] images scored", logger)
    return scores


def compute_accuracy(
    pairs: Iterable[BenchmarkPair | tuple[str, str, str, int]],
    scores_by_image: Mapping[str, float],
    averaging: str = "micro",
    *,
    n_gt_ties_dropped: int = 0,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Pairwise accuracy of `scores_by_image` (higher = better) on `pairs`, by the `pairwise_accuracy` metric.

    A pair is correct when the preferred image scores strictly higher; equal scores count as wrong. TIE pairs
    (HPDv2) are always correct. Pairs with an unscored image are excluded and counted. `micro`: correct / pairs.
    `macro`: mean over groups of each group's accuracy. With `n_bootstrap` > 0, `ci_low` / `ci_high` bound
    a percentile-bootstrap interval at `CONFIDENCE_LEVEL` that resamples pairs (micro) or groups (macro: a
    macro average weighs prompts equally, so prompts are the sampling unit), seeded by `seed`; else NaN.

    Returns the metric's fields (`accuracy, n_pairs, n_correct, n_wrong, n_score_ties, n_gt_ties_credited,
    n_groups, averaging, ci_low, ci_high, ...`) with `n_gt_ties_dropped` (human ties the loader removed),
    `n_missing_images` (distinct unscored images) and `n_pairs_missing_image`.
    """
    scored = pair_margins(pairs, scores_by_image)
    if not scored.margins:
        logger.warning("No scorable pairs: accuracy is undefined (NaN).")
    result = pairwise_accuracy(
        scored.margins, scored.group_ids, scored.gt_tie, averaging, gt_tie_policy="credit",
        n_bootstrap=n_bootstrap, confidence_level=CONFIDENCE_LEVEL, seed=seed,
    )  # fmt: skip
    return {
        **result,
        "n_gt_ties_dropped": n_gt_ties_dropped,
        "n_missing_images": scored.n_missing_images,
        "n_pairs_missing_image": scored.n_pairs_missing_image,
    }


def benchmark_accuracy(benchmark: Benchmark, scores: Mapping[str, float], **options: int) -> dict[str, Any]:
    """`compute_accuracy` with the benchmark's averaging and dropped-tie count (`options`: bootstrap)."""
    return compute_accuracy(
        benchmark.pairs, scores, benchmark.averaging, n_gt_ties_dropped=benchmark.n_gt_ties_dropped, **options
    )


def accuracy_entry(benchmark: Benchmark, scores: Mapping[str, float], **options: int) -> dict[str, Any]:
    """The results.json entry of one benchmark: `benchmark_accuracy` restricted to `RESULT_KEYS`.

    `n_missing_images` counts distinct images of the scored pairs that have no score (absent or unreadable).
    `accuracy_ci_low` / `accuracy_ci_high`: the bootstrap interval (NaN without `n_bootstrap`).
    """
    result = benchmark_accuracy(benchmark, scores, **options)
    result["accuracy_ci_low"], result["accuracy_ci_high"] = result["ci_low"], result["ci_high"]
    return {key: result[key] for key in RESULT_KEYS}


def setting_entries(
    scorer, benchmark: Benchmark, accelerator: Accelerator, batch_size: int, **options: int
) -> tuple[list[dict[str, Any]], int]:
    """Score `benchmark` once across processes; one `accuracy_entry` per score column of `scorer`.

    Returns `(entries in the order of scorer.setting_names, images this process scored)`.
    """
    scores, n_local = distributed_scores(scorer, benchmark, accelerator, batch_size)
    return score_entries(benchmark, scores, len(scorer.setting_names), **options), n_local


def score_entries(
    benchmark: Benchmark, scores: Mapping[str, Sequence[float]], n_settings: int, **options: int
) -> list[dict[str, Any]]:
    """One `accuracy_entry` per score column, in column order."""
    return [accuracy_entry(benchmark, column(scores, index), **options) for index in range(n_settings)]


def column(scores: Mapping[str, Sequence[float]], index: int) -> dict[str, float]:
    """One score column of `distributed_scores`' output."""
    return {image_id: row[index] for image_id, row in scores.items()}


def setup_logging(accelerator: Accelerator) -> None:
    """Our loggers at INFO on the main process (others: errors only, as every process loads the benchmarks)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    level = logging.INFO if accelerator.is_main_process else logging.ERROR
    for name in ("dinalrm", "common", "scorers"):
        logging.getLogger(name).setLevel(level)


def start_run() -> Accelerator:
    """The `Accelerator` of an evaluation script (single or multi-process), with our loggers set up."""
    accelerator = Accelerator()
    setup_logging(accelerator)
    return accelerator


def save_figure(figure, path: str | os.PathLike) -> None:
    """Lays out a matplotlib figure, writes it to `path` at 120 dpi and frees it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows of dicts (same keys) as a CSV file with a header."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
