#!/usr/bin/env python
"""Convert an official DiNa-LRM checkpoint (github.com/HKUST-C4G/diffusion-rm) into a `DiNaLRMModel` folder.

The official layout is a folder or Hub repository with `config.json` (the run's YAML config as JSON) and
`checkpoint/` holding either `backbone_lora/` (a peft adapter) + `rm_head.pt` (LoRA runs), `rm_head.pt` alone
(frozen backbone) or `full_model.pt` (full fine-tuning). The backbone's pretrained blocks come from a diffusers SD3
transformer. The conversion itself is `modeling_dinalrm.convert_official_checkpoint`, which
`DiNaLRMModel.from_pretrained(official_id_or_dir)` and `DiNaLRMPipeline.from_pretrained(...)` also run (so this
script is only needed to keep a converted copy).

    python scripts/convert_official_checkpoint.py --official_dir liuhuohuo/DiNa-LRM-SD35M-12layers \
        --backbone stabilityai/stable-diffusion-3.5-medium --output_dir dinalrm-sd35m-reward-model [--keep_lora_adapter]
"""

import argparse
import logging

from dinalrm.hub import check_output_dir
from modeling_dinalrm import (
    OFFICIAL_ALLOW_PATTERNS,
    SD35_MEDIUM_ID,
    ConversionError,
    ModelUnavailableError,
    convert_official_checkpoint,
    hub_errors,
    resolve_repo,
)


logger = logging.getLogger("convert_official_checkpoint")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--official_dir", required=True, help="Official checkpoint: a folder or a Hub id (config.json + checkpoint/)."
    )
    parser.add_argument(
        "--backbone", default=SD35_MEDIUM_ID, help="SD3 transformer: Hub id or folder (pipeline or transformer)."
    )
    parser.add_argument("--backbone_subfolder", default="transformer")
    parser.add_argument("--revision", default=None, help="Revision of the backbone repository.")
    parser.add_argument("--official_revision", default=None, help="Revision of the official checkpoint repository.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--keep_lora_adapter", action="store_true", help="Save LoRA as an adapter instead of merging it."
    )
    parser.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty output_dir.")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_output_dir(args.output_dir, [args.official_dir, args.backbone], args.overwrite)
    try:
        official_dir, _ = resolve_repo(
            args.official_dir, OFFICIAL_ALLOW_PATTERNS, "DiNa-LRM checkpoint", args.official_revision
        )
        with hub_errors(args.backbone, "base model"):
            model = convert_official_checkpoint(
                official_dir, args.backbone, args.backbone_subfolder or None, args.revision
            )
    except (ConversionError, ModelUnavailableError, FileNotFoundError) as error:
        raise SystemExit(f"Conversion failed: {error}") from None
    model.save_pretrained(args.output_dir, merge_lora=not args.keep_lora_adapter)
    logger.info("Saved %s (%s LoRA)", args.output_dir, "adapter" if args.keep_lora_adapter else "merged")


if __name__ == "__main__":
    main()
