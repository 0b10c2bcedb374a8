#!/usr/bin/env python
# Copyright 2026 The dinalrm authors. Licensed under the Apache License, Version 2.0.
"""ReFL alignment of an SD3 generator with a DiNa-LRM reward, with 🤗 accelerate and peft LoRA.

    accelerate launch examples/refl/train_refl.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \\
        --reward_model org/dinalrm-sd35m --prompts_file prompts.txt --output_dir sd35m-refl

Every step: sample latents with the generator's own scheduler for `--num_inference_steps` steps WITHOUT gradients
up to a stop step (drawn from `--stop_step_range`; the last step by default), run the last `--grad_steps`
denoising steps WITH gradients, turn the velocity at the stop step into the one-step prediction
`x0 = x_t - sigma * v`, and score that clean latent with DiNa-LRM at `--reward_t` (0.4, the paper's t*) through
`DiNaLRMPipeline.reward_fn` — in latent space, no VAE decoding. Prompt embeddings for the reward are computed once.
With `--reward pixel --pixel_reward cnn.safetensors` the same `x0` is instead decoded by the generator's VAE (with
gradients) and scored by the tiny world's pixel CNN (`examples/tiny_world/pixel_baseline.py --save_model`), the
pixel-space baseline; everything else is the same. Loss = `-reward_weight * reward` (+ `--pretrain_loss_weight` times the rectified-flow loss on
`--pretrain_data_dir`, ImageReward's ReFL regulariser). Only the LoRA on the generator's transformer trains.

Every `--validation_steps` the current generator samples `--validation_prompts_file` prompts with fixed seeds; the
mean proxy reward (the training reward; DiNa-LRM with fixed noise) and, with `--golden_metric path.py:function`
(a callable `(PIL image, prompt) -> float` independent of the reward), the golden metric are logged to the
trackers and plotted to `<output_dir>/refl_curves.png`. The LoRA is saved with
`StableDiffusion3Pipeline.save_lora_weights` (load it with `pipe.load_lora_weights(output_dir)`).
"""

import argparse
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from dinalrm.alignment import (
    RewardFn,
    Sampler,
    decode_latents,
    encode_generator_prompts,
    load_pixel_reward,
    load_reward_model,
    plot_curves,
    refl_step,
)
from pipeline_dinalrm import DiNaLRMPipeline


logger = get_logger(__name__)

HISTORY_FILE = "refl_history.json"
CURVES_FILE = "refl_curves.png"


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="SD3 pipeline: Hub id or folder.")
    parser.add_argument("--revision", default=None)
    parser.add_argument(
        "--reward",
        default="dinalrm",
        choices=("dinalrm", "pixel"),
        help="dinalrm: DiNa-LRM on the latent (--reward_model); pixel: the pixel CNN on the decode (--pixel_reward).",
    )
    parser.add_argument("--reward_model", default=None, help="DiNa-LRM repo (Hub layout) or reward_model folder.")
    parser.add_argument("--pixel_reward", default=None, help="Pixel CNN written by pixel_baseline.py --save_model.")
    parser.add_argument("--prompts_file", required=True, help="Training prompts, one per line.")
    parser.add_argument("--validation_prompts_file", default=None, help="Default: the first 16 training prompts.")
    parser.add_argument("--output_dir", default="refl-lora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--max_sequence_length", type=int, default=128, help="T5 tokens for the generator.")
    parser.add_argument("--num_inference_steps", type=int, default=28)
    parser.add_argument("--guidance_scale", type=float, default=4.5)
    parser.add_argument(
        "--stop_step_range",
        type=int,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="Stop step drawn uniformly in [MIN, MAX] (0-based); default: the last step.",
    )
    parser.add_argument(
        "--grad_steps", type=int, default=1, help="Denoising steps, ending at the stop step, that run with gradients."
    )
    parser.add_argument("--reward_t", type=float, default=0.4, help="DiNa-LRM noise level t*.")
    parser.add_argument("--reward_weight", type=float, default=1.0)
    parser.add_argument(
        "--reward_noise_sharing",
        default="none",
        choices=("none", "prompt"),
        help="reward_fn's noise_sharing: one reward noise per sample (default) or one per prompt of the batch.",
    )
    parser.add_argument(
        "--samples_per_prompt",
        type=int,
        default=1,
        help="Samples of each prompt in a batch (divides --train_batch_size); >1 gives prompt groups, as GRPO does.",
    )
    parser.add_argument(
        "--pretrain_loss_weight",
        type=float,
        default=0.0,
        help="Weight of the rectified-flow loss on --pretrain_data_dir (0 = off).",
    )
    parser.add_argument(
        "--pretrain_data_dir",
        default=None,
        help="Parquet/image dataset folder with `prompt` and `image` columns (the regulariser's data).",
    )
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--lora_alpha", type=float, default=None, help="Default: the rank.")
    parser.add_argument(
        "--lora_target_modules", default="to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"
    )
    parser.add_argument("--train_batch_size", type=int, default=2, help="Prompts per device per step.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=200)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"))
    parser.add_argument("--validation_steps", type=int, default=25)
    parser.add_argument("--num_validation_prompts", type=int, default=16)
    parser.add_argument("--golden_metric", default=None, help="`path/to/file.py:function` scoring (image, prompt).")
    parser.add_argument("--report_to", default="tensorboard")
    parser.add_argument("--logging_dir", default="logs")
    args = parser.parse_args(input_args)
    if args.reward == "dinalrm" and args.reward_model is None:
        parser.error("--reward dinalrm needs --reward_model.")
    if args.reward == "pixel" and args.pixel_reward is None:
        parser.error("--reward pixel needs --pixel_reward (a CNN from pixel_baseline.py --save_model).")
    if args.pretrain_loss_weight > 0 and args.pretrain_data_dir is None:
        parser.error("--pretrain_loss_weight needs --pretrain_data_dir.")
    if args.grad_steps < 1:
        parser.error("--grad_steps must be at least 1.")
    if args.samples_per_prompt < 1 or args.train_batch_size % args.samples_per_prompt:
        parser.error("--samples_per_prompt must be a positive divisor of --train_batch_size.")
    return args


def read_prompts(path: str) -> list[str]:
    prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts.")
    return prompts


def load_golden_metric(spec: str | None):
    """`file.py:function` -> the callable, or None."""
    if spec is None:
        return None
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise ValueError(f"--golden_metric must look like path/to/file.py:function, got {spec!r}.")
    module_name = f"golden_metric_{Path(path).stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def build_reward(
    args: argparse.Namespace, pipe: StableDiffusion3Pipeline, prompts: list[str], device, weight_dtype: torch.dtype
) -> RewardFn:
    """The training reward `(x0, prompts, generator) -> (B,)` of one-step clean latents, differentiable in `x0`:
    DiNa-LRM in latent space (noised to `--reward_t` with `generator`), or the pixel CNN on the VAE decode. The
    reward's prompt embeddings are computed once for every prompt in `prompts`; the reward model (and, for the pixel
    CNN, the VAE) is frozen."""
    row = {p: i for i, p in enumerate(prompts)}
    if args.reward == "pixel":
        model = load_pixel_reward(args.pixel_reward).to(device).requires_grad_(False)
        embeds = encode_generator_prompts(pipe, prompts, args, device)[0].chunk(2)[1].float()
        if embeds[0].numel() != model.text[1].in_features:
            raise ValueError(
                f"{args.pixel_reward} reads {model.text[1].in_features} text features per prompt but the generator's "
                f"prompt embeddings have {tuple(embeds.shape[1:])}: pass the --max_sequence_length it was trained with."
            )
        pipe.vae.requires_grad_(False)
        if args.gradient_checkpointing:
            pipe.vae.enable_gradient_checkpointing()

        def pixel_reward(x0: torch.Tensor, batch_prompts: list[str], generator: torch.Generator) -> torch.Tensor:
            rows = torch.tensor([row[p] for p in batch_prompts], device=device)
            return model(decode_latents(pipe.vae, x0).float().clamp(-1, 1), embeds[rows])

        return pixel_reward

    reward_pipe = DiNaLRMPipeline.from_sd3(pipe, load_reward_model(args.reward_model).to(device, weight_dtype))
    reward_pipe.reward_model.requires_grad_(False).eval()
    with torch.no_grad():
        reward_embeds, reward_pooled = reward_pipe.encode_prompt(prompts, device=device)

    def dinalrm_reward(x0: torch.Tensor, batch_prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        rows = torch.tensor([row[p] for p in batch_prompts], device=device)
        return reward_pipe.reward_fn(
            x0.to(weight_dtype),
            prompt_embeds=reward_embeds[rows],
            pooled_prompt_embeds=reward_pooled[rows],
            t=args.reward_t,
            generator=generator,
            noise_sharing=args.reward_noise_sharing,
        )

    return dinalrm_reward


def pretraining_loss(pipe, transformer, batch: dict, args, generator, device) -> torch.Tensor:
    """Rectified-flow loss (velocity target noise - x0, logit-normal t on the shift-scheduler table) on real data."""
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(batch["image"], height=args.height, width=args.width).to(device)
        x0 = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.mode()
        x0 = (x0 - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(
            batch["prompt"],
            None,
            None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=args.max_sequence_length,
        )
    table = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    u = compute_density_for_timestep_sampling("logit_normal", x0.shape[0], logit_mean=0.0, logit_std=1.0)
    index = (u * table.config.num_train_timesteps).long().clamp_max(len(table.timesteps) - 1)
    sigma = table.sigmas[index].to(device, x0.dtype).view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
    prediction = transformer(
        hidden_states=(1 - sigma) * x0 + sigma * noise,
        timestep=table.timesteps[index].to(device),
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        return_dict=False,
    )[0]
    return F.mse_loss(prediction.float(), (noise - x0).float())


def main(args: argparse.Namespace) -> list[dict]:
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to or None,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed, device_specific=True)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    pipe = StableDiffusion3Pipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, dtype=weight_dtype
    )
    pipe.set_progress_bar_config(disable=True)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name)
        if module is not None:
            module.requires_grad_(False).eval().to(device)

    transformer = pipe.transformer.to(device)
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha or args.lora_rank,
            init_lora_weights="gaussian",
            target_modules=args.lora_target_modules.split(","),
        )
    )
    lora_parameters = [p for p in transformer.parameters() if p.requires_grad]
    for p in lora_parameters:
        p.data = p.data.float()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(lora_parameters, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)

    prompts = read_prompts(args.prompts_file)
    validation_prompts = (read_prompts(args.validation_prompts_file) if args.validation_prompts_file else prompts)[
        : args.num_validation_prompts
    ]
    reward_of = build_reward(args, pipe, list(dict.fromkeys(prompts + validation_prompts)), device, weight_dtype)
    golden = load_golden_metric(args.golden_metric)
    pretrain_data = None
    if args.pretrain_loss_weight > 0:
        pretrain_data = datasets.load_dataset(args.pretrain_data_dir, split="train").shuffle(seed=args.seed)
    sampler = Sampler(pipe, args)
    rank_generator = torch.Generator().manual_seed(args.seed * 1000 + accelerator.process_index)

    @torch.no_grad()
    def validate(step: int) -> dict:
        """Fixed-seed samples of the validation prompts: mean proxy reward and golden metric."""
        unwrapped = accelerator.unwrap_model(transformer).eval()
        embeds, pooled = encode_generator_prompts(pipe, validation_prompts, args, device)
        generator = torch.Generator().manual_seed(args.seed + 12345)
        x0 = sampler.sample_x0(unwrapped, embeds, pooled, args.num_inference_steps - 1, generator, grad=False)
        record = {
            "step": step,
            "proxy_reward": float(reward_of(x0, validation_prompts, torch.Generator().manual_seed(args.seed)).mean()),
        }
        if golden is not None:
            images = pipe.image_processor.postprocess(decode_latents(pipe.vae, x0), output_type="pil")
            record["golden_metric"] = sum(golden(im, p) for im, p in zip(images, validation_prompts)) / len(images)
        unwrapped.train()
        return record

    if accelerator.is_main_process:
        accelerator.init_trackers(
            "dinalrm-refl", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )
    history = [validate(0)] if accelerator.is_main_process else []
    if history:
        accelerator.log({f"validation/{k}": v for k, v in history[-1].items() if k != "step"}, step=0)
        logger.info(f"validation {history[-1]}")
    transformer.train()
    stop_low, stop_high = args.stop_step_range or (args.num_inference_steps - 1,) * 2
    for step in range(1, args.max_train_steps + 1):
        with accelerator.accumulate(transformer):
            num_prompts = args.train_batch_size // args.samples_per_prompt
            index = torch.randint(0, len(prompts), (num_prompts,), generator=rank_generator)
            batch_prompts = [prompts[i] for i in index.repeat_interleave(args.samples_per_prompt).tolist()]
            embeds, pooled = encode_generator_prompts(pipe, batch_prompts, args, device)
            stop = int(torch.randint(stop_low, stop_high + 1, (1,), generator=rank_generator))
            step_output = refl_step(
                sampler,
                transformer,
                embeds,
                pooled,
                batch_prompts,
                reward_of,
                stop,
                rank_generator,
                args.reward_weight,
            )
            loss, reward = step_output.loss, step_output.reward
            logs = {"train/proxy_reward": float(reward.detach().mean()), "train/stop_step": stop}
            if pretrain_data is not None:
                rows = torch.randint(
                    0, len(pretrain_data), (args.train_batch_size,), generator=rank_generator
                ).tolist()
                batch = pretrain_data[rows]
                batch["image"] = [im.convert("RGB") for im in batch["image"]]
                pretrain = pretraining_loss(pipe, transformer, batch, args, rank_generator, device)
                loss = loss + args.pretrain_loss_weight * pretrain
                logs["train/pretrain_loss"] = float(pretrain.detach())
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(lora_parameters, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        accelerator.log(logs, step=step)
        if accelerator.is_main_process and (step % args.validation_steps == 0 or step == args.max_train_steps):
            history.append(validate(step))
            accelerator.log({f"validation/{k}": v for k, v in history[-1].items() if k != "step"}, step=step)
            logger.info(f"validation {history[-1]}")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(transformer)
        StableDiffusion3Pipeline.save_lora_weights(
            args.output_dir, transformer_lora_layers=get_peft_model_state_dict(unwrapped)
        )
        Path(args.output_dir, HISTORY_FILE).write_text(json.dumps(history, indent=2))
        plot_curves(history, os.path.join(args.output_dir, CURVES_FILE))
    accelerator.end_training()
    return history


if __name__ == "__main__":
    main(parse_args())
