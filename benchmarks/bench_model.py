#!/usr/bin/env python
"""Speed and memory of `DiNaLRMModel` scoring on CPU for a medium-size config.

Prints parameters, rewards/s for a single level and for a 3-level ensemble (one batched backbone pass vs.
three sequential passes), and the peak resident memory of each scenario. Every scenario runs in its own
process so that peak memory is not inherited from an earlier one; timings are the median of `--repeats`.

    python benchmarks/bench_model.py [--batch_size 8] [--latent_size 64] [--repeats 5]
"""

import argparse
import multiprocessing
import resource
import statistics
import tempfile
import time


LEVELS = [0.2, 0.5, 0.7]


def build_model(folder: str):
    """A medium reward model on a random medium SD3 backbone (12 of 12 kept blocks minus the last)."""
    import torch
    from diffusers import SD3Transformer2DModel

    from dinalrm.testing import medium_transformer_config
    from modeling_dinalrm import DiNaLRMModel

    torch.manual_seed(0)
    config = medium_transformer_config()
    SD3Transformer2DModel(**config).save_pretrained(folder)
    n = config["num_layers"] - 1
    third = max(1, n // 3)
    layers = [third, 2 * third, n]
    model = DiNaLRMModel.from_backbone(
        folder, num_layers=n, visual_layers=layers, text_layers=layers, head_num_heads=4
    )
    return model.eval(), config


def run_scenario(scenario: str, folder: str, args: argparse.Namespace, queue) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model, config = build_model(folder)
    generator = torch.Generator().manual_seed(0)
    size = args.latent_size
    latents = torch.randn(args.batch_size, config["in_channels"], size, size, generator=generator)
    prompt = torch.randn(args.batch_size, args.tokens, config["joint_attention_dim"], generator=generator)
    pooled = torch.randn(args.batch_size, config["pooled_projection_dim"], generator=generator)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def once() -> None:
        with torch.no_grad():
            if scenario == "single":
                model.score_latents(latents, prompt, pooled, t=0.4, generator=generator)
            elif scenario == "ensemble_batched":
                model.score_latents(latents, prompt, pooled, t=LEVELS, generator=generator)
            else:
                model.config.max_backbone_batch_size = args.batch_size
                model.score_latents(latents, prompt, pooled, t=LEVELS, generator=generator)

    once()  # warm-up
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        once()
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(
        {
            "params": sum(p.numel() for p in model.parameters()),
            "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
            "median_s": statistics.median(seconds),
            "rewards_per_s": args.batch_size / statistics.median(seconds),
            "peak_rss_mb": peak / 1024,
            "scoring_rss_increase_mb": (peak - baseline) / 1024,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--latent_size", type=int, default=64, help="latent height = width (image size / 8 for SD3)")
    parser.add_argument("--tokens", type=int, default=154, help="prompt tokens (77 CLIP + 77 T5)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="batch 1, 16x16 latents, 16 tokens, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.latent_size, args.tokens, args.repeats = 1, 16, 16, 1

    context = multiprocessing.get_context("spawn")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for scenario in ("single", "ensemble_batched", "ensemble_sequential"):
            queue = context.Queue()
            process = context.Process(target=run_scenario, args=(scenario, folder, args, queue))
            process.start()
            results[scenario] = queue.get()
            process.join()

    first = results["single"]
    print(
        f"medium config: {first['params'] / 1e6:.1f}M parameters ({first['backbone_params'] / 1e6:.1f}M backbone), "
        f"batch {args.batch_size}, latents {args.latent_size}x{args.latent_size}, {args.tokens} prompt tokens, "
        f"{args.threads} threads, median of {args.repeats}"
    )
    print(f"{'scenario':<34}{'s/batch':>10}{'rewards/s':>12}{'peak RSS MB':>14}{'+RSS scoring MB':>18}")
    labels = {
        "single": "single level (t=0.4)",
        "ensemble_batched": "3-level ensemble, one batched pass",
        "ensemble_sequential": "3-level ensemble, 3 passes",
    }
    for scenario, r in results.items():
        print(
            f"{labels[scenario]:<34}{r['median_s']:>10.3f}{r['rewards_per_s']:>12.2f}{r['peak_rss_mb']:>14.0f}"
            f"{r['scoring_rss_increase_mb']:>18.0f}"
        )
    ratio = results["ensemble_sequential"]["median_s"] / results["ensemble_batched"]["median_s"]
    print(f"batched / sequential ensemble speed: {ratio:.2f}x")


if __name__ == "__main__":
    main()
