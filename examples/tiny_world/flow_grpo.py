"""Flow-GRPO(-Fast) on the tiny SD3 generator, with the tiny DiNa-LRM (or the pixel CNN baseline) as the reward.

    python examples/tiny_world/flow_grpo.py train --generator assets/tiny-sd3 --reward_model assets/dinalrm-tiny \\
        --output_dir outputs/flow-grpo
    python examples/tiny_world/flow_grpo.py train --generator assets/tiny-sd3 --pixel_reward pixel.safetensors \\
        --output_dir outputs/flow-grpo-pixel
    python examples/tiny_world/flow_grpo.py summarize --run dinalrm=outputs/flow-grpo \\
        --run pixel=outputs/flow-grpo-pixel --output results_flow_grpo.json --plot flow_grpo_curves.png

Every step draws `--prompts_per_step` training prompts and `--group_size` samples of each. Sampling follows the
ODE except on a window of `--sde_window_size` consecutive steps (its start drawn in `[0, --sde_window_range -
size]`, Flow-GRPO-Fast), where `dinalrm.alignment.flow_sde.sde_step` draws the next state and records its log-probability.
The final latents are scored (DiNa-LRM through `dinalrm.alignment.rewards.flow_grpo_latent_reward`, one reward noise per
prompt group; or the pixel CNN on decoded images), advantages are normalised within each prompt group, and each
window step gets one PPO-style update: clipped ratio of new to old log-probabilities, plus `--beta` times the KL
to the reference policy (the same transformer with its LoRA disabled). Validation (ODE samples of held-out prompts
with fixed seeds) logs the proxy reward and the oracle golden metric (`domain.oracle_score`), as ReFL does.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline
from domain import IMAGE_SIZE, oracle_score, split_prompts
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from pixel_baseline import encode as encode_pixel_prompts
from tiny_world_common import TOKEN_LENGTH, decode_latents, report, set_threads, tensor_to_images

from dinalrm.alignment import (
    Sampler,
    SamplingSettings,
    encode_generator_prompts,
    gaussian_kl,
    group_advantages,
    grpo_loss,
    load_pixel_reward,
    load_reward_model,
    plot_curves,
    sde_step,
)
from dinalrm.alignment.rewards import flow_grpo_latent_reward
from modeling_dinalrm import DEFAULT_LORA_TARGET_MODULES
from pipeline_dinalrm import DiNaLRMPipeline


logger = logging.getLogger(__name__)

HISTORY_FILE = "flow_grpo_history.json"
CURVES_FILE = "flow_grpo_curves.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run Flow-GRPO")
    train.add_argument("--generator", required=True, help="SD3 pipeline folder (the tiny generator)")
    reward = train.add_mutually_exclusive_group(required=True)
    reward.add_argument("--reward_model", help="DiNa-LRM repo or reward_model folder")
    reward.add_argument("--pixel_reward", help="pixel CNN written by pixel_baseline.py --save_model")
    train.add_argument("--output_dir", required=True)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max_train_steps", type=int, default=40)
    train.add_argument("--prompts_per_step", type=int, default=8)
    train.add_argument("--group_size", type=int, default=4, help="samples per prompt (GRPO group)")
    train.add_argument("--num_inference_steps", type=int, default=12)
    train.add_argument("--guidance_scale", type=float, default=4.0)
    train.add_argument("--noise_level", type=float, default=0.7, help="Flow-GRPO's SDE noise level a")
    train.add_argument("--sde_window_size", type=int, default=2, help="SDE steps per rollout (the rest is ODE)")
    train.add_argument("--sde_window_range", type=int, default=6, help="the window lies in the first N steps")
    train.add_argument("--clip_range", type=float, default=1e-4, help="PPO clip of the probability ratio")
    train.add_argument("--beta", type=float, default=0.04, help="weight of the KL to the reference policy")
    train.add_argument("--reward_t", type=float, default=0.4, help="DiNa-LRM noise level")
    train.add_argument("--learning_rate", type=float, default=1e-3)
    train.add_argument("--lora_rank", type=int, default=8)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--validation_steps", type=int, default=10)
    train.add_argument("--num_validation_prompts", type=int, default=32)
    train.add_argument("--threads", type=int, default=1)
    summarize = commands.add_parser("summarize", help="combine runs into one JSON and one plot")
    summarize.add_argument("--run", action="append", required=True, metavar="NAME=DIR")
    summarize.add_argument("--output", required=True, help="results JSON")
    summarize.add_argument("--plot", required=True, help="curves PNG")
    args = parser.parse_args(argv)
    if args.command == "train":
        if args.max_train_steps < 1 or args.group_size < 2 or args.prompts_per_step < 1:
            parser.error("--max_train_steps and --prompts_per_step must be >= 1 and --group_size >= 2.")
        if not 1 <= args.sde_window_size <= args.sde_window_range <= args.num_inference_steps:
            parser.error("need 1 <= --sde_window_size <= --sde_window_range <= --num_inference_steps.")
    return args


class Rewards:
    """The training reward of final latents: DiNa-LRM in latent space, or the pixel CNN on decoded images."""

    def __init__(self, pipe: StableDiffusion3Pipeline, args: argparse.Namespace, prompts: list[str]):
        self.pipe = pipe
        self.rows = {p: i for i, p in enumerate(prompts)}
        self.model = None
        if args.reward_model:
            reward_pipe = DiNaLRMPipeline.from_sd3(pipe, load_reward_model(args.reward_model))
            with torch.no_grad():
                self.embeds, self.pooled = reward_pipe.encode_prompt(prompts)
            self.reward_pipe, self.t = reward_pipe, args.reward_t
            self.name = "DiNa-LRM"
        else:
            self.model = load_pixel_reward(args.pixel_reward)
            self.embeds = encode_pixel_prompts(pipe, prompts)
            self.name = "pixel CNN"

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        rows = torch.tensor([self.rows[p] for p in prompts])
        if self.model is not None:
            return self.model(decode_latents(self.pipe.vae, latents).clamp(-1, 1), self.embeds[rows])
        seed = int(torch.randint(0, 2**31, (1,), generator=generator))
        score = flow_grpo_latent_reward(self.reward_pipe, t=self.t, normalize=False, seed=seed)
        return score(latents, self.embeds[rows], self.pooled[rows], None)[0]


def rollout(sampler: Sampler, transformer, embeds, pooled, window: range, args, generator):
    """ODE sampling with SDE steps on `window`; returns the final latents and, per window step, the transition
    `(step, latents, next latents, log-prob)`."""
    sigmas, timesteps = sampler.sigmas(embeds.device)
    latents = torch.randn((embeds.shape[0] // 2, *sampler.latent_shape), generator=generator)
    transitions = []
    for i in range(args.num_inference_steps):
        v = sampler.velocity(transformer, latents, timesteps[i], embeds, pooled)
        if i in window:
            following, log_prob, _, _ = sde_step(v, sigmas[i], sigmas[i + 1], latents, args.noise_level, generator)
            transitions.append((i, latents, following, log_prob))
            latents = following
        else:
            latents = latents + (sigmas[i + 1] - sigmas[i]) * v
    return latents, transitions


def train(args: argparse.Namespace) -> list[dict]:
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusion3Pipeline.from_pretrained(args.generator)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        module.requires_grad_(False).eval()
    train_prompts, held_out = split_prompts()
    validation_prompts = held_out[: args.num_validation_prompts]
    rewards = Rewards(pipe, args, train_prompts + validation_prompts)

    transformer = pipe.transformer
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_rank,
            init_lora_weights="gaussian",
            target_modules=DEFAULT_LORA_TARGET_MODULES,
        )
    )
    lora_parameters = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_parameters, lr=args.learning_rate, weight_decay=1e-4)
    sampler_args = SamplingSettings(
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        max_sequence_length=TOKEN_LENGTH,
    )
    sampler = Sampler(pipe, sampler_args)
    generator = torch.Generator().manual_seed(args.seed)

    @torch.no_grad()
    def validate(step: int) -> dict:
        transformer.eval()
        embeds, pooled = encode_generator_prompts(pipe, validation_prompts, sampler_args, "cpu")
        sample_generator = torch.Generator().manual_seed(args.seed + 12345)
        x0 = sampler.sample_x0(transformer, embeds, pooled, args.num_inference_steps - 1, sample_generator, False)
        proxy = rewards(x0, validation_prompts, torch.Generator().manual_seed(args.seed))
        images = tensor_to_images(decode_latents(pipe.vae, x0))
        golden = sum(oracle_score(im, p) for im, p in zip(images, validation_prompts)) / len(images)
        transformer.train()
        return {"step": step, "proxy_reward": float(proxy.mean()), "golden_metric": golden}

    history, train_log = [validate(0)], []
    logger.info("validation %s", history[-1])
    start = time.time()
    for step in range(1, args.max_train_steps + 1):
        index = torch.randint(0, len(train_prompts), (args.prompts_per_step,), generator=generator)
        prompts = [train_prompts[i] for i in index.repeat_interleave(args.group_size).tolist()]
        embeds, pooled = encode_generator_prompts(pipe, prompts, sampler_args, "cpu")
        first = int(torch.randint(0, args.sde_window_range - args.sde_window_size + 1, (1,), generator=generator))
        with torch.no_grad():
            x0, transitions = rollout(
                sampler, transformer, embeds, pooled, range(first, first + args.sde_window_size), args, generator
            )
            reward = rewards(x0, prompts, generator)
        advantages = group_advantages(reward, args.group_size)
        sigmas, timesteps = sampler.sigmas("cpu")
        clipped = 0.0
        for i, latents, following, old_log_prob in transitions:
            v = sampler.velocity(transformer, latents, timesteps[i], embeds, pooled)
            _, log_prob, mean, std = sde_step(
                v, sigmas[i], sigmas[i + 1], latents, args.noise_level, prev_sample=following
            )
            kl = None
            if args.beta > 0:
                with torch.no_grad():
                    transformer.disable_adapters()
                    reference = sde_step(
                        sampler.velocity(transformer, latents, timesteps[i], embeds, pooled),
                        sigmas[i],
                        sigmas[i + 1],
                        latents,
                        args.noise_level,
                        prev_sample=following,
                    )[2]
                    transformer.enable_adapters()
                kl = gaussian_kl(mean, reference, std)
            update = grpo_loss(log_prob, old_log_prob, advantages, args.clip_range, kl, args.beta)
            optimizer.zero_grad(set_to_none=True)
            update.loss.backward()
            torch.nn.utils.clip_grad_norm_(lora_parameters, args.max_grad_norm)
            optimizer.step()
            clipped += update.clip_fraction / len(transitions)
        train_log.append({"step": step, "reward": float(reward.mean()), "clip_fraction": clipped})
        logger.info("step %d reward %.4f clip fraction %.3f", step, reward.mean(), clipped)
        if step % args.validation_steps == 0 or step == args.max_train_steps:
            history.append(validate(step))
            logger.info("validation %s", history[-1])

    output = Path(args.output_dir)
    StableDiffusion3Pipeline.save_lora_weights(output, transformer_lora_layers=get_peft_model_state_dict(transformer))
    record = {"reward": rewards.name, "args": vars(args), "train_seconds": time.time() - start}
    output.joinpath(HISTORY_FILE).write_text(
        json.dumps({**record, "validation": history, "train": train_log}, indent=2)
    )
    plot_curves(history, str(output / CURVES_FILE), xlabel="Flow-GRPO step")
    return history


def summarize(args: argparse.Namespace) -> dict:
    """One JSON with each run's validation curve, first and last figures; one plot with a panel per run's proxy
    reward (their scales differ) and the golden metric of all runs together."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for spec in args.run:
        name, _, folder = spec.partition("=")
        runs[name] = json.loads(Path(folder, HISTORY_FILE).read_text())
    figure, axes = plt.subplots(1, len(runs) + 1, figsize=(4.5 * (len(runs) + 1), 3.5))
    result = {}
    for axis, (name, run) in zip(axes, runs.items()):
        history = run["validation"]
        steps = [h["step"] for h in history]
        axis.plot(steps, [h["proxy_reward"] for h in history], marker="o")
        axis.set_title(f"{name} run: proxy reward")
        axes[-1].plot(steps, [h["golden_metric"] for h in history], marker="o", label=name)
        result[name] = {
            "reward": run["reward"],
            "proxy_reward": [history[0]["proxy_reward"], history[-1]["proxy_reward"]],
            "golden_metric": [history[0]["golden_metric"], history[-1]["golden_metric"]],
            "best_golden_metric": max(h["golden_metric"] for h in history),
            "train_seconds": run["train_seconds"],
            "validation": history,
            "args": run["args"],
        }
    axes[-1].set_title("golden metric (oracle, held-out prompts)")
    axes[-1].legend()
    for axis in axes:
        axis.set_xlabel("Flow-GRPO step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.plot, dpi=100)
    plt.close(figure)
    report(result, args.output)
    return result


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    parsed = parse_args()
    train(parsed) if parsed.command == "train" else summarize(parsed)
