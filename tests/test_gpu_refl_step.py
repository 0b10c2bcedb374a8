"""Tests of benchmarks/gpu_refl_step.py's code path on tiny models on the CPU (the real run needs a CUDA GPU)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_refl_step.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_refl_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # builds four models and imports Qwen2-VL: minutes on a loaded 2-core machine
def test_tiny_refl_step_reports_both_rewards_with_the_same_generator_cost(tmp_path):
    script = load_script()
    out = tmp_path / "refl.json"
    result = script.main(["--tiny", "--device", "cpu", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    rewards = result["rewards"]
    assert set(rewards) == {"DiNa-LRM", "VAE decode + HPSv3"}
    for costs in rewards.values():
        for part in ("whole_step", "reward"):
            assert costs[part]["flops"] > 0 and costs[part]["peak_memory_bytes"] > 0
        # The whole step adds the generator's forward and backward (into its weights) to the reward's cost.
        assert costs["whole_step"]["flops"] > costs["reward"]["flops"]
    # The generator's share is the same whichever reward follows it.
    generator = [c["whole_step"]["flops"] - c["reward"]["flops"] for c in rewards.values()]
    assert generator[0] == generator[1]
    ours, theirs = rewards["DiNa-LRM"]["reward"]["flops"], rewards["VAE decode + HPSv3"]["reward"]["flops"]
    assert result["change_vs_hpsv3"]["reward_flops"] == ours / theirs - 1
