#!/usr/bin/env python
"""Side by side with the reference implementation (github.com/HKUST-C4G/diffusion-rm) on one CPU.

Both sides run the same random medium SD3 setup (`save_tiny_sd3_pipeline(size="medium")`: 7 of 8 blocks kept,
features after blocks 2, 4 and 7, 4 queries, 4 head attention heads, LoRA rank 16 on the reference's targets). The
reference's checkpoint is written by the reference's own classes (`SD3RewardModel`: its PEFT adapter and
`rm_head.pt`) and converted for our side with `convert_official_checkpoint`, so both score the same weights.
Workloads, each in a fresh process per side, sides alternating, `--repeats` rounds:

- load: from files on disk to a model ready to score latents (reference: `StableDiffusion3Pipeline.from_pretrained`
  + `SD3RewardModel` + `load_adapter` + `rm_head.pt`, as its `DRMInferencer` does; ours:
  `DiNaLRMModel.from_pretrained` of the converted checkpoint);
- single / ensemble: scoring `--batch_size` latents at t = 0.4 / at t = 0.2, 0.5, 0.7 (reference: `forward` /
  `forward_ensemble`);
- train: one optimiser step of a Thurstone preference batch with LoRA + head trainable, as each trainer runs it
  (reference: its engine's `encode_prompt` of the batch's prompts with the resident text encoders, then two
  forwards, chosen then rejected; ours: `preference_step`'s one batched forward on the prompts' compact cached
  features (the frozen context embedder's output, as `train_dinalrm.py` caches them), with no text encoder
  loaded; with `--gradient_checkpointing`, ours recomputes the blocks' activations in the backward instead of
  keeping them).

Every side reads the same prompt embeddings (205 tokens: 77 CLIP + 128 T5, as the reference's `encode_prompt`
makes them; computed once in `prepare`, which is what our feature cache holds).

A third side, the floor, runs each workload as `bench_floor.py` defines it: the saved transformer cut to its first
7 blocks with the same LoRA, called directly (no head, no checks; training: forward + backward of the pairs' samples
and the optimiser step). No implementation of the method can do less, so reference / floor bounds what any rewrite
could gain over the reference on that workload.

No reference file is edited; its package `__init__` (which imports scikit-learn for inference utilities) is
bypassed by importing `diffusion_rm.models.sd3_rm` directly. Prints median seconds and peak resident set size per
side, the reference / ours ratios (> 1 means we are faster or smaller) and the reference / floor bounds.

    git clone https://github.com/HKUST-C4G/diffusion-rm CHECKOUT  # needs omegaconf besides our dependencies
    python benchmarks/bench_vs_reference.py --reference_dir CHECKOUT [--repeats 3] [--batch_size 4]
"""

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path


WORKLOADS = ("load", "single", "ensemble", "train")
SIDES = ("reference", "ours", "floor")
LEVELS = [0.2, 0.5, 0.7]
PROMPTS = (
    "a red cube on a blue sphere",
    "a watercolor fox in the snow",
    "two cups of coffee on a wooden table",
    "a lighthouse at night, long exposure",
)
MODEL_CONFIG = {
    "model_type": "thurstone",
    "num_transformer_layers": 7,
    "freeze_backbone": False,
    "use_lora": True,
    "use_text_features": True,
    "lora_config": {"r": 16, "lora_alpha": 32, "init_lora_weights": "gaussian"},
    "use_logistic": False,
    "visual_head_idx": [2, 4, 7],
    "text_head_idx": [2, 4, 7],
    "use_t_embed": True,
    "reward_head": {"use_proj_in": False, "width": -1, "out_dim": 1, "num_queries": 4, "num_attn_heads": 4},
}


def import_reference(reference_dir: str):
    """The reference's `sd3_rm` module, without running `diffusion_rm/__init__.py`."""
    package = Path(reference_dir) / "diffusion_rm"
    if not (package / "models" / "sd3_rm.py").is_file():
        raise SystemExit(f"{reference_dir} is not a diffusion-rm checkout: no diffusion_rm/models/sd3_rm.py in it.")
    module = types.ModuleType("diffusion_rm")
    module.__path__ = [str(package)]
    sys.modules["diffusion_rm"] = module
    from diffusion_rm.models import sd3_rm

    return sd3_rm


def reference_model(sd3_rm, root: Path, dtype):
    """The reference's model on the medium pipeline, as its trainer and inferencer build it."""
    from diffusers import StableDiffusion3Pipeline
    from omegaconf import OmegaConf

    pipeline = StableDiffusion3Pipeline.from_pretrained(root / "sd3")
    config = OmegaConf.create(MODEL_CONFIG)
    return sd3_rm.SD3RewardModel(pipeline, config, "cpu", dtype), pipeline


def reference_sigmas(scheduler, u, n_dim: int = 4):
    """The reference's `get_timesteps_from_sigma` (engine and inferencer): nearest scheduler sigma."""
    import torch

    sigmas = scheduler.sigmas
    idx = torch.argmin((sigmas[None, :] - u[:, None]).abs(), dim=1)
    timesteps, sigma = scheduler.timesteps[idx], sigmas[idx]
    return sigma.reshape(-1, *([1] * (n_dim - 1))), timesteps


def batch_prompts(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def prepare(root: Path, reference_dir: str, batch: int) -> None:
    """Medium SD3 folder, a reference checkpoint written by the reference, our conversion of it, and the embeddings
    of `batch` prompts by the reference's `encode_prompt`."""
    import torch

    from dinalrm.testing import save_tiny_sd3_pipeline
    from modeling_dinalrm import convert_official_checkpoint

    save_tiny_sd3_pipeline(root / "sd3", size="medium")
    sd3_rm = import_reference(reference_dir)
    torch.manual_seed(0)
    model, _ = reference_model(sd3_rm, root, torch.float32)
    with torch.no_grad():  # a trained-looking head: the reference zero-initialises FiLM's last layer
        for param in model.reward_head.parameters():
            param.add_(0.02 * torch.randn_like(param))
    checkpoint = root / "official" / "checkpoint"
    model.backbone.save_pretrained(checkpoint / "backbone_lora")
    torch.save(model.reward_head.state_dict(), checkpoint / "rm_head.pt")
    (root / "official" / "config.json").write_text(
        json.dumps({"model": MODEL_CONFIG, "training": {"add_noise": True}})
    )
    convert_official_checkpoint(root / "official", root / "sd3").save_pretrained(root / "ours")
    embeds = model.encode_prompt(batch_prompts(batch))
    torch.save((embeds["encoder_hidden_states"], embeds["pooled_projections"]), root / "prompt_embeds.pt")


def batch_inputs(root: Path, batch: int, size: int):
    """Random clean latents of `batch` pairs (chosen first), and the embeddings `prepare` made of their prompts."""
    import torch

    from dinalrm.testing import medium_transformer_config

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2 * batch, medium_transformer_config()["in_channels"], size, size, generator=generator)
    prompt, pooled = torch.load(root / "prompt_embeds.pt", weights_only=True)
    return latents, prompt[:batch], pooled[:batch]


def our_training_model(root: Path, gradient_checkpointing: bool = False):
    """Our reward model as `train_dinalrm.py` builds it for this setup: from the base transformer, LoRA + head."""
    from modeling_dinalrm import DiNaLRMModel

    model = DiNaLRMModel.from_backbone(
        str(root / "sd3"),
        subfolder="transformer",
        num_layers=7,
        visual_layers=[2, 4, 7],
        text_layers=[2, 4, 7],
        head_num_heads=4,
    )
    model.add_lora(16, 32)
    model.train()
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def run_side(side: str, workload: str, root: Path, options, queue) -> None:
    """Runs one side's workload in this (fresh) process; an error is passed to the parent instead of a result."""
    from bench_train import ResidentMemorySampler

    sampler = ResidentMemorySampler()  # polls /proc: ru_maxrss would include the parent's peak (fork + exec)
    try:
        result = {"reference": run_reference, "ours": run_ours, "floor": run_floor}[side](workload, root, options)
        queue.put({**result, "peak_rss_mb": sampler.stop() / 2**20})
    except BaseException as error:
        queue.put({"error": f"{type(error).__name__}: {error}"})
        raise


def run_reference(workload: str, root: Path, options) -> dict:
    import torch

    torch.set_num_threads(options.threads)
    sd3_rm = import_reference(options.reference_dir)
    start = time.perf_counter()
    model, pipeline = reference_model(sd3_rm, root, torch.float32)
    if workload != "train":
        model.backbone.load_adapter(str(root / "official" / "checkpoint" / "backbone_lora"), adapter_name="rm_lora")
        model.backbone.set_adapter("rm_lora")
        head = torch.load(root / "official" / "checkpoint" / "rm_head.pt", map_location="cpu", weights_only=True)
        model.reward_head.load_state_dict(head)
        model.eval()
    load_s = time.perf_counter() - start
    scheduler = pipeline.scheduler
    latents, prompt, pooled = batch_inputs(root, options.batch_size, options.latent_size)
    chosen, rejected = latents.chunk(2)
    noise = torch.randn_like(chosen)

    @torch.no_grad()
    def single():
        sigmas, timesteps = reference_sigmas(scheduler, torch.full((len(chosen),), 0.4))
        model(
            latents=(1 - sigmas) * chosen + sigmas * noise,
            timesteps=timesteps,
            encoder_hidden_states=prompt,
            pooled_projections=pooled,
        )

    @torch.no_grad()
    def ensemble():
        noisy, steps = [], []
        for level in LEVELS:
            sigmas, timesteps = reference_sigmas(scheduler, torch.full((len(chosen),), level))
            noisy.append((1 - sigmas) * chosen + sigmas * noise)
            steps.append(timesteps)
        model.forward_ensemble(noisy, prompt, pooled, steps)

    if workload == "train":
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train():
        text_conds = model.encode_prompt(batch_prompts(len(chosen)))  # the engine's every step
        sigmas, timesteps = reference_sigmas(scheduler, torch.rand(len(chosen)))
        scores = [
            model(latents=(1 - sigmas) * x + sigmas * noise, timesteps=timesteps, **text_conds)
            for x in (chosen, rejected)
        ]
        # The reference engine's Thurstone fidelity loss (`compute_loss`, model_type "thurstone").
        sigma = sigmas.reshape(-1, 1)
        var = 2.0 * sigma**2 + 0.05
        p = torch.distributions.Normal(0, 1).cdf((scores[0] - scores[1]) / (var + var + 1e-6) ** 0.5)
        (1.0 - torch.sqrt(p + 1e-6)).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(workload, load_s, {"single": single, "ensemble": ensemble, "train": train}, options)


def run_ours(workload: str, root: Path, options) -> dict:
    import torch

    from dinalrm.training.utils import preference_step, seeded_generator
    from modeling_dinalrm import DiNaLRMModel

    torch.set_num_threads(options.threads)
    start = time.perf_counter()
    if workload == "train":  # training starts from the base transformer, as train_dinalrm.py does
        model = our_training_model(root, options.gradient_checkpointing)
    else:
        model = DiNaLRMModel.from_pretrained(root / "ours").eval()
    load_s = time.perf_counter() - start
    latents, prompt, pooled = batch_inputs(root, options.batch_size, options.latent_size)
    chosen, rejected = latents.chunk(2)
    generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def single():
        model.score_latents(chosen, prompt, pooled, t=0.4, generator=generator)

    @torch.no_grad()
    def ensemble():
        model.score_latents(chosen, prompt, pooled, t=LEVELS, generator=generator)

    if workload == "train":
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        # The compact feature cache train_dinalrm.py writes: the frozen context embedder's output.
        with torch.no_grad():
            prompt = model.embed_context(prompt)
    batch = {
        "chosen": chosen,
        "rejected": rejected,
        "prompt_embeds": prompt,
        "pooled_prompt_embeds": pooled,
        "weights": torch.ones(len(chosen)),
    }
    steps = iter(range(10**6))

    def train():
        step = preference_step(model, model, batch, seeded_generator(0, next(steps)), context_embedded=True)
        step.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(workload, load_s, {"single": single, "ensemble": ensemble, "train": train}, options)


def run_floor(workload: str, root: Path, options) -> dict:
    import torch
    import torch.nn.functional as F
    from bench_floor import build_floor, floor_forward

    from modeling_dinalrm import DEFAULT_LORA_TARGET_MODULES

    torch.set_num_threads(options.threads)
    layers, lora = MODEL_CONFIG["num_transformer_layers"], MODEL_CONFIG["lora_config"]
    # Our default targets are the reference's (`SD3RewardModel.__init__`), on every kept block.
    targets = [f"transformer_blocks.{i}.attn.{name}" for i in range(layers) for name in DEFAULT_LORA_TARGET_MODULES]
    start = time.perf_counter()
    transformer = build_floor(str(root / "sd3"), layers, targets, lora["r"], lora["lora_alpha"], "transformer")
    load_s = time.perf_counter() - start
    latents, prompt, pooled = batch_inputs(root, options.batch_size, options.latent_size)
    chosen = latents[: options.batch_size]
    timestep = torch.full((len(latents),), 400.0)

    @torch.no_grad()
    def single():
        floor_forward(transformer, layers, chosen, prompt, pooled, timestep[: len(chosen)])

    @torch.no_grad()
    def ensemble():
        for _ in LEVELS:
            floor_forward(transformer, layers, chosen, prompt, pooled, timestep[: len(chosen)])

    if workload == "train":
        transformer.train()
        optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-4)

    def train():
        hidden = floor_forward(transformer, layers, latents, prompt.repeat(2, 1, 1), pooled.repeat(2, 1), timestep)
        F.logsigmoid(hidden.mean()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(workload, load_s, {"single": single, "ensemble": ensemble, "train": train}, options)


def measure(workload: str, load_s: float, functions: dict, options) -> dict:
    """Seconds of the workload (load: the load itself; others: median of `--steps` after a warm-up)."""
    if workload == "load":
        seconds = load_s
    else:
        fn = functions[workload]
        fn()
        times = []
        for _ in range(options.steps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
    return {"seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference_dir", required=True, help="a checkout of github.com/HKUST-C4G/diffusion-rm")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side and workload")
    parser.add_argument("--steps", type=int, default=3, help="timed calls per process after one warm-up")
    parser.add_argument("--batch_size", type=int, default=4, help="latents scored / pairs per training step")
    parser.add_argument("--latent_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="1 process per side, 1 timed call, batch 1, 16x16")
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="our train step with gradient checkpointing"
    )
    options = parser.parse_args()
    if options.quick:
        options.repeats, options.steps, options.batch_size, options.latent_size = 1, 1, 1, 16
    import_reference(options.reference_dir)  # fail early on a wrong folder

    context = multiprocessing.get_context("spawn")
    results = {(side, w): [] for side in SIDES for w in WORKLOADS}
    workloads = options.workloads.split(",")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        prepare(root, options.reference_dir, options.batch_size)
        for round_ in range(options.repeats):
            for workload in workloads:
                for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
                    if side == "floor" and workload == "load":  # the floor is defined for the computation only
                        continue
                    queue = context.Queue()
                    process = context.Process(target=run_side, args=(side, workload, root, options, queue))
                    process.start()
                    result = queue.get()
                    process.join()
                    if "error" in result:
                        raise SystemExit(f"{side} {workload} failed: {result['error']}")
                    results[side, workload].append(result)

    print(
        f"medium SD3 (7 of 8 blocks, width 256), LoRA rank 16, batch {options.batch_size}, latents "
        f"{options.latent_size}x{options.latent_size}, {options.threads} threads"
        f"{', ours with gradient checkpointing' if options.gradient_checkpointing else ''}; median of {options.repeats} fresh "
        f"processes per side (x {options.steps} calls)"
    )
    medians = {
        key: {field: statistics.median(r[field] for r in runs) for field in ("seconds", "peak_rss_mb")}
        for key, runs in results.items()
        if runs
    }
    print("time: seconds per side; reference / ours, and reference / floor (the most any implementation could gain)")
    print_table(workloads, medians, "seconds", "s", ".3f")
    print("peak resident set: MB per side; reference / ours, and reference / floor")
    print_table(workloads, medians, "peak_rss_mb", "MB", ".0f")


def print_table(workloads: list[str], medians: dict, field: str, unit: str, number: str) -> None:
    """One row per workload: each side's median `field`, reference / ours and reference / floor ("-" without a
    floor: load)."""
    print(
        f"{'workload':<10}{'ref ' + unit:>10}{'ours ' + unit:>10}{'floor ' + unit:>10}{'ref/ours':>10}{'ref/floor':>11}"
    )
    for workload in workloads:
        ref, ours = medians["reference", workload][field], medians["ours", workload][field]
        floor = medians.get(("floor", workload), {}).get(field)
        floor_value, bound = ("-", "-") if floor is None else (f"{floor:{number}}", f"{ref / floor:.2f}x")
        print(f"{workload:<10}{ref:>10{number}}{ours:>10{number}}{floor_value:>10}{ref / ours:>9.2f}x{bound:>11}")


if __name__ == "__main__":
    main()
