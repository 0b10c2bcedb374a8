"""Evaluation: benchmark loading and accuracy with confidence intervals (`common`), the scorers compared
(`scorers`; the published HPSv2/HPSv3/ImageReward packages run in their own environments through `isolated`), the
`run_eval` runner (`runner`), split manifests (`manifests`), reward statistics for z-scores (`reward_stats`) and the
analyses (`calibration`, `noise_sweep`, `uncertainty`, `noise_sharing`); `efficiency` (the analytic FLOP/memory model) and `efficiency_report` are imported by name.

Public names are imported lazily on first use (see `dinalrm._lazy`).
"""

from .._lazy import lazy_exports


__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "calibration": (
            "NUM_BINS",
            "fit_slope",
            "reliability_bins",
            "calibration_errors",
            "split_by_prompt",
            "scored_margins",
            "model_probabilities",
            "reward_model_config_path",
            "write_calibration_to_model",
            "plot_reliability",
        ),
        "common": (
            "BENCHMARK_ALIASES",
            "PAIRS_BENCHMARK",
            "DISPLAY_NAMES",
            "TABLE1_BENCHMARKS",
            "RESULT_KEYS",
            "BOOTSTRAP_SAMPLES",
            "CONFIDENCE_LEVEL",
            "write_json",
            "parse_floats",
            "canonical_benchmark",
            "parse_benchmarks",
            "add_benchmark_args",
            "result_key",
            "limit_pairs",
            "requested_benchmarks",
            "load_benchmarks",
            "score_images",
            "distributed_scores",
            "collect_scores",
            "compute_accuracy",
            "benchmark_accuracy",
            "accuracy_entry",
            "setting_entries",
            "score_entries",
            "column",
            "setup_logging",
            "start_run",
            "save_figure",
            "write_csv",
        ),
        "noise_sharing": (
            "binomial_entry",
            "pair_accuracies",
            "mismatch_accuracies",
        ),
        "noise_sweep": (
            "DEFAULT_T_VALUES",
            "AVERAGE",
            "COUNTS",
            "sweep",
            "plot_sweep",
        ),
        "runner": (
            "PAPER_TABLE1",
            "evaluate",
            "markdown_table",
            "write_results",
        ),
        "scorers": (
            "NOISE_SHARING",
            "DTYPES",
            "resolve_dtype",
            "model_label",
            "Scorer",
            "SCORERS",
            "register_scorer",
            "build_scorer",
            "image_seed",
            "noise_key",
            "parse_noise_sharing",
            "content_id",
            "setting_label",
            "DiNaLRMScorer",
            "LRMScorer",
            "CLIPScorer",
            "PickScoreScorer",
            "PlainCLIPScorer",
            "IsolatedScorer",
            "HPSv2Scorer",
            "HPSv3Scorer",
            "ImageRewardScorer",
        ),
        "manifests": (
            "Manifest",
            "ManifestCheck",
            "build_manifest",
            "write_manifest",
            "read_manifest",
            "verify_benchmark",
            "apply_manifests",
        ),
        "isolated": (
            "IsolatedWorker",
            "WorkerError",
            "start_scorer",
        ),
        "reward_stats": (
            "reward_statistics",
            "write_reward_statistics",
        ),
        "uncertainty": (
            "STATS",
            "uncertainty_stats",
            "measure",
        ),
    },
)
