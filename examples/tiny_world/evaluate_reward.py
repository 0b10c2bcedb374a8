"""Held-out pairwise accuracy of a DiNa-LRM against the oracle: single level, ensemble, and a noise sweep.

Each held-out pair (oracle-labelled, see `make_pairs.py`) is scored with ONE noise draw shared by its two images
(the comparison the model was trained on); accuracy is the fraction of pairs whose chosen image gets the higher
reward (ties count as wrong). The sweep repeats the single-level accuracy at t = 0.0, 0.1, ..., 0.9.

    python examples/tiny_world/evaluate_reward.py --model assets/dinalrm-tiny --pairs outputs/tiny-world/pairs
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import datasets
import torch
from tiny_world_common import TOKEN_LENGTH, report, set_threads


SWEEP = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="DiNaLRMPipeline folder (Hub layout)")
    parser.add_argument("--pairs", required=True, help="folder with test.parquet in the canonical format")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max_pairs", type=int, default=None)
    parser.add_argument("--no_sweep", action="store_true")
    parser.add_argument("--output", default=None, help="write the metrics JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def load_pairs(folder: str, split: str, max_pairs: int | None = None) -> tuple[list[str], list, list]:
    """`(prompts, chosen images, rejected images)` of a canonical `<split>.parquet`."""
    table = datasets.Dataset.from_parquet(str(Path(folder) / f"{split}.parquet"))
    if max_pairs is not None:
        table = table.select(range(min(max_pairs, len(table))))
    return (
        list(table["prompt"]),
        [im.convert("RGB") for im in table["chosen"]],
        [im.convert("RGB") for im in table["rejected"]],
    )


@torch.no_grad()
def pair_accuracy(
    pipe,
    prompts: list[str],
    chosen_latents: torch.Tensor,
    rejected_latents: torch.Tensor,
    t: float | list[float],
    seed: int,
    batch_size: int = 64,
) -> float:
    """Fraction of pairs ranked as the oracle ranks them, one shared noise per pair."""
    model = pipe.reward_model
    wins = []
    generator = torch.Generator().manual_seed(seed)
    for i in range(0, len(prompts), batch_size):
        embeds, pooled = pipe.encode_prompt(prompts[i : i + batch_size], max_sequence_length=TOKEN_LENGTH)
        chosen, rejected = chosen_latents[i : i + batch_size], rejected_latents[i : i + batch_size]
        noise = torch.randn(chosen.shape, generator=generator)
        both = model.score_latents(
            torch.cat([chosen, rejected]),
            embeds.repeat(2, 1, 1),
            pooled.repeat(2, 1),
            t=t,
            noise=torch.cat([noise, noise]),
        )
        r_chosen, r_rejected = both.chunk(2)
        wins.append(r_chosen > r_rejected)
    return float(torch.cat(wins).float().mean())


def evaluate(pipe, prompts: list[str], chosen: list, rejected: list, seed: int = 0, sweep: bool = True) -> dict:
    """Accuracy at the model's default level, with its ensemble, and (optionally) over the noise sweep."""
    start = time.time()
    chosen_latents = pipe.encode_images(chosen, resolution=(chosen[0].height, chosen[0].width))
    rejected_latents = pipe.encode_images(rejected, resolution=(chosen[0].height, chosen[0].width))
    config = pipe.reward_model.config
    result = {
        "pairs": len(prompts),
        f"accuracy_t{config.default_t}": pair_accuracy(
            pipe, prompts, chosen_latents, rejected_latents, config.default_t, seed
        ),
        "accuracy_ensemble": pair_accuracy(
            pipe, prompts, chosen_latents, rejected_latents, list(config.ensemble_t), seed
        ),
        "ensemble_t": list(config.ensemble_t),
    }
    if sweep:
        result["noise_sweep"] = {
            str(t): pair_accuracy(pipe, prompts, chosen_latents, rejected_latents, t, seed) for t in SWEEP
        }
    result["seconds"] = time.time() - start
    return result


def main(args: argparse.Namespace) -> dict:
    from pipeline_dinalrm import DiNaLRMPipeline

    set_threads(args.threads)
    pipe = DiNaLRMPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts, chosen, rejected = load_pairs(args.pairs, args.split, args.max_pairs)
    result = evaluate(pipe, prompts, chosen, rejected, args.seed, not args.no_sweep)
    report(result, args.output)
    return result


if __name__ == "__main__":
    main(parse_args())
