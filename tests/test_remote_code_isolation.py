"""Two local repositories with different code files, loaded in one process through remote code (issue 12, item 5).

diffusers copies each repository's `pipeline_dinalrm.py` and `reward_model/modeling_dinalrm.py` into one flat module
cache under the same names, so the second load overwrites the first's files. What must hold (and the README states):
each loaded pipeline keeps the classes it was built with, so neither repository changes the other's scores, and
loading the first repository again gives its own code back.
"""

import json
import os
import subprocess

import pytest
import tolerances
import torch
from conftest import REPO_ROOT

from dinalrm.testing import save_tiny_dinalrm_repo
from pipeline_dinalrm import DiNaLRMPipeline


SCRIPT = r"""
import json, sys, torch
from diffusers import DiffusionPipeline

latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))

def score(pipe):
    return pipe("a red square", latents=latents, generator=torch.Generator().manual_seed(0)).rewards.tolist()

first = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
results = {"a": score(first)}
second = DiffusionPipeline.from_pretrained(sys.argv[2], trust_remote_code=True)
results["b"] = score(second)
results["a_after_b"] = score(first)
results["a_reloaded"] = score(DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True))
results["b_after_reload"] = score(second)
print(json.dumps(results))
"""


def edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.mark.slow  # starts a Python process: 5-20 s on a shared 2-core machine
@pytest.mark.usefixtures("one_thread")
def test_repositories_with_different_code_do_not_change_each_others_scores(tmp_path, warm_python):
    first, second = (tmp_path / "repo-a", tmp_path / "repo-b")
    save_tiny_dinalrm_repo(first)
    save_tiny_dinalrm_repo(second)
    # Repository B ships other code: its pipeline doubles the rewards and its reward model adds 1 to them.
    edit(second / "pipeline_dinalrm.py", "rewards = self.normalize_rewards(", "rewards = 2 * self.normalize_rewards(")
    edit(
        second / "reward_model" / "modeling_dinalrm.py",
        "return self._reward_over_levels(",
        "return 1.0 + self._reward_over_levels(",
    )

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")  # the flat module cache both repositories share
    run = subprocess.run(
        [warm_python, "-c", SCRIPT, str(first), str(second)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])

    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = DiNaLRMPipeline.from_pretrained(first)  # the installed code: what repository A's own code computes
    expected = pipe("a red square", latents=latents, generator=torch.Generator().manual_seed(0)).rewards
    for key in ("a", "a_after_b", "a_reloaded"):
        assert results[key] == tolerances.close_to(expected.tolist()), key
    for key in ("b", "b_after_reload"):
        assert results[key] == tolerances.close_to((2 * (expected + 1)).tolist()), key


@pytest.mark.slow  # starts a Python process: 5-20 s on a shared 2-core machine
def test_readme_automodel_form_for_the_reward_model_of_a_hub_pipeline(tmp_path, warm_python):
    """The README's replacement for `AutoModel.from_pretrained(repo, subfolder="reward_model", ...)` (which
    transformers cannot load: it looks for the code at the root), on a pipeline repository in a simulated cache."""
    from dinalrm.testing import add_to_hub_cache

    folder = save_tiny_dinalrm_repo(tmp_path / "tiny")
    add_to_hub_cache(tmp_path / "cache", "me/tiny-dinalrm", folder)
    readme = (REPO_ROOT / "docs" / "scoring.md").read_text()
    form = readme.split("so give it the folder itself:\n  `", 1)[1].split("`.", 1)[0].replace("\n  ", " ")
    code = f"""
import json, os, torch
from huggingface_hub import snapshot_download
from transformers import AutoModel
repo = "me/tiny-dinalrm"
try:
    AutoModel.from_pretrained(repo, subfolder="reward_model", trust_remote_code=True)
    subfolder_form = "loads"
except OSError:
    subfolder_form = "fails"
model = {form}
c = model.config.backbone_config
x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
embeds, pooled = torch.ones(2, 8, c["joint_attention_dim"]), torch.ones(2, c["pooled_projection_dim"])
rewards = model.score_latents(x, embeds, pooled, generator=torch.Generator().manual_seed(0))
print(json.dumps({{"subfolder_form": subfolder_form, "module": type(model).__module__, "rewards": rewards.tolist()}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    run = subprocess.run([warm_python, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["subfolder_form"] == "fails" and result["module"].startswith("transformers_modules")
    from modeling_dinalrm import DiNaLRMModel

    model = DiNaLRMModel.from_pretrained(tmp_path / "tiny" / "reward_model")
    c = model.config.backbone_config
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds, pooled = torch.ones(2, 8, c["joint_attention_dim"]), torch.ones(2, c["pooled_projection_dim"])
    expected = model.score_latents(x, embeds, pooled, generator=torch.Generator().manual_seed(0))
    assert result["rewards"] == tolerances.close_to(expected.tolist())
