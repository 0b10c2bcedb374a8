"""The parity tests hold on another fixture made the same way, not only on the visible one.

Each official fixture is copied and cut to a smaller batch: per-sample inputs and the official per-sample outputs are
sliced (the official per-sample outputs of a smaller batch are the slices of the fixture's own, see the fixtures'
READMEs), then the parity tests run on the copy through `DINALRM_OFFICIAL_TINY` / `DINALRM_OFFICIAL_LRM_TINY`. A test
that still holds a literal of the visible fixture (a batch size, a level count, a pair count) fails here.

Not every parity test can run on a cut copy; those are deselected below, each with the reason. They read every size
and setting from the fixture all the same.
"""

import os
import shutil
import subprocess
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
from conftest import OFFICIAL_LRM_TINY, OFFICIAL_TINY, REPO_ROOT
from safetensors.torch import load_file, save_file


pytestmark = pytest.mark.slow  # converts and scores the tiny models again in a new pytest process

# official-tiny: tensors whose dim 0 (or dim 1, for level-major ones) is the main batch, the x0_ns batch, the pairs.
TINY_BATCH = ("x0", "encoder_hidden_states", "pooled_projections", "noise_single", "sigma_single", "timestep_single")
TINY_BATCH += ("score_single", "score_single_nolora", "score_ens", "score_ens_shared", "debug/temb_single")
TINY_LEVEL_MAJOR = ("noise_ens", "sigma_ens", "timestep_ens", "debug/text_feats_single")
TINY_NS = ("x0_ns", "encoder_hidden_states_ns", "pooled_projections_ns", "noise_single_ns", "sigma_single_ns")
TINY_NS += ("timestep_single_ns", "score_single_ns", "score_single_ns_nolora", "score_ens_shared_ns")
TINY_PAIRS = ("pair_chosen_idx", "pair_rejected_idx", "u_pair", "sigma_pair", "timestep_pair")
TINY_PAIRS += ("score_pair_chosen", "score_pair_rejected", "loss_thurstone_per_pair")
TINY_NOT_CUT = {
    "tests/test_parity_official.py::test_thurstone_gradients_match": "the gradients of the mean loss over a subset "
    "of pairs are not the fixture's (it stores only norms of the full-batch gradients)",
}
# official-lrm-tiny: the LPO sections whose rows are independent (prompts, threshold timesteps, kept pairs).
LPO_KEPT = ("lpo/pipe_valid_timesteps", "lpo/pipe_current_latents", "lpo/pipe_next_latents")
LPO_KEPT += ("lpo/pipe_valid_prompt_embeds", "lpo/eps_policy", "lpo/eps_ref", "lpo/ratio_w", "lpo/ratio_l")
LPO_KEPT += tuple(f"lpo/logprob_{k}" for k in ("w_pol", "w_ref", "l_pol", "l_ref"))
LPO_THRESHOLD = tuple(f"lpo/threshold_{s}{suffix}" for s in ("sigma", "variance", "linear") for suffix in ("", "_alt"))
_SEEDED_RUN = "the seeded multi-candidate run draws every prompt's noise from one generator: a smaller batch draws "
_SEEDED_RUN += "other numbers"
_MEAN = "a mean over all kept pairs (loss, margin, accuracy) or its gradient: not the fixture's for a subset"
_LRM = "the LRM section draws its VAE sample and noise for the whole batch from one seed, and its loss groups "
_LRM += "examples per prompt: a cut batch draws other numbers and groups differently"
LRM_NOT_CUT = {
    "tests/test_lpo_parity.py::test_sampled_trajectory_candidates_and_scores_match": _SEEDED_RUN,
    "tests/test_lpo_parity.py::test_kept_pairs_match": _SEEDED_RUN,
    "tests/test_lpo_parity.py::test_loss_ratios_and_diagnostics_match": _MEAN,
    "tests/test_lpo_parity.py::test_loss_formula_on_the_official_log_probs": _MEAN,
    "tests/test_lpo_parity.py::test_lora_gradients_and_the_official_clipping_quirk_match": _MEAN,
    "tests/test_lrm_parity.py": _LRM,
}


def cut_copy(source: Path, target: Path, rule) -> Path:
    """`source` copied to `target` with inputs/expected rewritten by `rule(name, tensor) -> tensor`."""
    shutil.copytree(source, target)
    for name in ("inputs", "expected"):
        tensors = load_file(source / f"{name}.safetensors")
        save_file({k: rule(k, v).contiguous() for k, v in tensors.items()}, target / f"{name}.safetensors")
    return target


def cut_official_tiny(target: Path) -> Path:
    x = load_file(OFFICIAL_TINY / "inputs.safetensors")
    batch, batch_ns = x["x0"].shape[0] - 1, x["x0_ns"].shape[0] - 1
    assert batch >= 1 and batch_ns >= 1, "the fixture's batches are too small to cut"
    kept_pairs = (x["pair_chosen_idx"] < batch) & (x["pair_rejected_idx"] < batch)
    assert kept_pairs.any() and not kept_pairs.all(), "the cut must keep some pairs and drop some"
    expected = load_file(OFFICIAL_TINY / "expected.safetensors")
    per_pair = expected["loss_thurstone_per_pair"][kept_pairs]

    def rule(name: str, value: torch.Tensor) -> torch.Tensor:
        if name in TINY_BATCH:
            return value[:batch]
        if name in TINY_LEVEL_MAJOR:
            return value[:, :batch]
        if name in TINY_NS:
            return value[:batch_ns]
        if name in TINY_PAIRS:
            return value[kept_pairs]
        if name == "loss_thurstone":  # the mean of the official per-pair losses that remain
            return per_pair.double().mean().float().reshape(value.shape)
        return value

    target = cut_copy(OFFICIAL_TINY, target, rule)
    for name, value in load_file(target / "inputs.safetensors").items():
        if name in TINY_BATCH:
            assert value.shape[0] == batch, name
    return target


def cut_official_lrm_tiny(target: Path) -> Path:
    x = load_file(OFFICIAL_LRM_TINY / "inputs.safetensors")
    expected = load_file(OFFICIAL_LRM_TINY / "expected.safetensors")
    prompts = x["lpo/compare_timesteps"].shape[0]
    candidates = x["lpo/noisy_latents"].shape[0] // prompts
    kept = expected["lpo/pipe_valid_timesteps"].shape[0]
    steps = x["lpo/threshold_timesteps"].shape[0]
    assert prompts > 1 and kept > 1 and steps > 1, "the fixture's LPO sections are too small to cut"
    # Candidate-major rows (candidate c of prompt p is row c * prompts + p): keep the first prompts - 1 prompts.
    rows = torch.arange(candidates * prompts).reshape(candidates, prompts)[:, : prompts - 1].reshape(-1)

    def rule(name: str, value: torch.Tensor) -> torch.Tensor:
        if name in ("lpo/noisy_latents", "lpo/timesteps", "lpo/input_ids", "lpo/lrm_scores"):
            return value[rows]
        if name in ("lpo/compare_timesteps", "lpo/compare_threshold", "lpo/compare_valid"):
            return value[: prompts - 1]
        if name == "lpo/compare_indices":
            return value[:, : prompts - 1]
        if name in LPO_KEPT:
            return value[: kept // 2 + 1]
        if name == "lpo/threshold_timesteps" or name in LPO_THRESHOLD:
            return value[: steps // 2]
        return value

    return cut_copy(OFFICIAL_LRM_TINY, target, rule)


def run_parity(python: str, env: dict, files: list[str], not_cut: dict, report: Path) -> subprocess.CompletedProcess:
    """The parity tests of `files` but `not_cut` in a new pytest process of `python` (the fixture paths are read at
    import), on one torch thread: this run checks what the tests read from the fixture; the kernels are the numeric
    pass's business. Each test's outcome goes to the JUnit XML file `report`."""
    deselect = [arg for test in not_cut if "::" in test for arg in ("--deselect", test)]
    ignore = [arg for test in not_cut if "::" not in test for arg in ("--ignore", test)]
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", f"--junitxml={report}"]
    command += [*deselect, *ignore, *files]
    threads = {"OMP_NUM_THREADS": "1", "DINALRM_TEST_THREADS": "1"}
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **threads, **env},
    )


TINY_FILES = ["tests/test_parity_official.py", "tests/test_official_configs.py"]
LRM_FILES = ["tests/test_lpo_parity.py"]


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory, warm_python) -> dict:
    """Both fixtures cut, and the parity tests of both run on the cut copies in one new pytest process (one start
    instead of two): `{"result": the finished run, "outcomes": {test file: {test name: outcome}}}`."""
    root = tmp_path_factory.mktemp("cut-fixtures")
    env = {
        "DINALRM_OFFICIAL_TINY": str(cut_official_tiny(root / "official-tiny")),
        "DINALRM_OFFICIAL_LRM_TINY": str(cut_official_lrm_tiny(root / "official-lrm-tiny")),
    }
    report = root / "report.xml"
    result = run_parity(warm_python, env, TINY_FILES + LRM_FILES, {**TINY_NOT_CUT, **LRM_NOT_CUT}, report)
    outcomes: dict[str, dict[str, str]] = {}
    if report.is_file():
        for case in ElementTree.parse(report).iter("testcase"):
            problems = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
            module = case.get("classname", "").replace(".", "/") + ".py"
            outcomes.setdefault(module, {})[case.get("name")] = problems[0] if problems else "passed"
    return {"result": result, "outcomes": outcomes}


def assert_parity_held(cut_run: dict, files: list[str], not_cut: dict) -> None:
    """Every test of `files` ran on the cut copy and passed, except the `not_cut` ones, which did not run."""
    result, outcomes = cut_run["result"], cut_run["outcomes"]
    log = result.stdout[-4000:] + result.stderr[-2000:]
    for file in files:
        ran = outcomes.get(file, {})
        ran_anyway = {f"{file}::{name}" for name in ran} & set(not_cut)  # deselected, yet in the report
        assert ran and not ran_anyway, (file, sorted(ran_anyway), log)
        assert set(ran.values()) == {"passed"}, ({name: o for name, o in ran.items() if o != "passed"}, log)
    assert not {file for file in not_cut if "::" not in file} & set(outcomes), log


def test_official_tiny_parity_holds_on_a_cut_batch(cut_run):
    assert_parity_held(cut_run, TINY_FILES, TINY_NOT_CUT)


def test_official_lrm_tiny_parity_holds_on_a_cut_batch(cut_run):
    assert_parity_held(cut_run, LRM_FILES, LRM_NOT_CUT)


def test_the_cut_run_passed_as_a_whole(cut_run):
    """The whole run's exit status and its count of deselected tests (the `::` entries of both lists)."""
    result = cut_run["result"]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    deselected = sum(1 for test in {**TINY_NOT_CUT, **LRM_NOT_CUT} if "::" in test)
    assert f"{deselected} deselected" in result.stdout
