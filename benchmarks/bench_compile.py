#!/usr/bin/env python
"""Speed-up of `torch.compile` on the reward model's backbone, for scoring and for a training step, on CPU.

Two copies of the medium model of `bench_model.py` (same weights, LoRA rank 16 for training), one eager and one
compiled as `compile=True` / `--compile` compile it (`DiNaLRMModel.compile_repeated_blocks`: each backbone block in
place, regional compilation), timed interleaved in one process after warm-up. Prints the first compiled call's time
(compilation included) and the eager / compiled ratio of later calls (> 1: compiling wins). Timed rounds stop early
once `--time_limit` seconds are spent; `--quick` is a small smoke run.

    python benchmarks/bench_compile.py [--batch_size 4] [--latent_size 32] [--repeats 5] [--quick]
"""

import argparse
import copy
import statistics
import tempfile
import time

import torch
from bench_model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--latent_size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=154)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time_limit", type=float, default=900, help="seconds; later timed rounds are skipped")
    parser.add_argument("--quick", action="store_true", help="batch 1, 16x16 latents, 16 tokens, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.latent_size, args.tokens, args.repeats = 1, 16, 16, 2
    deadline = time.perf_counter() + args.time_limit
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        eager, config = build_model(folder)
    eager.add_lora(rank=16, alpha=32)
    compiled = copy.deepcopy(eager)
    compiled.compile_repeated_blocks()

    generator = torch.Generator().manual_seed(0)
    b, size = args.batch_size, args.latent_size
    latents = torch.randn(2 * b, config["in_channels"], size, size, generator=generator)
    prompt = torch.randn(2 * b, args.tokens, config["joint_attention_dim"], generator=generator)
    pooled = torch.randn(2 * b, config["pooled_projection_dim"], generator=generator)
    t = torch.full((2 * b,), 0.4)

    def scoring(model):
        model.eval()
        with torch.no_grad():
            model.score_latents(latents[:b], prompt[:b], pooled[:b], t=0.4, generator=generator, check_finite=False)

    def training(model):
        model.train()
        rewards = model(latents, t, prompt, pooled, check_finite=False).rewards
        model.preference_loss(rewards[:b], rewards[b:], t[:b]).backward()
        model.zero_grad(set_to_none=True)

    print(
        f"medium SD3 ({eager.config.num_backbone_layers} blocks, width 256), batch {b} (training: {b} pairs), "
        f"latents {size}x{size}, {args.threads} threads, torch {torch.__version__}, median of {args.repeats}"
    )
    for name, fn in (("scoring", scoring), ("training step", training)):
        start = time.perf_counter()
        fn(compiled)
        first = time.perf_counter() - start
        fn(eager)
        times = {"eager": [], "compiled": []}
        for round_ in range(args.repeats):
            if round_ and time.perf_counter() > deadline:
                print(f"  (time limit: {round_} rounds of {args.repeats})")
                break
            order = (("eager", eager), ("compiled", compiled))
            for label, model in order if round_ % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn(model)
                times[label].append(time.perf_counter() - start)
        e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
        print(f"{name:<14} first compiled call {first:7.1f} s; eager {e:.4f} s, compiled {c:.4f} s: {e / c:.2f}x")


if __name__ == "__main__":
    main()
