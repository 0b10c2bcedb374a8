"""Pairwise accuracy of pairs scored one by one with `pipe.compare`, the noise shared by the two images or not.

    python eval/noise_sharing.py --model assets/dinalrm-tiny --pairs outputs/pairs --t_values 0.4 \
        --output results/noise_sharing-tiny.json

The evaluation runner (`run_eval.py`, `noise_sweep.py --pairs`) scores each image once, which is the fast way to
measure a dataset; this script checks what a user calling the pipeline pair by pair gets. Every pair of a canonical
pair dataset (`prompt, chosen, rejected`, e.g. the tiny world's `make_pairs.py` output or the photo pairs of
`eval/noise_sharing.sh`) is scored with one
`pipe.compare(prompt, chosen, rejected, t=t, generator=..., noise_sharing=mode)` per pair, level and mode; pair `i`
uses a generator seeded with `seed + i` in every mode and at every level, so the modes differ only in whether the
two images share that draw. A pair counts as correct when P(chosen preferred) > 0.5. Prints and writes, per mode
and level, the accuracy and its binomial standard error `sqrt(acc (1 - acc) / n)`.

`--mismatch crop|resize` measures what images of different sizes could share: the rejected image is centre-cropped
(or resized) to 3/4 of its height, so its latent is smaller than the chosen one's. `independent`: a draw per image
(`pipe.compare(..., noise_sharing="none")`); `cropped`: one draw at the chosen image's latent size, centre-cropped for
the rejected one (scored with `reward_model.score_latents(noise=...)`), which is what the pipeline's default does
with its draw at the backbone's largest size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import datasets
import torch

from .arguments import parse_floats, parse_noise_sharing
from .scorers import DiNaLRMScorer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="DiNa-LRM pipeline: Hub id or local folder.")
    parser.add_argument("--pairs", required=True, help="Canonical pair dataset (folder or Hub id).")
    parser.add_argument("--split", default="test")
    parser.add_argument("--t_values", type=parse_floats, default=parse_floats("0.4"))
    parser.add_argument("--noise_sharing", type=parse_noise_sharing, default=parse_noise_sharing("prompt,none"))
    parser.add_argument("--seed", type=int, default=0, help="Pair i draws its noise from seed + i.")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N pairs.")
    parser.add_argument("--output", default=None, help="JSON file for the table.")
    parser.add_argument(
        "--mismatch",
        choices=("crop", "resize"),
        default=None,
        help="Rejected images centre-cropped or resized to 3/4 height: independent vs centre-cropped shared noise.",
    )
    return parser.parse_args(argv)


def binomial_entry(n_correct: int, n_pairs: int) -> dict[str, float | int]:
    """Accuracy and its binomial standard error."""
    accuracy = n_correct / n_pairs
    return {
        "accuracy": accuracy,
        "standard_error": math.sqrt(accuracy * (1 - accuracy) / n_pairs),
        "n_correct": n_correct,
        "n_pairs": n_pairs,
    }


@torch.no_grad()
def pair_accuracies(pipe, rows, t_values, modes, seed: int) -> dict[str, dict[str, dict]]:
    """`{mode: {"t=..": binomial_entry}}` of `pipe.compare` on every row, chosen first."""
    correct = {(mode, t): 0 for mode in modes for t in t_values}
    for index, row in enumerate(rows):
        for mode in modes:
            for t in t_values:
                generator = torch.Generator().manual_seed(seed + index)
                result = pipe.compare(
                    row["prompt"], row["chosen"], row["rejected"], t=t, generator=generator, noise_sharing=mode
                )
                correct[(mode, t)] += result.probability > 0.5
    return {mode: {f"t={t:g}": binomial_entry(correct[(mode, t)], len(rows)) for t in t_values} for mode in modes}


def _centre_crop(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    top, left = (tensor.shape[-2] - height) // 2, (tensor.shape[-1] - width) // 2
    return tensor[..., top : top + height, left : left + width]


@torch.no_grad()
def mismatch_accuracies(pipe, rows, t_values, seed: int, how: str) -> dict[str, dict[str, dict]]:
    """`{"independent" | "cropped": {"t=..": binomial_entry}}` with rejected images of 3/4 the chosen height."""
    model = pipe.reward_model
    correct = {(variant, t): 0 for variant in ("independent", "cropped") for t in t_values}
    for index, row in enumerate(rows):
        chosen = row["chosen"].convert("RGB")
        rejected = row["rejected"].convert("RGB")
        height = chosen.height * 3 // 4
        if how == "crop":
            top = (chosen.height - height) // 2
            rejected = rejected.crop((0, top, rejected.width, top + height))
        else:
            rejected = rejected.resize((rejected.width, height))
        latents = [pipe.encode_images([image]) for image in (chosen, rejected)]
        embeds, pooled = pipe.encode_prompt(row["prompt"])
        for t in t_values:
            generator = torch.Generator().manual_seed(seed + index)
            independent = pipe.compare(row["prompt"], chosen, rejected, t=t, generator=generator, noise_sharing="none")
            correct[("independent", t)] += independent.probability > 0.5
            noise = torch.randn(latents[0].shape, generator=torch.Generator().manual_seed(seed + index))
            rewards = [
                model.score_latents(latent, embeds, pooled, t=t, noise=_centre_crop(noise, *latent.shape[-2:]))
                for latent in latents
            ]
            correct[("cropped", t)] += bool(rewards[0] > rewards[1])
    return {
        variant: {f"t={t:g}": binomial_entry(correct[(variant, t)], len(rows)) for t in t_values}
        for variant in ("independent", "cropped")
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = datasets.load_dataset(args.pairs, split=args.split)
    if args.limit is not None:
        rows = rows.select(range(min(args.limit, len(rows))))
    pipe = DiNaLRMScorer.load_pipeline(args.model, torch.device("cpu"), "float32")
    if args.mismatch is None:
        table = pair_accuracies(pipe, rows, args.t_values, args.noise_sharing, args.seed)
    else:
        table = mismatch_accuracies(pipe, rows, args.t_values, args.seed, args.mismatch)
    for mode, by_level in table.items():
        cells = ", ".join(f"{level}: {e['accuracy']:.3f} ± {e['standard_error']:.3f}" for level, e in by_level.items())
        print(f"{mode:<12} ({len(rows)} pairs) {cells}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        record = {
            "model": args.model, "pairs": args.pairs, "split": args.split, "seed": args.seed,
            "mismatch": args.mismatch, "results": table,
        }  # fmt: skip
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
