#!/usr/bin/env python
# Copyright 2026 The dinalrm authors. Licensed under the Apache License, Version 2.0.
"""Train a DiNa-LRM reward model on preference pairs with 🤗 accelerate.

    accelerate launch train_dinalrm.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \\
        --dataset_name MizzenAI/HPDv3 --image_root /data/hpdv3 --output_dir dinalrm-sd35m

The reward model reads noisy SD3 latents with the first `--num_backbone_layers` blocks of the SD3 transformer
(LoRA-adapted, or frozen with `--freeze_backbone`) plus a query head, and is trained with the noise-calibrated
Thurstone loss: per pair one noise level t and ONE noise shared by the chosen and the rejected image, both scored
in one batched forward. Prompts and images are encoded with `DiNaLRMPipeline.encode_prompt` / `encode_images`
(the pipeline's own code), either every step or once up front with `--precompute_features` (a feature cache in
`--cache_dir`; training from it never loads the VAE or the text encoders).

Checkpoints (`--checkpointing_steps`) are written to a temporary folder and renamed to `checkpoint-<step>` only
when complete, so `--resume_from_checkpoint latest` never picks a half-written one; resuming restores the model,
optimizer, LR scheduler, EMA weights, RNG states and the position in the data, and continues exactly as an
uninterrupted run would. Checkpoints hold no pickles: what accelerate writes with `torch.save` (optimizer, scheduler,
RNG states) is converted to safetensors before the rename, and handed back to accelerate on resume (all in
`dinalrm.training.checkpointing`). The final folder `--output_dir` holds the EMA weights (with `--use_ema`) in
`DiNaLRMModel.save_pretrained` form (LoRA merged); `--pipeline_output_dir` adds the whole Hub repository that
`DiNaLRMPipeline.from_pretrained` loads.
"""

import argparse
import atexit
import gc
import json
import logging
import math
import os
import sys
from collections import Counter
from pathlib import Path

import datasets
import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    gather_object,
    set_seed,
)
from diffusers import FluxPipeline, StableDiffusion3Pipeline, ZImagePipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import ModelCard, create_repo, upload_folder
from tqdm.auto import tqdm

from dinalrm.data import DATA_FORMATS, ColumnNames, load_preference_dataset
from dinalrm.hub import FAMILY_CARDS, INSTALL, build_hub_repo, card_data, pairwise_accuracy_result
from dinalrm.training.buckets import BucketBatchSampler, BucketSet, buckets_for_model
from dinalrm.training.checkpointing import (
    CHECKPOINT_PREFIX,
    LOCK_FILE,
    PARTIAL_PREFIX,
    OutputDirLock,
    check_output_dir_arguments,
    list_checkpoints,
    nonfinite_tensors,
    prepare_output_dir,
    register_checkpoint_hooks,
    resume_from,
    save_checkpoint,
)
from dinalrm.training.feature_cache import (
    FINGERPRINT_SETTINGS,
    CachedPairDataset,
    build_feature_cache,
    cache_fingerprint,
    collate_cached_pairs,
    read_valid_cache_info,
)
from dinalrm.training.lrm import (
    LRMPairDataset,
    add_lrm_args,
    apply_official_recipe,
    build_lrm,
    check_lrm_args,
    collate_lrm_pairs,
    encode_lrm_pairs,
    lrm_preference_step,
    lrm_validation_accuracy,
    mpcf_filter,
    read_mpcf_scores,
    timestep_grid,
)
from dinalrm.training.lrm import load_encoding_pipeline as load_lrm_encoding_pipeline
from dinalrm.training.pair_datasets import (
    ImagePairDataset,
    collate_image_pairs,
    encode_image_pairs,
)
from dinalrm.training.utils import (
    WEIGHTING_SCHEMES,
    parameter_digest,
    preference_step,
    repeat_prompts,
    seeded_generator,
)
from modeling_dinalrm import LOSS_TYPES, DiNaLRMModel, provenance_name, require_local_folder
from pipeline_dinalrm import DiNaLRMFluxPipeline, DiNaLRMPipeline, DiNaLRMZImagePipeline


logger = get_logger(__name__)

SUMMARY_FILE = "training_summary.json"
VALIDATION_STREAM = -1  # key of the validation noise in `seeded_generator`, apart from the training streams
HOLD_OUT_SEED = 0  # a fractional --validation_split is drawn with a fixed seed, so cached features stay valid
NONFINITE_STEP = "nonfinite_step"  # runtime skip reason of a step skipped under --skip_nonfinite_steps
#: Settings a checkpoint's reward model must share with the run that resumes from it (they fix the weights' shapes
#: and what the adapter computes).
RESUME_SETTINGS = (
    "backbone", "backbone_config", "num_backbone_layers", "visual_layers", "text_layers", "head_width", "head_num_queries",
    "head_num_heads", "head_use_proj_in", "lora_rank", "lora_alpha", "lora_target_modules",
)  # fmt: skip


def _int_list(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


def _float_list(value: str) -> list[float]:
    return [float(v) for v in value.split(",") if v.strip()]


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a DiNa-LRM latent reward model on preference pairs.")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="SD3, FLUX or Z-Image pipeline (Hub id or folder): the backbone is its `transformer`, and its VAE and text "
        "encoders encode the data.",
    )
    model.add_argument(
        "--backbone",
        choices=("sd3", "flux", "zimage"),
        default="sd3",
        help="Backbone family of --pretrained_model_name_or_path (checked against its transformer's class): sd3 "
        "(SD3.5, the paper's main setting), flux (FLUX.1-dev: first double-stream blocks) or zimage (Z-Image-Turbo: "
        "first main layers; its refiners always run and do not count).",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    model.add_argument("--variant", type=str, default=None, help="Weights variant of the pretrained model, e.g. fp16.")
    model.add_argument(
        "--num_backbone_layers", type=int, default=12, help="How many leading transformer blocks to keep."
    )
    model.add_argument(
        "--visual_layers",
        type=_int_list,
        default=[4, 8, 12],
        help="Comma-separated 1-based blocks whose image stream feeds the head.",
    )
    model.add_argument(
        "--text_layers",
        type=_int_list,
        default=[4, 8, 12],
        help="Comma-separated 1-based blocks whose text stream feeds the head (may be empty: '').",
    )
    model.add_argument("--head_width", type=int, default=None, help="Head width W (default: the backbone width).")
    model.add_argument("--head_num_queries", type=int, default=4, help="Learned query tokens of the head.")
    model.add_argument("--head_num_heads", type=int, default=8, help="Attention heads of the head.")
    model.add_argument("--head_dropout", type=float, default=0.0, help="Dropout inside the head.")
    model.add_argument("--head_use_proj_in", action="store_true", help="Project every layer to W before FiLM.")
    model.add_argument(
        "--max_backbone_batch_size",
        type=int,
        default=None,
        help="Run the backbone in chunks of at most this many samples (memory bound).",
    )
    model.add_argument(
        "--lora_rank",
        type=int,
        default=64,
        help="LoRA rank on the backbone; 0 fine-tunes the whole backbone (unless --freeze_backbone).",
    )
    model.add_argument("--lora_alpha", type=float, default=128.0, help="LoRA alpha (scale alpha / rank).")
    model.add_argument(
        "--freeze_backbone", action="store_true", help="Train the head only (no LoRA, frozen backbone)."
    )
    model.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute backbone activations in the backward pass to save memory.",
    )
    model.add_argument(
        "--compile",
        action="store_true",
        help="Compile the backbone blocks with torch.compile (regional; the first steps compile, see "
        "benchmarks/bench_compile.py for whether it pays on your machine).",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Preference dataset on the Hub (e.g. MizzenAI/HPDv3, a Pick-a-Pic v2 mirror).",
    )
    data.add_argument("--dataset_config_name", type=str, default=None, help="Config of --dataset_name.")
    data.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Local dataset folder instead: HPDv3's layout (train.json + images) or any folder "
        "`datasets.load_dataset` reads (parquet, ...).",
    )
    data.add_argument(
        "--image_root",
        type=str,
        default=None,
        help="Folder that relative image paths are resolved against (HPDv3 from the Hub: the extracted "
        "images); defaults to --train_data_dir.",
    )
    data.add_argument(
        "--data_format",
        type=str,
        default="auto",
        choices=("auto", *DATA_FORMATS),
        help="Schema of the dataset; `auto` detects it from the columns.",
    )
    data.add_argument("--prompt_column", type=str, default="prompt", help="Canonical format: the prompt column.")
    data.add_argument("--chosen_column", type=str, default="chosen", help="Canonical format: the preferred image.")
    data.add_argument("--rejected_column", type=str, default="rejected", help="Canonical format: the other image.")
    data.add_argument(
        "--weight_column",
        type=str,
        default="weight",
        help="Canonical format: optional per-pair loss weight (missing = 1).",
    )
    data.add_argument(
        "--min_confidence",
        type=float,
        default=None,
        help="HPDv3: drop pairs whose `confidence` is below this (HPSv3 uses 0.95); null is kept.",
    )
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N rows (debugging).")
    data.add_argument(
        "--resolution",
        type=int,
        default=1024,
        help="Side of the square bucket; the aspect-ratio buckets of the paper are scaled to it.",
    )
    data.add_argument(
        "--bucket_multiple",
        type=int,
        default=None,
        help="Bucket sides are multiples of this (default: VAE downsampling x patch size, 16 for SD3).",
    )
    data.add_argument("--max_sequence_length", type=int, default=128, help="T5 prompt tokens.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loader worker processes.")
    data.add_argument(
        "--cache_dir",
        type=str,
        default=None,
        help="Folder of the feature cache: with --precompute_features it is written there (default: "
        "<output_dir>/feature_cache); a complete cache found there is used for training, without "
        "loading the VAE or the text encoders.",
    )
    data.add_argument(
        "--precompute_features",
        action="store_true",
        help="Encode prompts (three text encoders) and images (VAE) once into --cache_dir, then train from the cache.",
    )

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", type=str, default="dinalrm-model", help="Checkpoints and the final model.")
    training.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of initialisation, data order and noise; runs with the same seed and flags match.",
    )
    training.add_argument("--train_batch_size", type=int, default=8, help="Pairs per device per step.")
    training.add_argument("--num_train_epochs", type=int, default=1)
    training.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs when set.")
    training.add_argument("--gradient_accumulation_steps", type=int, default=1)
    training.add_argument("--learning_rate", type=float, default=5e-5)
    training.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant_with_warmup",
        help='One of "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup".',
    )
    training.add_argument("--lr_warmup_steps", type=int, default=1000)
    training.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts of cosine_with_restarts.")
    training.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    training.add_argument("--adam_beta1", type=float, default=0.9)
    training.add_argument("--adam_beta2", type=float, default=0.999)
    training.add_argument("--adam_weight_decay", type=float, default=0.01)
    training.add_argument("--adam_epsilon", type=float, default=1e-8)
    training.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (0 disables it).")
    training.add_argument(
        "--skip_nonfinite_steps",
        action="store_true",
        help="Skip (and count) an optimizer step whose loss or gradient is NaN or infinite, instead of stopping "
        "the run there (the default).",
    )
    training.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=("no", "fp16", "bf16"),
        help="Overrides the accelerate config; encoders run in this precision, trained weights stay fp32.",
    )
    training.add_argument("--loss", type=str, default="thurstone", choices=LOSS_TYPES)
    training.add_argument("--thurstone_k", type=float, default=2.0, help="var(t) = k t^2 + v0.")
    training.add_argument(
        "--thurstone_v0", type=float, default=0.05, help="The official code's 0.05 (the paper states 0.01)."
    )
    training.add_argument("--fixed_variance", type=float, default=0.5, help="Variance of --loss fixed_variance.")
    training.add_argument(
        "--weighting_scheme",
        type=str,
        default="uniform",
        choices=WEIGHTING_SCHEMES,
        help="Distribution of the training noise level t.",
    )
    training.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal: mean of logit(t).")
    training.add_argument("--logit_std", type=float, default=1.0, help="logit_normal: std of logit(t).")
    training.add_argument("--constant_t", type=float, default=0.4, help="constant: the single training noise level.")
    training.add_argument(
        "--use_ema",
        action="store_true",
        help="Keep an EMA of the trained weights (used for validation and the final model).",
    )
    training.add_argument("--ema_decay", type=float, default=0.995)

    validation = parser.add_argument_group("validation")
    validation.add_argument(
        "--validation_split",
        type=str,
        default=None,
        help="A split name (of --validation_dataset_name, else of the training source) or a "
        "fraction in (0, 1) of the training pairs held out.",
    )
    validation.add_argument(
        "--validation_dataset_name",
        type=str,
        default=None,
        help="Validation pairs from another dataset (Hub id or local folder; split "
        "--validation_split, default `test`).",
    )
    validation.add_argument("--max_validation_samples", type=int, default=None)
    validation.add_argument(
        "--validation_steps", type=int, default=500, help="Validate every N steps (and at the end)."
    )
    validation.add_argument(
        "--validation_t",
        type=_float_list,
        default=[0.2, 0.4, 0.7],
        help="Comma-separated noise levels; accuracy is reported at each and for their ensemble.",
    )

    saving = parser.add_argument_group("checkpointing and logging")
    saving.add_argument("--checkpointing_steps", type=int, default=500)
    saving.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints."
    )
    saving.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='A checkpoint folder (or its name in --output_dir), or "latest".',
    )
    saving.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start a new run in an --output_dir that holds another run, removing its checkpoints.",
    )
    saving.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, relative to --output_dir.")
    saving.add_argument("--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb" or "all".')
    saving.add_argument("--tracker_project_name", type=str, default="dinalrm")
    saving.add_argument(
        "--pipeline_output_dir",
        type=str,
        default=None,
        help="Also write the full DiNa-LRM pipeline repository (the final reward model plus the base "
        "pipeline's VAE, text encoders and scheduler) here; it must be empty or missing. "
        "With --push_to_hub this folder is the one uploaded.",
    )
    saving.add_argument("--push_to_hub", action="store_true")
    saving.add_argument(
        "--hub_model_id", type=str, default=None, help="Repository id (default: the output folder name)."
    )
    saving.add_argument("--hub_token", type=str, default=None)

    add_lrm_args(parser)
    args = parser.parse_args(input_args)
    check_lrm_args(parser, args)
    if args.reward_model == "lrm":
        apply_official_recipe(args, sys.argv[1:] if input_args is None else input_args)
    if (args.dataset_name is None) == (args.train_data_dir is None):
        parser.error("Give exactly one of --dataset_name and --train_data_dir.")
    if not args.visual_layers:
        parser.error("--visual_layers must name at least one block.")
    if not args.validation_t or not all(0.0 <= t <= 1.0 for t in args.validation_t):
        parser.error("--validation_t must list noise levels in [0, 1].")
    if not 0.0 <= args.constant_t <= 1.0:
        parser.error("--constant_t must lie in [0, 1].")
    if args.pipeline_output_dir and os.path.isdir(args.pipeline_output_dir) and os.listdir(args.pipeline_output_dir):
        parser.error(f"--pipeline_output_dir {args.pipeline_output_dir} is not empty; choose another folder.")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        parser.error("--hub_token would be logged by wandb; log in with `hf auth login` instead.")
    try:
        require_local_folder(args.pretrained_model_name_or_path, "base model")
        check_output_dir_arguments(args)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    return args


# --------------------------------------------------------------------------------------------------- set-up
def build_reward_model(args: argparse.Namespace) -> DiNaLRMModel:
    """A fresh reward model on the first blocks of the backbone transformer, with its trainable parameters marked."""
    model = DiNaLRMModel.from_backbone(
        args.pretrained_model_name_or_path,
        backbone=args.backbone,
        subfolder="transformer",
        num_layers=args.num_backbone_layers,
        revision=args.revision,
        variant=args.variant,
        lora_rank=0 if args.freeze_backbone else args.lora_rank,
        lora_alpha=args.lora_alpha,
        visual_layers=args.visual_layers,
        text_layers=args.text_layers,
        head_width=args.head_width,
        head_num_queries=args.head_num_queries,
        head_num_heads=args.head_num_heads,
        head_dropout=args.head_dropout,
        head_use_proj_in=args.head_use_proj_in,
        loss_type=args.loss,
        thurstone_k=args.thurstone_k,
        thurstone_v0=args.thurstone_v0,
        fixed_variance=args.fixed_variance,
        max_backbone_batch_size=args.max_backbone_batch_size,
        max_sequence_length=args.max_sequence_length,
    )
    if args.freeze_backbone:
        model.backbone.requires_grad_(False)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:
        model.compile_repeated_blocks()
    return model


def _is_fraction(value: str | None) -> bool:
    try:
        return value is not None and 0.0 < float(value) < 1.0
    except ValueError:
        return False


def load_pairs(args, accelerator, buckets: BucketSet) -> tuple[datasets.Dataset, datasets.Dataset | None, dict]:
    """Training and validation pairs in the canonical format, and the rows skipped while reading them."""
    common = {
        "data_format": args.data_format,
        "columns": ColumnNames(args.prompt_column, args.chosen_column, args.rejected_column, args.weight_column),
        "image_root": args.image_root,
        "min_confidence": args.min_confidence,
        "buckets": buckets,
    }
    skipped = {}
    keep_rows, mpcf = None, None
    if args.reward_model == "lrm":
        common["keep_ties"] = True  # the official LRM loss trains on ties (labels 0.5 / 0.5)
        if args.mpcf_scores:
            keep_rows, mpcf = mpcf_filter(read_mpcf_scores(args.mpcf_scores), args.mpcf_strategy)
            logger.info(f"Multi-Preference Consistent Filtering: {mpcf}")
    with accelerator.main_process_first():
        train, stats = load_preference_dataset(
            args.dataset_name,
            args.dataset_config_name,
            args.train_data_dir,
            max_samples=args.max_train_samples,
            split="train",
            keep_rows=keep_rows,
            **common,
        )
        skipped["train"] = stats.as_dict()
        if mpcf is not None:
            skipped["train"]["mpcf"] = mpcf
        validation = None
        if args.validation_dataset_name is not None:
            source = args.validation_dataset_name
            local = os.path.isdir(source)
            validation, stats = load_preference_dataset(
                None if local else source,
                None,
                source if local else None,
                split=args.validation_split or "test",
                **{**common, "image_root": source if local else args.image_root},
            )
            skipped["validation"] = stats.as_dict()
        elif _is_fraction(args.validation_split):
            parts = train.train_test_split(test_size=float(args.validation_split), seed=HOLD_OUT_SEED)
            train, validation = parts["train"], parts["test"]
            skipped["train"]["kept"] = len(train)
            skipped["validation"] = {"kept": len(validation), "skipped": 0}
        elif args.validation_split is not None:
            validation, stats = load_preference_dataset(
                args.dataset_name, args.dataset_config_name, args.train_data_dir, split=args.validation_split, **common
            )
            skipped["validation"] = stats.as_dict()
    if validation is not None and args.max_validation_samples is not None:
        validation = validation.select(range(min(args.max_validation_samples, len(validation))))
        skipped["validation"]["kept"] = len(validation)
    if len(train) == 0:
        raise ValueError(f"No usable training pairs (skipped: {skipped['train']}).")
    return train, validation, skipped


def load_encoding_pipeline(
    args, reward_model: DiNaLRMModel, device: torch.device, dtype: torch.dtype
) -> DiNaLRMPipeline:
    """The pipeline whose `encode_prompt` / `encode_images` encode the data (the generator's VAE and text encoders,
    frozen)."""
    generator_class, from_generator = {
        "sd3": (StableDiffusion3Pipeline, DiNaLRMPipeline.from_sd3),
        "flux": (FluxPipeline, DiNaLRMFluxPipeline.from_flux),
        "zimage": (ZImagePipeline, DiNaLRMZImagePipeline.from_zimage),
    }[args.backbone]
    generator = generator_class.from_pretrained(
        args.pretrained_model_name_or_path,
        transformer=None,
        revision=args.revision,
        variant=args.variant,
        dtype=dtype,
    )
    pipeline = from_generator(generator, reward_model)
    for name, component in pipeline.components.items():
        if name != "reward_model" and isinstance(component, torch.nn.Module):
            component.requires_grad_(False).eval().to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def encoders(pipeline: DiNaLRMPipeline, args, device: torch.device, embed_context=None):
    """`(encode_prompts, encode_images)` callables for `dinalrm.training.pair_datasets` and the feature cache (no gradients).

    `embed_context` (optional) is applied to the prompt tokens: the frozen context embedder, for a compact cache.
    """

    @torch.no_grad()
    def encode_prompts(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompt_embeds, pooled = pipeline.encode_prompt(
            prompts, device=device, max_sequence_length=args.max_sequence_length
        )
        return (prompt_embeds if embed_context is None else embed_context(prompt_embeds)), pooled

    def encode_images(images: list) -> torch.Tensor:
        return pipeline.encode_images(images, resolution=(images[0].height, images[0].width))

    return encode_prompts, encode_images


def fingerprint(args: argparse.Namespace, buckets: BucketSet, dtype: torch.dtype, context_embedded: bool) -> dict:
    """The fingerprint of the feature cache these flags need (see `dinalrm.training.feature_cache.cache_fingerprint`)."""
    settings = {key: getattr(args, key) for key in FINGERPRINT_SETTINGS}
    return cache_fingerprint(settings, buckets, dtype, context_embedded)


def context_embedder_is_frozen(reward_model: DiNaLRMModel) -> bool:
    """Whether no weight of the context embedder (LoRA included) trains: then the feature cache stores its output
    (backbone width, 1536 values per token for SD3.5-Medium) instead of the text encoders' (4096)."""
    embedder = getattr(reward_model.backbone, reward_model.backbone.context_embedder_attribute)
    return not any(param.requires_grad for param in embedder.parameters())


def precompute_features(
    args, accelerator, reward_model, cache_dir: str, buckets: BucketSet, dtype, context_embedded: bool
) -> dict:
    """Encode the data once into `cache_dir` (all processes share the work), then free the encoders."""
    train, validation, skipped = load_pairs(args, accelerator, buckets)
    pipeline = load_encoding_pipeline(args, reward_model, accelerator.device, dtype)

    def embed_context(prompt_embeds: torch.Tensor) -> torch.Tensor:
        with accelerator.autocast():  # as the training forward computes it
            return reward_model.embed_context(prompt_embeds)

    encode_prompts, encode_images = encoders(
        pipeline, args, accelerator.device, embed_context if context_embedded else None
    )
    splits = {"train": train, **({"validation": validation} if validation is not None else {})}
    info = build_feature_cache(
        accelerator,
        cache_dir,
        splits,
        skipped,
        encode_prompts,
        encode_images,
        fingerprint(args, buckets, dtype, context_embedded),
        batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
    )
    del pipeline, encode_prompts, encode_images
    gc.collect()  # no reference keeps the encoders alive (tests/test_train.py checks it); free any cycles now
    return info


def data_sources(args, accelerator, reward_model, dtype):
    """Training/validation datasets, their collate function, the encoder (None when cached) and skip counts."""
    if args.reward_model == "lrm":  # images are resized to the UNet's native size when encoded
        train, validation, skipped = load_pairs(args, accelerator, BucketSet(args.resolution, 8))
        pipeline = load_lrm_encoding_pipeline(args, reward_model, accelerator.device, dtype)
        validation = LRMPairDataset(validation) if validation is not None else None
        return LRMPairDataset(train), validation, collate_lrm_pairs, pipeline, skipped
    buckets = buckets_for_model(
        args.pretrained_model_name_or_path,
        reward_model.config.latent_patch_size,
        args.resolution,
        args.bucket_multiple,
        args.revision,
    )
    cache_dir = args.cache_dir or (
        os.path.join(args.output_dir, "feature_cache") if args.precompute_features else None
    )
    if cache_dir is None:
        train, validation, skipped = load_pairs(args, accelerator, buckets)
        pipeline = load_encoding_pipeline(args, reward_model, accelerator.device, dtype)
        return (
            ImagePairDataset(train),
            ImagePairDataset(validation) if validation is not None else None,
            collate_image_pairs,
            encoders(pipeline, args, accelerator.device),
            skipped,
        )
    context_embedded = context_embedder_is_frozen(reward_model)
    info = read_valid_cache_info(cache_dir, fingerprint(args, buckets, dtype, context_embedded))
    if info is None:
        if not args.precompute_features:
            raise FileNotFoundError(f"No feature cache in {cache_dir}: pass --precompute_features to build it.")
        info = precompute_features(args, accelerator, reward_model, cache_dir, buckets, dtype, context_embedded)
    else:
        logger.info(f"Training from the feature cache in {cache_dir}")
    validation = CachedPairDataset(cache_dir, "validation") if "validation" in info["splits"] else None
    return CachedPairDataset(cache_dir, "train"), validation, collate_cached_pairs, None, info["skipped"]


# --------------------------------------------------------------------------------------------------- safeguards
def load_checkpoint_model(folder: str, model: torch.nn.Module) -> torch.nn.Module:
    """The reward model saved in a checkpoint's `reward_model/`, refused unless it fits `model` (`RESUME_SETTINGS`).

    `folder` may be a link in the temporary folder `load_checkpoint` lays out; errors name the checkpoint itself.
    """
    folder = os.path.realpath(folder)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"The checkpoint {os.path.dirname(folder)} is incomplete: {folder} has no config.json. Resume from "
            "another checkpoint (--resume_from_checkpoint checkpoint-<step>) or start a new --output_dir."
        )
    loaded = type(model).from_pretrained(folder)
    theirs, ours = loaded.config.to_dict(), model.config.to_dict()
    changed = {key: (theirs.get(key), ours.get(key)) for key in RESUME_SETTINGS if theirs.get(key) != ours.get(key)}
    if changed:
        raise ValueError(
            f"The checkpoint {os.path.dirname(folder)} was trained with other model settings {changed} "
            "(checkpoint, this run): resume with the flags it was trained with, or start a new --output_dir."
        )
    return loaded


def check_update(accelerator, args, trainable, loss_finite: torch.Tensor, step: int) -> bool:
    """Clips the gradients and says whether the optimizer step `step` may be taken: loss and gradients finite.

    The verdict is agreed over all processes. A non-finite step stops the run with `FloatingPointError`
    before the optimizer, the EMA or a checkpoint sees it, unless `--skip_nonfinite_steps` (then it is skipped,
    logged and counted). With an fp16 gradient scaler, overflowing gradients are the scaler's business: it skips
    the step itself and lowers its scale, so only the loss is checked.
    """
    if args.max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
    grad_finite = torch.isfinite(grad_norm) if accelerator.scaler is None else torch.ones_like(loss_finite)
    flags = accelerator.gather(torch.stack([loss_finite, grad_finite.to(loss_finite.device)]).int()[None])
    loss_ok, grad_ok = (bool(flag) for flag in flags.all(dim=0))
    if loss_ok and grad_ok:
        return True
    what = "loss" if not loss_ok else "gradient"
    if args.skip_nonfinite_steps:
        logger.warning(f"Non-finite {what} at step {step}: step skipped (--skip_nonfinite_steps).")
        return False
    checkpoints = list_checkpoints(args.output_dir)
    kept = f"the latest checkpoint, {checkpoints[-1][1]}, is intact" if checkpoints else "no checkpoint was written"
    raise FloatingPointError(
        f"Non-finite {what} at step {step}: training stopped before that step changed any weight or wrote any file; "
        f"{kept}. Look for NaN or infinite values in the data or the feature cache, lower --learning_rate, or pass "
        "--skip_nonfinite_steps to skip such steps (counted in training_summary.json)."
    )


# --------------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def log_validation(accelerator, reward_model, ema, trainable, dataset, collate_fn, encode, args, global_step) -> dict:
    """Pairwise accuracy on the validation pairs at each --validation_t and for their ensemble (EMA weights).

    Each pair's chosen and rejected latents get one shared noise, drawn from the seed and the batch number only,
    so the figures do not depend on the number of processes. Score ties count as wrong.
    """
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    if args.reward_model == "lrm":
        metrics = lrm_validation_accuracy(
            accelerator,
            reward_model,
            dataset,
            encode,
            args,
            lambda number: seeded_generator(args.seed, VALIDATION_STREAM, number),
        )
        if ema is not None:
            ema.restore(trainable)
        accelerator.log(metrics, step=global_step)
        logger.info(f"Validation at step {global_step} ({'EMA' if ema else 'live'} weights): {metrics}")
        return metrics
    reward_model.eval()
    context_embedded = isinstance(dataset, CachedPairDataset) and dataset.context_embedded
    levels = [*([t] for t in args.validation_t), list(args.validation_t)]
    correct = torch.zeros(len(levels), dtype=torch.float64, device=accelerator.device)
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    unreadable = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    batches = BucketBatchSampler(dataset.buckets, args.train_batch_size, shuffle=False).batches()
    mine = list(range(accelerator.process_index, len(batches), accelerator.num_processes))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[batches[i] for i in mine],
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
    )
    for number, batch in zip(mine, loader):
        if encode is not None:
            unreadable += len(batch["skipped"])
            if not batch["prompts"]:
                continue
            batch = encode_image_pairs(batch, *encode)
        chosen = batch["chosen"].to(accelerator.device)
        latents = torch.cat([chosen, batch["rejected"].to(accelerator.device)])
        noise = randn_tensor(
            chosen.shape,
            generator=seeded_generator(args.seed, VALIDATION_STREAM, number),
            device=accelerator.device,
            dtype=chosen.dtype,
        )
        prompt_embeds, pooled = repeat_prompts(
            batch["prompt_embeds"], batch["pooled_prompt_embeds"], 2, accelerator.device
        )
        with accelerator.autocast():
            for j, level in enumerate(levels):
                rewards = reward_model.score_latents(
                    latents,
                    prompt_embeds,
                    pooled,
                    t=level if len(level) > 1 else level[0],
                    noise=torch.cat([noise, noise]),
                    context_embedded=context_embedded,
                ).float()
                rewards_chosen, rewards_rejected = rewards.chunk(2)
                correct[j] += (rewards_chosen > rewards_rejected).sum()
        total += chosen.shape[0]
    correct, total, unreadable = (accelerator.reduce(x, "sum") for x in (correct, total, unreadable))
    if ema is not None:
        ema.restore(trainable)
    reward_model.train()
    names = [f"val/accuracy_t{t:g}" for t in args.validation_t] + ["val/accuracy_ensemble"]
    metrics = {name: float(c / total.clamp_min(1)) for name, c in zip(names, correct)}
    metrics["val/pairs"] = int(total)
    if unreadable:
        metrics["val/skipped_unreadable_pairs"] = int(unreadable)
        logger.warning(f"{int(unreadable)} validation pairs had images that could not be read and were skipped.")
    accelerator.log(metrics, step=global_step)
    logger.info(f"Validation at step {global_step} ({'EMA' if ema else 'live'} weights): {metrics}")
    return metrics


# --------------------------------------------------------------------------------------------------- model card
def card_metadata(args, validation: dict | None) -> tuple[list[str], list]:
    """`(training datasets, validation accuracies as model-index results)` for the model cards."""
    training_data = [name for name in (args.dataset_name, args.validation_dataset_name) if name]
    source = args.validation_dataset_name or args.dataset_name or Path(args.train_data_dir or "data").name
    split = args.validation_split if not args.validation_dataset_name else "validation"
    results = []
    for name, value in (validation or {}).items():
        if name.startswith("val/accuracy_"):
            level = name.removeprefix("val/accuracy_")  # "t0.4" or "ensemble"
            if level == "ensemble":
                setting = "ensemble=" + ",".join(f"{t:g}" for t in args.validation_t)
            else:
                setting = "t=" + level.removeprefix("t")
            results.append(pairwise_accuracy_result(value, setting, source, split))
    return training_data, results


def save_model_card(repo_id: str, args, output_dir: str, validation: dict | None, skipped: dict) -> None:
    """Write a README.md (huggingface_hub ModelCard) describing the trained reward model."""
    training_data, eval_results = card_metadata(args, validation)
    metadata = card_data(
        args.pretrained_model_name_or_path, repo_id, "transformers", training_data, eval_results, args.backbone
    )
    results = "\n".join(
        f"| {name.removeprefix('val/accuracy_')} | {value:.4f} |"
        for name, value in (validation or {}).items()
        if name.startswith("val/accuracy_")
    )
    # Local folders are named by their folder name only: the card must not publish a path of this machine.
    base = provenance_name(args.pretrained_model_name_or_path)
    family = FAMILY_CARDS[args.backbone]
    body = f"""
# DiNa-LRM reward model: {repo_id}

A diffusion-native latent reward model ([DiNa-LRM](https://arxiv.org/abs/2602.11146)) trained with
`train_dinalrm.py` on the first {args.num_backbone_layers} blocks of `{base}`
(visual layers {args.visual_layers}, text layers {args.text_layers}; {
        "frozen backbone"
        if args.freeze_backbone
        else f"LoRA rank {args.lora_rank}, merged"
        if args.lora_rank
        else "fully fine-tuned backbone"
    }). It scores noisy SD3
VAE latents; the weights here are {
        "the EMA (decay " + str(args.ema_decay) + ")" if args.use_ema else "the final"
    } weights.

Training: loss `{args.loss}` (k={args.thurstone_k}, v0={args.thurstone_v0}), t ~ `{args.weighting_scheme}`,
learning rate {args.learning_rate}, {args.train_batch_size} pairs per device, data
`{provenance_name(args.dataset_name or args.train_data_dir)}` at resolution {args.resolution}. Skipped rows: {
        json.dumps(skipped)
    }.

## Validation (pairwise accuracy)

| level | accuracy |
|---|---|
{results or "| - | not run |"}

## Usage

With the `dinalrm` package ({INSTALL}), the reward model scores images with the VAE and text encoders of the
generator it was trained on (its transformer is not needed: the reward model holds the blocks it reads):

```python
import torch
from diffusers import {family.generator}
from PIL import Image

from modeling_dinalrm import DiNaLRMModel
from pipeline_dinalrm import {family.scorer}

model = DiNaLRMModel.from_pretrained("{repo_id}")
generator_pipeline = {family.generator}.from_pretrained("{base}", transformer=None)
pipe = {family.scorer}.{family.from_generator}(generator_pipeline, model)
images = [Image.open("a.png"), Image.open("b.png")]
rewards = pipe("a photo of a cat", images=images, generator=torch.Generator().manual_seed(0)).rewards
```

On latents and prompt embeddings you already hold, `model.score_latents(latents, prompt_embeds,
pooled_prompt_embeds, t=0.4)` scores without the pipeline.
"""
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}").save(os.path.join(output_dir, "README.md"))


# --------------------------------------------------------------------------------------------------- training
def main(args: argparse.Namespace) -> None:
    logging_dir = Path(args.output_dir, args.logging_dir)
    find_unused = (
        args.reward_model == "lrm"
        or not args.freeze_backbone
        and not (args.num_backbone_layers in args.visual_layers and args.num_backbone_layers in args.text_layers)
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    verbosity = logging.WARNING if accelerator.is_local_main_process else logging.ERROR
    for library in (datasets, transformers, diffusers):
        library.utils.logging.set_verbosity(verbosity)
    logger.info(
        f"process {accelerator.process_index} of world size {accelerator.num_processes}", main_process_only=False
    )

    set_seed(args.seed)
    repo_id = None
    if accelerator.is_main_process:
        lock = OutputDirLock(args.output_dir).acquire()  # before anything in the folder is touched
        atexit.register(lock.release)
        prepare_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
        if args.push_to_hub:
            repo_id = create_repo(
                args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
            ).repo_id
    accelerator.wait_for_everyone()

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    reward_model = build_lrm(args) if args.reward_model == "lrm" else build_reward_model(args)
    reward_model.to(accelerator.device)
    trainable_names = [name for name, p in reward_model.named_parameters() if p.requires_grad]
    trainable = [p for p in reward_model.parameters() if p.requires_grad]
    logger.info(
        f"{sum(p.numel() for p in trainable):,} trainable parameters "
        f"of {sum(p.numel() for p in reward_model.parameters()):,}"
    )

    train_dataset, validation_dataset, collate_fn, encode, skipped = data_sources(
        args, accelerator, reward_model, weight_dtype
    )
    context_embedded = isinstance(train_dataset, CachedPairDataset) and train_dataset.context_embedded
    batch_sampler = BucketBatchSampler(train_dataset.buckets, args.train_batch_size, seed=args.seed)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=args.dataloader_num_workers
    )

    optimizer = torch.optim.AdamW(
        trainable,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    batches_per_process = math.ceil(len(batch_sampler) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        reward_model, optimizer, train_dataloader, lr_scheduler
    )
    if len(train_dataloader) != batches_per_process:
        raise RuntimeError(f"expected {batches_per_process} batches per process, got {len(train_dataloader)}")
    ema = EMAModel(trainable, decay=args.ema_decay) if args.use_ema else None

    def save_model(model_, folder):
        model_.save_pretrained(os.path.join(folder, "reward_model"), merge_lora=False)

    def load_model(target, folder):
        target.load_state_dict(load_checkpoint_model(os.path.join(folder, "reward_model"), target).state_dict())

    register_checkpoint_hooks(accelerator, save_model, load_model, ema, trainable_names)

    if accelerator.is_main_process:
        config = {
            key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in vars(args).items()
            if key != "hub_token"
        }
        accelerator.init_trackers(args.tracker_project_name, config=config)

    global_step, first_epoch, skip_batches = 0, 0, 0
    runtime_skips: Counter[str] = Counter()
    history: list[dict] = []
    state = resume_from(accelerator, args.output_dir, args.resume_from_checkpoint)
    if state is not None:
        if (state["num_processes"], state["train_batch_size"]) != (
            accelerator.num_processes,
            args.train_batch_size,
        ):
            logger.warning("The number of processes or the batch size changed: the data position is approximate.")
        global_step, first_epoch, skip_batches = state["global_step"], state["epoch"], state["batches_in_epoch"]
        if accelerator.is_main_process:  # the checkpoint holds the sum over processes
            runtime_skips.update(state["runtime_skips"])
        history = state["validation"]
        if skip_batches >= len(train_dataloader):
            first_epoch, skip_batches = first_epoch + 1, 0

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** Training: {len(train_dataset)} pairs, {args.num_train_epochs} epochs, {total_batch_size} pairs "
        f"per step, {args.max_train_steps} steps ({steps_per_epoch} per epoch) *****"
    )
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )

    def run_validation() -> None:
        already_done = bool(history) and history[-1]["step"] == global_step
        if validation_dataset is not None and len(validation_dataset) and not already_done:
            metrics = log_validation(
                accelerator, reward_model, ema, trainable, validation_dataset, collate_fn, encode, args, global_step
            )
            history.append({"step": global_step, **metrics})

    fallback = None  # the last good batch, re-used with zero weights if every pair of a batch fails to decode
    loss_finite = torch.ones((), dtype=torch.bool, device=accelerator.device)  # over the micro-batches of a step
    for epoch in range(first_epoch, args.num_train_epochs):
        if global_step >= args.max_train_steps:
            break
        batch_sampler.start_epoch(epoch)
        model.train()
        start = skip_batches if epoch == first_epoch else 0
        loader = accelerator.skip_first_batches(train_dataloader, start) if start else train_dataloader
        for micro_index, batch in enumerate(loader, start=start):
            generator = seeded_generator(args.seed, accelerator.process_index, epoch, micro_index)
            with accelerator.accumulate(model):
                if args.reward_model == "lrm":
                    runtime_skips.update(batch["skipped"])
                    if batch["prompts"]:
                        batch = fallback = encode_lrm_pairs(batch, encode, generator)
                    elif fallback is not None:
                        batch = {**fallback, "weights": torch.zeros_like(fallback["weights"])}
                    else:
                        raise RuntimeError("Every pair of the first batch failed to decode; check the dataset.")
                elif encode is not None:
                    runtime_skips.update(batch["skipped"])
                    if batch["prompts"]:
                        batch = fallback = encode_image_pairs(batch, *encode)
                    elif fallback is not None:
                        batch = {**fallback, "weights": torch.zeros_like(fallback["weights"])}
                    else:
                        raise RuntimeError("Every pair of the first batch failed to decode; check the dataset.")
                if args.reward_model == "lrm":
                    output = lrm_preference_step(
                        model, reward_model, batch, generator, timestep_grid(args.lrm_largest_timestep)
                    )
                else:
                    output = preference_step(
                        model,
                        reward_model,
                        batch,
                        generator,
                        args.weighting_scheme,
                        args.logit_mean,
                        args.logit_std,
                        args.constant_t,
                        context_embedded,
                    )
                accelerator.backward(output.loss)
                loss_finite &= torch.isfinite(output.loss.detach())
                finite_update = True
                if accelerator.sync_gradients:
                    finite_update = check_update(accelerator, args, trainable, loss_finite, global_step + 1)
                    loss_finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
                    if not finite_update:
                        runtime_skips[NONFINITE_STEP] += 1
                if finite_update:
                    optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if accelerator.sync_gradients:
                if ema is not None and finite_update:
                    ema.step(trainable)
                global_step += 1
                progress_bar.update(1)
                logs = {
                    "loss": output.loss.detach().item(),
                    "train_accuracy": output.accuracy.item(),
                    "reward_margin": output.reward_margin.item(),
                    "mean_t": output.mean_t.item(),
                    "lr": lr_scheduler.get_last_lr()[0],
                }
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs['train_accuracy']:.2f}")
                accelerator.log(logs, step=global_step)
                if global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                    run_validation()
                if global_step % args.checkpointing_steps == 0:
                    all_skips = sum((Counter(c) for c in gather_object([dict(runtime_skips)])), Counter())
                    save_checkpoint(
                        accelerator,
                        args.output_dir,
                        global_step,
                        {
                            "global_step": global_step,
                            "epoch": epoch,
                            "batches_in_epoch": micro_index + 1,
                            "num_processes": accelerator.num_processes,
                            "train_batch_size": args.train_batch_size,
                            "gradient_accumulation_steps": args.gradient_accumulation_steps,
                            "runtime_skips": dict(all_skips),
                            "validation": history,
                        },
                        args.checkpoints_total_limit,
                    )
            if global_step >= args.max_train_steps:
                break

    run_validation()
    total_runtime = sum((Counter(c) for c in gather_object([dict(runtime_skips)])), Counter())
    logger.info(
        f"process {accelerator.process_index}: final parameter digest {parameter_digest(reward_model)}",
        main_process_only=False,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_model = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(trainable)
        nonfinite = nonfinite_tensors(final_model.named_parameters())
        if nonfinite:
            raise FloatingPointError(
                f"The final {'EMA ' if ema is not None else ''}weights hold NaN or infinite values "
                f"({', '.join(nonfinite[:5])}): they were not saved to {args.output_dir}. Resume from an earlier "
                "checkpoint with a lower --learning_rate."
            )
        if args.reward_model == "lrm":  # the LRMPipeline layout, which `run_eval.py --scorer lrm` loads
            encode.save_pretrained(args.output_dir)
        else:
            final_model.save_pretrained(args.output_dir)
        skipped = {**skipped, "during_training": dict(total_runtime)}
        for split, counts in skipped.items():
            if any(v for k, v in counts.items() if k != "kept"):
                logger.warning(f"Skipped {split} rows: {counts}")
        summary = {"global_step": global_step, "skipped": skipped, "validation": history}
        with open(os.path.join(args.output_dir, SUMMARY_FILE), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
        save_model_card(
            repo_id or Path(args.output_dir).name, args, args.output_dir, history[-1] if history else None, skipped
        )
        logger.info(f"Saved the {'EMA ' if ema is not None else ''}reward model to {args.output_dir}")
        if args.pipeline_output_dir:
            training_data, eval_results = card_metadata(args, history[-1] if history else None)
            build_hub_repo(
                final_model,
                args.pretrained_model_name_or_path,
                args.pipeline_output_dir,
                args.revision,
                repo_id,
                training_data,
                eval_results,
            )
            logger.info(f"Saved the DiNa-LRM pipeline repository to {args.pipeline_output_dir}")
        if args.push_to_hub and args.pipeline_output_dir:
            upload_folder(
                repo_id=repo_id,
                folder_path=args.pipeline_output_dir,
                commit_message="End of training",
                token=args.hub_token,
            )
        elif args.push_to_hub:
            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                token=args.hub_token,
                ignore_patterns=[
                    f"{CHECKPOINT_PREFIX}*",
                    f"{PARTIAL_PREFIX}*",
                    LOCK_FILE,
                    f"{args.logging_dir}/*",
                    "feature_cache/*",
                ],
            )
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
