"""Preference pairs from the tiny generator's own samples, labelled by the oracle.

For every prompt the generator draws two samples with different seeds (the second one with a guidance scale
cycled over `--second_guidance_scales`, so that pairs span clear and subtle differences); the oracle scores both against the
prompt, pairs whose scores differ by at most `--margin` are dropped as ties, and the rest are written in the
canonical format (`prompt, chosen, rejected, weight` in `<split>.parquet`, next to the prompt lists
`train_prompts.txt` / `held_out_prompts.txt`) that `train_dinalrm.py
--data_format canonical` reads. Training pairs use training prompts; the `test` split uses held-out prompts.

    python examples/tiny_world/make_pairs.py --generator assets/tiny-sd3 --output_dir outputs/tiny-world/pairs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from domain import oracle_score, sample_prompts, split_prompts
from tiny_world_common import generate, set_threads

from dinalrm.data import write_canonical_pairs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", required=True, help="StableDiffusion3Pipeline folder")
    parser.add_argument("--output_dir", default="outputs/tiny-world/pairs")
    parser.add_argument("--train_prompts", type=int, default=1200, help="prompts sampled for training pairs")
    parser.add_argument("--test_prompts", type=int, default=240, help="held-out prompts sampled for test pairs")
    parser.add_argument("--margin", type=float, default=0.05, help="oracle score gap below which a pair is a tie")
    parser.add_argument(
        "--sample_steps",
        type=int,
        nargs="+",
        default=[4, 8, 12],
        help="sampling step counts, cycled over prompts (varies sample quality)",
    )
    parser.add_argument("--guidance_scale", type=float, default=4.0, help="guidance of the first sample")
    parser.add_argument(
        "--second_guidance_scales",
        type=float,
        nargs="+",
        default=[1.0, 2.0, 4.0],
        help="guidance of the second sample, cycled over batches (varies how well it follows the prompt)",
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def oracle_pairs(pipe, prompts: list[str], seed: int, args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Two samples per prompt, labelled by the oracle; returns the kept rows and counts."""
    rows, ties = [], 0
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        batch_index = start // args.batch_size
        steps = args.sample_steps[batch_index % len(args.sample_steps)]
        second_guidance = args.second_guidance_scales[
            (batch_index // len(args.sample_steps)) % len(args.second_guidance_scales)
        ]
        first = generate(pipe, batch, seed * 1000 + start, steps, args.guidance_scale)
        second = generate(pipe, batch, seed * 1000 + start + 500_000, steps, second_guidance)
        for prompt, a, b in zip(batch, first, second):
            score_a, score_b = oracle_score(a, prompt), oracle_score(b, prompt)
            if abs(score_a - score_b) <= args.margin:
                ties += 1
                continue
            chosen, rejected = (a, b) if score_a > score_b else (b, a)
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "weight": 1.0,
                    "oracle_margin": float(abs(score_a - score_b)),
                }
            )
    return rows, {"prompts": len(prompts), "pairs": len(rows), "ties_dropped": ties}


def main(args: argparse.Namespace) -> dict:
    set_threads(args.threads)
    start = time.time()
    pipe = StableDiffusion3Pipeline.from_pretrained(args.generator)
    pipe.set_progress_bar_config(disable=True)
    train_prompts, held_out = split_prompts()
    stats = {}
    for split, pool, n, seed in (
        ("train", train_prompts, args.train_prompts, args.seed),
        ("test", held_out, args.test_prompts, args.seed + 1),
    ):
        rows, stats[split] = oracle_pairs(pipe, sample_prompts(pool, n, seed), seed, args)
        stats[split]["mean_oracle_margin"] = float(np.mean([r["oracle_margin"] for r in rows]))
        write_canonical_pairs(args.output_dir, rows, split)
        print(f"{split}: {stats[split]} ({time.time() - start:.0f}s)", flush=True)
    stats["seconds"] = time.time() - start
    Path(args.output_dir, "train_prompts.txt").write_text("\n".join(train_prompts) + "\n")
    Path(args.output_dir, "held_out_prompts.txt").write_text("\n".join(held_out) + "\n")
    Path(args.output_dir, "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


if __name__ == "__main__":
    with torch.no_grad():
        main(parse_args())
