"""train_dinalrm.py: the step, batching, feature cache and checkpoints, then whole runs on tiny SD3 components.

The whole runs train on a tiny SD3 folder and tiny datasets in the three schemas. Most call the script's `main` in
this process, as `python train_dinalrm.py` does once it has parsed its flags (a fresh interpreter only adds ~15 s of
CPU importing torch, diffusers and transformers); the runs that are about the processes themselves start them as users
do: two synchronised processes under `accelerate launch`, and runs SIGKILLed at a checkpoint. They share one set of
flags, so the same runs serve as each other's references: raw-image training vs cached-feature training, and an
uninterrupted run vs a run killed twice and resumed.
"""

import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import weakref
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import pytest
import tolerances
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import load as accelerate_load
from conftest import REPO_ROOT
from diffusers import FluxPipeline, ZImagePipeline
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file, save_file

import train_dinalrm
from dinalrm.data import load_preference_dataset, write_canonical_pairs
from dinalrm.testing import (
    get_tiny_flux_components,
    get_tiny_sd3_components,
    get_tiny_zimage_components,
    make_tiny_image_pair,
    save_tiny_sd3_pipeline,
    torch_threads,
    write_tiny_preference_dataset,
)
from dinalrm.training.buckets import BucketBatchSampler, BucketSet
from dinalrm.training.checkpointing import (
    PARTIAL_PREFIX,
    convert_accelerate_pickles,
    list_checkpoints,
    load_ema,
    resolve_checkpoint,
    restore_accelerate_pickles,
    save_ema,
)
from dinalrm.training.feature_cache import (
    CachedPairDataset,
    cache_fingerprint,
    collate_cached_pairs,
    read_valid_cache_info,
    write_feature_cache,
)
from dinalrm.training.pair_datasets import ImagePairDataset, collate_image_pairs
from dinalrm.training.utils import (
    preference_step,
    sample_noise_levels,
    seeded_generator,
)
from modeling_dinalrm import DiNaLRMModel
from pipeline_dinalrm import DiNaLRMPipeline
from train_dinalrm import build_reward_model, parse_args


TRAIN_SCRIPT = str(REPO_ROOT / "train_dinalrm.py")
KILL_LAUNCHER = str(REPO_ROOT / "tests" / "helpers" / "train_with_kill.py")
# One set of flags for every whole run: 2 blocks of the tiny transformer, LoRA, EMA, 32x32 images, batch 1 with
# gradient accumulation 2 (so a checkpoint falls mid-epoch), 6 optimizer steps over 2 epochs, checkpoints every 2.
COMMON_FLAGS = [
    "--num_backbone_layers",
    "2",
    "--visual_layers",
    "1,2",
    "--text_layers",
    "1,2",
    "--head_num_heads",
    "2",
    "--lora_rank",
    "4",
    "--lora_alpha",
    "8",
    "--resolution",
    "32",
    "--max_sequence_length",
    "16",
    "--train_batch_size",
    "1",
    "--gradient_accumulation_steps",
    "2",
    "--max_train_steps",
    "6",
    "--learning_rate",
    "1e-3",
    "--lr_warmup_steps",
    "0",
    "--use_ema",
    "--ema_decay",
    "0.9",
    "--checkpointing_steps",
    "2",
    "--validation_steps",
    "3",
    "--validation_t",
    "0.2,0.4,0.7",
    "--seed",
    "7",
]
FINAL_WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny SD3 pipeline folder and tiny datasets (train + test splits) in the three schemas."""
    root = tmp_path_factory.mktemp("train")
    save_tiny_sd3_pipeline(root / "sd3")
    for data_format in ("canonical", "hpdv3", "pickapic"):
        write_tiny_preference_dataset(root / data_format, data_format, num_pairs=6, seed=1)
        write_tiny_preference_dataset(root / data_format, data_format, num_pairs=4, seed=2, split="test")
    return root


def _environment(**extra: str) -> dict:
    """Offline, on the CPU and one thread: the in-process runs' settings (see `train`)."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO_ROOT),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
        **extra,
    }


def launch(python: str, *flags: str, processes: int = 1, **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch train_dinalrm.py ...` by the interpreter `python`; with two processes, the flags that run
    them synced on the CPU."""
    launcher = [
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if processes > 1:
        launcher = ["--multi_gpu", *launcher]
    command = [python, "-m", "accelerate.commands.launch", *launcher, TRAIN_SCRIPT, *flags]
    return subprocess.run(command, capture_output=True, text=True, env=_environment(**env), cwd=REPO_ROOT, check=False)


def run_killed(python: str, kill_at: str, *flags: str) -> subprocess.CompletedProcess:
    """`python train_dinalrm.py ...` through `tests/helpers/train_with_kill.py`, which SIGKILLs the run when the
    checkpoint `kill_at` names (`<step>` or `<step>:partial`) is complete (or just before), with the interpreter
    `python` (the process kills itself, so a warm stand-in reports that once its fork is gone)."""
    return subprocess.run(
        [python, KILL_LAUNCHER, kill_at, *flags],
        capture_output=True,
        text=True,
        check=False,
        env=_environment(),
        cwd=REPO_ROOT,
    )


def train(*flags: str) -> None:
    """`train_dinalrm.main(parse_args(flags))` in this process, as test_lrm.py runs it: what `python
    train_dinalrm.py` runs after parsing. On the CPU and one torch thread, as the subprocess runs (`_environment`), so
    that a run here and a killed-and-resumed run in a subprocess do the same arithmetic. Accelerate's process-wide
    state is reset around the run (another test's state, its device or precision, is not this run's), and the test
    process's random state is left as it was (the script seeds every generator)."""
    states = random.getstate(), np.random.get_state()
    with torch_threads(1), torch.random.fork_rng(devices=[]), mock.patch.dict(os.environ, ACCELERATE_USE_CPU="true"):
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            train_dinalrm.main(parse_args(list(flags)))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            random.setstate(states[0])
            np.random.set_state(states[1])


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-6000:]
    return result


def _summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "training_summary.json").read_text())


def _assert_scores(output_dir: Path, sd3_dir: Path) -> None:
    """The output folder loads with from_pretrained, merged LoRA differs from the base blocks, and it scores."""
    model = DiNaLRMModel.from_pretrained(output_dir).eval()
    assert model.config.lora_rank == 0 and model.config.num_backbone_layers == 2
    base = load_file(sd3_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    key = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(model.backbone.state_dict()[key], base[key]), "LoRA was not trained or not merged"
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rewards = model.score_latents(
            latents, torch.randn(2, 24, 32), torch.randn(2, 32), t=0.4, generator=torch.Generator().manual_seed(0)
        )
    assert rewards.shape == (2,) and torch.isfinite(rewards).all() and rewards[0] != rewards[1]


# ------------------------------------------------------------------------------------------------ unit level
class _MeanReward(torch.nn.Module):
    """Stand-in reward model: the reward of a latent is its mean; counts forward calls and their batch sizes."""

    def __init__(self, model: DiNaLRMModel):
        super().__init__()
        self.model = model
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.batch_sizes: list[int] = []

    def forward(self, noisy, t, prompt_embeds, pooled_prompt_embeds, check_finite=None, context_embedded=False):
        self.batch_sizes.append(noisy.shape[0])
        self.inputs = noisy
        return type("Out", (), {"rewards": self.scale * noisy.mean(dim=(1, 2, 3))})()

    def snap_noise_level(self, *args):
        return self.model.snap_noise_level(*args)

    def preference_loss(self, *args, **kwargs):
        return self.model.preference_loss(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory) -> DiNaLRMModel:
    folder = tmp_path_factory.mktemp("transformer")
    get_tiny_sd3_components()["transformer"].save_pretrained(folder)
    return DiNaLRMModel.from_backbone(folder, num_layers=2, visual_layers=[1, 2], text_layers=[1, 2], head_num_heads=2)


def _pair_batch(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    n = chosen.shape[0]
    return {
        "chosen": chosen,
        "rejected": rejected,
        "prompt_embeds": torch.zeros(n, 3, 32),
        "pooled_prompt_embeds": torch.zeros(n, 32),
        "weights": torch.ones(n),
    }


def test_step_scores_both_sides_in_one_forward_with_shared_noise(tiny_reward_model):
    stub = _MeanReward(tiny_reward_model)
    chosen = torch.full((8, 16, 4, 4), 1.0)
    rejected = torch.full((8, 16, 4, 4), -1.0)
    output = preference_step(stub, stub, _pair_batch(chosen, rejected), seeded_generator(0, 1))
    assert stub.batch_sizes == [16]
    assert output.accuracy == 1.0 and output.reward_margin > 0
    left, right = stub.inputs.chunk(2)
    assert (left.mean(dim=(1, 2, 3)) > right.mean(dim=(1, 2, 3))).all(), "chosen first, then rejected"
    # One noise and one t per pair: the two sides differ exactly by (1 - t) * (chosen - rejected), a constant.
    difference = (left - right).flatten(1)
    tolerances.assert_close(difference, difference[:, :1].expand_as(difference))

    identical = preference_step(stub, stub, _pair_batch(chosen, chosen.clone()), seeded_generator(0, 1))
    assert identical.reward_margin == 0 and identical.accuracy == 0  # ties are not wins


def test_step_loss_is_the_weighted_chosen_first_thurstone_loss(tiny_reward_model):
    stub = _MeanReward(tiny_reward_model)
    config = tiny_reward_model.config
    generator_state = seeded_generator(3).get_state()
    chosen, rejected = torch.randn(4, 16, 4, 4), torch.randn(4, 16, 4, 4)
    output = preference_step(stub, stub, _pair_batch(chosen, rejected), torch.Generator().set_state(generator_state))
    generator = torch.Generator().set_state(generator_state)
    t = torch.rand(4, generator=generator)
    noise = torch.randn(chosen.shape, generator=generator)
    sigmas, _ = tiny_reward_model.snap_noise_level(t, 4)
    # Expected values by hand: x_t = (1 - sigma) x0 + sigma eps, reward = mean, Thurstone fidelity loss via math.erf.
    losses = []
    for i, sigma in enumerate(sigmas.tolist()):
        r_chosen = ((1 - sigma) * chosen[i] + sigma * noise[i]).double().mean().item()
        r_rejected = ((1 - sigma) * rejected[i] + sigma * noise[i]).double().mean().item()
        variance = config.thurstone_k * sigma**2 + config.thurstone_v0
        z = (r_chosen - r_rejected) / math.sqrt(2 * variance + config.thurstone_eps)
        losses.append(1 - math.sqrt(0.5 * (1 + math.erf(z / math.sqrt(2))) + config.thurstone_eps))
    assert output.loss.item() == pytest.approx(sum(losses) / 4, rel=1e-5)

    weighted = _pair_batch(chosen, rejected)
    weighted["weights"] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    first_only = preference_step(stub, stub, weighted, torch.Generator().set_state(generator_state))
    assert first_only.loss.item() == pytest.approx(losses[0], rel=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(workspace):
    batch = _pair_batch(torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8))
    batch["prompt_embeds"] = torch.randn(2, 5, 32)
    gradients = []
    for extra in ([], ["--gradient_checkpointing"]):
        args = parse_args(
            [
                "--pretrained_model_name_or_path",
                str(workspace / "sd3"),
                "--train_data_dir",
                "unused",
                *COMMON_FLAGS,
                *extra,
            ]
        )
        torch.manual_seed(0)
        model = build_reward_model(args).train()
        assert model.backbone.gradient_checkpointing == bool(extra)
        with torch.no_grad():  # a trained adapter, so that gradients reach lora_A through the checkpointed blocks
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(generator=torch.Generator().manual_seed(1))
        preference_step(model, model, batch, seeded_generator(0)).loss.backward()
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys() and any("lora_A" in name for name in gradients[0])
    for name, gradient in gradients[0].items():
        assert gradient is not None and gradients[1][name] is not None, name
        tolerances.assert_close(gradients[1][name], gradient, msg=name)


def test_noise_level_schemes():
    generator = seeded_generator(0)
    assert torch.equal(sample_noise_levels("constant", 3, generator, constant_t=0.25), torch.full((3,), 0.25))
    uniform = sample_noise_levels("uniform", 4000, generator)
    assert 0 < uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.03
    low = sample_noise_levels("logit_normal", 4000, generator, logit_mean=-1.0, logit_std=1.0)
    assert abs(low.median() - torch.sigmoid(torch.tensor(-1.0))) < 0.03
    with pytest.raises(ValueError, match="weighting_scheme"):
        sample_noise_levels("mode", 2, generator)


def test_bucket_batches_are_single_bucket_complete_and_seeded():
    buckets = [(32, 32)] * 7 + [(48, 32)] * 4 + [(32, 48)]
    sampler = BucketBatchSampler(buckets, batch_size=3, seed=5)
    epoch0 = sampler.batches()
    assert len(epoch0) == len(sampler) == 3 + 2 + 1
    assert sorted(i for batch in epoch0 for i in batch) == list(range(12))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in epoch0)
    assert epoch0 == BucketBatchSampler(buckets, batch_size=3, seed=5).batches()
    sampler.start_epoch(1)
    assert sampler.batches() != epoch0
    assert not hasattr(sampler, "batch_size")  # accelerate must treat the batches as variable-length lists


def test_feature_cache_round_trip_in_dataset_order_and_runtime_skips(tmp_path):
    rng = np.random.default_rng(0)
    images = [make_tiny_image_pair(rng, size) for size in [(32, 32)] * 3 + [(48, 32)] * 2]
    rows = [
        {"prompt": f"prompt {i % 2}", "chosen": c, "rejected": r, "weight": float(i + 1)}
        for i, (c, r) in enumerate(images)
    ]
    write_canonical_pairs(tmp_path / "data", rows)
    pairs, stats = load_preference_dataset(train_data_dir=str(tmp_path / "data"), buckets=BucketSet(32, 8))
    assert stats.kept == 5

    def encode_prompts(prompts):
        codes = torch.tensor([float(p.split()[-1]) for p in prompts])
        return codes.view(-1, 1, 1).expand(-1, 4, 32).clone(), codes.view(-1, 1).expand(-1, 32).clone()

    def encode_images(batch):
        return torch.stack(
            [
                float(np.asarray(im, dtype=np.float32).mean()) * torch.ones(16, im.height // 4, im.width // 4)
                for im in batch
            ]
        )

    skipped = write_feature_cache(
        tmp_path / "cache", "train", pairs, encode_prompts, encode_images, batch_size=2, shard_size=2
    )
    assert not skipped
    cached = CachedPairDataset(tmp_path / "cache", "train")
    raw = ImagePairDataset(pairs)
    assert len(cached) == 5 and cached.buckets == raw.buckets and len(set(raw.buckets)) == 2
    assert len(list((tmp_path / "cache" / "train").glob("pairs-*.safetensors"))) == 4  # 3 chunks, one split by bucket
    for i in range(5):
        item, source = cached[i], raw[i]
        assert item["chosen"].shape == (16, source["chosen"].height // 4, source["chosen"].width // 4)
        # Exact: the cache stores the output of the same encode_images call, bit for bit.
        assert torch.equal(item["chosen"], encode_images([source["chosen"]])[0])
        assert torch.equal(item["rejected"], encode_images([source["rejected"]])[0])
        assert item["prompt_embeds"][0, 0] == i % 2 and item["pooled_prompt_embeds"][0] == i % 2
        assert item["weight"] == i + 1
    batch = collate_cached_pairs([cached[0], cached[1]])
    assert batch["chosen"].shape == (2, 16, 8, 8) and batch["weights"].tolist() == [1.0, 2.0]

    # An image that disappears after the table was checked is skipped and counted, not fatal.
    gone = tmp_path / "gone.png"
    Image.new("RGB", (32, 32)).save(gone)
    broken = datasets.Dataset.from_dict(
        {**pairs[:1], "chosen": [{"bytes": None, "path": str(gone)}]}, features=pairs.features
    )
    gone.unlink()
    collated = collate_image_pairs([ImagePairDataset(broken)[0], raw[1]])
    assert collated["skipped"] == ["runtime_missing_image"] and collated["prompts"] == [rows[1]["prompt"]]


@pytest.mark.slow  # whole training runs: 10-60 s each on a shared 2-core machine
def test_compact_feature_cache_trains_as_the_raw_one_and_frees_the_encoders(workspace, tmp_path, monkeypatch):
    from accelerate import Accelerator

    args = parse_args(
        [
            "--pretrained_model_name_or_path",
            str(workspace / "sd3"),
            "--train_data_dir",
            str(workspace / "canonical"),
            "--output_dir",
            str(tmp_path / "out"),
            "--precompute_features",
            *COMMON_FLAGS,
        ]
    )
    torch.manual_seed(0)
    model = build_reward_model(args)
    with torch.no_grad():  # a trained adapter, so that the LoRA on the text stream matters
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(1))
    assert train_dinalrm.context_embedder_is_frozen(model)  # under the default LoRA targets
    encoders = []
    load = train_dinalrm.load_encoding_pipeline

    def recording_load(*load_args, **kwargs):
        pipeline = load(*load_args, **kwargs)
        encoders.extend(weakref.ref(pipeline.components[name]) for name in ("vae", "text_encoder", "text_encoder_3"))
        return pipeline

    monkeypatch.setattr(train_dinalrm, "load_encoding_pipeline", recording_load)
    datasets_by_kind = {}
    for kind, frozen in (("raw", False), ("compact", True)):
        monkeypatch.setattr(train_dinalrm, "context_embedder_is_frozen", lambda _, frozen=frozen: frozen)
        args.cache_dir = str(tmp_path / kind)
        datasets_by_kind[kind] = train_dinalrm.data_sources(args, Accelerator(cpu=True), model, torch.float32)[0]
    assert len(encoders) == 6 and all(ref() is None for ref in encoders), "the VAE or a text encoder is still alive"
    raw, compact = datasets_by_kind["raw"], datasets_by_kind["compact"]
    assert not raw.context_embedded and compact.context_embedded
    width = model.config.backbone_config["caption_projection_dim"]
    assert compact[0]["prompt_embeds"].shape == (*raw[0]["prompt_embeds"].shape[:1], width)

    results = []
    for dataset in (raw, compact):
        model.zero_grad(set_to_none=True)
        batch = collate_cached_pairs([dataset[i] for i in range(4)])
        output = preference_step(model, model, batch, seeded_generator(0), context_embedded=dataset.context_embedded)
        output.loss.backward()
        results.append((output.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (raw_loss, raw_grads), (compact_loss, compact_grads) = results
    tolerances.assert_close(compact_loss, raw_loss)
    assert raw_grads.keys() == compact_grads.keys() and any("add_q_proj.lora_A" in n for n in raw_grads)
    for name, gradient in raw_grads.items():
        tolerances.assert_close(compact_grads[name], gradient, msg=name)


def test_cache_of_raw_tokens_and_compact_cache_are_never_mistaken_for_each_other(tmp_path):
    settings = dict.fromkeys(train_dinalrm.FINGERPRINT_SETTINGS)
    raw, compact = (cache_fingerprint(settings, BucketSet(32, 8), torch.float32, c) for c in (False, True))
    for written, wanted in ((raw, compact), (compact, raw)):
        (tmp_path / "cache_info.json").write_text(json.dumps({"fingerprint": written, "splits": [], "skipped": {}}))
        with pytest.raises(ValueError, match="built with other settings .*prompt_embeds"):
            read_valid_cache_info(tmp_path, wanted)
        assert read_valid_cache_info(tmp_path, written)["fingerprint"] == written


def test_accelerate_state_files_become_safetensors_and_come_back_unchanged(tmp_path):
    """Optimizer-, scheduler- and RNG-state shapes: int keys, tuples, numpy arrays, None, bools, floats, tensors."""
    import random

    parameter = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    parameter.grad = torch.randn(3)
    optimizer.step()
    states = {
        "optimizer.bin": optimizer.state_dict(),
        "random_states_0.pkl": {
            "step": 3,
            "random_state": random.getstate(),
            "numpy_random_seed": np.random.get_state(),
            "torch_manual_seed": torch.get_rng_state(),
            "nothing": None,
            "ratio": 0.1 + 0.2,
        },
    }
    checkpoint, work = tmp_path / "checkpoint", tmp_path / "work"
    (checkpoint / "reward_model").mkdir(parents=True)
    work.mkdir()
    for name, state in states.items():
        torch.save(state, checkpoint / name)

    assert convert_accelerate_pickles(checkpoint) == sorted(states)
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "optimizer.bin.safetensors",
        "random_states_0.pkl.safetensors",
        "reward_model",
    ]
    restore_accelerate_pickles(checkpoint, work)
    assert (work / "reward_model").resolve() == (checkpoint / "reward_model").resolve()
    for name, expected in states.items():
        restored = accelerate_load(work / name)  # what accelerator.load_state reads (weights_only=True)
        assert repr(restored) == repr(expected), name  # same types, keys, numbers and tensor values
    numpy_state = accelerate_load(work / "random_states_0.pkl")["numpy_random_seed"]
    assert numpy_state[1].dtype == np.random.get_state()[1].dtype

    torch.save({"dtype": torch.float16}, checkpoint / "custom_checkpoint_0.pkl")  # no safetensors form: refused
    with pytest.raises(TypeError, match="dtype"):
        convert_accelerate_pickles(checkpoint)


def test_latest_checkpoint_ignores_partial_and_incomplete_folders(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", f"{PARTIAL_PREFIX}checkpoint-12", "checkpoint-14", "checkpoint-x"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-2", "checkpoint-10", f"{PARTIAL_PREFIX}checkpoint-12"):
        (tmp_path / name / "training_state.json").write_text("{}")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 10]
    assert resolve_checkpoint(tmp_path, "latest") == str(tmp_path / "checkpoint-10")
    assert resolve_checkpoint(tmp_path / "empty", "latest") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(tmp_path, "checkpoint-14")


def test_ema_round_trip_is_exact(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    ema = EMAModel(params, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema.step(params)
    save_ema(ema, ["a", "b"], tmp_path)
    restored = EMAModel([torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))], decay=0.5)
    load_ema(restored, ["a", "b"], tmp_path)
    assert restored.optimization_step == 3 and restored.decay == 0.9
    # Exact: the EMA state is saved and restored, not recomputed.
    assert all(torch.equal(x, y) for x, y in zip(ema.shadow_params, restored.shadow_params))
    with pytest.raises(ValueError, match="do not match"):
        load_ema(restored, ["a", "c"], tmp_path)


def test_flags_parse_as_documented():
    args = parse_args(
        [
            "--pretrained_model_name_or_path",
            "x",
            "--dataset_name",
            "d",
            "--visual_layers",
            "2,4",
            "--text_layers",
            "",
            "--validation_t",
            "0.3,0.6",
        ]
    )
    assert args.visual_layers == [2, 4] and args.text_layers == [] and args.validation_t == [0.3, 0.6]
    assert (args.num_backbone_layers, args.lora_rank, args.lora_alpha, args.ema_decay) == (12, 64, 128.0, 0.995)
    assert (args.learning_rate, args.adam_weight_decay, args.max_grad_norm, args.thurstone_v0) == (
        5e-5,
        0.01,
        1.0,
        0.05,
    )
    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", "x"])  # no data source


# ------------------------------------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def raw_canonical_run(workspace) -> Path:
    """Canonical parquet data, images encoded every step."""
    output = workspace / "raw-canonical"
    train(
        "--pretrained_model_name_or_path",
        str(workspace / "sd3"),
        "--train_data_dir",
        str(workspace / "canonical"),
        "--validation_split",
        "test",
        "--output_dir",
        str(output),
        *COMMON_FLAGS,
    )
    return output


@pytest.fixture(scope="module")
def cached_canonical_run(workspace) -> tuple[Path, Path, Path]:
    """The same run through --precompute_features, on its own copy of the SD3 folder and its own cache."""
    sd3 = workspace / "sd3-copy"
    shutil.copytree(workspace / "sd3", sd3)
    output, cache = workspace / "cached-canonical", workspace / "cache"
    train(
        "--pretrained_model_name_or_path",
        str(sd3),
        "--train_data_dir",
        str(workspace / "canonical"),
        "--validation_split",
        "test",
        "--output_dir",
        str(output),
        "--precompute_features",
        "--cache_dir",
        str(cache),
        *COMMON_FLAGS,
    )
    return sd3, output, cache


@pytest.mark.slow  # whole training runs: 10-60 s each on a shared 2-core machine
def test_end_to_end_canonical(raw_canonical_run, workspace):
    _assert_scores(raw_canonical_run, workspace / "sd3")
    summary = _summary(raw_canonical_run)
    assert summary["global_step"] == 6
    assert summary["skipped"]["train"] == {"kept": 6, "skipped": 1, "corrupt_image": 1}
    assert summary["skipped"]["validation"]["corrupt_image"] == 1
    steps = [entry["step"] for entry in summary["validation"]]
    assert steps == [3, 6] and all(entry["val/pairs"] == 4 for entry in summary["validation"])
    assert {"val/accuracy_t0.4", "val/accuracy_ensemble"} <= set(summary["validation"][-1])
    assert [step for step, _ in list_checkpoints(raw_canonical_run)] == [2, 4, 6]
    checkpoint = raw_canonical_run / "checkpoint-6"
    assert DiNaLRMModel.from_pretrained(checkpoint / "reward_model").config.lora_rank == 4  # adapter kept for resume
    assert "accuracy" in (raw_canonical_run / "README.md").read_text()
    assert list((raw_canonical_run / "logs").rglob("events.out.tfevents.*")), "tensorboard is the default tracker"


@pytest.mark.slow  # whole training runs: 10-60 s each on a shared 2-core machine
def test_end_to_end_flux_backbone(workspace):
    """`--backbone flux`: a tiny FLUX pipeline's VAE and encoders encode the data, its first double-stream blocks
    are the backbone; the loop, validation and saving are the SD3 run's."""
    FluxPipeline(**get_tiny_flux_components(seed=0)).save_pretrained(workspace / "flux")
    output = workspace / "flux-run"
    flags = [
        "--pretrained_model_name_or_path",
        str(workspace / "flux"),
        "--train_data_dir",
        str(workspace / "canonical"),
    ]
    flags += ["--validation_split", "test", "--output_dir", str(output), *COMMON_FLAGS]
    with pytest.raises(ValueError, match="is a flux transformer"):  # the family defaults to sd3 and must match
        build_reward_model(parse_args(flags))
    train("--backbone", "flux", *flags)
    _assert_scores(output, workspace / "flux")
    summary = _summary(output)
    assert summary["global_step"] == 6 and summary["validation"][-1]["val/pairs"] == 4
    assert DiNaLRMModel.from_pretrained(output).config.backbone == "flux"


@pytest.mark.slow  # whole training runs: 10-60 s each on a shared 2-core machine
def test_end_to_end_zimage_backbone(workspace):
    """`--backbone zimage`: a tiny Z-Image pipeline's VAE and Qwen3 encoder encode the data, captions at their own
    lengths (64 tokens leave room for the chat template, so the prompts differ in length) through the feature cache
    and the training step; the cached run trains the same weights as the run on raw images."""
    ZImagePipeline(**get_tiny_zimage_components(seed=0)).save_pretrained(workspace / "zimage")
    flags = ["--backbone", "zimage", "--pretrained_model_name_or_path", str(workspace / "zimage")]
    flags += ["--train_data_dir", str(workspace / "canonical"), "--validation_split", "test", *COMMON_FLAGS]
    flags += ["--max_sequence_length", "64"]
    train(*flags, "--output_dir", str(workspace / "zimage-raw"))
    cache = workspace / "zimage-cache"
    repo = workspace / "zimage-repo"
    train(*flags, "--output_dir", str(workspace / "zimage-cached"), "--precompute_features", "--cache_dir", str(cache),
          "--pipeline_output_dir", str(repo))  # fmt: skip
    lengths = [load_file(path)["prompt_lengths"] for path in (cache / "train").glob("prompts-*.safetensors")]
    assert len(torch.cat(lengths).unique()) > 1, "the cached captions should keep their own lengths"
    raw, cached = (load_file(workspace / run / FINAL_WEIGHTS) for run in ("zimage-raw", "zimage-cached"))
    for key in raw:
        tolerances.assert_close(cached[key], raw[key], rtol=tolerances.TRAINING_RTOL, msg=key)
    summary = _summary(workspace / "zimage-cached")
    assert summary["global_step"] == 6 and summary["validation"][-1]["val/pairs"] == 4
    model = DiNaLRMModel.from_pretrained(workspace / "zimage-cached").eval()
    assert model.config.backbone == "zimage"
    base = load_file(workspace / "zimage" / "transformer" / "diffusion_pytorch_model.safetensors")
    key = "layers.0.attention.to_q.weight"
    assert not torch.equal(model.backbone.state_dict()[key], base[key]), "LoRA was not trained or not merged"
    scorer = DiNaLRMPipeline.from_pretrained(repo)  # the Hub repository: Z-Image's parts and the trained model
    assert type(scorer).__name__ == "DiNaLRMZImagePipeline" and scorer.reward_model.config.backbone == "zimage"
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds, _ = scorer.encode_prompt(["a red cat", "a blue dog on the beach"], max_sequence_length=64)
        expected = model.score_latents(latents, embeds, t=0.4, generator=torch.Generator().manual_seed(0))
    rewards = scorer(["a red cat", "a blue dog on the beach"], latents=latents, t=0.4,
                     generator=torch.Generator().manual_seed(0), noise_sharing="none").rewards  # fmt: skip
    tolerances.assert_close(rewards, expected)


@pytest.mark.slow  # whole training runs: 10-60 s each on a shared 2-core machine
def test_cached_features_match_raw_images(raw_canonical_run, cached_canonical_run):
    _, cached, cache = cached_canonical_run
    assert sorted(p.name for p in cache.iterdir()) == ["cache_info.json", "train", "validation"]
    raw_weights, cached_weights = load_file(raw_canonical_run / FINAL_WEIGHTS), load_file(cached / FINAL_WEIGHTS)
    assert raw_weights.keys() == cached_weights.keys()
    for key in raw_weights:
        tolerances.assert_close(cached_weights[key], raw_weights[key], rtol=tolerances.TRAINING_RTOL, msg=key)
    raw_val, cached_val = _summary(raw_canonical_run)["validation"], _summary(cached)["validation"]
    assert [e["val/pairs"] for e in raw_val] == [e["val/pairs"] for e in cached_val]


def _cached_resume_flags(workspace: Path, sd3: Path, output: Path, cache: Path, *extra: str) -> list[str]:
    """The flags of a run on the canonical data that trains from the feature cache `cache`, resuming if it can."""
    return [
        "--pretrained_model_name_or_path",
        str(sd3),
        "--train_data_dir",
        str(workspace / "canonical"),
        "--validation_split",
        "test",
        "--output_dir",
        str(output),
        "--cache_dir",
        str(cache),
        "--resume_from_checkpoint",
        "latest",
        *extra,
        *COMMON_FLAGS,
    ]


def _assert_same_checkpoint(expected: Path, actual: Path) -> None:
    """The live and EMA weights of two checkpoints are bit-identical."""
    for name in ("reward_model/model.safetensors", "ema/ema_weights.safetensors"):
        expected_weights, actual_weights = load_file(expected / name), load_file(actual / name)
        assert expected_weights.keys() == actual_weights.keys()
        # Exact: a resumed run replays the same steps from bit-identical state (the code's promise).
        assert all(torch.equal(expected_weights[k], actual_weights[k]) for k in expected_weights), f"{actual}/{name}"


@pytest.mark.slow  # whole training runs: 10-60 s each on a shared 2-core machine
def test_resume_after_sigkill_is_exact_and_skips_partial_checkpoints(
    workspace, cached_canonical_run, caplog, warm_python
):
    sd3, reference, cache = cached_canonical_run
    # Training from the cache must not need the VAE weights or the text encoders: remove them.
    (sd3 / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.rmtree(sd3 / name)
    output = workspace / "resumed"
    flags = _cached_resume_flags(workspace, sd3, output, cache)

    first = run_killed(warm_python, "2", *flags)
    assert first.returncode == -9, first.stderr[-3000:]
    assert [step for step, _ in list_checkpoints(output)] == [2]

    second = run_killed(warm_python, "4:partial", *flags)
    assert second.returncode == -9, second.stderr[-3000:]
    assert "Resuming from checkpoint" in second.stderr and "checkpoint-2" in second.stderr
    assert (output / f"{PARTIAL_PREFIX}checkpoint-4" / "reward_model" / "model.safetensors").is_file()
    assert resolve_checkpoint(output, "latest") == str(output / "checkpoint-2")

    with caplog.at_level(logging.INFO, logger="dinalrm.training.checkpointing"):
        train(*flags)
    resumed_from = re.findall(r"Resuming from checkpoint (\S+)", caplog.text)
    assert resumed_from == [str(output / "checkpoint-2")]
    assert not (output / f"{PARTIAL_PREFIX}checkpoint-4").exists()

    _assert_same_checkpoint(reference / "checkpoint-6", output / "checkpoint-6")
    expected, actual = load_file(reference / FINAL_WEIGHTS), load_file(output / FINAL_WEIGHTS)
    # Exact: a resumed run replays the same steps from bit-identical state (the code's promise).
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert _summary(output)["validation"] == _summary(reference)["validation"]


@pytest.mark.slow  # whole training runs: 10-60 s each on a shared 2-core machine
def test_two_processes_hpdv3_with_feature_cache(workspace, warm_python):
    output = workspace / "ddp-hpdv3"
    result = _ok(
        launch(
            warm_python,
            "--pretrained_model_name_or_path",
            str(workspace / "sd3"),
            "--train_data_dir",
            str(workspace / "hpdv3"),
            "--validation_split",
            "test",
            "--output_dir",
            str(output),
            "--precompute_features",
            *COMMON_FLAGS,
            processes=2,
        )
    )
    assert sorted(re.findall(r"process (\d) of world size (\d)", result.stderr)) == [("0", "2"), ("1", "2")]
    digests = dict(re.findall(r"process (\d): final parameter digest (\w+)", result.stderr))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    checkpoint_files = [p.name for p in (output / "checkpoint-6").rglob("*") if p.is_file()]
    assert "random_states_1.pkl.safetensors" in checkpoint_files and "optimizer.bin.safetensors" in checkpoint_files
    assert not [name for name in checkpoint_files if name.endswith((".bin", ".pkl", ".pt"))], checkpoint_files
    summary = _summary(output)
    assert summary["skipped"]["train"] == {"kept": 6, "skipped": 1, "missing_image": 1}
    assert summary["validation"][-1]["val/pairs"] == 4
    _assert_scores(output, workspace / "sd3")


@pytest.mark.slow  # whole training runs: 10-60 s each on a shared 2-core machine
def test_end_to_end_pickapic_with_separate_validation_dataset_and_pipeline_repo(workspace):
    output, repo = workspace / "pickapic", workspace / "pickapic-pipeline"
    train(
        "--pretrained_model_name_or_path",
        str(workspace / "sd3"),
        "--train_data_dir",
        str(workspace / "pickapic"),
        "--validation_dataset_name",
        str(workspace / "hpdv3"),
        "--output_dir",
        str(output),
        "--checkpoints_total_limit",
        "1",
        "--pipeline_output_dir",
        str(repo),
        *COMMON_FLAGS,
    )
    summary = _summary(output)
    assert summary["skipped"]["train"] == {"kept": 6, "skipped": 2, "corrupt_image": 1, "gt_tie": 1}
    assert summary["skipped"]["validation"]["missing_image"] == 1
    assert [step for step, _ in list_checkpoints(output)] == [6]
    _assert_scores(output, workspace / "sd3")

    # The pipeline repository holds the same (EMA) reward model and scores images from pixels.
    pipe = DiNaLRMPipeline.from_pretrained(repo)
    saved = load_file(output / FINAL_WEIGHTS)
    assert all(torch.equal(pipe.reward_model.state_dict()[k], saved[k]) for k in saved)
    assert not (repo / "transformer").exists() and "library_name: diffusers" in (repo / "README.md").read_text()
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    rewards = pipe("a red square", images=images, generator=torch.Generator().manual_seed(0)).rewards
    assert rewards.shape == (2,) and torch.isfinite(rewards).all()


def test_pipeline_output_dir_must_be_empty(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "README.md").write_text("a user's file")
    with pytest.raises(SystemExit):
        parse_args(
            [
                "--pretrained_model_name_or_path",
                "x",
                "--dataset_name",
                "d",
                "--pipeline_output_dir",
                str(tmp_path / "repo"),
            ]
        )
    assert (tmp_path / "repo" / "README.md").read_text() == "a user's file"


def _poison_cached_prompts(cache: Path, copy: Path) -> None:
    """A copy of the feature cache with one infinite value in every cached training prompt embedding."""
    shutil.copytree(cache, copy)
    for shard in (copy / "train").glob("prompts-*.safetensors"):
        tensors = load_file(shard)
        tensors["prompt_embeds"][:, 0, 0] = float("inf")
        save_file(tensors, shard)


@pytest.mark.slow  # whole training runs: 10-60 s each on a shared 2-core machine
def test_non_finite_loss_stops_the_run_and_keeps_the_good_checkpoints(workspace, cached_canonical_run):
    """Resumed at step 4 on a cache holding `inf` with --checkpoints_total_limit 1: the next checkpoint would rotate
    both good ones away. The run must stop at step 5 with a non-zero exit code, naming the step, having saved nothing."""
    sd3, reference, cache = cached_canonical_run
    output, poisoned = workspace / "non-finite", workspace / "poisoned-cache"
    _poison_cached_prompts(cache, poisoned)
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(reference / name, output / name)
    flags = _cached_resume_flags(workspace, sd3, output, poisoned, "--checkpoints_total_limit", "1")
    with pytest.raises(FloatingPointError, match="^Non-finite loss at step 5") as stopped:
        train(*flags)
    assert f"{output / 'checkpoint-4'}, is intact" in str(stopped.value)
    assert [step for step, _ in list_checkpoints(output)] == [2, 4]
    for step in (2, 4):
        _assert_same_checkpoint(reference / f"checkpoint-{step}", output / f"checkpoint-{step}")
    assert not (output / FINAL_WEIGHTS).exists() and not list(output.glob(f"{PARTIAL_PREFIX}*"))
