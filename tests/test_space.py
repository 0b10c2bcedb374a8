"""The Space's functions called directly (no browser) on a tiny offline DiNa-LRM pipeline folder."""

import re
import types
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import pytest
import tolerances
import torch
from conftest import load_space_app
from PIL import Image

from dinalrm.testing import save_tiny_dinalrm_repo, torch_threads


REPO_ROOT = Path(__file__).resolve().parents[1]
# Curve levels snap to the scheduler's sigma table, spaced at most 3e-3 apart on [0, 1]: snapping moves a level by
# at most half of that, 1.5e-3, i.e. 2e-3 relative to the range of a noise level.
SNAP_RESOLUTION = 2e-3
PROMPT = "a photo of a red apple on a wooden table"


app = load_space_app()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def upload_dir(tmp_path_factory) -> Iterator[Path]:
    """Gradio's upload folder for this module: the only place `read_upload` opens files from."""
    folder = tmp_path_factory.mktemp("gradio-uploads")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> str:
    return save_tiny_dinalrm_repo(tmp_path_factory.mktemp("dinalrm-tiny") / "repo")


@pytest.fixture(scope="module")
def pipe(tiny_repo, upload_dir):
    """The app's shared model, pointed at the tiny folder for this module."""
    settings = app.ModelSettings(name=tiny_repo, device="cpu", dtype=torch.float32, explicit=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app, "MODEL", app.SharedModel(settings))
        yield app.MODEL.get()


def upload(folder: Path, name: str, image: Image.Image | None = None, data: bytes | None = None, **save) -> str:
    """Writes an image (or raw bytes) where Gradio would put an upload; returns the path Gradio would hand over."""
    path = folder / name
    if data is not None:
        path.write_bytes(data)
    else:
        image.save(path, **save)
    return str(path)


def picture(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def files(upload_dir) -> dict[str, str]:
    return {
        "a": upload(upload_dir, "a.png", picture(0)),
        "b": upload(upload_dir, "b.jpg", picture(1), quality=90),
        "c": upload(upload_dir, "c.webp", picture(2, (80, 48))),
    }


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def verdict_values(verdict: str) -> tuple[str, float]:
    winner = re.search(r'data-winner="([AB])"', verdict).group(1)
    probability = float(re.search(r'data-probability="([^"]+)"', verdict).group(1))
    return winner, probability


# ------------------------------------------------------------------------------------------------- scores
def test_compare_reports_the_pipelines_rewards_probability_and_winner(pipe, files):
    verdict, table = app.run_compare(PROMPT, files["a"], files["b"], 0.4, False, 1, 0)
    expected = pipe.compare(PROMPT, Image.open(files["a"]), Image.open(files["b"]), t=0.4, generator=generator())
    winner, probability = verdict_values(verdict)
    assert probability == tolerances.close_to(expected.probability, scale=1.0)
    assert winner == expected.winner.upper()
    assert f"Image {winner} is preferred" in verdict and f"P(A preferred) = {expected.probability:.3f}" in verdict
    assert list(table["image"]) == ["A", "B"]
    assert table["reward"].tolist() == tolerances.printed_as(expected.rewards.tolist(), 4)
    assert table.loc[table["image"] == winner, "verdict"].item().endswith("preferred")


def test_probability_follows_the_reward_difference(pipe, files):
    result = app.compare_images(pipe, PROMPT, Image.open(files["a"]), Image.open(files["b"]), app.ScoreOptions())
    expected = pipe.reward_model.preference_probability(
        torch.tensor([result.reward_a]), torch.tensor([result.reward_b]), result.noise_level
    )
    assert result.probability == tolerances.close_to(float(expected[0]), scale=1.0)
    assert (result.probability >= 0.5) == (result.reward_a >= result.reward_b)
    assert result.winner == ("A" if result.reward_a >= result.reward_b else "B")
    assert 0.0 < result.probability < 1.0


def test_seed_draws_and_ensemble_reach_the_pipeline(pipe, files):
    images = [Image.open(files["a"]), Image.open(files["b"])]
    same = [app.compare_images(pipe, PROMPT, *images, app.ScoreOptions(seed=3)) for _ in range(2)]
    assert same[0] == same[1]
    other = app.compare_images(pipe, PROMPT, *images, app.ScoreOptions(seed=4))
    assert other.reward_a != same[0].reward_a

    drawn = app.compare_images(pipe, PROMPT, *images, app.ScoreOptions(t=0.3, num_draws=3, seed=5))
    expected = pipe(PROMPT, images=images, t=0.3, num_noise_samples=3, generator=generator(5)).rewards
    assert [drawn.reward_a, drawn.reward_b] == tolerances.close_to(expected.tolist())

    ensemble = app.compare_images(pipe, PROMPT, *images, app.ScoreOptions(t=0.9, ensemble=True))
    expected = pipe(PROMPT, images=images, t=[0.2, 0.5, 0.7], generator=generator()).rewards
    assert [ensemble.reward_a, ensemble.reward_b] == tolerances.close_to(expected.tolist())
    assert "3-level ensemble" in app.verdict_html(ensemble)


def test_the_same_image_twice_is_an_exact_tie(pipe, files):
    """A and B share their noise draws (the pipeline's default), so only the images can make them differ."""
    image = Image.open(files["a"])
    for options in (app.ScoreOptions(t=0.8, seed=1), app.ScoreOptions(num_draws=3, ensemble=True)):
        result = app.compare_images(pipe, PROMPT, image, image.copy(), options)
        assert result.reward_a == result.reward_b and result.probability == 0.5
        assert "shared by A and B" in app.verdict_html(result)
    ranked = app.rank_images(pipe, PROMPT, [image, Image.open(files["b"]), image.copy()], app.ScoreOptions(seed=2))
    rewards = dict(ranked)
    assert rewards[0] == rewards[2]


def test_reward_curve_covers_the_noise_range_and_passes_through_compare(pipe, files):
    images = [Image.open(files["a"]), Image.open(files["b"])]
    curve = app.reward_curve(pipe, PROMPT, *images, app.ScoreOptions(seed=2))
    assert list(curve.columns) == ["t", "image", "reward", "p_a"]
    assert len(curve) == 2 * len(app.CURVE_LEVELS)
    levels = curve["t"].unique()
    assert levels == tolerances.close_to(app.CURVE_LEVELS, rtol=SNAP_RESOLUTION, scale=1.0)
    assert (
        levels[0] < 0.06
        and levels[-1] == tolerances.close_to(0.9, rtol=SNAP_RESOLUTION, scale=1.0)
        and np.all(np.diff(levels) > 0)
    )
    assert curve["reward"].notna().all() and curve["p_a"].between(0, 1).all()

    at_04 = curve[curve["t"].sub(0.4).abs() < 2e-3]
    compared = app.compare_images(pipe, PROMPT, *images, app.ScoreOptions(t=0.4, seed=2))
    rewards = at_04.set_index("image")["reward"].to_dict()
    assert rewards == pytest.approx({"A": compared.reward_a, "B": compared.reward_b})
    assert at_04["p_a"].iloc[0] == pytest.approx(compared.probability)


def test_run_curve_gives_one_line_per_image_and_one_probability_line(pipe, files):
    rewards, probabilities = app.run_curve(PROMPT, files["a"], files["b"], 1, 0)
    assert set(rewards.columns) == {"t", "image", "reward"} and set(rewards["image"]) == {"A", "B"}
    assert list(probabilities.columns) == ["t", "p_a"] and len(probabilities) == len(app.CURVE_LEVELS)


# ------------------------------------------------------------------------------------------------- ranking
def test_rank_orders_best_first_with_rewards(pipe, files):
    paths = [files["a"], files["b"], files["c"]]
    gallery, table = app.run_rank(PROMPT, paths, 0.4, False, 2, 7)
    images = [Image.open(path) for path in paths]
    expected = pipe.rank(PROMPT, images, t=0.4, num_noise_samples=2, generator=generator(7))
    names = [Path(path).name for path in paths]
    assert table["file"].tolist() == [names[i] for i in expected.indices]
    assert table["rank"].tolist() == [1, 2, 3]
    assert table["reward"].tolist() == tolerances.printed_as(expected.rewards.tolist(), 4)
    assert table["reward"].is_monotonic_decreasing
    assert [caption.split(" · ")[0] for _, caption in gallery] == ["#1", "#2", "#3"]
    assert all(isinstance(image, Image.Image) for image, _ in gallery)


def test_rank_images_returns_positions_and_rewards_best_first(pipe, files):
    images = [Image.open(files[name]) for name in "abc"]
    ranking = app.rank_images(pipe, PROMPT, images, app.ScoreOptions())
    assert sorted(index for index, _ in ranking) == [0, 1, 2]
    rewards = [reward for _, reward in ranking]
    assert rewards == sorted(rewards, reverse=True)


def test_rank_skips_an_unreadable_file_with_a_warning(pipe, files, upload_dir):
    broken = upload(upload_dir, "broken.png", data=b"not a png at all")
    with pytest.warns(UserWarning, match="Skipped: broken.png"):
        _, table = app.run_rank(PROMPT, [files["a"], broken, files["b"]], 0.4, False, 1, 0)
    assert sorted(table["file"]) == ["a.png", "b.jpg"]


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("prompt", [None, "", "   \n"])
def test_missing_prompt(pipe, files, prompt):
    with pytest.raises(gr.Error, match="Enter the prompt"):
        app.run_compare(prompt, files["a"], files["b"], 0.4, False, 1, 0)
    with pytest.raises(gr.Error, match="Enter the prompt"):
        app.run_rank(prompt, [files["a"]], 0.4, False, 1, 0)


def test_too_long_prompt(pipe, files):
    with pytest.raises(gr.Error, match="the limit is 1000"):
        app.run_compare("cat " * 300, files["a"], files["b"], 0.4, False, 1, 0)


@pytest.mark.parametrize("side", ["A", "B"])
def test_missing_image(pipe, files, side):
    image_a, image_b = (None, files["b"]) if side == "A" else (files["a"], None)
    with pytest.raises(gr.Error, match=f"Add Image {side}") as error:
        app.run_compare(PROMPT, image_a, image_b, 0.4, False, 1, 0)
    assert error.value.title == "Missing image"
    with pytest.raises(gr.Error, match="at least one image"):
        app.run_rank(PROMPT, [], 0.4, False, 1, 0)


def test_corrupt_file(pipe, files, upload_dir):
    garbage = upload(upload_dir, "garbage.png", data=bytes(range(256)) * 4)
    with pytest.raises(gr.Error, match=r"Image B \(garbage.png\) could not be read as an image") as error:
        app.run_compare(PROMPT, files["a"], garbage, 0.4, False, 1, 0)
    assert error.value.title == "Corrupt image"


def test_truncated_file(pipe, upload_dir):
    whole = Path(upload(upload_dir, "whole.png", picture(3, (128, 128))))
    truncated = upload(upload_dir, "truncated.png", data=whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(gr.Error, match="corrupt or truncated"):
        app.read_upload(truncated, "Image A")


def test_too_many_images(pipe, files):
    paths = [files["a"]] * (app.MAX_RANK_IMAGES + 1)
    with pytest.raises(gr.Error, match=f"rank at most {app.MAX_RANK_IMAGES}"):
        app.run_rank(PROMPT, paths, 0.4, False, 1, 0)
    with pytest.raises(gr.Error, match="rank at most"):
        app.rank_images(pipe, PROMPT, [picture(0)] * (app.MAX_RANK_IMAGES + 1), app.ScoreOptions())


def test_oversized_pixel_count_is_refused_before_decoding(upload_dir):
    huge = upload(upload_dir, "huge.png", Image.new("L", (4097, 4096)))
    assert Path(huge).stat().st_size < app.MAX_FILE_BYTES
    with pytest.raises(gr.Error, match=r"4097×4096 = 16.8 megapixels; the limit is 16.8 megapixels") as error:
        app.read_upload(huge, "Image A")
    assert error.value.title == "Image too large"


def test_oversized_file_is_refused(upload_dir):
    big = upload(upload_dir, "big.png", data=b"\0" * (app.MAX_FILE_BYTES + 1))
    with pytest.raises(gr.Error, match="MB; the limit is 20 MB") as error:
        app.read_upload(big, "Image A")
    assert error.value.title == "File too large"


def test_unsupported_file_types(upload_dir):
    text = upload(upload_dir, "notes.txt", data=b"hello")
    with pytest.raises(gr.Error, match=r"notes.txt\) is not a supported image type; upload PNG, JPEG"):
        app.read_upload(text, "Image A")
    portable_pixmap = upload(upload_dir, "picture.ppm", picture(0))
    with pytest.raises(gr.Error, match="is a PPM file; upload PNG") as error:
        app.read_upload(portable_pixmap, "Image A")
    assert error.value.title == "Unsupported file type"


def test_only_uploaded_files_are_opened(tmp_path, upload_dir):
    outside = tmp_path / "outside.png"
    picture(0).save(outside)
    escape = upload_dir / ".." / outside.parent.name / outside.name
    for path in (outside, escape, "/etc/passwd", upload_dir / "never-uploaded.png"):
        with pytest.raises(gr.Error, match="not a file uploaded to this app"):
            app.read_upload(str(path), "Image A")


def test_supported_images_decode_to_what_was_saved(upload_dir):
    original = picture(5, (40, 24)).convert("RGBA")
    decoded = app.read_upload(upload(upload_dir, "alpha.png", original), "Image A")
    assert decoded.size == (40, 24) and decoded.mode == "RGBA"
    assert np.array_equal(np.asarray(decoded), np.asarray(original))


def test_image_too_small_for_the_model(pipe, files, upload_dir):
    tiny = upload(upload_dir, "tiny.png", Image.new("RGB", (4, 4)))
    with pytest.raises(gr.Error, match="too small") as error:
        app.run_compare(PROMPT, files["a"], tiny, 0.4, False, 1, 0)
    assert error.value.title == "Cannot score these inputs"


@pytest.mark.parametrize(
    ("t", "draws", "seed", "message"),
    [
        (0.0, 1, 0, "noise level t"),
        (1.5, 1, 0, "noise level t"),
        (0.4, 0, 0, "noise draws"),
        (0.4, app.MAX_DRAWS + 1, 0, "noise draws"),
        (0.4, 1, -1, "seed"),
    ],
)
def test_settings_out_of_range(t, draws, seed, message):
    with pytest.raises(gr.Error, match=message):
        app.ScoreOptions.from_ui(t, False, draws, seed)


def test_settings_from_the_controls():
    assert app.ScoreOptions.from_ui(0.25, True, 3.0, 12.0) == app.ScoreOptions(0.25, True, 3, 12)
    assert app.ScoreOptions.from_ui(None, None, None, None) == app.ScoreOptions()


# ------------------------------------------------------------------------------------------------- model
def test_model_settings_come_from_the_environment(monkeypatch):
    for name in ("DINALRM_MODEL", "DINALRM_DEVICE", "DINALRM_DTYPE"):
        monkeypatch.delenv(name, raising=False)
    default = app.ModelSettings.from_env()
    assert (default.name, default.explicit) == ("liuhuohuo/DiNa-LRM-SD35M-12layers", False)
    monkeypatch.setenv("DINALRM_MODEL", "/models/dinalrm")
    monkeypatch.setenv("DINALRM_DEVICE", "cuda:1")
    monkeypatch.setenv("DINALRM_DTYPE", "bf16")
    assert app.ModelSettings.from_env() == app.ModelSettings("/models/dinalrm", "cuda:1", torch.bfloat16, True)
    monkeypatch.setenv("DINALRM_DTYPE", "float8")
    with pytest.raises(ValueError, match="DINALRM_DTYPE='float8'"):
        app.ModelSettings.from_env()
    # The command line (`python space/app.py --model ... --device ... --dtype ...`) overrides the environment.
    args = app.parse_args(["--model", "/models/other", "--device", "cpu", "--dtype", "float16"])
    assert app.ModelSettings.from_env(args.model, args.device, args.dtype) == app.ModelSettings(
        "/models/other", "cpu", torch.float16, True
    )


def test_unreachable_default_model_falls_back_to_the_bundled_tiny_model(monkeypatch):
    monkeypatch.delenv("DINALRM_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert app.OFFLINE_FALLBACK_MODEL and app.OFFLINE_FALLBACK_MODEL.endswith("assets/dinalrm-tiny")
    model = app.SharedModel()
    assert model.status().startswith(f"Model: `{app.OFFLINE_FALLBACK_MODEL}`")
    assert type(model.get()).__module__.endswith("pipeline_dinalrm")


def test_unreachable_default_model_gives_a_clear_error(monkeypatch):
    monkeypatch.delenv("DINALRM_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(app, "OFFLINE_FALLBACK_MODEL", None)
    model = app.SharedModel()
    assert "Model unavailable" in model.status() and app.DEFAULT_MODEL in model.status()
    with pytest.raises(gr.Error, match="Set DINALRM_MODEL to a local model folder") as error:
        model.get()
    assert error.value.title == "Model unavailable"


def test_model_is_loaded_once_and_shared(tiny_repo):
    model = app.SharedModel(app.ModelSettings(tiny_repo, "cpu", torch.float32, True))
    assert model.get() is model.get()
    assert model.status().startswith(f"Model: `{tiny_repo}` on cpu")
    assert type(model.get()).__module__.endswith("pipeline_dinalrm")


def test_gpu_decorator_is_used_only_when_spaces_is_installed(monkeypatch):
    def handler() -> str:
        return "scored"

    monkeypatch.setattr(app, "spaces", None)
    assert app.on_gpu(handler) is handler
    monkeypatch.setattr(app, "spaces", types.SimpleNamespace(GPU=lambda fn: ("on gpu", fn)))
    assert app.on_gpu(handler) == ("on gpu", handler)


# ------------------------------------------------------------------------------------------------- UI
def test_examples_are_drawn_offline_and_score(pipe, upload_dir):
    paths = app.write_example_images(upload_dir / "examples")
    assert set(paths) == {"apple", "apple_degraded", "mountains", "mountains_degraded"}
    verdict, _ = app.run_compare(app.APPLE_PROMPT, str(paths["apple"]), str(paths["apple_degraded"]), 0.4, False, 1, 0)
    assert "is preferred" in verdict


def test_demo_has_the_stable_element_ids_and_no_analytics(upload_dir):
    demo = app.build_demo()
    ids = {block.elem_id for block in demo.blocks.values()}
    assert {
        "prompt",
        "image_a",
        "image_b",
        "compare",
        "verdict",
        "rewards",
        "t_slider",
        "reward_curve",
        "rank_prompt",
        "rank_images",
        "rank",
        "rank_gallery",
        "rank_table",
    } <= ids
    assert demo.analytics_enabled is False
    image_a = next(block for block in demo.blocks.values() if block.elem_id == "image_a")
    assert image_a.get_block_name() == "image" and image_a.type == "filepath"
    api_names = {fn.api_name for fn in demo.fns.values()}
    assert {"compare", "reward_curve", "rank"} <= api_names


def test_rewards_table_and_verdict_for_a_near_tie():
    result = app.Comparison(1.0, 0.99, 0.51, "A", 0.4, app.ScoreOptions())
    assert "near tie" in app.verdict_html(result)
    assert isinstance(app.rewards_table(result), pd.DataFrame)
