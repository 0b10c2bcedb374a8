"""The tiny world (examples/tiny_world): the oracle on hand-made images, every stage end to end at toy settings,
and the shipped artefacts (assets/tiny-sd3, assets/dinalrm-tiny)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tolerances
import torch
from domain import (
    BACKGROUNDS,
    COLORS,
    Scene,
    all_scenes,
    attribute_accuracy,
    oracle_attributes,
    oracle_prefers,
    oracle_score,
    render,
    split_prompts,
)
from PIL import Image, ImageDraw


REPO_ROOT = Path(__file__).resolve().parents[1]
WORLD = REPO_ROOT / "examples" / "tiny_world"
REFL_SCRIPT = REPO_ROOT / "examples" / "refl" / "train_refl.py"

GENERATOR = REPO_ROOT / "assets" / "tiny-sd3"
REWARD = REPO_ROOT / "assets" / "dinalrm-tiny"
PROMPT = "a small red circle at the left on a white background"

# The in-process runs use tiny models: one torch thread is fastest, and spares the shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


def _blank(background: str = "white") -> Image.Image:
    return Image.new("RGB", (64, 64), BACKGROUNDS[background])


def _draw(image: Image.Image, shape: str, color: str, center: tuple[int, int], half: int) -> Image.Image:
    draw = ImageDraw.Draw(image)
    box = [center[0] - half, center[1] - half, center[0] + half, center[1] + half]
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLORS[color])
    return image


# ------------------------------------------------------------------------------------------------------ oracle
def test_grammar_round_trip_and_fixed_split():
    scenes = all_scenes()
    assert len(scenes) == 360 and all(Scene.parse(s.prompt) == s for s in scenes)
    train, held_out = split_prompts()
    assert not set(train) & set(held_out) and len(held_out) == 72
    assert split_prompts() == (train, held_out)
    with pytest.raises(ValueError):
        Scene.parse("a photo of a cat")


def test_oracle_prefers_the_matching_hand_drawn_image():
    right = _draw(_blank(), "circle", "red", (17, 32), 8)
    assert oracle_prefers(right, _draw(_blank(), "square", "blue", (47, 32), 8), PROMPT)
    assert oracle_attributes(right, "white") == {
        "background": "white",
        "color": "red",
        "shape": "circle",
        "size": "small",
        "position": "left",
    }
    assert attribute_accuracy(right, PROMPT) == 1.0
    # Every single wrong attribute costs score.
    wrong = {
        "color": _draw(_blank(), "circle", "green", (17, 32), 8),
        "shape": _draw(_blank(), "square", "red", (17, 32), 8),
        "size": _draw(_blank(), "circle", "red", (17, 32), 14),
        "position": _draw(_blank(), "circle", "red", (47, 32), 8),
        "background": _draw(_blank("black"), "circle", "red", (17, 32), 8),
        "count": _draw(_draw(_blank(), "circle", "red", (17, 32), 8), "circle", "red", (47, 48), 6),
        "nothing": _blank(),
    }
    for name, image in wrong.items():
        assert oracle_score(right, PROMPT) > oracle_score(image, PROMPT) + 0.05, name
        assert oracle_prefers(image, right, PROMPT) is False, name
    assert oracle_prefers(right, right.copy(), PROMPT, margin=0.01) is None


def test_oracle_reads_every_render_correctly():
    rng = np.random.default_rng(0)
    for scene in all_scenes()[::7]:
        image = render(scene, rng)
        assert attribute_accuracy(image, scene.prompt) == 1.0, scene.prompt


# --------------------------------------------------------------------------------------------- stages end to end
@pytest.mark.slow  # ~25 Python processes (forks of one warm interpreter) of toy training: about a CPU minute
def test_every_stage_runs_end_to_end_at_toy_settings(tmp_path):
    """regenerate.sh in QUICK mode: VAE, generator, pairs, train_dinalrm.py, Hub repo, evaluations, baseline, ReFL,
    Flow-GRPO, the LPO / ReFL / Flow-GRPO (DiNa-LRM) and ReFL (pixel CNN) comparison. Every script runs from its
    command line (QUICK mode forks each from one interpreter that imported torch once, dinalrm.testing.warm_python);
    the comparison's ReFL with the pixel CNN is also `train_refl.py --reward pixel` end to end."""
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        ["bash", str(WORLD / "regenerate.sh")], capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    for path in (
        "vae/config.json",
        "tiny-sd3/model_index.json",
        "pairs/train.parquet",
        "pairs/test.parquet",
        "dinalrm-tiny/model_index.json",
        "metrics/dinalrm.json",
        "metrics/run_eval/results.json",
        "metrics/run_eval/noise_sweep.csv",
        "metrics/pixel_baseline.json",
        "refl/refl_history.json",
        "refl/refl_curves.png",
        "refl/pytorch_lora_weights.safetensors",
        "flow-grpo/flow_grpo_history.json",
        "flow-grpo-pixel/pytorch_lora_weights.safetensors",
        "results_flow_grpo.json",
        "flow_grpo_curves.png",
        "results_optimisers.json",
        "optimiser_comparison.png",
        "optimisers/lpo-seed0/pytorch_lora_weights.safetensors",
        "optimisers/refl-pixel/pytorch_lora_weights.safetensors",
    ):
        assert (tmp_path / path).exists(), path
    stages = [line.split()[0] for line in (tmp_path / "timings.txt").read_text().splitlines()]
    assert stages == [
        "vae",
        "generator",
        "pairs",
        "dinalrm",
        "hub_repo",
        "evaluate",
        "run_eval",
        "pixel_baseline",
        "refl",
        "refl_fast",
        "flow_grpo",
        "flow_grpo_pixel",
        "optimisers",
    ]
    history = json.loads((tmp_path / "refl" / "refl_history.json").read_text())
    assert {"proxy_reward", "golden_metric"} <= history[0].keys()
    flow_grpo = json.loads((tmp_path / "results_flow_grpo.json").read_text())
    assert {run["reward"] for run in flow_grpo.values()} == {"DiNa-LRM", "pixel CNN"}
    assert all(len(run["validation"]) == 2 for run in flow_grpo.values())
    optimisers = json.loads((tmp_path / "results_optimisers.json").read_text())
    assert {run["method"] for run in optimisers["runs"].values()} == {
        "LPO + DiNa-LRM",
        "ReFL + DiNa-LRM",
        "Flow-GRPO + DiNa-LRM",
        "ReFL + pixel CNN",
    }
    for run in optimisers["runs"].values():
        assert run["peak_rss_mib"] > 0 and run["reward_model_calls"] > 0 and len(run["curve"]) >= 2
    # train_refl.py --reward pixel (the pixel CNN on the VAE decode): two steps, validated with the oracle after each.
    pixel = json.loads((tmp_path / "optimisers" / "refl-pixel" / "refl_history.json").read_text())
    assert [h["step"] for h in pixel] == [0, 1, 2]
    assert all(np.isfinite(h["proxy_reward"]) and 0 <= h["golden_metric"] <= 1 for h in pixel)


# ----------------------------------------------------------------------------------------------- shipped artefacts
def test_shipped_artefacts_fit_the_budget_and_load():
    from diffusers import StableDiffusion3Pipeline

    from pipeline_dinalrm import DiNaLRMPipeline

    # The bundled model holds no copies of the Hub code files (they could drift): it loads with the installed ones.
    assert not sorted(REWARD.rglob("*.py")), "assets/dinalrm-tiny must not ship code; regenerate.sh removes it"
    size = sum(f.stat().st_size for root in (GENERATOR, REWARD) for f in root.rglob("*") if f.is_file())
    assert size <= 25 * 2**20
    generator = StableDiffusion3Pipeline.from_pretrained(GENERATOR)
    reward = DiNaLRMPipeline.from_pretrained(REWARD)
    assert generator.vae.config.latent_channels == 16 and reward.reward_model.config.num_backbone_layers == 3
    assert type(reward.reward_model).__module__ == "modeling_dinalrm"


@pytest.fixture(scope="module")
def held_out_pairs():
    """A fixed held-out set: the shipped generator's own samples for held-out prompts, oracle-labelled."""
    from diffusers import StableDiffusion3Pipeline
    from make_pairs import oracle_pairs, parse_args

    pipe = StableDiffusion3Pipeline.from_pretrained(GENERATOR)
    pipe.set_progress_bar_config(disable=True)
    _, held_out = split_prompts()
    args = parse_args(["--generator", str(GENERATOR), "--margin", "0.1"])
    with torch.no_grad():
        rows, _ = oracle_pairs(pipe, held_out * 2, seed=1234, args=args)
    return rows


@pytest.fixture(scope="module")
def held_out_accuracy(held_out_pairs) -> dict:
    from evaluate_reward import evaluate

    from pipeline_dinalrm import DiNaLRMPipeline

    pipe = DiNaLRMPipeline.from_pretrained(REWARD)
    rows = held_out_pairs
    assert len(rows) >= 40
    return evaluate(
        pipe, [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows], sweep=False
    )


#: Lowest accepted accuracy on the fixed draw: the shipped model's measured accuracy (82%, below) minus about 2.4
#: binomial standard errors of a 58-pair draw (5 points each).
MIN_HELD_OUT_ACCURACY = 0.70


@pytest.mark.slow  # samples the held-out prompts through the shipped generator: minutes on a shared 2-core machine
def test_shipped_dinalrm_agrees_with_the_oracle_on_held_out_pairs(held_out_accuracy):
    """The shipped DiNa-LRM prefers the oracle-better image on most pairs of held-out prompts.

    What the model does, measured on 12 fresh draws of this fixture's protocol (generator seeds 1-12 instead of
    1234; `examples/tiny_world/held_out_draws.py`): 596 / 726 pairs = 82.1% ± 1.4% (binomial SE) at t = 0.4,
    593 / 726 = 81.7% ± 1.4% with the ensemble 0.2 / 0.5 / 0.7; single draws ranged from 70.5% to 89.8% (SD 5.0
    points, as binomial noise on ~60 pairs predicts). This fixed draw (seed 1234, 58 pairs) is a favourable one:
    93.1% (54/58) at t = 0.4 and 91.4% (53/58) with the ensemble. It was never an estimate of the model's accuracy,
    so the bound is not set from it: a draw of this protocol from a model at 82% falls below 70% with probability
    about 1% (binomial, 58 pairs), so the test tolerates float differences across platforms that change the
    generator's samples; a model at 60% would pass it with probability about 5%, one at chance never. On make_pairs.py's `test` split
    (434 pairs, oracle gap > 0.05, so harder pairs; used to choose the training settings): 79.0% / 78.1%.
    """
    assert held_out_accuracy["accuracy_t0.4"] >= MIN_HELD_OUT_ACCURACY, held_out_accuracy
    assert held_out_accuracy["accuracy_ensemble"] >= MIN_HELD_OUT_ACCURACY, held_out_accuracy


@pytest.mark.slow  # a ReFL run of 4 steps: a few CPU seconds
def test_refl_for_a_few_steps_raises_the_mean_reward(tmp_path):
    """Four ReFL steps at lr 1e-3 raise the mean DiNa-LRM reward of fixed-seed samples of 16 prompts (same prompts,
    sampling seeds and reward noise at both validations). Measured with training seeds 0-3: from 25.8-26.5 up by
    +2.0 to +2.1 (six steps of 8 sampling steps: +2.4 to +2.9), so the bound (any rise) has a wide margin. In
    process: train_refl.py's command line runs in test_every_stage_runs_end_to_end_at_toy_settings."""
    from train_refl import main, parse_args

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(split_prompts()[0][::12]) + "\n")
    argv = [
        "--pretrained_model_name_or_path", str(GENERATOR), "--reward_model", str(REWARD), "--prompts_file", str(prompts),
        "--height", "64", "--width", "64", "--max_sequence_length", "16", "--num_inference_steps", "4",
        "--guidance_scale", "4.0", "--lora_rank", "8", "--learning_rate", "1e-3", "--train_batch_size", "8",
        "--max_train_steps", "4", "--validation_steps", "4", "--num_validation_prompts", "16",
        "--report_to", "tensorboard", "--output_dir", str(tmp_path / "refl"),
    ]  # fmt: skip
    main(parse_args(argv))
    history = json.loads((tmp_path / "refl" / "refl_history.json").read_text())
    assert [h["step"] for h in history] == [0, 4]
    assert history[-1]["proxy_reward"] > history[0]["proxy_reward"], history


def _refl_args(tmp_path: Path, *extra: str):
    from train_refl import parse_args

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(split_prompts()[0][:4]) + "\n")
    return parse_args(
        ["--pretrained_model_name_or_path", str(GENERATOR), "--prompts_file", str(prompts), "--height", "64",
         "--width", "64", "--max_sequence_length", "16", "--num_inference_steps", "2", "--guidance_scale", "4.0",
         "--lora_rank", "8", "--train_batch_size", "2", "--output_dir", str(tmp_path / "refl"), *extra]
    )  # fmt: skip


def test_refl_pixel_reward_scores_the_decode_and_its_gradients_reach_the_lora(tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from pixel_baseline import encode
    from tiny_world_common import decode_latents
    from train_refl import build_reward

    from dinalrm.alignment import PixelReward, Sampler, encode_generator_prompts, save_pixel_reward

    torch.manual_seed(0)
    cnn = PixelReward(text_tokens=32, text_dim=64).eval()
    save_pixel_reward(cnn, str(tmp_path / "pixel.safetensors"))
    args = _refl_args(tmp_path, "--reward", "pixel", "--pixel_reward", str(tmp_path / "pixel.safetensors"))
    pipe = StableDiffusion3Pipeline.from_pretrained(GENERATOR)
    prompts = split_prompts()[0][:2]
    reward = build_reward(args, pipe, prompts, "cpu", torch.float32)

    x0 = torch.randn(2, 16, 16, 16)
    with torch.no_grad():  # the tiny world's own decode and prompt encoding, as pixel_baseline.py trains on them
        expected = cnn(decode_latents(pipe.vae, x0).clamp(-1, 1), encode(pipe, prompts))
        tolerances.assert_close(reward(x0, prompts, None), expected)

    pipe.transformer.requires_grad_(False)
    pipe.transformer.add_adapter(LoraConfig(r=8, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    embeds, pooled = encode_generator_prompts(pipe, prompts, args, "cpu")
    x0 = Sampler(pipe, args).sample_x0(pipe.transformer, embeds, pooled, 1, torch.Generator().manual_seed(0))
    reward(x0, prompts, None).sum().backward()
    lora_b = {n: p.grad for n, p in pipe.transformer.named_parameters() if "lora_B" in n}
    assert lora_b and all(g is not None and torch.isfinite(g).all() for g in lora_b.values())
    assert sum(float(g.abs().sum()) for g in lora_b.values()) > 0  # the reward's gradient came back through the VAE
    assert not any(p.grad is not None for p in pipe.vae.parameters())  # the VAE stays frozen


def test_refl_pixel_reward_needs_its_cnn(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _refl_args(tmp_path, "--reward", "pixel")
    assert "--reward pixel needs --pixel_reward" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _refl_args(tmp_path)
    assert "--reward dinalrm needs --reward_model" in capsys.readouterr().err


def test_comparison_keeps_other_runs_only_from_a_matching_results_file(tmp_path):
    from compare_optimisers import kept_runs, parse_args

    def args(*extra: str):
        return parse_args(["--generator", "g", "--reward_model", "r", "--output_dir", "o", "--plot", "p.png",
                           "--results", str(tmp_path / "results.json"), "--pixel_reward", "cnn", *extra])  # fmt: skip

    assert kept_runs(args()) == {}  # every method runs: nothing is kept
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kept_runs(args("--methods", "refl"))
    (tmp_path / "results.json").write_text(json.dumps({"held_out_prompts": 72, "runs": {}}))
    with pytest.raises(ValueError, match="72 held-out prompts"):
        kept_runs(args("--methods", "refl", "--num_validation_prompts", "32"))
    assert kept_runs(args("--methods", "refl", "--num_validation_prompts", "72"))["held_out_prompts"] == 72
    with pytest.raises(SystemExit):  # the pixel arm needs the CNN
        parse_args(["--generator", "g", "--reward_model", "r", "--output_dir", "o", "--plot", "p", "--results", "r"])
