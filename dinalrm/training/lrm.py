"""The LRM baseline in `train_dinalrm.py --reward_model lrm`: the official recipe, its data and its step.

Everything else (data adapters, buckets, checkpoints, exact resume, EMA, the loop) is the trainer's own. What
differs from DiNa-LRM, following the official `lrm/lrm_15` code (Kwai-Kolors/LPO):

* the model: [`LRMModel.from_pipeline`] on an SD1.5 / SDXL pipeline; the whole UNet and text encoder(s) train
  (official), or a LoRA on the UNet with `--lora_rank`;
* the data: images are encoded with a VAE *posterior sample* at every step and prompts are tokenized (the text
  encoder trains, so nothing is cached); Pick-a-Pic ties are kept as ties (labels 0.5 / 0.5); each pair's prompt
  count gives its weight `(1/n) / sum(1/n)`; Multi-Preference Consistent Filtering (`--mpcf_scores`) keeps the
  pairs whose aesthetic / CLIP / VQA score gaps agree with the human label;
* the step: one integer timestep per pair from the official grid `range(1, 952, 50)`, both images at that
  timestep with independent noise, the official pair loss (`LRMModel.preference_loss`).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from dinalrm.data import TIE_COLUMN
from modeling_lrm import OFFICIAL_VALIDATION_TIMESTEP, LRMModel

from .pair_datasets import ImagePairDataset, collate_image_pairs
from .utils import StepOutput


__all__ = [
    "MPCF_STRATEGIES",
    "OFFICIAL_RECIPE",
    "LRMPairDataset",
    "apply_official_recipe",
    "build_lrm",
    "collate_lrm_pairs",
    "encode_lrm_pairs",
    "lrm_preference_step",
    "mpcf_filter",
    "read_mpcf_scores",
]

# The official LRM-1.5 recipe (lrm/lrm_15/trainer/conf/step_sd15.yaml; AdamW through DeepSpeed with betas
# (0.9, 0.999), eps 1e-8, the PickScore trainer's weight decay 0.3; WarmupDecayLR = linear warm-up then linear
# decay; gradient clipping 1.0). LRM-XL uses batch 4, 1000 warm-up and 8000 steps.
OFFICIAL_RECIPE: dict[str, Any] = {
    "learning_rate": 1e-5,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "adam_weight_decay": 0.3,
    "lr_scheduler": "linear",
    "lr_warmup_steps": 500,
    "train_batch_size": 16,
    "max_grad_norm": 1.0,
}

# Multi-Preference Consistent Filtering (step_sd_hf_dataset.py): a preferred pair (different_flag 1) is kept when
# its CLIP and VQA score gaps (chosen - rejected) are positive and its aesthetic gap exceeds the strategy's bound;
# a tie (different_flag 0) is kept when all three gaps are small. The official config uses strategy 2.
MPCF_STRATEGIES = {1: 0.0, 2: -0.5, 3: -1.0}
MPCF_TIE_THRESHOLDS = {"aesthetic_gap": 0.2, "clipscore_gap": 0.03, "vqascore_gap": 0.07}
MPCF_COLUMNS = ("different_flag", "aesthetic_gap", "clipscore_gap", "vqascore_gap")


def add_lrm_args(parser: argparse.ArgumentParser) -> None:
    """The `--reward_model lrm` options of `train_dinalrm.py`."""
    group = parser.add_argument_group("LRM baseline (--reward_model lrm)")
    group.add_argument(
        "--reward_model",
        type=str,
        default="dinalrm",
        choices=("dinalrm", "lrm"),
        help="dinalrm (SD3 MMDiT + query head) or lrm (LPO's SD1.5/SDXL latent reward model, official recipe).",
    )
    group.add_argument("--lrm_guidance_scale", type=float, default=7.5, help="LRM: VFE guidance scale (official 7.5).")
    group.add_argument(
        "--lrm_largest_timestep", type=int, default=951, help="LRM: training timesteps range(1, this + 1, 50)."
    )
    group.add_argument(
        "--lrm_validation_timesteps",
        type=lambda value: [int(v) for v in value.split(",") if v],
        default=[OFFICIAL_VALIDATION_TIMESTEP],
        help="LRM: comma-separated validation timesteps (official: 1).",
    )
    group.add_argument(
        "--lrm_text_projection",
        type=str,
        default=None,
        help="LRM (SD1.5): a CLIP checkpoint (.safetensors or .bin, read with weights_only) whose "
        "`text_projection.weight` initialises the text projection, as the official model copies CLIP ViT-L/14's.",
    )
    group.add_argument("--lrm_freeze_text_encoder", action="store_true", help="LRM: keep the text encoder(s) frozen.")
    group.add_argument(
        "--mpcf_scores",
        type=str,
        default=None,
        help="LRM: Multi-Preference Consistent Filtering scores, a CSV/JSON/parquet table row-aligned with the "
        "training split, with columns different_flag, aesthetic_gap, clipscore_gap, vqascore_gap (official format).",
    )
    group.add_argument(
        "--mpcf_strategy", type=int, default=2, choices=sorted(MPCF_STRATEGIES), help="LRM: MPCF strategy."
    )


def apply_official_recipe(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """For `--reward_model lrm`, the official recipe replaces every training default the user did not set."""
    given = {arg.split("=", 1)[0].removeprefix("--") for arg in argv if arg.startswith("--")}
    for name, value in OFFICIAL_RECIPE.items():
        if name not in given:
            setattr(args, name, value)


def check_lrm_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse DiNa-LRM-only options with an LRM (they would be silently ignored)."""
    if args.reward_model != "lrm":
        if args.mpcf_scores:
            parser.error("--mpcf_scores applies to --reward_model lrm.")
        return
    if args.precompute_features or args.cache_dir:
        parser.error("--reward_model lrm trains its text encoder, so features cannot be cached: drop --cache_dir.")
    if args.freeze_backbone:
        parser.error("--freeze_backbone is DiNa-LRM's; an LRM trains its UNet (or a LoRA with --lora_rank).")
    if args.pipeline_output_dir:
        parser.error("--pipeline_output_dir is DiNa-LRM's; save an LRM pipeline with LRMPipeline.save_pretrained.")


# ------------------------------------------------------------------------------------------------------- model
def _read_text_projection(path: str) -> torch.Tensor:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "text_projection.weight" not in state:
        raise ValueError(f"{path} holds no `text_projection.weight` (expected a CLIP checkpoint).")
    return state["text_projection.weight"]


def build_lrm(args: argparse.Namespace) -> LRMModel:
    """A fresh LRM on the SD1.5 / SDXL pipeline `--pretrained_model_name_or_path`, trainable parts marked."""
    text_projection = _read_text_projection(args.lrm_text_projection) if args.lrm_text_projection else None
    model = LRMModel.from_pipeline(
        args.pretrained_model_name_or_path,
        revision=args.revision,
        text_projection_weight=text_projection,
        guidance_scale=args.lrm_guidance_scale,
    )
    if args.lora_rank:
        model.add_lora(args.lora_rank, args.lora_alpha)
    if args.lrm_freeze_text_encoder:
        for encoder in (model.text_encoder, model.text_encoder_2):
            if encoder is not None:
                encoder.requires_grad_(False)
    if args.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    return model


def timestep_grid(largest_timestep: int) -> torch.Tensor:
    """The official training grid `range(1, largest_timestep + 1, 50)` (1, 51, ..., 951 by default)."""
    grid = torch.tensor(list(range(1, largest_timestep + 1, 50)), dtype=torch.long)
    if not len(grid):
        raise ValueError(f"--lrm_largest_timestep={largest_timestep} leaves no training timestep.")
    return grid


# -------------------------------------------------------------------------------------------------------- MPCF
def read_mpcf_scores(path: str) -> dict[str, list[float]]:
    """The MPCF table (CSV, JSON / JSON lines or parquet) as columns; refuses a table without the four columns."""
    import pandas as pd

    if path.endswith(".csv"):
        frame = pd.read_csv(path)
    elif path.endswith(".parquet"):
        frame = pd.read_parquet(path)
    elif path.endswith((".json", ".jsonl")):
        frame = pd.read_json(path, lines=path.endswith(".jsonl"))
    else:
        raise ValueError(f"--mpcf_scores {path}: use a .csv, .json, .jsonl or .parquet file.")
    missing = [c for c in MPCF_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"--mpcf_scores {path} lacks columns {missing}; it needs {list(MPCF_COLUMNS)}.")
    return {c: frame[c].astype(float).tolist() for c in MPCF_COLUMNS}


def mpcf_filter(scores: dict[str, Sequence[float]], strategy: int) -> tuple[list[int], dict[str, int]]:
    """Indices of the rows Multi-Preference Consistent Filtering keeps, and the counts for the training summary.

    Rows with a missing (NaN) score are dropped and counted.
    """
    if strategy not in MPCF_STRATEGIES:
        raise ValueError(f"mpcf strategy {strategy} is not one of {sorted(MPCF_STRATEGIES)}.")
    bound = MPCF_STRATEGIES[strategy]
    keep, counts = [], Counter()
    for row, (flag, aesthetic, clip, vqa) in enumerate(zip(*(scores[c] for c in MPCF_COLUMNS))):
        if any(value != value for value in (flag, aesthetic, clip, vqa)):
            counts["dropped_missing_score"] += 1
        elif flag == 1 and aesthetic > bound and clip > 0 and vqa > 0:
            keep.append(row)
            counts["kept_preferred"] += 1
        elif flag == 0 and all(
            gap < MPCF_TIE_THRESHOLDS[name] for name, gap in zip(MPCF_COLUMNS[1:], (aesthetic, clip, vqa))
        ):
            keep.append(row)
            counts["kept_ties"] += 1
        else:
            counts["dropped_ties" if flag == 0 else "dropped_preferred"] += 1
    return keep, {"strategy": strategy, "rows": len(scores["different_flag"]), **counts}


# -------------------------------------------------------------------------------------------------------- data
class LRMPairDataset(ImagePairDataset):
    """[`ImagePairDataset`] plus what the official loss needs: whether a pair is a tie and its prompt's pair count."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.prompt_counts = Counter(pairs["prompt"])
        self.ties = pairs[TIE_COLUMN] if TIE_COLUMN in pairs.column_names else [False] * len(pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        if "skip" not in item:
            item["tie"] = bool(self.ties[index])
            item["num_examples"] = self.prompt_counts[item["prompt"]]
        return item


def collate_lrm_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`collate_image_pairs` plus `ties` and `num_examples` tensors."""
    batch = collate_image_pairs(items)
    kept = [item for item in items if "skip" not in item]
    batch["ties"] = torch.tensor([item["tie"] for item in kept], dtype=torch.bool)
    batch["num_examples"] = torch.tensor([item["num_examples"] for item in kept], dtype=torch.float32)
    return batch


@torch.no_grad()
def encode_lrm_pairs(batch: dict[str, Any], pipeline, generator: torch.Generator) -> dict[str, Any]:
    """Latents (one VAE posterior sample per image, as the official model) and token ids of a batch."""
    device = pipeline._execution_device
    images = batch["chosen_images"] + batch["rejected_images"]
    latents = pipeline.encode_images(images, generator=generator)
    count = len(batch["prompts"])
    ids = pipeline._tokenize(pipeline.tokenizer, batch["prompts"])
    ids_2 = pipeline._tokenize(pipeline.tokenizer_2, batch["prompts"]) if pipeline.tokenizer_2 is not None else None
    return {
        "chosen": latents[:count],
        "rejected": latents[count:],
        "input_ids": ids.to(device),
        "input_ids_2": ids_2.to(device) if ids_2 is not None else None,
        "ties": batch["ties"].to(device),
        "num_examples": batch["num_examples"].to(device),
        "weights": batch["weights"].to(device),
    }


def lrm_preference_step(
    model: torch.nn.Module,
    reward_model: LRMModel,
    batch: dict[str, Any],
    generator: torch.Generator,
    grid: torch.Tensor,
) -> StepOutput:
    """The official LRM objective on one batch: per pair one timestep drawn uniformly from `grid` for both images,
    independent noise per image, one forward of `[chosen; rejected]` and the pair loss with ties (0.5 / 0.5) and
    per-prompt weights (times the canonical `weights`, 1 for official data). Draws from `generator`: timesteps,
    then noise.
    """
    chosen, rejected = batch["chosen"], batch["rejected"]
    pairs, device = chosen.shape[0], chosen.device
    timesteps = grid[torch.randint(len(grid), (pairs,), generator=generator)].to(device)
    latents = torch.cat([chosen, rejected])
    noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    both = torch.cat([timesteps, timesteps])
    rewards = model(reward_model.add_noise(latents, noise, both), both, batch["input_ids"], batch["input_ids_2"])
    rewards_chosen, rewards_rejected = rewards.rewards.float().chunk(2)
    label_chosen = torch.where(batch["ties"], 0.5, 1.0)
    losses = reward_model.preference_loss(
        rewards_chosen,
        rewards_rejected,
        label_chosen,
        1.0 - label_chosen,
        num_examples_per_prompt=batch["num_examples"],
        reduction="none",
    )
    loss = (losses * batch["weights"].to(losses.dtype)).sum()
    with torch.no_grad():
        margin = rewards_chosen - rewards_rejected
        strict = ~batch["ties"]
        accuracy = (margin[strict] > 0).float().mean() if strict.any() else torch.tensor(float("nan"))
        return StepOutput(loss=loss, accuracy=accuracy, reward_margin=margin.mean(), mean_t=timesteps.float().mean())


def load_encoding_pipeline(args: argparse.Namespace, reward_model: LRMModel, device: torch.device, dtype: torch.dtype):
    """An `LRMPipeline` around the trained model with the base pipeline's VAE (frozen) and tokenizer(s)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from pipeline_lrm import LRMPipeline

    base, revision = args.pretrained_model_name_or_path, args.revision
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", revision=revision, torch_dtype=dtype)
    tokenizer_2 = None
    if reward_model.config.backbone_type == "sdxl":
        tokenizer_2 = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2", revision=revision)
    pipeline = LRMPipeline(
        reward_model=reward_model,
        vae=vae.requires_grad_(False).eval().to(device),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", revision=revision),
        tokenizer_2=tokenizer_2,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def lrm_validation_accuracy(
    accelerator, reward_model: LRMModel, dataset, pipeline, args, generator_for
) -> dict[str, float]:
    """Pairwise accuracy of the non-tie validation pairs at each `--lrm_validation_timesteps` (official: 1), as the
    official validation (softmax of the two scores). `generator_for(batch_number)` gives each batch's generator
    (posterior samples, then one noise per timestep), so the figures do not depend on the number of processes.
    """
    from .buckets import BucketBatchSampler

    reward_model.eval()
    timesteps = args.lrm_validation_timesteps
    correct = torch.zeros(len(timesteps), dtype=torch.float64, device=accelerator.device)
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    batches = BucketBatchSampler(dataset.buckets, args.train_batch_size, shuffle=False).batches()
    mine = list(range(accelerator.process_index, len(batches), accelerator.num_processes))
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=[batches[i] for i in mine], collate_fn=collate_lrm_pairs, num_workers=0
    )
    for number, batch in zip(mine, loader):
        if not batch["prompts"]:
            continue
        generator = generator_for(number)
        encoded = encode_lrm_pairs(batch, pipeline, generator)
        strict = ~encoded["ties"]
        latents = torch.cat([encoded["chosen"], encoded["rejected"]])
        for j, timestep in enumerate(timesteps):
            with accelerator.autocast():
                rewards = reward_model.score_latents(
                    latents, encoded["input_ids"], encoded["input_ids_2"], t=timestep, generator=generator
                ).float()
            chosen, rejected = rewards.chunk(2)
            correct[j] += (chosen[strict] > rejected[strict]).sum()
        total += strict.sum()
    correct, total = (accelerator.reduce(x, "sum") for x in (correct, total))
    reward_model.train()
    metrics = {f"val/accuracy_timestep{t}": float(c / total.clamp_min(1)) for t, c in zip(timesteps, correct)}
    metrics["val/pairs"] = int(total)
    return metrics
