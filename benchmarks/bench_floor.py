#!/usr/bin/env python
"""How far `DiNaLRMModel` is from the physical floor of the method, on the medium random SD3 setup.

The floor is the bare minimum DiNa-LRM needs: the same truncated diffusers blocks (patch + time/text embedders and
the first `N` `JointTransformerBlock`s of the saved `SD3Transformer2DModel`) called directly, with no reward head,
no input checks and no wrappers. Three workloads, timed interleaved in ONE process (ours, floor, ours, ...) so
that load from other processes hits both sides alike:

- scoring: `score_latents(t=0.4)` vs one floor forward at equal batch;
- ensemble: `score_latents(t=[0.2, 0.5, 0.7])` vs three floor forwards at equal batch;
- training: forward + backward of a preference step (chosen + rejected, LoRA + head trainable) vs floor forward +
  backward of the same `2 x batch` samples (batch = pairs) through the blocks carrying the same LoRA.

Prints the medians and the ours / floor ratio for every batch size and latent size (targets: scoring and ensemble
<= 1.10x, training <= 1.20x). `--flops` adds the ours / floor ratio of FLOPs (`FlopCounterMode`, one more call per
side): the part of the time ratio that is the reward head's own arithmetic, which the floor leaves out. `--profile`
adds a `torch.profiler` table of the top operators of each side at the first setting, which shows where the
difference goes.

    python benchmarks/bench_floor.py [--batch_sizes 1,8,32] [--latent_sizes 32,64] [--repeats 3] [--flops] [--profile]
"""

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from bench_model import LEVELS, build_model


def floor_forward(transformer, num_layers: int, latents, prompt_embeds, pooled, timestep) -> torch.Tensor:
    """The truncated diffusers blocks run directly: what any reward on these features must compute."""
    hidden = transformer.pos_embed(latents)
    temb = transformer.time_text_embed(timestep, pooled)
    context = transformer.context_embedder(prompt_embeds)
    for block in transformer.transformer_blocks[:num_layers]:
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
    return hidden


def build_floor(
    folder: str,
    num_layers: int,
    lora_targets: list[str] | None = None,
    rank: int = 16,
    alpha: int = 32,
    subfolder: str | None = None,
):
    """The saved transformer (random medium weights, same as the model's) cut to its first `num_layers` blocks,
    with LoRA of `rank` / `alpha` on `lora_targets` (module names inside the transformer) when given."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder=subfolder).eval()
    del transformer.transformer_blocks[num_layers:]
    transformer.requires_grad_(False)
    if lora_targets:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora_targets), transformer)
        for name, param in transformer.named_parameters():
            param.requires_grad_(".lora_" in name)
    return transformer


def workloads(model, transformer, config: dict, batch: int, size: int, tokens: int):
    """`{name: (ours, floor)}` zero-argument callables for one batch size and latent size."""
    generator = torch.Generator().manual_seed(0)
    pair_latents = torch.randn(2 * batch, config["in_channels"], size, size, generator=generator)
    pair_prompt = torch.randn(2 * batch, tokens, config["joint_attention_dim"], generator=generator)
    pair_pooled = torch.randn(2 * batch, config["pooled_projection_dim"], generator=generator)
    latents, prompt, pooled = pair_latents[:batch], pair_prompt[:batch], pair_pooled[:batch]
    n = model.config.num_backbone_layers
    timestep = torch.full((2 * batch,), 400.0)
    pair_t = torch.full((2 * batch,), 0.4)

    @torch.no_grad()
    def ours_single():
        model.score_latents(latents, prompt, pooled, t=0.4, generator=generator, check_finite=False)

    @torch.no_grad()
    def floor_single():
        floor_forward(transformer, n, latents, prompt, pooled, timestep[:batch])

    @torch.no_grad()
    def ours_ensemble():
        model.score_latents(latents, prompt, pooled, t=LEVELS, generator=generator, check_finite=False)

    @torch.no_grad()
    def floor_ensemble():
        for _ in LEVELS:
            floor_forward(transformer, n, latents, prompt, pooled, timestep[:batch])

    def ours_train():
        rewards = model(pair_latents, pair_t, pair_prompt, pair_pooled, check_finite=False).rewards
        model.preference_loss(rewards[:batch], rewards[batch:], pair_t[:batch]).backward()
        model.zero_grad(set_to_none=True)

    def floor_train():
        hidden = floor_forward(transformer, n, pair_latents, pair_prompt, pair_pooled, timestep)
        F.logsigmoid(hidden.mean()).backward()
        transformer.zero_grad(set_to_none=True)

    return {
        "scoring": (ours_single, floor_single),
        "3-level ensemble": (ours_ensemble, floor_ensemble),
        "training step": (ours_train, floor_train),
    }


def interleaved(ours, floor, repeats: int) -> tuple[float, float]:
    """Median seconds of each side, alternating which side runs first in each round."""
    ours(), floor()  # warm-up
    times = {ours: [], floor: []}
    for round_ in range(repeats):
        for fn in (ours, floor) if round_ % 2 == 0 else (floor, ours):
            start = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - start)
    return statistics.median(times[ours]), statistics.median(times[floor])


def flops(fn, modules: list[torch.nn.Module], with_grad: bool) -> int:
    """FLOPs of one call of `fn`. A workload without gradients is counted with `modules` frozen: the counter's module
    tracker rejects the grad-less views that no-grad mode makes of trainable parameters."""
    from torch.utils.flop_counter import FlopCounterMode

    trainable = [p for module in modules for p in module.parameters() if p.requires_grad]
    if not with_grad:
        for param in trainable:
            param.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for param in trainable:
            param.requires_grad_(True)
    return counter.get_total_flops()


def profile(fn, label: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        fn()
    print(f"\n--- {label}: top {rows} operators by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", default="1,8,32")
    parser.add_argument("--latent_sizes", default="32,64", help="latent height = width (image size / 8)")
    parser.add_argument("--tokens", type=int, default=154, help="prompt tokens (77 CLIP + 77 T5)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workloads", default="scoring,3-level ensemble,training step")
    parser.add_argument("--flops", action="store_true", help="also print the ours / floor ratio of FLOPs")
    parser.add_argument("--profile", action="store_true", help="profile both sides at the first setting")
    parser.add_argument("--profile_rows", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="batch 1, 16x16 latents, 16 tokens, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.latent_sizes, args.tokens, args.repeats = "1", "16", 16, 1
    torch.set_num_threads(args.threads)
    wanted = args.workloads.split(",")

    with tempfile.TemporaryDirectory() as folder:
        model, config = build_model(folder)
        model.add_lora(rank=16, alpha=32)
        targets = [f"transformer_blocks.{name.split('transformer_blocks.', 1)[1]}" for name in model.lora_layers()]
        floor = build_floor(
            folder, model.config.num_backbone_layers, targets, model.config.lora_rank, model.config.lora_alpha
        )
    model.train()  # dropout is 0: train mode changes nothing but the autograd graph
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"medium SD3: {model.config.num_backbone_layers} blocks of width {model.config.backbone_width}, LoRA rank 16 "
        f"({trainable / 1e6:.2f}M trainable with the head), {args.tokens} prompt tokens, {args.threads} threads, "
        f"median of {args.repeats}, interleaved"
    )
    print(
        f"{'workload':<18}{'batch':>6}{'latent':>8}{'ours s':>10}{'floor s':>10}{'ours/floor':>12}"
        + (f"{'FLOPs ours/floor':>18}" if args.flops else "")
    )
    for size in map(int, args.latent_sizes.split(",")):
        for batch in map(int, args.batch_sizes.split(",")):
            for name, (ours, floor_fn) in workloads(model, floor, config, batch, size, args.tokens).items():
                if name not in wanted:
                    continue
                if args.profile:
                    profile(ours, f"ours, {name}, batch {batch}, latent {size}", args.profile_rows)
                    profile(floor_fn, f"floor, {name}, batch {batch}, latent {size}", args.profile_rows)
                ours_s, floor_s = interleaved(ours, floor_fn, args.repeats)
                flop_ratio = ""
                if args.flops:
                    with_grad = name == "training step"
                    ratio = flops(ours, [model, floor], with_grad) / flops(floor_fn, [model, floor], with_grad)
                    flop_ratio = f"{ratio:>17.3f}x"
                print(
                    f"{name:<18}{batch:>6}{size:>8}{ours_s:>10.4f}{floor_s:>10.4f}{ours_s / floor_s:>11.2f}x"
                    + flop_ratio,
                    flush=True,
                )
            if args.profile:
                return


if __name__ == "__main__":
    main()
