"""Pairwise preference accuracy for reward models, with a bootstrap confidence interval.

Self-contained `evaluate` metric (it is loaded by path: `evaluate.load("eval/pairwise_accuracy")`).
Each prediction is one pair's score difference: the score of the human-preferred item minus the score
of the other. A positive difference is correct; a negative one is wrong; zero is a score tie and also
counts as wrong (a reward model that cannot separate two items has not ranked them).
"""

import math

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Pairwise accuracy of a reward model against human preferences. `predictions` holds, per pair, the score
of the human-preferred item minus the score of the other; > 0 is correct, < 0 wrong, 0 (score tie) wrong.
`averaging="micro"` is correct / pairs; `averaging="macro"` is the mean over `group_ids` (e.g. prompts)
of each group's accuracy, as in HPSv2's HPDv2 metric. Pairs flagged in `gt_tie` are human ties: with
`gt_tie_policy="drop"` they are removed and counted, with `"credit"` they always count as correct
(HPSv2's inversion score, where a tied pair is never discordant). A percentile bootstrap gives a
confidence interval; it resamples pairs (micro) or whole groups (macro) with a fixed `seed`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[float]`): per pair, score(preferred) - score(other).
    group_ids (`list[str]`, optional): group of each pair (e.g. prompt id); required for macro averaging.
        Pass to `compute` together with `predictions`.
    gt_tie (`list[bool]`, optional): True where the humans tied (the prediction's sign is then ignored).
    averaging (`str`): "micro" (default) or "macro".
    gt_tie_policy (`str`): "drop" (default) or "credit".
    n_bootstrap (`int`): bootstrap resamples (default 1000; 0 disables the interval).
    confidence_level (`float`): interval coverage (default 0.95).
    seed (`int`): seed of the bootstrap generator (default 0).
Returns:
    accuracy, n_pairs, n_correct, n_wrong, n_score_ties, n_gt_ties_dropped, n_gt_ties_credited, n_groups,
    averaging, ci_low, ci_high, confidence_level, n_bootstrap, seed.
    n_correct + n_wrong + n_score_ties = n_pairs (credited ties are in n_correct).
Examples:
    >>> metric = evaluate.load("eval/pairwise_accuracy")
    >>> metric.compute(predictions=[0.5, -0.1, 0.0, 2.0])["accuracy"]
    0.5
"""

_CITATION = """
@inproceedings{wu2023hpsv2,
  title={Human Preference Score v2: A Solid Benchmark for Evaluating Human Preferences of Text-to-Image Synthesis},
  author={Wu, Xiaoshi and Hao, Yiming and Sun, Keqiang and Chen, Yixiong and Zhu, Feng and Zhao, Rui and Li, Hongsheng},
  year={2023}
}
"""


def _bootstrap(rng, correct, totals, micro, n_bootstrap):
    """Bootstrap replicates of the accuracy.

    Micro: the number of correct pairs in a resample of n pairs is Binomial(n, accuracy), which is
    exactly what drawing n pairs with replacement gives. Macro: resample whole groups.
    """
    if micro:
        n = int(totals.sum())
        return rng.binomial(n, correct.sum() / n, size=n_bootstrap) / n
    per_group = correct / totals
    draws = rng.integers(0, len(per_group), size=(n_bootstrap, len(per_group)))
    return per_group[draws].mean(axis=1)


def pairwise_accuracy(
    predictions,
    group_ids=None,
    gt_tie=None,
    averaging="micro",
    gt_tie_policy="drop",
    n_bootstrap=1000,
    confidence_level=0.95,
    seed=0,
):
    """The metric's computation as a plain function (see `_KWARGS_DESCRIPTION`); the evaluation scripts call it.

    This is the repository's one pairwise-accuracy implementation: `dinalrm.evaluation.common` imports it directly (no
    `evaluate` cache or Arrow writer per call) and the [`PairwiseAccuracy`] metric wraps it.
    """
    diffs = np.asarray(predictions, dtype=np.float64)
    if np.isnan(diffs).any():
        raise ValueError("predictions contain NaN: score every pair before computing accuracy.")
    if averaging not in ("micro", "macro"):
        raise ValueError(f"averaging must be 'micro' or 'macro', got {averaging!r}.")
    if gt_tie_policy not in ("drop", "credit"):
        raise ValueError(f"gt_tie_policy must be 'drop' or 'credit', got {gt_tie_policy!r}.")
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level must lie in (0, 1), got {confidence_level}.")
    ties = np.zeros(len(diffs), dtype=bool) if gt_tie is None else np.asarray(gt_tie, dtype=bool)
    if averaging == "macro" and group_ids is None:
        raise ValueError("averaging='macro' needs group_ids (one per prediction), passed to compute().")
    groups = np.zeros(len(diffs), dtype=np.int64)
    if group_ids is not None:
        _, groups = np.unique(np.asarray(group_ids, dtype=str), return_inverse=True)
    if len(ties) != len(diffs) or len(groups) != len(diffs):
        raise ValueError("group_ids and gt_tie must have one entry per prediction.")

    n_gt_ties = int(ties.sum())
    keep = ~ties if gt_tie_policy == "drop" else np.ones(len(diffs), dtype=bool)
    correct = (diffs > 0) | ties
    n_score_ties = int(((diffs == 0) & ~ties & keep).sum())
    n_wrong = int(((diffs < 0) & ~ties & keep).sum())

    kept_groups = groups[keep]
    totals = np.bincount(kept_groups).astype(np.float64)
    hits = np.bincount(kept_groups, weights=correct[keep].astype(np.float64), minlength=len(totals))
    present = totals > 0
    totals, hits = totals[present], hits[present]
    n_pairs = int(totals.sum())
    micro = averaging == "micro"

    ci_low = ci_high = math.nan
    if n_pairs == 0:
        accuracy = math.nan
    else:
        accuracy = float(hits.sum() / n_pairs) if micro else float(np.mean(hits / totals))
        if n_bootstrap > 0:
            rng = np.random.default_rng(seed)
            replicates = _bootstrap(rng, hits, totals, micro, n_bootstrap)
            alpha = (1.0 - confidence_level) / 2.0
            ci_low, ci_high = (float(q) for q in np.quantile(replicates, [alpha, 1.0 - alpha]))
    return {
        "accuracy": accuracy,
        "n_pairs": n_pairs,
        "n_correct": int(hits.sum()),
        "n_wrong": n_wrong,
        "n_score_ties": n_score_ties,
        "n_gt_ties_dropped": n_gt_ties if gt_tie_policy == "drop" else 0,
        "n_gt_ties_credited": n_gt_ties if gt_tie_policy == "credit" else 0,
        "n_groups": int(len(totals)),
        "averaging": averaging,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "confidence_level": confidence_level,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PairwiseAccuracy(evaluate.Metric):
    """Pairwise accuracy (micro or macro) with score ties counted wrong and a bootstrap interval."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64")}),
        )

    def _compute(self, predictions, **options):
        """`options`: the keyword arguments of `pairwise_accuracy` (defaults there)."""
        return pairwise_accuracy(predictions, **options)
