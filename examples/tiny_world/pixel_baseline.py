"""A pixel-space reward baseline of similar size to the tiny DiNa-LRM, trained on the same oracle-labelled pairs.

A small CNN reads the decoded 64x64 image (plus x/y coordinate channels, so position is visible), is modulated
(FiLM) by the prompt — the same frozen SD3 text-encoder features DiNa-LRM gets, flattened and projected —
and returns one score; it is trained with the Bradley-Terry loss (there is no noise level to calibrate).

    python examples/tiny_world/pixel_baseline.py --generator assets/tiny-sd3 --pairs outputs/tiny-world/pairs

`--save_model` keeps the trained CNN (safetensors) for use as a reward (`dinalrm.alignment.load_pixel_reward`, the
baseline of ReFL and Flow-GRPO).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline
from evaluate_reward import load_pairs
from tiny_world_common import TOKEN_LENGTH, images_to_tensor, report, set_threads

from dinalrm.alignment.pixel_reward import PixelReward, save_pixel_reward


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", required=True, help="SD3 pipeline folder (its text encoders)")
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output", default=None, help="write the metrics JSON here")
    parser.add_argument("--save_model", default=None, help="write the trained CNN here (.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


@torch.no_grad()
def encode(pipe: StableDiffusion3Pipeline, prompts: list[str]) -> torch.Tensor:
    return pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=TOKEN_LENGTH
    )[0]


def main(args: argparse.Namespace) -> dict:
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    pipe = StableDiffusion3Pipeline.from_pretrained(args.generator, transformer=None)
    train_prompts, train_chosen, train_rejected = load_pairs(args.pairs, "train")
    test_prompts, test_chosen, test_rejected = load_pairs(args.pairs, "test")
    train_text, test_text = encode(pipe, train_prompts), encode(pipe, test_prompts)
    chosen, rejected = images_to_tensor(train_chosen), images_to_tensor(train_rejected)
    model = PixelReward(train_text.shape[1], train_text.shape[2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(args.steps):
        index = torch.randint(0, len(chosen), (args.batch_size,), generator=generator)
        scores = model(torch.cat([chosen[index], rejected[index]]), train_text[index].repeat(2, 1, 1))
        loss = -F.logsigmoid(scores[: args.batch_size] - scores[args.batch_size :]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"pixel baseline step {step} loss {loss.item():.4f}", flush=True)
    train_seconds = time.time() - start
    model.eval()
    with torch.no_grad():
        start = time.time()
        scores_chosen = model(images_to_tensor(test_chosen), test_text)
        scores_rejected = model(images_to_tensor(test_rejected), test_text)
        eval_seconds = time.time() - start
    result = {
        "accuracy": float((scores_chosen > scores_rejected).float().mean()),
        "pairs": len(test_prompts),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_seconds,
        "train_steps": args.steps,
        "batch_size": args.batch_size,
        "eval_seconds_per_pair": eval_seconds / max(len(test_prompts), 1),
    }
    report(result, args.output)
    if args.save_model:
        save_pixel_reward(model, args.save_model)
    return result


if __name__ == "__main__":
    main(parse_args())
