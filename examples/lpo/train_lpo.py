#!/usr/bin/env python
# Copyright 2026 The dinalrm authors. Licensed under the Apache License, Version 2.0.
"""LPO (Latent Preference Optimization) of an SD1.5-style generator with an LRM reward, or of an SD3 generator with
DiNa-LRM, with 🤗 accelerate and peft.

    accelerate launch examples/lpo/train_lpo.py \\
        --pretrained_model_name_or_path sd-legacy/stable-diffusion-v1-5 \\
        --reward_model lrm-sd15 --prompts_file prompts.json --output_dir sd15-lpo
    accelerate launch examples/lpo/train_lpo.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \\
        --reward_model liuhuohuo/DiNa-LRM-SD35M-12layers --prompts_file prompts.txt --output_dir sd35m-lpo \\
        --guidance_scale 4.5 --num_inference_steps 20 --min_confidence 0.9

The official algorithm (Kwai-Kolors/LPO `lpo/train_scripts/train_lpo.py`, arXiv 2502.01051), built on
`dinalrm.alignment.lpo`: every round samples `--sample_batch_size` prompts with DDIM (eta 1) and classifier-free guidance;
at each step `--num_candidates` next latents are drawn around one mean, the LRM scores them, and the best and worst
form a pair when their softmax gap exceeds the noise-dependent threshold (`--threshold_schedule`, min / max per
model); the trajectory continues from a random candidate. The round's pairs, shuffled, train a LoRA on the UNet in
batches of `--train_batch_size` (one optimizer step each) with `-log sigmoid(beta (log r_w - log r_l))` on the
policy / reference ratios of the DDIM transition probabilities, clipped to `[1 - eps, 1 + eps]`. The reference is
the same UNet with the adapter disabled (the base UNet is frozen, so this is the official frozen copy).

Official quirks, reproduced by default: gradient clipping is a no-op (the official script clips an exhausted
iterator; `--clip_gradients` clips as intended), and the LRM is told the step's t while it scores the candidates
x_{t-1} (`--reward_at_candidate_timestep` tells it their own timestep). Deviations, for exact resumes: the
candidate noise and the continuation indices of a round come from generators seeded by (`--seed`, process, round)
instead of the global generator; the LRM's prompt ids come from the reward model's own tokenizer (the official
dataset tokenises them with CLIP-ViT-H-14's). A round's pairs are always trained on completely, so checkpoints
(`--checkpointing_steps`) and the end of the run (`--max_train_steps`) fall at the first round boundary at or
after the step. The LoRA is saved with `StableDiffusionPipeline.save_lora_weights` (`pipe.load_lora_weights`).

Flow-matching path (`--generator_family sd3`, detected from the pipeline's `model_index.json`): the same loop on
the SDE version of the SD3 sampler (`dinalrm.alignment.lpo.flow_step_distribution`, Flow-GRPO's ODE-to-SDE step with noise
level `--noise_level`), guidance as `examples/refl/train_refl.py`'s sampler. DiNa-LRM scores every candidate at its
own noise level (the sigma of x_{t-1}; the candidates are already noisy, so no noise is added), and a pair is kept
when DiNa-LRM's own comparison probability that the best beats the worst, `Phi((r_b - r_w) / sqrt(2 var(sigma)))`,
exceeds `--min_confidence` (`dinalrm.alignment.lpo.confidence_compare_fn`) instead of the DDPM threshold table. The LoRA
(modeling_dinalrm's SD3 attention targets) is saved with `StableDiffusion3Pipeline.save_lora_weights`.
"""

import argparse
import atexit
import json
import logging
import math
import os
from pathlib import Path

import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
from diffusers.training_utils import EMAModel, cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm

from dinalrm.alignment import Sampler, encode_generator_prompts, load_reward_model
from dinalrm.alignment.lpo import (
    OFFICIAL_THRESHOLD_RANGES,
    THRESHOLD_SCHEDULES,
    DiNaLRMReward,
    LRMReward,
    confidence_compare_fn,
    ddim_step_distribution,
    flow_step_distribution,
    gaussian_log_prob,
    guided_prediction,
    lpo_loss,
    official_threshold_fn,
    parameters_to_clip,
    sample_with_candidates,
)
from dinalrm.training.checkpointing import (
    OutputDirLock,
    check_output_dir_arguments,
    prepare_output_dir,
    register_checkpoint_hooks,
    resume_from,
    save_checkpoint,
)
from dinalrm.training.utils import seeded_generator
from modeling_dinalrm import (
    DEFAULT_LORA_TARGET_MODULES,
    is_official_checkpoint,
    load_official_checkpoint,
    require_local_folder,
    resolve_repo,
)
from pipeline_dinalrm import DiNaLRMPipeline
from pipeline_lrm import LRMPipeline


logger = get_logger(__name__)

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]  # the official LoraConfig (train_lpo.py:185-190)
LORA_FILE = "pytorch_lora_weights.safetensors"
GENERATOR_FAMILIES = ("auto", "sd15", "sd3")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="SD1.5-style pipeline: Hub id/folder.")
    parser.add_argument("--revision", default=None)
    parser.add_argument(
        "--generator_family",
        choices=GENERATOR_FAMILIES,
        default="auto",
        help="sd15: DDIM + LRM (official LPO); sd3: flow SDE + DiNa-LRM; auto: from the pipeline's model_index.json.",
    )
    parser.add_argument(
        "--reward_model",
        required=True,
        help="sd15: LRM pipeline (scripts/convert_official_lrm_checkpoint.py); sd3: DiNa-LRM repo, folder or "
        "official checkpoint (its backbone blocks come from --pretrained_model_name_or_path).",
    )
    parser.add_argument(
        "--prompts_file", required=True, help="Prompts: a text file (one per line) or the official JSON list."
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=42)
    sampling = parser.add_argument_group("sampling (official SD1.5 recipe)")
    sampling.add_argument("--resolution", type=int, default=None, help="Default: the UNet's native size.")
    sampling.add_argument("--num_inference_steps", type=int, default=20)
    sampling.add_argument("--eta", type=float, default=1.0, help="sd15: DDIM's eta.")
    sampling.add_argument("--guidance_scale", type=float, default=5.0)
    sampling.add_argument("--sample_batch_size", type=int, default=5, help="Prompts per round and process.")
    sampling.add_argument("--num_candidates", type=int, default=4, help="Candidates per step (num_sample_each_step).")
    sampling.add_argument("--divert_start_step", type=int, default=0, help="Plain DDIM steps before LPO starts.")
    sampling.add_argument("--divert_end_step", type=int, default=0, help="Stop sampling at this step when > 0.")
    sampling.add_argument(
        "--threshold_schedule", choices=THRESHOLD_SCHEDULES, default="sigma", help="sd15: the official schedule."
    )
    sampling.add_argument("--threshold_min", type=float, default=OFFICIAL_THRESHOLD_RANGES["sd15"][0], help="sd15.")
    sampling.add_argument("--threshold_max", type=float, default=OFFICIAL_THRESHOLD_RANGES["sd15"][1], help="sd15.")
    sampling.add_argument(
        "--noise_level", type=float, default=0.7, help="sd3: Flow-GRPO's SDE noise level a of the candidates' step."
    )
    sampling.add_argument(
        "--min_confidence",
        type=float,
        default=0.9,
        help="sd3: keep a pair when DiNa-LRM's probability that best beats worst at their noise level exceeds it.",
    )
    sampling.add_argument("--max_sequence_length", type=int, default=128, help="sd3: T5 tokens for the generator.")
    sampling.add_argument(
        "--reward_at_candidate_timestep",
        action="store_true",
        help="sd15: tell the LRM the candidates' own timestep t - T/N (official: the step's t; sd3 always tells "
        "DiNa-LRM the candidates' own sigma).",
    )
    training = parser.add_argument_group("training (official SD1.5 recipe)")
    training.add_argument("--num_train_epochs", type=int, default=5)
    training.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides epochs.")
    training.add_argument("--train_batch_size", type=int, default=10, help="Pairs per optimizer step and process.")
    training.add_argument("--beta", type=float, default=500.0)
    training.add_argument("--ratio_eps", type=float, default=0.1, help="Ratios are clipped to [1 - eps, 1 + eps].")
    training.add_argument("--no_train_cfg", action="store_true", help="Train without guidance (official: with).")
    training.add_argument("--lora_rank", type=int, default=4)
    training.add_argument("--learning_rate", type=float, default=6e-5)
    training.add_argument("--adam_beta1", type=float, default=0.9)
    training.add_argument("--adam_beta2", type=float, default=0.999)
    training.add_argument("--adam_weight_decay", type=float, default=1e-4)
    training.add_argument("--adam_epsilon", type=float, default=1e-8)
    training.add_argument("--max_grad_norm", type=float, default=1.0)
    training.add_argument(
        "--clip_gradients", action="store_true", help="Clip to --max_grad_norm (official: clipping is a no-op)."
    )
    training.add_argument("--use_ema", action="store_true", help="Keep an EMA of the LoRA; the final save uses it.")
    training.add_argument("--ema_decay", type=float, default=0.999)
    saving = parser.add_argument_group("checkpointing and logging")
    saving.add_argument("--checkpointing_steps", type=int, default=500)
    saving.add_argument("--checkpoints_total_limit", type=int, default=None)
    saving.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder or name, or "latest".')
    saving.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start a new run in an --output_dir that holds another run, removing its checkpoints.",
    )
    saving.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    saving.add_argument("--report_to", default="tensorboard")
    saving.add_argument("--logging_dir", default="logs")
    saving.add_argument("--tracker_project_name", default="lpo")
    args = parser.parse_args(input_args)
    if args.num_candidates < 2:
        parser.error("--num_candidates must be at least 2: a pair needs a best and a worst candidate.")
    if args.sample_batch_size < 1 or args.train_batch_size < 1:
        parser.error("--sample_batch_size and --train_batch_size must be positive.")
    if not 0.5 <= args.min_confidence < 1:
        parser.error("--min_confidence is a probability that best beats worst: choose it in [0.5, 1).")
    if args.noise_level <= 0:
        parser.error("--noise_level must be positive: LPO draws its candidates from the stochastic step.")
    try:
        require_local_folder(args.pretrained_model_name_or_path, "base model")
        require_local_folder(args.reward_model, "reward model")
        check_output_dir_arguments(args)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    return args


def generator_family(args: argparse.Namespace) -> str:
    """`args.generator_family`, or "sd3" / "sd15" from the `_class_name` of the pipeline's `model_index.json`."""
    if args.generator_family != "auto":
        return args.generator_family
    config = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
    return "sd3" if config["_class_name"] == StableDiffusion3Pipeline.__name__ else "sd15"


def load_dinalrm(path: str, base_model: str, dtype: torch.dtype):
    """The DiNa-LRM reward model of an official checkpoint (backbone blocks from `base_model`, the generator), a
    Hub-layout repo or a bare model folder."""
    folder, _ = resolve_repo(path, ["config.json", "model_index.json", "reward_model/config.json"], "DiNa-LRM model")
    if is_official_checkpoint(folder):
        return load_official_checkpoint(path, base_model, torch_dtype=dtype)
    return load_reward_model(path).to(dtype)


def read_prompts(path: str) -> list[str]:
    """Prompts of a text file (one per line) or of the official JSON list of `{"caption": ...}` records."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        records = json.loads(text)
        if not isinstance(records, list) or not all(isinstance(r, dict) and "caption" in r for r in records):
            raise ValueError(f"{path}: expected the official format, a JSON list of {{'caption': ...}} records.")
        prompts = [record["caption"] for record in records]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts.")
    return prompts


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def lora_state(unet) -> dict[str, torch.Tensor]:
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def sample_round(pipe, unet, reward, prompts, negative, args, generators, device):
    """One LPO sampling call on `prompts`: the kept pairs (`LPOSampleOutput`) and the prompt embeddings."""
    with torch.no_grad():
        prompt_embeds = pipe.text_encoder(tokenize(pipe.tokenizer, prompts).to(device))[0]
        conditioning = reward.reward_model.encode_prompt(tokenize(reward.tokenizer, prompts).to(device))
    negative = negative.repeat(len(prompts), 1, 1)
    resolution = args.resolution or unet.config.sample_size * pipe.vae_scale_factor
    side = resolution // pipe.vae_scale_factor
    shape = (len(prompts), unet.config.in_channels, side, side)
    noise_generator, continuation_generator = generators
    latents = randn_tensor(shape, generator=noise_generator, device=device, dtype=prompt_embeds.dtype)
    pipe.scheduler.set_timesteps(args.num_inference_steps, device=device)
    unet.eval()
    output = sample_with_candidates(
        predict=lambda x, t: guided_prediction(unet, x, t, prompt_embeds, negative, args.guidance_scale),
        step_distribution=lambda eps, t, x: ddim_step_distribution(pipe.scheduler, eps, t, x, eta=args.eta),
        reward=LRMReward(reward.reward_model),
        threshold_fn=official_threshold_fn(args.threshold_schedule, args.threshold_min, args.threshold_max),
        latents=latents * pipe.scheduler.init_noise_sigma,
        timesteps=pipe.scheduler.timesteps,
        conditioning=conditioning,
        num_candidates=args.num_candidates,
        generator=noise_generator,
        continuation_generator=continuation_generator,
        reward_at_current_timestep=not args.reward_at_candidate_timestep,
        start_step=args.divert_start_step,
        end_step=args.divert_end_step,
    )
    return output, prompt_embeds


def pair_loss(policy, reference, batch, args):
    """The LPO loss of a batch's winners and losers under the policy's and the reference's transitions."""
    return lpo_loss(
        gaussian_log_prob(batch["winners"], policy),
        gaussian_log_prob(batch["winners"], reference),
        gaussian_log_prob(batch["losers"], policy),
        gaussian_log_prob(batch["losers"], reference),
        beta=args.beta,
        eps=args.ratio_eps,
    )


def train_batch(pipe, unet, batch, negative, args) -> dict:
    """Loss of one batch of pairs: one policy and one reference pass per x_t (winner and loser share it)."""
    guidance = 1.0 if args.no_train_cfg else args.guidance_scale
    negative = negative.repeat(batch["latents"].shape[0], 1, 1)
    eps = guided_prediction(unet, batch["latents"], batch["timesteps"], batch["embeds"], negative, guidance)
    with torch.no_grad():
        unet.disable_adapters()
        eps_ref = guided_prediction(unet, batch["latents"], batch["timesteps"], batch["embeds"], negative, guidance)
        unet.enable_adapters()
    policy = ddim_step_distribution(pipe.scheduler, eps, batch["timesteps"], batch["latents"], eta=args.eta)
    reference = ddim_step_distribution(pipe.scheduler, eps_ref, batch["timesteps"], batch["latents"], eta=args.eta)
    return pair_loss(policy, reference, batch, args)


def sample_round_sd3(pipe, transformer, reward_pipe, prompts, args, generators, device):
    """One LPO sampling call of the flow path: the kept pairs (`LPOSampleOutput`, its `timesteps` are step
    indices) and the generator's conditional prompt embeddings and pooled embeddings."""
    sampler = Sampler(pipe, sampler_settings(pipe, transformer, args, args.guidance_scale))
    embeds, pooled = encode_generator_prompts(pipe, prompts, args, device)
    with torch.no_grad():
        conditioning = reward_pipe.encode_prompt(prompts, device=device)
    sigmas, timesteps = sampler.sigmas(device)
    noise_generator, continuation_generator = generators
    latents = randn_tensor(
        (len(prompts), *sampler.latent_shape), generator=noise_generator, device=device, dtype=embeds.dtype
    )
    transformer.eval()
    output = sample_with_candidates(
        predict=lambda x, i: sampler.velocity(transformer, x.to(embeds.dtype), timesteps[i], embeds, pooled),
        step_distribution=lambda v, i, x: flow_step_distribution(v, sigmas[i], sigmas[i + 1], x, args.noise_level),
        reward=DiNaLRMReward(reward_pipe.reward_model),
        threshold_fn=None,
        compare_fn=confidence_compare_fn(reward_pipe.reward_model, args.min_confidence),
        latents=latents,
        timesteps=torch.arange(len(timesteps), device=device),
        conditioning=conditioning,
        num_candidates=args.num_candidates,
        generator=noise_generator,
        continuation_generator=continuation_generator,
        reward_at_current_timestep=False,
        start_step=args.divert_start_step,
        end_step=args.divert_end_step,
    )
    half = len(prompts)
    return output, embeds[half:], pooled[half:]


def sampler_settings(pipe, transformer, args, guidance_scale: float) -> argparse.Namespace:
    """The settings `dinalrm.alignment.Sampler` reads, with the side of `--resolution` (default: the native size)."""
    side = args.resolution or transformer.config.sample_size * pipe.vae_scale_factor
    return argparse.Namespace(
        height=side,
        width=side,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=guidance_scale,
        max_sequence_length=args.max_sequence_length,
    )


def train_batch_sd3(pipe, transformer, batch, negative, args) -> dict:
    """Loss of one batch of flow pairs: policy and reference SDE transitions at each pair's step."""
    guidance = 1.0 if args.no_train_cfg else args.guidance_scale
    sampler = Sampler(pipe, sampler_settings(pipe, transformer, args, guidance))
    sigmas, timesteps = sampler.sigmas(batch["latents"].device)
    steps = batch["timesteps"]
    rows = steps.shape[0]
    embeds = torch.cat([negative[0].expand(rows, -1, -1), batch["embeds"]])
    pooled = torch.cat([negative[1].expand(rows, -1), batch["pooled"]])

    def distribution():
        v = sampler.velocity(transformer, batch["latents"].to(embeds.dtype), timesteps[steps], embeds, pooled)
        return flow_step_distribution(v, sigmas[steps], sigmas[steps + 1], batch["latents"], args.noise_level)

    policy = distribution()
    with torch.no_grad():
        transformer.disable_adapters()
        reference = distribution()
        transformer.enable_adapters()
    return pair_loss(policy, reference, batch, args)


def main(args: argparse.Namespace) -> None:
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.report_to != "none" else None,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    verbosity = logging.WARNING if accelerator.is_local_main_process else logging.ERROR
    for library in (transformers, diffusers):
        library.utils.logging.set_verbosity(verbosity)
    set_seed(args.seed)
    lock = None
    if accelerator.is_main_process:
        lock = OutputDirLock(args.output_dir).acquire()  # before anything in the folder is touched
        atexit.register(lock.release)
        prepare_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    accelerator.wait_for_everyone()
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    prompts = read_prompts(args.prompts_file)
    flow = generator_family(args) == "sd3"
    if flow:
        pipe = StableDiffusion3Pipeline.from_pretrained(
            args.pretrained_model_name_or_path, revision=args.revision, dtype=weight_dtype
        )
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, name) is not None:
                getattr(pipe, name).requires_grad_(False).eval().to(device)
        dinalrm = load_dinalrm(args.reward_model, args.pretrained_model_name_or_path, weight_dtype)
        reward = DiNaLRMPipeline.from_sd3(pipe, dinalrm.to(device))
        unet, lora_targets, pipeline_class = pipe.transformer, DEFAULT_LORA_TARGET_MODULES, StableDiffusion3Pipeline
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            args.pretrained_model_name_or_path, revision=args.revision, safety_checker=None, dtype=weight_dtype
        )
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # clip_sample etc. inherited, as officially
        pipe.text_encoder.requires_grad_(False).to(device)
        reward = LRMPipeline.from_pretrained(args.reward_model, dtype=weight_dtype)
        unet, lora_targets, pipeline_class = pipe.unet, LORA_TARGET_MODULES, StableDiffusionPipeline
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.requires_grad_(False)
    reward.reward_model.to(device).eval().requires_grad_(False)
    unet = unet.to(device)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_rank,
            init_lora_weights="gaussian",
            target_modules=lora_targets,
        )
    )
    if accelerator.mixed_precision == "fp16":
        cast_training_params(unet, dtype=torch.float32)  # only the LoRA trains, in float32
    trainable = [p for p in unet.parameters() if p.requires_grad]
    trainable_names = [n for n, p in unet.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema = EMAModel(trainable, decay=args.ema_decay) if args.use_ema else None

    def save_lora(model, folder):
        if flow:
            StableDiffusion3Pipeline.save_lora_weights(
                folder, transformer_lora_layers=get_peft_model_state_dict(model)
            )
        else:
            StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=lora_state(model))

    def load_lora(model, folder):
        state = pipeline_class.lora_state_dict(folder, weight_name=LORA_FILE)
        state = state if flow else state[0]  # the SD1.5 loader also returns the network alphas
        prefix = "transformer." if flow else "unet."
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        state = state if flow else convert_unet_state_dict_to_peft(state)
        result = set_peft_model_state_dict(model, state, adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{folder}: unexpected LoRA keys {result.unexpected_keys[:5]}")

    register_checkpoint_hooks(accelerator, save_lora, load_lora, ema, trainable_names)
    if accelerator.is_main_process:
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config=config)

    with torch.no_grad():
        if flow:  # the empty prompt's embeddings, the unconditional half of every guided call
            negative = [part[:1] for part in encode_generator_prompts(pipe, [""], args, device)]
        else:
            negative = pipe.text_encoder(tokenize(pipe.tokenizer, [""]).to(device))[0]
    rounds_per_epoch = math.ceil(len(prompts) / (args.sample_batch_size * accelerator.num_processes))
    max_rounds = args.num_train_epochs * rounds_per_epoch
    global_step, next_round = 0, 0
    state = resume_from(accelerator, args.output_dir, args.resume_from_checkpoint)
    if state is not None:
        global_step, next_round = state["global_step"], state["next_round"]
    max_steps = args.max_train_steps if args.max_train_steps is not None else math.inf
    logger.info(
        f"***** LPO: {len(prompts)} prompts, {args.sample_batch_size} per round and process, "
        f"{args.num_candidates} candidates per step, pairs in batches of {args.train_batch_size} *****"
    )
    progress = tqdm(initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    last_checkpoint_step = global_step
    for round_index in range(next_round, max_rounds):
        if global_step >= max_steps:
            break
        epoch, position = divmod(round_index, rounds_per_epoch)
        order = torch.randperm(len(prompts), generator=seeded_generator(args.seed, epoch))
        start = (position * accelerator.num_processes + accelerator.process_index) * args.sample_batch_size
        batch_prompts = [prompts[i] for i in order[start : start + args.sample_batch_size].tolist()]
        generators = [seeded_generator(args.seed, accelerator.process_index, round_index, k) for k in (0, 1)]
        if batch_prompts:
            if flow:
                output, prompt_embeds, pooled = sample_round_sd3(
                    pipe, unet, reward, batch_prompts, args, generators, device
                )
            else:
                output, prompt_embeds = sample_round(
                    pipe, unet, reward, batch_prompts, negative, args, generators, device
                )
            local = {
                "timesteps": output.timesteps.cpu(),
                "latents": output.current_latents.cpu(),
                "winners": output.winner_latents.cpu(),
                "losers": output.loser_latents.cpu(),
                "embeds": prompt_embeds[output.prompt_indices].cpu(),
                "scores": output.scores.flatten().cpu(),
            }
            if flow:
                local["pooled"] = pooled[output.prompt_indices].cpu()
        else:
            local = None
        shards = [shard for shard in gather_object([local]) if shard is not None]
        pairs = {key: torch.cat([shard[key] for shard in shards]) for key in shards[0]}
        scores = pairs.pop("scores")
        num_pairs = pairs["timesteps"].shape[0]
        accelerator.log(
            {"reward_mean": scores.mean().item(), "reward_std": scores.std().item(), "kept_pairs": num_pairs},
            step=global_step,
        )
        if num_pairs < accelerator.num_processes:  # officially skipped too (train_lpo.py:431-432)
            continue
        permutation = torch.randperm(num_pairs, generator=seeded_generator(args.seed, round_index, 2))
        per_process = num_pairs // accelerator.num_processes
        mine = permutation[accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process]
        unet.train()
        for first in range(0, per_process, args.train_batch_size):
            rows = mine[first : first + args.train_batch_size]
            batch = {key: value[rows].to(device) for key, value in pairs.items()}
            out = (train_batch_sd3 if flow else train_batch)(pipe, unet, batch, negative, args)
            accelerator.backward(out.loss)
            grad_norm = accelerator.clip_grad_norm_(
                parameters_to_clip(trainable, official_exhausted_iterator=not args.clip_gradients), args.max_grad_norm
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(trainable)
            global_step += 1
            progress.update(1)
            logs = {
                "loss": accelerator.reduce(out.loss.detach(), reduction="mean").item(),
                "ratio_win": out.ratio_w.mean().item(),
                "ratio_lose": out.ratio_l.mean().item(),
                "implicit_acc": out.implicit_acc.item(),
                "margin": out.margin.item(),
                "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
            }
            progress.set_postfix(loss=logs["loss"])
            accelerator.log(logs, step=global_step)
        if global_step // args.checkpointing_steps > last_checkpoint_step // args.checkpointing_steps:
            state = {"global_step": global_step, "next_round": round_index + 1}
            save_checkpoint(accelerator, args.output_dir, global_step, state, args.checkpoints_total_limit)
            last_checkpoint_step = global_step

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(trainable)
        save_lora(final, args.output_dir)
        logger.info(f"Saved the LoRA ({'EMA' if ema else 'final'} weights) to {args.output_dir}/{LORA_FILE}")
    accelerator.end_training()
    if lock is not None:
        lock.release()


if __name__ == "__main__":
    main(parse_args())
