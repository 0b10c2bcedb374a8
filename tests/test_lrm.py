"""LRM beyond the official fixture: SDXL topology (feature indices, two text encoders, added time ids), learning,
LoRA, the converter's refusals and Hub-id path, and the pipeline's public methods. Tiny models, seconds each."""

import shutil
from pathlib import Path

import pytest
import tolerances
import torch
from conftest import rounding_by_row, use_hub_cache
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

from dinalrm.cli import main as dinalrm_main
from dinalrm.testing import torch_threads
from dinalrm.testing.lrm_models import get_tiny_lrm, save_tiny_sd_pipeline
from modeling_lrm import LRMModel


REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "official-lrm-tiny"
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bases")
    return {kind: save_tiny_sd_pipeline(root / kind, kind) for kind in ("sd15", "sdxl")}


def token_ids(base: str, subfolder: str, prompts: list[str]) -> torch.Tensor:
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder=subfolder)
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


def test_sdxl_features_match_a_plain_diffusers_unet_with_the_sdxl_pipeline_text_path(tiny_bases):
    """Independent reference: diffusers' own SDXL `encode_prompt` and added time ids, the full UNet with hooks."""
    base = tiny_bases["sdxl"]
    model = get_tiny_lrm(base, "sdxl").eval()
    assert model.config.multi_scale_indices == [2, 5, 8]
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([51, 701])
    with torch.no_grad():
        cond, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
        uncond, _, pooled_u, _ = pipe.encode_prompt([""] * 2, do_classifier_free_guidance=False)
        size = unet.config.sample_size * pipe.vae_scale_factor
        time_ids = pipe._get_add_time_ids(
            (size, size), (0, 0), (size, size), cond.dtype, pipe.text_encoder_2.config.projection_dim
        ).repeat(4, 1)
        captured = {}
        hooks = [
            block.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o[1][1]))
            for k, block in enumerate(unet.down_blocks)
        ]
        hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: captured.__setitem__("mid", o)))
        unet(
            torch.cat([latents, latents]),
            torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([cond, uncond]),
            added_cond_kwargs={"text_embeds": torch.cat([pooled, pooled_u]), "time_ids": time_ids},
        )
        for hook in hooks:
            hook.remove()
        mid_c, mid_u = captured["mid"].mean(dim=(2, 3)).chunk(2)
        reference = [captured[k].mean(dim=(2, 3))[:2] for k in range(3)]
        reference.append(mid_u + model.config.guidance_scale * (mid_c - mid_u))
        reference = torch.cat(reference, dim=-1)
        ids, ids_2 = token_ids(base, "tokenizer", PROMPTS), token_ids(base, "tokenizer_2", PROMPTS)
        output = model(latents, timesteps, ids, ids_2)
    assert output.pooled_features.shape == (2, 8 + 16 + 32 + 32)
    # VFE multiplies float32 rounding (the text encoders run on another batch layout) by the guidance scale.
    tolerances.assert_close(output.pooled_features, reference)
    # The text feature is text_encoder_2's projected pooled embedding (no extra projection in LRM-XL).
    assert model.text_projection is None
    tolerances.assert_close(output.text_embeds, pooled / pooled.norm(dim=-1, keepdim=True))


def test_sdxl_needs_the_second_tokenizer_ids(tiny_bases):
    model = get_tiny_lrm(tiny_bases["sdxl"], "sdxl")
    ids = token_ids(tiny_bases["sdxl"], "tokenizer", PROMPTS)
    with pytest.raises(ValueError, match="input_ids_2"):
        model(torch.randn(2, 4, 8, 8), 1, ids)


def _toy_pairs(generator: torch.Generator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of latents where the preferred one has a brighter first channel (a learnable, prompt-free rule)."""
    a = torch.randn(count, 4, 8, 8, generator=generator)
    b = torch.randn(count, 4, 8, 8, generator=generator)
    a[:, 0] += 1.0
    b[:, 0] -= 1.0
    return a, b


@pytest.mark.slow  # a fresh interpreter or a training run: 7-35 s on a shared 2-core machine
@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_tiny_lrm_learns_a_preference_with_the_official_pair_loss(tiny_bases, kind):
    """10 AdamW steps on 8 toy pairs each. Measured over 6 data/model seeds per kind (data seeds 0-5, model seeds
    1, 1, 1, 2, 3, 4): held-out accuracy (32 pairs) from 0.16-0.84 before to 1.0 after 8 steps in all 12 runs
    (0.94-1.0 after 5), so 10 steps clear the 0.9 bar with room."""
    base = tiny_bases[kind]
    model = get_tiny_lrm(base, kind, seed=1).train()
    ids = token_ids(base, "tokenizer", PROMPTS[:1])
    ids_2 = token_ids(base, "tokenizer_2", PROMPTS[:1]) if kind == "sdxl" else None
    generator = torch.Generator().manual_seed(0)
    test_a, test_b = _toy_pairs(generator, 32)

    def accuracy() -> float:
        with torch.no_grad():
            rewards = model.score_latents(
                torch.cat([test_a, test_b]), ids, ids_2, t=1, generator=torch.Generator().manual_seed(1)
            )
        return (rewards[:32] > rewards[32:]).float().mean().item()

    with torch_threads(1):  # tiny models train fastest on one thread, above all on a shared CPU
        before = accuracy()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(10):
            a, b = _toy_pairs(generator, 8)
            swap = torch.rand(8, generator=generator) < 0.5
            first = torch.where(swap[:, None, None, None], b, a)
            second = torch.where(swap[:, None, None, None], a, b)
            timesteps = torch.tensor([1, 51, 101, 151, 1, 51, 101, 151]).repeat(2)
            noise = torch.randn(16, 4, 8, 8, generator=generator)
            rewards = model(
                model.add_noise(torch.cat([first, second]), noise, timesteps), timesteps, ids, ids_2
            ).rewards
            loss = model.preference_loss(rewards[:8], rewards[8:], (~swap).float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = accuracy()
    assert after >= 0.9 and after > before, (before, after)


def test_preference_loss_ties_weights_and_aux_coefficient():
    r0, r1 = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 3.0, 1.0])
    labels = torch.tensor([1.0, 0.0, 0.5])
    losses = LRMModel.preference_loss(r0, r1, labels, reduction="none")
    p0 = 1 / (1 + torch.exp(-(r0 - r1)))
    by_hand = -(labels * torch.log(p0) + (1 - labels) * torch.log(1 - p0))
    by_hand[2] += torch.log(torch.tensor(0.5))
    tolerances.assert_close(losses, by_hand / 3)
    assert losses[2] == 0, "an equal-score tie is the loss minimum, 0"
    weighted = LRMModel.preference_loss(r0, r1, labels, num_examples_per_prompt=torch.tensor([1.0, 4.0, 4.0]))
    tolerances.assert_close(weighted, (by_hand * torch.tensor([4.0, 1.0, 1.0]) / 6).sum())
    aux = LRMModel.preference_loss(
        r0, r1, labels, timesteps_0=torch.tensor([1, 51, 1]), timesteps_1=torch.tensor([51, 51, 1]), aux_loss_coeff=0.0
    )
    tolerances.assert_close(aux, by_hand[1:].sum() / 3)


def test_lora_starts_at_the_base_rewards_trains_only_the_adapter_and_saves_merged(tiny_bases, tmp_path):
    base = tiny_bases["sd15"]
    model = get_tiny_lrm(base, "sd15").eval()
    ids = token_ids(base, "tokenizer", PROMPTS)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(latents, 451, ids).rewards
        model.add_lora(rank=4)
        tolerances.assert_close(model(latents, 451, ids).rewards, before)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        ".lora_" in name or name in {"visual_projection.weight", "text_projection.weight", "logit_scale"}
        for name in trainable
    )
    with torch.no_grad():
        for layer in model.lora_layers().values():
            layer.lora_B["default"].weight.normal_(std=0.5)
        changed = model(latents, 451, ids).rewards
    assert not torch.allclose(changed, before)
    model.save_pretrained(tmp_path / "lora-merged")
    reloaded = LRMModel.from_pretrained(tmp_path / "lora-merged").eval()
    assert reloaded.config.lora_rank == 0
    with torch.no_grad():
        tolerances.assert_close(reloaded(latents, 451, ids).rewards, changed)


# ------------------------------------------------------------------------------------------------ converter
def convert_in_process(official_dir, output_dir) -> str:
    """The converter's `main` run in this process (faster than a subprocess); returns its failure message."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_lrm", REPO_ROOT / "scripts" / "convert_official_lrm_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as failure:
        module.main(
            ["--official_dir", str(official_dir), "--base", str(FIXTURE / "base"), "--output_dir", str(output_dir)]
        )
    return str(failure.value)


def _official_copy(tmp_path: Path) -> Path:
    target = tmp_path / "official"
    shutil.copytree(FIXTURE / "checkpoint", target, ignore=shutil.ignore_patterns("state_dict.safetensors"))
    return target


def test_converter_refuses_a_partial_state_dict_naming_the_key(tmp_path):
    official = _official_copy(tmp_path)
    state = torch.load(official / "state_dict.pt", weights_only=True)
    del state["text_projection"]
    torch.save(state, official / "state_dict.pt")
    message = convert_in_process(official, tmp_path / "out")
    assert "text_projection.weight" in message and "missing" in message
    assert not (tmp_path / "out").exists()


def test_converter_refuses_a_unet_with_missing_tensors_naming_them(tmp_path):
    from safetensors.torch import load_file, save_file

    official = _official_copy(tmp_path)
    weights = official / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["mid_block.resnets.0.conv1.weight"]
    save_file(state, weights)
    assert "unet.mid_block.resnets.0.conv1.weight" in convert_in_process(official, tmp_path / "out")


def test_converter_loads_a_hub_id_from_the_cache_and_a_frozen_text_encoder_from_the_base(tmp_path, monkeypatch):
    """A simulated Hugging Face cache (documented layout) holds an official checkpoint without `text_encoder/`
    (trained with freeze_text_encoder=true): `dinalrm convert lrm` resolves the id offline and takes the base's
    encoder. In this process, with the cache folder set where huggingface_hub reads it at call time (a fresh
    interpreter reads `HF_HUB_CACHE` from the environment: the script's command line runs in test_lrm_parity.py)."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--lrm-tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(FIXTURE / "checkpoint", snapshot, ignore=shutil.ignore_patterns("text_encoder", "*.safetensors"))
    shutil.copytree(FIXTURE / "checkpoint" / "unet", snapshot / "unet", dirs_exist_ok=True)
    (cache / "models--someone--lrm-tiny" / "refs").mkdir()
    (cache / "models--someone--lrm-tiny" / "refs" / "main").write_text("0" * 40)
    use_hub_cache(monkeypatch, cache)
    arguments = ["--official_dir", "someone/lrm-tiny", "--base", str(FIXTURE / "base")]
    assert dinalrm_main(["convert", "lrm", *arguments, "--output_dir", str(tmp_path / "out")]) == 0
    from transformers import CLIPTextModel

    converted = LRMModel.from_pretrained(tmp_path / "out" / "reward_model").text_encoder.state_dict()
    base_encoder = CLIPTextModel.from_pretrained(FIXTURE / "base" / "text_encoder").state_dict()
    tuned_encoder = CLIPTextModel.from_pretrained(FIXTURE / "checkpoint" / "text_encoder").state_dict()
    assert converted.keys() == base_encoder.keys()
    assert all(torch.equal(converted[key], base_encoder[key]) for key in converted)
    assert not all(torch.equal(converted[key], tuned_encoder[key]) for key in converted)


def test_converter_never_writes_into_a_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert "--overwrite" in convert_in_process(FIXTURE / "checkpoint", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def tiny_pipeline(tiny_bases):
    from diffusers import AutoencoderKL

    from pipeline_lrm import LRMPipeline

    base = tiny_bases["sdxl"]
    return LRMPipeline(
        reward_model=get_tiny_lrm(base, "sdxl").eval(),
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2"),
    )


def test_pipeline_scores_compares_and_ranks_consistently(tiny_pipeline):
    from PIL import Image

    images = [Image.new("RGB", (24, 20), colour) for colour in ("red", "blue", "green")]
    rewards = tiny_pipeline(PROMPTS[0], images=images, generator=torch.Generator().manual_seed(0)).rewards
    again = tiny_pipeline(PROMPTS[0], images=images, generator=torch.Generator().manual_seed(0)).rewards
    tolerances.assert_close(rewards, again)
    other = tiny_pipeline(PROMPTS[0], images=images, generator=torch.Generator().manual_seed(1)).rewards
    assert not torch.equal(rewards, other), "the generator must drive the posterior sample and the noise"
    ranking = tiny_pipeline.rank(PROMPTS[0], images, generator=torch.Generator().manual_seed(0))
    assert ranking.indices == sorted(range(3), key=lambda i: -rewards[i].item())
    comparison = tiny_pipeline.compare(PROMPTS[0], images[0], images[1], generator=torch.Generator().manual_seed(0))
    expected = torch.softmax(comparison.rewards, dim=0)[0].item()
    assert comparison.probability == pytest.approx(expected, rel=1e-6)
    assert comparison.winner == ("a" if expected >= 0.5 else "b")
    with pytest.raises(ValueError, match="2 prompts for 3 samples"):
        tiny_pipeline(PROMPTS, images=images)
    with pytest.raises(ValueError, match="integer DDPM timestep"):
        tiny_pipeline(PROMPTS[0], images=images, t=0.4)


def test_pipeline_ties_equal_images_of_one_prompt_although_batch_rows_round_differently(tiny_pipeline, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(tiny_pipeline, "_encode_pixels", rounding_by_row(tiny_pipeline._encode_pixels))
    red, blue = Image.new("RGB", (24, 20), "red"), Image.new("RGB", (24, 20), "blue")
    rewards = tiny_pipeline(PROMPTS[0], images=[blue, red, red.copy()], generator=torch.Generator().manual_seed(0))
    assert rewards.rewards[1] == rewards.rewards[2]
    assert rewards.rewards[0] != rewards.rewards[1], "a different image must score differently"
    comparison = tiny_pipeline.compare(PROMPTS[0], red, red.copy(), generator=torch.Generator().manual_seed(0))
    assert comparison.probability == 0.5


def test_pipeline_reward_fn_is_differentiable_in_the_latents(tiny_pipeline):
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    rewards = tiny_pipeline.reward_fn(latents, PROMPTS, t=451, generator=torch.Generator().manual_seed(0))
    rewards.sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


@pytest.mark.slow  # a fresh interpreter or a training run: 7-35 s on a shared 2-core machine
def test_run_eval_scores_lrm_rows_under_the_table1_protocol(tmp_path):
    """`run_eval.py --scorer lrm`: the converter's output folder, canonical pairs, one row per timestep."""
    import json

    import numpy as np

    from dinalrm.data import write_canonical_pairs
    from dinalrm.evaluation import runner as run_eval
    from dinalrm.testing import make_tiny_image_pair

    import_converter = REPO_ROOT / "scripts" / "convert_official_lrm_checkpoint.py"
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_lrm_eval", import_converter)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(
        [
            "--official_dir",
            str(FIXTURE / "checkpoint"),
            "--base",
            str(FIXTURE / "base"),
            "--output_dir",
            str(tmp_path / "lrm"),
        ]
    )
    from pipeline_lrm import LRMPipeline

    # Without trust_remote_code the installed classes load the folder; none of its code files runs.
    pipe = LRMPipeline.from_pretrained(tmp_path / "lrm")
    assert type(pipe.reward_model).__module__ == "modeling_lrm" and pipe.tokenizer_2 is None
    rng = np.random.default_rng(0)
    rows = []
    for prompt in ["a cat", "x", "a red car on a road"]:
        chosen, rejected = make_tiny_image_pair(rng)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "weight": 1.0})
    pairs = write_canonical_pairs(tmp_path / "pairs", rows, split="test")
    argv = ["--scorer", "lrm", "--model", str(tmp_path / "lrm"), "--lrm_timesteps", "1,451", "--pairs", pairs]
    argv += ["--output_dir", str(tmp_path / "out"), "--bootstrap_samples", "0"]
    assert run_eval.main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for timestep in (1, 451):
        entry = results[f"LRM [lrm] timestep={timestep}"]["canonical"]
        assert entry["n_pairs"] == 3 and entry["accuracy"] == pytest.approx(entry["n_correct"] / 3)
    # Deterministic per image: a second run with the same seed gives the same counts.
    assert run_eval.main(argv + ["--fresh"]) == 0
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["LRM [lrm] timestep=451"] == results["LRM [lrm] timestep=451"]


# ------------------------------------------------------------------------------------------------- training
def test_mpcf_official_thresholds_per_strategy():
    from dinalrm.training.lrm import mpcf_filter

    scores = {  # different_flag, aesthetic_gap, clipscore_gap, vqascore_gap per row
        "different_flag": [1, 1, 1, 1, 0, 0, 1],
        "aesthetic_gap": [0.1, -0.3, -0.8, 0.5, 0.1, 0.1, float("nan")],
        "clipscore_gap": [0.1, 0.1, 0.1, -0.01, 0.02, 0.05, 0.1],
        "vqascore_gap": [0.1, 0.1, 0.1, 0.2, 0.05, 0.01, 0.1],
    }
    keep = {strategy: mpcf_filter(scores, strategy)[0] for strategy in (1, 2, 3)}
    assert keep == {1: [0, 4], 2: [0, 1, 4], 3: [0, 1, 2, 4]}
    counts = mpcf_filter(scores, 2)[1]
    assert counts == {
        "strategy": 2,
        "rows": 7,
        "kept_preferred": 2,
        "kept_ties": 1,
        "dropped_preferred": 2,
        "dropped_ties": 1,
        "dropped_missing_score": 1,
    }


@pytest.mark.slow  # a fresh interpreter or a training run: 7-35 s on a shared 2-core machine
def test_train_reward_model_lrm_with_mpcf_official_recipe_and_ties(tiny_bases, tmp_path):
    """`train_dinalrm.py --reward_model lrm`: Pick-a-Pic data (with a tie), MPCF, the official defaults, resumable
    checkpoints from the shared machinery, and a final folder that `LRMPipeline.from_pretrained` loads."""
    import json

    import pandas as pd

    import train_dinalrm
    from dinalrm.testing import write_tiny_preference_dataset
    from pipeline_lrm import LRMPipeline

    data = write_tiny_preference_dataset(tmp_path / "pickapic", "pickapic", num_pairs=6, size=(24, 24))
    rows = len(pd.read_parquet(Path(data) / "train.parquet"))  # 6 pairs + a corrupt row + a tie
    flags = [1] * rows
    tie_row = next(i for i, r in pd.read_parquet(Path(data) / "train.parquet").iterrows() if r.label_0 == r.label_1)
    flags[tie_row] = 0
    gaps = [0.3] * rows
    gaps[1] = -2.0  # row 1 contradicts the aesthetic score under every strategy: filtered out
    gaps[tie_row] = 0.05
    pd.DataFrame(
        {"different_flag": flags, "aesthetic_gap": gaps, "clipscore_gap": [0.01] * rows, "vqascore_gap": [0.01] * rows}
    ).to_csv(tmp_path / "mpcf.csv", index=False)
    argv = [
        "--reward_model", "lrm",
        "--pretrained_model_name_or_path", tiny_bases["sd15"],
        "--train_data_dir", data,
        "--validation_split", "0.25",
        "--mpcf_scores", str(tmp_path / "mpcf.csv"),
        "--resolution", "16",
        "--train_batch_size", "2",
        "--max_train_steps", "3",
        "--checkpointing_steps", "2",
        "--validation_steps", "10",
        "--lrm_validation_timesteps", "1,451",
        "--report_to", "tensorboard",
        "--output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    args = train_dinalrm.parse_args(argv)
    assert (args.learning_rate, args.adam_weight_decay, args.lr_warmup_steps, args.lr_scheduler) == (
        1e-5,
        0.3,
        500,
        "linear",
    )
    assert train_dinalrm.parse_args([*argv, "--learning_rate", "1e-3"]).learning_rate == 1e-3
    train_dinalrm.main(args)
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert summary["global_step"] == 3
    mpcf = summary["skipped"]["train"]["mpcf"]
    assert (mpcf["kept_preferred"], mpcf["kept_ties"], mpcf["dropped_preferred"]) == (rows - 2, 1, 1)
    assert summary["skipped"]["train"]["corrupt_image"] == 1  # the corrupt row passes MPCF, then the adapter skips it
    assert {"val/accuracy_timestep1", "val/accuracy_timestep451"} <= set(summary["validation"][-1])
    assert (tmp_path / "run" / "checkpoint-2" / "reward_model" / "config.json").is_file()
    pipe = LRMPipeline.from_pretrained(tmp_path / "run")
    assert pipe.reward_model.config.guidance_scale == 7.5
    rewards = pipe("a red circle", latents=torch.randn(2, 4, 8, 8), generator=torch.Generator().manual_seed(0)).rewards
    assert torch.isfinite(rewards).all()
