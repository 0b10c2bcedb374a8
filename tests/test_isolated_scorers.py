"""dinalrm/evaluation/isolated.py: scorer environments made with uv from pinned requirements, and the JSON-lines
worker protocol, offline with stand-in packages built here as wheels and installed through the same code path.

The real packages (hpsv2, hpsv3, image-reward) are not installed here: their environments need PyTorch and their
models download weights from the Hub. The stand-ins below publish the same entry points (`hpsv2.score`,
`ImageReward.load(...).score`, `hpsv3.HPSv3RewardInferencer(...).reward`) with the published signatures, so these
tests cover everything up to the point where the real package would load its model.
"""

import re
import struct
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from dinalrm.evaluation import isolated
from dinalrm.testing.wheels import build_wheel


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG header (what the stand-ins, which have no PIL, read)."""
    return struct.unpack(">II", Path(path).read_bytes()[16:24])


# Shared by every stand-in: the score of a PNG is width * 1000 + height, read from its header (standard library).
PNG_SCORE = textwrap.dedent(
    """
    import struct

    def png_score(path):
        with open(path, "rb") as handle:
            width, height = struct.unpack(">II", handle.read(24)[16:24])
        return width * 1000.0 + height
    """
)
STANDIN = PNG_SCORE + textwrap.dedent(
    """
    print("stand-in scorer loading")  # a package printing to stdout must not break the protocol

    def load(device, options):
        if options.get("fail_load"):
            raise RuntimeError("weights not found")

        def score(prompts, paths):
            if "FAIL" in prompts:
                raise ValueError("cannot score this prompt")
            return [png_score(path) + len(prompt) / 1000.0 for prompt, path in zip(prompts, paths)]

        return score
    """
)
# The published entry points, with their signatures; the hps_version / model name / device reach the score.
HPSV2 = PNG_SCORE + textwrap.dedent(
    """
    def score(img_path, prompt, hps_version="v2.0"):
        return [png_score(path) + (0.5 if hps_version == "v2.1" else 0.0) for path in img_path]
    """
)
IMAGEREWARD = PNG_SCORE + textwrap.dedent(
    """
    class _Model:
        def score(self, prompt, image_path):
            scores = [png_score(path) for path in image_path]
            return scores[0] if len(scores) == 1 else scores  # as ImageReward: a float for one image

    def load(name="ImageReward-v1.0", device="cuda"):
        assert name == "ImageReward-v1.0" and device == "cpu", (name, device)
        return _Model()
    """
)
HPSV3 = PNG_SCORE + textwrap.dedent(
    """
    class HPSv3RewardInferencer:
        def __init__(self, config_path=None, checkpoint_path=None, device="cuda", differentiable=False):
            assert device == "cpu", device

        def reward(self, prompts, image_paths):
            return [[png_score(path), 9.0] for path in image_paths]  # (mu, sigma) rows
    """
)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheels")
    build_wheel(folder, "standin-scorer", "0.1.0", {"standin_scorer/__init__.py": STANDIN})
    build_wheel(folder, "hpsv2", "1.2.0", {"hpsv2/__init__.py": HPSV2})
    build_wheel(folder, "image-reward", "1.5", {"ImageReward/__init__.py": IMAGEREWARD})
    build_wheel(folder, "hpsv3", "1.0.0", {"hpsv3/__init__.py": HPSV3})
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DINALRM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "scorer-envs"


def requirements(tmp_path, line: str) -> Path:
    path = tmp_path / f"{line.split('==')[0]}.txt"
    path.write_text(line + "\n")
    return path


def pictures(tmp_path, sizes):
    paths = []
    for index, size in enumerate(sizes):
        paths.append(tmp_path / f"{index}.png")
        Image.new("RGB", size, (index, 0, 0)).save(paths[-1])
    return paths


def test_environment_is_created_once_from_local_wheels_and_keyed_by_the_requirements(tmp_path, wheels, cache):
    pins = requirements(tmp_path, "standin-scorer==0.1.0")
    python = isolated.ensure_env("standin", pins, find_links=[str(wheels)], no_index=True)
    assert python.is_file() and python.parent.parent.parent == cache
    installed = list(python.parent.parent.glob("lib/python*/site-packages/standin_scorer/__init__.py"))
    assert len(installed) == 1, "the stand-in package is installed in the new environment"
    marker = python.parent.parent / isolated.COMPLETE_MARKER
    stamp = marker.stat().st_mtime_ns
    assert isolated.ensure_env("standin", pins, find_links=[str(wheels)], no_index=True) == python
    assert marker.stat().st_mtime_ns == stamp, "a complete environment is reused, not rebuilt"
    # A changed pin gets its own environment: a stale one is never reused.
    pins.write_text("standin-scorer==0.1.0\n# changed\n")
    assert isolated.ensure_env("standin", pins, find_links=[str(wheels)], no_index=True) != python


def test_failed_install_names_the_requirement_and_leaves_no_complete_environment(tmp_path, wheels, cache):
    pins = requirements(tmp_path, "standin-scorer==9.9.9")
    with pytest.raises(
        RuntimeError, match=r"Installing the standin scorer's requirements failed[\s\S]*standin-scorer"
    ):
        isolated.ensure_env("standin", pins, find_links=[str(wheels)], no_index=True)
    assert not list(cache.glob(f"*/{isolated.COMPLETE_MARKER}"))


def test_protocol_scores_in_order_and_reports_errors_as_json(tmp_path, wheels, cache):
    paths = pictures(tmp_path, [(8, 5), (3, 4), (16, 2)])
    prompts = ["a", "bb", "a"]
    with isolated.start_scorer(
        "standin", requirements=requirements(tmp_path, "standin-scorer==0.1.0"), backend="standin_scorer:load",
        find_links=[str(wheels)], no_index=True,
    ) as worker:  # fmt: skip
        assert (worker.package, worker.version) == ("standin_scorer", "0.1.0")
        expected = [w * 1000 + h + len(p) / 1000 for (w, h), p in zip(map(png_size, paths), prompts)]
        assert worker.score(prompts, paths) == pytest.approx(expected, rel=1e-12)
        with pytest.raises(isolated.WorkerError, match="cannot score this prompt"):
            worker.score(["FAIL"], paths[:1])
        # The worker survives a failed request; PIL images go through lossless temporary PNGs.
        images = [Image.new("RGB", (7, 9)), Image.new("RGB", (2, 3))]
        assert worker.score_images(["x", "yy"], images) == pytest.approx([7009.001, 2003.002], rel=1e-12)
        with pytest.raises(ValueError, match="2 prompts for 1 image paths"):
            worker.score(["a", "b"], paths[:1])
    assert worker._process.returncode == 0, "closing stdin ends the worker cleanly"


def test_a_load_failure_comes_back_as_an_error(tmp_path, wheels, cache):
    with pytest.raises(isolated.WorkerError, match="could not start: RuntimeError: weights not found"):
        isolated.start_scorer(
            "standin", requirements=requirements(tmp_path, "standin-scorer==0.1.0"), backend="standin_scorer:load",
            find_links=[str(wheels)], no_index=True, options={"fail_load": True},
        )  # fmt: skip


@pytest.mark.parametrize(
    "name, pin, offset",
    [("hpsv2", "hpsv2==1.2.0", 0.5), ("imagereward", "image-reward==1.5", 0.0), ("hpsv3", "hpsv3==1.0.0", 0.0)],
)
def test_published_entry_points_through_stand_ins(tmp_path, wheels, cache, name, pin, offset):
    """Our adapter for each package calls its published API (hps_version v2.1 for HPSv2; the mean of HPSv3's
    (mu, sigma)); one image of a prompt exercises ImageReward's single-float return."""
    paths = pictures(tmp_path, [(4, 4), (6, 1), (5, 3)])
    with isolated.start_scorer(
        name, requirements=requirements(tmp_path, pin), find_links=[str(wheels)], no_index=True
    ) as worker:
        scores = worker.score(["p", "p", "q"], paths)
    assert scores == pytest.approx([w * 1000 + h + offset for w, h in map(png_size, paths)], rel=1e-12)


def test_committed_requirements_pin_every_package():
    for name, spec in isolated.BACKENDS.items():
        lines = [line.strip() for line in spec.requirements.read_text().splitlines()]
        pins = [line for line in lines if line and not line.startswith("#")]
        assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^\s=]+", line) for line in pins), name
        package = {"hpsv2": "hpsv2", "hpsv3": "hpsv3", "imagereward": "image-reward"}[name]
        assert any(line.startswith(f"{package}==") for line in pins), name
