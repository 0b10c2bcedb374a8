"""Every shell block of the docs runs offline in a fresh folder, as a user pastes it, unless it is preceded by
`<!-- no-run: reason -->` (GPU, Hub or dataset blocks); `dinalrm` is the command of this checkout."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NO_RUN, REPO_ROOT, code_blocks


DOCS = sorted((REPO_ROOT / "docs").rglob("*.md"))
# Blocks that train or evaluate tiny models for a minute or more (the section heading above them).
SLOW_SECTIONS = {"Offline, on tiny models (CPU, about a minute)", "A tiny offline run (CPU, about a minute)"}


def section_of(text: str, block: str) -> str:
    """The heading above `block` in `text`."""
    headings = re.findall(r"^#+ (.+)$", text[: text.index(block)], re.M)
    return headings[-1] if headings else ""


def runnable_blocks() -> list:
    cases = []
    for page in DOCS:
        text = page.read_text()
        for index, block in enumerate(code_blocks(text, "bash")[0]):
            slow = section_of(text, block) in SLOW_SECTIONS
            marks = [pytest.mark.slow] if slow else []
            cases.append(pytest.param(block, id=f"{page.relative_to(REPO_ROOT / 'docs')}-{index}", marks=marks))
    return cases


def test_only_marked_blocks_are_skipped_and_every_mark_says_why():
    fences = {page.name: re.findall(r"^```(sh|shell|console|zsh)\n", page.read_text(), re.M) for page in DOCS}
    assert not any(fences.values()), f"shell blocks are ```bash blocks (so that they run): {fences}"
    total = sum(page.read_text().count("```bash\n") for page in DOCS)
    skipped = sum(code_blocks(page.read_text(), "bash")[1] for page in DOCS)
    assert len(runnable_blocks()) + skipped == total
    assert 3 <= len(runnable_blocks())  # the offline ones: the example dataset, the tiny evaluation and training
    reasons = [line for page in DOCS for line in page.read_text().splitlines() if line.startswith(NO_RUN)]
    assert len(reasons) >= skipped and all(re.fullmatch(r"<!-- no-run: \S.{8,} -->", line) for line in reasons)


@pytest.mark.parametrize("block", runnable_blocks())
def test_shell_block_runs_offline(block, tmp_path, warm_bin):
    work = tmp_path / "work"
    work.mkdir()
    if "train_dinalrm.py" in block:  # run from a clone: the training script sits in the working folder
        (work / "train_dinalrm.py").symlink_to(REPO_ROOT / "train_dinalrm.py")
    env = {
        **os.environ,
        "PATH": f"{warm_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO_ROOT),  # what `pip install dinalrm` provides
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"{block}\n{run.stderr[-3000:]}"
