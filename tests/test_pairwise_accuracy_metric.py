"""The `evaluate` pairwise-accuracy metric, loaded offline by path as users load it."""

import os
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import evaluate
import numpy as np
import pytest

from dinalrm.data import FIRST, SECOND, TIE
from dinalrm.evaluation.common import compute_accuracy


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def metric():
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        return evaluate.load("eval/pairwise_accuracy")
    finally:
        os.chdir(cwd)


def test_micro_matches_a_direct_count(metric):
    diffs = np.round(np.random.default_rng(1).normal(size=200), 1)  # rounding leaves some exact zeros
    result = metric.compute(predictions=diffs.tolist(), n_bootstrap=0)
    assert result["n_score_ties"] == int((diffs == 0).sum()) > 0
    assert result["n_correct"] == int((diffs > 0).sum()) and result["n_wrong"] == int((diffs < 0).sum())
    assert result["accuracy"] == pytest.approx((diffs > 0).mean())
    assert result["n_correct"] + result["n_wrong"] + result["n_score_ties"] == result["n_pairs"] == 200
    assert np.isnan(result["ci_low"]) and np.isnan(result["ci_high"])


def test_macro_and_tie_policies_by_hand(metric):
    predictions = [1.0, -1.0, 2.0, 3.0, 0.5, 0.0, 9.0]
    groups = ["a", "a", "b", "b", "b", "c", "c"]
    tie = [False, False, False, False, False, False, True]
    # Drop: a = 1/2, b = 3/3, c = 0/1 (score tie) -> macro 1/2, micro 4/6; the GT tie is dropped.
    dropped = metric.compute(predictions=predictions, group_ids=groups, gt_tie=tie, averaging="macro")
    assert dropped["accuracy"] == pytest.approx(0.5) and dropped["n_groups"] == 3
    assert (dropped["n_pairs"], dropped["n_correct"], dropped["n_wrong"], dropped["n_score_ties"]) == (6, 4, 1, 1)
    assert dropped["n_gt_ties_dropped"] == 1 and dropped["n_gt_ties_credited"] == 0
    micro = metric.compute(predictions=predictions, group_ids=groups, gt_tie=tie, n_bootstrap=0)
    assert micro["accuracy"] == pytest.approx(4 / 6)
    # Credit (HPSv2): the GT tie counts as correct in c -> c = 1/2, macro (1/2 + 1 + 1/2) / 3 = 2/3.
    credited = metric.compute(
        predictions=predictions, group_ids=groups, gt_tie=tie, averaging="macro", gt_tie_policy="credit"
    )
    assert credited["accuracy"] == pytest.approx(2 / 3) and credited["n_gt_ties_credited"] == 1
    assert (credited["n_pairs"], credited["n_correct"]) == (7, 5)


def test_bootstrap_is_seeded_and_brackets_the_estimate(metric):
    diffs = np.random.default_rng(2).normal(0.3, 1.0, size=300).tolist()
    first = metric.compute(predictions=diffs, seed=7)
    again = metric.compute(predictions=diffs, seed=7)
    other = metric.compute(predictions=diffs, seed=8)
    assert (first["ci_low"], first["ci_high"]) == (again["ci_low"], again["ci_high"])
    assert (first["ci_low"], first["ci_high"]) != (other["ci_low"], other["ci_high"])
    assert first["ci_low"] < first["accuracy"] < first["ci_high"]
    assert first["ci_high"] - first["ci_low"] < 0.2


def test_macro_bootstrap_resamples_groups(metric):
    # Every group scores exactly 1/2, so resampling groups cannot move the mean: a zero-width interval.
    # Resampling pairs (micro) does move it.
    predictions = [1.0, -1.0] * 5
    groups = [g for g in "abcde" for _ in range(2)]
    macro = metric.compute(predictions=predictions, group_ids=groups, averaging="macro", seed=0)
    assert macro["ci_low"] == macro["ci_high"] == macro["accuracy"] == 0.5
    micro = metric.compute(predictions=predictions, group_ids=groups, seed=0)
    assert micro["ci_low"] < 0.5 < micro["ci_high"]


def test_agrees_with_compute_accuracy(metric):
    pairs = [("p0", "a", "b", FIRST), ("p0", "a", "c", FIRST), ("p0", "b", "c", TIE),
             ("p1", "d", "e", SECOND), ("p1", "d", "f", FIRST), ("p1", "e", "f", SECOND)]  # fmt: skip
    scores = {"a": 0.2, "b": 0.5, "c": 0.1, "d": 0.6, "e": 0.8, "f": 0.8}
    expected = compute_accuracy(pairs, scores, "macro")
    diffs = [(scores[a] - scores[b]) * (label or 1) for _, a, b, label in pairs]
    result = metric.compute(
        predictions=diffs, group_ids=[p[0] for p in pairs], gt_tie=[p[3] == TIE for p in pairs],
        averaging="macro", gt_tie_policy="credit", n_bootstrap=0,
    )  # fmt: skip
    assert result["accuracy"] == pytest.approx(expected["accuracy"]) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert result["n_score_ties"] == expected["n_score_ties"] == 1


def test_bad_inputs(metric):
    with pytest.raises(ValueError, match="group_ids"):
        metric.compute(predictions=[1.0], averaging="macro")
    with pytest.raises(ValueError, match="NaN"):
        metric.compute(predictions=[float("nan")])
    with pytest.raises(ValueError, match="one entry per prediction"):
        metric.compute(predictions=[1.0, 2.0], gt_tie=[True])


def test_bootstrap_interval_by_hand(metric):
    # Every pair right: every resample of the pairs is right too -> [1, 1].
    perfect = metric.compute(predictions=[0.3, 0.1, 2.0, 0.5], seed=0)
    assert (perfect["ci_low"], perfect["ci_high"]) == (1.0, 1.0)
    # Macro over two prompts at 1/1 and 0/2: a resample of two prompts averages to 0, 1/2 or 1 with probabilities
    # 1/4, 1/2, 1/4, so the 2.5% and 97.5% quantiles of 1000 resamples are 0 and 1 (the pairs are not resampled).
    macro = metric.compute(predictions=[1.0, -1.0, -2.0], group_ids=["a", "b", "b"], averaging="macro", seed=0)
    assert macro["accuracy"] == 0.5 and (macro["ci_low"], macro["ci_high"]) == (0.0, 1.0)


def test_bootstrap_interval_narrows_with_more_pairs(metric):
    rng = np.random.default_rng(3)
    widths = []
    for n in (50, 2000):
        diffs = rng.normal(0.5, 1.0, size=n).tolist()
        result = metric.compute(predictions=diffs, seed=0)
        assert result["ci_low"] <= result["accuracy"] <= result["ci_high"]
        widths.append(result["ci_high"] - result["ci_low"])
    assert widths[1] < widths[0] / 3  # the width shrinks like 1 / sqrt(n): sqrt(40) ~ 6.3


def test_eval_scripts_get_the_metrics_interval(metric):
    pairs = [(f"p{i // 3}", f"a{i}", f"b{i}", FIRST) for i in range(30)]
    scores = {**{f"a{i}": float(i % 4 != 0) for i in range(30)}, **{f"b{i}": 0.5 for i in range(30)}}
    for averaging in ("micro", "macro"):
        first = compute_accuracy(pairs, scores, averaging, n_bootstrap=500, seed=4)
        again = compute_accuracy(pairs, scores, averaging, n_bootstrap=500, seed=4)
        assert first == again and first["ci_low"] <= first["accuracy"] <= first["ci_high"]
        direct = metric.compute(
            predictions=[scores[a] - scores[b] for _, a, b, _ in pairs], group_ids=[p[0] for p in pairs],
            averaging=averaging, n_bootstrap=500, seed=4,
        )  # fmt: skip
        assert (first["accuracy"], first["ci_low"], first["ci_high"]) == (
            direct["accuracy"],
            direct["ci_low"],
            direct["ci_high"],
        )
