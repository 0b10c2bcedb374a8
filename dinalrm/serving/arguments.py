"""The command line of the reward server and the `--ray` options of the commands that scale out, kept free of heavy
imports so that `dinalrm serve --help` (and `dinalrm score/eval --help`) is instant (the server itself,
`dinalrm.serving.server`, and `dinalrm.serving.distributed` import torch, Ray and the model stack)."""

from __future__ import annotations

import argparse


# The dtypes the server runs in (`dinalrm.serving.server.DTYPES` maps them to torch dtypes).
DTYPE_NAMES = ("float32", "bfloat16")


DESCRIPTION = "HTTP reward server for RL trainers (verl-omni's latent scorer protocol, version 1)."


def build_parser(prog: str = "dinalrm serve") -> argparse.ArgumentParser:
    """The parser of `dinalrm serve` (`dinalrm-serve`)."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_serve_arguments(parser)
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the reward server (see `dinalrm.serving.server.options_from_args`)."""
    parser.add_argument("--model", "--model-path", dest="model", required=True, help="DiNa-LRM Hub id or folder.")
    parser.add_argument(
        "--base-model",
        "--base-model-path",
        dest="base_model",
        default=None,
        help="SD3.5-Medium Hub id or folder, for official checkpoints (default: stabilityai/stable-diffusion-3.5-medium).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="float32")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu.")
    parser.add_argument("--max-batch-size", type=int, default=8, help="samples per batched model call.")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests.")
    parser.add_argument("--max-queue", type=int, default=1024, help="requests in flight before 503.")
    parser.add_argument("--max-body-mb", type=float, default=256.0, help="largest request body (400 above).")
    parser.add_argument("--request-timeout-s", type=float, default=120.0, help="per-request deadline (503 after).")
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="longest prompt_embeds accepted (default: the model's text limit, 77 + 512 tokens for SD3).",
    )
    parser.add_argument("--max-images", type=int, default=64, help="images per /v1/score_images request.")
    parser.add_argument(
        "--latents-only",
        action="store_true",
        help="load only the reward model (no VAE, text encoders): serves /v1/score, not /v1/score_images.",
    )
    parser.add_argument(
        "--normalize",
        choices=("zscore",),
        default=None,
        help="return z-scores (raw - mean) / std from the model's reward statistics instead of raw rewards.",
    )
    parser.add_argument("--ray", action="store_true", help="deploy with Ray Serve (pip install 'dinalrm[serve]').")
    parser.add_argument("--num-replicas", type=int, default=1, help="Ray Serve replicas (with --ray).")
    parser.add_argument(
        "--num-gpus-per-replica",
        type=float,
        default=None,
        help="with --ray; default 1 when CUDA is available, else 0.",
    )


def add_ray_args(parser: argparse.ArgumentParser, what: str) -> None:
    """`--ray [--num-workers N] [--num-gpus-per-worker G]`, shared by `run_eval` and the batch-scoring command
    (`dinalrm.serving.distributed` runs them)."""
    parser.add_argument(
        "--ray",
        action="store_true",
        help=f"Spread the {what} over a pool of Ray Data actors, each loading the model once (pip install "
        "'dinalrm[scale]'): on the cluster at RAY_ADDRESS when set, else on a local Ray. Same output as one process.",
    )
    parser.add_argument(
        "--num-workers", "--num_workers", dest="num_workers", type=int, default=1, help="--ray: actors (default 1)."
    )
    parser.add_argument(
        "--num-gpus-per-worker",
        "--num_gpus_per_worker",
        dest="num_gpus_per_worker",
        type=float,
        default=0,
        help="--ray: GPUs each actor holds (1: one actor per GPU; default 0, the CPU).",
    )
