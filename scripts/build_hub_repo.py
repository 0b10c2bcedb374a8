#!/usr/bin/env python
"""Assemble the DiNa-LRM Hub repository (a `DiffusionPipeline` folder) from a trained reward model and an SD3 pipeline.

The reward model folder (`DiNaLRMModel.save_pretrained`, e.g. the converter's output) already holds the backbone
blocks it uses, so only the base pipeline's VAE, text encoders, tokenizers and scheduler are loaded, one by one:
the base transformer is never read. The result loads with
`DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)` and carries a model card.

    python scripts/build_hub_repo.py --reward_model dinalrm-sd35m-reward-model \
        --base stabilityai/stable-diffusion-3.5-medium --output_dir dinalrm-sd35m \
        [--datasets MizzenAI/HPDv3] [--eval_results table1/results.json] \
        [--overwrite] [--push_to_hub --hub_model_id org/dinalrm-sd35m [--private]]
"""

import argparse
import json
import logging
import os
import shutil

from huggingface_hub import create_repo, upload_folder

from dinalrm.hub import build_hub_repo, eval_results_from_run_eval
from modeling_dinalrm import DiNaLRMModel


logger = logging.getLogger("build_hub_repo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward_model", required=True, help="Folder of a saved DiNaLRMModel.")
    parser.add_argument("--base", required=True, help="SD3 pipeline: Hub id or local folder.")
    parser.add_argument("--revision", default=None, help="Revision of --base.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="Replace the contents of a non-empty output_dir.")
    parser.add_argument(
        "--datasets",
        default=None,
        help="Comma-separated Hub ids of the training data, for the card (e.g. MizzenAI/HPDv3).",
    )
    parser.add_argument(
        "--eval_results",
        default=None,
        help="eval/run_eval.py's results.json: its accuracies go into the card's model-index.",
    )
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", default=None, help="Repository to push to, e.g. org/dinalrm-sd35m.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repository as private.")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id.")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        if not args.overwrite:
            raise SystemExit(f"{args.output_dir} is not empty; pass --overwrite to replace its contents.")
        shutil.rmtree(args.output_dir)

    reward_model = DiNaLRMModel.from_pretrained(args.reward_model)
    eval_results = None
    if args.eval_results:
        with open(args.eval_results, encoding="utf-8") as handle:
            eval_results = eval_results_from_run_eval(json.load(handle))
    datasets = [name for name in (args.datasets or "").split(",") if name]
    build_hub_repo(reward_model, args.base, args.output_dir, args.revision, args.hub_model_id, datasets, eval_results)
    logger.info(f"Wrote the Hub repository to {args.output_dir}.")

    if args.push_to_hub:
        repo_id = create_repo(args.hub_model_id, exist_ok=True, private=args.private).repo_id
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="Upload DiNa-LRM pipeline")
        logger.info(f"Pushed to https://huggingface.co/{repo_id}.")


if __name__ == "__main__":
    main()
