#!/usr/bin/env python
"""How single-level scoring time grows with the batch size and with the image resolution, on CPU.

On the medium random SD3 setup of `bench_model.py`: time vs batch (latent 32x32, i.e. 256x256 images) and time vs
resolution (batch 1, latents of 256^2 to 1024^2 images' equivalent, 32x32 to 128x128). Fits `time ~ a * x^k` on
the upper half of each sweep (where fixed per-call costs no longer dominate) and prints the measured exponents next
to the analytic ones: linear in the batch (k = 1); in the resolution, per block, `24 N d^2` FLOPs for the linear
layers and `4 N^2 d` for attention over `N = (H/2)(W/2) + tokens` tokens, so the local exponent of the FLOPs in the
image side goes from 2 (linear-dominated) towards 4 (attention-dominated). Writes a png of both sweeps.

    python benchmarks/bench_scaling.py [--batch_sizes 1,2,4,8,16,32,64] [--latent_sizes 32,48,64,96,128]
        [--output eval/results/scaling.png]
"""

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch
from bench_model import build_model


def seconds(model, config: dict, batch: int, size: int, tokens: int, repeats: int) -> float:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, config["in_channels"], size, size, generator=generator)
    prompt = torch.randn(batch, tokens, config["joint_attention_dim"], generator=generator)
    pooled = torch.randn(batch, config["pooled_projection_dim"], generator=generator)
    times = []
    with torch.no_grad():
        for index in range(repeats + 1):
            start = time.perf_counter()
            model.score_latents(latents, prompt, pooled, t=0.4, generator=generator, check_finite=False)
            if index:  # the first call is a warm-up
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def flops(config: dict, num_layers: int, size: int, tokens: int) -> float:
    """Backbone FLOPs per sample at latent `size` (multiply-add = 2): linear layers and attention per block."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    n = (size // config["patch_size"]) ** 2 + tokens
    return num_layers * (2 * 12 * n * d * d + 2 * 2 * n * n * d)


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """Slope of log y against log x over the upper half of the sweep."""
    half = len(xs) // 2
    return float(np.polyfit(np.log(xs[half:]), np.log(ys[half:]), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--latent_sizes", default="32,48,64,96,128", help="latent side (image side / 8)")
    parser.add_argument("--tokens", type=int, default=154)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="eval/results/scaling.png")
    parser.add_argument("--quick", action="store_true", help="batches 1, 2, 4; latent sides 16, 24, 32; 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.latent_sizes, args.repeats = "1,2,4", "16,24,32", 1
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        model, config = build_model(folder)
    n = model.config.num_backbone_layers
    batches = [int(b) for b in args.batch_sizes.split(",")]
    sizes = [int(s) for s in args.latent_sizes.split(",")]

    by_batch = [seconds(model, config, b, 32, args.tokens, args.repeats) for b in batches]
    by_size = [seconds(model, config, 1, s, args.tokens, args.repeats) for s in sizes]
    sides = [8 * s for s in sizes]
    analytic = [flops(config, n, s, args.tokens) for s in sizes]
    result = {
        "batch_sizes": batches,
        "seconds_by_batch": by_batch,
        "image_sides": sides,
        "seconds_by_side": by_size,
        "batch_exponent": fit_exponent(batches, by_batch),
        "side_exponent": fit_exponent(sides, by_size),
        "side_exponent_analytic": fit_exponent(sides, analytic),
    }
    print(f"medium SD3, {n} blocks, {args.threads} threads, median of {args.repeats}")
    for b, s in zip(batches, by_batch):
        print(f"batch {b:>3} at 256x256: {s:.3f} s  ({b / s:.1f} rewards/s)")
    for side, s, f in zip(sides, by_size, analytic):
        print(f"{side:>4}x{side:<4} batch 1: {s:.3f} s  ({f / 1e9:.1f} GFLOP backbone)")
    print(
        f"time ~ batch^{result['batch_exponent']:.2f} (analytic 1.00); time ~ side^{result['side_exponent']:.2f} "
        f"(analytic FLOPs ~ side^{result['side_exponent_analytic']:.2f} over the same range)"
    )
    print(json.dumps(result))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.loglog(batches, by_batch, "o-", label=f"measured, k={result['batch_exponent']:.2f}")
    left.loglog(batches, [by_batch[0] * b / batches[0] for b in batches], "--", label="linear")
    left.set(xlabel="batch size (256x256)", ylabel="seconds per call", title="scoring time vs batch")
    right.loglog(sides, by_size, "o-", label=f"measured, k={result['side_exponent']:.2f}")
    scale = by_size[-1] / analytic[-1]
    right.loglog(
        sides, [f * scale for f in analytic], "--", label=f"analytic FLOPs, k={result['side_exponent_analytic']:.2f}"
    )
    right.set(xlabel="image side (px, latents / 8)", ylabel="seconds per call", title="scoring time vs resolution")
    for axis in (left, right):
        axis.legend()
        axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
